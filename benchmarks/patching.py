"""Patching cost, measured side by side in one run; prints `name: value` lines. Also the organism's figures.

Model: a random-initialised LLaVA of benchmarks/capture.py's SIZE (8 LM layers, d_model 256, 96 px / patch 8 =
144 image tokens), one image pair (a 96 px form and the same form with another SSN) in a session of three
messages (user, assistant, user), 6 position groups x 3 components (resid_pre, attn_out, mlp_out) x 8 layers = 144
cells. Times are medians of interleaved repeats, each sweep from the pair's rendering to its rows (both sides'
forwards included).

    exact_sweep_ms            exact patching of every cell, `--batch` cells per forward
    atp_sweep_ms              attribution patching of the same cells (2 forwards, 1 backward per metric)
    atp_vs_exact_cost         atp_sweep / exact_sweep (target <= 0.1)
    serial_sweep_ms           exact patching, one cell per forward (the same inputs-embeddings path)
    batched_vs_serial_exact   serial_sweep / exact_sweep (target >= 3)
    naive_sweep_ms            one full forward per cell, pixels and vision tower included (what a per-config
                              hooked run does)
    batched_vs_naive_exact    naive_sweep / exact_sweep
    exact_variants_max_abs_diff  the largest logit-difference gap between the batched, serial and naive sweeps
                              (asserted < 1e-3: the three timings compare the same work)
    atp_effect_spearman_<metric>  Spearman of AtP with exact patching on effects (patched - base) over this pair's
                              cells (denoising; cells null by construction left out)
    forward_ms_per_row_b<B>   one unpatched inputs-embeddings forward of B rows, per row: whether a batch
                              amortises anything on this device (a compute-bound CPU: no)

Batches of cells share one forward but not its arithmetic: on a CPU that one row already keeps busy, a batch
costs what its rows cost one by one. What saves compute in both is the KV-cache prefix (`patched_metrics`): a
cell patching only late positions (later turns, the final token) runs just the suffix after them.

`python benchmarks/patching.py --organism DIR --out OUT` instead runs every experiment of `probes.patching` on
the organism (a trained model directory, `probes/organism/default` once trained) and writes its CSVs and figures:
see `organism_figures`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from analysis.results import run_patching
from probes import build_tiny_model, load_model, make_identities  # noqa: E402
from probes.data.builders import mmprivacy_sessions, multiturn_sessions  # noqa: E402
from probes.patching import (  # noqa: E402
    atp_agreement,
    attribution_patching,
    build_pair,
    exact_patching,
    patched_metrics,
    prepare_pair,
    sweep_cells,
)
from probes.patching.metrics import answer_metrics  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved  # noqa: E402  (benchmarks/timing.py)

SIZE = dict(n_layers=8, d_model=256, image_size=96, patch_size=8, vision_layers=2, d_vision=64, n_heads=8)
GROUPS = ("pii_patches", "other_image", "turn0", "turn1", "turn2", "final")
COMPONENTS = ("resid_pre", "attn_out", "mlp_out")


def naive_sweep(loaded, pair, cells) -> list[float]:
    """One hooked full forward per cell (ids + pixels), as a per-configuration run would do it; the logit
    difference of each cell."""
    base, source = pair.roles("denoise")
    kw = {"input_ids": base.ids, "use_cache": False, "logits_to_keep": pair.answer.n_logits,
          **base.rendered.image_inputs(loaded.adapter, range(len(base.rendered.images)))}
    kw = {k: v.to(loaded.device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out_ld = []
    for c in cells:
        pos = torch.as_tensor(base.group(c.group), device=loaded.device)
        vals = source.cache[c.hook][pos]

        def put(x, name, pos=pos, vals=vals):
            x = x.clone()
            x[0, pos] = vals
            return x
        with torch.no_grad(), loaded.hooks([(c.hook, put)]):
            out = loaded.hf_model(**kw)
        out_ld.append(float(answer_metrics(out.logits, pair.answer)["logit_diff"][0]))
    return out_ld


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16, help="cells per batched forward")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default=None, help="e.g. cuda (default: CPU)")
    ap.add_argument("--organism", default=None, help="a trained model directory: write its patching figures")
    ap.add_argument("--out", default="results/patching_organism", help="output directory for --organism")
    ap.add_argument("--n", type=int, default=24, help="identities (= pairs) for --organism")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.organism:
        organism_figures(args.organism, args.out, n=args.n)
        return
    torch.manual_seed(0)
    scratch = tempfile.TemporaryDirectory(prefix="mmret-bench-")  # removed when main returns
    tmp = Path(scratch.name)
    loaded = load_model(build_tiny_model("llava", tmp / "llava8", **SIZE), device=args.device)
    people = make_identities(2, seed=0)
    session = multiturn_sessions(people[:1], tmp / "img", k_distractors=[0], reshow=[False],
                                 framing_pairs=[("direct", "caption")], pii_types=["SSN"], scenarios=["open"],
                                 size=96)[0]
    pair = build_pair(loaded, session, "image", other=people[1])
    cells = sweep_cells(loaded.n_layers, COMPONENTS, GROUPS)
    hooks = sorted({c.hook for c in cells})
    print(f"# model: llava, 8 layers, d_model 256; one pair, {pair.clean.n} positions "
          f"({len(pair.clean.group('segment:image'))} image tokens, {len(pair.clean.groups['pii_patches'])} PII "
          f"patches); {len(cells)} cells = {len(GROUPS)} groups x {len(COMPONENTS)} components x 8 layers; "
          f"threads {torch.get_num_threads()}, batch {args.batch}, device {loaded.device}")

    def fresh():
        return build_pair(loaded, session, "image", other=people[1])

    def exact(batch: int):
        p = prepare_pair(loaded, fresh(), hooks)
        return exact_patching(loaded, p, cells, "denoise", batch_size=batch)

    def atp():
        p = prepare_pair(loaded, fresh(), hooks, grad={"corrupt"})
        return attribution_patching(p, cells, "denoise")

    def naive():
        return naive_sweep(loaded, prepare_pair(loaded, fresh(), hooks), cells)

    t = interleaved({"exact": lambda: exact(args.batch), "atp": atp, "serial": lambda: exact(1), "naive": naive},
                    args.repeats)
    print(f"exact_sweep_ms: {1000 * t['exact']:.1f}")
    print(f"atp_sweep_ms: {1000 * t['atp']:.1f}")
    print(f"atp_vs_exact_cost: {t['atp'] / t['exact']:.3f}")
    print(f"serial_sweep_ms: {1000 * t['serial']:.1f}")
    print(f"batched_vs_serial_exact: {t['serial'] / t['exact']:.2f}")
    print(f"naive_sweep_ms: {1000 * t['naive']:.1f}")
    print(f"batched_vs_naive_exact: {t['naive'] / t['exact']:.2f}")
    # The three exact variants compute the same numbers (else their times would not compare the same work).
    def logit_diffs(rows):
        return np.array([r["value"] for r in rows if r["metric"] == "logit_diff"])
    batched = logit_diffs(exact(args.batch))
    differ = max(np.abs(batched - logit_diffs(exact(1))).max(), np.abs(batched - np.array(naive())).max())
    print(f"exact_variants_max_abs_diff: {differ:.1e}")
    assert differ < 1e-3, differ
    base = prepare_pair(loaded, fresh(), hooks).corrupt
    sizes = sorted({1, 4, args.batch})
    fwd = interleaved({b: lambda b=b: patched_metrics(loaded, base, pair.answer, [[]] * b, batch_size=b, prefix=False)
                       for b in sizes}, args.repeats)
    for b in sizes:
        print(f"forward_ms_per_row_b{b}: {1000 * fwd[b] / b:.1f}")
    head = {"model": "bench", "session_id": session.session_id}
    rows = [{**head, **r} for r in exact(args.batch) + atp()]
    agree = atp_agreement(pd.DataFrame(rows))
    for _, r in agree[(agree["scope"] == "mean") & (agree["direction"] == "denoise")].iterrows():
        print(f"atp_effect_spearman_{r['metric']}: {r['spearman']:.3f}")


# ---- the organism ---------------------------------------------------------------------------------------------
def organism_sessions(model_dir: str | os.PathLike, image_dir: str | os.PathLike, n: int = 8, seed: int = 0):
    """Held-out identities' sessions in the organism's own document layout and size: single-turn MM-Privacy under
    the leaking 'caption' framing (pairs for image patching and task swap) and two-turn sessions (knockout)."""
    from probes.organism.evaluate import training_meta

    meta = training_meta(model_dir)
    size = int(meta["config"]["image_size"])
    layout = meta["config"].get("layout", "fixed")
    people = make_identities(n, seed=60_000 + seed)  # a pool neither training nor `measure` draws from
    mmp = mmprivacy_sessions(people, image_dir, framings=("caption",), size=size, layout=layout, design="cycle")
    multi = multiturn_sessions(people, image_dir, k_distractors=[1], reshow=[False],
                               framing_pairs=[("direct", "caption")], size=size, layout=layout, design="cycle")
    return mmp, multi


def organism_figures(model_dir: str | os.PathLike, out_dir: str | os.PathLike, n: int = 24, seed: int = 0,
                     experiments=("denoise", "noise", "atp", "taskswap", "knockout"), batch_size: int = 16,
                     n_boot: int = 1000) -> dict[str, pd.DataFrame]:
    """Every patching experiment on the organism at `model_dir`, each into `out_dir/<experiment>/` (CSV rows,
    summary, figures), then issue 6's headline figures (`organism_headlines`); returns the rows by experiment."""
    loaded = load_model(model_dir)
    out: dict[str, pd.DataFrame] = {}
    with tempfile.TemporaryDirectory() as tmp:
        mmp, multi = organism_sessions(model_dir, tmp, n, seed)
        for exp in experiments:
            sessions = multi if exp == "knockout" else mmp
            out[exp] = run_patching(loaded, sessions, exp, Path(out_dir) / exp, batch_size=batch_size,
                                    n_boot=n_boot, seed=seed, progress=True)
            print(f"{exp}: {len(out[exp])} rows -> {Path(out_dir) / exp}")
        if {"atp", "taskswap"} <= set(out):
            organism_headlines(loaded, out, mmp, Path(out_dir))
    return out


