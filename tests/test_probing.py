"""Probe sweeps (issues 5, 16): planted signals are found where they are and nowhere else, the permutation null keeps
identity groups and its p-value rule is calibrated, chance is the held-out majority class, the control task is opt-in,
cross-turn transfer follows the planted directions, LEACE leaves activations alone when the concept is absent and
removes it when present, and `mmret probe` runs end to end on a captured store."""

import numpy as np
import pandas as pd
import pytest
import torch

from probes.probing.erasure import eraser_rank, erasure_effect, fit_leace, one_hot_blocks, random_eraser
from probes.probing.linear import ProbeError, fit_probes, grouped_folds, held_out_chance
from probes.probing.sweep import (
    control_labels,
    null_p_values,
    permutation_p_values,
    permute_across_identities,
    probe_sweep,
    transfer_matrix,
)
from probes.probing.targets import CellBlock, ProbeDataError, char_classes, session_targets

N_ID, PER_ID, D, K = 60, 3, 64, 3  # identities, sessions per identity, d_model, characters of the planted string


def _planted(turn_dirs: dict[int, int | None], layers=(0, 1, 2), planted_layer=1, seed=0):
    """A block of cells (layer x turn, position group 'last') over N_ID * PER_ID sessions whose 3-digit strings
    depend on the identity; at `planted_layer` and each turn t with turn_dirs[t] = s, digit j of the string is
    written along the directions of seed s (one direction per digit value); elsewhere pure noise."""
    g = torch.Generator().manual_seed(seed)
    digits = torch.randint(0, 10, (N_ID, K), generator=g)
    ident = np.repeat(np.arange(N_ID), PER_ID)
    n = len(ident)
    y = digits[torch.as_tensor(ident)].numpy()
    xs, rows = [], []
    for t, s in turn_dirs.items():
        for layer in layers:
            x = torch.randn(n, D, generator=g)
            if layer == planted_layer and s is not None:
                dirs = torch.randn(K, 10, D, generator=torch.Generator().manual_seed(100 + s))
                for j in range(K):
                    x += 3 * dirs[j, torch.as_tensor(y[:, j])]
            xs.append(x)
            rows.append({"hook": "hook_resid_post", "layer": layer, "position_group": "last", "turn": t})
    meta = pd.DataFrame({"session_id": [f"s{i}" for i in range(n)], "identity_id": [f"id{i}" for i in ident],
                         "image_turn": 0})
    targets = (y, [f"digits[{j}]" for j in range(K)], pd.Index(meta["session_id"], name="session_id"))
    return CellBlock(torch.stack(xs), pd.DataFrame(rows), meta), targets


def test_planted_digits_are_found_there_and_nowhere_else():
    block, targets = _planted({0: 0, 2: 0})
    df, samples = probe_sweep([block], targets, n_boot=100, return_samples=True)
    # the held-out correctness per example is what the accuracies are means of
    per_cell = samples.groupby(["layer", "turn"])["correct"].mean()
    rows = df[df.metric == "char_accuracy"].set_index(["layer", "turn"])["value"]
    np.testing.assert_allclose(rows.sort_index(), per_cell.sort_index(), atol=1e-12)
    assert samples["control_correct"].isna().all()  # no control task by default
    acc = df[df.metric == "char_accuracy"].set_index(["layer", "turn"])["value"]
    assert acc.loc[(1, 0)] > 0.9 and acc.loc[(1, 2)] > 0.9
    for cell in [(0, 0), (2, 0), (0, 2), (2, 2)]:
        assert acc.loc[cell] < 0.3  # chance is 0.1
    assert not {"selectivity", "control_accuracy", "control_char_accuracy"} & set(df.metric)
    exact = df[df.metric == "exact_match"].set_index(["layer", "turn"])["value"]
    assert exact.loc[(1, 0)] > 0.7 and exact.loc[(0, 0)] < 0.05
    row = df[df.metric == "char_accuracy"].iloc[0]
    assert row.ci_low <= row.value <= row.ci_high and row.n == N_ID * PER_ID
    assert set(df.turn_distance.dropna()) == {0.0, 1.0}


