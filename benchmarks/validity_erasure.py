"""Is LEACE's erasure effect about the concept, or about the size of the edit? (issue 16, part 7) Prints `name: value`.

    python benchmarks/validity_erasure.py [--n 150] [--draws 5] [--seed 0] [--threads 1] [--skip-organism]

Synthetic, where the truth is known (sklearn logistic regressions on held-out draws of the same distribution; d 32,
5 classes, 2,000 training and 2,000 test rows, the whole check repeated over SYN_SEEDS seeds and averaged):
    synthetic_probe_acc_{none,leace,random}   a probe of the planted concept retrained on the edited data (chance
                                0.2): LEACE must take it to chance, the matched random control must not
    synthetic_readout_drop_{leace,random}     accuracy drop of a fixed readout of the concept (trained on clean data,
                                then shown edited data): what the organism's leak rate is to its fixed weights
    synthetic_null_readout_drop_{leace,random}  no concept (labels independent of the data): the drop of a fixed
                                readout of another planted variable; both edits must cost it the same:
                                synthetic_null_drop_diff (leace - random, paired over seeds) and its standard error
                                synthetic_null_drop_diff_se
    synthetic_{leace,random}_edit_rms         root mean squared edit on the held-out rows (planted data)
Organism (the shipped default model at the answer-plan layer its training planted, blocks.<plan_layer>: a known
site, not one picked by a probe sweep): SSN digits, probe sessions as benchmarks/probes.py builds them (caption
framing, document in turn 1, 3 distractor exchanges) for n held-out identities (make_identities(n, 70_000 + seed));
LEACE fitted on n other identities (make_identities(n, 75_000 + seed)) where it is applied: the prompt's last
PLAN_SPAN positions and every generated token (`fit_leace_at`).
    organism_asr_no_erasure, organism_erasure_asr_drop       leak rate without erasure, and its drop under LEACE
    matched_random_asr_drop, matched_random_asr_drop_max     the drop under the matched control (`draws` draws:
                                mean and largest)
    leace_edit_norm, random_edit_norm   root mean squared edit on the measured sessions' activations at the edited
                                positions (random: mean over draws); *_edit_rel: the same over the activations'
                                root mean squared norm; leace_fit_edit_norm: on LEACE's fitting data, where the
                                control is matched exactly; random_scale: the control's push (1 = a plain projection)
    anydir_random_asr_drop      the same control drawn from the whole whitened space (it then shares about r^2/d
                                of LEACE's directions): how much of a concept-blind control's drop is the concept
    whitened_random_asr_drop    the control without its scale (s = 1: matched in LEACE's whitened norm, not in
                                the Euclidean one); whitened_random_edit_rel: its Euclidean size
    pooled_*                    the same with one LEACE fitted on both kinds of position pooled (split=False)
    organism_erasure_rank, organism_erasure_rank_generated (the two LEACEs'), seconds

Measured (n 150, 5 draws, seed 0, --threads 1; 923 s on 2 cores shared at load 10, 348 s for the run before the
whitened and any-direction controls were added). Synthetic: a retrained probe 0.933 -> LEACE 0.201 (chance 0.2),
matched control 0.933; fixed readout drop 0.735 against -0.001; edit 3.34 against 3.37; null: drops 0.034 and 0.027,
paired difference 0.007 (se 0.007). Organism: ASR 0.993 without erasure; organism_erasure_asr_drop -0.007 (LEACE
does not lower the leak), matched_random_asr_drop 0.839 (max 0.920), both edits 34.1 (0.512 of the activations'
norm; prompt positions 0.855, generated tokens 0.392; control scale 7.78 and 0.59); anydir_random_asr_drop 0.340;
whitened_random_asr_drop 0.993 (edit 0.597); pooled LEACE -0.007 against 0.791. Every random edit of LEACE's size
lowers the leak, LEACE's own does not: the linear information about the digits at this site is not needed for the
leak (consistent with copying each digit off the image tokens as it is written, probes/organism/train.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from probes.probing.erasure import (  # noqa: E402
    edit_sizes,
    erasing,
    erasure_effect,
    fit_leace,
    fit_leace_at,
    matched_control,
    matched_random_eraser,
    site_activations,
    site_edit_sizes,
)

DEFAULT = ROOT / "probes" / "organism" / "default"
SYN_D, SYN_K, SYN_N, SYN_STRENGTH = 32, 5, 2000, 3.0
SYN_SEEDS = 20


def planted(n: int, strength: float, seed: int, other: float = 0.0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Rows x = noise + mean offset + strength * (class y's planted direction) + other * t * (another direction):
    X [n, d] float64, the concept y [n] (5 classes) and a binary variable t [n]. The directions are fixed (drawn
    once), so draws with different seeds come from one distribution; strength 0: no concept in the data."""
    fixed = np.random.default_rng(12345)
    dirs = np.linalg.qr(fixed.normal(size=(SYN_D, SYN_K + 1)))[0]
    g = np.random.default_rng(seed)
    y, t = g.integers(0, SYN_K, n), g.integers(0, 2, n)
    X = g.normal(size=(n, SYN_D)) + 2.0 + strength * dirs[:, y].T + other * (2 * t - 1)[:, None] * dirs[:, SYN_K]
    return torch.tensor(X), y, t


