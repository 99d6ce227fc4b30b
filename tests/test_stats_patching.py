"""analysis.patching_stats: one effect scale for both directions, the pooled ratio, tests against "no change"."""

import numpy as np
import pandas as pd
import pytest

from analysis.patching_stats import NULL_STATUS, cell_effects, pair_effects, patching_tests, reachability
from probes.stats import StatsError


def _rows(values, clean, corrupt, direction="denoise", layer=0, group="final", null=False, identities=None):
    """Patching rows of one cell: one pair per value (identity i), metric logit_diff."""
    n = len(values)
    ids = identities if identities is not None else list(range(n))
    return pd.DataFrame({"model": "m", "experiment": "denoise", "direction": direction, "method": "exact",
                         "component": "attn_out", "layer": layer, "position_group": group, "metric": "logit_diff",
                         "value": values, "clean": clean, "corrupt": corrupt, "identity_id": ids,
                         "null_by_construction": null})


def test_both_directions_put_no_change_at_zero_and_the_whole_gap_at_one():
    clean, corrupt = np.array([3.0, 5.0]), np.array([-1.0, 1.0])
    cases = [("denoise", corrupt, 0.0), ("denoise", clean, 1.0), ("noise", clean, 0.0), ("noise", corrupt, 1.0)]
    for direction, patched, want in cases:
        d = pair_effects(_rows(patched, clean, corrupt, direction))
        np.testing.assert_allclose(d["effect"], want)
        assert cell_effects(_rows(patched, clean, corrupt, direction))["value"].item() == pytest.approx(want)


def test_pooled_ratio_is_not_driven_by_a_pair_with_a_tiny_gap():
    # pair 0: a gap of 10, half restored; pair 1: a gap of 0.01 "restored" 50 times over (numerical noise)
    rows = _rows(values=[5.0, 0.5], clean=[10.0, 0.01], corrupt=[0.0, 0.0])
    cell = cell_effects(rows, n_boot=200).iloc[0]
    assert cell["value"] == pytest.approx((5.0 + 0.5) / 10.01)
    assert cell["mean_pair_effect"] == pytest.approx((0.5 + 50.0) / 2)


def test_a_noising_cell_that_changes_nothing_is_not_significant():
    # The bug this module fixes: noising cells where the patch changes nothing scored 1 on the old score and were
    # tested against 0; on the effect scale they are 0, and a test of "no change" cannot reject.
    rng = np.random.default_rng(0)
    clean, corrupt = rng.normal(3, 1, 16), rng.normal(-3, 1, 16)
    t = patching_tests(_rows(clean.copy(), clean, corrupt, "noise"), n_perm=2000, n_boot=100)
    assert t["value"].item() == 0.0
    assert t["p_value"].item() == 1.0 and not t["significant"].item()


def test_null_by_construction_cells_are_reported_and_left_out_of_the_family():
    rng = np.random.default_rng(1)
    clean, corrupt = rng.normal(3, 1, 12), rng.normal(-3, 1, 12)
    moved = _rows(corrupt + 0.8 * (clean - corrupt), clean, corrupt, group="final")
    same = _rows(corrupt.copy(), clean, corrupt, group="pii_patches", null=True)
    t = patching_tests(pd.concat([moved, same]), n_perm=5000, n_boot=100).set_index("position_group")
    assert t.loc["pii_patches", "status"] == NULL_STATUS and np.isnan(t.loc["pii_patches", "p_value"])
    assert not t.loc["pii_patches", "significant"]
    assert (t["family_size"] == 1).all()  # only the tested cell counts
    assert t.loc["final", "significant"] and t.loc["final", "p_value"] == pytest.approx(2 / 2 ** 12)


def test_tests_reject_about_five_percent_of_null_cells_and_find_a_planted_effect():
    """Per-pair effects symmetric about 0 in every cell (the null): few cells survive BH; a planted cell does."""
    rng = np.random.default_rng(2)
    n, cells = 16, 60
    clean, corrupt = rng.normal(3, 0.5, n), rng.normal(-3, 0.5, n)
    frames, raw_rejects = [], 0
    for layer in range(cells):
        shift = rng.normal(0, 0.3, n) * (clean - corrupt)
        frames.append(_rows(corrupt + shift, clean, corrupt, layer=layer))
    t = patching_tests(pd.concat(frames), n_perm=2000, n_boot=50)
    raw_rejects = (t["p_value"] <= 0.05).mean()
    assert 0.0 <= raw_rejects <= 0.12  # about 5% of null cells at the raw level
    assert t["significant"].sum() <= 1  # and BH keeps the family's false discoveries down
    planted = _rows(corrupt + (0.6 + rng.normal(0, 0.1, n)) * (clean - corrupt), clean, corrupt, layer=999)
    t2 = patching_tests(pd.concat([*frames, planted]), n_perm=20000, n_boot=50)
    assert t2.set_index("layer").loc[999, "significant"]


def test_reachability_says_when_pairs_are_too_few_for_the_family():
    rng = np.random.default_rng(3)
    frames = []
    for n in (8, 24):
        clean, corrupt = rng.normal(3, 1, n), rng.normal(-3, 1, n)
        for layer in range(60):
            f = _rows(corrupt + 0.5 * (clean - corrupt), clean, corrupt, layer=layer)
            frames.append(f.assign(experiment=f"n{n}"))
    fam = reachability(patching_tests(pd.concat(frames), n_perm=100_000, n_boot=20)).set_index("experiment")
    assert not fam.loc["n8", "single_reachable"] and fam.loc["n8", "any_reachable"]
    assert fam.loc["n24", "single_reachable"]
    assert fam.loc["n8", "min_p"] == pytest.approx(2 / 2 ** 8)


def test_bad_rows_name_what_is_missing():
    with pytest.raises(StatsError, match="clean"):
        pair_effects(pd.DataFrame({"metric": ["logit_diff"], "value": [1.0]}))
    with pytest.raises(StatsError, match="sideways"):
        pair_effects(_rows([1.0], [2.0], [0.0], direction="sideways"))
