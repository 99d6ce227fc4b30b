"""Bad inputs and faults through the command line (issue 21): does each end in a clear error and leave nothing behind?

Every case of `FAULTS` runs `mmret ...` in this process (`analysis.cli.main`) on a tiny random LLaVA and small
sessions built once (`build_workspace`), each in a folder of its own. tests/test_faults.py runs the same table as
tests. Prints `name: value` lines:

    faults_total                 cases in the table
    faults_clear_error           exit 2, one line `mmret <command>: error: ...` that names the file or flag at fault,
                                 no traceback (target: faults_total)
    faults_silent_success        exit 0 on a wrong input (target 0)
    faults_left_partial_output   cases after which a file or folder under the case's folder was added or changed
                                 (target 0)
    faults_pii_in_outputs        cases whose printed text, logs or written files hold a PII value of the sessions
                                 (target 0)

    python benchmarks/faults.py [--list] [--only NAME,...]

A case with `needs` set waits for a library change (named there); it is counted like any other.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's probes/, not benchmarks/probes.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PII_FIELDS = ("name", "date_of_birth", "address", "email", "phone", "ssn")  # of `_identity`; plus `_target`
PICKLE_MARK = "mmret-fault-pickle-ran"  # printed only if a pickled checkpoint were unpickled with its code


# ---- the shared inputs: built once ---------------------------------------------------------------------------------
@dataclass
class Workspace:
    root: Path
    model: Path  # a tiny random LLaVA (2 LM layers)
    text_model: Path  # a tiny Llama causal LM: another architecture
    other_weights: Path  # the tiny LLaVA again with seed 1: same architecture, other weights
    sessions: Path  # multi-turn sessions with their images (valid)
    mmp: Path  # MM-Privacy sessions (valid)
    store: Path  # `mmret capture` of `sessions` by `model`
    pii: set[str] = field(default_factory=set)


def build_workspace(root: str | os.PathLike) -> Workspace:
    from analysis.cli import main
    from probes.models.tiny import build_tiny_model

    root = Path(root)
    ws = Workspace(root, root / "tiny_llava", root / "tiny_text", root / "tiny_llava_seed1", root / "data" / "mt.jsonl",
                   root / "data" / "mmp.jsonl", root / "store")
    with _quiet():
        build_tiny_model("llava", ws.model)
        build_tiny_model("text", ws.text_model)
        build_tiny_model("llava", ws.other_weights, seed=1)
        for kind, out in (("multiturn", ws.sessions), ("mmprivacy", ws.mmp)):
            extra = ["--k", "0"] if kind == "multiturn" else ["--framings", "caption"]
            code = main(["sessions", "build", "--kind", kind, "--n", "2", "--pii-types", "SSN", "--size", "64",
                         "--out", str(out), *extra])
            assert code == 0, f"building {kind} sessions failed"
        code = main(["capture", "--model", str(ws.model), "--sessions", str(ws.sessions), "--out", str(ws.store),
                     "--positions", "last:*", "--no-progress"])
        assert code == 0, "the reference capture failed"
    for path in (ws.sessions, ws.mmp):
        for row in _rows(path):
            ws.pii |= pii_values(row["labels"])
    return ws


def pii_values(labels: dict) -> set[str]:
    ident = labels.get("_identity") or {}
    values = {str(ident[k]) for k in PII_FIELDS if ident.get(k)}
    if labels.get("_target"):
        values.add(str(labels["_target"]))
    return {v for v in values if len(v) >= 4}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


# ---- helpers that make a bad input inside a case's folder ---------------------------------------------------------
def sessions_copy(ws: Workspace, case: Path, edit: Callable[[list[dict]], list[dict]] | None = None,
                  source: Path | None = None, name: str = "s.jsonl") -> Path:
    """The sessions of `source` (default: ws.sessions) with absolute image paths, edited, written to case/name."""
    source = source or ws.sessions
    rows = _rows(source)
    for row in rows:
        for turn in row["turns"]:
            for im in turn.get("images", []):
                im["path"] = str(source.parent / im["path"])
    rows = edit(rows) if edit else rows
    out = case / name
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def model_copy(ws: Workspace, case: Path, source: Path | None = None) -> Path:
    out = case / "model"
    shutil.copytree(source or ws.model, out)
    return out


def edit_config(model: Path, edit: Callable[[dict], object]) -> None:
    cfg = json.loads((model / "config.json").read_text())
    result = edit(cfg)
    (model / "config.json").write_text(json.dumps(cfg if result is None else result))


def first_image(rows: list[dict]) -> dict:
    return next(im for r in rows for t in r["turns"] for im in t.get("images", []))


def capture_argv(ws: Workspace, case: Path, *extra: str, model: Path | str | None = None,
                 sessions: Path | None = None, out: Path | str | None = None) -> list[str]:
    return ["capture", "--model", str(model or ws.model), "--sessions", str(sessions or ws.sessions),
            "--out", str(out or case / "out"), "--no-progress", *extra]


def leak_argv(ws: Workspace, case: Path, *extra: str, out: Path | str | None = None) -> list[str]:
    return ["leak", "--model", str(ws.model), "--sessions", str(ws.mmp), "--out", str(out or case / "out"),
            "--max-new-tokens", "2", "--n-boot", "10", "--no-progress", *extra]


def study_yaml(case: Path, text: str, name: str = "study.yaml") -> Path:
    path = case / name
    path.write_text(text)
    return path


def read_only_folder(case: Path) -> Path:
    """A folder in which nothing can be made, also for root (who ignores permission bits): sysfs refuses mkdir
    to everyone; as another user, a folder without write permission."""
    if os.geteuid() == 0:
        return Path("/sys")
    ro = case / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


def pickled_checkpoint(model: Path) -> None:
    """Replace the safetensors weights by a pickle that would run code if unpickled without torch's allow-list."""
    import torch

    class Payload:
        def __reduce__(self):
            return (print, (PICKLE_MARK,))

    (model / "model.safetensors").unlink()
    torch.save({"weights": Payload()}, model / "pytorch_model.bin")


