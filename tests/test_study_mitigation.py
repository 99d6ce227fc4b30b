"""The study's mitigation stage: its config checks, where it reads the located cells from (hand-made patching and
probe results whose top cells are known), one cheap study run through the stage (its files, the shared column
vocabulary), skipping when current, redoing only when what it reads changes, and resuming a killed stage."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from analysis.study import pipeline as study_mod
from analysis.study.config import StudyConfigError, load_study_config, mitigation_source
from analysis.study.pipeline import RESULT_COLUMNS, Study, located_sites, run_study

# /work/shared/DESIGN.md's shared column vocabulary; the stage adds only its knob (strength) and the site's role.
VOCABULARY = {"model", "family", "session_id", "identity_id", "framing", "scenario", "pii_type", "turn",
              "turn_distance", "position_group", "hook", "layer", "component", "target", "method", "metric", "value",
              "ci_low", "ci_high", "n"}

BASE = {
    "name": "mit", "models": ["default"], "seed": 1,
    "sessions": {"mmprivacy": {"identities": 6, "framings": ["direct", "caption"], "pii_types": ["SSN"]},
                 "multiturn": {"identities": 1, "k_distractors": [0]}},
    "leakage": {"enabled": False}, "capture": {"enabled": False}, "probes": {"enabled": False},
    "patching": {"experiments": ["taskswap"], "max_pairs": 6},
    "mitigation": {"enabled": True, "identities": 2, "strengths": [2.0], "protections": ["mask"],
                   "protection_strengths": [1.0], "max_new_tokens": 8},
    "statistics": {"n_boot": 20, "n_perm": 200, "allow_underpowered": True},
    "report": {"formats": ["md"]},
}

# The hand-made patching result: the pooled effect of each (layer, component) at the final position when restored
# (taskswap, denoise, exact). Decoys elsewhere are larger but must not be chosen: another position group, the noise
# direction, another experiment.
EFFECTS = {(2, "attn_out"): 0.9, (0, "mlp_out"): 0.6, (3, "resid_pre"): 0.3}
DECOYS = [dict(position_group="turn0", layer=1, component="resid_pre"),
          dict(direction="noise", layer=3, component="mlp_out"),
          dict(experiment="denoise", layer=1, component="attn_out")]


def patching_rows(n_ids: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    clean, corrupt = 4.0, -4.0
    rows = []

    def add(effect, experiment="taskswap", direction="denoise", position_group="final", **cell):
        for i in range(n_ids):
            e = effect + rng.normal(0, 0.02)
            value = corrupt + e * (clean - corrupt) if direction == "denoise" else clean - e * (clean - corrupt)
            rows.append({"model": "organism", "family": "llava", "experiment": experiment, "direction": direction,
                         "method": "exact", "session_id": f"s{i}", "identity_id": f"id{i}", "position_group":
                         position_group, "metric": "logit_diff", "value": value, "clean": clean, "corrupt": corrupt,
                         "null_by_construction": False, **cell})

    for layer in range(4):
        for comp in ("resid_pre", "attn_out", "mlp_out"):
            add(EFFECTS.get((layer, comp), 0.05), layer=layer, component=comp)
    for decoy in DECOYS:
        add(1.0, **decoy)
    return pd.DataFrame(rows)


def config(out, **over):
    return load_study_config({**BASE, "out": str(out)}, over)


# ---- config -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over, message", [
    ({"mitigation.sites": "where"}, "mitigation.sites: 'where' is not allowed; expected one of auto, patching"),
    ({"mitigation.strengths": [1, -1]}, "mitigation.strengths: -1: expected a list of numbers > 0"),
    ({"mitigation.strengths": ["big"]}, "mitigation.strengths: 'big': expected a list of numbers > 0"),
    ({"mitigation.protection_strengths": [2]}, "mitigation.protection_strengths: 2: expected a list of numbers > 0 "
                                               "and <= 1"),
    ({"mitigation.layers": [1.5]}, "mitigation.layers: 1.5: expected a list of integers >= 0"),
    ({"mitigation.protections": ["smudge"]}, "mitigation.protections: 'smudge' is not allowed; expected values from"),
    ({"mitigation.controls": ["random_seed"]}, "mitigation.controls: 'random_seed' is not allowed"),
    ({"mitigation.steer": "erase"}, "mitigation.steer: 'erase' is not allowed; expected one of add, ablate"),
    ({"mitigation.dilation": -2}, "mitigation.dilation: -2: expected a number of pixels >= 0"),
    ({"mitigation.identities": 0}, "mitigation.identities: 0: expected an integer >= 1"),
    ({"mitigation.top": 1}, "mitigation.top: unknown key; expected one of enabled, sites"),
    ({"mitigation.strengths": [], "mitigation.protections": []}, "mitigation: neither strengths"),
    ({"mitigation.sites": "given"}, "mitigation.layers: []: expected the layer indices to steer at"),
    ({"patching.enabled": False}, "mitigation.layers: []: expected the layer indices to steer at (sites 'auto'"),
    ({"mitigation.sites": "probes"}, "mitigation.sites: 'probes': expected the capture and probes stages enabled"),
    ({"mitigation.sites": "patching", "patching.experiments": ["knockout"]},
     "mitigation.sites: 'patching': expected an enabled patching stage running one of taskswap"),
    ({"mitigation.sites": "patching", "mitigation.layers": [1]}, "mitigation.layers: [1] given with sites 'patching'"),
    ({"sessions.mmprivacy.framings": ["caption", "rephrasing"]},
     "sessions.mmprivacy.framings: ['caption', 'rephrasing']: the mitigation stage's leak direction needs a refusing"),
])
def test_bad_mitigation_config_names_the_key(over, message, tmp_path):
    with pytest.raises(StudyConfigError, match=re.escape(message)):
        config(tmp_path, **over)


def test_config_accepts_what_the_stage_can_run(tmp_path):
    cfg = config(tmp_path, **{"mitigation.strengths": 1, "mitigation.layers": 2})  # single values: lists of one
    assert cfg.get("mitigation.strengths") == [1.0] and cfg.get("mitigation.layers") == [2]
    assert mitigation_source(cfg.data) == ("given", None)  # auto: given layers win
    assert mitigation_source(config(tmp_path).data) == ("patching", "taskswap")
    probes_only = config(tmp_path, **{"patching.enabled": False, "probes.enabled": True, "capture.enabled": True})
    assert mitigation_source(probes_only.data) == ("probes", None)
    # black-box protections only: no steer, so no site and no leak direction is needed
    box = config(tmp_path, **{"mitigation.strengths": [], "patching.enabled": False,
                              "sessions.mmprivacy.framings": ["caption"]})
    assert box.get("mitigation.protections") == ["mask"]


def test_stage_is_opt_in_and_the_default_study_can_turn_it_on(tmp_path):
    from analysis.study.config import default_config_path

    base = {k: v for k, v in BASE.items() if k != "mitigation"}
    quiet = load_study_config({**base, "out": str(tmp_path), "patching": {"enabled": False},
                               "sessions": {"mmprivacy": {"framings": ["caption"]}}})  # no refusing framing: fine
    assert quiet.get("mitigation.enabled") is False
    on = load_study_config(default_config_path(), {"mitigation.enabled": True})
    assert mitigation_source(on.data) == ("patching", "taskswap")


def test_framing_groups_match_the_library():
    from analysis.study.config import LEAKING_FRAMINGS, REFUSING_FRAMINGS
    from probes.mitigation.settings import LEAKING, REFUSING

    assert (REFUSING_FRAMINGS, LEAKING_FRAMINGS) == (REFUSING, LEAKING)


# ---- where the sites come from ------------------------------------------------------------------------------------
def test_located_sites_are_the_top_patching_cells(tmp_path):
    cfg = config(tmp_path, **{"mitigation.top_k": 2})
    folder = tmp_path / "organism" / "patching"
    folder.mkdir(parents=True)
    patching_rows().to_csv(folder / "patching_rows.csv", index=False)
    hooks, ranked = located_sites(Study(cfg, progress=False), cfg.data["models"][0], n_layers=4)
    assert hooks == ["blocks.2.hook_attn_out", "blocks.0.hook_mlp_out"]  # the decoys are elsewhere
    assert list(ranked["hook"][:3]) == ["blocks.2.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.3.hook_resid_pre"]
    assert ranked["value"].iloc[0] == pytest.approx(0.9, abs=0.03) and (ranked["source"] == "patching:taskswap").all()
    assert list(ranked["located"]) == [True, True] + [False] * (len(ranked) - 2)


def test_located_sites_read_the_probes_last_token(tmp_path):
    cfg = config(tmp_path, **{"patching.enabled": False, "probes.enabled": True, "capture.enabled": True})
    rows = []
    for layer, last, image in ((0, 0.3, 0.99), (1, 0.8, 0.2), (2, 0.5, 0.2)):  # image decodes best at 0: a decoy
        for group, v in (("last", last), ("image", image)):
            for metric, value in (("char_accuracy", v), ("char_accuracy_chance", 0.1)):
                rows.append({"model": "organism", "hook": "hook_resid_post", "layer": layer, "position_group": group,
                             "turn": 0, "target": "digits", "metric": metric, "value": value})
    folder = tmp_path / "organism" / "probes"
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "probe_results.csv", index=False)
    hooks, ranked = located_sites(Study(cfg, progress=False), cfg.data["models"][0], n_layers=3)
    assert hooks == ["blocks.1.hook_resid_post"] and list(ranked["layer"]) == [1, 2, 0]


def test_given_layers_beyond_the_model_name_the_key(tmp_path):
    cfg = config(tmp_path, **{"mitigation.layers": [1, 9]})
    with pytest.raises(StudyConfigError, match=re.escape("mitigation.layers: [9]: the model has layers 0-3")):
        located_sites(Study(cfg, progress=False), cfg.data["models"][0], n_layers=4)
    hooks, _ = located_sites(Study(config(tmp_path, **{"mitigation.layers": [2, 2], "mitigation.component": "mlp_out"}),
                                   progress=False), cfg.data["models"][0], n_layers=4)
    assert hooks == ["blocks.2.hook_mlp_out"]


# ---- the stage in a study -----------------------------------------------------------------------------------------
def fake_patching_stage(study, entry, sessions, work):
    """The patching stage's output, hand-made: its top cell is known."""
    patching_rows().to_csv(work / "patching_rows.csv", index=False)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("study") / "s"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study_mod, "run_patching_stage", fake_patching_stage)
        study = run_study(config(out), progress=False)
    yield out, study
    torch.set_num_threads(before)


