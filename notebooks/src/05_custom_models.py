# Source of notebooks/05_custom_models.ipynb: real checkpoints on a GPU, tiny ones here.
# Percent format (jupytext): `# %%` starts a code cell, `# %% [markdown]` a markdown cell. After editing,
# run `python notebooks/build_notebooks.py` and commit both files; these header lines are not in the notebook.
# ruff: noqa: E402 -- as in a notebook, each cell imports what it first needs

# %% [markdown]
# # Your own model: real checkpoints on a GPU, tiny ones here
#
# Everything in notebooks 01-04 takes a `LoadedModel`; nothing there is specific to the default model. This
# notebook shows how to load a real checkpoint, and runs the same path (load, render, capture, generate) on tiny
# random checkpoints of two other families, built offline from the real transformers config classes: the way to
# check a pipeline before paying for a GPU.

# %%
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never wait on the model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pandas as pd
import torch
from IPython.display import display
from transformers.utils import logging as hf_logging

import probes

torch.set_num_threads(1)  # tiny models: one thread is as fast, and leaves the other cores alone
hf_logging.disable_progress_bar()
# Outputs go under $MMRET_NOTEBOOK_OUT, else results/notebooks of the repository (ignored by git).
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
OUT = Path(os.environ.get("MMRET_NOTEBOOK_OUT", ROOT / "results" / "notebooks")) / "05_custom_models"
OUT.mkdir(parents=True, exist_ok=True)
FIGURES = OUT / "figures"

# %% [markdown]
# ## Loading a real checkpoint
#
# ```python
# probes.load_model(name_or_path, *, device=None, dtype=None, backend="torch", family=None,
#                   device_map=None, attn_implementation=None, trust_remote_code=False)
# ```
#
# - `name_or_path`: an HF id (read from the local HF cache when `HF_HUB_OFFLINE=1`, downloaded otherwise) or a
#   local model directory (never online).
# - `device="cuda"` and `dtype=torch.bfloat16` (or `"bfloat16"`): LLaVA-1.5-7B in bf16 takes about 15 GB of GPU
#   memory. `device_map="auto"` spreads a larger model over the GPUs of a node (`device` is then ignored).
# - `backend`: `"torch"` (plain forward hooks under transformer-lens names; what capture uses, nearly free) or
#   `"bridge"` (transformer-lens' `TransformerBridge`: every TL hook point, attention patterns included, about 2x
#   slower; Qwen2.5-VL's needs torchvision). `loaded.bridge` builds it on first use either way.
# - `family`: overrides detection from `config.json`'s `architectures`.
# - `attn_implementation`: default `"sdpa"` (`"eager"` for the bridge); attention knockout refuses flash attention.
# - `trust_remote_code`: off unless asked.
#
# For capture on a GPU, `probes.capture(..., dtype="float16")` stores half-precision vectors and `batch_size`
# sets how many sessions share a forward. Documents: the default model reads 96 px records; real models were
# trained on larger images, so render documents at their resolution (e.g. `size=336` for LLaVA-1.5) with the
# `"fixed"` layout. Command line: `mmret capture --model llava-hf/llava-1.5-7b-hf --device cuda
# --model-dtype bfloat16 --dtype float16 ...`, and the same `--device` for `mmret leak` and `mmret patch`.
#
# The supported families (an unknown architecture is refused with this list; adding a family is one adapter module
# plus its test):

# %%
pd.DataFrame([{"family": family, "architectures": ", ".join(archs)} for family, archs in probes.FAMILIES.items()])

# %% [markdown]
# The cells guarded by `HAVE_CHECKPOINT` run on a real checkpoint: set `MMRET_CHECKPOINT` to an HF id in your
# cache (e.g. `llava-hf/llava-1.5-7b-hf`) or a model directory before starting the kernel. They use the GPU when
# there is one. Without it they are skipped, and the notebook still runs top to bottom.

# %%
from probes.data.builders import mmprivacy_sessions
from probes.data.identities import make_identities
from probes.leakage import evaluate_leakage

