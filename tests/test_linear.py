"""Batched linear probes (probes/probing/linear.py): planted signal found where planted, controls at chance, grouped
folds, batched = one by one, agreement with sklearn, closed-form methods, and errors that name the bad argument."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler

from probes.probing.linear import ProbeConfig, ProbeError, fit_probe, fit_probes, grouped_folds, held_out_chance

N_GROUPS, PER_GROUP, D, K = 60, 4, 16, 3


def sweep(n_cells=4, planted=(1, 3), strength=4.0, seed=0):
    """Synthetic activations [cell, n, d]: per-identity offsets everywhere, the identity's class (constant within
    the identity, as a PII digit is) planted along a class direction in the `planted` cells only."""
    g = torch.Generator().manual_seed(seed)
    groups = np.repeat(np.arange(N_GROUPS), PER_GROUP)
    y_group = torch.arange(N_GROUPS) % K  # balanced classes
    y = y_group[torch.as_tensor(groups)]
    X = torch.randn(n_cells, len(groups), D, generator=g)
    X += 0.5 * torch.randn(N_GROUPS, D, generator=g)[torch.as_tensor(groups)]
    directions = torch.randn(K, D, generator=g)
    for c in planted:
        X[c] += strength * directions[y] / directions.norm(dim=1, keepdim=True)[y]
    X += 5.0  # a large feature mean, as real activations have
    return X, y, groups


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return sweep()


@pytest.fixture(scope="module")
def logreg_fit(data):
    X, y, groups = data
    return fit_probes(X, y, groups, Cs=np.logspace(-3, 1, 5))


def cell_accuracy(fit):
    return fit.table.groupby("cell").accuracy.mean().to_numpy()


def test_grouped_folds_keep_groups_apart_and_cover_everything():
    groups = np.repeat([f"id{i}" for i in range(23)], np.arange(23) % 4 + 1)  # unequal group sizes
    folds = grouped_folds(groups, n_folds=5, seed=3)
    assert len(folds) == 5
    tests = np.concatenate([te for _, te in folds])
    assert sorted(tests.tolist()) == list(range(len(groups)))  # every example tested exactly once
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert len(train) + len(test) == len(groups)
    sizes = [len(te) for _, te in folds]
    assert max(sizes) - min(sizes) <= 4  # balanced up to one (largest) group
    assert [te.tolist() for _, te in grouped_folds(groups, 5, seed=3)] == [te.tolist() for _, te in folds]
    assert [te.tolist() for _, te in grouped_folds(groups, 5, seed=4)] != [te.tolist() for _, te in folds]


def test_too_few_groups_names_the_numbers():
    with pytest.raises(ProbeError, match=r"groups has 3 distinct values but n_folds=5"):
        grouped_folds(np.repeat([0, 1, 2], 10), n_folds=5)


def test_planted_signal_found_only_where_planted(logreg_fit):
    acc = cell_accuracy(logreg_fit)
    chance = logreg_fit.table.groupby("cell").chance.mean().to_numpy()
    assert acc[1] > 0.9 and acc[3] > 0.9
    assert acc[0] < chance[0] + 0.15 and acc[2] < chance[2] + 0.15
    assert logreg_fit.table.converged.all()
    assert list(logreg_fit.table.columns) == ["cell", "fold", "method", "C", "accuracy", "chance", "n_train",
                                              "n_test", "converged", "nested"]


def test_final_probe_predicts_and_has_raw_unit_weights(data, logreg_fit):
    X, y, _ = data
    pred = logreg_fit.predict(X)
    assert pred.shape == (4, len(y))
    assert (pred[1] == y).float().mean() > 0.95
    logits = X[1] @ logreg_fit.weights[1] + logreg_fit.bias[1]  # raw activations in, no standardisation
    assert torch.equal(logits.argmax(-1), pred[1])


def test_control_labels_near_chance(data):
    X, y, groups = data
    rng = np.random.default_rng(1)
    control = torch.as_tensor(rng.integers(0, K, N_GROUPS))[torch.as_tensor(groups)]  # random label per identity
    fit = fit_probes(X[[1, 3]], control, groups, Cs=np.logspace(-3, 1, 5))
    assert (cell_accuracy(fit) < 1 / K + 0.15).all()


def test_batched_equals_one_cell_fits(data, logreg_fit):
    X, y, groups = data
    for c in (0, 1):
        one = fit_probe(X[c], y, groups, Cs=np.logspace(-3, 1, 5))
        rows = logreg_fit.table[logreg_fit.table.cell == c].reset_index(drop=True)
        assert one.C[0] == logreg_fit.C[c]
        assert np.abs(one.table.accuracy.to_numpy() - rows.accuracy.to_numpy()).max() <= 1 / 48 + 1e-9
        scale = logreg_fit.weights[c].abs().max()
        assert torch.allclose(one.weights[0], logreg_fit.weights[c], atol=2e-3 * scale)


def test_logreg_matches_sklearn_at_the_chosen_C(data, logreg_fit):
    X, y, groups = data
    Xs = StandardScaler().fit_transform(X[1].double().numpy())
    sk = LogisticRegression(C=float(logreg_fit.C[1]), tol=1e-6, max_iter=1000).fit(Xs, y.numpy())
    ours = (logreg_fit.weights[1] * logreg_fit.std[1][:, None]).double().numpy()  # standardised weights
    assert np.abs(ours - sk.coef_.T).max() <= 5e-3 * np.abs(sk.coef_).max()


def test_two_classes_match_sklearn_binomial_at_twice_C():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (300,), generator=g)
    X = torch.randn(300, 12, generator=g)
    X[:, 0] += 1.5 * y
    fit = fit_probe(X, y, np.arange(300) // 3)
    Xs = StandardScaler().fit_transform(X.double().numpy())
    sk = LogisticRegression(C=2 * float(fit.C[0]), tol=1e-8, max_iter=1000).fit(Xs, y.numpy())
    W = (fit.weights[0] * fit.std[0][:, None]).double().numpy()
    assert np.abs((W[:, 1] - W[:, 0]) - sk.coef_[0]).max() <= 1e-3 * np.abs(sk.coef_).max()


def test_per_cell_targets(data):
    X, y, groups = data
    other = (y + 1) % K  # cell 3 decodes a different target
    Y = torch.stack([y, y, y, other])
    fit = fit_probes(X, Y, groups, Cs=np.logspace(-3, 1, 5))
    assert cell_accuracy(fit)[3] > 0.9
    assert (fit.predict(X)[3] == other).float().mean() > 0.9


def test_ridge_and_dim_find_the_signal_and_ridge_matches_sklearn(data):
    X, y, groups = data
    ridge = fit_probes(X, y, groups, method="ridge")
    dim = fit_probes(X, y, groups, method="dim")
    for fit in (ridge, dim):
        acc = cell_accuracy(fit)
        assert acc[1] > 0.9 and acc[3] > 0.9 and acc[0] < 0.5
    assert dim.table.C.isna().all()
    Xs = StandardScaler().fit_transform(X[1].double().numpy())
    onehot = np.eye(K)[y.numpy()]
    sk = Ridge(alpha=1.0 / float(ridge.C[1])).fit(Xs, onehot)
    ours = (ridge.weights[1] * ridge.std[1][:, None]).double().numpy()
    assert np.allclose(ours, sk.coef_.T, atol=1e-4 * np.abs(sk.coef_).max() + 1e-6)


def test_ridge_with_fewer_examples_than_features_matches_sklearn():
    # The dual (n x n) form of the ridge solve must give the primal's weights.
    X, y, groups = sweep(n_cells=2, planted=(1,))
    keep = np.flatnonzero(groups < 6)  # 6 identities: fewer rows than features in every training part
    X, y, groups = X[:, keep], y[keep], groups[keep]
    X = torch.cat([X, torch.randn(2, len(keep), 2 * len(keep) - X.shape[-1] + 1)], -1)
    assert X.shape[1] < X.shape[2]
    fit = fit_probes(X, y, groups, method="ridge", n_folds=3)
    Xs = StandardScaler().fit_transform(X[1].double().numpy())
    sk = Ridge(alpha=1.0 / float(fit.C[1])).fit(Xs, np.eye(K)[y.numpy()])
    ours = (fit.weights[1] * fit.std[1][:, None]).double().numpy()
    assert np.allclose(ours, sk.coef_.T, atol=1e-4 * np.abs(sk.coef_).max() + 1e-6)


def test_class_absent_from_a_training_fold():
    X, y, groups = sweep(n_cells=2, planted=(0,))
    y = y.clone()
    y[groups == 7] = K  # a fourth class held by one identity only: absent from training in one fold
    for method in ("logreg", "ridge", "dim"):
        fit = fit_probes(X, y, groups, method=method, Cs=np.logspace(-2, 0, 3))
        assert np.isfinite(fit.table.accuracy).all()
        assert fit.table.converged.all()
        assert cell_accuracy(fit)[0] > 0.85


@pytest.mark.parametrize("kwargs, match", [
    (dict(y=torch.zeros(5, dtype=torch.long)), r"y must be \[n=240\] or \[cell=4, n=240\]"),
    (dict(groups=np.arange(10)), r"groups must have one entry per example \(n=240"),
    (dict(X=torch.zeros(240, 16)), r"X must be a float tensor \[cell, n, d\]"),
    (dict(method="svm"), r"method must be one of"),
    (dict(y=torch.rand(240)), r"y must hold integer class labels"),
    (dict(Cs=[1.0, 0.1]), r"Cs must be .* ascending"),
    (dict(n_folds=100), r"groups has 60 distinct values but n_folds=100"),
])
def test_bad_input_names_the_argument(data, kwargs, match):
    X, y, groups = data
    args = dict(X=X, y=y, groups=groups) | kwargs
    with pytest.raises(ProbeError, match=match):
        fit_probes(**args)


def test_held_out_predictions_match_the_fold_accuracies():
    """`oof` holds each example's prediction by the fold that tested it: its per-fold accuracy is the table's, and
    the fold weights reproduce it."""
    torch.manual_seed(0)
    X = torch.randn(2, 300, 12)
    y = torch.randint(0, 3, (300,))
    X[1] += 1.5 * torch.nn.functional.one_hot(y, 12).float()
    groups = np.arange(300) // 3
    for method in ("logreg", "ridge", "dim"):
        fit = fit_probes(X, y, groups, method=method)
        assert fit.oof.shape == (2, 300) and (fit.oof >= 0).all()
        for f, (_, test) in enumerate(fit.folds):
            acc = (fit.oof[:, test] == y[test]).double().mean(1).numpy()
            table = fit.table[fit.table.fold == f].sort_values("cell").accuracy.to_numpy()
            assert np.allclose(acc, table, atol=1e-9), method
            logits = torch.bmm(X[:, test], fit.fold_weights[:, f]) + fit.fold_bias[:, f, None]
            assert (logits.argmax(-1) == fit.oof[:, test]).all()


def test_nested_cv_is_not_optimistic_under_the_null():
    """Null: each cell's labels (one per identity) are independent of X. Choosing C on the reporting folds
    (nested=False) scores above chance on average over 60 cells; nested CV (C chosen inside each training part)
    does not, and it still finds a planted signal. The table's C is each outer fold's own choice."""
    g = torch.Generator().manual_seed(1)
    groups = np.repeat(np.arange(40), 2)
    y = torch.randint(0, 4, (60, 40), generator=g)[:, torch.as_tensor(groups)]
    X = torch.randn(60, 80, 24, generator=g)
    chance = held_out_chance(y.numpy(), grouped_folds(groups), 4).mean()
    Cs = np.logspace(-3, 2, 6)
    flat = fit_probes(X, y, groups, method="ridge", Cs=Cs, nested=False).table
    nested = fit_probes(X, y, groups, method="ridge", Cs=Cs).table
    assert flat.accuracy.mean() - chance > 0.025  # the optimism nested CV removes
    assert abs(nested.accuracy.mean() - chance) < 0.015
    assert nested.nested.all() and nested.groupby("cell").C.nunique().max() > 1  # per-fold choice
    X[:5] += 4 * torch.nn.functional.one_hot(y[:5], 24).float()
    planted = fit_probes(X[:6], y[:6], groups, method="ridge", Cs=Cs).table.groupby("cell").accuracy.mean()
    assert (planted[:5] > 0.8).all() and planted[5] < 0.5


def test_a_config_fits_as_its_fields_given_as_keywords():
    """fit_probes(config) and fit_probes(**fields) are the same fit; keywords replace a config's fields; a bad
    field is refused when the config is built, naming it."""
    torch.manual_seed(0)
    X, y, groups = torch.randn(2, 120, 8), torch.randint(0, 3, (120,)), np.arange(120) // 2
    X[1] += 2 * torch.nn.functional.one_hot(y, 8).float()
    by_keywords = fit_probes(X, y, groups, method="ridge", n_folds=3, Cs=[0.1, 1.0])
    by_config = fit_probes(X, y, groups, ProbeConfig(method="ridge", n_folds=3, Cs=np.array([0.1, 1.0])))
    replaced = fit_probes(X, y, groups, ProbeConfig(method="dim"), method="ridge", n_folds=3, Cs=(0.1, 1.0))
    for fit in (by_config, replaced):
        assert fit.table.equals(by_keywords.table)
        assert torch.equal(fit.weights, by_keywords.weights)
    assert by_keywords.table.accuracy[by_keywords.table.cell == 1].mean() > 0.8  # the fit is not empty
    assert hash(ProbeConfig(Cs=np.array([1.0, 2.0]))) == hash(ProbeConfig(Cs=[1.0, 2.0]))  # frozen, one key
    with pytest.raises(ProbeError, match=r"inner_folds must be an int >= 2"):
        ProbeConfig(inner_folds=1)
    with pytest.raises(ProbeError, match=r"Cs must be .* ascending"):
        fit_probes(X, y, groups, ProbeConfig(), Cs=[1.0, 0.1])
    with pytest.raises(TypeError, match="n_fold"):
        fit_probes(X, y, groups, n_fold=3)  # a misspelt setting is not silently ignored
