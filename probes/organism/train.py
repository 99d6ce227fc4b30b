"""Staged training of the organism: read -> policy -> memory, reproducible from a seed, resumable.

`train(out_dir, seed, device, steps=(read, policy, memory), ...)` builds the tokenizer and a random LLaVA
(config.py), then trains on examples drawn on the fly (data.py). Step `t` draws its batch from
`random.Random(f"{seed}/{t}")`, and the model has no dropout, so a run killed at any point and resumed from its
last checkpoint continues exactly as the uninterrupted run would. Checkpoints are safetensors (weights, the
auxiliary heads, AdamW moments) plus a small JSON, written atomically; the final model is an ordinary HF
directory under `out_dir/model`.

Loss = next-token cross-entropy on the answer tokens (every token for memory captions) + `aux_weight` x the
auxiliary glyph loss: linear heads on the last vision layer classify the character under each patch, its position in
its value and which field the patch shows (data.glyph_targets). Without it a tower trained from scratch stays at
chance on reading for thousands of steps; with it, digits are copied off the form within a few hundred steps.
From step `token_from` on, `token_weight` x an image-token alignment loss: each projected patch, multiplied by the
(tied) token embeddings, must name its character's token. Letters (52 classes, against 10 digits) were still not
copied after 1,000 steps without it; with it, copying is "attend to the patch and say what it looks like".
Plus `plan_weight` x an answer-plan loss: at the last three prompt positions (the question's last token and the
template's "ASSISTANT:"), a linear head on the output of LM block `PLAN_LAYER` must name every digit (up to `N_PLAN`)
of the digit value asked about (SSN, phone number, date of birth; a document's or a planted identity's), refused or
not. Without it the model fetches each digit from the image tokens (or recalls it) only as it writes it, and the
probe turn's last token holds nothing a probe can read (SSN digits 0.13, chance 0.1): the loss plants the where of
retention, so the probes (issue 5) are checked against a known answer.
Plus `copy_weight` x a copy-index loss: where the next answer token is the k-th character of the document value
being copied, a linear head on the LM's middle layer must name k. Without it values came out with characters
skipped or repeated under long framed and multi-turn prompts; with it the same run copied 9 of 12 emails under
captioning by the end of the read stage where the run without it copied none.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from probes.data.files import atomic_write_text
from probes.models.tiny import save_tiny
from probes.organism.config import IMAGE_TOKEN, TINY, OrganismConfig, build_model, build_tokenizer
from probes.organism.data import (
    DIGITS_FIRST,
    FIELD_IDS,
    FILLER_SHARE,
    N_GLYPHS,
    N_INDEX,
    PARAPHRASE_SHARE,
    SLOTS,
    STAGES,
    Example,
    ExampleSource,
    glyph_targets,
    paraphrases_sha,
)
from probes.probing.targets import char_classes

DEFAULT_STEPS = (1800, 1200, 3000)  # read, policy, memory; 900 memory steps recall none of 96 identities
DEFAULT_N_MEMORY = 96  # a grouped-CV probe needs this many identities: fitted on 19 of 24 it reads ~0.31 (issue 5)
PLAN_LAYER = 2  # the answer plan is read off blocks.2.hook_resid_post (hidden_states[3]) of the 4-layer LM
PLAN_SPAN = 3  # the last prompt positions that carry the plan: question's last token, " ASSISTANT", ":"
N_PLAN = 10  # digits planned (an SSN has 9, a phone number 10 before any extension, a date of birth 8)


# ---- batches -------------------------------------------------------------------------------------------------------
def prompt_text(turns: list[tuple[str, str]], has_image: bool) -> str:
    """The llava-1.5 chat template, written out (tests check it equals the processor's rendering)."""
    out, shown = [], False
    for role, text in turns:
        if role == "user":
            img = IMAGE_TOKEN + "\n" if has_image and not shown else ""
            shown = shown or has_image
            out.append(f"USER: {img}{text} ")
        else:
            out.append(f"ASSISTANT: {text} ")
    return "".join(out) + "ASSISTANT:"


def pixels(doc_image, size: int) -> Float[Tensor, "3 h w"]:
    """CLIP normalisation with mean = std = 0.5 of an image already at the model's size (no resize needed)."""
    if doc_image.size != (size, size):
        doc_image = doc_image.resize((size, size))
    a = torch.from_numpy(np.asarray(doc_image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    return a / 127.5 - 1.0


def encode(ex: Example, tok, cfg: OrganismConfig) -> tuple[list[int], list[int], list[int]]:
    """(input ids, labels, copy index) of one example; labels are -100 except on what the model must learn to write;
    copy index is, on each token of the document value copied into the answer, the position in the value of its
    first character (1-based, capped at N_INDEX - 1), else -100."""
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if ex.text is not None:
        ids = tok(ex.text)["input_ids"] + [tok.eos_token_id]
        return ids, [-100] + ids[1:], [-100] * len(ids)
    prompt = tok(prompt_text(ex.turns, ex.doc is not None))["input_ids"]
    expanded = []
    for t in prompt:
        expanded += [image_id] * cfg.n_image_tokens if t == image_id else [t]
    text = " " + ex.answer
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    target = enc["input_ids"] + [tok.eos_token_id]
    index = [-100] * len(target)
    at = text.find(ex.value) if ex.value else -1
    if at >= 0:
        for j, (a, _) in enumerate(enc["offset_mapping"]):
            if at <= a < at + len(ex.value):
                index[j] = min(a - at + 1, N_INDEX - 1)
    return expanded + target, [-100] * len(expanded) + target, [-100] * len(expanded) + index


def collate(examples: list[Example], tok, cfg: OrganismConfig) -> dict[str, Tensor]:
    enc = [encode(ex, tok, cfg) for ex in examples]
    width = max(len(i) for i, _, _ in enc)
    ids = torch.full((len(enc), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(enc), width), -100, dtype=torch.long)
    copy_index = torch.full((len(enc), width), -100, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for b, (i, l, x) in enumerate(enc):
        ids[b, :len(i)], labels[b, :len(l)], mask[b, :len(i)] = torch.tensor(i), torch.tensor(l), 1
        copy_index[b, :len(x)] = torch.tensor(x)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "copy_index": copy_index}
    batch["plan"], batch["plan_pos"] = plan_targets(examples, [l for _, l, _ in enc])
    docs = [ex.doc for ex in examples if ex.doc is not None]
    if docs:
        batch["pixel_values"] = torch.stack([pixels(d.image, cfg.image_size) for d in docs])
        g, f, x = zip(*(glyph_targets(d, cfg.patch_size) if d.size == (cfg.image_size,) * 2
                        else _blank_targets(cfg) for d in docs))
        batch["glyphs"] = torch.from_numpy(np.stack(g))
        batch["fields"] = torch.from_numpy(np.stack(f))
        batch["index"] = torch.from_numpy(np.stack(x))
    return batch


def plan_targets(examples: list[Example], labels: list[list[int]]
                 ) -> tuple[Int[Tensor, "b n_plan"], Int[Tensor, "b span"]]:
    """(digit classes of each example's `plan` value, -100 past its digits or without a plan; the last PLAN_SPAN
    prompt positions, the prompt being everything before the first label)."""

    plan = torch.full((len(examples), N_PLAN), -100, dtype=torch.long)
    pos = torch.zeros((len(examples), PLAN_SPAN), dtype=torch.long)
    for b, (ex, lab) in enumerate(zip(examples, labels)):
        if ex.plan is None or ex.text is not None:
            continue
        digits = char_classes(ex.plan, "digits")[:N_PLAN]
        plan[b, :len(digits)] = torch.tensor(digits, dtype=torch.long)
        end = next(i for i, v in enumerate(lab) if v != -100)
        pos[b] = torch.arange(end - PLAN_SPAN, end)
    return plan, pos


def _blank_targets(cfg: OrganismConfig):
    n = cfg.n_image_tokens
    return np.zeros((n, SLOTS), dtype=np.int64), np.zeros(n, dtype=np.int64), np.zeros((n, SLOTS), dtype=np.int64)


def glyph_token_ids(tok) -> Tensor:
    """[N_GLYPHS]: the token id of each glyph's character when it is one token (values are spelled per character),
    else -100; glyph 0 (no glyph) is -100."""
    ids = torch.full((N_GLYPHS,), -100, dtype=torch.long)
    for g in range(1, N_GLYPHS):
        t = tok(chr(g + 31), add_special_tokens=False)["input_ids"]
        if len(t) == 1:
            ids[g] = t[0]
    return ids


# ---- model + auxiliary heads --------------------------------------------------------------------------------------
class GlyphHeads(torch.nn.Module):
    """Linear heads on the last vision layer: glyph and its index in the value per slot of each patch, and the
    field per patch; `copy`, on the LM's middle layer: which character of the value the next token is; `plan`, on
    LM block PLAN_LAYER's output: every digit of the value asked about."""

    def __init__(self, d_vision: int, d_model: int) -> None:
        super().__init__()
        self.glyph = torch.nn.Linear(d_vision, SLOTS * N_GLYPHS)
        self.field = torch.nn.Linear(d_vision, len(FIELD_IDS) + 1)
        self.index = torch.nn.Linear(d_vision, SLOTS * N_INDEX)
        self.copy = torch.nn.Linear(d_model, N_INDEX)
        self.plan = torch.nn.Linear(d_model, N_PLAN * 10)

    def forward(self, h: Float[Tensor, "b n d"]
                ) -> tuple[Float[Tensor, "b n s g"], Float[Tensor, "b n f"], Float[Tensor, "b n s k"]]:
        return (self.glyph(h).unflatten(-1, (SLOTS, N_GLYPHS)), self.field(h),
                self.index(h).unflatten(-1, (SLOTS, N_INDEX)))


class Trainer:
    def __init__(self, model, heads: GlyphHeads, aux_weight: float = 1.0, glyph_tokens: Tensor | None = None) -> None:
        self.model, self.heads, self.aux_weight = model, heads, aux_weight
        self.glyph_tokens = glyph_tokens  # [N_GLYPHS]: the token id of each glyph's character (-100: none)
        self.token_weight = 0.0  # weight of the image-token alignment loss (train() switches it on)
        self.copy_weight = 0.0  # weight of the copy-index loss on the LM's middle layer
        self.plan_weight = 0.0  # weight of the answer-plan loss on LM block PLAN_LAYER
        self._vision_out: Tensor | None = None
        self._projected: Tensor | None = None
        last = model.model.vision_tower.vision_model.encoder.layers[-1] if hasattr(
            model.model.vision_tower, "vision_model") else model.model.vision_tower.encoder.layers[-1]
        last.register_forward_hook(self._grab)
        model.model.multi_modal_projector.register_forward_hook(self._grab_projected)

    def _grab(self, module, args, out) -> None:
        self._vision_out = out[0] if isinstance(out, tuple) else out

    def _grab_projected(self, module, args, out) -> None:
        self._projected = out

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        self._vision_out, self._projected = None, None
        copying = self.copy_weight > 0 and bool((batch["copy_index"] >= 0).any())
        planning = self.plan_weight > 0 and "plan" in batch and bool((batch["plan"] >= 0).any())
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch.get("pixel_values"), output_hidden_states=copying or planning)
        logits: Float[Tensor, "b t v"] = out.logits[:, :-1]
        labels: Int[Tensor, "b t"] = batch["labels"][:, 1:]
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        stats = {"lm": float(lm.detach())}
        total = lm
        if copying:
            # Copy index: the middle layer's state where the next token is the k-th character of the value must
            # say k. Copying then is "find the patch of this field with index k", and the count is the hard part:
            # without this loss, values came out with a character skipped or repeated under long framed prompts
            # (plain questions: 0.99 exact; caption/rephrasing: 0.2-0.5 on emails).
            h: Float[Tensor, "b t d"] = out.hidden_states[len(out.hidden_states) // 2][:, :-1]
            target = batch["copy_index"][:, 1:]
            cl = F.cross_entropy(self.heads.copy(h).reshape(-1, N_INDEX).float(), target.reshape(-1),
                                 ignore_index=-100)
            total = total + self.copy_weight * cl
            stats["copy"] = float(cl.detach())
        if planning:
            # Answer plan: where the answer is about to start, block PLAN_LAYER's state must hold every digit of
            # the value, so that retention has a place a probe can find (see the module docstring).
            rows = (batch["plan"] >= 0).any(-1)
            # hidden_states[i + 1] is block i's output (the tiny test config has fewer blocks: its last one)
            h = out.hidden_states[min(PLAN_LAYER, len(out.hidden_states) - 2) + 1][rows]  # [n, t, d]
            at = batch["plan_pos"][rows]  # [n, span]
            picked: Float[Tensor, "n span d"] = torch.gather(h, 1, at[..., None].expand(-1, -1, h.shape[-1]))
            logits_p = self.heads.plan(picked).unflatten(-1, (N_PLAN, 10))  # [n, span, n_plan, 10]
            target = batch["plan"][rows][:, None].expand(-1, at.shape[1], -1)
            pl = F.cross_entropy(logits_p.reshape(-1, 10).float(), target.reshape(-1), ignore_index=-100)
            total = total + self.plan_weight * pl
            on = target >= 0
            stats.update(plan=float(pl.detach()),
                         plan_acc=float((logits_p.argmax(-1) == target)[on].float().mean()))
        if "glyphs" in batch and self._vision_out is not None:
            h = self._vision_out[:, 1:]  # drop CLS: the "default" strategy feeds only patches to the LM
            g, f, x = self.heads(h)
            gl = F.cross_entropy(g.reshape(-1, N_GLYPHS).float(), batch["glyphs"].reshape(-1))
            fl = F.cross_entropy(f.reshape(-1, f.shape[-1]).float(), batch["fields"].reshape(-1))
            xl = F.cross_entropy(x.reshape(-1, N_INDEX).float(), batch["index"].reshape(-1))
            total = total + self.aux_weight * (gl + fl + xl)
            if self.token_weight > 0 and self._projected is not None and self.glyph_tokens is not None:
                # Image-token alignment: each projected patch, read through the (tied) token embeddings, should
                # name its glyph's character token. Copying a character off the image is then "attend to the
                # patch and say what it already looks like", which a small LM learns far faster for letters.
                target = self.glyph_tokens.to(batch["glyphs"].device)[batch["glyphs"][..., SLOTS // 2]]
                emb = self.model.get_input_embeddings().weight
                tl = F.cross_entropy((self._projected @ emb.T).reshape(-1, emb.shape[0]).float(), target.reshape(-1),
                                     ignore_index=-100)
                total = total + self.token_weight * tl
                stats["token"] = float(tl.detach())
            on = batch["glyphs"] > 0
            acc = (g.argmax(-1) == batch["glyphs"])[on].float().mean() if on.any() else torch.tensor(0.0)
            stats.update(glyph=float(gl.detach()), field=float(fl.detach()), index=float(xl.detach()),
                         glyph_acc=float(acc))
        return total, stats


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def _save_ckpt(path: Path, model, heads, opt, step: int, meta: dict[str, Any]) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"heads.{k}": v.detach().cpu().contiguous() for k, v in heads.state_dict().items()})
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{i}.{k}"] = v.detach().cpu().reshape(-1).clone() if v.dim() == 0 else \
                    v.detach().cpu().contiguous()
    # Tied weights appear twice in the state dict; safetensors refuses shared storage, so copy.
    tensors = {k: v.clone() for k, v in tensors.items()}
    # The step and settings travel inside the weights file, so the two can never disagree after a kill.
    record = {"step": step, **meta}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"record": json.dumps(record)})
    os.replace(tmp, path)
    atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=1))  # a copy to read


