"""`make demo`: the main job end to end on the embedded default.

Until the project's own trained model exists (issue 4), the default is a random-initialised LLaVA built offline
(so its leakage numbers are noise; the point is the path): synthetic identities and their documents ->
MM-Privacy single-turn and multi-turn retention sessions (JSONL) -> leakage evaluation (the benchmark-style table
with bootstrap CIs, and its figure) -> residual stream captured turn by turn into an ActivationStore -> its
summary and a figure from a tidy table.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from analysis.figures import plot_layer_profile  # noqa: E402
from probes import build_tiny_model, capture, load_model, read_sessions, write_sessions  # noqa: E402
from probes.identities import make_identities  # noqa: E402
from probes.leakage import run_leakage  # noqa: E402
from probes.sessions_build import mmprivacy_sessions, multiturn_sessions  # noqa: E402


def residual_norms(store) -> pd.DataFrame:
    """Tidy table: mean residual-stream norm per layer and position group."""
    x, meta = store.query("hook_resid_post")
    norms = x.float().norm(dim=-1)  # [n, layer]
    rows = []
    for group in store.spec["positions"].split("+"):
        sel = torch.tensor(meta["groups"].str.split(",").map(lambda g: group in g).tolist())
        for j, layer in enumerate(meta["layers"].iloc[0]):
            rows.append({"model": store.spec["model"], "family": store.spec["family"], "hook": "hook_resid_post",
                         "layer": int(layer), "position_group": group, "metric": "residual norm",
                         "value": float(norms[sel, j].mean()), "n": int(sel.sum())})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="results/demo")
    ap.add_argument("--figures", default="figures")
    ap.add_argument("--identities", type=int, default=8)
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.time()
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        build_tiny_model("llava", model_dir, n_layers=8, d_model=256, n_heads=8)
    people = make_identities(args.identities, seed=0)
    single = mmprivacy_sessions(people, out / "images", size=64, design="cycle", relative_to=out)
    multi = multiturn_sessions(people, out / "images", k_distractors=(0, 1, 3), reshow=(False,), pii_types=("SSN",),
                               size=64, design="cycle", relative_to=out)
    write_sessions(single, out / "mmprivacy.jsonl")
    write_sessions(multi, out / "multiturn.jsonl")
    print(f"{len(single)} single-turn and {len(multi)} multi-turn sessions of {len(people)} identities")

    loaded = load_model(model_dir)
    results = run_leakage(loaded, out / "mmprivacy.jsonl", out / "leakage", max_new_tokens=12, n_boot=200,
                          progress=True)
    print(f"leakage (random weights, so noise): ASR {results['leak'].mean():.2f}, RR {results['refused'].mean():.2f}")

    multi = list(read_sessions(out / "multiturn.jsonl"))  # image paths are relative to the JSONL's folder
    store = capture(loaded, multi, out / "store", hooks="resid_post", positions="last:*+image:0")
    print(store.summary())
    table = residual_norms(store)
    table.to_csv(out / "residual_norms.csv", index=False)
    paths = plot_layer_profile(table, args.figures, name="demo_residual_norms", ylabel="mean residual norm")
    print(f"figures: {', '.join(map(str, paths))}, {out / 'leakage' / 'leakage.pdf'}\n"
          f"demo took {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
