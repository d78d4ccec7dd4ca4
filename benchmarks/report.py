"""Turning benchmark records into markdown, a stdout summary and PNG plots.

A *record* is one flat ``dict`` (one line of the raw ``.jsonl``):

* ``kind == "speed"``: one (implementation, pass, dtype, shape) cell, with
  ``status`` one of ``ok``, ``FAIL`` (wrong result), ``OOM``, ``n/a``
  (unsupported), ``ERR`` (other exception); ``tflops``, ``time_s``, ``err``
  (max relative error over the checked outputs), ``checked``, ``ref`` and
  ``message``.
* ``kind == "memory"``: one (implementation, N) point of the peak-memory sweep,
  with ``peak_bytes`` (measured) and/or ``analysis_bytes`` (compiled
  executable's memory analysis) and ``io_bytes`` (inputs + outputs alone).

Nothing here needs a GPU; matplotlib is imported only to draw (Agg backend).
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
from typing import Iterable, Sequence

PASS_LABEL = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward + backward"}
PASS_ORDER = ("fwd", "fwd_bwd", "bwd")
BASELINE = "cudnn"  # the ratio columns divide by this implementation
GIB = 1024**3


# --- small formatting helpers ----------------------------------------------


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one letter per column (l/r/c), default right."""
    headers = [str(h) for h in headers]
    rows = [[str(c) for c in row] for row in rows]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, header has {len(headers)}: {row}")
    align = align or "r" * len(headers)
    if len(align) != len(headers):
        raise ValueError(f"align {align!r} does not match {len(headers)} columns")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        out = []
        for c, w, a in zip(cells, widths, align):
            out.append(c.ljust(w) if a == "l" else c.center(w) if a == "c" else c.rjust(w))
        return "| " + " | ".join(out) + " |"

    rule = {"l": ":{}", "r": "{}:", "c": ":{}:"}
    sep = "| " + " | ".join(rule[a].format("-" * max(1, w - (2 if a == "c" else 1))) for w, a in zip(widths, align)) + " |"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def seq_label(n: int) -> str:
    """512 -> '512', 4096 -> '4k', 1536 -> '1536'."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def gib(x: float | None) -> str:
    return "—" if x is None else f"{x / GIB:.2f}"


def speed_cell(rec: dict | None) -> str:
    """TFLOP/s, ``*`` when not checked against a reference; the status otherwise."""
    if rec is None:
        return "—"
    if rec["status"] != "ok":
        return rec["status"]
    t = rec["tflops"]
    return (f"{t:.1f}" if t >= 10 else f"{t:.3g}") + ("" if rec.get("checked") else "*")


def time_cell(rec: dict | None) -> str:
    if rec is None:
        return "—"
    if rec["status"] != "ok":
        return rec["status"]
    ms = rec["time_s"] * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def err_cell(rec: dict | None) -> str:
    if rec is None:
        return "—"
    err = rec.get("err")
    if err is None:
        if rec["status"] in ("OOM", "n/a", "ERR"):
            return rec["status"]
        return "unchecked: ref too large" if "ref too large" in (rec.get("message") or "") else "unchecked"
    text = "nan" if err != err else f"{err:.1e}"
    if rec.get("ref") and rec["ref"] != "f32-xla":
        text += f" (vs {rec['ref']})"
    return f"FAIL {text}" if rec["status"] == "FAIL" else text


def ratio_cell(rec: dict | None, base: dict | None) -> str:
    if not rec or not base or rec["status"] != "ok" or base["status"] != "ok":
        return "—"
    return f"{rec['tflops'] / base['tflops']:.2f}×"


# --- grouping ----------------------------------------------------------------


def impl_order(records: Sequence[dict], preferred: Sequence[str] = ()) -> list[str]:
    """``preferred`` first (those present), then the others in order of appearance."""
    seen = list(dict.fromkeys(r["impl"] for r in records))
    first = [i for i in dict.fromkeys(preferred) if i in seen]
    return first + [i for i in seen if i not in first]


def _row_key(r: dict) -> tuple:
    return (r["head_dim"], r["causal"], r["seq_q"], r["seq_k"], r["batch"], r["heads"], r["kv_heads"])


def speed_groups(records: Sequence[dict]) -> dict[tuple, dict[tuple, dict[str, dict]]]:
    """{(dtype, gqa, pass): {row key: {impl: record}}}, both levels sorted; a later duplicate wins."""
    groups: dict = collections.defaultdict(dict)
    for r in records:
        if r.get("kind") != "speed":
            continue
        g = (r["dtype"], r["gqa"], r["pass"])
        groups[g].setdefault(_row_key(r), {})[r["impl"]] = r
    order = lambda g: (g[0], g[1], PASS_ORDER.index(g[2]) if g[2] in PASS_ORDER else 9)  # noqa: E731
    return {g: dict(sorted(groups[g].items())) for g in sorted(groups, key=order)}


def group_title(group: tuple) -> str:
    dtype, gqa, pass_ = group
    kv = "MHA" if gqa == 1 else f"GQA {gqa}:1"
    return f"{PASS_LABEL.get(pass_, pass_)}, {dtype}, {kv}"


def _row_cells(key: tuple) -> list[str]:
    d, causal, tq, tk, b, h, kvh = key
    n = seq_label(tq) if tq == tk else f"{seq_label(tq)}×{seq_label(tk)}"
    heads = f"{h}" if kvh == h else f"{h}/{kvh}"
    return [str(d), n, str(b), heads, "yes" if causal else "no"]


ROW_HEADERS = ["D", "N", "B", "heads", "causal"]


# --- markdown ----------------------------------------------------------------


def speed_markdown(records: Sequence[dict], impls: Sequence[str] = ()) -> str:
    """Per (dtype, GQA, pass): a TFLOP/s table with ratio columns, a time table, an error table."""
    impls = impl_order([r for r in records if r.get("kind") == "speed"], impls)
    ratio_impls = [i for i in impls if i != BASELINE] if BASELINE in impls else []
    parts = []
    for group, rows in speed_groups(records).items():
        parts.append(f"### {group_title(group)}\n")
        heads = ROW_HEADERS + impls + [f"{i}/{BASELINE}" for i in ratio_impls]
        body = []
        for key, by_impl in rows.items():
            body.append(
                _row_cells(key)
                + [speed_cell(by_impl.get(i)) for i in impls]
                + [ratio_cell(by_impl.get(i), by_impl.get(BASELINE)) for i in ratio_impls]
            )
        parts.append("TFLOP/s (higher is better; `*` = not checked against a reference, see the error table)\n")
        parts.append(md_table(heads, body, "r" * len(heads)) + "\n")
        parts.append("Median time per call (ms)\n")
        body = [_row_cells(k) + [time_cell(b.get(i)) for i in impls] for k, b in rows.items()]
        parts.append(md_table(ROW_HEADERS + impls, body) + "\n")
        parts.append("Relative error ‖out − ref‖/‖ref‖ (max over the checked outputs)\n")
        body = [_row_cells(k) + [err_cell(b.get(i)) for i in impls] for k, b in rows.items()]
        parts.append(md_table(ROW_HEADERS + impls, body) + "\n")
    return "\n".join(parts)


def memory_markdown(records: Sequence[dict], impls: Sequence[str] = ()) -> str:
    """Peak memory (GiB) against N: measured and/or compiled-analysis columns per impl."""
    mem = [r for r in records if r.get("kind") == "memory"]
    if not mem:
        return ""
    impls = impl_order(mem, impls)
    measured = any(r.get("peak_bytes") is not None or r.get("method") == "measured" for r in mem)
    by_n: dict[int, dict[str, dict]] = collections.defaultdict(dict)
    io: dict[int, int] = {}
    for r in mem:
        by_n[r["seq_q"]][r["impl"]] = r
        io[r["seq_q"]] = r.get("io_bytes")
    heads = ["N", "inputs+outputs"]
    for i in impls:
        heads += [f"{i} peak", f"{i} analysis"] if measured else [f"{i} analysis"]

    def cell(r, field):
        if r is None:
            return "—"
        value = r.get(field)
        if value is not None and not (field == "peak_bytes" and r["status"] != "ok"):
            return gib(value)
        return r["status"] if r["status"] != "ok" else "—"

    body = []
    for n in sorted(by_n):
        row = [seq_label(n), gib(io.get(n))]
        for i in impls:
            r = by_n[n].get(i)
            row += [cell(r, "peak_bytes"), cell(r, "analysis_bytes")] if measured else [cell(r, "analysis_bytes")]
        body.append(row)
    first = mem[0]
    return (
        f"Peak device memory in GiB, forward + backward, B={first['batch']}, {first['heads']} heads, "
        f"D={first['head_dim']}, {'causal' if first['causal'] else 'not causal'}, {first['dtype']}.\n\n"
        + md_table(heads, body)
        + "\n"
    )


def problems_markdown(records: Sequence[dict]) -> str:
    """Every non-ok record, identical messages grouped, so nothing is silently dropped."""
    bad = [r for r in records if r.get("status") not in (None, "ok")]
    if not bad:
        return "None: every configuration ran and passed its check.\n"
    grouped: dict[tuple, list[str]] = collections.defaultdict(list)
    for r in bad:
        what = r.get("pass") or "memory"
        where = f"{r['dtype']} D={r['head_dim']} N={seq_label(r['seq_q'])}{' causal' if r['causal'] else ''}"
        if r.get("gqa", 1) > 1:
            where += f" gqa{r['gqa']}"
        detail = r.get("message") or ""
        if r["status"] == "FAIL":
            err = r.get("err")
            err_text = "nan" if err is None or err != err else f"{err:.2e}"
            detail = f"error {err_text} >= tolerance {r.get('tol')}" + (f" ({detail})" if detail else "")
        grouped[(r["impl"], r["status"], what, detail)].append(where)
    lines = []
    for (impl, status, what, detail), wheres in grouped.items():
        shown = ", ".join(wheres[:6]) + (f", … ({len(wheres)} in all)" if len(wheres) > 6 else "")
        lines.append(f"- **{impl}** {what} **{status}** at {shown}" + (f": `{detail}`" if detail else ""))
    return "\n".join(lines) + "\n"


def render_markdown(records: Sequence[dict], meta: dict) -> str:
    """The whole report: header, method, tables, problems, plots."""
    impls = meta.get("impls", ())
    out = [f"# Attention benchmark: {meta.get('device', '?')}\n"]
    facts = [
        ("Device", f"{meta.get('device', '?')} (x{meta.get('device_count', 1)}), memory limit {gib(meta.get('memory_bytes'))} GiB"),
        ("JAX", f"jax {meta.get('jax_version', '?')}, jaxlib {meta.get('jaxlib_version', '?')}"),
        ("Date", meta.get("date", "?")),
        ("Command", f"`{meta.get('command', '?')}`"),
        ("Commit", meta.get("commit") or "unknown"),
    ]
    if meta.get("status"):
        facts.append(("Run", meta["status"]))
    out.append("\n".join(f"- **{k}**: {v}" for k, v in facts) + "\n")
    if meta.get("method"):
        out.append("## Method\n\n" + meta["method"].strip() + "\n")
    speed = speed_markdown(records, impls)
    if speed:
        out.append("## Throughput\n\n" + speed)
    memory = memory_markdown(records, impls)
    if memory:
        out.append("## Peak memory\n\n" + memory)
    out.append("## Problems (FAIL, OOM, n/a, ERR)\n\n" + problems_markdown(records))
    if meta.get("plots"):
        out.append("## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in meta["plots"]) + "\n")
    return "\n".join(out)


# --- stdout summary ----------------------------------------------------------


def summary_text(records: Sequence[dict], impls: Sequence[str] = (), max_chars: int = 9000) -> str:
    """A compact plain-text version of the TFLOP/s and memory tables for the end of stdout."""
    impls_all = impl_order([r for r in records if r.get("kind") == "speed"], impls)
    ratio_impls = [i for i in impls_all if i != BASELINE] if BASELINE in impls_all else []
    parts = []
    for group, rows in speed_groups(records).items():
        heads = ROW_HEADERS + impls_all + [f"{i[:8]}/cu" for i in ratio_impls]
        body = [
            _row_cells(k)
            + [speed_cell(b.get(i)) for i in impls_all]
            + [ratio_cell(b.get(i), b.get(BASELINE)) for i in ratio_impls]
            for k, b in rows.items()
        ]
        table = md_table(heads, body).splitlines()
        del table[1]  # the markdown rule line is noise on a terminal
        parts.append(f"== TFLOP/s, {group_title(group)} ==\n" + "\n".join(table))
    mem = memory_markdown(records, impls)
    if mem:
        lines = [ln for ln in mem.splitlines() if not ln.startswith("| --") and not set(ln) <= set("|:- ")]
        parts.append("== peak memory (GiB) ==\n" + "\n".join(lines))
    bad = collections.Counter(r["status"] for r in records if r.get("status") not in (None, "ok"))
    if bad:
        parts.append("problems: " + ", ".join(f"{n} {s}" for s, n in sorted(bad.items())) + " (details in the .md)")
    text = "\n\n".join(parts)
    if len(text) > max_chars:
        text = "… (summary cut; the full tables are in the .md)\n" + text[-max_chars:]
    return text


# --- plots -------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _seq_ticks(ax, seqs: Sequence[int]) -> None:
    """Log2 x axis labelled with the sequence lengths themselves (512, 1k, 4k...)."""
    ax.set_xscale("log", base=2)
    if seqs:
        ax.set_xticks(list(seqs), [seq_label(n) for n in seqs])
        ax.minorticks_off()
        if len(seqs) == 1:
            ax.set_xlim(seqs[0] / 2, seqs[0] * 2)


def plot_speed(records: Sequence[dict], stem: pathlib.Path, impls: Sequence[str] = ()) -> list[pathlib.Path]:
    """One PNG per (dtype, GQA, pass): a grid of D (rows) x causal (columns), TFLOP/s vs N, a line per impl."""
    speed = [r for r in records if r.get("kind") == "speed"]
    if not speed:
        return []
    plt = _pyplot()
    impls = impl_order(speed, impls)
    written = []
    for (dtype, gqa, pass_), rows in speed_groups(speed).items():
        dims = sorted({k[0] for k in rows})
        causals = sorted({k[1] for k in rows})
        fig, axes = plt.subplots(len(dims), len(causals), figsize=(5.0 * len(causals), 3.6 * len(dims)), squeeze=False)
        for a, d in enumerate(dims):
            for c, causal in enumerate(causals):
                ax = axes[a][c]
                for impl in impls:
                    pts = sorted(
                        (k[2], b[impl]["tflops"])
                        for k, b in rows.items()
                        if k[0] == d and k[1] == causal and impl in b and b[impl]["status"] == "ok"
                    )
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
                _seq_ticks(ax, sorted({k[2] for k in rows}))
                ax.set_title(f"D={d}, {'causal' if causal else 'not causal'}")
                ax.set_xlabel("sequence length N")
                ax.set_ylabel("TFLOP/s")
                ax.set_ylim(bottom=0)
                ax.grid(True, alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
        fig.suptitle(group_title((dtype, gqa, pass_)))
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{dtype}{f'-gqa{gqa}' if gqa > 1 else ''}-{pass_}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_memory(records: Sequence[dict], stem: pathlib.Path, impls: Sequence[str] = (), limit_bytes: int | None = None) -> list[pathlib.Path]:
    """Peak memory vs N (log-log), a line per impl; analysis numbers dashed where measured ones exist too."""
    mem = [r for r in records if r.get("kind") == "memory"]
    if not mem:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    notes: list[str] = []
    for impl in impl_order(mem, impls):
        rs = sorted((r for r in mem if r["impl"] == impl), key=lambda r: r["seq_q"])
        measured = [(r["seq_q"], r["peak_bytes"] / GIB) for r in rs if r.get("peak_bytes") is not None and r["status"] == "ok"]
        analysis = [(r["seq_q"], r["analysis_bytes"] / GIB) for r in rs if r.get("analysis_bytes") is not None]
        if measured:
            line = ax.plot(*zip(*measured), marker="o", label=f"{impl} (measured peak)")[0]
            if analysis:
                ax.plot(*zip(*analysis), ls="--", marker=".", color=line.get_color(), alpha=0.6, label=f"{impl} (compiled analysis)")
        elif analysis:
            ax.plot(*zip(*analysis), marker="o", label=f"{impl} (compiled analysis)")
        failed = [f"{seq_label(r['seq_q'])} {r['status']}" for r in rs if r["status"] != "ok"]
        if failed:
            notes.append(f"{impl}: " + ", ".join(failed))
    io = sorted({(r["seq_q"], r["io_bytes"] / GIB) for r in mem if r.get("io_bytes")})
    if io:
        ax.plot(*zip(*io), color="gray", ls=":", label="inputs + outputs")
    if limit_bytes:
        ax.axhline(limit_bytes / GIB, color="red", ls="--", lw=1, label="device memory limit")
    _seq_ticks(ax, sorted({r["seq_q"] for r in mem}))
    ax.set_yscale("log")
    if notes:  # points that did not run, so that they are not silently missing
        ax.text(0.99, 0.02, "\n".join(notes), transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("GiB")
    first = mem[0]
    ax.set_title(f"Peak memory, fwd+bwd, B={first['batch']}, {first['heads']} heads, D={first['head_dim']}, {first['dtype']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = stem.with_name(f"{stem.name}.png" if stem.name.endswith("memory") else f"{stem.name}-memory.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# --- files -------------------------------------------------------------------


def unique_stem(out_dir: pathlib.Path, base: str) -> pathlib.Path:
    """``out_dir/base``, or ``base-2``, ``base-3``... if a report by that name exists."""
    stem = out_dir / base
    k = 2
    while stem.with_suffix(".md").exists() or stem.with_suffix(".jsonl").exists():
        stem = out_dir / f"{base}-{k}"
        k += 1
    return stem


def append_jsonl(path: pathlib.Path, record: dict) -> None:
    """Append one record and flush, so a killed run keeps what it measured."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    try:
        return float(x)
    except Exception:
        return str(x)


def load_jsonl(paths: Iterable[pathlib.Path]) -> tuple[list[dict], list[dict]]:
    """(records, metas) from one or more ``.jsonl`` files; ``kind == "meta"`` lines are metas."""
    records, metas = [], []
    for p in paths:
        with open(p) as f:
            for ln, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{ln}: not JSON ({e})") from None
                (metas if obj.get("kind") == "meta" else records).append(obj)
    return records, metas


def write_report(records: Sequence[dict], meta: dict, stem: pathlib.Path, plots: bool = True) -> list[pathlib.Path]:
    """Write ``stem.md`` and the PNGs beside it; returns the written paths (md first)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    pngs: list[pathlib.Path] = []
    if plots:
        impls = meta.get("impls", ())
        pngs += plot_speed(records, stem, impls)
        pngs += plot_memory(records, stem, impls, meta.get("memory_bytes"))
    meta = dict(meta, plots=[p.name for p in pngs])
    md = stem.with_suffix(".md")
    md.write_text(render_markdown(records, meta))
    return [md] + pngs