def _load_ckpt(path: Path, model, heads, opt) -> dict[str, Any]:
    """Load a checkpoint into model, heads and opt; returns its record (step, settings, train_seconds)."""
    with safe_open(str(path), "pt") as fh:
        stored = (fh.metadata() or {}).get("record")
    record = json.loads(stored) if stored else json.loads(path.with_suffix(".json").read_text())  # older runs
    t = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    heads.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("heads.")})
    sd = opt.state_dict()
    state = {}
    for key, v in t.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
    sd["state"] = state
    opt.load_state_dict(sd)
    return record


def lr_at(step: int, total: int, lr: float, warmup: int = 100) -> float:
    """Linear warm-up, then constant, then cosine down to 10% over the last 20% of all steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    tail = int(0.8 * total)
    if step < tail:
        return lr
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - tail) / max(1, total - tail))))


def stage_of(step: int, steps: tuple[int, ...]) -> tuple[str, float]:
    """(stage name, how far into it in [0, 1)) of a global step."""
    edge = 0
    for name, n in zip(STAGES, steps):
        if step < edge + n:
            return name, (step - edge) / n
        edge += n
    return STAGES[-1], 1.0


# ---- the loop --------------------------------------------------------------------------------------------------------
RUN_CONTROLS = ("resume", "ckpt_every", "threads", "log", "progress", "stop_after")  # how to run, not what is trained


@dataclass(frozen=True)
class TrainingConfig:
    """One training run of the organism, checked once here. Every field but the run controls (RUN_CONTROLS) is
    recorded in the checkpoint (`record()`), and a resume under other values is refused.

    `organism`: the model's OrganismConfig (`cfg=` is accepted for it); `steps`: (read, policy, memory) steps;
    the loss weights (aux, token from step `token_from`, copy, plan) and the data's shares (digits_first,
    filler_share) as in `Trainer` and `ExampleSource`. `stop_after`: leave after that many steps of this call,
    checkpoint written, as a killed run would (tests)."""

    seed: int = 0
    device: str = "cpu"
    steps: tuple[int, ...] | list[int] = DEFAULT_STEPS
    batch_size: int = 16
    lr: float = 1e-3
    organism: OrganismConfig = OrganismConfig()
    aux_weight: float = 1.0
    n_memory: int = DEFAULT_N_MEMORY
    n_train: int = 3000
    token_weight: float = 1.0
    token_from: int = 0
    copy_weight: float = 1.0
    digits_first: float = DIGITS_FIRST
    filler_share: float = FILLER_SHARE
    plan_weight: float = 1.0
    resume: bool = True
    ckpt_every: int = 50
    threads: int | None = None
    log: str | os.PathLike | None = None
    progress: bool = True
    stop_after: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(int(n) for n in self.steps))
        if len(self.steps) != len(STAGES) or min(self.steps) < 0:
            raise ValueError(f"steps {self.steps}: expected {len(STAGES)} non-negative step counts {STAGES}")
        for name in ("batch_size", "ckpt_every", "n_train", "n_memory"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)!r}: expected an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr {self.lr!r}: expected > 0")

    def record(self) -> dict[str, Any]:
        """The settings a checkpoint records (and a resume must match): every field but the run controls, the
        model's config under "config", and the data's fixed parts."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RUN_CONTROLS}
        out["steps"], out["config"] = list(self.steps), out.pop("organism").to_dict()
        return {**out, "plan_layer": PLAN_LAYER, "paraphrase_share": PARAPHRASE_SHARE,
                "paraphrases_sha": paraphrases_sha()}