@contextlib.contextmanager
def disk_full() -> Iterator[None]:
    """Every fsync fails as on a full disk (ENOSPC), as the last write of an atomic save would."""
    real = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    os.fsync = full
    try:
        yield
    finally:
        os.fsync = real


CLEANUPS: dict[Path, list[Callable[..., object]]] = {}


def on_cleanup(case: Path, fn: Callable[..., object]) -> None:
    """Run `fn` once the case has run (e.g. release a lock the case holds)."""
    CLEANUPS.setdefault(case, []).append(fn)


# ---- the table -------------------------------------------------------------------------------------------------------
Make = Callable[[Workspace, Path], tuple[list[str], list[str]]]  # -> (argv, what the message must name)


@dataclass
class Fault:
    name: str
    make: Make
    needs: str = ""  # the library change this case waits for ("": none)
    during: Callable[[], contextlib.AbstractContextManager] | None = None  # e.g. a full disk while it runs


def _case(name: str, needs: str = "", **kw) -> Callable[[Make], Make]:
    def register(make: Make) -> Make:
        FAULTS.append(Fault(name, make, needs, **kw))
        return make
    return register


FAULTS: list[Fault] = []

# -- sessions files
@_case("sessions_missing")
def _(ws, case):
    return capture_argv(ws, case, sessions=case / "none.jsonl"), ["none.jsonl"]


@_case("sessions_is_a_directory")
def _(ws, case):
    (case / "s.jsonl").mkdir()
    return capture_argv(ws, case, sessions=case / "s.jsonl"), ["s.jsonl"]


@_case("sessions_not_utf8")
def _(ws, case):
    (case / "s.jsonl").write_bytes(b'{"session_id": "\xff\xfe"}\n')
    return capture_argv(ws, case, sessions=case / "s.jsonl"), ["s.jsonl"]


@_case("sessions_empty_file")
def _(ws, case):
    (case / "s.jsonl").write_text("")
    return capture_argv(ws, case, sessions=case / "s.jsonl"), ["s.jsonl"]


@_case("sessions_blank_lines_only")
def _(ws, case):
    (case / "s.jsonl").write_text("\n  \n")
    return capture_argv(ws, case, sessions=case / "s.jsonl"), ["s.jsonl"]


