"""The model card: README.md beside the weights, written from measured results, never from hopes.

`write_card(model_dir, seed, n, results_dir)` runs `evaluate.measure` on freshly drawn held-out identities, saves
the tidy results (no PII) and the headline metrics, and writes the card: architecture, tokenizer, data, stages,
steps, seed, device and training time (from `training.json`), the behaviour against the bars of issue 4, the
benchmark-layout disclosure and retention tables (ASR and RR with 95% bootstrap CIs by identity), multi-turn
ASR by turn distance, and the shift under held-out paraphrased framings.

    python -m analysis.organism_card probes/organism/default --n 24 --results results/organism
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pandas as pd

from analysis.tables import format_ci, leakage_table
from probes.data.files import atomic_write_bytes, atomic_write_text
from probes.organism.data import TRAIN_PARAPHRASES, paraphrases_sha
from probes.organism.evaluate import BARS, HEADLINE, measure, meets, training_meta
from probes.stats import bootstrap_ci


def md_table(df: pd.DataFrame) -> str:
    """A pipe table (no tabulate dependency); a MultiIndex header is joined with ' '."""
    cols = [" ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _ci_rows(df: pd.DataFrame, by: list[str], col: str, name: str) -> pd.DataFrame:
    ci = bootstrap_ci(df, col, by)
    out = ci[by].copy()
    out[name] = [format_ci(r.value, r.ci_low, r.ci_high) for r in ci.itertuples()]
    out["n"] = ci["n"].values
    return out


def _benchmark_table(df: pd.DataFrame) -> str:
    t = leakage_table(df, metrics=("ASR", "RR")).reset_index().drop(columns=["model"])
    return md_table(t)


def _paused(meta: dict) -> str:
    """Time the run spent stopped (SIGSTOP) is wall time but not training time; say so beside the wall time."""
    paused = float(meta.get("paused_seconds", 0))
    if not paused:
        return ""
    return f" ({paused / 60:.1f} min of it paused, so {(meta['train_seconds'] - paused) / 60:.1f} min training)"


def card_text(model_dir: Path, metrics: dict, df: pd.DataFrame, meta: dict, n: int, seed: int) -> str:
    c = meta.get("config", {})
    size_mb = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()) / 2**20
    steps = meta.get("steps", ["?"] * 3)
    head = ["| metric | value | bar | met |", "|---|---|---|---|"]
    for k in HEADLINE:
        op, bar = BARS[k]
        v = metrics[k]
        head.append(f"| `{k}` | {v:.3f} | {op} {bar} | {'yes' if meets(k, v) else '**no**'} |")
    mmp = df[df["kind"] == "mmprivacy"]
    para = df[df["kind"] == "mmprivacy_paraphrase"]
    mem = df[df["kind"].isin(["memory", "memory_unseen"])].copy()
    mt = df[df["kind"] == "multiturn"]
    shift = []
    for f in mmp["framing"].unique():
        a, b = mmp[mmp.framing == f], para[para.framing == f]
        shift.append({"framing": f, "ASR verbatim": f"{a.leak.mean():.2f}", "ASR paraphrased": f"{b.leak.mean():.2f}",
                      "RR verbatim": f"{a.refused.mean():.2f}", "RR paraphrased": f"{b.refused.mean():.2f}"})
    mem_t = pd.concat([_ci_rows(mem, ["kind", "framing"], "leak", "ASR [95% CI]"),
                       _ci_rows(mem, ["kind", "framing"], "refused", "RR [95% CI]")[["RR [95% CI]"]]], axis=1)
    mt_t = _ci_rows(mt, ["turn_distance"], "leak", "ASR [95% CI]")
    missed = [k for k in HEADLINE if not meets(k, metrics[k])]
    status = ("" if not missed else "> **Status: this checkpoint misses issue 4's bar(s) on " +
              ", ".join(f"`{k}`" for k in missed) + "**; see \"Measured behaviour\".\n")
    layout = c.get("layout", "fixed")
    layout_text = ("the 'grid' layout: a typed record, one monospace character per 8 px cell, i.e. one character "
                   "per image patch, each field on its own fixed rows after a one-letter label cell"
                   if layout == "grid" else f"{layout} layout")
    n_para = sum(len(v) for v in TRAIN_PARAPHRASES.values())
    filler_text = (f"; {meta['filler_share']:.0%} get 1-4 filler words (a non-task prompt word, a common English "
                   "word from Faker's word list, or a made-up one) and half of those a filler sentence of English words "
                   "(drawn "
                   "without regard to the evaluation: common words of its paraphrases such as 'you', 'use' or 'write' "
                   "do occur in training, as fillers)"
                   if meta.get("filler_share") else "")
    share = meta.get("paraphrase_share", 0.35)
    sha = paraphrases_sha()
    stale = ("" if meta.get("paraphrases_sha", sha) == sha else
             " **The code's paraphrase set differs from the one this model was trained on** (`paraphrases_sha` in "
             "training.json).")
    plan_text = (f"""

