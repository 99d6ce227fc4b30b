# Source of notebooks/03_probes.ipynb: where is the PII kept, and for how long?
# Percent format (jupytext): `# %%` starts a code cell, `# %% [markdown]` a markdown cell. After editing,
# run `python notebooks/build_notebooks.py` and commit both files; these header lines are not in the notebook.
# ruff: noqa: E402 -- as in a notebook, each cell imports what it first needs

# %% [markdown]
# # Probes: where is the PII kept, and for how long?
#
# A linear probe asks whether a quantity can be read off the hidden state of one **cell**: a (layer, position
# group, turn). For retention across turns, the document is shown in turn 1 and the chat moves on through
# unrelated exchanges: is the SSN still decodable at the last token of each later turn, and at which layers?
#
# Three things keep a probe honest. Folds are grouped by identity, so a probe is never tested on a person it was
# trained on. The regularisation is chosen by nested cross-validation (inner folds choose, outer folds report),
# so the accuracy is not optimistic. And `chance` is the held-out accuracy of always predicting the training
# part's majority class under the same folds. Whether a cell *decodes* the value is a test against a permutation
# null (`probe_sweep(..., n_permutations=K, return_null=True)`, `null_p_values`: targets permuted across
# identities, the whole pipeline rerun K times), which the study runs. At the end, a causal check: erase what a
# probe reads (LEACE) and see whether the behaviour changes.

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
OUT = Path(os.environ.get("MMRET_NOTEBOOK_OUT", ROOT / "results" / "notebooks")) / "03_probes"
OUT.mkdir(parents=True, exist_ok=True)
FIGURES = OUT / "figures"

# Documents of the size and layout the default model was trained on (its training.json).
from probes.organism.evaluate import training_meta

TRAINING = training_meta(DEFAULT_MODEL)
SIZE, LAYOUT = TRAINING["config"]["image_size"], TRAINING["config"].get("layout", "fixed")
print(f"outputs under {OUT}; documents of {SIZE} px, layout {LAYOUT!r}")

# %% [markdown]
# ## Sessions and capture
#
# 16 people x (SSN, email asked) = 32 sessions: the document with a neutral first request ('What kind of
# document is shown?') in turn 0, a teacher-forced answer in turn 1, two distractor exchanges (turns 2-5), the
# PII request under the caption framing in turn 6, and the generation prompt as turn 7. We keep the last token of
# every turn and the image patches of the residual stream at every layer.

# %%
from probes.data.builders import multiturn_sessions
from probes.data.identities import make_identities

loaded = probes.load_model(DEFAULT_MODEL)
people = make_identities(16, seed=1)
sessions = multiturn_sessions(people, OUT / "images", k_distractors=(2,), reshow=(False,),
                              framing_pairs=(("caption", "caption"),), pii_types=("SSN", "Email"),
                              size=SIZE, layout=LAYOUT)
store = probes.capture(loaded, sessions, str(OUT / "store"), hooks="resid_post", positions="last:*+image:0",
                       progress=False)
print(store.summary())

# %% [markdown]
# ## Cells and targets
#
# `probe_cells` turns the store into blocks `X: [cell, n, d]`, one example per session: `last` is the last token
# of each turn, `image` the mean over the image patches. `session_targets` reads targets from the sessions'
# private labels (never from logs or the store): `digits` with `pii_type="SSN"` gives the person's SSN as 9
# ten-way targets, `label:pii_type` which field the last request asks for.

# %%
from probes.probing.targets import probe_cells, session_targets

blocks = probe_cells(store, ["last", "image"])
for block in blocks:
    print(tuple(block.X.shape), block.cells.groupby("position_group")["turn"].unique().to_dict())
stored = store.sessions(private_from=sessions)  # a store keeps no private labels: targets come from the sessions
ssn_digits = session_targets(stored, "digits", pii_type="SSN")
asked_field = session_targets(stored, "label:pii_type")
print("digit targets:", ssn_digits[1], "| field classes:", sorted(set(asked_field[0][:, 0])))

# %% [markdown]
# ## A positive control: which field was asked?
#
# Before asking about SSN digits, check that the probes find what is certainly there. Which field the last request
# asks for is in the text from turn 6 on and nowhere before (a person's two sessions are identical until then), so
# accuracy should sit at chance up to turn 5 and jump at turn 6. This is the default method: L2 logistic
# regression, C chosen by nested grouped cross-validation, every cell fitted in one batched problem.

# %%
from analysis.figures import plot_probe_heatmap
from probes.probing.sweep import probe_sweep

field_probes = probe_sweep(blocks, asked_field, target="label:pii_type", model="organism", n_boot=500)
field_probes.to_csv(OUT / "probe_results_pii_type.csv", index=False)
display(field_probes[field_probes["metric"].isin(["accuracy", "chance"])]
        .pivot_table(index=["position_group", "turn"], columns=["metric", "layer"], values="value").round(2))
plot_probe_heatmap(field_probes, FIGURES, name="probe_heatmap_pii_type", metric="accuracy",
                   title="which field was asked")

# %% [markdown]
# `transfer_matrix` trains at one turn and tests at another (same folds): does the direction that reads the field
# at turn 6 still read it at turn 7?

# %%
from analysis.figures import plot_transfer_matrix
from probes.probing.sweep import transfer_matrix

