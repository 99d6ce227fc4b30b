"""The `mmret` command line end to end on a tiny random LLaVA: build sessions, leak, capture, inspect."""

import json

import pandas as pd
import pytest

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
                 "last:*+image:0", "--layers", "0-1", "--no-progress", "--keep-private-labels"]) == 0
    assert main(["inspect", str(store)]) == 0
    printed = capsys.readouterr().out
    assert f"sessions: {len(rows)}" in printed and "image:0" in printed
    assert (store / "private_labels.jsonl").exists()  # the probe targets (PII), kept apart from the shards


def test_probe_reads_its_targets_from_the_private_labels(tiny_dir, tmp_path, one_thread):
    """`mmret probe --target digits` needs the PII values, which only a store captured with --keep-private-labels
    keeps (beside its shards); the shards themselves hold none."""
    sessions = tmp_path / "mt.jsonl"
    assert main(["sessions", "build", "--kind", "multiturn", "--n", "6", "--k", "0", "--pii-types", "SSN",
                 "--size", "64", "--out", str(sessions)]) == 0
    store = tmp_path / "store"
    assert main(["capture", "--model", str(tiny_dir("llava")), "--sessions", str(sessions), "--out", str(store),
                 "--positions", "last:*", "--no-progress", "--keep-private-labels"]) == 0
    targets = {json.loads(line)["labels"]["_target"] for line in sessions.read_text().splitlines()}
    for shard in (store / "shards").iterdir():
        assert not any(t.encode() in shard.read_bytes() for t in targets), shard
    assert main(["probe", "--store", str(store), "--out", str(tmp_path / "probe"), "--target", "digits",
                 "--turns", "2", "--folds", "2", "--n-boot", "10"]) == 0
    results = pd.read_csv(tmp_path / "probe" / "probe_results.csv")
    assert set(results["turn"]) == {2} and len(results)