def organism_headlines(loaded, rows: dict[str, pd.DataFrame], sessions, out_dir: Path) -> None:
    """organism_atp_effect_spearman and organism_atp_top10_recall (AtP vs exact on effects per pair, mean over
    pairs, denoising, logit difference);
    organism_taskswap_max_effect (the largest mean normalised score of one task-swap cell, leaking framing
    patched into the refusing one) and the cell; organism_generation_asr_shift (greedy answers of the refusing
    framing with that cell's layer patched at the same positions, every component there: patched - unpatched ASR)."""
    from probes.patching import Cell, asr_shift, atp_agreement, generation_check

    agree = atp_agreement(rows["atp"])
    mean = agree[(agree["scope"] == "mean") & (agree["direction"] == "denoise") & (agree["metric"] == "logit_diff")
                 & (agree["method"] == "atp")]
    n_pairs = int(mean["n_pairs"].iloc[0])
    print(f"organism_atp_effect_spearman: {float(mean['spearman'].iloc[0]):.3f}  # mean over {n_pairs} pairs")
    print(f"organism_atp_top10_recall: {float(mean['top_k_recall'].iloc[0]):.3f}")
    swap, cell = rows["taskswap"], ["layer", "component", "position_group"]

    def per_cell(direction: str, metric: str):
        return swap[(swap["direction"] == direction) & (swap["metric"] == metric)].groupby(cell)

    def top(name: str, by_cell: pd.Series):  # print the largest cell's value; return that cell
        (layer, component, group), best = by_cell.idxmax(), float(by_cell.max())
        print(f"{name}: {best:.3f}  # layer {layer} {component} at {group}")
        return layer, component, group

    layer, component, group = top("organism_taskswap_max_effect",
                                  per_cell("denoise", "score_logit_diff")["value"].mean())
    # The same map read two more ways. Pooled: one ratio of summed changes per cell, which a pair whose clean and
    # corrupt runs nearly agree (a span of a fraction of a logit) cannot blow up as it does a mean of ratios.
    # Back: the refusing framing patched into the leaking one (noising), effect = 1 - score.
    ld = swap.assign(num=swap["value"] - swap["corrupt"], den=swap["clean"] - swap["corrupt"])
    sums = ld[(ld["direction"] == "denoise") & (ld["metric"] == "logit_diff")].groupby(cell)[["num", "den"]].sum()
    top("organism_taskswap_max_effect_pooled", sums["num"] / sums["den"])
    top("organism_taskswap_max_effect_back", 1 - per_cell("noise", "score_logit_diff")["value"].mean())
    # That cell alone, patched while the refusing framing's prompt is read; the answer is then generated freely.
    check = generation_check(loaded, sessions, [Cell(int(layer), component, group)], progress=False)
    check.to_csv(out_dir / "generation_check.csv", index=False)
    asr, rr = check.groupby("condition")["leak"].mean(), check.groupby("condition")["refused"].mean()
    print(f"organism_generation_asr_shift: {asr_shift(check):.3f}  # refusing framing ASR "
          f"{asr.get('unpatched', float('nan')):.2f} -> {asr.get('patched', float('nan')):.2f}")
    print(f"organism_generation_rr_shift: {rr.get('patched', float('nan')) - rr.get('unpatched', float('nan')):.3f}"
          f"  # refusal rate {rr.get('unpatched', float('nan')):.2f} -> {rr.get('patched', float('nan')):.2f}")


if __name__ == "__main__":
    main()
