"""Benchmark records to pandas tables, markdown, a stdout summary and PNG plots (no GPU needed).

A record is one flat dict (one line of the raw ``.jsonl``):

* ``kind == "speed"``: one (implementation, pass, problem) cell: ``status`` one of
  ``ok``, ``FAIL`` (wrong result), ``OOM``, ``n/a`` (unsupported), ``ERR`` (other
  exception); ``tflops``, ``time_s``, ``err`` (max relative error over the checked
  outputs), ``checked``, ``ref``, ``message``; ``suite`` ``attention`` (the default,
  rows by D, N, B, heads, causal) or ``masks`` (rows by problem);
* ``kind == "memory"``: one (implementation, N) point of the peak-memory sweep:
  ``peak_bytes`` (measured) and/or ``analysis_bytes`` (the compiled executable's
  memory analysis) and ``io_bytes`` (inputs and outputs alone).

Records merged from several runs (``benchmarks.attention --report-from``) carry ``run``, the run they come from:
a ratio column compares two implementations of one run only, and of two records of one cell the later is shown
and the earlier listed under Duplicates.
"""

from __future__ import annotations

import math
import pathlib
from typing import Iterable, Sequence

import pandas as pd

from benchmarks.common import pyplot

PASS_LABEL = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward + backward"}
PASS_ORDER = ("fwd", "fwd_bwd", "bwd")
BASELINE = "cudnn"  # the ratio columns divide by this implementation
GIB = 1024**3
LABELS = {"attention": ["D", "N", "B", "heads", "causal"], "masks": ["problem", "setup", "visible"]}
NONE = "—"
# A cell whose samples' interquartile range exceeds this share of their median is marked ``~``: something disturbed
# the run (in 1494 cells of the Dec 4-5 runs the 99th percentile was 14%; the two above 20%, 36% and 49%, were
# outliers against the same kernel's other runs, NOTES 88).
NOISY_SPREAD = 0.2
OTHER_RUN = "runs differ"  # a ratio cell whose two measurements come from different runs of a merge


# --- cells -------------------------------------------------------------------------


def seq_label(n: int) -> str:
    """512 -> '512', 4096 -> '4k', 1536 -> '1536'."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def gib(x) -> str:
    return NONE if x is None or x != x else f"{x / GIB:.2f}"


def noisy(r: dict) -> bool:
    """Whether the cell's timing samples spread more than ``NOISY_SPREAD`` (interquartile range over the median)."""
    return (r.get("timing") or {}).get("iqr_rel", 0.0) > NOISY_SPREAD


def speed_cell(r: dict) -> str:
    """TFLOP/s, ``*`` when not checked against a reference, ``~`` when its samples are ``noisy``; else the status."""
    if r["status"] != "ok":
        return r["status"]
    t = r["tflops"]
    return (f"{t:.1f}" if t >= 10 else f"{t:.3g}") + ("" if r.get("checked") else "*") + ("~" if noisy(r) else "")


def time_cell(r: dict) -> str:
    if r["status"] != "ok":
        return r["status"]
    ms = r["time_s"] * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def err_cell(r: dict) -> str:
    err = r.get("err")
    if err is None:
        if r["status"] in ("OOM", "n/a", "ERR"):
            return r["status"]
        return "unchecked: ref too large" if "ref too large" in (r.get("message") or "") else "unchecked"
    text = f"{err:.1e}" if math.isfinite(err) else str(err)
    if r.get("ref") and r["ref"] != "f32-xla":
        text += f" (vs {r['ref']})"
    return f"FAIL {text}" if r["status"] == "FAIL" else text