@_case("sessions_bad_json_line")
def _(ws, case):
    s = sessions_copy(ws, case)
    lines = s.read_text().splitlines()
    s.write_text("\n".join([lines[0], lines[1][:-5], *lines[2:]]) + "\n")
    return capture_argv(ws, case, sessions=s), ["s.jsonl:2"]


@_case("sessions_line_not_an_object")
def _(ws, case):
    (case / "s.jsonl").write_text("[1, 2]\n")
    return capture_argv(ws, case, sessions=case / "s.jsonl"), ["s.jsonl:1"]


@_case("sessions_no_turns")
def _(ws, case):
    (case / "s.jsonl").write_text('{"session_id": "a", "turns": []}\n')
    return capture_argv(ws, case, sessions=case / "s.jsonl"), ["s.jsonl:1"]


@_case("sessions_duplicate_id")
def _(ws, case):
    s = sessions_copy(ws, case, lambda rows: [rows[0], rows[0], *rows[1:]])
    return capture_argv(ws, case, sessions=s), ["s.jsonl:2"]


@_case("sessions_bad_role")
def _(ws, case):
    def edit(rows):
        rows[0]["turns"][0]["role"] = "narrator"
        return rows
    return capture_argv(ws, case, sessions=sessions_copy(ws, case, edit)), ["s.jsonl:1", "role"]


@_case("image_missing")
def _(ws, case):
    def edit(rows):
        first_image(rows)["path"] = str(case / "missing.png")
        return rows
    return capture_argv(ws, case, sessions=sessions_copy(ws, case, edit)), ["s.jsonl", "missing.png"]


@_case("image_sha256_mismatch")
def _(ws, case):
    def edit(rows):
        first_image(rows)["sha256"] = "0" * 64
        return rows
    return capture_argv(ws, case, sessions=sessions_copy(ws, case, edit)), ["s.jsonl", "sha256"]


@_case("image_not_an_image")
def _(ws, case):
    bad = case / "not_an_image.png"
    bad.write_bytes(b"this is not a PNG file")

    def edit(rows):
        first_image(rows).update(path=str(bad), sha256=hashlib.sha256(bad.read_bytes()).hexdigest())
        return rows
    return capture_argv(ws, case, sessions=sessions_copy(ws, case, edit)), ["s.jsonl", "not_an_image.png"]


@_case("leak_sessions_without_target")
def _(ws, case):
    def edit(rows):
        for r in rows:
            r["labels"].pop("_target", None)
        return rows
    s = sessions_copy(ws, case, edit, source=ws.mmp)
    argv = leak_argv(ws, case)
    argv[argv.index("--sessions") + 1] = str(s)
    return argv, ["s.jsonl"]


# -- position selectors, hooks, layers
@_case("selector_bad_syntax")
def _(ws, case):
    return capture_argv(ws, case, "--positions", "last:*+nonsense:3"), ["nonsense:3"]


@_case("selector_matches_nothing_image")
def _(ws, case):
    return capture_argv(ws, case, "--positions", "image:9"), ["image:9"]


@_case("selector_matches_nothing_mark")
def _(ws, case):
    return capture_argv(ws, case, "--positions", "mark:nolabel"), ["mark:nolabel"]


@_case("selector_matches_nothing_turn")
def _(ws, case):
    return capture_argv(ws, case, "--positions", "turn:99"), ["turn:99"]


@_case("hook_unknown")
def _(ws, case):
    return capture_argv(ws, case, "--hooks", "resid_middle"), ["resid_middle"]


@_case("layers_out_of_range")
def _(ws, case):
    return capture_argv(ws, case, "--layers", "0-9"), ["layers", "2 layers"]


@_case("layers_bad_syntax")
def _(ws, case):
    return ["probe", "--store", str(ws.store), "--out", str(case / "out"), "--layers", "a-b"], ["--layers"]


@_case("layers_negative")
def _(ws, case):
    return capture_argv(ws, case, "--layers=-1"), ["--layers"]


