"""Patching validity (issue 16): does the patching metric see the value, and does AtP agree with exact patching on
effects? Measured on the embedded organism (probes/organism/default) with the default study's sessions.

    python benchmarks/validity_patching.py [--pairs 24] [--threads 2]

The data is the default study's (analysis/studies/default.yaml, built by `analysis.study.pipeline.build_sessions`): its
MM-Privacy sessions under the 'caption' framing (the patching stage's framing), the first `--pairs` of them (the
stage's max_pairs, 24: 8 SSN, 8 phone, 8 email), each paired with the same document showing another identity's
value (corruption "image", the identity `patch_sessions` picks). Cells: the study's components (resid_pre,
attn_out, mlp_out) x every layer x the default position groups; directions denoise and noise.

    image_pair_metric_separation       share of the image pairs whose logit_diff (contrast value_vs_value: the clean
                                       value's token vs the corrupt value's, at the first token where they differ)
                                       separates clean from corrupt by MIN_SEPARATION (1 nat). Target >= 0.95.
    image_pair_metric_separation_old   the same for the old metric (the value's first token vs ' cannot', whatever
                                       the value: the organism writes ' ' first)
    image_pair_separation_median, image_pair_separation_old_median   median clean - corrupt (nats)
    framing_pair_metric_separation     the same for task-swap pairs (caption vs direct; answer_vs_refusal)
    framing_pair_metric_separation_old
    organism_atp_effect_spearman       AtP vs exact patching on effects (patched - base), Spearman over the cells
                                       of each pair (cells null by construction left out), mean over the kept pairs,
                                       denoising, logit_diff. Target >= 0.8.
    organism_atp_effect_spearman_median, organism_atp_effect_spearman_noise
    organism_atp_top10_recall          share of exact patching's 10 cells of largest |effect| among AtP's 10
                                       largest, per pair, mean (denoising). Target >= 0.7.
    organism_atp_top10_recall_noise
    organism_atp_abs_spearman          Spearman on |effect| (the scale GradDrop can be compared on), denoising
    organism_graddrop_abs_spearman, organism_graddrop_top10_recall   AtP* GradDrop (unsigned) on the same pairs
    graddrop_adds_abs_spearman, graddrop_adds_top10_recall           GradDrop minus plain AtP (what it adds)
    organism_atp_qk_effect_spearman(_median, _noise), organism_atp_qk_top10_recall(_noise),
    organism_atp_qk_abs_spearman       AtP with AtP*'s attention-saturation (QK) correction (probes/patching/
                                       atp_star.py: the first attention pattern the patched residual stream feeds
                                       recomputed exactly, the rest linear); signed, so also on signed effects
    qk_adds_effect_spearman, qk_adds_abs_spearman, qk_adds_top10_recall   QK-corrected minus plain AtP
    organism_atp_layer_effect_spearman(_median, _noise), organism_atp_layer_top10_recall(_noise)
                                       the same replays, the first layer the patch feeds replayed WHOLE (pattern,
                                       values, MLP), the rest linear (probes/patching/atp_star.py: 'atp_layer')
    layer_adds_effect_spearman, layer_adds_top10_recall   layer-exact minus plain AtP
    organism_atp_star_abs_spearman, organism_atp_star_top10_recall(_noise)   the full AtP* (QK correction and
                                       GradDrop; unsigned like GradDrop, so on |effect| only)
    star_adds_abs_spearman, star_adds_top10_recall       full AtP* minus plain AtP
    qk_adds_to_graddrop_abs_spearman, qk_adds_to_graddrop_top10_recall   full AtP* minus GradDrop alone (what the
                                       QK correction adds once GradDrop is on)
    n_image_pairs, n_kept_pairs, n_cells_per_pair
    seconds_exact_per_pair (both directions, given the prepared runs), seconds_atp_per_pair (forwards, backwards
    and estimates), seconds_graddrop_per_pair (the extra L forwards and backwards per side), seconds_qk_per_pair
    (prepare_qk of both sides and the estimates, both directions; atp_qk and atp_layer), seconds_star_per_pair
    (the same with GradDrop)
    seconds_total (the whole benchmark, model loading included)

Every figure is reported as measured: none of the estimators has a setting tuned on these pairs.
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

from probes.patching import (  # noqa: E402
    atp_agreement,
    attribution_patching,
    build_pair,
    default_groups,
    exact_patching,
    graddrop_patching,
    make_run,
    other_identities,
    pair_check,
    pick_other,
    prepare,
    prepare_graddrop,
    prepare_pair,
    session_identity,
    sweep_cells,
)
from probes.patching.atp_star import prepare_qk, qk_estimates, qk_rows  # noqa: E402
from probes.patching.config import MIN_SEPARATION  # noqa: E402
from probes.patching.metrics import make_answer  # noqa: E402

COMPONENTS = ("resid_pre", "attn_out", "mlp_out")  # the default study's


def study_sessions(work: Path, n_pairs: int):
    """The default study's MM-Privacy sessions under the patching stage's framing (caption), first `n_pairs`."""
    from analysis.study.config import default_config_path, load_study_config
    from analysis.study.pipeline import build_sessions
    from probes.data.session import read_sessions

    cfg = load_study_config(default_config_path())
    build_sessions(cfg, work)
    framings = cfg.section("patching")["framings"]
    single = [s for s in read_sessions(work / "mmprivacy.jsonl") if s.labels.get("framing") in framings]
    return single[:n_pairs]


def old_separation(loaded, pair) -> float:
    """clean - corrupt logit_diff of the old metric (the value vs ' cannot assist') on the pair's two inputs."""
    old = make_answer(loaded.adapter, pair.clean.session)
    runs = [prepare(loaded, make_run(loaded, side.session, old, [], None), old) for side in (pair.clean, pair.corrupt)]
    return runs[0].metrics["logit_diff"] - runs[1].metrics["logit_diff"]


