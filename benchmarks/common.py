"""What every benchmark shares: the device, file names, failures as statuses, records on disk,
and the one way to run a measurement in a fresh process (peak-memory statistics are per process)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
from typing import Any, Callable, Iterable

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
RESULT_TAG = "BENCH-RESULT "


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (file-system friendly)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown-device"


def device_info() -> dict:
    """The report header's facts about ``jax.devices()[0]`` (initialises the backend)."""
    import jax
    import jaxlib

    devices = jax.devices()
    try:
        stats = devices[0].memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
        stats = {}
    name = getattr(devices[0], "device_kind", None) or devices[0].platform
    return dict(device=name, device_slug=slug(name), device_count=len(devices), platform=devices[0].platform,
                memory_bytes=stats.get("bytes_limit"), jax_version=jax.__version__,
                jaxlib_version=getattr(jaxlib, "__version__", "?"))


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` that shows an option's default once: ``(default: X)`` is added where the help text does not
    say its default itself and X says something (not ``None``, an empty list, or an on/off flag's own value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.nargs == 0 or "default" in text.lower()
                or action.default is None or action.default is argparse.SUPPRESS or action.default == []):
            return text
        return text + " (default: %(default)s)"


# --- failures as table statuses ---------------------------------------------

OOM_MARKERS = ("resource_exhausted", "out of memory", "oom when allocating", "failed to allocate")
_UNSUPPORTED_MARKERS = ("not supported", "unsupported", "not implemented")


def classify_exception(exc: BaseException) -> str:
    """Table status for an exception: ``"OOM"``, ``"n/a"`` (unsupported) or ``"ERR"``."""
    if isinstance(exc, NotImplementedError):
        return "n/a"
    if isinstance(exc, MemoryError):
        return "OOM"
    text = f"{type(exc).__name__}: {exc}".lower()
    if any(m in text for m in OOM_MARKERS):
        return "OOM"
    return "n/a" if any(m in text for m in _UNSUPPORTED_MARKERS) else "ERR"


def short_message(exc: BaseException, limit: int = 300) -> str:
    """``Type: first meaningful line`` of an exception, at most ``limit`` characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # XLA errors often start with a generic line; prefer one naming the cause.
    first = next((ln for ln in lines if "error" in ln.lower() or any(m in ln.lower() for m in OOM_MARKERS + _UNSUPPORTED_MARKERS)),
                 lines[0] if lines else "")
    msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# --- one measurement in a fresh process --------------------------------------


def run_worker(module: str, spec: dict, timeout: float, env: dict | None = None) -> dict:
    """``python -m <module> --worker <spec as JSON>`` in a fresh process; its result dict.

    The worker prints its result as one tagged JSON line (``worker_main``). Where
    there is none (a crash, a timeout) the result is ``{"ok": False, "status":
    "OOM" or "ERR", "error": ...}`` from the last lines of its output.
    """
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        out, rc = out + f"\n(timed out after {timeout:.0f} s)", "timeout"
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = " | ".join(out.strip().splitlines()[-3:])
    status = "OOM" if any(m in tail.lower() for m in OOM_MARKERS) else "ERR"
    return {"ok": False, "status": status, "error": f"worker exited with {rc}: {tail[-300:]}"}


def worker_main(fn: Callable[[dict], dict], spec_json: str) -> int:
    """The worker side of ``run_worker``: print ``fn(spec)`` (or the exception) as the tagged line."""
    try:
        result = {"ok": True, **fn(json.loads(spec_json))}
    except Exception as e:  # noqa: BLE001 - reported in the table (e.g. out of memory, unsupported)
        result = {"ok": False, "status": classify_exception(e), "error": short_message(e)}
    print(RESULT_TAG + json.dumps(result, default=_json_default), flush=True)
    return 0


def probe_platform(module: str, *, measures: str, smoke_flag: str, allow_cpu: bool, env: dict | None = None):
    """``(info, on_gpu)`` from ``module``'s probe worker (the platform and device JAX finds), or ``None`` after
    telling the user, when JAX finds no GPU and ``allow_cpu`` (the smoke-run flag) is not set."""
    info = run_worker(module, {"probe": True}, timeout=180, env=env)
    if not info.get("ok"):
        raise RuntimeError(f"could not start JAX: {info['error']}")
    on_gpu = info["platform"] == "gpu"
    if not on_gpu and not allow_cpu:
        print(f"{module} measures {measures}, but JAX found only {info['platform']} ({info['device']}). "
              f"Run it on a GPU, or pass {smoke_flag} for a tiny smoke run of the script.", file=sys.stderr)
        return None
    return info, on_gpu


# --- records on disk -----------------------------------------------------------


def _json_default(x):  # NumPy scalars as floats, anything else as its text
    try:
        return float(x)
    except Exception:
        return str(x)


def append_jsonl(path: pathlib.Path, record: dict) -> None:
    """Append one record and flush, so a killed run keeps what it measured."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")


def load_jsonl(paths: Iterable[pathlib.Path],
               warn: Callable[[str], None] | None = None) -> tuple[list[dict], list[dict]]:
    """(records, metas) from one or more ``.jsonl`` files; ``kind == "meta"`` lines are metas.

    A last line cut short (not JSON and no newline after it: a run killed while writing it) is skipped and
    ``warn`` (default: a warning on stderr) is told the file and line. Any other line that is not a JSON object,
    or a file that is not text, raises ``ValueError`` naming the file (and line).
    """
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    records, metas = [], []
    for p in paths:
        try:
            text = pathlib.Path(p).read_text()
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not a text file ({e})") from None
        lines = text.splitlines()
        for ln, line in enumerate(lines, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    if ln == len(lines) and not text.endswith("\n"):
                        warn(f"{p}:{ln}: the last line is cut short (a run killed while writing it?): skipped, "
                             "its record is not in the result")
                        continue
                    raise ValueError(f"{p}:{ln}: not JSON ({e})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{p}:{ln}: not a JSON object (a record is one object per line)")
                (metas if obj.get("kind") == "meta" else records).append(obj)
    return records, metas


class Terminated(Exception):
    """Raised by ``sigterm_raises``'s handler, so that a killed run still writes what it measured."""


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def sigterm_raises():
    """Within the block SIGTERM raises ``Terminated`` (catch it with ``KeyboardInterrupt``); restored after."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def unique_stem(out_dir: pathlib.Path, base: str) -> pathlib.Path:
    """``out_dir/base``, or ``base-2``, ``base-3``... if a report by that name exists."""
    stem, k = out_dir / base, 2
    while any(stem.with_suffix(s).exists() for s in (".md", ".jsonl")):
        stem, k = out_dir / f"{base}-{k}", k + 1
    return stem


# Untracked files here can change what a run measures; elsewhere (a script at the root, results) they cannot.
CODE_DIRS = ("pallas_flash", "benchmarks", "models", "train", ":(exclude)benchmarks/results")


def git_commit(repo: pathlib.Path = REPO) -> str | None:
    """Short HEAD, marked when the checkout has uncommitted changes; None without git.

    Changes are edits to tracked files anywhere and new files in the code's folders
    (``CODE_DIRS``): an untracked driver script at the root or a results file is not one.
    ``PALLAS_FLASH_COMMIT`` overrides it: a copied tree (the GPU machine gets the
    working tree with a ``.git`` that may be stale) is told its commit by the caller.
    """
    if os.environ.get("PALLAS_FLASH_COMMIT"):
        return os.environ["PALLAS_FLASH_COMMIT"]
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, timeout=5)  # noqa: E731
        sha = run("rev-parse", "--short", "HEAD")
        if sha.returncode:
            return None
        edited = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        added = run("status", "--porcelain", "--", *CODE_DIRS).stdout.strip()
        return sha.stdout.strip() + (" (with uncommitted changes)" if edited or added else "")
    except Exception:  # no git on the machine, or not a checkout
        return None


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tree_nbytes(tree: Any) -> int:
    """Total bytes of the array leaves of a pytree."""
    import jax

    return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(tree))
