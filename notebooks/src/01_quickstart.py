# Source of notebooks/01_quickstart.ipynb: from a document to stored hidden states.
# Percent format (jupytext): `# %%` starts a code cell, `# %% [markdown]` a markdown cell. After editing,
# run `python notebooks/build_notebooks.py` and commit both files; these header lines are not in the notebook.
# ruff: noqa: E402 -- as in a notebook, each cell imports what it first needs

# %% [markdown]
# # Quickstart: from a document to stored hidden states
#
# mm-retention asks *where* a multimodal model keeps the personal data it read from an image: at which layer,
# which position (an image patch, a marked span of text, the last token of a turn) and for how many turns of a
# chat. Every experiment walks the same path:
#
# synthetic identity → rendered document → `Session` → rendering through the model's own chat template, with a
# **token map** (what every position is) → **capture** of hidden states into an on-disk `ActivationStore` →
# queries that return tensors plus a metadata DataFrame.
#
# This notebook walks it on the embedded default model (`probes.organism.DEFAULT_MODEL`: a 4-layer LLaVA trained
# in this project on synthetic forms, 13 MB). It runs offline on a CPU in seconds and writes only under `OUT`.

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
from probes.organism import DEFAULT_MODEL

torch.set_num_threads(1)  # tiny models: one thread is as fast, and leaves the other cores alone
hf_logging.disable_progress_bar()
# Outputs go under $MMRET_NOTEBOOK_OUT, else results/notebooks of the repository (ignored by git).
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
OUT = Path(os.environ.get("MMRET_NOTEBOOK_OUT", ROOT / "results" / "notebooks")) / "01_quickstart"
OUT.mkdir(parents=True, exist_ok=True)
FIGURES = OUT / "figures"

# Documents of the size and layout the default model was trained on (its training.json).
from probes.organism.evaluate import training_meta

TRAINING = training_meta(DEFAULT_MODEL)
SIZE, LAYOUT = TRAINING["config"]["image_size"], TRAINING["config"].get("layout", "fixed")
print(f"outputs under {OUT}; documents of {SIZE} px, layout {LAYOUT!r}")

# %% [markdown]
# ## The model
#
# `probes.load_model` takes an HF id or a local directory and returns a `LoadedModel`: the HF model, its
# processor, the **family adapter** (everything that differs between LLaVA, Qwen2.5-VL, Idefics3, Gemma 3 ...)
# and forward hooks under transformer-lens names, so that the same hook name means the same thing in every
# family.

# %%
loaded = probes.load_model(DEFAULT_MODEL)
print(f"{loaded.family}: {loaded.n_layers} layers, d_model {loaded.d_model}, {loaded.dtype}")
loaded.hook_names()[:8]

# %% [markdown]
# ## A synthetic person and their document
#
# Identities are fake (a seeded Faker instance), in the MM-Privacy benchmark's formats. Documents are drawn with
# PIL; the renderer knows the exact ink box of every value, which later tells us which image tokens show it.

# %%
from probes.data.identities import make_identities

people = make_identities(4, seed=0)
person = people[0]
doc = probes.render_document(person, "open", size=SIZE, layout=LAYOUT)
print("SSN field:", doc.fields["SSN"])
doc.image.resize((3 * SIZE, 3 * SIZE), resample=0)  # nearest neighbour: the pixels the model sees, enlarged

# %% [markdown]
# ## A session, rendered
#
# A `Session` is a list of turns (role, text, images) plus labels. `Turn.mark(label, value)` marks a substring, so
# the token map knows which tokens carry it. An assistant turn with `text=None` would be written by the model at
# capture time; here every turn is given. The session ends with a user turn, so the rendering ends with the
# template's generation prompt: the position where the model would start its answer.
#
# Rendering goes through the checkpoint's **own** chat template (the ids equal the processor's), and the token
# map comes from character offsets, not from a re-implementation of each template.

# %%
session = probes.Session("quickstart-0", [
    probes.Turn("user", f"Here is my record. My SSN is {person.ssn}.", images=[doc.image]).mark("ssn", person.ssn),
    probes.Turn("assistant", "Thank you, I have read it."),
    probes.Turn("user", "What is the SSN in the image?"),
], labels={"identity_id": person.identity_id, "pii_type": "SSN"})

rendered = probes.render(loaded.adapter, session)
tm = rendered.token_map
print(f"{rendered.n_positions} positions; image 0 at positions {rendered.image_spans[0]}")
tm.df.groupby(["turn", "role", "segment"]).size().rename("positions").reset_index()

# %% [markdown]
# Position **selectors** are small strings, the same in a notebook, a CLI flag and a config file: `all`, `final`,
# `segment:<s>`, `turn:<t>`, `last:<t>`, `last:*` (last token of every turn), `image:<k>`, `mark:<label>`, joined
# with `+`. Here: the marked SSN tokens and the last token of every turn.

# %%
ssn_positions = tm.select("mark:ssn")
print("marked SSN tokens:", repr(loaded.tokenizer.decode(rendered.input_ids[0, ssn_positions])))
print("last token of each turn:", tm.select("last:*").tolist())
tm.df.iloc[ssn_positions]

