"""The study pipeline on the embedded model: one tiny study run once, then reruns, edits, faults and bad configs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import re
import shutil

import pandas as pd
import pytest

from analysis.study import pipeline as study_mod
from analysis.study.config import StudyConfigError, default_config_path, load_study_config
from analysis.study.pipeline import StudyError, run_study

TINY = {
    "name": "tiny", "models": ["default"], "seed": 3,
    "sessions": {"mmprivacy": {"identities": 4, "framings": ["direct", "caption"], "pii_types": ["SSN", "Email"]},
                 "multiturn": {"identities": 12, "k_distractors": [0, 2]}},
    "leakage": {"max_new_tokens": 20},
    "capture": {"layers": [1, 3]},
    "probes": {"method": "ridge", "n_folds": 3, "mdl": True, "n_permutations": 4},
    "patching": {"experiments": ["denoise"], "max_pairs": 2, "components": ["resid_pre"]},
    "statistics": {"n_boot": 50, "n_perm": 200, "allow_underpowered": True},  # 2 pairs: a pipeline check
}


def tiny(out, **over):
    return load_study_config({**TINY, "out": str(out)}, over)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards and fits: two contending threads only stall
    out = tmp_path_factory.mktemp("study") / "s"
    study = run_study(tiny(out), progress=False)
    yield out, study
    torch.set_num_threads(before)


def statuses(study):
    """Each stage's status, but the mitigation stage's (off in TINY: tests/test_study_mitigation.py runs it)."""
    return {(r.stage, r.model): r.status for r in study.records if r.stage != "mitigation"}


def test_study_writes_every_stage(first_run):
    out, study = first_run
    assert set(statuses(study).values()) == {"ran"}
    for stage in ("sessions", "organism/leakage", "organism/capture", "organism/probes", "organism/patching",
                  "statistics", "figures", "report"):
        assert json.loads((out / stage / "stage.json").read_text())["hash"]
    assert not list(out.rglob("*.partial-*")) and not list(out.rglob(".*-parts-*"))  # resumable parts removed
    probes = pd.read_csv(out / "organism/probes/probe_results.csv")
    assert sorted(probes["layer"].unique()) == [1, 3] and set(probes["turn"]) >= {0, 2}
    code = probes[probes["metric"].isin(["compression", "control_compression"])]  # probes.mdl: true
    assert len(code) and (code["value"] > 0).all() and set(code["layer"]) == {1, 3}
    tests = pd.read_csv(out / "statistics/probe_tests.csv")  # against the permutation null (4 draws here)
    assert {"p_value", "q_value", "significant", "null_mean", "observed"} <= set(tests.columns)
    assert tests["q_value"].between(0, 1).all() and (tests["n_permutations"] == 4).all()
    assert (tests["q_value"] >= tests["p_value"] - 1e-12).all()  # BH never lowers a p-value
    leak_tests = pd.read_csv(out / "statistics/leakage_tests.csv")
    assert set(leak_tests["framing"]) == {"caption"}  # each framing against the direct ask
    for fig in ("organism_leakage", "organism_probe_heatmap_digits", "organism_probe_patch_overlay",
                "organism_token_strip", "organism_patching_denoise_denoise_exact"):
        assert (out / "figures" / f"{fig}.pdf").exists() and (out / "figures" / f"{fig}.png").exists()
    html = (out / "report/report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "Reproducibility" in html and "n_perm: 200" in html
    md = (out / "report/report.md").read_text()
    assert "](../figures/organism_probe_heatmap_digits.png)" in md
    assert (out / "report" / ".." / "figures" / "organism_probe_heatmap_digits.png").exists()


def test_rerun_with_nothing_changed_skips_everything(first_run):
    out, _ = first_run
    again = run_study(tiny(out), progress=False)
    assert set(statuses(again).values()) == {"skipped"}
    assert not again._loaded  # no model was even loaded


def test_config_edit_redoes_only_what_reads_it(tmp_path, first_run):
    out = tmp_path / "s"  # a copy: the other tests read the first run as it was
    shutil.copytree(first_run[0], out)
    edited = run_study(tiny(out, **{"statistics.alpha": 0.1}), progress=False)
    st = statuses(edited)
    assert st[("statistics", "")] == st[("figures", "")] == st[("report", "")] == "ran"
    assert all(st[(s, "organism")] == "skipped" for s in ("leakage", "capture", "probes", "patching"))
    assert st[("sessions", "")] == "skipped"


def test_failed_stage_keeps_partial_and_resumes(tmp_path, first_run, monkeypatch):
    src, _ = first_run
    out = tmp_path / "s"
    shutil.copytree(src, out)
    calls = []
    real = study_mod.run_patching_stage

    def boom(study, entry, sessions, work):
        (work / "half.txt").write_text("x")
        calls.append(work)
        raise RuntimeError("killed")

    monkeypatch.setattr(study_mod, "run_patching_stage", boom)
    cfg = tiny(out, **{"patching.max_pairs": 1})
    with pytest.raises(StudyError, match="stage 'patching' of model 'organism' failed: killed"):
        run_study(cfg, progress=False)
    partial = calls[0]
    assert partial.name.startswith("patching.partial-") and (partial / "half.txt").exists()
    old = json.loads((out / "organism/patching/stage.json").read_text())["hash"]
    assert old not in partial.name  # the old, complete stage is still there, untouched
    monkeypatch.setattr(study_mod, "run_patching_stage", real)
    resumed = run_study(cfg, progress=False)
    assert statuses(resumed)[("patching", "organism")] == "ran"
    assert (out / "organism/patching/half.txt").exists()  # ran in the same partial folder, then renamed
    assert not list(out.rglob("*.partial-*"))
    rows = pd.read_csv(out / "organism/patching/patching_rows.csv")
    assert rows["session_id"].nunique() == 1


def test_capture_stage_split_over_workers_equals_the_single_run(tmp_path, first_run):
    """`mmret study run --shard i/n` per worker, then a plain run: the capture stage finishes from the workers'
    sessions (none captured twice) with the tensors of the single-process study, byte for byte."""
    import torch
    from safetensors import safe_open

    from analysis.study.pipeline import run_capture_shard

    out = tmp_path / "s"
    only = {"leakage.enabled": False, "probes.enabled": False, "patching.enabled": False}
    for i in (1, 0):
        (store,) = run_capture_shard(tiny(out, **only), (i, 2), progress=False)
    done = {f.name: f.stat().st_mtime_ns for f in (store / "shards").glob("*.parquet")}
    assert len(done) == 12 and not (out / "organism/capture/stage.json").exists()  # not finished by a worker
    st = statuses(run_study(tiny(out, **only), progress=False))
    assert st[("capture", "organism")] == "ran"
    final = out / "organism/capture/store/shards"
    assert {f.name: f.stat().st_mtime_ns for f in final.glob("*.parquet")} == done  # resumed, nothing redone

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                out[f.name] = {k: fh.get_tensor(k).view(-1).view(torch.uint8).numpy().tobytes() for k in fh.keys()}
        return out

    assert tensors(final) == tensors(first_run[0] / "organism/capture/store/shards")


def test_fingerprint_sees_weights_retrained_in_place(tmp_path, monkeypatch):
    """Same shapes give the same file sizes: the fingerprint reads the content (small files) or the modification
    time (large shards)."""
    from analysis.study import config as study_config

    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 100)
    before = study_config.model_fingerprint(str(tmp_path))
    weights.write_bytes(b"b" * 100)
    assert study_config.model_fingerprint(str(tmp_path)) != before
    monkeypatch.setattr("probes.models.loading.HASHED_WEIGHTS_MAX_BYTES", 10)
    os.utime(weights, ns=(10**18, 10**18))
    big = study_config.model_fingerprint(str(tmp_path))
    os.utime(weights, ns=(2 * 10**18, 2 * 10**18))
    assert study_config.model_fingerprint(str(tmp_path)) != big


def test_unreadable_done_marker_means_not_done(tmp_path):
    from analysis.study.config import marker_hash

    marker = tmp_path / "stage.json"
    assert marker_hash(marker) is None
    marker.write_text('{"hash": "abc"}')
    assert marker_hash(marker) == "abc"
    for broken in ("{", "[1]", "\udcff"):
        marker.write_text(broken, errors="surrogateescape")
        assert marker_hash(marker) is None


def test_leakage_tests_pair_each_framing_row_with_the_direct_ask():
    from analysis.study.pipeline import leakage_tests

    rows = []
    for i in range(12):  # captioning leaks for every identity, the direct ask (asked twice for id0) never does
        for framing, leak in [("direct", False), ("caption", True), ("vqa", i % 2 == 0)] + \
                             ([("direct", False)] if i == 0 else []):
            rows.append({"model": "m", "identity_id": f"id{i}", "pii_type": "SSN", "scenario": "open",
                         "framing": framing, "leak": leak})
    tests = leakage_tests(pd.DataFrame(rows), n_perm=2000).set_index("framing")
    assert set(tests.index) == {"caption", "vqa"} and (tests["n"] == 12).all()  # id0's two direct rows: one pair
    assert tests.loc["caption", "effect"] == pytest.approx(1.0) and tests.loc["vqa", "effect"] == pytest.approx(0.5)
    assert tests.loc["caption", "p_value"] < 0.01 and tests.loc["caption", "significant"]


def test_best_layer_reads_the_main_metric():
    from analysis.study.pipeline import best_layer

    df = pd.DataFrame({"position_group": ["last"] * 4 + ["image"], "metric": "char_accuracy",
                       "layer": [0, 1, 2, 2, 3], "turn": [0, 0, 0, 2, 0], "value": [0.2, 0.9, 0.5, 0.6, 0.99]})
    assert best_layer(df, "last") == 1 and best_layer(df, "image") == 3
    assert best_layer(df, "last", final_turn=True) == 2 and best_layer(df, "mark:ssn") is None


def test_shipped_default_config_is_valid():
    cfg = load_study_config(default_config_path())
    assert cfg.get("models")[0]["path"] == "default"
    assert cfg.get("sessions.mmprivacy.framings") == ["direct", "VQA", "caption", "rephrasing", "classification"]


@pytest.mark.parametrize("over, message", [
    ({"probes.method": "lgreg"}, "probes.method: 'lgreg' is not allowed; expected one of logreg, ridge, dim"),
    ({"probes.nfolds": 3}, "probes.nfolds: unknown key; expected one of enabled, targets"),
    ({"sessions.mmprivacy.framings": ["direct", "poem"]}, "'poem' is not allowed; expected values from direct"),
    ({"capture.layers": "some"}, "capture.layers: 'some': expected 'all' or a list of layer indices"),
    ({"statistics.alpha": 2}, "statistics.alpha: 2: expected a number between 0 and 1"),
    ({"leakage.batch_size": 0}, "leakage.batch_size: 0: expected an integer >= 1"),
    ({"seed": "zero"}, "seed: 'zero': expected an integer"),
    ({"probes.mdl": "yes"}, "probes.mdl: 'yes': expected true or false"),
    ({"probes.n_permutations": 1}, "probes.n_permutations: 1: expected an integer >= 2"),
    ({"models": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "'a' is used twice"),
    ({"patching.max_pairs": 4, "statistics.allow_underpowered": False},
     "patching.max_pairs: 4 (of 4 identities): pairs of 4 identities allow no p-value below 0.125 > alpha 0.05"),
    ({"patching.max_pairs": 24, "statistics.allow_underpowered": False},
     "patching.max_pairs: 24 (of 4 identities): pairs of 4 identities"),
])
def test_bad_config_names_the_key(over, message, tmp_path):
    with pytest.raises(StudyConfigError, match=re.escape(message)):
        tiny(tmp_path, **over)


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("probes: [unclosed\n")
    with pytest.raises(StudyConfigError, match="bad.yaml: not valid YAML"):
        load_study_config(bad)
    bad.write_text("probes:\n  method: svm\n")
    with pytest.raises(StudyConfigError, match="bad.yaml: probes.method"):
        load_study_config(bad)
