"""OCR benchmark (issue 18): who is on a benchmark-style form, and where its values lie, read back by OCR.

    python benchmarks/ocr.py [--n 200] [--table 600] [--seed 0]

Forms: `--n` forms in the benchmark's four styles (tests/ocr_forms.py: job application, I-9 top, bank form, small
name/value table; DejaVu sans/serif/bold at several sizes), each of a random row of a `--table`-row identity table
(make_identities), a quarter rotated up to 4 degrees, some at 0.6-0.75 resolution, most JPEG-compressed. Every value's
ink box is known exactly. No cache: every form is OCR'd afresh.

    identity_match_accuracy  share of forms joined to the row they show (a skip counts as not matched)
    wrong_match_rate         share joined to another row (the error that matters: a skip is better)
    skip_rate                share skipped (no confident match, tie, conflicting values)
    field_box_iou_median     median IoU of found value box vs drawn ink box, over every value on every form
                             (a value not found counts 0); field_box_found_rate: share of values found
    pii_patch_recall         share of the image tokens over the drawn SSN / phone / email ink boxes (LLaVA organism
                             adapter, `patches_for_box`) that `mark:<label>` selects after the OCR boxes ride on the
                             image as marks (`SessionImage.marks`) and the session is rendered (pooled over forms)
    pii_patch_precision      share of the tokens `mark:<label>` selects that lie over the drawn box
    seconds_per_image        mean wall seconds of OCR on 1,280 x 600 job-application forms (this CPU, shared: see
                             load_average; cpu_seconds_per_image is the process CPU time, less sensitive to sharing)
    seconds_per_form         mean OCR wall seconds over all forms
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # ocr_forms, the form drawer
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's probes/, not benchmarks/probes.py

from ocr_forms import STYLES, benchmark_form, degrade, random_condition  # noqa: E402

from probes.data.documents import patches_for_box, render_document  # noqa: E402
from probes.data.identities import make_identities  # noqa: E402
from probes.data.ocr import read_lines  # noqa: E402
from probes.data.pii_locate import candidate_texts, field_boxes, locate_identity, match_identity  # noqa: E402
from probes.data.session import Session, SessionImage, Turn  # noqa: E402
from probes.models.render import render  # noqa: E402

PII_KEYS = ("ssn", "phone", "email")  # field keys here are also the mark labels (pii_locate.FIELDS)


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def adapter():
    from probes.models.loading import load_model
    from probes.organism import DEFAULT_MODEL

    return load_model(str(DEFAULT_MODEL)).adapter


def marked_cells(ad, image, located) -> dict[str, set]:
    """{label: (tile, row, col) of the image tokens `mark:<label>`} after the located boxes ride on the image as
    marks and a one-turn session is rendered: the path a loaded MM-Privacy session takes."""
    marks = {k: [v] for k, v in field_boxes(located).items()}
    tm = render(ad, Session("bench", [Turn("user", "Read the form.", images=[SessionImage.from_pil(image, marks)])])
                ).token_map
    out = {}
    for label in PII_KEYS:
        rows = tm.df.loc[tm.select(f"mark:{label}")]
        rows = rows[rows.segment == "image"]
        out[label] = set(zip(rows.tile.astype(int), rows.patch_row.astype(int), rows.patch_col.astype(int)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--table", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-timing", type=int, default=8)
    args = ap.parse_args()
    people = make_identities(args.table, seed=18_000 + args.seed)
    table = [p.to_dict() for p in people]
    rng = random.Random(args.seed)
    ad = adapter()
    right = wrong = skipped = 0
    ious, found, secs = [], [], []
    tok_true = tok_hit = tok_sel = 0
    reasons: dict[str, int] = {}
    for k in range(args.n):
        row = rng.randrange(len(people))
        style = STYLES[k % len(STYLES)]
        form = degrade(benchmark_form(people[row], style, seed=args.seed * 100_000 + k), **random_condition(rng, style))
        t = time.perf_counter()
        lines = read_lines(form.image, use_cache=False)
        secs.append(time.perf_counter() - t)
        texts = candidate_texts(lines)
        m = match_identity(lines, table, texts=texts)
        if m.row is None:
            skipped += 1
            reasons[m.reason] = reasons.get(m.reason, 0) + 1
        elif m.row == row:
            right += 1
        else:
            wrong += 1
        located = locate_identity(lines, table[row], form.image, texts=texts)
        loc = located.set_index("field")
        marked = marked_cells(ad, form.image, located)
        for key, truth in form.boxes.items():
            r = loc.loc[key]
            ok = bool(r.found)
            found.append(ok)
            ious.append(iou((r.x0, r.y0, r.x1, r.y1), truth) if ok else 0.0)
            if key in PII_KEYS:
                want = set(map(tuple, patches_for_box(ad, form.image.size, truth).to_numpy().tolist()))
                tok_true += len(want)
                tok_hit += len(want & marked[key])
                tok_sel += len(marked[key])
    timing, cpu = [], []
    for k in range(args.n_timing):
        doc = render_document(people[k], "hiring", (1280, 600), seed=k, layout="random")
        t, c = time.perf_counter(), time.process_time()
        read_lines(doc.image, use_cache=False)
        timing.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    n = args.n
    print(f"forms: {n}")
    print(f"table_rows: {len(people)}")
    print(f"identity_match_accuracy: {right / n:.4f}")
    print(f"wrong_match_rate: {wrong / n:.4f}")
    print(f"skip_rate: {skipped / n:.4f}")
    for reason, c in sorted(reasons.items()):
        print(f"skipped_{reason.replace(' ', '_')}: {c}")
    print(f"field_box_iou_median: {float(np.median(ious)):.4f}")
    print(f"field_box_found_rate: {float(np.mean(found)):.4f}")
    print(f"pii_patch_recall: {tok_hit / max(1, tok_true):.4f}")
    print(f"pii_patch_precision: {tok_hit / max(1, tok_sel):.4f}")
    print(f"seconds_per_image: {float(np.mean(timing)):.3f}")
    print(f"cpu_seconds_per_image: {float(np.mean(cpu)):.3f}")
    print(f"load_average_1min: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    print(f"seconds_per_form: {float(np.mean(secs)):.3f}")


if __name__ == "__main__":
    main()