def impl_order(names: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    """The implementations in ``names``: ``preferred`` first (those present), then the others in order of appearance."""
    seen = list(dict.fromkeys(names))
    return [i for i in dict.fromkeys(preferred) if i in seen] + [i for i in seen if i not in preferred]


def where(r: dict) -> str:
    if r.get("suite") == "masks":
        return r["name"]
    gqa = f" gqa{r['gqa']}" if r.get("gqa", 1) > 1 else ""
    return f"{r['dtype']} D={r['head_dim']} N={seq_label(r['seq_q'])}{' causal' if r['causal'] else ''}{gqa}"


# --- speed tables -----------------------------------------------------------------------


def speed_frame(records: Sequence[dict]) -> pd.DataFrame:
    """One row per speed record: its group, its row labels and sort key, its formatted cells."""
    rows, order = [], {}
    for r in records:
        if r.get("kind") != "speed":
            continue
        suite = r.get("suite", "attention")
        row = dict(suite=suite, dtype=r["dtype"], gqa=r.get("gqa", 1), pass_=r["pass"], impl=r["impl"],
                   run=r.get("run", ""), head_dim=r["head_dim"], causal_=r["causal"], seq=r["seq_q"], status=r["status"],
                   tflops=r["tflops"] if r["status"] == "ok" else math.nan,
                   tf=speed_cell(r), ms=time_cell(r), err=err_cell(r))
        if suite == "masks":
            row.update(sort=(order.setdefault(r["name"], len(order)),), problem=r["name"], setup=r["setup"],
                       visible=f"{100 * r['visible']:.2f}%")
        else:
            n = seq_label(r["seq_q"]) if r["seq_q"] == r["seq_k"] else f"{seq_label(r['seq_q'])}×{seq_label(r['seq_k'])}"
            heads = str(r["heads"]) if r["kv_heads"] == r["heads"] else f"{r['heads']}/{r['kv_heads']}"
            row.update(sort=(r["head_dim"], r["causal"], r["seq_q"], r["seq_k"], r["batch"], r["heads"], r["kv_heads"]),
                       D=str(r["head_dim"]), N=n, B=str(r["batch"]), heads=heads, causal="yes" if r["causal"] else "no")
        rows.append(row)
    return pd.DataFrame(rows)


def speed_groups(df: pd.DataFrame):
    """``[((suite, dtype, gqa, pass), frame)]`` in report order, each frame with a ``row`` number; a later duplicate
    wins (``duplicates`` lists the others)."""
    if df.empty:
        return []
    out = []
    for key, g in df.groupby(["suite", "dtype", "gqa", "pass_"], sort=False):
        g = g.drop_duplicates(["sort", "impl"], keep="last")
        rank = {k: i for i, k in enumerate(sorted(set(g["sort"])))}
        out.append((key, g.assign(row=g["sort"].map(rank))))
    return sorted(out, key=lambda kg: (kg[0][:3], PASS_ORDER.index(kg[0][3]) if kg[0][3] in PASS_ORDER else 9))


def group_title(key: tuple) -> str:
    suite, dtype, gqa, pass_ = key
    kv = "MHA" if gqa == 1 else f"GQA {gqa}:1"
    return f"{'masks, ' if suite == 'masks' else ''}{PASS_LABEL.get(pass_, pass_)}, {dtype}, {kv}"


def pivot(g: pd.DataFrame, value: str, impls: Sequence[str], ratios: bool = False, fill: str | None = NONE) -> pd.DataFrame:
    """Row labels, then one column per implementation (and ``impl/cudnn`` TFLOP/s ratios, where both cells come from
    one run)."""
    suite = g["suite"].iloc[0]
    labels = g.drop_duplicates("row").set_index("row").sort_index()[LABELS[suite]]
    wide = lambda col: g.pivot(index="row", columns="impl", values=col).reindex(index=labels.index, columns=impls)  # noqa: E731
    table = labels.join(wide(value) if fill is None else wide(value).fillna(fill))
    if ratios and BASELINE in impls:
        num, run = wide("tflops").astype(float), wide("run")
        for i in (i for i in impls if i != BASELINE):
            ratio = (num[i] / num[BASELINE]).map(lambda x: NONE if x != x else f"{x:.2f}×")
            table[f"{i}/{BASELINE}"] = ratio.where((ratio == NONE) | (run[i] == run[BASELINE]), OTHER_RUN)
    return table


def to_markdown(table: pd.DataFrame, fmt: str = "pipe") -> str:
    align = ["left" if c in ("problem", "setup") else "right" for c in table.columns]
    return table.to_markdown(index=False, tablefmt=fmt, disable_numparse=True, colalign=align)


def speed_markdown(records: Sequence[dict], impls: Sequence[str] = ()) -> str:
    """Per (suite, dtype, GQA, pass): a TFLOP/s table with ratio columns, a time table, an error table."""
    parts = []
    for key, g in speed_groups(speed_frame(records)):
        order = impl_order(g["impl"], impls)
        tf = pivot(g, "tf", order, ratios=True)
        cross = (tf == OTHER_RUN).any().any()
        parts += [f"### {group_title(key)}\n",
                  "TFLOP/s (higher is better; `*` = not checked against a reference, see the error table; "
                  f"`~` = samples spread more than {NOISY_SPREAD:.0%} of their median: a disturbed measurement, "
                  "rerun it)\n",
                  to_markdown(tf) + "\n" + (f"\n`{OTHER_RUN}`: the two were measured in different runs of this merge; "
                                             "no ratio across runs.\n" if cross else ""),
                  "Median time per call (ms)\n", to_markdown(pivot(g, "ms", order)) + "\n",
                  "Relative error ‖x − ref‖/‖ref‖ (max over the checked outputs)\n", to_markdown(pivot(g, "err", order)) + "\n"]
    return "\n".join(parts)


def window_speedups(records: Sequence[dict], pairs) -> list[str]:
    """``pallas_flash`` forward+backward of each (window, causal) pair of problems, where both ran in one run (of a
    merge) and one dtype: a speed-up never divides one run's or dtype's time by another's."""
    times: dict[tuple, dict[str, float]] = {}
    for r in records:
        if (r.get("kind") == "speed" and r["impl"] == "pallas_flash" and r["pass"] == "fwd_bwd"
                and r["status"] == "ok" and r.get("suite") == "masks"):
            times.setdefault((r.get("run", ""), r.get("dtype")), {})[r["name"]] = r["time_s"]
    runs = {run for run, _ in times}
    dtypes = {dtype for _, dtype in times}
    lines = []
    for (run, dtype), t in times.items():
        tags = ([dtype] if len(dtypes) > 1 else []) + ([f"run `{run}`"] if len(runs) > 1 else [])
        label = f" ({', '.join(tags)})" if tags else ""
        lines += [f"pallas_flash forward+backward{label}, {w} vs {c}: {t[w] * 1e3:.2f} ms vs {t[c] * 1e3:.2f} ms = "
                  f"**{t[c] / t[w]:.1f}x faster** (target >= 8x)" for w, c in pairs if w in t and c in t]
    return lines


# --- memory and problems -------------------------------------------------------------------


def memory_markdown(records: Sequence[dict], impls: Sequence[str] = (), fmt: str = "pipe") -> str:
    """Peak memory (GiB) against N: measured and/or compiled-analysis columns per impl, one table per problem
    (batch, heads, head dim, causal, dtype: runs merged by ``--report-from`` may differ in them); of two records
    of one impl at one point, the later wins."""
    mem = [r for r in records if r.get("kind") == "memory"]
    if not mem:
        return ""
    problem = ("batch", "heads", "head_dim", "causal", "dtype")
    groups: dict[tuple, list[dict]] = {}
    for r in mem:
        groups.setdefault(tuple(r.get(k) for k in problem), []).append(r)
    return "\n".join(_memory_table(group, impls, fmt) for group in groups.values())


def _memory_table(mem: Sequence[dict], impls: Sequence[str], fmt: str) -> str:
    measured = any(r.get("peak_bytes") is not None or r.get("method") == "measured" for r in mem)

    def cell(r, field):
        v = r.get(field)
        if v is not None and not (field == "peak_bytes" and r["status"] != "ok"):
            return gib(v)
        return r["status"] if r["status"] != "ok" else NONE

    fields = ["peak_bytes", "analysis_bytes"] if measured else ["analysis_bytes"]
    df = pd.DataFrame([dict(seq=r["seq_q"], impl=r["impl"], io=r.get("io_bytes"),
                            **{f: cell(r, f) for f in fields}) for r in mem]).drop_duplicates(["seq", "impl"], keep="last")
    table = pd.DataFrame({"N": [seq_label(n) for n in sorted(df["seq"].unique())]})
    table["inputs+outputs"] = [gib(x) for x in df.groupby("seq")["io"].last().sort_index()]
    for i in impl_order((r["impl"] for r in mem), impls):
        for f in fields:
            col = df[df["impl"] == i].set_index("seq")[f].reindex(sorted(df["seq"].unique())).fillna(NONE)
            table[f"{i} {f.split('_')[0]}"] = col.to_list()
    r = mem[0]
    return (f"Peak device memory in GiB, forward + backward, B={r['batch']}, {r['heads']} heads, D={r['head_dim']}, "
            f"{'causal' if r['causal'] else 'not causal'}, {r['dtype']}.\n\n" + to_markdown(table, fmt) + "\n")


def _cell(r: dict) -> tuple:
    """The table cell a record fills (a later record of the same cell replaces it in the tables)."""
    if r.get("kind") == "memory":
        return ("memory", *(r.get(k) for k in ("batch", "heads", "head_dim", "causal", "dtype", "seq_q", "impl")))
    point = r["name"] if r.get("suite") == "masks" else tuple(r[k] for k in ("head_dim", "causal", "seq_q", "seq_k",
                                                                           "batch", "heads", "kv_heads"))
    return ("speed", r.get("suite", "attention"), r["dtype"], r.get("gqa", 1), r["pass"], r["impl"], point)


def duplicates(records: Sequence[dict]) -> list[tuple[dict, dict]]:
    """``(earlier, shown)`` for each speed or memory record that a later one of the same cell replaces in the tables."""
    last = {_cell(r): r for r in records if r.get("kind") in ("speed", "memory")}
    return [(r, last[_cell(r)]) for r in records if r.get("kind") in ("speed", "memory") and last[_cell(r)] is not r]


def duplicates_markdown(records: Sequence[dict]) -> str:
    """One line per record replaced by a later one of the same cell: nothing is dropped without a note."""

    def value(r):
        if r.get("kind") == "memory":
            return f"{gib(r.get('peak_bytes', r.get('analysis_bytes')))} GiB" if r["status"] == "ok" else r["status"]
        return f"{speed_cell(r)} TFLOP/s" if r["status"] == "ok" else r["status"]

    def source(r):
        return f" (run `{r['run']}`)" if r.get("run") else ""

    return "".join(f"- **{old['impl']}** {old.get('pass') or 'memory'} {where(old)}: {value(old)}{source(old)}; "
                   f"the tables show {value(new)}{source(new)}\n" for old, new in duplicates(records))


def problems_markdown(records: Sequence[dict]) -> str:
    """Every non-ok record, identical messages grouped, so nothing is silently dropped."""
    bad = [r for r in records if r.get("status") not in (None, "ok")]
    if not bad:
        return "None: every configuration ran and passed its check.\n"
    rows = []
    for r in bad:
        detail = r.get("message") or ""
        if r["status"] == "FAIL":
            err = r.get("err")
            detail = f"error {'nan' if err is None else f'{err:.2e}'} >= tolerance {r.get('tol')}" + (f" ({detail})" if detail else "")
        rows.append(dict(impl=r["impl"], status=r["status"], what=r.get("pass") or "memory", detail=detail, where=where(r)))
    lines = []
    for (impl, status, what, detail), g in pd.DataFrame(rows).groupby(["impl", "status", "what", "detail"], sort=False):
        w = list(g["where"])
        shown = ", ".join(w[:6]) + (f", … ({len(w)} in all)" if len(w) > 6 else "")
        lines.append(f"- **{impl}** {what} **{status}** at {shown}" + (f": `{detail}`" if detail else ""))
    return "\n".join(lines) + "\n"


def render_markdown(records: Sequence[dict], meta: dict) -> str:
    """The whole report: header, method, tables, problems, plots."""
    facts = [("Device", f"{meta.get('device', '?')} (x{meta.get('device_count', 1)}), memory limit {gib(meta.get('memory_bytes'))} GiB"),
             ("JAX", f"jax {meta.get('jax_version', '?')}, jaxlib {meta.get('jaxlib_version', '?')}"),
             ("Date", meta.get("date", "?")), ("Command", f"`{meta.get('command', '?')}`"),
             ("Commit", meta.get("commit") or "unknown")] + ([("Run", meta["status"])] if meta.get("status") else [])
    def run_line(r: dict) -> str:
        jax_text = f", jax {r['jax_version']}" if r.get("jax_version") else ""
        return f"\n  - `{r['run']}`: commit {r.get('commit') or 'unknown'}, {r.get('date') or '?'}, " \
               f"{r.get('status') or '?'}{jax_text}"

    facts += [("Runs", "".join(map(run_line, meta["runs"])))] if meta.get("runs") else []
    out = [f"# Attention benchmark: {meta.get('device', '?')}\n", "\n".join(f"- **{k}**: {v}" for k, v in facts) + "\n"]
    if meta.get("method"):
        out.append("## Method\n\n" + meta["method"].strip() + "\n")
    speed = speed_markdown(records, meta.get("impls", ()))
    if speed:
        out.append("## Throughput\n\n" + speed)
    lines = window_speedups(records, meta.get("speedups", ()))
    if lines:
        out.append("\n\n".join(lines) + "\n")
    memory = memory_markdown(records, meta.get("impls", ()))
    if memory:
        out.append("## Peak memory\n\n" + memory)
    dups = duplicates_markdown(records)
    if dups:
        out.append("## Duplicates\n\nRecords of a cell that a later record replaces in the tables (both are in the "
                   ".jsonl):\n\n" + dups)
    out.append("## Problems (FAIL, OOM, n/a, ERR)\n\n" + problems_markdown(records))
    if meta.get("plots"):
        out.append("## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in meta["plots"]) + "\n")
    return "\n".join(out)


def summary_text(records: Sequence[dict], impls: Sequence[str] = (), speedups=(), max_chars: int = 9000) -> str:
    """The TFLOP/s tables (with the ratios to cuDNN) and the memory table as plain text, for stdout."""
    parts = [f"== TFLOP/s, {group_title(key)} ==\n" + to_markdown(pivot(g, "tf", impl_order(g["impl"], impls), True), "simple")
             for key, g in speed_groups(speed_frame(records))]
    parts += window_speedups(records, speedups)
    mem = memory_markdown(records, impls, "simple")
    if mem:
        parts.append("== peak memory (GiB) ==\n" + mem.split("\n\n", 1)[1])
    bad = pd.Series([r["status"] for r in records if r.get("status") not in (None, "ok")], dtype=object).value_counts()
    if len(bad):
        parts.append("problems: " + ", ".join(f"{n} {s}" for s, n in sorted(bad.items())) + " (details in the .md)")
    replaced = len(duplicates(records))
    if replaced:
        parts.append(f"{replaced} record(s) replaced by a later one of the same cell (listed in the .md)")
    text = "\n\n".join(parts)
    return text if len(text) <= max_chars else "… (summary cut; the full tables are in the .md)\n" + text[-max_chars:]


# --- plots ------------------------------------------------------------------------------


def _seq_axis(ax, seqs: Sequence[int]) -> None:
    """Log2 x axis labelled with the sequence lengths themselves (512, 1k, 4k...)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(seqs), [seq_label(n) for n in seqs])
    ax.minorticks_off()
    if len(seqs) == 1:
        ax.set_xlim(seqs[0] / 2, seqs[0] * 2)
    ax.set_xlabel("sequence length N")
    ax.grid(True, which="both", alpha=0.3)


def plot_speed(records: Sequence[dict], stem: pathlib.Path, impls: Sequence[str] = ()) -> list[pathlib.Path]:
    """One PNG per group: attention, TFLOP/s vs N on a grid of D (rows) x causal (columns); masks, bars per problem."""
    plt, written = pyplot(), []
    for key, g in speed_groups(speed_frame(records)):
        suite, dtype, gqa, pass_ = key
        order = impl_order(g["impl"], impls)
        if suite == "masks":
            fig, ax = plt.subplots(figsize=(8, 4.5))
            pivot(g, "tflops", order, fill=None).set_index("problem")[order].astype(float).plot.bar(ax=ax, rot=20)
            ax.set_ylabel("TFLOP/s (visible pairs)")
        else:
            dims, causals = sorted(g["head_dim"].unique()), sorted(g["causal_"].unique())
            fig, axes = plt.subplots(len(dims), len(causals), figsize=(5.0 * len(causals), 3.6 * len(dims)), squeeze=False)
            for (a, d), (c, causal) in ((x, y) for x in enumerate(dims) for y in enumerate(causals)):
                ax, sub = axes[a][c], g[(g["head_dim"] == d) & (g["causal_"] == causal)]
                for impl in order:
                    pts = sub[(sub["impl"] == impl) & (sub["status"] == "ok")].sort_values("seq")
                    if len(pts):
                        ax.plot(pts["seq"], pts["tflops"], marker="o", label=impl)
                _seq_axis(ax, sorted(g["seq"].unique()))
                ax.set(title=f"D={d}, {'causal' if causal else 'not causal'}", ylabel="TFLOP/s", ylim=(0, None))
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
        fig.suptitle(group_title(key))
        fig.tight_layout()
        prefix = "masks-" if suite == "masks" and not stem.name.endswith("masks") else ""
        path = stem.with_name(f"{stem.name}-{prefix}{dtype}{f'-gqa{gqa}' if gqa > 1 else ''}-{pass_}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_memory(records: Sequence[dict], stem: pathlib.Path, impls: Sequence[str] = (), limit_bytes=None) -> list[pathlib.Path]:
    """Peak memory vs N (log-log), a line per impl; analysis dashed where measured numbers exist too."""
    mem = pd.DataFrame([r for r in records if r.get("kind") == "memory"])
    if mem.empty:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    notes = []
    for impl in impl_order(mem["impl"], impls):
        rs = mem[mem["impl"] == impl].sort_values("seq_q")
        ok = rs[rs["status"] == "ok"]
        measured = ok[ok["peak_bytes"].notna()] if "peak_bytes" in ok else ok.iloc[:0]
        analysis = rs[rs["analysis_bytes"].notna()] if "analysis_bytes" in rs else rs.iloc[:0]
        if len(measured):
            line = ax.plot(measured["seq_q"], measured["peak_bytes"] / GIB, marker="o", label=f"{impl} (measured peak)")[0]
        if len(analysis):
            style = dict(ls="--", marker=".", color=line.get_color(), alpha=0.6) if len(measured) else dict(marker="o")
            ax.plot(analysis["seq_q"], analysis["analysis_bytes"] / GIB, label=f"{impl} (compiled analysis)", **style)
        failed = [f"{seq_label(n)} {s}" for n, s in zip(rs["seq_q"], rs["status"]) if s != "ok"]
        if failed:
            notes.append(f"{impl}: " + ", ".join(failed))
    io = mem.dropna(subset=["io_bytes"]).drop_duplicates("seq_q").sort_values("seq_q")
    ax.plot(io["seq_q"], io["io_bytes"] / GIB, color="gray", ls=":", label="inputs + outputs")
    if limit_bytes:
        ax.axhline(limit_bytes / GIB, color="red", ls="--", lw=1, label="device memory limit")
    _seq_axis(ax, sorted(mem["seq_q"].unique()))
    if notes:  # points that did not run, so that they are not silently missing
        ax.text(0.99, 0.02, "\n".join(notes), transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                bbox=dict(boxstyle="round", facecolor="white", alpha=0.8))
    r = mem.iloc[0]
    ax.set(yscale="log", ylabel="GiB", title=f"Peak memory, fwd+bwd, B={r['batch']}, {r['heads']} heads, D={r['head_dim']}, {r['dtype']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = stem.with_name(f"{stem.name}.png" if stem.name.endswith("memory") else f"{stem.name}-memory.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_report(records: Sequence[dict], meta: dict, stem: pathlib.Path, plots: bool = True) -> list[pathlib.Path]:
    """Write ``stem.md`` and the PNGs beside it; returns the written paths (md first)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    pngs = []
    if plots:
        pngs = plot_speed(records, stem, meta.get("impls", ())) + plot_memory(records, stem, meta.get("impls", ()), meta.get("memory_bytes"))
    md = stem.with_suffix(".md")
    md.write_text(render_markdown(records, dict(meta, plots=[p.name for p in pngs])))
    return [md, *pngs]
