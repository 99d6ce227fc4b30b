"""Sweeps: grid parsing and expansion, and the submitit local executor end to end (one job fails, one finishes)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pandas as pd
import pytest

from analysis.study.config import StudyConfigError
from analysis.study.sweep import SweepError, expand, parse_grid, run_sweep, split_values

SMALL = {
    "name": "sweep-test", "models": ["default"],
    "sessions": {"mmprivacy": {"identities": 2, "framings": ["caption"], "pii_types": ["SSN"]},
                 "multiturn": {"identities": 10, "k_distractors": [0, 1]}},
    "leakage": {"enabled": False}, "patching": {"enabled": False},
    "capture": {"layers": [2]},
    "probes": {"method": "dim", "n_folds": 2, "position_groups": ["last"]},
    "statistics": {"n_boot": 20, "n_perm": 50},
    "report": {"formats": ["md"]},
}


def test_grid_values_are_yaml_and_brackets_do_not_split():
    assert split_values("[0,1],[2]") == ["[0,1]", "[2]"]
    assert parse_grid(["capture.layers=[0,1],[2]", "seed=0,1", "probes.method=ridge"]) == {
        "capture.layers": [[0, 1], [2]], "seed": [0, 1], "probes.method": ["ridge"]}
    with pytest.raises(SweepError, match="expected KEY=V1,V2"):
        parse_grid(["seed"])


def test_expand_is_the_product_and_validates_before_submitting(tmp_path):
    jobs = expand(SMALL, parse_grid(["seed=0,1", "probes.method=dim,ridge"]), tmp_path)
    assert len(jobs) == 4 and len({j.name for j in jobs}) == 4 and len({j.hash for j in jobs}) == 4
    assert all(Path(j.config["out"]).parent == tmp_path / "jobs" for j in jobs)
    with pytest.raises(StudyConfigError, match="probes.method: 'svm' is not allowed"):
        expand(SMALL, parse_grid(["probes.method=dim,svm"]), tmp_path)
    multi_gpu = expand(SMALL, {}, tmp_path, gpus=4)[0].config["models"][0]
    assert multi_gpu["device_map"] == "auto" and multi_gpu["device"] == "cuda"


def test_local_executor_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    grid = parse_grid(["models=default,/nonexistent/model"])
    table = run_sweep(SMALL, grid, tmp_path, "local", time_min=10)
    by = table.set_index("models")
    assert by.loc["default", "status"] == "done"
    assert by.loc["/nonexistent/model", "status"] == "failed"
    log = Path(by.loc["/nonexistent/model", "log"])
    assert log.exists() and "/nonexistent/model" in log.read_text()  # the failure's log names the bad model
    merged = pd.read_csv(tmp_path / "merged" / "probes.csv")
    assert set(merged["models"]) == {"default"} and (merged["layer"] == 2).all()
    assert pd.read_csv(tmp_path / "jobs.csv")["status"].tolist() == table["status"].tolist()
    # Resubmission: the finished job is skipped, the failed one is tried again (and fails again).
    again = run_sweep(SMALL, grid, tmp_path, "local", time_min=10).set_index("models")
    assert again.loc["default", "status"] == "done (earlier)"
    assert again.loc["/nonexistent/model", "status"] == "failed"