def test_chance_is_the_held_out_majority_class_under_the_same_folds():
    """chance = held-out accuracy of predicting the training part's majority class (not the in-sample majority
    share, which is biased upward); char_accuracy's chance is the mean of the digits', exact_match's their product."""
    block, targets = _planted({0: 0}, layers=(0,))
    df = probe_sweep([block], targets, n_boot=0)
    y, groups = targets[0], block.meta["identity_id"].to_numpy()
    folds = grouped_folds(groups, 5, 0)
    expect = []
    for j in range(K):
        hits = sum((y[te, j] == np.bincount(y[tr, j], minlength=10).argmax()).sum() for tr, te in folds)
        expect.append(hits / len(y))
    got = df[df.metric == "chance"].set_index("target")["value"]
    np.testing.assert_allclose([got[f"digits[{j}]"] for j in range(K)], expect, atol=1e-12)
    at = df.set_index("metric")["value"]
    assert np.isclose(at["char_accuracy_chance"], np.mean(expect)) and np.isclose(at["exact_match_chance"],
                                                                                   np.prod(expect))
    assert np.allclose(held_out_chance(y[:, 0], folds, 10), [[(y[te, 0] == np.bincount(y[tr, 0]).argmax()).mean()
                                                              for tr, te in folds]])


def test_control_task_is_opt_in_and_reports_no_selectivity():
    """The identity control task cannot be learned under identity-grouped folds (module docstring): asked for,
    it is reported as control accuracy near chance, never as a selectivity baseline."""
    block, targets = _planted({0: 0}, layers=(0, 1))
    df = probe_sweep([block], targets, n_boot=0, control_task=True)
    ctrl = df[df.metric == "control_char_accuracy"].set_index("layer")["value"]
    assert ctrl.max() < 0.25 and "selectivity" not in set(df.metric)


def test_permutation_across_identities_keeps_the_groups():
    """Every row of one identity gets one other identity's whole target row; the multiset of identity values is
    kept; the same seed gives the same permutation; targets that differ within an identity are refused."""
    groups = np.repeat([f"id{i}" for i in range(30)], [1, 2, 3] * 10)
    values = np.arange(30 * 2).reshape(30, 2)
    _, inv = np.unique(groups, return_inverse=True)
    y = values[inv]
    yp = permute_across_identities(y, groups, (0, 1))
    for g in np.unique(groups):
        rows = yp[groups == g]
        assert (rows == rows[0]).all()  # one value per identity
    firsts = np.array([yp[groups == g][0] for g in np.unique(groups)])
    assert sorted(map(tuple, firsts)) == sorted(map(tuple, values))  # a permutation of the identities' values
    assert (firsts != values).any(axis=1).sum() > 20  # most identities got another's value
    assert (permute_across_identities(y, groups, (0, 1)) == yp).all()
    assert not (permute_across_identities(y, groups, (0, 2)) == yp).all()
    bad = y.copy()
    bad[np.flatnonzero(groups == "id1")[0], 0] += 1
    with pytest.raises(ProbeError, match="one target per identity"):
        permute_across_identities(bad, groups, 0)


def test_p_value_rule_is_calibrated_under_exchangeable_accuracies():
    """Null: the observed accuracy is one more draw of the null's distribution. Seeded simulation with skewed,
    discrete accuracies (binomial rates near chance, as held-out accuracies of 24-540 predictions are): the rule
    rejects at most about alpha, at 0.05 and at 0.01; the rank p-value's floor 1/(K+1) does not bind it."""
    rng = np.random.default_rng(0)
    for n_pred, rate in ((60, 0.1), (540, 0.1), (60, 0.3)):
        draws = rng.binomial(n_pred, rate, size=(20_000, 21)) / n_pred
        p = permutation_p_values(draws[:, 0], draws[:, 1:])
        assert 0.02 <= (p < 0.05).mean() <= 0.055, (n_pred, rate, (p < 0.05).mean())
        assert (p < 0.01).mean() <= 0.012, (n_pred, rate)
    # and it sees a real effect: 3 null sds above the null gives p far below the rank floor 1 / 21
    null = rng.binomial(540, 0.1, size=(1, 20)) / 540
    assert permutation_p_values(np.array([0.1 + 3 * 0.013 + 0.02]), null)[0] < 0.005
    assert permutation_p_values(np.array([0.2]), np.full((1, 5), 0.1))[0] == pytest.approx(1 / 6)  # no spread: rank
    with pytest.raises(ProbeError, match="at least 2"):
        permutation_p_values(np.array([0.5]), np.array([[0.1]]))