def statuses(study):
    return {(r.stage, r.model): r.status for r in study.records}


def test_stage_steers_at_the_located_cell_and_writes_tidy_rows(first_run):
    out, study = first_run
    assert statuses(study)[("mitigation", "organism")] == "ran"
    here = out / "organism" / "mitigation"
    assert json.loads((here / "stage.json").read_text())["hash"]
    for f in ("mitigation_points.csv", "mitigation_hypervolume.csv", "mitigation_rows_privacy.csv", "fronts.png",
              "leak_directions.safetensors"):
        assert (here / f).stat().st_size > 0, f
    assert not list(out.rglob("*.partial-*")) and not list(out.rglob(".*-parts-*"))
    sites = pd.read_csv(here / "sites.csv")
    located = sites[sites["located"]]
    assert list(located["hook"]) == ["blocks.2.hook_attn_out"]
    control = located["control"].iloc[0]
    assert re.fullmatch(r"blocks\.[013]\.hook_attn_out", control)  # same component, another layer

    rows = pd.read_csv(here / "mitigation_results.csv")
    assert list(rows.columns) == RESULT_COLUMNS and set(rows.columns) <= VOCABULARY | {"strength", "site"}
    assert set(rows["site"]) == {"none", "located", "random_layer", "random_direction", "image_protection"}
    assert set(rows.loc[rows["site"] == "located", "hook"]) == {"blocks.2.hook_attn_out"}
    assert set(rows.loc[rows["site"] == "located", "layer"]) == {2}
    assert set(rows.loc[rows["site"] == "random_layer", "hook"]) == {control}
    assert (rows["model"] == "organism").all() and (rows["family"] == "llava").all()
    # L is the worst framing's ASR: each (method, strength)'s privacy_loss row matches its asr rows
    points = rows[rows["metric"].isin(["privacy_loss", "asr"])]
    for (method, strength), g in points.groupby(["method", "strength"]):
        worst = g.loc[g["metric"] == "asr", "value"].max()
        assert g.loc[g["metric"] == "privacy_loss", "value"].iloc[0] == pytest.approx(worst), (method, strength)
        assert set(g.loc[g["metric"] == "asr", "framing"]) == {"direct", "caption"}
    gains = rows[rows["metric"] == "hypervolume_gain"]
    assert set(gains["target"]) == {f"add@{control} (random layer)", "add@blocks.2.hook_attn_out (random direction)"}
    assert (gains["ci_low"] <= gains["ci_high"]).all()
    hv = rows[rows["metric"] == "hypervolume"]
    assert len(hv) == 4 and hv["value"].between(0, 1).all()
    for fig in ("organism_mitigation_fronts",):
        assert (out / "figures" / f"{fig}.png").exists() and (out / "figures" / f"{fig}.csv").exists()


