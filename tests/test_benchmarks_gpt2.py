"""benchmarks.gpt2 and benchmarks.profile without running a GPU: plan, tables, plot, profile parsing."""

from __future__ import annotations

import pytest

from benchmarks import common
from benchmarks import gpt2 as bench


def _rows(md: str) -> list[list[str]]:
    """The cells of each line of the markdown tables in ``md``."""
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in md.splitlines() if ln.startswith("|")]


def _ok(tps, losses, **kw):
    return {"ok": True, "params": 124e6, "tokens_per_s": tps, "mfu": 0.4, "step_s_median": 0.1,
            "peak_bytes": 2**30, "compile_s": 30.0, "losses": losses, **kw}


INFO = {"device": "NVIDIA H100", "platform": "gpu", "jax_version": "0"}


def test_benchmark_report_helpers(tmp_path):
    """benchmarks.gpt2 without running anything: plan, slug, table and plot."""
    assert common.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    specs = bench._plan(quick=False, on_gpu=True, impls=("pallas", "xla", "cudnn"))
    assert [(s.seq_len, s.batch_size, s.attention) for s in specs] == [
        (1024, 16, "pallas"), (1024, 16, "xla"), (1024, 16, "cudnn"),
        (4096, 4, "pallas"), (4096, 4, "xla"), (4096, 4, "cudnn"),
    ]
    assert [s.loss_steps for s in specs] == [300, 300, 0, 0, 0, 0]
    assert all(s.timed_steps == 30 and s.model == "gpt2" for s in specs)
    assert [s.seq_len for s in bench._plan(False, True, ("xla",), seq_lens=(4096,))] == [4096]
    assert {s.model for s in bench._plan(True, False, ("xla",))} == {"tiny"}

    results = [_ok(200e3, [5.0, 4.0]), _ok(100e3, [5.0, 4.1]), {"ok": False, "error": "OOM | x"}] * 2
    md = bench.render_markdown(INFO, specs, results, "x.png", quick=False)
    rows = _rows(md)
    assert rows[0] == ["T", "batch", "attention", "tokens/s", "MFU", "step (ms)", "peak memory (GiB)", "compile (s)", "vs xla"]
    assert ["1024", "16", "pallas", "200,000", "40.0%", "100.0", "1.00", "30.0", "2.00x"] in rows
    assert ["1024", "16", "cudnn", "failed: OOM / x", "", "", "", "", ""] in rows
    assert "max |pallas - xla|" in md and "![loss curves](x.png)" in md
    assert "`pallas` ran" not in md  # no record says which kernels it ran
    results[0] = _ok(200e3, [5.0, 4.0], kernels="fwd mosaic, bwd mosaic")
    assert "T=1024: fwd mosaic, bwd mosaic" in bench.render_markdown(INFO, specs, results, "x.png", quick=False)
    assert bench.plot_losses(specs, results, tmp_path / "x.png")
    assert (tmp_path / "x.png").stat().st_size > 0