def test_permutation_null_of_the_sweep_finds_the_planted_cell_only():
    """The sweep's null table: one row per (cell, column or char_accuracy, permutation); with BH over the cells, the
    planted cell is significant and the pure-noise cells are not; the nested null sits near chance."""
    from probes.stats import benjamini_hochberg

    block, targets = _planted({0: 0}, layers=(0, 1, 2))
    df, null = probe_sweep([block], targets, n_boot=0, n_permutations=8, return_null=True, method="ridge")
    assert len(null) == 3 * 8 * (K + 1) and set(null.permutation) == set(range(8))
    tests = null_p_values(df, null)
    assert len(tests) == 3 and (tests.n_permutations == 8).all()
    sig = dict(zip(tests.layer, benjamini_hochberg(tests.p_value.to_numpy(), 0.05)[0]))
    assert sig == {0: False, 1: True, 2: False}
    nul = null[null.metric == "char_accuracy"]["value"]
    assert abs(nul.mean() - df[df.metric == "char_accuracy_chance"]["value"].mean()) < 0.03


def test_probe_sweep_reports_the_code_beside_accuracy():
    block, targets = _planted({0: 0}, layers=(0, 1))
    df = probe_sweep([block], targets, n_boot=20, mdl=True)
    at = df[df.target == "digits"].set_index(["layer", "metric"])["value"]
    assert at[(1, "compression")] > 1.3
    ctrl = probe_sweep([block], targets, n_boot=20, mdl=True, control_task=True)
    assert ctrl[(ctrl.metric == "control_compression") & (ctrl.target == "digits")]["value"].max() < 1.3
    assert at[(0, "compression")] < 1.05
    per_digit = df[(df.metric == "online_codelength") & (df.layer == 1) & (df.target != "digits")]["value"]
    assert len(per_digit) == 3 and np.isclose(per_digit.sum(), at[(1, "online_codelength")])
    assert "compression" not in set(probe_sweep([block], targets, n_boot=20).metric)


def test_transfer_follows_the_planted_directions():
    block, targets = _planted({0: 0, 2: 0, 4: 1})  # turns 0 and 2 share directions, turn 4 uses others
    tm = transfer_matrix(block, targets).set_index(["layer", "turn_train", "turn_test"])["value"]
    assert tm.loc[(1, 0, 2)] > 0.9 and tm.loc[(1, 2, 0)] > 0.9 and tm.loc[(1, 4, 4)] > 0.9
    assert tm.loc[(1, 0, 4)] < 0.3 and tm.loc[(0, 0, 2)] < 0.3


def test_control_labels_are_fixed_per_identity():
    """One random class per identity and column, whatever the real labels say; missing targets (-1) stay missing."""
    groups = np.repeat([f"id{i}" for i in range(40)], 2)
    y = np.tile([[3, 7], [3, -1]], (40, 1))  # the same real labels everywhere, one missing per identity
    c = control_labels(y, groups, 10, seed=1)
    assert c.shape == y.shape and (c[1::2, 1] == -1).all() and (c[:, 0] == c[:, 0].clip(0, 9)).all()
    assert (c[0::2, 0] == c[1::2, 0]).all()  # fixed per identity
    assert len(set(c[0::2, 0])) >= 5 and len(set(c[0::2, 1])) >= 5  # random across identities, not the labels
    assert (control_labels(np.where(y >= 0, 9 - y, -1), groups, 10, seed=1) == c).all()  # does not read y's values
    assert not (control_labels(y, groups, 10, seed=2) == c).all()


def test_leace_changes_nothing_without_the_concept_and_erases_it_with():
    g = torch.Generator().manual_seed(0)
    y = np.repeat(np.arange(5), 40)[:, None]
    x = torch.randn(200, 16, generator=g, dtype=torch.float64)
    m = x.mean(0)
    for k in range(5):  # exactly equal class means: the concept is absent
        x[y[:, 0] == k] += m - x[y[:, 0] == k].mean(0)
    eraser = fit_leace(x, y)
    assert torch.allclose(eraser(x), x, atol=1e-8)
    planted = x + 4 * one_hot_blocks(y, 16).double()  # now class k moves along axis k
    erased = fit_leace(planted, y)(planted)
    groups = np.arange(200) % 20
    before = fit_probes(planted[None].float(), torch.as_tensor(y[:, 0]), groups).table.accuracy.mean()
    after = fit_probes(erased[None].float(), torch.as_tensor(y[:, 0]), groups).table.accuracy.mean()
    assert before > 0.9 and after < 0.4
    assert eraser_rank(fit_leace(planted, y)) == 4  # 5 classes: the rank of the class-mean differences


