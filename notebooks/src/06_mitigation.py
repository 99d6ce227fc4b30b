# Source of notebooks/06_mitigation.ipynb: from a located layer to a privacy-utility front.
# Percent format (jupytext): `# %%` starts a code cell, `# %% [markdown]` a markdown cell. After editing,
# run `python notebooks/build_notebooks.py` and commit both files; these header lines are not in the notebook.
# ruff: noqa: E402 -- as in a notebook, each cell imports what it first needs

# %% [markdown]
# # Mitigation: from a located layer to a privacy-utility front
#
# Patching says *where* the model decides to leak; this notebook intervenes there and measures what it buys and
# what it costs. Four steps, each with its control:
#
# 1. **Locate** the cell that carries the leak decision (task-swap patching), on one set of identities.
# 2. **Steer** there: add the *leak direction* (mean activation under refusing framings minus the mean under leaking
#    ones, fitted on the same identities) at the prompt's last position and every generated token, at a few
#    strengths. Control: the same steer at a **random layer** (the direction fitted there).
# 3. **Protect the image** instead, as a black box would: mask the sensitive fields' boxes (the oracle regions).
# 4. **Judge** every method on one plane, on **held-out identities** never used to locate or fit: privacy loss L (the
#    worst attack success rate over the five framings) against utility U (benign reads of the same documents,
#    distractor questions, no over-refusal). Each method's non-dominated points form its front; the hypervolume is
#    the area the front dominates against the reference point (L, U) = (1, 0).

# %%
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never wait on the model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from IPython.display import display
from transformers.utils import logging as hf_logging

import probes
from probes.organism import DEFAULT_MODEL
from probes.organism.evaluate import training_meta

torch.set_num_threads(1)  # tiny models: one thread is as fast, and leaves the other cores alone
hf_logging.disable_progress_bar()
# Outputs go under $MMRET_NOTEBOOK_OUT, else results/notebooks of the repository (ignored by git).
ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
OUT = Path(os.environ.get("MMRET_NOTEBOOK_OUT", ROOT / "results" / "notebooks")) / "06_mitigation"
OUT.mkdir(parents=True, exist_ok=True)
FIGURES = OUT / "figures"

TRAINING = training_meta(DEFAULT_MODEL)  # documents of the size and layout the default model was trained on
SIZE, LAYOUT = TRAINING["config"]["image_size"], TRAINING["config"].get("layout", "fixed")
loaded = probes.load_model(DEFAULT_MODEL)
print(f"outputs under {OUT}; {loaded.n_layers} layers; documents of {SIZE} px, layout {LAYOUT!r}")

# %% [markdown]
# ## Two pools of identities
#
# `fit`: where we locate and fit the leak direction. `held`: where every method is judged. The pools never share a
# person (identity ids carry their pool's seed), so a steer cannot look good by remembering whom it was fitted on.
# MM-Privacy's design: each identity has one (scenario, PII type) document, asked under all five framings. The
# default model refuses the direct ask, VQA and classification, and writes the value out under captioning and
# rephrasing: the task inconsistency a mitigation has to close.

# %%
from probes.data.builders import mmprivacy_sessions
from probes.data.identities import make_identities


def sessions_of(people):
    return mmprivacy_sessions(people, OUT / "images", pii_types=["SSN", "Phone Numbers", "Email"], size=SIZE,
                              layout=LAYOUT, design="cycle")


fit = sessions_of(make_identities(6, seed=61))
held = sessions_of(make_identities(6, seed=62))
print(f"fit: {len(fit)} sessions, held-out: {len(held)} sessions")

# %% [markdown]
# ## 1. Locate
#
# The task swap (`run_patching(..., "taskswap")`, notebook 04) pairs each captioning session (it leaks) with the
# same document under the direct ask (it refuses), and writes one cell of the leaking run into the refusing one.
# The effect on the logit difference is normalised: 1 means that cell alone brings the leak back. We keep the final
# prompt position (where a last-position steer acts) and take the strongest cell with
# `probes.mitigation.sites.located_hooks`; the study's `mitigation` stage does exactly this with
# `patching_site_cells` on its own patching results. The control site, `random_hooks`, is the same component at a
# layer drawn at random among those not located.

# %%
from analysis.results import run_patching
from analysis.study.pipeline import patching_site_cells
from probes.mitigation.sites import located_hooks, random_hooks

captions = [s for s in fit if s.labels["framing"] == "caption"]
rows = run_patching(loaded, captions, "taskswap", OUT / "patching", components=("resid_pre", "attn_out", "mlp_out"),
                    n_boot=200, figures=False, progress=False)
cells = patching_site_cells(rows, "taskswap", n_boot=200)
display(cells.sort_values("value", ascending=False)[["layer", "component", "position_group", "value", "ci_low",
                                                     "ci_high", "n"]].head(6).round(3))
located = located_hooks(cells, k=1)[0]
control = random_hooks([located], loaded.n_layers, seed=0)[0]
print(f"located: {located}; random layer control: {control}")