def test_rerun_skips_the_finished_stage_and_loads_no_model(first_run):
    out, _ = first_run
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study_mod, "run_patching_stage", fake_patching_stage)
        again = run_study(config(out), progress=False)
    assert set(statuses(again).values()) == {"skipped", "disabled"}
    assert statuses(again)[("mitigation", "organism")] == "skipped" and not again._loaded


def test_edits_redo_the_stage_only_when_it_reads_them(tmp_path, first_run):
    out = tmp_path / "s"
    shutil.copytree(first_run[0], out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study_mod, "run_patching_stage", fake_patching_stage)
        mp.setattr(study_mod, "run_mitigation_stage", lambda *a: (_ for _ in ()).throw(AssertionError("ran")))
        edited = run_study(config(out, **{"statistics.alpha": 0.1, "probes.n_folds": 4}), progress=False)
        assert statuses(edited)[("mitigation", "organism")] == "skipped"
        assert statuses(edited)[("statistics", "")] == "ran"
        with pytest.raises(study_mod.StudyError, match="stage 'mitigation' of model 'organism' failed: ran"):
            run_study(config(out, **{"mitigation.strengths": [1.0]}), progress=False)
        with pytest.raises(study_mod.StudyError, match="stage 'mitigation'"):  # the sites' source changed
            run_study(config(out, **{"patching.max_pairs": 5}), progress=False)