def test_erasure_effect_compares_leace_with_a_random_subspace_of_its_rank(llava, tmp_path):
    from probes.data.builders import mmprivacy_sessions
    from probes.data.identities import make_identities

    sessions = mmprivacy_sessions(make_identities(2, seed=4), tmp_path, framings=("caption",), pii_types=("SSN",),
                                  size=64)
    g = torch.Generator().manual_seed(0)
    leace = fit_leace(torch.randn(60, llava.d_model, generator=g), np.repeat(np.arange(3), 20)[:, None])
    df = erasure_effect(llava, sessions, "blocks.0.hook_resid_post", leace, max_new_tokens=3, random_draws=2)
    assert set(df["method"]) == {"none", "leace", "random_subspace"} and set(df["metric"]) == {"ASR", "RR"}
    rank = df.groupby("method")["rank"].first()
    assert rank["none"] == 0 and rank["leace"] == rank["random_subspace"] == eraser_rank(leace) == 2
    assert (df["n"] == len(sessions)).all() and df["value"].between(0, 1).all()
    assert sorted(df[df.method == "random_subspace"]["draw"]) == [0, 0, 1, 1]  # two draws x two metrics


def test_random_eraser_is_an_orthogonal_projection_of_its_rank():
    e = random_eraser(12, 3, seed=0)
    x = torch.randn(7, 12, dtype=torch.float64)
    once = e(x)
    assert torch.allclose(e(once), once, atol=1e-10)
    assert torch.linalg.matrix_rank(x - once) == 3


def test_targets_from_private_labels():
    from probes.data.builders import memory_probe_sessions
    from probes.data.identities import make_identities

    people = make_identities(3, seed=1)
    sessions = memory_probe_sessions(people, pii_types=["SSN"], framings=["direct"])
    y, names, ids = session_targets(sessions, "digits")
    assert y.shape == (3, 9) and names[0] == "digits[0]" and list(ids) == [s.session_id for s in sessions]
    assert "".join(map(str, y[0])) == people[0].ssn.replace("-", "")
    assert char_classes("Ab-1", "chars") == [0, 1, 27]
    with pytest.raises(ProbeDataError, match="unknown target"):
        session_targets(sessions, "ssn")


def test_mark_groups_find_tokens_that_carry_two_marks():
    """A token inside two marked spans carries both labels joined by '|' (as `render` writes them): mark:<label>
    cells must find it under either label."""
    from probes.probing.targets import _group_rows

    m = pd.DataFrame({"session_id": "s0", "position": [3, 4, 5, 6], "turn": 0,
                      "mark": ["ssn", "ssn|value", "value", ""], "groups": "mark:ssn"})
    assert _group_rows(m, "mark:ssn").position.tolist() == [3, 4]
    assert _group_rows(m, "mark:value").position.tolist() == [4, 5]


def test_mmret_probe_on_a_captured_store(tiny_dir, tmp_path):
    from analysis.cli import main
    from probes import capture, load_model
    from probes.data.builders import multiturn_sessions
    from probes.data.identities import make_identities

    people = make_identities(10, seed=2)
    sessions = multiturn_sessions(people, tmp_path / "img", k_distractors=(1,), reshow=(False,),
                                  framing_pairs=(("caption", "caption"),), pii_types=("SSN",), size=64)
    loaded = load_model(tiny_dir("llava"))
    capture(loaded, sessions, str(tmp_path / "store"), positions="last:*+image:0", progress=False,
            keep_private_labels=True)  # the digits targets: a store keeps no PII unless asked
    out = tmp_path / "probes"
    assert main(["probe", "--store", str(tmp_path / "store"), "--out", str(out), "--positions", "last,image",
                 "--folds", "2", "--n-boot", "20"]) == 0
    df = pd.read_csv(out / "probe_results.csv")
    assert set(df.position_group) == {"last", "image"} and set(df.layer) == set(range(loaded.n_layers))
    assert (df["family"] == "llava").all() and (df["model"] == str(tiny_dir("llava"))).all()  # from the store
    assert set(df[df.position_group == "last"].turn) == {0, 1, 2, 3, 4, 5}  # 5: the generation prompt
    assert (out / "probe_heatmap.pdf").exists() and (out / "retention_curves.png").exists()
    assert main(["probe", "--store", str(tmp_path / "store"), "--out", str(out), "--target", "ssn"]) == 2
    assert main(["probe", "--store", str(tmp_path / "store"), "--out", str(out), "--positions", "last", "--layers",
                 "0", "--folds", "2", "--n-boot", "20", "--mdl"]) == 0
    code = pd.read_csv(out / "probe_results.csv").query("metric == 'compression'")
    assert len(code) and (code.value > 0).all() and set(code.layer) == {0}