def test_pallas_kernels_names_auto_choice_per_pass(monkeypatch):
    """The worker records which kernel backend "pallas" ran for each pass: the auto table's for this GPU."""
    import dataclasses

    from models import gpt2
    from pallas_flash.backends import auto, mosaic_gpu

    cfg = dataclasses.replace(gpt2.get_config("gpt2"), dtype="bfloat16")
    spec = bench.RunSpec(model="gpt2", seq_len=1024, batch_size=16, attention="pallas", warmup_steps=1, timed_steps=1)
    assert bench._pallas_kernels(cfg, dataclasses.replace(spec, attention="cudnn")) is None
    monkeypatch.setattr(auto, "gpu_name", lambda: "NVIDIA A100-SXM4-80GB")  # no auto table: Triton
    assert bench._pallas_kernels(cfg, spec) == "fwd triton, bwd triton"
    monkeypatch.setattr(auto, "gpu_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(mosaic_gpu, "_gpu_compute_capability", lambda: "9.0")
    assert bench._pallas_kernels(cfg, spec) == "fwd mosaic, bwd mosaic"


XSPACE = """
planes {
  name: "/device:GPU:0"
  lines { name: "Stream #13(Compute)"
    events { metadata_id: 1 offset_ps: 0 duration_ps: 4000000000 }
    events { metadata_id: 2 offset_ps: 5000000000 duration_ps: 2000000000 }
    events { metadata_id: 3 offset_ps: 8000000000 duration_ps: 1000000000 }
    events { metadata_id: 4 offset_ps: 9000000000 duration_ps: 500000000 }
    events { metadata_id: 1 offset_ps: 9600000000 duration_ps: 4000000000 } }
  lines { name: "XLA Ops" events { metadata_id: 1 offset_ps: 0 duration_ps: 4000000000 } }
  event_metadata { key: 1 value { id: 1 name: "pallas_flash_bwd_dkdv" } }
  event_metadata { key: 2 value { id: 2 name: "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT" } }
  event_metadata { key: 3 value { id: 3 name: "loop_multiply_fusion_3" } }
  event_metadata { key: 4 value { id: 4 name: "cudnn_generated_fort_native_sdpa_sm90_flash_fprop" } }
}
planes { name: "/host:CPU" lines { name: "python" events { metadata_id: 1 duration_ps: 99000000000 } }
  event_metadata { key: 1 value { id: 1 name: "pallas_flash_fwd" } } }
"""


def test_profile_breakdown_reads_gpu_streams_only():
    """Kernel times per step by category, from the compute streams of the GPU plane alone."""
    from jax.profiler import ProfileData

    from benchmarks import profile

    data = ProfileData.from_serialized_xspace(ProfileData.text_proto_to_serialized_xspace(XSPACE))
    events = profile.gpu_kernel_events(data)
    ns = profile.kernel_totals(events)
    assert ns == {"pallas_flash_bwd_dkdv": 8e6, "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT": 2e6,
                  "loop_multiply_fusion_3": 1e6, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop": 0.5e6}
    summary = profile.summarize(ns, steps=2)
    assert summary["ms_per_step"] == pytest.approx({"attention": 4.25, "matmul": 1.0, "copy": 0.0, "other": 0.5})
    assert summary["kernel_ms_per_step"] == pytest.approx(5.75)
    assert summary["top"][0] == ("pallas_flash_bwd_dkdv", pytest.approx(4.0))
    gaps = profile.idle_gaps(events, steps=2)
    # idle: 4->5 ms before the gemm, 7->8 ms before the fusion, 9.5->9.6 ms before dkdv
    assert gaps["idle_ms_per_step"] == pytest.approx(1.05)
    assert gaps["launches_per_step"] == 2.5
    assert gaps["idle_before"][0] == ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", pytest.approx(0.5))
    host_only = ProfileData.from_serialized_xspace(ProfileData.text_proto_to_serialized_xspace(
        XSPACE[XSPACE.index("planes { name: \"/host"):]))
    assert profile.gpu_kernel_events(host_only) is None  # a CPU trace has no GPU plane


def test_benchmark_report_profile_table():
    specs = bench._plan(quick=False, on_gpu=True, impls=("pallas",), loss_steps=0, profile_steps=3)
    assert all(s.profile_steps == 3 and s.loss_steps == 0 for s in specs)
    prof = {"ms_per_step": {"attention": 5.0, "matmul": 20.0, "copy": 0.1, "other": 30.0},
            "kernel_ms_per_step": 55.1, "top": [["nvjet_x", 3.0], ["pallas_flash_fwd", 1.5]],
            "idle_ms_per_step": 4.9, "launches_per_step": 1200.0, "idle_before": [["loop_add", 0.7]]}
    r = _ok(1e5, [5.0], mfu=0.2, step_s_median=0.06, compile_s=20.0, profile=prof)
    md = bench.render_markdown(INFO, specs, [r, r], None, False)
    assert ["1024", "pallas", "60.0", "55.1", "5.0", "20.0", "0.1", "30.0", "4.9", "1200"] in _rows(md)
    assert "`loop_add` 0.70" in md
    assert "`nvjet_x` 3.00" in md


@pytest.mark.parametrize("argv, fragment", [(["--attention", "flash"], "--attention"), (["--seq-lens", "1k"], "--seq-lens")])
def test_cli_errors(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", *argv])
    assert exc.value.code == 2 and fragment in capsys.readouterr().err


def test_loss_heading_names_the_run_with_the_curve():
    """With cuDNN first in the plan (no loss curve), the heading takes its steps from the xla run that has one."""
    specs = bench._plan(quick=False, on_gpu=True, impls=("cudnn", "xla"))
    assert [s.loss_steps for s in specs[:2]] == [0, 300]
    results = [_ok(1000.0, [3.0] * 35), _ok(900.0, [3.0] * 300)] + [_ok(800.0, [3.0] * 35)] * (len(specs) - 2)
    md = bench.render_markdown(INFO, specs, results, None, False)
    assert "## Loss, 300 steps at T=1024" in md
    assert "MFU = tokens/s x (6N + 12LTD) / the GPU's dense bf16 peak (not known for this device" in md
    md = bench.render_markdown(INFO, specs, [dict(r, peak_flops=989e12) for r in results], None, False)
    assert "/ 989 TFLOP/s (the GPU's dense bf16 peak)" in md


def test_runs_keep_their_records(tmp_path, monkeypatch, capsys):
    """A second run the same day writes new files beside the first's; each run's record is on disk as soon as it
    finishes, and an interrupted run still writes its report, marked partial (nothing measured is lost)."""
    import json

    calls = []

    def fake_worker(module, spec, timeout, env=None):  # no subprocess: one record per spec, the fourth interrupted
        if spec.get("probe"):
            return dict(ok=True, device="cpu", device_slug="cpu", platform="cpu", jax_version="0")
        calls.append(spec)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return dict(_ok(1000.0 * len(calls), [3.0, 2.9]), device="cpu", platform="cpu", jax_version="0", peak_flops=None)

    monkeypatch.setattr(common, "run_worker", fake_worker)
    argv = ["--quick", "--attention", "xla", "--loss-steps", "0", "--out-dir", str(tmp_path)]
    assert bench.main(argv) == 0
    assert bench.main(argv) == 130  # its second spec is interrupted
    stems = sorted(p.stem for p in (tmp_path / "cpu").glob("*.jsonl"))
    assert len(stems) == 2 and stems[1] == stems[0] + "-2"
    for stem, n_records, status in ((stems[0], 2, "complete"), (stems[1], 1, "partial: interrupted")):
        lines = [json.loads(ln) for ln in (tmp_path / "cpu" / f"{stem}.jsonl").read_text().splitlines()]
        assert [ln.get("kind") for ln in lines] == ["meta"] + [None] * n_records + ["meta"]
        assert lines[0]["status"] == "running" and lines[-1]["status"].startswith(status)
        md = (tmp_path / "cpu" / f"{stem}.md").read_text()
        assert ("**partial: interrupted" in md) == (status != "complete")
    assert [json.loads(ln)["tokens_per_s"] for ln in (tmp_path / "cpu" / f"{stems[0]}.jsonl").read_text()
            .splitlines()[1:3]] == [1000.0, 2000.0]


def _fake_workers(monkeypatch, platform: str, failures: dict[str, dict]) -> list[str]:
    """No subprocess: the probe says ``platform``; a backend in ``failures`` gets that result, the others run."""
    ran = []

    def fake_worker(module, spec, timeout, env=None):
        if spec.get("probe"):
            return dict(ok=True, device=platform, device_slug=platform, platform=platform, jax_version="0")
        ran.append(spec["attention"])
        return failures.get(spec["attention"]) or dict(_ok(1000.0, [3.0, 2.9]), device=platform, platform=platform,
                                                        jax_version="0", peak_flops=None)

    monkeypatch.setattr(common, "run_worker", fake_worker)
    return ran


NO_GPU = {"ok": False, "status": "n/a", "error": "NotImplementedError: no implementation supports this call: cudnn: "
          "implementation='cudnn' needs an NVIDIA GPU"}


def test_backend_not_available_here_is_na_in_report_and_jsonl(tmp_path, monkeypatch, capsys):
    """--quick --attention xla,cudnn on a CPU: cudnn is n/a in the .jsonl, so it is in the .md too (it said
    "failed: ..."), and the run does not fail for it (it exited 1) since xla ran."""
    import json

    _fake_workers(monkeypatch, "cpu", {"cudnn": NO_GPU})
    argv = ["--quick", "--attention", "xla,cudnn", "--loss-steps", "0", "--out-dir", str(tmp_path)]
    assert bench.main(argv) == 0
    (md,) = (tmp_path / "cpu").glob("*.md")
    rows = [r for r in _rows(md.read_text()) if r[2] == "cudnn"]
    assert len(rows) == 2 and all(r[3].startswith("n/a: NotImplementedError") for r in rows)
    assert "failed" not in md.read_text() and "T=64 batch=2 cudnn: n/a: NotImplementedError" in capsys.readouterr().out
    (jsonl,) = (tmp_path / "cpu").glob("*.jsonl")
    assert {json.loads(ln).get("status") for ln in jsonl.read_text().splitlines() if '"cudnn"' in ln} == {"n/a"}
    # Nothing ran, or a failure that is not n/a: the CPU smoke run fails.
    assert bench.main(["--quick", "--attention", "cudnn", "--out-dir", str(tmp_path)]) == 1
    _fake_workers(monkeypatch, "cpu", {"cudnn": NO_GPU, "xla": {"ok": False, "status": "ERR", "error": "boom"}})
    assert bench.main(argv) == 1


def test_gpu_default_backends_are_the_docstrings(tmp_path, monkeypatch):
    """The module docstring and --attention's help promise pallas, xla, cudnn by default on a GPU; the default had
    grown to every name --attention takes (triton and mosaic too: 5 runs per shape, not 3)."""
    ran = _fake_workers(monkeypatch, "gpu", {})
    assert bench.main(["--loss-steps", "0", "--seq-lens", "1024", "--out-dir", str(tmp_path)]) == 0
    assert ran == ["pallas", "xla", "cudnn"] and "(``pallas``, ``xla``, ``cudnn``)" in bench.__doc__


@pytest.mark.parametrize(
    "kernel, expected",
    [
        ("pallas_flash_mosaic_bwd_dkdv_mosaic_gpu_kernel", "attention"),  # as the H200 profile names it
        ("pallas_flash_mosaic_fwd_mosaic_gpu_kernel", "attention"),
        ("anonymous_mosaic_gpu_kernel", "other"),  # an unnamed Mosaic GPU kernel: not ours to claim
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", "attention"),
        # cuDNN's passes beside its kernel, as the H200 profile names them (gpt2-2026-12-04-3cb91b1.jsonl)
        ("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*, float*, int)", "attention"),
        ("void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int)", "attention"),
        ("loop_convert_fusion_24", "other"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", "matmul"),
        ("Memset 3", "copy"),
    ],
)
def test_profile_categories(kernel, expected):
    """The named Mosaic kernels count as attention in the GPT-2 step's breakdown."""
    from benchmarks import profile

    assert profile.category(kernel) == expected
