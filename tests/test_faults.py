"""The fault table (benchmarks/faults.py, one definition): every bad input through `mmret` ends in exit 2 with one
line naming the file or flag, no traceback, nothing added or changed in the case's folder, and no PII value printed
or written. Cases that wait for a library change are strict xfails naming that change."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "benchmark_faults", Path(__file__).resolve().parents[1] / "benchmarks" / "faults.py")
faults = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = faults  # dataclasses look their module up there
_spec.loader.exec_module(faults)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return faults.build_workspace(tmp_path_factory.mktemp("faults_ws"))


def _param(fault):
    marks = [pytest.mark.xfail(strict=True, reason=f"needs {fault.needs}")] if fault.needs else []
    return pytest.param(fault, id=fault.name, marks=marks)


def test_table_is_large_and_names_are_unique():
    names = [f.name for f in faults.FAULTS]
    assert len(names) >= 40 and len(set(names)) == len(names)


@pytest.mark.parametrize("fault", [_param(f) for f in faults.FAULTS])
def test_fault_is_a_clear_error_that_leaves_nothing(fault, workspace, tmp_path, one_thread):
    out = faults.run_fault(fault, workspace, tmp_path / "case")
    assert out.code == 2, out.problems() + [out.printed[-2000:]]
    assert len(out.errors) == 1 and out.errors[0].startswith("mmret "), out.printed[-2000:]
    assert out.named, out.problems()
    assert not out.traceback, out.printed[-3000:]
    assert not out.changed, out.changed
    assert not out.pii, out.pii


def test_the_checks_see_what_they_look_for(workspace, tmp_path):
    """The table's own checks are not vacuous: a run that writes PII, leaves files and succeeds is caught."""
    from analysis.cli import main

    ok = faults.Fault("valid_capture", lambda ws, case: (faults.capture_argv(ws, case, "--positions", "last:*"),
                                                          ["--out"]))
    out = faults.run_fault(ok, workspace, tmp_path / "valid")
    assert out.code == 0 and not out.clear_error and out.changed  # a silent success of the table's kind
    leak = faults.Fault("leaks", lambda ws, case: (["sessions", "build", "--kind", "multiturn", "--n", "1",
                                                     "--size", "64", "--k", "0", "--out", str(case / "s.jsonl")],
                                                    []))
    out = faults.run_fault(leak, workspace, tmp_path / "leaks")
    # a sessions file holds its private labels by design: the PII check finds them in what was written
    assert out.code == 0 and "s.jsonl" in out.pii and faults.summarize([out])["faults_pii_in_outputs"] == 1
    assert main(["inspect", str(workspace.store)]) == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits (the table uses /sys instead)")
def test_read_only_folder_refuses_writes(tmp_path):
    folder = faults.read_only_folder(tmp_path)
    with pytest.raises(PermissionError):
        (folder / "x").mkdir()


def test_a_store_holds_no_pii(workspace):
    """A store is shared with collaborators: none of its files may hold a PII value of the captured sessions."""
    found = [str(p.relative_to(workspace.store)) for p in workspace.store.rglob("*") if p.is_file()
             and any(v.encode() in p.read_bytes() for v in workspace.pii)]
    assert workspace.pii and not found, found