def _acc(fit_X, fit_y, test_X, test_y) -> float:
    from sklearn.linear_model import LogisticRegression

    return float(LogisticRegression(max_iter=2000).fit(fit_X, fit_y).score(test_X, test_y))


def synthetic_once(seed: int) -> dict[str, float]:
    """One seed of the synthetic checks (see the module docstring)."""
    from sklearn.linear_model import LogisticRegression

    out: dict[str, float] = {}
    X, y, _ = planted(SYN_N, SYN_STRENGTH, 2 * seed)
    Xt, yt, _ = planted(SYN_N, SYN_STRENGTH, 2 * seed + 1)
    leace = fit_leace(X, y[:, None])
    edits = {"none": lambda x: x, "leace": leace, "random": matched_random_eraser(leace, seed)}
    readout = LogisticRegression(max_iter=2000).fit(X.numpy(), y)
    clean = readout.score(Xt.numpy(), yt)
    for name, e in edits.items():
        out[f"synthetic_probe_acc_{name}"] = _acc(e(X).numpy(), y, e(Xt).numpy(), yt)
        if name != "none":
            out[f"synthetic_readout_drop_{name}"] = float(clean - readout.score(e(Xt).numpy(), yt))
            out[f"synthetic_{name}_edit_rms"] = edit_sizes(e, Xt)["edit_rms"]
    # Null: the concept's labels are independent of the data; a readout of another planted variable t.
    X, y, t = planted(SYN_N, 0.0, 2 * seed, other=1.0)
    Xt, _, tt = planted(SYN_N, 0.0, 2 * seed + 1, other=1.0)
    leace = fit_leace(X, y[:, None])
    readout = LogisticRegression(max_iter=2000).fit(X.numpy(), t)
    clean = readout.score(Xt.numpy(), tt)
    for name, e in (("leace", leace), ("random", matched_random_eraser(leace, seed))):
        out[f"synthetic_null_readout_drop_{name}"] = float(clean - readout.score(e(Xt).numpy(), tt))
    return out


def synthetic() -> dict[str, float]:
    runs = pd.DataFrame([synthetic_once(s) for s in range(SYN_SEEDS)])
    figs = {k: float(v) for k, v in runs.mean().items()}
    diff = runs["synthetic_null_readout_drop_leace"] - runs["synthetic_null_readout_drop_random"]
    figs["synthetic_null_drop_diff"] = float(diff.mean())  # paired over seeds; 0 under the null
    figs["synthetic_null_drop_diff_se"] = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    return figs


