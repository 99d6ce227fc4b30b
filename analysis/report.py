"""The study report: one self-contained HTML file (figures embedded) and the same content as Markdown.

The report is a list of blocks (heading, text, table, figure, code) built from the study's folders, rendered
twice: `report.md` links the figures' PNGs, `report.html` embeds them, so it can be mailed or archived alone. It
holds no PII: only the result tables (no responses, no values) and the figures.
"""

from __future__ import annotations

import base64
import html
import platform
import time
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.patching_stats import FAMILY_KEYS, reachability, reachability_message
from analysis.study.config import digest, model_fingerprint, package_version
from probes.data.files import atomic_write_text
from probes.probing.sweep import main_metric

Block = tuple[str, Any]  # ("h1" | "h2" | "h3" | "p" | "table" | "figure" | "code", payload)


def versions(study: Any) -> pd.DataFrame:
    import torch
    import transformers

    rows = [("mm-retention", package_version()), ("python", platform.python_version()),
            ("torch", torch.__version__), ("transformers", transformers.__version__),
            ("data seed", str(study.cfg.data["seed"]))]
    for e in study.cfg.data["models"]:
        rows.append((f"model {e['name']}", f"{e['path']} (weights {digest(model_fingerprint(e['path']))})"))
    return pd.DataFrame(rows, columns=["what", "version"])


def _significant(tests: pd.DataFrame | None, model: str, by: list[str], top: int = 12) -> pd.DataFrame | None:
    if tests is None or not len(tests):
        return None
    t = tests[tests["model"] == model]
    if not len(t):
        return None
    extra = [c for c in ("observed", "chance", "null_mean") if c in t.columns]  # probe tests: what the effect is of
    cols = [c for c in by if c in t.columns] + extra + ["effect", "p_value", "q_value", "significant", "n_groups"]
    return pvalues_readable(t.sort_values(["q_value", "effect"], ascending=[True, False])[cols].head(top).round(4),
                            t)


def pvalues_readable(shown: pd.DataFrame, source: pd.DataFrame) -> pd.DataFrame:
    """p- and q-values to two significant digits (rounding would print 1e-9 as 0.0) from the unrounded `source`."""
    out = shown.copy()
    for col in ("p_value", "q_value", "min_p"):
        if col in out.columns:
            out[col] = source.loc[out.index, col].map(lambda v: f"{v:.2g}")
    return out


