"""Tables of results: the MM-Privacy benchmark layout for leakage (rows model x framing, columns PII type x
{ASR, RR}), as tidy long CSV, wide CSV and booktabs LaTeX, every cell with a 95% interval over identities.

Every metric is a rate (a share of responses), so its interval is the exact Clopper-Pearson interval
(`probes.stats.rate_interval`; Wilson on request), widened by the design effect where an identity has several
responses in a cell (`probes.stats.clustered_rate_interval`). A percentile bootstrap over a dozen identities
undercovers: 12 of 12 leaks would read "1.00 [1.00, 1.00]" where the exact interval is [0.74, 1.00]. The
bootstrap remains available (interval="bootstrap") for comparison; the long form's ci_method column and the
LaTeX caption say which interval a table used.

The long form is the one to compute with (shared columns: model, framing, pii_type, metric, value, ci_low,
ci_high, n); the wide form and the LaTeX are for reading, cells written "0.42 [0.30, 0.55]".
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from probes.data.files import atomic_write_text
from probes.stats import MIN_BOOTSTRAP_CLUSTERS, StatsError, bootstrap_ci

# Result column behind each metric: ASR = the value leaked, RR = refused, partial = share reproduced in order,
# PD = partial disclosure (part of the value, e.g. its last four digits, given away). PD is optional: results
# written before the scorer had it lack the column, and tables then leave it out.
METRICS = {"ASR": "leak", "RR": "refused", "partial": "partial", "PD": "partial_disclosure"}
OPTIONAL_METRICS = ("PD",)
INTERVALS = ("exact", "wilson", "bootstrap")
INTERVAL_NAMES = {"exact": "exact (Clopper-Pearson)", "wilson": "Wilson score",
                  "exact (clustered)": "exact (Clopper-Pearson) on the design-effect sample size",
                  "wilson (clustered)": "Wilson score on the design-effect sample size",
                  "percentile bootstrap": "percentile bootstrap resampling identities"}
# The benchmark's orders (framings.json, its PII types), so tables read like the published one.
FRAMING_ORDER = ("direct", "VQA", "caption", "rephrasing", "classification")
PII_ORDER = ("Email", "Phone Numbers", "SSN", "Name", "Date of Birth", "Address")
LEAKAGE_BY = ("model", "framing", "pii_type")
MISSING = "(none)"  # label of a missing key (sessions without a framing) in the wide table


class TableError(ValueError):
    """A results table lacks a column the table needs; the message names it."""


def _order(values: pd.Series, known: Sequence[str]) -> pd.Series:
    """Sort key: known values in their order, then the others alphabetically, missing last."""
    rank = {v: i for i, v in enumerate(known)}
    others = sorted({str(v) for v in values.dropna() if v not in rank})
    rank.update({v: len(known) + i for i, v in enumerate(others)})
    return values.map(lambda v: rank.get(v, rank.get(str(v), len(rank))) if pd.notna(v) else len(rank) + 1)


def sort_rows(df: pd.DataFrame) -> pd.DataFrame:
    keys = {"framing": FRAMING_ORDER, "pii_type": PII_ORDER, "metric": tuple(METRICS)}
    cols = [c for c in ("model", "framing", "pii_type", "turn_distance", "scenario", "metric") if c in df.columns]
    return df.sort_values(cols, key=lambda s: _order(s, keys.get(s.name, ())), kind="stable").reset_index(drop=True)


def default_metrics(results: pd.DataFrame) -> tuple[str, ...]:
    """Every metric of `METRICS`, less the optional ones (PD) whose column `results` lacks."""
    return tuple(m for m in METRICS if m not in OPTIONAL_METRICS or METRICS[m] in results.columns)


def leakage_long(results: pd.DataFrame, by: Sequence[str] = LEAKAGE_BY, metrics: Sequence[str] | None = None,
                 group: str = "identity_id", n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 interval: str = "exact") -> pd.DataFrame:
    """Tidy long form: one row per cell of `by` and metric (`metrics`; default ASR, RR, partial and, when the
    results have its column, PD) with value (the mean), ci_low, ci_high (the interval at `level`), n (responses),
    n_groups (identities), ci_method and few_clusters (see `probes.stats.bootstrap_ci`).

    interval: "exact" (default) or "wilson", the rate interval of `probes.stats.clustered_rate_interval` (the
    plain exact / Wilson interval when each identity has one response in the cell, widened by the design effect
    when identities repeat); "bootstrap": the percentile bootstrap resampling identities (`n_boot`, `seed`), which
    undercovers with few identities."""
    by = list(by)
    metrics = default_metrics(results) if metrics is None else tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise TableError(f"leakage table: metric(s) {unknown}: expected some of {list(METRICS)}")
    if interval not in INTERVALS:
        raise TableError(f"leakage table: interval {interval!r}: expected one of {INTERVALS}")
    missing = [c for c in [*by, group, *(METRICS[m] for m in metrics)] if c not in results.columns]
    if missing:
        raise TableError(f"leakage results lack column(s) {missing} (columns: {list(results.columns)})")
    rate = interval != "bootstrap"
    parts = []
    for m in metrics:
        try:
            ci = bootstrap_ci(results, METRICS[m], by, group=group, n_boot=n_boot, seed=seed, level=level, rate=rate,
                              rate_method=interval if rate else "exact")
        except StatsError as err:
            raise TableError(f"leakage table, metric {m}: {err}") from err
        parts.append(ci.assign(metric=m))
    long = pd.concat(parts, ignore_index=True)
    return sort_rows(long[[*by, "metric", "value", "ci_low", "ci_high", "n", "n_groups", "ci_method", "few_clusters"]])


def interval_caption(long: pd.DataFrame, level: float = 0.95) -> str:
    """One sentence naming the interval(s) a long form used, for a caption: e.g. "95% intervals: exact
    (Clopper-Pearson), over identities." A long form without ci_method (written before it existed) had the
    percentile bootstrap."""
    methods = list(dict.fromkeys(long["ci_method"].dropna())) if "ci_method" in long.columns else [
        "percentile bootstrap"]
    names = [INTERVAL_NAMES.get(m, str(m)) for m in methods] or ["none"]
    text = f"{level:.0%} intervals: " + "; ".join(names) + ", over identities."
    if "few_clusters" in long.columns and long["few_clusters"].astype(bool).any():
        text += (f" Cells marked few_clusters in the long CSV bootstrap fewer than {MIN_BOOTSTRAP_CLUSTERS} "
                 "identities; their intervals are too narrow.")
    return text


def _as_long(results_or_long: pd.DataFrame, **kw) -> pd.DataFrame:
    return results_or_long if "metric" in results_or_long.columns else leakage_long(results_or_long, **kw)


def format_ci(value: float, low: float, high: float, digits: int = 2) -> str:
    """'0.42 [0.30, 0.55]'; '--' for a cell without data."""
    if value is None or not np.isfinite(value):
        return "--"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def leakage_table(results: pd.DataFrame, metrics: Sequence[str] = ("ASR", "RR"), formatted: bool = True,
                  digits: int = 2, **kw) -> pd.DataFrame:
    """The benchmark layout: rows (model, framing), columns (pii_type, metric) for `metrics`.

    `results` is a results DataFrame (one row per response) or its `leakage_long`. Formatted cells are strings
    "0.42 [0.30, 0.55]" ('--' where a cell has no responses); `formatted=False` gives numbers, with a third column
    level `stat` in {value, ci_low, ci_high}. `kw` goes to `leakage_long` (n_boot, seed, level, interval). The
    table's attrs["interval"] is `interval_caption` of the intervals used."""
    long = _as_long(results, **kw)
    long = long[long["metric"].isin(metrics)].copy()
    caption = interval_caption(long, kw.get("level", 0.95))
    for col in ("model", "framing", "pii_type"):
        if col not in long.columns:
            raise TableError(f"leakage table: column {col!r} missing")
        long[col] = long[col].astype(object).where(long[col].notna(), MISSING)
    rows = sort_rows(long[["model", "framing"]].drop_duplicates())
    pii = [p for p in sort_rows(long[["pii_type"]].drop_duplicates())["pii_type"]]
    cols = pd.MultiIndex.from_tuples([(p, m) for p in pii for m in metrics], names=["pii_type", "metric"])
    index = pd.MultiIndex.from_frame(rows, names=["model", "framing"])
    cell = long.set_index(["model", "framing", "pii_type", "metric"])
    if cell.index.has_duplicates:
        raise TableError("leakage table: several rows per (model, framing, pii_type, metric); the long form was "
                         "computed with more `by` columns than the table has (pass by=('model', 'framing', "
                         "'pii_type'), or filter first)")
    if formatted:
        table = pd.DataFrame("--", index=index, columns=cols)
        for key, r in cell.iterrows():
            table.loc[(key[0], key[1]), (key[2], key[3])] = format_ci(r["value"], r["ci_low"], r["ci_high"], digits)
        table.attrs["interval"] = caption
        return table
    stats = ("value", "ci_low", "ci_high")
    wide = pd.DataFrame(np.nan, index=index, columns=pd.MultiIndex.from_tuples(
        [(p, m, s) for p, m in cols for s in stats], names=["pii_type", "metric", "stat"]))
    for key, r in cell.iterrows():
        for s in stats:
            wide.loc[(key[0], key[1]), (key[2], key[3], s)] = r[s]
    wide.attrs["interval"] = caption
    return wide


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def leakage_latex(table: pd.DataFrame, caption: str | None = None, label: str | None = None) -> str:
    """A booktabs tabular of a formatted `leakage_table`: a column pair per PII type, the model written once per
    block of framings, a \\midrule between models. Needs \\usepackage{booktabs}."""
    pii = list(dict.fromkeys(table.columns.get_level_values(0)))
    metrics = list(dict.fromkeys(table.columns.get_level_values(1)))
    k = len(metrics)
    lines = [r"\begin{tabular}{ll" + ("c" * k + " ") * len(pii) + "}", r"\toprule"]
    head = " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{latex_escape(p)}}}" for p in pii)
    lines.append(f" & & {head} \\\\")
    lines.append(" ".join(rf"\cmidrule(lr){{{3 + i * k}-{2 + (i + 1) * k}}}" for i in range(len(pii))))
    lines.append("Model & Framing & " + " & ".join(latex_escape(m) for _ in pii for m in metrics) + r" \\")
    lines.append(r"\midrule")
    prev = None
    for (model, framing), row in table.iterrows():
        if prev is not None and model != prev:
            lines.append(r"\midrule")
        name = latex_escape(model) if model != prev else ""
        cells = " & ".join(latex_escape(row[(p, m)]) for p in pii for m in metrics)
        lines.append(f"{name} & {latex_escape(framing)} & {cells} \\\\")
        prev = model
    lines += [r"\bottomrule", r"\end{tabular}"]
    body = "\n".join(lines)
    if caption or label:
        parts = [r"\begin{table*}[t]", r"\centering", r"\small", body]
        if caption:
            parts.append(rf"\caption{{{latex_escape(caption)}}}")
        if label:
            parts.append(rf"\label{{{label}}}")
        body = "\n".join(parts + [r"\end{table*}"])
    return body + "\n"


