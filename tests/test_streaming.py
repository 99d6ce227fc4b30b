"""Sweeps that stream: a store read and fitted in parts under a memory cap gives the in-memory sweep's tables."""

import numpy as np
import pandas as pd
import pytest
import torch

from probes import ActivationStore, Session, SessionImage, Turn, capture
from probes.probing.stream import StreamBudget, probe_sweep_chunks, probe_sweep_streamed, stream_budget
from probes.probing.sweep import SweepConfig, null_p_values, probe_sweep
from probes.probing.targets import (
    ProbeDataError,
    iter_patch_cells,
    patch_cells,
    plan_cells,
    probe_cells,
    read_cells,
    session_targets,
)
from tests.conftest import document_image

GROUPS = ("last", "image", "mark:ssn", "final")


@pytest.fixture(scope="module")
def store(llava, tmp_path_factory):
    """14 sessions of 14 identities; the last 6 have two extra turns, so their cells form a block of their own."""
    tmp = tmp_path_factory.mktemp("stream")
    img = tmp / "doc.png"
    document_image().save(img)

    def session(i):
        turns = [Turn("user", f"Form {i}: SSN 123-45-{i:04d}.", images=[SessionImage.from_path(img)])
                 .mark("ssn", f"123-45-{i:04d}"), Turn("assistant", "Ok."), Turn("user", f"SSN {i % 3}?")]
        if i >= 8:
            turns += [Turn("assistant", "No."), Turn("user", "Again?")]
        return Session(f"s{i:02d}", turns, labels={"identity_id": f"id{i}", "cls": str(i % 3)})

    sessions = [session(i) for i in range(14)]
    capture(llava, sessions, str(tmp / "st"), positions="last:*+image:0+mark:ssn", progress=False)
    return ActivationStore(tmp / "st"), sessions


def test_read_cells_in_batches_equals_probe_cells(store):
    st, _ = store
    want = probe_cells(st, GROUPS)
    plan = plan_cells(st, GROUPS)
    assert [len(sids) for sids, _ in plan.blocks] == [len(b.meta) for b in want] == [14, 6]
    for layers, batch in ((None, None), (plan.layers[1:], 1), (plan.layers[:1], 50)):
        got = read_cells(plan, layers, max_positions=batch)
        for a, b in zip(want, got):
            sel = a.cells["layer"].isin(layers or plan.layers).to_numpy()
            assert torch.equal(a.X[torch.from_numpy(sel.copy())], b.X)  # bitwise: same rows, same order
            pd.testing.assert_frame_equal(a.cells[sel].reset_index(drop=True), b.cells)
            pd.testing.assert_frame_equal(a.meta, b.meta)


def test_plan_is_small_and_counts_what_it_holds(store):
    st, _ = store
    plan = plan_cells(st, GROUPS)
    manifest = st.manifest
    assert plan.nbytes() < manifest.memory_usage(deep=True).sum() / 2  # per session, not per stored position
    lm = manifest[manifest["scope"] == "lm"]
    assert list(plan.sessions) == sorted(lm["session_id"].astype(str).unique())
    assert plan.positions.tolist() == lm["session_id"].astype(str).value_counts().sort_index().tolist()
    assert len(plan.labels) == len(plan.sessions)


def test_streamed_sweep_equals_in_memory_under_a_cap_that_splits_everything(store):
    st, sessions = store
    targets = session_targets(sessions, "label:cls")
    kw = dict(target="label:cls", n_folds=2, n_boot=20, n_permutations=3, return_null=True, return_samples=True)
    want = probe_sweep(probe_cells(st, GROUPS), targets, **kw)
    plan = plan_cells(st, GROUPS)
    forced = StreamBudget(layers_per_chunk=1, positions_per_read=40, cells_per_fit=2, cells_per_batch=1, means=0,
                          read=0, fit=0)  # every split at once: layers, sessions, cells of a block, cells of a fit
    cap = 0.8  # MB: small enough that sessions are read in batches (the forced budget slices blocks too)
    budget = stream_budget(plan, 1, 3, cap, SweepConfig(**kw), len(targets[2]))
    assert budget.total <= cap * 2 ** 20 and budget.cells_per_batch < 16
    assert budget.positions_per_read < plan.positions.sum()  # sessions read in batches
    for split in ({"budget": forced}, {"max_memory_mb": cap}):
        got = probe_sweep_streamed(plan, targets, **split, **kw)
        for a, b in zip(want, got):  # results, samples, null: the same rows in the same order
            pd.testing.assert_frame_equal(a, b)
        pd.testing.assert_frame_equal(null_p_values(want[0], want[2]), null_p_values(got[0], got[2]))
    with pytest.raises(ProbeDataError, match="max_memory_mb=0.001: too small .* needs at least"):
        probe_sweep_streamed(plan, targets, max_memory_mb=0.001, **kw)


def test_patch_cells_in_parts_equal_patch_cells(store):
    st, sessions = store
    want = patch_cells(st, turn=0)
    parts = list(iter_patch_cells(st, turn=0, max_memory_mb=0.02))
    assert len(parts) > 1
    assert torch.equal(torch.cat([p.X for p in parts]), want.X)
    pd.testing.assert_frame_equal(pd.concat([p.cells for p in parts], ignore_index=True), want.cells)
    pd.testing.assert_frame_equal(parts[0].meta, want.meta)
    targets = session_targets(sessions, "label:cls")
    kw = dict(target="label:cls", method="ridge", n_folds=2, n_boot=0)
    pd.testing.assert_frame_equal(probe_sweep([want], targets, **kw),
                                  probe_sweep_chunks(iter_patch_cells(st, turn=0, max_memory_mb=0.02), targets,
                                                     cells_per_fit=3, **kw))
    assert np.isfinite(probe_sweep([want], targets, **kw)["value"]).all()