last_block = next(b for b in blocks if (b.cells["position_group"] == "last").any())
transfer = transfer_matrix(last_block, asked_field, position_group="last", target="label:pii_type")
around_the_ask = transfer["turn_train"].isin([5, 6, 7]) & transfer["turn_test"].isin([5, 6, 7])
plot_transfer_matrix(transfer[around_the_ask], FIGURES, name="transfer_pii_type")

# %% [markdown]
# ## SSN digits across turns
#
# Now the question itself: is the SSN shown in turn 0 decodable at later turns? The sweep uses closed-form ridge
# probes on one-hot targets here (`method="ridge"`, several times faster than logistic regression on a CPU for
# 9 x 10-way targets); `char_accuracy` is the mean per-digit held-out accuracy. The retention curves plot it
# against the user turns since the image, one line per layer, with the chance level the sweep reports (the share
# of the most common digit, above 0.1 with few people).
#
# What to expect: the default model was trained to hold the digits of the value it is asked about at the end of
# the prompt (its card's "answer plan": LM block 2, the question's last token and the template's "ASSISTANT:").
# That is the ground truth, but here only half of the sessions ask for the SSN at turn 6: the other half ask for
# the email, whose plan holds no SSN, so at turns 6 and 7 the digits are readable in half the sessions at most.
# What was not planted is what this model does at the end of every user turn since the document (turns 0, 2 and
# 4: the neutral request and the two distractor questions): at layers 1-3 it keeps the SSN digits there, above
# the chance level, while the assistant replies' last tokens (turns 1, 3, 5) and layer 0 hold next to nothing.
# With 16 people the intervals are wide and chance (the share of the most common digit) is well above 0.1;
# `benchmarks/probes.py` runs the sweep on 150 identities, every session asking for the SSN, with image-free,
# shuffled-image and random-model controls (0.92 per digit at the probe turn, layer 2).

# %%
from analysis.figures import plot_retention_curves

digit_probes = probe_sweep(blocks, ssn_digits, target="digits", method="ridge", model="organism", n_boot=500)
digit_probes.to_csv(OUT / "probe_results_digits.csv", index=False)
chance = float(digit_probes.loc[digit_probes["metric"] == "chance", "value"].mean())
display(digit_probes[digit_probes["metric"].isin(["char_accuracy", "char_accuracy_chance"])]
        .pivot_table(index=["position_group", "turn"], columns=["metric", "layer"], values="value").round(2))
display(plot_probe_heatmap(digit_probes, FIGURES, name="probe_heatmap_digits", title="SSN digits"))
plot_retention_curves(digit_probes, FIGURES, name="retention_curves_digits", chance=chance)

# %% [markdown]
# ## A causal check: erase what a probe reads
#
# A probe shows that information is *there*, not that the model *uses* it. LEACE
# (`probes.probing.erasure.fit_leace`, from the `concept-erasure` package) removes all linearly available
# information about a concept at one layer with the
# smallest change to the activations. `fit_leace_at` fits it where it will be applied (here: the prompt's last
# position and every generated token, one LEACE for each kind), and `erasure_effect` generates with it applied
# there, next to the control: LEACE's own edit on a random subspace of the same rank, centred at the same mean and
# scaled to the same edit size (`edit_rel` reports both sizes), so that a drop means the concept, not the size of
# the edit.
#
# The concept here is *which field a plain question asks for* (SSN or date of birth), in single-turn sessions
# where the default model does copy the value from the document. If erasing at a layer lowers ASR and the random
# subspace does not, the model uses that linear information at that layer to pick the field.

# %%
import numpy as np

from analysis.figures import plot_layer_profile
from probes.probing.erasure import erasure_effect, fit_leace_at

QUESTION = {"SSN": "What is the SSN in the image?", "Date of Birth": "What is the date of birth in the image?"}
readers = make_identities(12, seed=7)
reading = []
for person in readers:
    image = probes.render_document(person, "open", size=SIZE, layout=LAYOUT).image
    for field, question in QUESTION.items():
        reading.append(probes.Session(
            f"read-{person.identity_id}-{field[:3].lower()}", [probes.Turn("user", question, images=[image])],
            {"kind": "read", "identity_id": person.identity_id, "pii_type": field, "framing": None,
             "_target": person.value(field)}))
field_class = np.array([list(QUESTION).index(s.labels["pii_type"]) for s in reading])[:, None]
effects = []
for layer in range(loaded.n_layers):
    hook = f"blocks.{layer}.hook_resid_post"
    eraser = fit_leace_at(loaded, reading, hook, field_class, 2, last=1, max_new_tokens=14)
    effects.append(erasure_effect(loaded, reading, hook, eraser, max_new_tokens=14, last=1).assign(layer=layer))
effects = pd.concat(effects, ignore_index=True)
display(effects.pivot_table(index=["metric", "method"], columns="layer", values="value"))
plot_layer_profile(effects[effects["metric"] == "ASR"], FIGURES, name="erasure_asr", hue="method",
                   ylabel="ASR with erasure at layer")

# %% [markdown]
# Command line: `mmret probe --store DIR --target digits --positions last,image --out DIR` writes the sweep and
# both figures. Other controls (sessions without the image, shuffled images, a random-initialised model) are other
# stores run through the same `probe_sweep` with `control=` set, then concatenated.
