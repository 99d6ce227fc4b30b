"""Tables of results: the MM-Privacy benchmark layout for leakage (rows model x framing, columns PII type x
{ASR, RR}), as tidy long CSV, wide CSV and booktabs LaTeX, every cell with a bootstrap 95% CI by identity.

The long form is the one to compute with (shared columns: model, framing, pii_type, metric, value, ci_low,
ci_high, n); the wide form and the LaTeX are for reading, cells written "0.42 [0.30, 0.55]".
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from analysis.stats import bootstrap_ci
from probes.session import atomic_write_text

# Result column behind each metric: ASR = the value leaked, RR = refused, partial = share reproduced in order.
METRICS = {"ASR": "leak", "RR": "refused", "partial": "partial"}
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


def _sort(df: pd.DataFrame) -> pd.DataFrame:
    keys = {"framing": FRAMING_ORDER, "pii_type": PII_ORDER, "metric": tuple(METRICS)}
    cols = [c for c in ("model", "framing", "pii_type", "turn_distance", "scenario", "metric") if c in df.columns]
    return df.sort_values(cols, key=lambda s: _order(s, keys.get(s.name, ())), kind="stable").reset_index(drop=True)


def leakage_long(results: pd.DataFrame, by: Sequence[str] = LEAKAGE_BY, metrics: Sequence[str] = tuple(METRICS),
                 group: str = "identity_id", n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Tidy long form: one row per cell of `by` and metric (ASR, RR, partial) with value (the mean), ci_low,
    ci_high (bootstrap CI at `level`, resampling identities), n (responses) and n_groups (identities)."""
    by = list(by)
    missing = [c for c in [*by, group, *(METRICS[m] for m in metrics)] if c not in results.columns]
    if missing:
        raise TableError(f"leakage results lack column(s) {missing} (columns: {list(results.columns)})")
    parts = []
    for m in metrics:
        ci = bootstrap_ci(results, METRICS[m], by, group=group, n_boot=n_boot, seed=seed, level=level)
        parts.append(ci.assign(metric=m))
    long = pd.concat(parts, ignore_index=True)
    return _sort(long[[*by, "metric", "value", "ci_low", "ci_high", "n", "n_groups"]])


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
    level `stat` in {value, ci_low, ci_high}. `kw` goes to `leakage_long` (n_boot, seed, level)."""
    long = _as_long(results, **kw)
    long = long[long["metric"].isin(metrics)].copy()
    for col in ("model", "framing", "pii_type"):
        if col not in long.columns:
            raise TableError(f"leakage table: column {col!r} missing")
        long[col] = long[col].astype(object).where(long[col].notna(), MISSING)
    rows = _sort(long[["model", "framing"]].drop_duplicates())
    pii = [p for p in _sort(long[["pii_type"]].drop_duplicates())["pii_type"]]
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
        return table
    stats = ("value", "ci_low", "ci_high")
    wide = pd.DataFrame(np.nan, index=index, columns=pd.MultiIndex.from_tuples(
        [(p, m, s) for p, m in cols for s in stats], names=["pii_type", "metric", "stat"]))
    for key, r in cell.iterrows():
        for s in stats:
            wide.loc[(key[0], key[1]), (key[2], key[3], s)] = r[s]
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
    (booktabs) into `out_dir`, each atomically. `results` is a results DataFrame or its `leakage_long`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    long = _as_long(results, **kw)
    table = leakage_table(long, metrics=metrics)
    flat = table.copy()
    flat.columns = [f"{p} {m}" for p, m in flat.columns]
    paths = {"long": out / f"{name}_long.csv", "table": out / f"{name}_table.csv", "latex": out / f"{name}_table.tex"}
    atomic_write_text(paths["long"], _csv(long))
    atomic_write_text(paths["table"], _csv(flat.reset_index()))
    cap = caption or ("Leakage: " + ", ".join(metrics) + " per model and framing, with bootstrap 95% confidence "
                      "intervals resampled by identity.")
    atomic_write_text(paths["latex"], leakage_latex(table, caption=cap, label=f"tab:{name}"))
    return paths
