"""Validity of the leak scorer: precision and recall of probes.leakage on a hand-labelled set of responses.

    python benchmarks/validity_scorer.py [--set tests/fixtures/scorer/labelled.jsonl]

The set (tests/fixtures/scorer/labelled.jsonl, written by tests/fixtures/scorer/make_fixture.py) holds synthetic
responses for every PII type, each obfuscation the scorer claims to handle and hard negatives (one digit off, a
value inside a longer number, another person's value, the sentinel inside a sentence), labelled by hand. Rows
marked known_limit (labels we are sure of, which the scorer is known to miss) are counted like any other.

Prints `name: value` lines:
    scorer_precision, scorer_recall                  leak (contains_pii) against the `leak` label
    refusal_precision, refusal_recall                is_refusal(response, target=..., pii_type=...) against `refused`
    partial_disclosure_precision, partial_disclosure_recall
    *_wilson_low                                     the 95% Wilson lower bound of each of the six rates
    baseline_substring_recall                        recall of a plain 'target in response' matcher on the same set:
                                                     how much the obfuscations make the set harder than verbatim
    n_examples, n_leak, n_refused, n_partial_disclosure, n_known_limit

Null for the bar: the issue asks scorer_precision and scorer_recall >= 0.97. With ~100 positives, one miss moves
recall by ~0.01; the Wilson lower bound says how far the figure could be from the scorer's rate on responses
like these.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from probes.leakage import PII_TYPES, contains_pii, is_refusal, partial_disclosure  # noqa: E402

LABELLED = ROOT / "tests" / "fixtures" / "scorer" / "labelled.jsonl"
FIELDS = {"id": str, "response": str, "target": str, "pii_type": str, "leak": bool, "refused": bool,
          "partial_disclosure": bool, "tags": list, "known_limit": bool}
LABELS = ("leak", "refused", "partial_disclosure")


class LabelledSetError(ValueError):
    """The labelled set is malformed; the message names the file, the line and the field (never a value)."""


def _check_row(row: Any, path: Path, line_no: int) -> dict:
    if not isinstance(row, dict):
        raise LabelledSetError(f"{path}:{line_no}: expected a JSON object")
    for field, kind in FIELDS.items():
        if not isinstance(row.get(field), kind):
            raise LabelledSetError(f"{path}:{line_no}: field {field!r} missing or not a {kind.__name__}")
    if row["pii_type"] not in PII_TYPES:
        raise LabelledSetError(f"{path}:{line_no}: field 'pii_type' is not one of {PII_TYPES}")
    return row


def load_labelled(path: str | os.PathLike = LABELLED) -> list[dict]:
    """The labelled rows of `path` (JSONL), each checked for every field of FIELDS; ids unique."""
    path = Path(path)
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise LabelledSetError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        rows.append(_check_row(obj, path, line_no))
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise LabelledSetError(f"{path}: duplicate ids")
    if not rows:
        raise LabelledSetError(f"{path}: no rows")
    return rows


def predict(row: dict) -> dict[str, bool]:
    """The scorer's three calls on one labelled row."""
    response, target, pii_type = row["response"], row["target"], row["pii_type"]
    return {"leak": contains_pii(response, target, pii_type),
            "refused": is_refusal(response, target=target, pii_type=pii_type),
            "partial_disclosure": partial_disclosure(response, target, pii_type)}


def precision_recall(truth: list[bool], pred: list[bool]) -> dict[str, float]:
    """Precision, recall and their counts (tp, fp, fn); a rate with an empty denominator is nan."""
    tp = sum(t and p for t, p in zip(truth, pred))
    fp = sum(p and not t for t, p in zip(truth, pred))
    fn = sum(t and not p for t, p in zip(truth, pred))
    prec = tp / (tp + fp) if tp + fp else float("nan")
    rec = tp / (tp + fn) if tp + fn else float("nan")
    return {"precision": prec, "recall": rec, "tp": tp, "fp": fp, "fn": fn}


def wilson_low(successes: int, n: int, z: float = 1.959964) -> float:
    """Lower end of the 95% Wilson score interval for successes/n (nan for n = 0)."""
    if n == 0:
        return float("nan")
    p = successes / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n)


def _substring_baseline(row: dict) -> bool:
    return row["target"].strip().lower() in row["response"].lower()


def measure(path: str | os.PathLike = LABELLED) -> dict[str, float]:
    """The figures printed by `main` (see the module docstring), as a dict name -> value."""
    rows = load_labelled(path)
    preds = [predict(r) for r in rows]
    names = {"leak": "scorer", "refused": "refusal", "partial_disclosure": "partial_disclosure"}
    out: dict[str, float] = {}
    for label in LABELS:
        pr = precision_recall([r[label] for r in rows], [p[label] for p in preds])
        out[f"{names[label]}_precision"] = pr["precision"]
        out[f"{names[label]}_recall"] = pr["recall"]
        out[f"{names[label]}_precision_wilson_low"] = wilson_low(pr["tp"], pr["tp"] + pr["fp"])
        out[f"{names[label]}_recall_wilson_low"] = wilson_low(pr["tp"], pr["tp"] + pr["fn"])
    out["baseline_substring_recall"] = precision_recall([r["leak"] for r in rows],
                                                        [_substring_baseline(r) for r in rows])["recall"]
    out["n_examples"] = float(len(rows))
    for label in LABELS:
        out[f"n_{label}"] = float(sum(r[label] for r in rows))
    out["n_known_limit"] = float(sum(r["known_limit"] for r in rows))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--set", default=str(LABELLED), help="labelled responses (JSONL)")
    a = p.parse_args(argv)
    for name, value in measure(a.set).items():
        print(f"{name}: {value:.0f}" if name.startswith("n_") else f"{name}: {value:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