def organism(model_dir: Path, n: int, draws: int, seed: int) -> dict[str, float]:
    from probes import load_model
    from probes.data.builders import multiturn_sessions
    from probes.data.identities import make_identities
    from probes.leakage import evaluate_leakage
    from probes.organism.evaluate import training_meta
    from probes.organism.train import PLAN_SPAN
    from probes.probing.targets import session_targets

    meta = training_meta(model_dir)
    cfg = meta["config"]
    hook = f"blocks.{int(meta.get('plan_layer', 2))}.hook_resid_post"
    loaded = load_model(str(model_dir))
    figs: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def context(who, image_dir):  # as benchmarks/probes.py: document in turn 1, 3 distractors, caption framing
            return multiturn_sessions(who, Path(tmp) / image_dir, k_distractors=(3,), reshow=(False,),
                                      framing_pairs=(("caption", "caption"),), pii_types=("SSN",),
                                      size=cfg["image_size"], layout=cfg.get("layout", "fixed"))

        measured = context(make_identities(n, seed=70_000 + seed), "img")
        fitting = context(make_identities(n, seed=75_000 + seed), "img_fit")
        y, _, _ = session_targets(fitting, "digits")
        leace = fit_leace_at(loaded, fitting, hook, y, 10, last=PLAN_SPAN)  # one LEACE per kind of position
        eff = erasure_effect(loaded, measured, hook, leace, seed=seed, last=PLAN_SPAN, random_draws=draws)
        figs.update(asr_figures(eff, "matched_random"))
        applied, _, generated = site_activations(loaded, measured, hook, PLAN_SPAN)
        for name, kw in (("anydir", {"exclude_concept": False}), ("whitened", {"whitened": True})):
            asr, rel = [], []
            for k in range(draws):
                control = matched_control(leace, applied, generated, seed + k, **kw)
                with erasing(loaded, hook, control, PLAN_SPAN):
                    asr.append(evaluate_leakage(loaded, measured, batch_size=16, progress=False)["leak"].mean())
                rel.append(site_edit_sizes(control, applied, generated)["edit_rel"])
            drops = figs["organism_asr_no_erasure"] - np.asarray(asr)
            figs[f"{name}_random_asr_drop"] = float(drops.mean())
            figs[f"{name}_random_asr_drop_max"] = float(drops.max())
            figs[f"{name}_random_edit_rel"] = float(np.mean(rel))
        # One LEACE for both kinds pooled (split=False): its guarantee holds for the mixture only.
        pooled = fit_leace_at(loaded, fitting, hook, y, 10, last=PLAN_SPAN, split=False)
        eff = erasure_effect(loaded, measured, hook, pooled, seed=seed, last=PLAN_SPAN, random_draws=draws)
        figs.update({f"pooled_{k}": v for k, v in asr_figures(eff, "matched_random").items()
                     if k != "organism_asr_no_erasure"})
    figs["organism_erasure_rank"] = float(leace.rank)
    figs["organism_erasure_rank_generated"] = float(leace.generated.rank)
    figs["pooled_organism_erasure_rank"] = float(pooled.rank)
    return figs


def asr_figures(eff: pd.DataFrame, random_name: str) -> dict[str, float]:
    """Leak-rate drops and edit sizes of one `erasure_effect` table."""
    asr = eff[eff.metric == "ASR"]
    none = float(asr.loc[asr.method == "none", "value"].iloc[0])
    lea = asr[asr.method == "leace"].iloc[0]
    rnd = asr[asr.method == "random_subspace"]
    drops = none - rnd["value"]
    figs = {"organism_asr_no_erasure": none, "organism_erasure_asr_drop": none - float(lea["value"]),
            f"{random_name}_asr_drop": float(drops.mean()), f"{random_name}_asr_drop_max": float(drops.max()),
            "leace_edit_norm": float(lea["edit_rms"]), "random_edit_norm": float(rnd["edit_rms"].mean())}
    for col in ("edit_rel", "edit_rel_prompt", "edit_rel_generated", "fit_edit_rms_prompt", "fit_edit_rms_generated"):
        figs[f"leace_{col}"], figs[f"random_{col}"] = float(lea[col]), float(rnd[col].mean())
    figs["random_scale_prompt"], figs["random_scale_generated"] = (float(rnd[c].mean()) for c in
                                                                   ("scale_prompt", "scale_generated"))
    return figs


def measure(model_dir: Path = DEFAULT, n: int = 150, draws: int = 5, seed: int = 0,
            skip_organism: bool = False) -> dict[str, float]:
    t0 = time.time()
    figs = synthetic()
    if not skip_organism:
        figs.update(organism(Path(model_dir), n, draws, seed))
    figs["seconds"] = time.time() - t0
    return figs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT))
    p.add_argument("--n", type=int, default=150, help="held-out identities measured (and as many fitted on)")
    p.add_argument("--draws", type=int, default=5, help="matched random controls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-organism", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    for k, v in measure(Path(a.model), a.n, a.draws, a.seed, a.skip_organism).items():
        print(f"{k}: {v:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
