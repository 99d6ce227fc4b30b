"""The `mmret` command line end to end on a tiny random LLaVA: build sessions, leak, capture, inspect."""

import json

import pandas as pd

from analysis.cli import main


def test_build_leak_capture_inspect(tiny_dir, tmp_path, capsys):
    model = str(tiny_dir("llava"))
    sessions = tmp_path / "mt.jsonl"
    assert main(["sessions", "build", "--kind", "multiturn", "--n", "2", "--k", "0,1", "--pii-types", "SSN",
                 "--size", "64", "--out", str(sessions)]) == 0
    rows = [json.loads(line) for line in sessions.read_text().splitlines()]
    assert rows and all(r["labels"]["pii_type"] == "SSN" for r in rows)

    out = tmp_path / "leak"
    assert main(["leak", "--model", model, "--sessions", str(sessions), "--out", str(out), "--max-new-tokens", "4",
                 "--n-boot", "50", "--no-progress"]) == 0
    results = pd.read_csv(out / "results.csv")
    assert len(results) == len(rows) and {"leak", "refused", "partial", "framing"} <= set(results.columns)
    for name in ("leakage_table.csv", "leakage_table.tex", "leakage.pdf", "leakage.png"):
        assert (out / name).exists(), name
    assert "_target" not in results.columns and "response" not in results.columns  # no PII in results

    store = tmp_path / "store"
    assert main(["capture", "--model", model, "--sessions", str(sessions), "--out", str(store), "--positions",
                 "last:*+mark:ssn", "--layers", "0-1", "--no-progress"]) == 0
    assert main(["inspect", str(store)]) == 0
    printed = capsys.readouterr().out
    assert f"sessions: {len(rows)}" in printed and "mark:ssn" in printed


def test_bad_input_is_an_error_message_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"session_id": "a", "turns": []}\n')
    assert main(["capture", "--model", str(tmp_path), "--sessions", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: session 'a' has no turns" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written
    assert main(["probe", "--store", str(tmp_path), "--out", str(tmp_path / "p"), "--layers", "a-b"]) == 2
    assert "--layers 'a-b': expected layer numbers and ranges" in capsys.readouterr().err


def test_patch_command(tiny_dir, tmp_path):
    """`mmret patch` on a tiny LLaVA: an image-pair denoising sweep writes its rows, summary and heatmap."""
    sessions = tmp_path / "mmp.jsonl"
    assert main(["sessions", "build", "--kind", "mmprivacy", "--n", "2", "--framings", "caption",
                 "--pii-types", "SSN", "--size", "64", "--out", str(sessions)]) == 0
    out = tmp_path / "patch"
    assert main(["patch", "--model", str(tiny_dir("llava")), "--sessions", str(sessions), "--experiment", "denoise",
                 "--layers", "0-1", "--max-pairs", "1", "--n-boot", "20", "--out", str(out), "--no-progress"]) == 0
    rows = pd.read_csv(out / "patching_denoise.csv")
    assert set(rows["layer"]) == {0, 1} and (rows["metric"] == "logit_diff").any()
    assert (out / "patching_denoise_summary.csv").exists() and list(out.glob("patching_denoise*.pdf"))