def blocks_of(study: Any, figures: Path) -> list[Block]:
    out, stats = study.out, study.out / "statistics"
    read = lambda p: pd.read_csv(p) if p.exists() else None  # noqa: E731
    leak_t, probe_t, patch_t = (read(stats / f"{n}_tests.csv") for n in ("leakage", "probe", "patching"))
    alpha = study.cfg.get("statistics.alpha")
    b: list[Block] = [("h1", f"Study: {study.cfg.data['name']}"),
                      ("p", f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `mmret study run`. Confidence intervals "
                            f"are 95% bootstrap intervals resampling identities; tests are paired sign-flip "
                            f"permutation tests clustered by identity, Benjamini-Hochberg corrected across the cells "
                            f"of each table at q < {alpha}; figures mark the cells that survive.")]
    fig = lambda name, caption: [("figure", (figures / f"{name}.png", caption))] if (  # noqa: E731
        figures / f"{name}.png").exists() else []
    for e in study.cfg.data["models"]:
        m, base = e["name"], out / e["name"]
        b.append(("h2", f"Model: {m}"))
        table = read(base / "leakage" / "leakage_table.csv")
        if table is not None:
            b += [("h3", "Leakage (MM-Privacy framings)"),
                  ("p", "Attack success rate (the PII value appears in the answer) and refusal rate per framing and "
                        "PII type, with exact (Clopper-Pearson) 95% intervals over identities."), ("table", table)]
            b += fig(f"{m}_leakage", "ASR and refusal rate by framing and PII type.")
            t = _significant(leak_t, m, ["pii_type", "framing"])
            if t is not None:
                b += [("p", "Task inconsistency: each framing's leak against the direct ask of the same identity "
                            "(one-sided)."), ("table", t)]
            b += fig(f"{m}_multiturn_asr", "Context retention: ASR of the probe turn by turn distance.")
        probes = read(base / "probes" / "probe_results.csv")
        if probes is not None:
            b.append(("h3", "Where the PII is retained: linear probes"))
            main = main_metric(probes)
            best = probes[probes["metric"] == main].sort_values("value", ascending=False).head(8)
            method = study.cfg.get("probes.method")
            how = ("difference-in-means probes" if method == "dim" else
                   f"{method} probes, regularisation chosen by nested cross-validation")
            b += [("p", f"Best cells by held-out {main} ({how}; folds grouped by identity; chance is the held-out "
                        "accuracy of always predicting the training part's majority class, in the results as the "
                        "`chance` rows):"),
                  ("table", best[["target", "layer", "position_group", "turn", "turn_distance", "value", "ci_low",
                                  "ci_high", "n"]].round(3))]
            for target in sorted(probes["target"].unique()):
                b += fig(f"{m}_probe_heatmap_{target}", f"{target}: held-out probe accuracy by layer, position group "
                                                      "and turn (marked: beats the permutation null after BH).")
                b += fig(f"{m}_retention_curves_{target}", f"{target}: probe accuracy at the last token of each "
                                                          "turn against turn distance.")
            t = _significant(probe_t, m, ["target", "layer", "position_group", "turn"])
            if t is not None:
                n_sig = int(probe_t[probe_t["model"] == m]["significant"].sum())
                k = int(probe_t["n_permutations"].max())
                b += [("p", f"Null: the targets carry nothing the activations can read; targets permuted across "
                            f"identities and the whole pipeline (any regularisation choice included) rerun {k} times; "
                            "one-sided prediction t-test of the observed accuracy against the permuted ones on the "
                            "arcsine-square-root scale; Benjamini-Hochberg across every cell of the sweep. "
                            f"{n_sig} of {int((probe_t['model'] == m).sum())} cells decode the target after "
                            "correction; the strongest:"), ("table", t)]
            b += fig(f"{m}_probe_patch_overlay", "Probe accuracy per image patch, drawn over the document.")
            b += fig(f"{m}_token_strip", "The probe's read-out of the value at every token of a held-out session.")
        if (base / "patching").exists():
            b.append(("h3", "Which layers drive leakage: activation patching"))
            for png in sorted(figures.glob(f"{m}_patching_*.png")) + sorted(figures.glob(f"{m}_knockout.png")):
                b += fig(png.stem, png.stem.replace(f"{m}_", "").replace("_", " "))
            b += patching_blocks(patch_t, m, alpha, study.cfg.get("statistics.n_perm"))
        mit = read(base / "mitigation" / "mitigation_results.csv")
        if mit is not None:
            b += [("h3", "Mitigation: steers at the located cells and image protections"),
                  ("p", "On held-out identities: each method's front hypervolume against (L, U) = (1, 0) (L: worst "
                        "framing's ASR, U: benign utility), 95% identity-bootstrap intervals; the located steer's "
                        "gain over its controls (null: gain 0, paired intervals)."),
                  ("table", mit[mit["metric"].isin(["hypervolume", "hypervolume_gain"])][
                      ["method", "target", "metric", "value", "ci_low", "ci_high", "n"]].round(3))]
            b += fig(f"{m}_mitigation_fronts", "Every method's privacy-utility front.")
            b += fig(f"{m}_mitigation_framing_shift", "ASR per framing before and at each method's chosen point.")
    stages = pd.DataFrame([r.__dict__ for r in study.records])  # this run's stages so far
    b += [("h2", "Reproducibility"), ("table", versions(study))]
    if len(stages):
        b += [("p", "Stages of the run that wrote this report (skipped: outputs current for the config):"),
              ("table", stages[["stage", "model", "status", "seconds"]])]
    b += [("p", "The resolved config (`config.yaml` beside this report's folder):"), ("code", study.cfg.to_yaml())]
    return b