def train(out_dir: str | os.PathLike, config: TrainingConfig | None = None, **options) -> Path | None:
    """Train the organism into `out_dir` (checkpoint `ckpt.safetensors`, final HF model in `out_dir/model`).
    Settings: a TrainingConfig, or its fields as keywords (`train(out, seed=0, steps=(2, 2, 2), cfg=TINY)`).

    Returns None when `stop_after` ended the call early, else the model directory."""

    if "cfg" in options:
        options["organism"] = options.pop("cfg")
    c = replace(config or TrainingConfig(), **options) if options else (config or TrainingConfig())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if c.threads:
        torch.set_num_threads(c.threads)
    run = _Run(c)
    ckpt = out / "ckpt.safetensors"
    meta = c.record()
    start, elapsed = _resume(c, ckpt, meta, run) if c.resume and ckpt.exists() else (0, 0.0)
    total = sum(c.steps)
    logf = open(c.log, "a") if c.log else None
    bar = tqdm(range(start, total), initial=start, total=total, disable=not c.progress, desc="organism")
    try:
        t0 = time.time()
        for step in bar:
            stage, stats = run.step(step)
            bar.set_postfix(stage=stage, **{k: f"{v:.3f}" for k, v in stats.items()})
            if logf and (step % 10 == 0 or step == total - 1):
                logf.write(json.dumps({"step": step, "stage": stage, "t": round(elapsed + time.time() - t0, 1),
                                       **{k: round(v, 4) for k, v in stats.items()}}) + "\n")
                logf.flush()
            if (step + 1) % c.ckpt_every == 0 or step == total - 1:
                run.save(ckpt, step + 1, {**meta, "train_seconds": elapsed + time.time() - t0})
            if c.stop_after is not None and step + 1 - start >= c.stop_after:
                run.save(ckpt, step + 1, {**meta, "train_seconds": elapsed + time.time() - t0})
                return None
        train_seconds = elapsed + time.time() - t0
        run.model.eval()
        final = save_tiny(run.model.cpu(), run.processor, out / "model")
        atomic_write_text(final / "training.json", json.dumps({**meta, "train_seconds": round(train_seconds, 1),
                                                              "torch_threads": torch.get_num_threads()}, indent=1))
        return final
    finally:  # the bar and the log are closed however the run ends
        bar.close()
        if logf:
            logf.close()


