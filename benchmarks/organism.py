"""Benchmark of the embedded default model against the bars of issue 4, on freshly drawn held-out identities.

    python benchmarks/organism.py [--model probes/organism/default] [--seed 0] [--n 24]

Prints `name: value` lines: reading_exact, direct_rr_min (lowest over SSN/phone/email), caption_rephrase_asr_min
(lowest over caption/rephrasing x PII type), memory_asr, unseen_asr, turn3_asr (3 distractor turns),
paraphrase_shift_max (largest change of a framing's ASR or RR when its text is a held-out paraphrase).

Resolution: with the default --n 24, each (framing, PII type) cell holds 8 sessions, so a rate moves in steps of
1/8 (direct_rr_min >= 0.9 needs 8 of 8); --n 96 gives steps of 1/32.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probes.organism.evaluate import BARS, HEADLINE, measure, meets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "probes/organism/default"))
    p.add_argument("--seed", type=int, default=0, help="draws the held-out identities")
    p.add_argument("--n", type=int, default=24, help="held-out identities")
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args(argv)
    t0 = time.time()
    metrics, _ = measure(a.model, a.seed, a.n, a.batch_size, progress=True)
    for k in HEADLINE:
        op, bar = BARS[k]
        print(f"{k}: {metrics[k]:.3f}   (bar {op} {bar}: {'met' if meets(k, metrics[k]) else 'MISSED'})")
    print(f"seconds: {time.time() - t0:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