# %% [markdown]
# Each family adapter knows the pixel box every image token sees through the processor's resize, crop, tiling
# and pooling, so a field's ink box maps to image tokens (`tile`, `patch_row`, `patch_col`; one grid here).

# %%
from probes.data.documents import patches_for_field

ssn_patches = patches_for_field(loaded.adapter, doc, "SSN")
image_tokens = tm.df[tm.df["image_index"] == 0]
ssn_patch_positions = image_tokens.merge(ssn_patches, on=["tile", "patch_row", "patch_col"])["position"]
print(f"{len(ssn_patches)} of {len(image_tokens)} image tokens show the SSN, at positions",
      ssn_patch_positions.tolist())

# %% [markdown]
# ## Sessions from the builders
#
# Experiments take their sessions from `probes.data.builders`: `mmprivacy_sessions` (one turn, the benchmark's
# five task framings), `multiturn_sessions` (the document in turn 1, k distractor exchanges, the PII asked
# later) and `memory_probe_sessions` (name-only prompts, no image). Every identity value in a turn's text is
# marked; the value a session asks for travels only in private `_` labels, which never reach a store's manifest.
# Images are written once as PNG and referenced by path and sha256, so sessions round-trip through JSONL
# (`mmret sessions build` writes the same files).

# %%
from probes.data.builders import multiturn_sessions

sessions = multiturn_sessions(people, OUT / "images", k_distractors=(1,), reshow=(False,),
                              framing_pairs=(("caption", "caption"),), pii_types=("SSN",),
                              size=SIZE, layout=LAYOUT, relative_to=OUT)
probes.write_sessions(sessions, OUT / "multiturn.jsonl")
sessions = list(probes.read_sessions(OUT / "multiturn.jsonl"))  # image paths are relative to the JSONL
first = sessions[0]
print(first.session_id, {k: v for k, v in first.labels.items() if not k.startswith("_")})
pd.DataFrame([{"turn": i, "role": t.role, "images": len(t.images), "text": (t.text or "")[:120]}
              for i, t in enumerate(first.turns)])

# %% [markdown]
# ## Capture
#
# `probes.activations.capture` feeds each session turn by turn through the KV cache, as a chat would (several
# sessions per forward), keeps only the positions the selector picks, and writes one safetensors shard plus one
# parquet manifest per session, atomically: a rerun resumes, skipping finished sessions.

# %%
store = probes.capture(loaded, [session, *sessions], str(OUT / "store"), hooks="resid_post,attn_out",
                       positions="last:*+mark:ssn+image:0", progress=False)
print(store.summary())

# %% [markdown]
# ## Query
#
# `store.query(kind, layers=..., position_group=..., **filters)` returns `x: [n, layer, d_model]` and one metadata
# row per vector: session, turn, role, position, segment, image patch, mark, the selectors that picked it, and the
# session's public labels.

# %%
x, meta = store.query("hook_resid_post", last_of_turn=True)
print("last token of every turn:", tuple(x.shape))
x_ssn, meta_ssn = store.query("hook_resid_post", position_group="mark:ssn")
print("marked SSN tokens:", tuple(x_ssn.shape), "from", meta_ssn["session_id"].unique().tolist())
meta[["session_id", "turn", "role", "segment", "position", "groups", "identity_id"]].head(8)

# %% [markdown]
# ## A first figure
#
# Results are tidy DataFrames (one row per measurement, shared column names), and every figure function takes one
# and returns a matplotlib `Figure` (or draws into the `ax=` you pass). Given a folder it also saves the figure as
# PDF + PNG, with the CSV of what it shows beside them (`analysis.figures.save_figure`), and closes it; the
# notebook shows the returned figure. As a first look, the mean norm of the residual stream per layer at the three
# kinds of stored position: a check that they are stored and differ, not a finding.

# %%
from analysis.figures import plot_layer_profile

x_all, meta_all = store.query("hook_resid_post")
norms = x_all.norm(dim=-1)  # [n, layer]
rows = []
for group in ("image:0", "mark:ssn", "last:*"):
    picked = torch.tensor([group in str(gs).split(",") for gs in meta_all["groups"]])
    for j, layer in enumerate(meta_all["layers"].iloc[0]):
        rows.append({"position_group": group, "layer": layer, "metric": "resid_norm",
                     "value": float(norms[picked, j].mean()), "n": int(picked.sum())})
norm_table = pd.DataFrame(rows)
fig = plot_layer_profile(norm_table, FIGURES, name="quickstart_resid_norm", ylabel="mean |resid_post|")
display(norm_table.pivot_table(index="position_group", columns="layer", values="value").round(1))
fig

# %% [markdown]
# Next: `02_leakage` (does the model write the PII out, under which framing), `03_probes` (where and for how many
# turns it is decodable), `04_patching` (which activations carry it to the answer), `05_custom_models` (the same
# on other families and real checkpoints). Command-line equivalents: `mmret sessions build`, `mmret capture`,
# `mmret inspect`.