def test_killed_stage_resumes_without_measuring_twice(tmp_path, first_run, monkeypatch):
    import probes.mitigation.evaluate as evaluate

    out = tmp_path / "s"
    shutil.copytree(first_run[0], out)
    monkeypatch.setattr(study_mod, "run_patching_stage", fake_patching_stage)
    real_setting, real_directions = evaluate.evaluate_setting, study_mod.leak_directions
    calls = {"settings": 0, "directions": 0}

    def dies_third(*a, **k):
        calls["settings"] += 1
        if calls["settings"] == 3:
            raise RuntimeError("killed")
        return real_setting(*a, **k)

    def counted(*a, **k):
        calls["directions"] += 1
        return real_directions(*a, **k)

    monkeypatch.setattr(evaluate, "evaluate_setting", dies_third)
    monkeypatch.setattr(study_mod, "leak_directions", counted)
    cfg = config(out, **{"mitigation.max_new_tokens": 6})
    with pytest.raises(study_mod.StudyError, match="stage 'mitigation' of model 'organism' failed: killed"):
        run_study(cfg, progress=False)
    assert calls == {"settings": 3, "directions": 1}
    assert len(list(out.glob("organism/mitigation.partial-*"))) == 1
    monkeypatch.setattr(evaluate, "evaluate_setting", real_setting)
    calls.update(settings=0, directions=0)
    counting = lambda *a, **k: calls.__setitem__("settings", calls["settings"] + 1) or real_setting(*a, **k)  # noqa
    monkeypatch.setattr(evaluate, "evaluate_setting", counting)
    resumed = run_study(cfg, progress=False)
    assert statuses(resumed)[("mitigation", "organism")] == "ran"
    n_settings = len(pd.read_csv(out / "organism/mitigation/mitigation_points.csv").drop_duplicates("method"))
    # none, the located steer, its two controls, the mask: 5 settings; 2 were kept, the directions were kept
    assert n_settings == 5 and calls == {"settings": 3, "directions": 0}
    assert not list(out.rglob("*.partial-*"))
