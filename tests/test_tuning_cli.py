"""The tuner CLI's table file (``--out``) on CPU: resuming skips the keys a file holds, ``--retune`` replaces them.

The search itself needs a GPU (``test_mosaic_tuning.py`` covers its pieces); here a stand-in returns a fixed
config per problem, so what is tested is which problems are tuned and what the file holds afterwards.
"""

from __future__ import annotations

import json
import types

import pytest

from pallas_flash.backends.mosaic_gpu import config as mosaic_config
from pallas_flash.tuning import __main__ as tuning_cli
from pallas_flash.tuning.search import Problem

ARGS = ["--backend", "mosaic", "--head-dims", "64", "--causal", "no", "--seq-lens", "1024,4096"]
KEY_1K = mosaic_config.config_key(64, "bfloat16", False, 1024)
KEY_4K = mosaic_config.config_key(64, "bfloat16", False, 4096)


@pytest.fixture
def tuned(monkeypatch):
    """Pretend to be on a GPU with a stand-in tuner; returns the list of sequence lengths it was asked to tune."""
    calls = []

    def tune_problem(p, log=print, **_):
        calls.append(p.seq)
        cfg = types.SimpleNamespace(to_dict=lambda: {"fwd": {"block_kv": 64 + p.seq // 1024}})
        return cfg, {"fwd_ms": 1.0, "bwd_ms": 2.0}

    monkeypatch.setattr(tuning_cli.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(mosaic_config, "gpu_name", lambda: "NVIDIA H200")
    monkeypatch.setitem(tuning_cli.TUNERS, "mosaic", (types.SimpleNamespace(Problem=Problem,
                                                                             tune_problem=tune_problem), mosaic_config))
    return calls


def test_out_resumes_past_the_keys_it_holds(tuned, tmp_path):
    out = tmp_path / "h200.json"
    out.write_text(json.dumps({KEY_1K: {"fwd": {"block_kv": 999}}}))
    assert tuning_cli.main(ARGS + ["--out", str(out)]) == 0
    assert tuned == [4096]
    assert json.loads(out.read_text()) == {KEY_1K: {"fwd": {"block_kv": 999}}, KEY_4K: {"fwd": {"block_kv": 68}}}


def test_retune_replaces_the_keys_it_holds(tuned, tmp_path):
    out = tmp_path / "h200.json"
    other = mosaic_config.config_key(128, "bfloat16", True, 16384)
    out.write_text(json.dumps({KEY_1K: {"fwd": {"block_kv": 999}}, other: {"fwd": {"block_kv": 7}}}))
    assert tuning_cli.main(ARGS + ["--out", str(out), "--retune"]) == 0
    assert tuned == [1024, 4096]
    assert json.loads(out.read_text()) == {KEY_1K: {"fwd": {"block_kv": 65}}, KEY_4K: {"fwd": {"block_kv": 68}},
                                           other: {"fwd": {"block_kv": 7}}}  # entries outside the run are kept


def test_retune_needs_out(capsys):
    with pytest.raises(SystemExit):
        tuning_cli.main(ARGS + ["--retune"])
    assert "--retune applies to --out" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--top", "0"), ("--rounds", "0"), ("--threads", "-1"), ("--margin", "1.5"),
                                         ("--margin", "-0.1"), ("--margin", "nan")])
def test_search_errors_name_the_flag(flag, value, capsys):
    """A bad --top/--rounds/--threads/--margin was reported as Search.top=0, Search.margin=1.5 (an internal name)."""
    with pytest.raises(SystemExit) as exc:
        tuning_cli.main(ARGS + [flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"error: {flag} takes" in err and "Search" not in err
