"""benchmarks.attention's command line on a CPU, without running a benchmark: what ``--allow-cpu`` runs when
``--quick`` is given too, ``--report-from`` on files that are cut short or are not attention records, and
``--help``'s defaults (each shown once, none wrong). The harness itself: test_benchmarks.py."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import ab, common, decode
from benchmarks import attention as bench

SHAPES = ("head_dims", "seq_lens", "batch_tokens", "hidden")


# --- --allow-cpu keeps its tiny shapes whatever --quick says -------------------------------------


@pytest.mark.parametrize("suite", [[], ["--suite", "masks"], ["--memory"]], ids=["attention", "masks", "memory"])
def test_quick_with_allow_cpu_on_a_cpu_keeps_the_tiny_shapes(suite):
    """``--quick --allow-cpu`` on a CPU ran --quick's GPU shapes (16k tokens, N 4k) in interpret mode: hours."""
    tiny = bench.parse_args(["--allow-cpu", *suite], on_cpu=True)
    quick = bench.parse_args(["--quick", "--allow-cpu", *suite], on_cpu=True)
    assert quick.profile == tiny.profile == "cpu"
    assert {k: getattr(quick, k) for k in SHAPES} == {k: getattr(tiny, k) for k in SHAPES}
    if quick.memory:
        assert max(quick.seq_lens) <= 256
    else:
        problems = bench.plan(quick)
        assert problems and [p.fields() for p in problems] == [p.fields() for p in bench.plan(tiny)]
        assert max(p.shape.batch * p.shape.seq_q * p.shape.num_heads * p.shape.head_dim for p in problems) <= 2**15


def test_quick_with_allow_cpu_keeps_shapes_given_by_flag_and_gpu_quick():
    o = bench.parse_args(["--quick", "--allow-cpu", "--seq-lens", "256", "--head-dims", "16"], on_cpu=True)
    assert (o.seq_lens, o.head_dims, o.profile) == ((256,), (16,), "cpu")
    on_gpu = bench.parse_args(["--quick", "--allow-cpu"], on_cpu=False)  # a GPU: --allow-cpu changes nothing
    assert (on_gpu.profile, on_gpu.head_dims, on_gpu.seq_lens) == ("quick", (64, 128), (1024, 4096))


# --- --report-from: a cut last line is skipped (and said), other bad files are a clean error ----------------


def _speed(impl, tflops):
    return dict(kind="speed", impl=impl, status="ok", tflops=tflops, time_s=1e-3, checked=True, err=1e-3, tol=2e-2,
                dtype="bf16", gqa=1, batch=16, seq_q=1024, seq_k=1024, heads=16, kv_heads=16, head_dim=128,
                causal=False, **{"pass": "fwd"})


def _records_file(path, *, tail: str = ""):
    for rec in (dict(kind="meta", device="H100", device_slug="h100", impls=["pallas_flash", "cudnn"]),
                _speed("pallas_flash", 300.0), _speed("cudnn", 400.0)):
        common.append_jsonl(path, rec)
    with open(path, "a") as f:
        f.write(tail)
    return path


def test_report_from_skips_a_cut_last_line_and_says_so(tmp_path, capsys):
    """A run killed mid-write leaves a partial last line: the merge goes on without it, naming file and line."""
    src = _records_file(tmp_path / "killed.jsonl", tail='{"kind": "speed", "impl": "xla", "pa')
    assert bench.main(["--report-from", str(src), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert f"{src}:4: the last line is cut short" in err and "skipped" in err
    merged = tmp_path / "killed-merged.md"
    assert "(skipped, cut short: killed.jsonl:4)" in merged.read_text()
    lines = [json.loads(ln) for ln in (tmp_path / "killed-merged.jsonl").read_text().splitlines()]
    assert sorted(r["impl"] for r in lines if r["kind"] == "speed") == ["cudnn", "pallas_flash"]


@pytest.mark.parametrize("content, fragment", [
    ('{"kind": "speed", "impl": "xla", "pa\n', "killed.jsonl:4: not JSON"),  # complete (newline): not a cut line
    ('[1, 2]\n', "killed.jsonl:4: not a JSON object"),
    ('{"spec": {"attention": "xla"}, "ok": true}\n', "killed.jsonl is not a benchmarks.attention record file"),
    ('{"kind": "decode", "impl": "xla"}\n', "kind 'decode'"),
], ids=["bad-line-with-newline", "not-an-object", "gpt2-record", "decode-record"])
def test_report_from_a_bad_file_is_one_clean_line(tmp_path, capsys, content, fragment):
    src = _records_file(tmp_path / "killed.jsonl", tail=content)
    assert bench.main(["--report-from", str(src), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.jsonl"]  # nothing written


def test_load_jsonl_skips_only_a_cut_last_line(tmp_path):
    path = _records_file(tmp_path / "a.jsonl", tail='{"kind": "sp')
    said = []
    records, metas = common.load_jsonl([path], warn=said.append)
    assert len(records) == 2 and len(metas) == 1
    assert said == [f"{path}:4: the last line is cut short (a run killed while writing it?): skipped, its record is "
                    "not in the result"]
    path.write_bytes(b"\xff\xfe\n")
    with pytest.raises(ValueError, match="a.jsonl: not a text file"):
        common.load_jsonl([path])


# --- --help: each option's default once ----------------------------------------------------------------------


class _Built(Exception):
    """Raised in place of parsing: carries the parser a module's ``parse_args`` built."""


def _parser_of(parse_args, monkeypatch) -> argparse.ArgumentParser:
    def grab(self, *args, **kwargs):
        raise _Built(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(_Built) as built:
        parse_args([])
    return built.value.args[0]


@pytest.mark.parametrize("module", [bench, decode, ab], ids=["attention", "decode", "ab"])
def test_help_shows_each_default_once(module, monkeypatch):
    """ArgumentDefaultsHelpFormatter added "(default: None)" after hand-written defaults and "(default: True)" to
    --no-plots (whose default is to plot): now each option says its default at most once, and never None/True."""
    parser = _parser_of(module.parse_args, monkeypatch)
    formatter = parser._get_formatter()
    texts = {}
    for action in parser._actions:
        if action.help and action.help != argparse.SUPPRESS:
            text = texts[action.option_strings[-1]] = formatter._expand_help(action)
            assert text.lower().count("default") <= 1, text
            assert not any(f"(default: {v})" in text for v in ("None", "True", "False", "[]")), text
    if module is bench:
        assert texts["--batch-tokens"] == "batch * N (default 16384; --allow-cpu on a CPU 256)"
        assert texts["--no-plots"] == "skip the PNG plots" and texts["--jobs"].endswith("(default: 4)")
        cpu, full = bench.DEFAULTS[("attention", "cpu")], bench.DEFAULTS[("attention", "full")]
        assert f"default {full['hidden']}; --allow-cpu on a CPU {cpu['hidden']}" in texts["--hidden"]
        assert f"default {','.join(map(str, full['head_dims']))};" in texts["--head-dims"]