def test_bad_input_is_an_error_message_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"session_id": "a", "turns": []}\n')
    assert main(["capture", "--model", str(tmp_path), "--sessions", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: session 'a' has no turns" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written
    assert main(["probe", "--store", str(tmp_path), "--out", str(tmp_path / "p"), "--layers", "a-b"]) == 2
    assert "--layers 'a-b': expected layer numbers and ranges" in capsys.readouterr().err
    # a patching option the config refuses is named by its flag, before any model is loaded or folder made
    patch = ["patch", "--model", str(tmp_path / "no-model"), "--sessions", str(bad), "--experiment", "taskswap",
             "--out", str(tmp_path / "q")]
    assert main([*patch, "--corrupt-framing", "shout"]) == 2
    assert "--corrupt-framing 'shout': expected one of" in capsys.readouterr().err
    assert main([*patch, "--components", "resid"]) == 2
    assert "--components ['resid']: expected some of" in capsys.readouterr().err
    assert main([*patch, "--corruption", "text"]) == 2
    assert "--replace: the text corruption needs" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_patch_command(tmp_path, one_thread):
    """`mmret patch --model default`: an image-pair denoising sweep on the embedded model (whose clean and corrupt
    documents it reads apart, so the pair passes the pair check) writes its rows, summary and heatmap."""
    sessions = tmp_path / "mmp.jsonl"
    assert main(["sessions", "build", "--kind", "mmprivacy", "--n", "2", "--framings", "caption", "--pii-types",
                 "SSN", "--size", "96", "--layout", "grid", "--out", str(sessions)]) == 0
    out = tmp_path / "patch"
    assert main(["patch", "--model", "default", "--sessions", str(sessions), "--experiment", "denoise",
                 "--components", "resid_pre", "--layers", "0-1", "--max-pairs", "1", "--n-boot", "20",
                 "--out", str(out), "--no-progress"]) == 0
    rows = pd.read_csv(out / "patching_denoise.csv")
    assert set(rows["layer"]) == {0, 1} and (rows["metric"] == "logit_diff").any()
    assert (out / "patching_denoise_summary.csv").exists() and list(out.glob("patching_denoise*.pdf"))


def test_layout_grid_and_model_default(tmp_path, capsys, one_thread):
    """`sessions build --layout grid` draws the grid documents the embedded model reads, and `--model default`
    is that model in capture."""
    from PIL import Image

    from analysis.cli import model_path
    from probes.organism import DEFAULT_MODEL

    sessions = tmp_path / "grid.jsonl"
    assert main(["sessions", "build", "--kind", "mmprivacy", "--n", "1", "--framings", "caption", "--pii-types",
                 "SSN", "--layout", "grid", "--size", "96", "--out", str(sessions)]) == 0
    rows = [json.loads(line) for line in sessions.read_text().splitlines()]
    assert rows and {r["labels"]["doc_layout"] for r in rows} == {"grid"}
    image = tmp_path / rows[0]["turns"][0]["images"][0]["path"]
    assert Image.open(image).size == (96, 96)
    assert model_path("default") == str(DEFAULT_MODEL) and model_path("org/name") == "org/name"
    store = tmp_path / "store"
    assert main(["capture", "--model", "default", "--sessions", str(sessions), "--out", str(store),
                 "--positions", "last:*", "--no-progress"]) == 0
    assert f"model: {DEFAULT_MODEL}" in capsys.readouterr().out


def test_flag_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    from probes.data.session import SessionError

    assert main(["leak", "--model", "default", "--sessions", "s.jsonl", "--out", str(tmp_path / "o"),
                 "--batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmret leak: error: argument --batch-size: expected an integer >= 1")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"session_id": "a", "turns": []}\n')
    argv = ["capture", "--model", "default", "--sessions", str(bad), "--out", str(tmp_path / "o")]
    with pytest.raises(SessionError, match="has no turns"):
        main(["--debug", *argv])
    with pytest.raises(SessionError):
        main([*argv, "--debug"])  # accepted anywhere
    assert not (tmp_path / "o").exists()


def test_errors_never_show_pii(tmp_path):
    """A message that happens to carry a session's private value prints it redacted."""
    from analysis.cli import error_line, private_values

    labels = {"identity_id": "s0-00001", "pii_type": "SSN", "_target": "123-45-6789",
              "_identity": {"identity_id": "s0-00001", "name": "Ada Lovelace", "ssn": "123-45-6789"}}
    secrets = private_values(labels, "mt-s0-00001-x")
    assert secrets == {"123-45-6789", "Ada Lovelace"}  # the identity id is public (it is in the session id)
    line = error_line(ValueError("s.jsonl:3: mark 'ssn' value '123-45-6789' of Ada Lovelace\nnot found"), secrets)
    assert line == "s.jsonl:3: mark 'ssn' value '<private>' of <private> not found"
    assert error_line(NotADirectoryError(20, "Not a directory", "/a/b")) == "/a/b: Not a directory"


def test_trust_remote_code_needs_the_flag_and_is_announced(tmp_path, capsys):
    config = tmp_path / "study.yaml"
    config.write_text(f"out: {tmp_path / 'out'}\nmodels:\n  - name: remote\n    path: default\n"
                      "    trust_remote_code: true\n")
    assert main(["study", "validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert "'remote'" in err and "--trust-remote-code" in err and err.count("\n") == 1
    assert main(["study", "validate", str(config), "--trust-remote-code"]) == 0
    captured = capsys.readouterr()
    assert "trust_remote_code is on for model 'remote'" in captured.err and "trust_remote_code: true" in captured.out
    assert not (tmp_path / "out").exists()


def test_resumed_capture_says_how_many_were_done(tiny_dir, tmp_path, capsys):
    sessions = tmp_path / "mt.jsonl"
    assert main(["sessions", "build", "--kind", "multiturn", "--n", "1", "--k", "0", "--pii-types", "SSN",
                 "--size", "64", "--out", str(sessions)]) == 0
    n = len(sessions.read_text().splitlines())
    argv = ["capture", "--model", str(tiny_dir("llava")), "--sessions", str(sessions), "--out", str(tmp_path / "st"),
            "--positions", "last:*", "--no-progress"]
    assert main(argv) == 0 and "resuming" not in capsys.readouterr().err
    assert main(argv) == 0
    assert f"resuming: {n} of {n}" in capsys.readouterr().err


def test_override_flags_let_a_refused_input_through(tiny_dir, tmp_path, capsys):
    """Each refusal has its flag: --allow-partial (weights of another architecture), --allow-long (sessions over
    the context), --force-new (a store of other weights); each says what it let through."""
    import shutil

    sessions = tmp_path / "mt.jsonl"
    assert main(["sessions", "build", "--kind", "multiturn", "--n", "1", "--k", "0", "--pii-types", "SSN",
                 "--size", "64", "--out", str(sessions)]) == 0

    def capture(model, out, *flags):
        return main(["capture", "--model", str(model), "--sessions", str(sessions), "--out", str(tmp_path / out),
                     "--positions", "last:*", "--no-progress", *flags])

    partial = tmp_path / "partial"
    shutil.copytree(tiny_dir("llava"), partial)
    shutil.copy(tiny_dir("text") / "model.safetensors", partial / "model.safetensors")
    assert capture(partial, "p") == 2 and "missing" in capsys.readouterr().err
    assert capture(partial, "p", "--allow-partial") == 0 and "allow_partial" in capsys.readouterr().err

    short = tmp_path / "short"
    shutil.copytree(tiny_dir("llava"), short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 32
    (short / "config.json").write_text(json.dumps(cfg))
    assert capture(short, "l") == 2 and "--allow-long" in capsys.readouterr().err
    assert capture(short, "l", "--allow-long") == 0 and "longer than the model's context" in capsys.readouterr().err

    model = tmp_path / "model"
    shutil.copytree(tiny_dir("llava"), model)
    assert capture(model, "s") == 0
    from probes.models.tiny import build_tiny_model

    build_tiny_model("llava", tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "model.safetensors", model / "model.safetensors")  # retrained in place
    capsys.readouterr()
    assert capture(model, "s") == 2 and "fingerprint" in capsys.readouterr().err
    assert capture(model, "s", "--force-new") == 0
    assert "resuming" not in capsys.readouterr().err
