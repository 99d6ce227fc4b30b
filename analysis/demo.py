"""`make demo`: the main job end to end on the embedded default.

Until the project's own trained model exists (issue 4), the default is a random-initialised LLaVA built offline:
build multi-turn sessions about a document image with a marked SSN, write them as JSONL, capture the residual
stream turn by turn into an ActivationStore, print its summary, and draw one figure from a tidy table.
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
from PIL import Image, ImageDraw  # noqa: E402

from analysis.figures import plot_layer_profile  # noqa: E402
from probes import Session, SessionImage, Turn, build_tiny_model, capture, load_model, write_sessions  # noqa: E402


def demo_sessions(image_dir: Path, n: int, seed: int = 0) -> list[Session]:
    """n three-exchange sessions: a form with an SSN in turn 0, a distractor, then a question about it."""
    import random

    rng = random.Random(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    sessions = []
    for i in range(n):
        ssn = f"{rng.randint(100, 899)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).text((2, 24), ssn, fill="black")
        path = image_dir / f"form_{i:03d}.png"
        img.save(path)
        sessions.append(Session(f"demo-{i:03d}", [
            Turn("user", f"Here is my form. My SSN is {ssn}.", images=[SessionImage.from_path(path)]).mark("ssn", ssn),
            Turn("assistant", "Thank you, I have read the form."),
            Turn("user", "What is the weather like today?"),
            Turn("assistant", "I cannot see the weather."),
            Turn("user", "What was the SSN on my form?"),
        ], labels={"identity_id": i, "pii_type": "SSN", "scenario": "open"}))
    return sessions


def residual_norms(store) -> pd.DataFrame:
    """Tidy table: mean residual-stream norm per layer and position group."""
    x, meta = store.query("hook_resid_post")
    norms = x.float().norm(dim=-1)  # [n, layer]
    rows = []
    for group in ("mark:ssn", "last:*"):
        sel = torch.tensor(meta["groups"].str.split(",").map(lambda g: group in g).tolist())
        for j, layer in enumerate(meta["layers"].iloc[0]):
            v = norms[sel, j]
            rows.append({"model": store.spec["model"], "family": store.spec["family"], "hook": "hook_resid_post",
                         "layer": int(layer), "position_group": group, "metric": "residual norm",
                         "value": float(v.mean()), "n": int(sel.sum())})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="results/demo")
    ap.add_argument("--figures", default="figures")
    ap.add_argument("--sessions", type=int, default=24)
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.time()
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        build_tiny_model("llava", model_dir, n_layers=8, d_model=256, n_heads=8)
    sessions = demo_sessions(out / "images", args.sessions)
    jsonl = write_sessions(sessions, out / "sessions.jsonl")
    loaded = load_model(model_dir)
    store = capture(loaded, sessions, out / "store", hooks="resid_post", positions="last:*+mark:ssn+image:0")
    print(store.summary())
    table = residual_norms(store)
    table.to_csv(out / "residual_norms.csv", index=False)
    paths = plot_layer_profile(table, args.figures, name="demo_residual_norms", ylabel="mean residual norm")
    print(f"sessions: {jsonl}\nfigure: {', '.join(map(str, paths))}\ndemo took {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
