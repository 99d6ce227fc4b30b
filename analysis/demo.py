"""`make demo`: the main job end to end on the embedded default model (`probes/organism/default`).

Synthetic identities and their documents -> MM-Privacy single-turn sessions under the five framings -> leakage
evaluation (the benchmark-style table with bootstrap CIs, and its figure) -> multi-turn retention sessions (the
document in turn 1, three distractor exchanges, the SSN asked under captioning) -> residual stream captured turn by
turn into an ActivationStore -> linear probes of the SSN digits at every layer and turn (with the control task) ->
heatmap and retention curves. Everything lands in --out (tables, store) and --figures (PDF + PNG + CSV).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from analysis.figures import plot_probe_heatmap, plot_retention_curves  # noqa: E402
from probes import capture, load_model, read_sessions, write_sessions  # noqa: E402
from probes.identities import make_identities  # noqa: E402
from probes.leakage import run_leakage  # noqa: E402
from probes.organism import DEFAULT_MODEL  # noqa: E402
from probes.probe_data import probe_cells, session_targets  # noqa: E402
from probes.probing import probe_sweep  # noqa: E402
from probes.sessions_build import mmprivacy_sessions, multiturn_sessions  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="results/demo")
    ap.add_argument("--figures", default="figures")
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--identities", type=int, default=16, help="identities of the leakage table")
    ap.add_argument("--probe-identities", type=int, default=60, help="identities of the retention probes")
    args = ap.parse_args(argv)
    out, t0 = Path(args.out), time.time()
    meta = json.loads((Path(args.model) / "training.json").read_text())["config"]
    doc = {"size": meta["image_size"], "layout": meta.get("layout", "fixed")}
    people = make_identities(args.identities, seed=0)
    single = mmprivacy_sessions(people, out / "images", design="cycle", relative_to=out, **doc)
    write_sessions(single, out / "mmprivacy.jsonl")
    loaded = load_model(args.model)
    print(f"model: {args.model} ({loaded.family}, {loaded.n_layers} layers)")
    results = run_leakage(loaded, out / "mmprivacy.jsonl", out / "leakage", n_boot=500, progress=True)
    print(f"leakage of {len(single)} single-turn sessions: ASR {results['leak'].mean():.2f}, "
          f"RR {results['refused'].mean():.2f} (table: {out / 'leakage' / 'leakage_table.csv'})")

    probe_people = make_identities(args.probe_identities, seed=1)
    multi = multiturn_sessions(probe_people, out / "images", k_distractors=(3,), reshow=(False,),
                               framing_pairs=(("caption", "caption"),), pii_types=("SSN",), relative_to=out, **doc)
    write_sessions(multi, out / "multiturn.jsonl")
    multi = list(read_sessions(out / "multiturn.jsonl"))  # image paths are relative to the JSONL's folder
    store = capture(loaded, multi, str(out / "store"), hooks="resid_post", positions="last:*+image:0")
    print(store.summary())
    blocks = probe_cells(store, ["last", "image"])
    probes = probe_sweep(blocks, session_targets(store.sessions(), "digits"), model="organism", n_boot=500)
    probes.to_csv(out / "probe_results.csv", index=False)
    best = probes[(probes.metric == "char_accuracy")].sort_values("value").iloc[-1]
    print(f"SSN digits, best probe: per-digit accuracy {best['value']:.2f} (chance 0.10) at layer {best['layer']}, "
          f"{best['position_group']} of turn {best['turn']}")
    paths = plot_probe_heatmap(probes, args.figures, "demo_probe_heatmap", title="SSN digits (3 distractors)")
    paths += plot_retention_curves(probes, args.figures, "demo_retention_curves", chance=0.1)
    print(f"figures: {', '.join(str(p) for p in paths if p.suffix == '.pdf')}, {out / 'leakage' / 'leakage.pdf'}\n"
          f"demo took {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