# -- models
@_case("model_path_missing")
def _(ws, case):
    return capture_argv(ws, case, model=case / "no_such_model"), ["no_such_model"]


@_case("model_folder_without_config")
def _(ws, case):
    (case / "model").mkdir()
    return capture_argv(ws, case, model=case / "model"), ["config.json"]


@_case("config_not_json")
def _(ws, case):
    m = model_copy(ws, case)
    (m / "config.json").write_text("{not json")
    return capture_argv(ws, case, model=m), ["config.json"]


@_case("config_not_an_object")
def _(ws, case):
    m = model_copy(ws, case)
    (m / "config.json").write_text("[1, 2, 3]")
    return capture_argv(ws, case, model=m), ["config.json"]


@_case("config_field_wrong_type")
def _(ws, case):
    m = model_copy(ws, case)
    edit_config(m, lambda c: c["text_config"].update(num_hidden_layers="two"))
    return capture_argv(ws, case, model=m), ["config.json", "num_hidden_layers"]


@_case("config_unknown_architecture")
def _(ws, case):
    m = model_copy(ws, case)
    edit_config(m, lambda c: c.update(architectures=["FooForConditionalGeneration"]))
    return capture_argv(ws, case, model=m), ["FooForConditionalGeneration"]


@_case("weights_garbage_safetensors")
def _(ws, case):
    m = model_copy(ws, case)
    (m / "model.safetensors").write_bytes(os.urandom(4096))
    return capture_argv(ws, case, model=m), ["model.safetensors"]


