"""The decode benchmark's command line and table (the timing itself needs a GPU: ``python -m benchmarks.decode``)."""

from __future__ import annotations

import pytest

from benchmarks import decode as bench


def test_defaults_and_overrides():
    a = bench.parse_args([])
    assert a.batches == (1, 8, 32) and a.tokens == (1024, 8192, 32768, 131072) and a.layers == 1
    assert a.impls == bench.DEFAULT_IMPLS
    b = bench.parse_args(["--batches", "2", "--tokens", "4k,640", "--page-size", "64", "--layers", "32"])
    assert b.batches == (2,) and b.tokens == (4096, 640) and b.layers == 32


@pytest.mark.parametrize("argv", [["--tokens", "1000"], ["--impls", "bogus"], ["--batches", "x"]])
def test_bad_arguments_exit(argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_table_ratios_are_cudnn_time_over_each():
    recs = [
        dict(batch=8, tokens=8192, impl="cudnn", status="ok", time_s=2e-4, kv_tbps=1.0),
        dict(batch=8, tokens=8192, impl="pallas_flash", status="ok", time_s=1e-4, kv_tbps=2.0),
        dict(batch=8, tokens=8192, impl="xla", status="OOM"),
    ]
    t = bench.table(recs, ["pallas_flash", "cudnn", "xla"])
    row = t.iloc[0]
    assert row["pallas_flash vs cuDNN"] == "2.00x" and row["xla ms"] == "OOM" and row["tokens"] == "8k"


@pytest.mark.parametrize("argv, fragment", [
    (["--page-size", "0"], "--page-size must be a positive multiple of 16 dividing every --tokens value, got 0"),
    (["--page-size", "-64"], "--page-size must be a positive multiple of 16"),
    (["--page-size", "48"], "--page-size must be a positive multiple of 16 dividing every --tokens value, got 48"),
    (["--batches", "0"], "--batches and --tokens must be positive"),
    (["--time-budget", "0"], "--time-budget must be positive"),
])
def test_bad_values_are_usage_errors_naming_the_flag(argv, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and fragment in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["--sweep", "--impls", "xla", "--batches", "2", "--tokens", "1k"], "drop --batches, --tokens, --impls"),
    (["--sweep", "--page-size", "32"], "drop --page-size"),
])
def test_sweep_refuses_the_flags_it_would_ignore(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and named in capsys.readouterr().err
    assert bench.parse_args(["--sweep", "--quick", "--layers", "4"]).sweep  # the flags it uses are fine
