"""LEACE against its matched control (issue 16, part 7), checked where the truth is known: on synthetic data with a
planted concept LEACE removes linear decodability and the control of the same rank and edit size does not; the
control is centred as LEACE is and its edit equals LEACE's; with no concept in the data both edits cost an unrelated
readout the same; LEACE is fitted on exactly the positions `erasing` edits, and `erasure_effect` refuses others."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from probes.probing.erasure import (
    ErasureError,
    SiteEraser,
    edit_sizes,
    erasing,
    erasure_effect,
    fit_leace,
    fit_leace_at,
    matched_random_eraser,
    one_hot_blocks,
    site_activations,
    site_label,
)

D, K = 16, 4
DIRS = np.linalg.qr(np.random.default_rng(7).normal(size=(D, K + 1)))[0]  # fixed: one distribution for every draw


def planted(n: int, strength: float, seed: int, other: float = 0.0):
    """x = noise + an offset + strength * (class y's direction) + other * (+-1 by t) * (another direction)."""
    g = np.random.default_rng(seed)
    y, t = g.integers(0, K, n), g.integers(0, 2, n)
    X = g.normal(size=(n, D)) + 1.5 + strength * DIRS[:, y].T + other * (2 * t - 1)[:, None] * DIRS[:, K]
    return torch.tensor(X), y, t


def accuracy(fit_X, fit_y, test_X, test_y) -> float:
    return LogisticRegression(max_iter=2000).fit(fit_X.numpy(), fit_y).score(test_X.numpy(), test_y)


def test_leace_removes_a_planted_concept_and_the_matched_control_of_its_rank_and_size_does_not():
    """A probe retrained on the edited data: LEACE takes it to chance (1/4), the control leaves it where it was."""
    X, y, _ = planted(1500, 3.0, 0)
    Xt, yt, _ = planted(1500, 3.0, 1)
    leace = fit_leace(X, y[:, None])
    control = matched_random_eraser(leace, seed=0)
    assert leace.rank == control.rank == K - 1
    clean = accuracy(X, y, Xt, yt)
    assert clean > 0.9
    assert accuracy(leace(X), y, leace(Xt), yt) < 0.32
    assert accuracy(control(X), y, control(Xt), yt) > clean - 0.03
    # the same size of edit, exactly on the fitting data and within sampling error on held-out data; matched on
    # the held-out data (as erasure_effect matches on the activations it edits), exactly there
    assert edit_sizes(control, X)["edit_rms"] == pytest.approx(edit_sizes(leace, X)["edit_rms"], rel=1e-9)
    assert edit_sizes(control, Xt)["edit_rms"] == pytest.approx(edit_sizes(leace, Xt)["edit_rms"], rel=0.1)
    on_test = matched_random_eraser(leace, seed=0, match_on=Xt)
    assert edit_sizes(on_test, Xt)["edit_rms"] == pytest.approx(edit_sizes(leace, Xt)["edit_rms"], rel=1e-9)
    assert torch.allclose(on_test.proj_right, control.proj_right)  # the same subspace, rescaled
    # a fixed readout of the concept (a model's fixed weights): LEACE breaks it, the control barely moves it
    readout = LogisticRegression(max_iter=2000).fit(X.numpy(), y)
    base = readout.score(Xt.numpy(), yt)
    assert base - readout.score(leace(Xt).numpy(), yt) > 0.5
    assert base - readout.score(control(Xt).numpy(), yt) < 0.05


def test_matched_control_is_centred_concept_free_and_as_large_as_leace():
    X, y, _ = planted(800, 3.0, 2)
    leace = fit_leace(X, y[:, None])
    mean = X.mean(0)
    for exclude in (True, False):
        control = matched_random_eraser(leace, seed=3, exclude_concept=exclude)
        assert torch.allclose(control(mean[None])[0], mean, atol=1e-9)  # centred: the mean is a fixed point
        assert torch.allclose(control(X).mean(0), mean, atol=1e-9)  # so the data's mean is left where it is
        assert control.fit_mean_sq_edit() == pytest.approx(leace.fit_mean_sq_edit(), rel=1e-9)
        assert ((X - control(X)).pow(2).sum(1).mean()) == pytest.approx(leace.fit_mean_sq_edit(), rel=1e-9)
        assert control.scale > 1  # the planted concept carries more variance than random directions
    # the controls' removed coordinates carry no linear information about the concept; LEACE's carry all of it
    Z = one_hot_blocks(y[:, None], K).double()
    cross = (X - mean).T @ (Z - Z.mean(0)) / len(X)
    control = matched_random_eraser(leace, seed=3)
    assert (control.proj_right @ cross).abs().max() < 1e-8 * (leace.proj_right @ cross).abs().max() + 1e-10
    assert (leace.proj_right @ cross).abs().max() > 0.1
    # whitened matching: no scale, and the same whitened size as LEACE's edit (r unit-variance coordinates)
    plain = matched_random_eraser(leace, seed=3, whitened=True)
    assert plain.scale == 1 and torch.allclose(plain.proj_right, control.proj_right)
    w_size = [float((leace.whiten @ (X - e(X)).T).pow(2).sum(0).mean()) for e in (leace, plain)]
    assert w_size[1] == pytest.approx(w_size[0], rel=0.05) and w_size[0] == pytest.approx(leace.rank, rel=0.05)
    # different seeds, different subspaces
    other = matched_random_eraser(leace, seed=4)
    assert not torch.allclose(other.proj_right, control.proj_right)
    with pytest.raises(ErasureError, match="orthogonal to the concept"):
        matched_random_eraser(fit_leace(planted(400, 3.0, 5)[0][:, :5], planted(400, 3.0, 5)[1][:, None]))


def test_without_a_concept_leace_and_its_control_cost_an_unrelated_readout_the_same():
    """Null: the concept's labels are independent of the data, so LEACE's subspace is as arbitrary as the control's.
    A fixed readout of another planted variable loses as much under either edit: the paired difference over 20
    seeds is tested against 0 with a two-sided t-test at 5% (rejects about 5% of the time under this null)."""
    diffs = []
    for seed in range(20):
        X, y, t = planted(600, 0.0, 2 * seed, other=1.0)
        Xt, _, tt = planted(600, 0.0, 2 * seed + 1, other=1.0)
        leace = fit_leace(X, y[:, None])
        assert leace.rank > 0  # sampling noise alone gives LEACE directions to remove: the check is not empty
        control = matched_random_eraser(leace, seed=seed)
        readout = LogisticRegression(max_iter=2000).fit(X.numpy(), t)
        diffs.append(readout.score(control(Xt).numpy(), tt) - readout.score(leace(Xt).numpy(), tt))
    diffs = np.asarray(diffs)
    t_stat = diffs.mean() / (diffs.std(ddof=1) / np.sqrt(len(diffs)))
    assert abs(t_stat) < 2.093  # t(19), two-sided 5%
    assert abs(diffs.mean()) < 0.02


class Recorder:
    """An identity 'eraser' that keeps what it is given: where `erasing` edits."""

    def __init__(self):
        self.seen = []

    def __call__(self, x):
        self.seen.append(x[0].detach().double().clone())
        return x


def test_leace_is_fitted_on_exactly_the_positions_erasing_edits(llava, tmp_path):
    from probes.data.builders import mmprivacy_sessions
    from probes.data.identities import make_identities
    from probes.leakage import generate_batch

    sessions = mmprivacy_sessions(make_identities(3, seed=4), tmp_path, framings=("caption",), pii_types=("SSN",),
                                  size=64)[:3]
    hook = "blocks.0.hook_resid_post"
    for last in (2, None):
        X, owner, generated = site_activations(llava, sessions, hook, last=last, max_new_tokens=4)
        prompt_rec, gen_rec = Recorder(), Recorder()
        with erasing(llava, hook, SiteEraser(prompt_rec, gen_rec, "test"), last=last):
            generate_batch(llava, sessions, max_new_tokens=4, batch_size=1, sort_by_length=False)
        assert torch.allclose(X[~generated], torch.cat(prompt_rec.seen), atol=1e-5)
        assert torch.allclose(X[generated], torch.cat(gen_rec.seen), atol=1e-5)
        assert sorted(set(owner)) == [0, 1, 2] and (np.diff(owner) >= 0).all()
    X, owner, generated = site_activations(llava, sessions, hook, last=2, max_new_tokens=4)
    for i in range(3):  # the prompt's last 2 positions, then at most 3 fed-back generated tokens
        assert (~generated[owner == i]).sum() == 2 and generated[owner == i].sum() <= 3
        assert not generated[owner == i][:2].any()
    y = np.array([[0], [1], [2]])
    pooled = fit_leace_at(llava, sessions, hook, y, 3, last=2, max_new_tokens=4, split=False)
    assert pooled.site == site_label(2) == "last 2 + generated" and pooled.kind == "leace"
    assert torch.allclose(pooled.bias, X.mean(0))  # fitted on every edited position, pooled
    assert generated.sum() >= 2  # the tiny model answers with several tokens: both parts can be fitted
    split = fit_leace_at(llava, sessions, hook, y, 3, last=2, max_new_tokens=4)
    assert isinstance(split, SiteEraser) and split.site == "last 2 + generated"
    assert torch.allclose(split.prompt.bias, X[~generated].mean(0))  # each part fitted on its own positions
    assert torch.allclose(split.generated.bias, X[generated].mean(0))
    with pytest.raises(ErasureError, match="too few"):
        fit_leace_at(llava, sessions, hook, y, 3, last=2, max_new_tokens=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fitted where applied: no warning
        df = erasure_effect(llava, sessions, hook, split, last=2, max_new_tokens=4)
    rows = df[df.metric == "ASR"].set_index("method")
    for col in ("edit_rel_prompt", "edit_rel_generated"):  # the control matched on each kind of position
        assert rows.loc["random_subspace", col] == pytest.approx(rows.loc["leace", col], rel=1e-9)
        assert rows.loc["leace", col] > 0
    assert rows.loc["leace", "rank_generated"] == rows.loc["random_subspace", "rank_generated"] == split.generated.rank
    with pytest.raises(ErasureError, match="one per session"):
        fit_leace_at(llava, sessions, hook, y[:2], 3, last=2)


def test_erasure_effect_refuses_other_positions_and_reports_matched_edit_sizes(llava, tmp_path):
    from probes.data.builders import mmprivacy_sessions
    from probes.data.identities import make_identities

    sessions = mmprivacy_sessions(make_identities(2, seed=4), tmp_path, framings=("caption",), pii_types=("SSN",),
                                  size=64)
    hook = "blocks.0.hook_resid_post"
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, llava.d_model, generator=g)
    y = np.repeat(np.arange(3), 20)[:, None]
    with pytest.raises(ErasureError, match="fitted at 'last 1 \\+ generated' but would be applied at 'all'"):
        erasure_effect(llava, sessions, hook, fit_leace(X, y, site=site_label(1)), max_new_tokens=3)
    with pytest.raises(ErasureError, match="fitted LEACE"):
        erasure_effect(llava, sessions, hook, matched_random_eraser(fit_leace(X, y)), max_new_tokens=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = erasure_effect(llava, sessions, hook, fit_leace(X, y), max_new_tokens=3, last=1, random_draws=2)
    assert any("unknown" in str(w.message) for w in caught)
    asr = df[df.metric == "ASR"].set_index(["method", "draw"])
    assert asr.loc[("none", 0), "edit_rms"] == 0 and asr.loc[("none", 0), "activation_rms"] > 0
    leace = asr.loc[("leace", 0)]
    assert leace["edit_rms"] > 0 and leace["fit_edit_rms_prompt"] > 0 and leace["scale_prompt"] == 1
    for draw in (0, 1):  # matched where applied, on the prompt's positions and the generated tokens each
        control = asr.loc[("random_subspace", draw)]
        for col in ("edit_rms", "edit_rel_prompt", "edit_rel_generated"):
            assert control[col] == pytest.approx(leace[col], rel=1e-9), col
        assert control["scale_prompt"] > 0 and control["rank"] == leace["rank"] == 2
    assert (asr["edit_rel"] == asr["edit_rms"] / asr["activation_rms"]).all()
    assert (df.positions == "last 1 + generated").all()
    assert set(df.loc[df.method == "random_subspace", "draw"]) == {0, 1}