CHECKPOINT = os.environ.get("MMRET_CHECKPOINT")  # e.g. llava-hf/llava-1.5-7b-hf, or a model directory
HAVE_CHECKPOINT = bool(CHECKPOINT)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
people = make_identities(3, seed=0)
print(f"checkpoint: {CHECKPOINT or '(none; set MMRET_CHECKPOINT to run the guarded cells)'}; device {DEVICE}")

# %%
if HAVE_CHECKPOINT:
    big = probes.load_model(CHECKPOINT, device=DEVICE, dtype=DTYPE)
    print(f"{big.family}: {big.n_layers} layers, d_model {big.d_model}, on {big.device} in {big.dtype}")
    big_sessions = mmprivacy_sessions(people, OUT / "images_336", framings=("direct", "caption"),
                                      pii_types=("SSN",), scenarios=("open",), size=336, layout="fixed")
    big_store = probes.capture(big, big_sessions, str(OUT / "store_checkpoint"), hooks="resid_post",
                               positions="last:*+image:0", dtype="float16", progress=False)
    print(big_store.summary())
    display(evaluate_leakage(big, big_sessions, max_new_tokens=32, progress=False)
            [["session_id", "framing", "leak", "refused"]])

# %% [markdown]
# ## Tiny checkpoints of other families
#
# `probes.build_tiny_model(family, path)` (= `mmret tiny --family F --out DIR`) writes an ordinary HF model
# directory: the family's real config class at tiny sizes, random weights, a small byte-level BPE tokenizer with
# the family's special tokens, its processor and chat template. `load_model` opens it like any checkpoint. The
# outputs are noise, but rendering, token maps, image-token layout and hooks are the family's real ones.

# %%
tiny = {}
for family in ("qwen2_5_vl", "idefics3"):
    path = probes.build_tiny_model(family, OUT / f"tiny_{family}")
    tiny[family] = probes.load_model(path)
    m = tiny[family]
    print(f"{family}: {type(m.hf_model).__name__}, {m.n_layers} layers, d_model {m.d_model}, from {path.name}")

# %% [markdown]
# ## The same session, two image-token layouts
#
# Qwen2.5-VL merges 2x2 patches into one grid of image tokens; Idefics3 (SmolVLM) cuts the image into crops plus
# a global view (`tile` 0 is the global view), pixel-shuffles each, and writes `<row_i_col_j>` tags between
# them (tile -1 in the token map). The token map says which is which, and `patches_for_field` which tokens show
# the SSN, so selectors and probe position groups mean the same thing in every family.

# %%
from probes.data.documents import patches_for_field

sessions = mmprivacy_sessions(people, OUT / "images", framings=("direct", "caption"), pii_types=("SSN",),
                              scenarios=("open",), size=128, layout="fixed")
doc = probes.render_document(people[0], "open", size=128, layout="fixed")
for family, m in tiny.items():
    rendered = probes.render(m.adapter, sessions[0])
    image = rendered.token_map.df.query("segment == 'image'")
    print(f"{family}: {rendered.n_positions} positions, {len(image)} image tokens, "
          f"{len(patches_for_field(m.adapter, doc, 'SSN'))} of them show the SSN")
    display(image.groupby("tile").agg(tokens=("position", "size"), rows=("patch_row", "max"),
                                      cols=("patch_col", "max")))

# %% [markdown]
# ## Capture and generation: the same calls
#
# Capture, queries and the leakage loop are the ones of notebooks 01 and 02. (Random weights: ASR and RR are
# zero, the point is that the loop runs.)

# %%
summary = []
for family, m in tiny.items():
    store = probes.capture(m, sessions, str(OUT / f"store_{family}"), hooks="resid_post",
                           positions="last:*+image:0", progress=False)
    x, meta = store.query("hook_resid_post", last_of_turn=True)
    leak = evaluate_leakage(m, sessions, max_new_tokens=8, progress=False)
    summary.append({"family": family, "sessions": meta["session_id"].nunique(), "x": tuple(x.shape),
                    "image vectors": int((store.manifest["segment"] == "image").sum()),
                    "ASR": leak["leak"].mean(), "RR": leak["refused"].mean()})
pd.DataFrame(summary)