def _csv(df: pd.DataFrame, index: bool = False) -> str:
    buf = io.StringIO()
    df.to_csv(buf, index=index)
    return buf.getvalue()


def write_leakage_table(results: pd.DataFrame, out_dir: str | Path, name: str = "leakage",
                        metrics: Sequence[str] = ("ASR", "RR"), caption: str | None = None, **kw) -> dict[str, Path]:
    """Write {name}_long.csv (tidy, every metric), {name}_table.csv (wide, formatted cells) and {name}_table.tex
    (booktabs; its caption names the interval used, `interval_caption`) into `out_dir`, each atomically.
    `results` is a results DataFrame or its `leakage_long`; `kw` goes to `leakage_long`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    long = _as_long(results, **kw)
    table = leakage_table(long, metrics=metrics)
    flat = table.copy()
    flat.columns = [f"{p} {m}" for p, m in flat.columns]
    paths = {"long": out / f"{name}_long.csv", "table": out / f"{name}_table.csv", "latex": out / f"{name}_table.tex"}
    atomic_write_text(paths["long"], _csv(long))
    atomic_write_text(paths["table"], _csv(flat.reset_index()))
    cap = caption or ("Leakage: " + ", ".join(metrics) + " per model and framing. "
                      + interval_caption(long[long["metric"].isin(metrics)], kw.get("level", 0.95)))
    atomic_write_text(paths["latex"], leakage_latex(table, caption=cap, label=f"tab:{name}"))
    return paths