def patching_blocks(tests: pd.DataFrame | None, model: str, alpha: float, n_perm: int) -> list[Block]:
    """What the patching tests found for `model`, what they tested against, and what they could not reach."""
    if tests is None or not len(tests) or "status" not in tests.columns:
        return []
    t = tests[tests["model"] == model]
    if not len(t):
        return []
    fam = reachability(t, alpha)
    n_null = int((t["status"] != "tested").sum())
    b: list[Block] = [("p", "Effect of a patch = the share of the clean-corrupt gap of the logit difference that it "
                            "moves (denoising: restored; noising: destroyed), so 0 means no change in both "
                            "directions; a cell's score is the pooled ratio (summed changes over summed gaps, 95% "
                            "interval resampling identities). Null: the patch changes nothing (per-pair effects "
                            "symmetric about 0), two-sided sign-flip test clustered by identity; Benjamini-Hochberg "
                            f"within each family ({', '.join(FAMILY_KEYS[1:])}) at q < {alpha}. {n_null} cells "
                            "whose patch writes exactly what the base run holds in every pair are null by "
                            "construction: blank in the heatmaps, not tested."),
                      ("table", pvalues_readable(fam[[*FAMILY_KEYS[1:], "n_groups", "family_size",
                                                      "n_null_by_construction", "min_p", "n_significant"]], fam)
                       .rename(columns={"n_groups": "identities", "family_size": "tested cells"}))]
    for _, f in fam[~fam["single_reachable"]].iterrows():
        b.append(("p", f"**Warning:** {reachability_message(f, alpha, n_perm)}."))
    sig = t[t["significant"].astype(bool)].sort_values(["q_value", "value"], ascending=[True, False])
    cols = ["experiment", "direction", "component", "layer", "position_group", "value", "ci_low", "ci_high",
            "mean_pair_effect", "p_value", "q_value", "n_groups"]
    if len(sig):
        b += [("p", f"{len(sig)} cells survive correction (strongest first):"),
              ("table", pvalues_readable(sig[cols].head(15).round(4), sig))]
    else:
        b.append(("p", "No patching cell survives correction."))
    return b


def to_markdown(blocks: list[Block], rel_to: Path) -> str:
    lines = []
    for kind, x in blocks:
        if kind in ("h1", "h2", "h3"):
            lines.append("#" * int(kind[1]) + " " + x)
        elif kind == "p":
            lines.append(x)
        elif kind == "table":
            lines.append(_md_table(x))
        elif kind == "figure":
            path, caption = x
            lines.append(f"![{caption}]({Path('..') / path.relative_to(rel_to.parent)})\n\n*{caption}*")
        elif kind == "code":
            lines.append(f"```yaml\n{x}```")
    return "\n\n".join(lines) + "\n"


def _md_table(df: pd.DataFrame) -> str:
    cells = [[str(c) for c in df.columns]] + [["" if pd.isna(v) else str(v) for v in row] for row in df.to_numpy()]
    head = "| " + " | ".join(cells[0]) + " |\n|" + "---|" * len(cells[0])
    return head + "".join("\n| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells[1:])


STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}table{border-collapse:collapse;"
         "font-size:0.85em}td,th{border:1px solid #ccc;padding:2px 6px}figure{margin:1em 0}img{max-width:100%}"
         "figcaption{font-size:0.85em;color:#444}pre{background:#f6f6f6;padding:1em;font-size:0.8em}")


def to_html(blocks: list[Block]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>mm-retention report</title>"
             f"<style>{STYLE}</style></head><body>"]
    for kind, x in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{html.escape(x)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(x)}</p>")
        elif kind == "table":
            parts.append(x.to_html(index=False, na_rep="", border=0))
        elif kind == "figure":
            path, caption = x
            data = base64.b64encode(Path(path).read_bytes()).decode()
            parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        elif kind == "code":
            parts.append(f"<pre>{html.escape(x)}</pre>")
    return "\n".join(parts) + "</body></html>\n"


def write_report(study: Any, work: Path) -> list[Path]:
    """report.md and/or report.html (the config's report.formats) into `work`; returns the paths."""
    blocks = blocks_of(study, study.out / "figures")
    paths = []
    if "md" in study.cfg.get("report.formats"):
        paths.append(work / "report.md")
        atomic_write_text(paths[-1], to_markdown(blocks, study.out / "report"))
    if "html" in study.cfg.get("report.formats"):
        paths.append(work / "report.html")
        atomic_write_text(paths[-1], to_html(blocks))
    return paths