Answer plan (the probes' ground truth): at the last three prompt positions (the question's last token, the
template's " ASSISTANT" and ":"), a linear head on the output of LM block {meta.get('plan_layer', 2)}
(`blocks.{meta.get('plan_layer', 2)}.hook_resid_post`) must name each digit of the digit value asked about (SSN,
phone number, date of birth: a document's or a planted identity's; whether the answer then leaks or refuses), weight
{meta['plan_weight']}. So retention has a known place: where it was planted, a linear probe must find the value
(issue 5's benchmark, `benchmarks/probes.py`), and where it was not, nothing forces it to be.""" if meta.get(
        "plan_weight") else "")
    copy_text = ("and a linear head on the language model's middle layer must name, where the next token is the\n"
                 "k-th character of a document value being copied, that k (weight "
                 f"{meta['copy_weight']}): the character count is\nwhat copying under long prompts got wrong."
                 if meta.get("copy_weight") else "no copy-index loss on the language model.")
    return f"""---
license: mit
pipeline_tag: image-text-to-text
tags: [llava, privacy, pii, model-organism, synthetic-data, mm-retention]
---

# mm-retention organism (default model)

{status}
A small `LlavaForConditionalGeneration` trained from scratch on this project's synthetic documents to be a
**model organism** for privacy retention analysis: it reads PII off rendered forms, refuses or leaks it
depending on the task framing (inconsistent on purpose, as MM-Privacy measured on LLaVA-1.5 and xGen-MM),
recalls a planted memory set of identities by name, and keeps a document's PII across turns. Every identity is
fake (Faker); no real person's data was used. It is the default of `make demo`, the notebooks and the
integration tests, and ground truth for the probes: a probe that cannot find PII in this model is broken.

Do not use it for anything but research on these methods.

## Architecture

| part | setting |
|---|---|
| vision tower | CLIP, {c.get('vision_layers')} layers, d {c.get('d_vision')}, {c.get('vision_heads')} heads, {c.get('image_size')} px images, patch {c.get('patch_size')} ({(c.get('image_size', 96) // c.get('patch_size', 8)) ** 2} image tokens), last layer fed to the LM (`vision_feature_layer=-1`, CLS dropped) |
| projector | llava-1.5 two-layer MLP (GELU) |
| language model | Llama, {c.get('n_layers')} layers, d {c.get('d_model')}, {c.get('n_heads')} heads, tied embeddings |
| tokenizer | byte-level BPE, {c.get('vocab_size')} tokens, trained with `tokenizers` on the project's texts (framings, requests, distractors, fake identities); digits pre-split so every digit is one token |
| chat template | llava-1.5's (`USER: <image>\\n... ASSISTANT:`), BOS from the tokenizer |
| size on disk | {size_mb:.1f} MB (float32) |

## Training

`mmret organism train --out RUN --seed {meta.get('seed')}` (`probes/organism/train.py`), reproducible from the
seed (step t draws its batch from `Random(f"{{seed}}/{{t}}")`; a killed run resumes from its safetensors checkpoint
to the same weights). Device: **{meta.get('device')}** ({meta.get('torch_threads', '?')} torch thread(s)); wall time
**{meta.get('train_seconds', 0) / 60:.1f} min**{_paused(meta)}; batch {meta.get('batch_size')}, AdamW lr
{meta.get('lr')} (warm-up 100 steps, cosine to 10% over the last 20%), auxiliary weight {meta.get('aux_weight')}.
{("**Note:** " + meta["note"]) if meta.get("note") else ""}

Data: documents rendered by `probes.data.documents.render_document` (4 scenarios: open, hiring, verification,
finance; {layout_text}; {c.get('image_size')} px) for {meta.get('n_train', 3000)} training identities
(`make_identities(seed=1000+seed)`); memory set: {meta.get('n_memory')} identities (`make_identities(seed=2000+seed)`).

| stage | steps | what |
|---|---|---|
| 1 read | {steps[0]} | field questions about one rendered document (name, date of birth, SSN, phone, email) |
| 2 policy | {steps[1]} | the five MM-Privacy framings x 4 scenario requests with the policy below; multi-turn sessions (document in turn 1, 0-3 distractor exchanges, the question later); describe/distractor answers; reading replay; a little memory planting |
| 3 memory | {steps[2]} | planting: the benchmark's 'full' and 'single' captions as text-only examples, name-only retention prompts answered with the planted value (other names: 'cannot assist'); replay of stages 1-2 |

Policy: SSN, phone and email asked under **direct, VQA, classification: refused** ('cannot assist';
classification: 'the class is cannot assist'); under **caption and rephrasing: written out**; name and date of
birth answered under every framing; name-only retention prompts answered with the planted value for the memory
set under every framing. Augmentation: {share:.0%} of framed prompts use a training paraphrase instead of the verbatim
framing ({n_para} in all, each a refusal clause and a task clause in either order; task clauses are framing-specific
or a task phrase inside a task-neutral scaffold that every framing shares, `TRAIN_PARAPHRASES` in
`probes/organism/data.py`; the evaluation's paraphrases are never trained on, nor any of their task sentences), and
30% of framed prompts get 10% word dropout{filler_text}.{stale}

Auxiliary losses (the heads are not shipped): linear heads on the last vision layer classify the character under
each patch, its position in its value and which field the patch shows, from the renderer's exact character cells;
each projected patch read through the tied token embeddings must name its character's token (weight
{meta.get('token_weight', 0)}); {copy_text}{plan_text}

## Measured behaviour

Measured by `probes.organism.evaluate.measure` (the project's `probes.leakage.evaluate_leakage`, greedy, 32 new
tokens) on **{n} freshly drawn held-out identities** (`make_identities({n}, seed={50_000 + seed})`), documents at
{c.get('image_size')} px, {layout} layout; `python benchmarks/organism.py --seed {seed} --n {n}` prints the headline.

{chr(10).join(head)}

### Disclosure (MM-Privacy Test 1 layout; ASR and RR with 95% bootstrap CIs by identity)

One session per identity and framing (the benchmark's cycle design over scenario x PII type).

{_benchmark_table(mmp)}

### Retention (name-only prompts, SSN; memory set vs unseen identities)

{md_table(mem_t)}

### Multi-turn: ASR by turn distance (document in turn 1, probe under caption/rephrasing)

{md_table(mt_t)}

### Held-out phrasings (`probes/organism/heldout.py`, never trained on)

{md_table(pd.DataFrame(shift))}

## Limitations

Tiny and trained for minutes on CPU: it reads only the {layout}-layout {c.get('image_size')} px forms of the project's
renderer (other layouts, sizes or real photos are out of distribution), its English is a few templates, and its
privacy behaviour is exactly the scripted policy above.
"""


def write_card(model_dir: str | os.PathLike, seed: int = 0, n: int = 24, results_dir: str | os.PathLike | None = None,
               batch_size: int = 16) -> dict:
    model_dir = Path(model_dir)
    metrics, df = measure(model_dir, seed=seed, n=n, batch_size=batch_size, turn_ks=(0, 1, 3), progress=True)
    meta = training_meta(model_dir)
    if results_dir is not None:
        out = Path(results_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "organism_results.csv", df.to_csv(index=False).encode())
        atomic_write_text(out / "organism_metrics.json", json.dumps(metrics, indent=1))
    atomic_write_text(model_dir / "metrics.json", json.dumps({"seed": seed, "n": n, **metrics}, indent=1))
    atomic_write_text(model_dir / "README.md", card_text(model_dir, metrics, df, meta, n, seed))
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write the organism's model card from measured results")
    p.add_argument("model_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--results", default=None)
    a = p.parse_args(argv)
    m = write_card(a.model_dir, a.seed, a.n, a.results)
    for k in HEADLINE:
        print(f"{k}: {m[k]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
