"""Online code (MDL) of probe labels (issue 5, the optional second metric): blocks never split an identity, a
planted label compresses and noise does not, batched cells give what one-cell runs give, the chosen C is paid
for, and bad input is an error that names the argument."""

import math

import numpy as np
import pytest
import torch

from probes.probing.linear import DEFAULT_CS, ProbeError
from probes.probing.mdl import block_order, online_codelength

N, PER, K, D = 600, 3, 4, 32  # examples, examples per identity, classes, features


def _cells(seed: int = 0):
    """Three cells over N examples of N / PER identities: noise, a strong planted label, a weak one."""
    g = torch.Generator().manual_seed(seed)
    groups = np.arange(N) // PER
    y = torch.randint(0, K, (N // PER,), generator=g)[torch.as_tensor(groups)]
    X = torch.randn(3, N, D, generator=g)
    signal = torch.nn.functional.one_hot(y, D).float()
    X[1] += 2.0 * signal
    X[2] += 0.3 * signal
    return X, y, groups


def test_blocks_keep_every_identity_in_one_block():
    groups = np.repeat([f"id{i}" for i in range(40)], np.arange(40) % 4 + 1)  # identities of 1-4 examples
    order, ends = block_order(groups, seed=3)
    assert sorted(order) == list(range(len(groups))) and ends[-1] == len(groups)
    assert (np.diff(ends) > 0).all() and len(ends) >= 4
    block = np.searchsorted(ends, np.arange(len(groups)), side="right")  # block of each position in `order`
    for g in np.unique(groups):
        assert len(set(block[np.flatnonzero(groups[order] == g)])) == 1, g
    assert not (block_order(groups, seed=4)[0] == order).all()  # the seed shuffles the identities


def test_a_planted_label_compresses_and_noise_does_not():
    X, y, groups = _cells()
    code = online_codelength(X, y, groups).set_index("cell")
    assert code.loc[1, "compression"] > 1.5
    assert 0.9 < code.loc[0, "compression"] < 1.02
    assert code.loc[0, "compression"] < code.loc[2, "compression"] < code.loc[1, "compression"]
    assert np.allclose(code["uniform_bits"], N * math.log2(K))
    assert np.allclose(code["compression"], code["uniform_bits"] / code["online_bits"])


def test_batched_cells_give_what_one_cell_runs_give():
    X, y, groups = _cells(1)
    together = online_codelength(X, y, groups)
    apart = [online_codelength(X[c:c + 1], y, groups, cells_per_batch=1).iloc[0] for c in range(3)]
    assert np.allclose(together["online_bits"], [r["online_bits"] for r in apart], rtol=1e-4)
    assert list(together["C"]) == [r["C"] for r in apart]


def test_the_chosen_C_is_the_shortest_code_plus_its_price():
    X, y, groups = _cells(2)
    chosen = online_codelength(X, y, groups)
    fixed = np.stack([online_codelength(X, y, groups, C=c)["online_bits"].to_numpy() for c in DEFAULT_CS], 1)
    assert np.allclose(chosen["online_bits"], fixed.min(1) + math.log2(len(DEFAULT_CS)), rtol=1e-3)
    assert list(chosen["C"]) == list(DEFAULT_CS[fixed.argmin(1)])
    per_cell = online_codelength(X, y, groups, C=[1e-4, 1e-2, 1.0])
    assert list(per_cell["C"]) == [1e-4, 1e-2, 1.0]
    assert np.allclose(per_cell["online_bits"], fixed[np.arange(3), [0, 2, 4]], rtol=1e-3)


def test_bad_input_names_the_argument():
    X, y, groups = _cells()
    with pytest.raises(ProbeError, match="fractions"):
        online_codelength(X, y, groups, fractions=(0.5, 0.9))
    with pytest.raises(ProbeError, match="C must be"):
        online_codelength(X, y, groups, C=[1.0, -1.0, 1.0])
    with pytest.raises(ProbeError, match="one block"):
        block_order(np.zeros(10))