def test_erasing_at_the_last_positions_leaves_the_rest_of_the_prompt_alone():
    """`erasing(last=k)`: in a prompt forward only its last k positions are erased, in a one-token (generation)
    forward the token is; without `last`, every position."""
    from contextlib import nullcontext

    from probes.probing.erasure import ErasureError, erasing

    class Recorder:  # stands in for LoadedModel.hooks: keeps the hook function to call it by hand
        def hooks(self, fwd_hooks):
            self.fn = fwd_hooks[0][1]
            return nullcontext()

    eraser, model = random_eraser(8, 3, seed=1), Recorder()
    x, step = torch.randn(2, 6, 8), torch.randn(2, 1, 8)
    with erasing(model, "blocks.0.hook_resid_post", eraser, last=2):
        out, gen = model.fn(x, "blocks.0.hook_resid_post"), model.fn(step, "blocks.0.hook_resid_post")
    assert torch.equal(out[:, :4], x[:, :4]) and torch.allclose(out[:, 4:], eraser(x[:, 4:]))
    assert torch.allclose(gen, eraser(step))
    with erasing(model, "blocks.0.hook_resid_post", eraser):
        assert torch.allclose(model.fn(x, "h"), eraser(x))
    with pytest.raises(ErasureError, match="last"):
        with erasing(model, "h", eraser, last=0):
            pass


def test_probe_cells_take_each_cell_from_its_own_positions(llava, tmp_path):
    """Every cell's example i is what the store holds for session i at that cell's positions: the turn's last
    token, the mean over its image patches or its marked span, or the session's last position (turn -1); cells
    that only some sessions have (a longer session's extra turns) form their own block."""
    from probes import ActivationStore, Session, SessionImage, Turn, capture
    from probes.probing.targets import probe_cells
    from tests.conftest import document_image

    img = tmp_path / "doc.png"
    document_image().save(img)

    def session(i, extra):
        turns = [Turn("user", f"Form {i}: SSN 123-45-{i:04d}.", images=[SessionImage.from_path(img)])
                 .mark("ssn", f"123-45-{i:04d}"), Turn("assistant", "Ok."), Turn("user", "SSN?")]
        if extra:
            turns += [Turn("assistant", "No."), Turn("user", "Again?")]
        return Session(f"s{i}", turns, labels={"identity_id": f"id{i}"})

    capture(llava, [session(i, extra=i >= 3) for i in range(5)], str(tmp_path / "st"),
            positions="last:*+image:0+mark:ssn", progress=False)
    store = ActivationStore(tmp_path / "st")
    blocks = probe_cells(store, ("last", "image", "mark:ssn", "final"))
    X_all, m = store.query("hook_resid_post")
    layers = list(m["layers"].iloc[0])
    by_turns = {tuple(int(t) for t in sorted(b.cells["turn"].unique())): b for b in blocks}
    # turn 3: the short sessions' generation prompt and the long ones' extra assistant turn; 4-5 only the long ones
    assert set(by_turns) == {(-1, 0, 1, 2, 3), (4, 5)}
    assert by_turns[(4, 5)].meta["session_id"].tolist() == ["s3", "s4"]
    for block in blocks:
        for c, cell in block.cells.iterrows():
            slot = layers.index(cell["layer"])
            for i, sid in enumerate(block.meta["session_id"]):
                rows = m[m["session_id"] == sid]
                group, turn = cell["position_group"], cell["turn"]
                if group == "final":
                    want = rows[rows["position"] == rows["position"].max()]
                else:
                    rows = rows[rows["turn"] == turn]
                    want = {"last": rows[rows["last_of_turn"].astype(bool)], "image": rows[rows["segment"] == "image"],
                            "mark:ssn": rows[rows["mark"] == "ssn"]}[group]
                assert len(want), (group, turn, sid)
                expected = X_all[list(want.index), slot].float().mean(0)
                torch.testing.assert_close(block.X[c, i], expected)
    cells = pd.concat([b.cells for b in blocks])
    assert set(cells[cells.position_group == "image"]["turn"]) == {0}  # only the first turn shows the image
