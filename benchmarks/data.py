"""Data-path speed: identities, rendered documents and session building, measured in one run; prints `name: value`.

    identities_per_second           make_identities (seeded Faker), per identity
    images_per_second               render_document + PNG encode + atomic write of 128 px documents
    sessions_per_second             multiturn_sessions for 1,000 identities, one session each (design "cycle"), so
                                    every session renders and writes its own document: the worst case
                                    (target: 1,000 in under a minute on 2 cores, i.e. >= 16.7)
    sessions_per_second_shared      the default "cross" design (every identity x 144 configurations; one document
                                    per identity, shared by its sessions)
    jsonl_write_sessions_per_second write_sessions of the multi-turn sessions
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probes.data.builders import multiturn_sessions  # noqa: E402
from probes.data.documents import SCENARIOS, render_document  # noqa: E402
from probes.data.identities import make_identities  # noqa: E402
from probes.data.session import write_sessions  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="sessions (and identities) for sessions_per_second")
    ap.add_argument("--size", type=int, default=128, help="document size in px")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_identities(10, seed=1)  # warm-up: Faker's first call loads its providers (~0.1 s, not per identity)
        people, dt = timed(lambda: make_identities(args.n, seed=0))
        print(f"identities_per_second: {args.n / dt:.1f}")

        def images():
            for i, p in enumerate(people[:200]):
                render_document(p, SCENARIOS[i % 4], args.size, seed=0).save(tmp / "docs" / f"{i}.png")
        _, dt = timed(images)
        print(f"images_per_second: {min(200, args.n) / dt:.1f}")

        sessions, dt = timed(lambda: multiturn_sessions(people, tmp / "mt", size=args.size, design="cycle"))
        assert len(sessions) == args.n
        print(f"sessions_per_second: {len(sessions) / dt:.1f}")
        print(f"sessions_{args.n}_seconds: {dt:.2f}")

        shared, dt = timed(lambda: multiturn_sessions(people[:10], tmp / "cross", size=args.size))
        print(f"sessions_per_second_shared: {len(shared) / dt:.1f}")

        _, dt = timed(lambda: write_sessions(sessions, tmp / "sessions.jsonl"))
        print(f"jsonl_write_sessions_per_second: {len(sessions) / dt:.1f}")
        print(f"cpu_count: {os.cpu_count()}")


if __name__ == "__main__":
    main()