# %% [markdown]
# ## 2. Steer at the located layer, and at a random one
#
# `leak_directions` reads every hook's activation at the prompt's last position, one forward per `fit` session,
# and returns refusing-minus-leaking means. `steer_settings` makes one `Setting` per (hook, strength): strength 1
# moves a leaking prompt's mean onto a refusing one's, strength 0 changes nothing (every front starts at the
# unmitigated model). The random-layer steer uses the direction fitted at its own layer: the same recipe, placed
# without the patching result. The printed norms say how far apart the framings sit at each site; a control for
# the norm alone, a random direction as long as the located one (`probes.mitigation.steer.random_direction_like`),
# is the study stage's second control.

# %%
from probes.mitigation.settings import blackbox_settings, leak_directions, steer_settings

directions = leak_directions(loaded, fit, [located, control])
print({hook: round(float(r.norm()), 2) for hook, r in directions.items()})
STRENGTHS = (1.0, 2.0)
settings = (steer_settings({located: directions[located]}, STRENGTHS)
            + steer_settings({control: directions[control]}, STRENGTHS, tag=" (random layer)"))

# %% [markdown]
# ## 3. One black-box protection: the oracle mask
#
# A protection sees the model only through its answers. `mask` paints the sensitive fields' boxes (SSN, phone,
# email: the renderer's exact boxes, the oracle) in the page colour; its strength grows each box by up to
# `dilation` pixels. The name and date of birth stay readable, so utility should survive where the steer's may
# not. (`blur`, `pixelate`, `jpeg`, `downscale` act on the whole image; `probes.mitigation.learned` learns a
# protector from black-box queries alone.)

# %%
settings += blackbox_settings(["mask"], (0.5, 1.0), dilation=4.0)
print([(s.method, s.strength) for s in settings])

# %% [markdown]
# ## 4. Judge on held-out identities: the fronts
#
# `run_mitigation` (= `mmret mitigate`) answers every held-out privacy session and its benign twins under each
# setting (the unmitigated one added), scores them, and writes the points, the hypervolumes with 95% intervals
# that resample identities, each method's chosen point (the lowest L keeping U >= 0.95 x the unmitigated U) and
# the figures. It is resumable per setting: run it again and nothing is generated twice.

# %%
from analysis.figures import plot_fronts
from analysis.mitigation import run_mitigation

done = run_mitigation(loaded, held, settings, OUT / "mitigation", n_boot=200, progress=False)
points = done.points
display(points[["method", "strength", "L", "U", "asr_caption", "asr_rephrasing", "u_no_refusal"]].round(3))
plot_fronts(points[points["method"] != "none"], FIGURES, name="mitigation_fronts")

# %% [markdown]
# The hypervolume table (reference (1, 0); larger is better), then the claim the located layer has to earn: its
# front dominates more of the plane than the random layer's. **Null**: the patching result does not help place the
# steer (gain 0). The interval resamples the held-out identities, the same draw for both fronts (paired); an
# interval above 0 rejects the null. With six identities it is wide: `benchmarks/mitigation.py` and the study's
# `mitigation` stage measure it on more.

# %%
from probes.mitigation.measures import hypervolume_gain

display(done.hypervolume.round(3))
gain = hypervolume_gain(points, done.draws, f"add@{located}", f"add@{control} (random layer)")
print(f"hypervolume gain, located vs random layer: {gain['gain']:.3f} "
      f"[{gain['ci_low']:.3f}, {gain['ci_high']:.3f}]")

# %% [markdown]
# ## Is the inconsistency closed, or moved?
#
# ASR per framing before any mitigation (dashed) and at each method's chosen point (solid). A method that only
# shifts the leak to another framing would lower the caption ASR and raise another; L, the worst framing, would
# not move. A method with no point keeping 95% of the utility has no chosen point and no line.

# %%
import pandas as pd

from analysis.figures import plot_framing_shift
from probes.mitigation.settings import best_point

best = pd.DataFrame([b for m in sorted(set(points["method"]) - {"none"}) if (b := best_point(points, m)) is not None])
before = points[points["method"] == "none"].assign(label="before")
shift = pd.concat([before.assign(method=m) for m in best["method"]] + [best.assign(label="after")]) if len(best) \
    else before.assign(method="none")
plot_framing_shift(shift, FIGURES, name="framing_shift")

# %% [markdown]
# ## In the study
#
# The study's `mitigation` stage (`analysis/study/config.py`, section `mitigation`) runs these steps on its own
# results: the top `top_k` cells of its patching stage (task swap first), else its probes' best layers at the last
# token, else `layers` given by hand; the random-layer and random-direction controls; the configured image
# protections; fresh held-out identities. It writes `sites.csv`, the tables above and `mitigation_results.csv`
# (tidy rows: privacy loss, utility, per-framing ASR, hypervolumes and the located-vs-control gains with their
# intervals) into `<out>/<model>/mitigation/`, and the fronts into the study's figures.