def measure(n_pairs: int = 24, seed: int = 0) -> dict[str, float]:
    from probes.models.loading import load_model
    from probes.organism import DEFAULT_MODEL

    loaded = load_model(str(DEFAULT_MODEL))
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = study_sessions(Path(tmp), n_pairs)
        pool = other_identities(sessions, seed)
        rows, seps, seps_old, fr, fr_old = [], [], [], [], []
        t_exact = t_atp = t_gd = t_qk = t_star = 0.0
        for s in sessions:
            other = pick_other(session_identity(s), pool, (s.labels["pii_type"],))
            pair = build_pair(loaded, s, "image", other=other)
            cells = sweep_cells(loaded.n_layers, COMPONENTS, default_groups([pair]))
            hooks = sorted({c.hook for c in cells})
            t0 = time.perf_counter()
            prepare_pair(loaded, pair, hooks, grad={"clean", "corrupt"})
            check = pair_check(pair)
            seps.append(check["separation"])
            seps_old.append(old_separation(loaded, pair))
            fp = build_pair(loaded, s, "framing")
            prepare_pair(loaded, fp)
            fr.append(pair_check(fp)["separation"])
            fo = build_pair(loaded, s, "framing", leak=str(s.labels["_target"]), refusal="cannot assist")
            prepare_pair(loaded, fo)
            fr_old.append(pair_check(fo)["separation"])
            if not check["kept"]:
                continue
            head = {"model": "organism", "session_id": s.session_id}
            for d in ("denoise", "noise"):
                rows += [{**head, **r} for r in attribution_patching(pair, cells, d)]
            t2 = time.perf_counter()
            for side in (pair.clean, pair.corrupt):
                prepare_graddrop(loaded, side, pair.answer, hooks)
            for d in ("denoise", "noise"):
                rows += [{**head, **r} for r in graddrop_patching(pair, cells, d)]
            t3 = time.perf_counter()
            for d in ("denoise", "noise"):
                rows += [{**head, **r} for r in exact_patching(loaded, pair, cells, d)]
            t4 = time.perf_counter()
            for d, base in (("denoise", pair.corrupt), ("noise", pair.clean)):
                found = qk_estimates(loaded, prepare_qk(loaded, base, pair.answer), pair, cells, d)
                rows += [{**head, **r} for r in qk_rows(found, pair, cells, d)]
                rows += [{**head, **r} for r in qk_rows(found, pair, cells, d, "atp_layer")]
            t5 = time.perf_counter()
            for d, base in (("denoise", pair.corrupt), ("noise", pair.clean)):
                prep = prepare_qk(loaded, base, pair.answer, graddrop=True)  # its plain variant is prepare_qk's
                found = qk_estimates(loaded, prep, pair, cells, d)
                rows += [{**head, **r} for r in qk_rows(found, pair, cells, d, "atp_star")]
            t6 = time.perf_counter()
            t_atp += t2 - t0  # both sides' forwards and backwards, and the estimates
            t_gd += t3 - t2
            t_exact += t4 - t3
            t_qk += t5 - t4
            t_star += t6 - t5
            n_cells = len(cells)
    seps, seps_old = np.array(seps), np.array(seps_old)
    out["image_pair_metric_separation"] = float((seps >= MIN_SEPARATION).mean())
    out["image_pair_metric_separation_old"] = float((seps_old >= MIN_SEPARATION).mean())
    out["image_pair_separation_median"] = float(np.median(seps))
    out["image_pair_separation_old_median"] = float(np.median(seps_old))
    out["framing_pair_metric_separation"] = float((np.array(fr) >= MIN_SEPARATION).mean())
    out["framing_pair_metric_separation_old"] = float((np.array(fr_old) >= MIN_SEPARATION).mean())
    agree = atp_agreement(pd.DataFrame(rows))

    def get(method: str, direction: str, col: str, scope: str = "mean") -> float:
        a = agree[(agree["method"] == method) & (agree["direction"] == direction) & (agree["scope"] == scope)
                  & (agree["metric"] == "logit_diff")]
        return float(a[col].iloc[0])

    out["organism_atp_effect_spearman"] = get("atp", "denoise", "spearman")
    out["organism_atp_effect_spearman_median"] = get("atp", "denoise", "spearman", "median")
    out["organism_atp_effect_spearman_noise"] = get("atp", "noise", "spearman")
    out["organism_atp_top10_recall"] = get("atp", "denoise", "top_k_recall")
    out["organism_atp_top10_recall_noise"] = get("atp", "noise", "top_k_recall")
    out["organism_atp_abs_spearman"] = get("atp", "denoise", "spearman_abs")
    out["organism_graddrop_abs_spearman"] = get("atp_graddrop", "denoise", "spearman_abs")
    out["organism_graddrop_top10_recall"] = get("atp_graddrop", "denoise", "top_k_recall")
    out["graddrop_adds_abs_spearman"] = out["organism_graddrop_abs_spearman"] - out["organism_atp_abs_spearman"]
    out["graddrop_adds_top10_recall"] = out["organism_graddrop_top10_recall"] - out["organism_atp_top10_recall"]
    out["organism_atp_qk_effect_spearman"] = get("atp_qk", "denoise", "spearman")
    out["organism_atp_qk_effect_spearman_median"] = get("atp_qk", "denoise", "spearman", "median")
    out["organism_atp_qk_effect_spearman_noise"] = get("atp_qk", "noise", "spearman")
    out["organism_atp_qk_top10_recall"] = get("atp_qk", "denoise", "top_k_recall")
    out["organism_atp_qk_top10_recall_noise"] = get("atp_qk", "noise", "top_k_recall")
    out["organism_atp_qk_abs_spearman"] = get("atp_qk", "denoise", "spearman_abs")
    out["qk_adds_effect_spearman"] = out["organism_atp_qk_effect_spearman"] - out["organism_atp_effect_spearman"]
    out["qk_adds_abs_spearman"] = out["organism_atp_qk_abs_spearman"] - out["organism_atp_abs_spearman"]
    out["qk_adds_top10_recall"] = out["organism_atp_qk_top10_recall"] - out["organism_atp_top10_recall"]
    out["organism_atp_layer_effect_spearman"] = get("atp_layer", "denoise", "spearman")
    out["organism_atp_layer_effect_spearman_median"] = get("atp_layer", "denoise", "spearman", "median")
    out["organism_atp_layer_effect_spearman_noise"] = get("atp_layer", "noise", "spearman")
    out["organism_atp_layer_top10_recall"] = get("atp_layer", "denoise", "top_k_recall")
    out["organism_atp_layer_top10_recall_noise"] = get("atp_layer", "noise", "top_k_recall")
    out["layer_adds_effect_spearman"] = out["organism_atp_layer_effect_spearman"] - out["organism_atp_effect_spearman"]
    out["layer_adds_top10_recall"] = out["organism_atp_layer_top10_recall"] - out["organism_atp_top10_recall"]
    # atp_star is unsigned (GradDrop sums |.|): its signed 'spearman' column is not read
    out["organism_atp_star_abs_spearman"] = get("atp_star", "denoise", "spearman_abs")
    out["organism_atp_star_top10_recall"] = get("atp_star", "denoise", "top_k_recall")
    out["organism_atp_star_top10_recall_noise"] = get("atp_star", "noise", "top_k_recall")
    out["star_adds_abs_spearman"] = out["organism_atp_star_abs_spearman"] - out["organism_atp_abs_spearman"]
    out["star_adds_top10_recall"] = out["organism_atp_star_top10_recall"] - out["organism_atp_top10_recall"]
    out["qk_adds_to_graddrop_abs_spearman"] = (out["organism_atp_star_abs_spearman"]
                                               - out["organism_graddrop_abs_spearman"])
    out["qk_adds_to_graddrop_top10_recall"] = (out["organism_atp_star_top10_recall"]
                                               - out["organism_graddrop_top10_recall"])
    kept = int((seps >= MIN_SEPARATION).sum())
    out["n_image_pairs"] = len(seps)
    out["n_kept_pairs"] = kept
    out["n_cells_per_pair"] = n_cells
    out["seconds_exact_per_pair"] = t_exact / max(kept, 1)
    out["seconds_atp_per_pair"] = t_atp / max(kept, 1)
    out["seconds_graddrop_per_pair"] = t_gd / max(kept, 1)
    out["seconds_qk_per_pair"] = t_qk / max(kept, 1)
    out["seconds_star_per_pair"] = t_star / max(kept, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = measure(args.pairs)
    out["seconds_total"] = time.perf_counter() - t0
    for name, value in out.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}", flush=True)


if __name__ == "__main__":
    main()