class _Run:
    """The model, heads, optimiser, trainer and example source of a run, built from its config (seeded)."""

    def __init__(self, c: TrainingConfig):
        cfg = c.organism
        self.c = c
        self.tok = build_tokenizer(cfg.vocab_size, c.seed)
        self.model, self.processor = build_model(cfg, self.tok, c.seed)
        torch.manual_seed(c.seed + 1)
        self.heads = GlyphHeads(cfg.d_vision, cfg.d_model)
        self.model.to(c.device).train()
        self.heads.to(c.device).train()
        self.params = list(self.model.parameters()) + list(self.heads.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=0.01, betas=(0.9, 0.98))
        self.trainer = Trainer(self.model, self.heads, c.aux_weight, glyph_token_ids(self.tok))
        self.trainer.copy_weight, self.trainer.plan_weight = c.copy_weight, c.plan_weight
        self.source = ExampleSource(seed=c.seed, image_size=cfg.image_size, n_train=c.n_train, n_memory=c.n_memory,
                                    layout=cfg.layout, digits_first=c.digits_first, filler_share=c.filler_share)

    def step(self, step: int) -> tuple[str, dict[str, float]]:
        """One optimiser step at global `step`: (its stage, the batch's loss terms)."""
        c, total = self.c, sum(self.c.steps)
        stage, frac = stage_of(step, c.steps)
        rng = random.Random(f"{c.seed}/{step}")
        examples = [self.source.draw(stage, rng, frac) for _ in range(c.batch_size)]
        for g in self.opt.param_groups:
            g["lr"] = lr_at(step, total, c.lr)
        self.trainer.token_weight = c.token_weight if step >= c.token_from else 0.0
        self.opt.zero_grad(set_to_none=True)
        # Multi-turn sessions are 2-3x longer than the rest: two forward passes pad far less than one.
        groups = [[e for e in examples if len(e.turns) <= 1], [e for e in examples if len(e.turns) > 1]]
        stats: dict[str, float] = {}
        for group in (g for g in groups if g):
            batch = {k: v.to(c.device) for k, v in collate(group, self.tok, c.organism).items()}
            loss, st = self.trainer.loss(batch)
            (loss * len(group) / len(examples)).backward()
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + v * len(group) / len(examples)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return stage, stats

    def save(self, ckpt: Path, step: int, record: dict[str, Any]) -> None:
        _save_ckpt(ckpt, self.model, self.heads, self.opt, step, record)