@_case("weights_truncated_safetensors")
def _(ws, case):
    m = model_copy(ws, case)
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[: len(data) // 2])
    return capture_argv(ws, case, model=m), ["model.safetensors"]


@_case("weights_pickled_bin")
def _(ws, case):
    m = model_copy(ws, case)
    pickled_checkpoint(m)
    return capture_argv(ws, case, model=m), ["pytorch_model.bin"]


@_case("weights_of_another_architecture")
def _(ws, case):
    m = model_copy(ws, case)
    shutil.copy(ws.text_model / "model.safetensors", m / "model.safetensors")
    return capture_argv(ws, case, model=m), ["model.safetensors"]


@_case("weights_of_other_shapes")
def _(ws, case):
    m = model_copy(ws, case)
    edit_config(m, lambda c: c["text_config"].update(intermediate_size=256))
    return capture_argv(ws, case, model=m), ["model.safetensors"]


@_case("sessions_longer_than_context")
def _(ws, case):
    m = model_copy(ws, case)
    edit_config(m, lambda c: c["text_config"].update(max_position_embeddings=32))
    return capture_argv(ws, case, model=m), ["32"]


# -- stores
def _store_of(ws: Workspace, case: Path, model: Path) -> Path:
    from analysis.cli import main

    with _quiet():
        code = main(capture_argv(ws, case, "--positions", "last:*", model=model, out=case / "store"))
    assert code == 0, "the case's own capture failed"
    return case / "store"


@_case("store_resumed_with_other_weights")
def _(ws, case):
    m = model_copy(ws, case)
    store = _store_of(ws, case, m)
    shutil.copy(ws.other_weights / "model.safetensors", m / "model.safetensors")  # rebuilt in place
    return capture_argv(ws, case, "--positions", "last:*", model=m, out=store), ["store"]


@_case("store_resumed_with_other_settings")
def _(ws, case):
    shutil.copytree(ws.store, case / "store")
    return capture_argv(ws, case, "--positions", "final", out=case / "store"), ["store"]


@_case("store_held_by_another_writer")
def _(ws, case):
    from probes.activations.lock import StoreLock

    shutil.copytree(ws.store, case / "store")
    lock = StoreLock(case / "store").__enter__()  # a writer at work (its flock conflicts with any other open)
    on_cleanup(case, lock.__exit__)
    return capture_argv(ws, case, "--positions", "last:*", out=case / "store"), [f"process {os.getpid()}"]


@_case("inspect_not_a_store")
def _(ws, case):
    (case / "empty").mkdir()
    return ["inspect", str(case / "empty")], ["empty"]


@_case("probe_store_missing")
def _(ws, case):
    return ["probe", "--store", str(case / "nostore"), "--out", str(case / "out")], ["nostore"]


@_case("probe_pii_target_on_a_store_without_private_labels")
def _(ws, case):
    return ["probe", "--store", str(ws.store), "--out", str(case / "out"), "--target", "digits"], \
        ["--target digits", "--keep-private-labels"]


@_case("probe_unknown_target")
def _(ws, case):
    return ["probe", "--store", str(ws.store), "--out", str(case / "out"), "--target", "shoe_size"], ["shoe_size"]


# -- output folders
@_case("capture_out_is_a_file")
def _(ws, case):
    (case / "out").write_text("x")
    return capture_argv(ws, case), ["--out"]


@_case("capture_out_under_a_file")
def _(ws, case):
    (case / "file").write_text("x")
    return capture_argv(ws, case, out=case / "file" / "store"), ["--out", "file"]


@_case("capture_out_read_only_parent")
def _(ws, case):
    return capture_argv(ws, case, out=read_only_folder(case) / "mmret_fault_store"), ["--out", "mmret_fault_store"]


@_case("leak_out_is_a_file")
def _(ws, case):
    (case / "out").write_text("x")
    return leak_argv(ws, case), ["--out"]


@_case("leak_out_read_only_parent")
def _(ws, case):
    return leak_argv(ws, case, out=read_only_folder(case) / "mmret_fault_leak"), ["--out", "mmret_fault_leak"]


@_case("probe_out_under_a_file")
def _(ws, case):
    (case / "file").write_text("x")
    return ["probe", "--store", str(ws.store), "--out", str(case / "file" / "p")], ["--out"]


@_case("patch_out_is_a_file")
def _(ws, case):
    (case / "out").write_text("x")
    return ["patch", "--model", str(ws.model), "--sessions", str(ws.mmp), "--experiment", "denoise",
            "--out", str(case / "out"), "--no-progress"], ["--out"]


@_case("sessions_build_out_is_a_folder")
def _(ws, case):
    (case / "s.jsonl").mkdir()
    return ["sessions", "build", "--kind", "multiturn", "--n", "1", "--out", str(case / "s.jsonl")], ["--out"]


@_case("sessions_build_out_under_a_file")
def _(ws, case):
    (case / "file").write_text("x")
    return ["sessions", "build", "--kind", "multiturn", "--n", "1", "--out", str(case / "file" / "s.jsonl")], \
        ["--out"]


@_case("sessions_build_disk_full", during=disk_full)
def _(ws, case):
    # the first file written is a document image beside the JSONL: the message names it
    return ["sessions", "build", "--kind", "multiturn", "--n", "1", "--k", "0", "--size", "64",
            "--out", str(case / "s.jsonl")], ["s_images", "No space left on device"]


@_case("tiny_out_is_a_file")
def _(ws, case):
    (case / "out").write_text("x")
    return ["tiny", "--family", "llava", "--out", str(case / "out")], ["--out"]


@_case("tiny_unknown_family")
def _(ws, case):
    return ["tiny", "--family", "gpt9", "--out", str(case / "out")], ["gpt9"]


@_case("study_out_under_a_file")
def _(ws, case):
    (case / "file").write_text("x")
    return ["study", "run", str(study_yaml(case, f"out: {case / 'file' / 'study'}\n"))], ["out"]


# -- flag values
@_case("leak_batch_size_zero")
def _(ws, case):
    return leak_argv(ws, case, "--batch-size", "0"), ["--batch-size"]


@_case("capture_batch_size_negative")
def _(ws, case):
    return capture_argv(ws, case, "--batch-size", "-3"), ["--batch-size"]


@_case("leak_max_new_tokens_zero")
def _(ws, case):
    return leak_argv(ws, case, "--max-new-tokens", "0"), ["--max-new-tokens"]


@_case("probe_one_fold")
def _(ws, case):
    return ["probe", "--store", str(ws.store), "--out", str(case / "out"), "--folds", "1"], ["--folds"]


@_case("sessions_build_zero_identities")
def _(ws, case):
    return ["sessions", "build", "--kind", "multiturn", "--n", "0", "--out", str(case / "s.jsonl")], ["--n"]


@_case("sessions_build_grid_too_small")
def _(ws, case):
    return ["sessions", "build", "--kind", "mmprivacy", "--n", "1", "--layout", "grid", "--size", "32",
            "--out", str(case / "s.jsonl")], ["32x32"]


@_case("sessions_build_unknown_pii_type")
def _(ws, case):
    return ["sessions", "build", "--kind", "multiturn", "--n", "1", "--pii-types", "Shoe size",
            "--out", str(case / "s.jsonl")], ["Shoe size"]


@_case("patch_replace_without_equals")
def _(ws, case):
    return ["patch", "--model", str(ws.model), "--sessions", str(ws.mmp), "--experiment", "denoise",
            "--corruption", "text", "--replace", "SSN", "--out", str(case / "out")], ["--replace"]


@_case("leak_refusal_patterns_bad_regex")
def _(ws, case):
    (case / "refusals.txt").write_text("cannot assist\n(unclosed\n")
    return leak_argv(ws, case, "--refusal-patterns", str(case / "refusals.txt")), ["refusals.txt", "pattern 2"]


@_case("leak_refusal_patterns_missing")
def _(ws, case):
    return leak_argv(ws, case, "--refusal-patterns", str(case / "none.txt")), ["none.txt"]


@_case("load_mmprivacy_missing_folder")
def _(ws, case):
    return ["sessions", "load-mmprivacy", str(case / "no_benchmark"), "--out", str(case / "s.jsonl")], \
        ["no_benchmark"]


# -- study configs and sweeps
@_case("study_config_missing")
def _(ws, case):
    return ["study", "validate", str(case / "none.yaml")], ["none.yaml"]


@_case("study_bad_yaml")
def _(ws, case):
    return ["study", "run", str(study_yaml(case, "name: [unclosed\n"))], ["study.yaml"]


@_case("study_unknown_key")
def _(ws, case):
    return ["study", "run", str(study_yaml(case, f"out: {case / 'out'}\nprobez:\n  method: ridge\n"))], ["probez"]


@_case("study_value_wrong_type")
def _(ws, case):
    return ["study", "run", str(study_yaml(case, f"out: {case / 'out'}\nseed: zero\n"))], ["seed"]


@_case("study_unknown_model")
def _(ws, case):
    text = f"out: {case / 'out'}\nmodels:\n  - path: {case / 'no_such_model'}\n"
    return ["study", "run", str(study_yaml(case, text))], ["models[0]", "no_such_model"]


@_case("study_model_with_a_broken_config")
def _(ws, case):
    m = model_copy(ws, case)
    (m / "config.json").write_text("[1, 2, 3]")
    text = f"out: {case / 'out'}\nmodels:\n  - path: {m}\n"
    return ["study", "run", str(study_yaml(case, text))], ["models[0]", "config.json"]


@_case("study_model_not_cached_offline")
def _(ws, case):
    text = f"out: {case / 'out'}\nmodels:\n  - path: nobody/no-such-model\n"
    return ["study", "run", str(study_yaml(case, text))], ["models[0]", "nobody/no-such-model"]


@_case("study_trust_remote_code_without_flag")
def _(ws, case):
    text = f"out: {case / 'out'}\nmodels:\n  - path: default\n    trust_remote_code: true\n"
    return ["study", "run", str(study_yaml(case, text))], ["trust_remote_code", "--trust-remote-code"]


@_case("study_set_without_value")
def _(ws, case):
    return ["study", "validate", "--set", "probes.method"], ["--set"]


@_case("sweep_trust_remote_code_without_flag")
def _(ws, case):
    cfg = study_yaml(case, f"out: {case / 'out'}\n")
    return ["sweep", str(cfg), "--grid", "models=[{path: default, trust_remote_code: true}]",
            "--out", str(case / "sweep"), "--executor", "debug"], ["trust_remote_code", "--trust-remote-code"]


@_case("sweep_bad_grid")
def _(ws, case):
    cfg = study_yaml(case, f"out: {case / 'out'}\n")
    return ["sweep", str(cfg), "--grid", "probes.method", "--out", str(case / "sweep")], ["--grid"]


# ---- running a case ----------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    name: str
    code: int
    printed: str  # stdout, stderr and log records together
    errors: list[str]  # the `mmret ...: error:` lines
    named: bool  # the error line names every thing the case expects
    traceback: bool
    changed: list[str]  # paths under the case's folder added or changed
    pii: list[str]  # where a PII value was found ("printed" or a path)

    @property
    def clear_error(self) -> bool:
        return self.code == 2 and len(self.errors) == 1 and self.named and not self.traceback

    def problems(self) -> list[str]:
        out = []
        if self.code != 2:
            out.append(f"exit {self.code}")
        if len(self.errors) != 1:
            out.append(f"{len(self.errors)} error lines")
        elif not self.named:
            out.append(f"message does not name what is wrong: {self.errors[0]!r}")
        if self.traceback:
            out.append("traceback")
        if self.changed:
            out.append(f"left behind {self.changed[:5]}")
        if self.pii:
            out.append(f"PII in {self.pii[:5]}")
        return out


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> content hash (files) or 'dir', for everything under `folder`."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_dir():
            out[rel + "/"] = "dir"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_fault(fault: Fault, ws: Workspace, case: Path) -> Outcome:
    from analysis.cli import main

    case.mkdir(parents=True, exist_ok=True)
    try:
        argv, names = fault.make(ws, case)
    except NotImplementedError as err:  # the case cannot be set up yet (see its `needs`)
        return Outcome(fault.name, -1, f"not set up: {err}", [], False, False, [], [])
    before = snapshot(case)
    out, err, logs = io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    root = logging.getLogger()
    root.addHandler(handler)
    tb = ""
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                (fault.during() if fault.during else contextlib.nullcontext()):
            try:
                code = main(argv)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            except BaseException:  # an escaped exception is what a user sees as a traceback
                tb, code = traceback.format_exc(), 1
    finally:
        root.removeHandler(handler)
        for fn in CLEANUPS.pop(case, []):
            fn()
    printed = out.getvalue() + err.getvalue() + logs.getvalue() + tb
    errors = [line for line in err.getvalue().splitlines() if line.startswith("mmret") and ": error: " in line]
    after = snapshot(case)
    changed = sorted(k for k, v in after.items() if before.get(k) != v)
    pii = ["printed"] if any(v in printed for v in ws.pii) else []
    for rel in changed:
        path = case / rel
        if path.is_file():
            data = path.read_bytes()
            if any(v.encode() in data for v in ws.pii):
                pii.append(rel)
    named = bool(errors) and all(n in errors[0] for n in names)
    traced = "Traceback (most recent call last)" in printed or PICKLE_MARK in printed
    return Outcome(fault.name, code, printed, errors, named, traced, changed, pii)


def summarize(outcomes: list[Outcome]) -> dict[str, int]:
    return {"faults_total": len(outcomes),
            "faults_clear_error": sum(o.clear_error for o in outcomes),
            "faults_silent_success": sum(o.code == 0 for o in outcomes),
            "faults_left_partial_output": sum(bool(o.changed) for o in outcomes),
            "faults_pii_in_outputs": sum(bool(o.pii) for o in outcomes)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--only", default=None, help="comma list of case names")
    a = p.parse_args(argv)
    if a.list:
        for f in FAULTS:
            print(f"{f.name}{'  (needs: ' + f.needs + ')' if f.needs else ''}")
        return 0
    chosen = [f for f in FAULTS if not a.only or f.name in a.only.split(",")]
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="mmret-faults-") as tmp:
        ws = build_workspace(Path(tmp) / "ws")
        outcomes = []
        for f in chosen:
            o = run_fault(f, ws, Path(tmp) / "cases" / f.name)
            outcomes.append(o)
            status = "ok" if o.clear_error and not o.changed and not o.pii else "; ".join(o.problems())
            print(f"  {f.name}: {status}" + (f"   [needs: {f.needs}]" if f.needs and status != "ok" else ""),
                  file=sys.stderr)
    for k, v in summarize(outcomes).items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