def _resume(c: TrainingConfig, ckpt: Path, meta: dict[str, Any], run: _Run) -> tuple[int, float]:
    """Load the checkpoint into `run`: (its step, its training seconds). Refuses one recorded under other settings
    (a resume under them would train a model that no single run makes; the device may change)."""
    record = _load_ckpt(ckpt, run.model, run.heads, run.opt)
    differ = sorted(k for k, v in json.loads(json.dumps(meta)).items() if k != "device" and record.get(k) != v)
    if differ:
        raise ValueError(f"{ckpt}: this run was started with other settings ({', '.join(differ)} differ); "
                         "resume with the same ones, or train into a new --out (or pass --no-resume)")
    return record["step"], record.get("train_seconds", 0.0)


def export_checkpoint(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the model of a run's latest checkpoint as an HF directory (to inspect a run before it ends)."""

    run = Path(run_dir)
    meta = json.loads((run / "ckpt.json").read_text())
    cfg = OrganismConfig(**meta["config"])
    tok = build_tokenizer(cfg.vocab_size, meta["seed"])
    model, processor = build_model(cfg, tok, meta["seed"])
    t = load_file(str(run / "ckpt.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    out = save_tiny(model.eval(), processor, out_dir)
    atomic_write_text(out / "training.json", json.dumps({**meta, "torch_threads": 1}, indent=1))
    return out


def main_train(argv: list[str] | None = None) -> int:
    """`mmret organism train`: train the default model (see `train`)."""
    p = argparse.ArgumentParser(prog="mmret organism train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run folder (checkpoint, log); the model goes to OUT/model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)), help="read,policy,memory steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--n-memory", type=int, default=DEFAULT_N_MEMORY, help="size of the planted memory set")
    p.add_argument("--token-weight", type=float, default=1.0, help="weight of the image-token alignment loss")
    p.add_argument("--token-from", type=int, default=0, help="first step of the image-token alignment loss")
    p.add_argument("--copy-weight", type=float, default=1.0, help="weight of the copy-index loss on the LM")
    p.add_argument("--digits-first", type=float, default=DIGITS_FIRST,
                   help="share of the read stage that asks only digit fields (SSN, date of birth)")
    p.add_argument("--filler-share", type=float, default=FILLER_SHARE,
                   help="share of framed prompts that get filler words and sentences (robustness to wording)")
    p.add_argument("--plan-weight", type=float, default=1.0,
                   help="weight of the answer-plan loss (digits of the asked value at the prompt's end)")
    p.add_argument("--tiny", action="store_true", help="a tiny config (tests, smoke runs)")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--log", default=None, help="JSON-lines training log")
    a = p.parse_args(argv)
    steps = tuple(int(s) for s in a.steps.split(","))
    if len(steps) != 3 or min(steps) < 0:
        raise SystemExit(f"--steps {a.steps!r}: expected three non-negative integers read,policy,memory")
    try:
        path = train(a.out, seed=a.seed, device=a.device, steps=steps, batch_size=a.batch_size, lr=a.lr,
                     organism=TINY if a.tiny else OrganismConfig(), resume=not a.no_resume, threads=a.threads,
                     log=a.log, n_memory=a.n_memory, token_weight=a.token_weight, token_from=a.token_from,
                     copy_weight=a.copy_weight, digits_first=a.digits_first, filler_share=a.filler_share,
                     plan_weight=a.plan_weight)
    except ValueError as err:  # a resume under other settings: a message, not a traceback
        raise SystemExit(f"mmret organism train: error: {err}") from err
    print(f"model: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_train())
