"""Probe sweeps: where (layer x position group x turn) a target is linearly decodable, against controls.

    blocks = probe_cells(store, position_groups=["last", "image", "final"])        # probes.probe_data
    y, names, ids = session_targets(sessions, "digits")                          # SSN digits, 9 x 10-way
    results = probe_sweep(blocks, (y, names, ids), model="organism")              # tidy DataFrame

Every cell is fitted for every target column at once (`probes.linear.fit_probes`, folds grouped by identity), and
the same cells are fitted again on a *control task* (Hewitt & Liang 2019): every identity gets a fixed random label
per target column, so a probe can only score above chance on it by memorising identities from the activations.
`selectivity` = accuracy - control accuracy. String targets (one column per character) are also reported as the
mean per-character accuracy and the whole-string exact match of the held-out predictions.

Rows (the shared result vocabulary): model, family, hook, layer, position_group, turn, turn_distance, target, probe,
control, metric, value, ci_low, ci_high, n. Metrics: accuracy, chance, control_accuracy, selectivity (per target
column and, for strings, `char_accuracy` and `exact_match` over all columns); CIs are 95% bootstrap intervals over
identities of the held-out correctness. With `mdl=True` also the online code (Voita & Titov 2020, `probes.mdl`):
`online_codelength` (bits), `compression` and `control_compression` (uniform code / online code; no CI).

Other controls (the same probe on sessions without the image, with shuffled images, or on a random-initialised
copy of the model) are other stores: run the sweep on each with `control=` set, and concatenate.
`transfer_matrix` trains at turn i and tests at turn j (the same folds), per layer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from analysis.stats import cluster_bootstrap
from probes.linear import fit_probes, grouped_folds
from probes.mdl import online_codelength
from probes.probe_data import CellBlock, ProbeDataError

RESULT_COLUMNS = ["model", "family", "hook", "layer", "position_group", "turn", "turn_distance", "target", "probe",
                  "control", "metric", "value", "ci_low", "ci_high", "n"]


def control_labels(y: np.ndarray, groups: Sequence, n_classes: int, seed: int = 0) -> np.ndarray:
    """The control task: each group (identity) gets one fixed random class per target column."""
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    table = rng.integers(0, n_classes, size=(len(uniq), y.shape[1]))
    out = table[inv]
    return np.where(y >= 0, out, -1)


def _align(block: CellBlock, targets: tuple[np.ndarray, list[str], pd.Index], group_col: str
           ) -> tuple[np.ndarray, np.ndarray]:
    y, names, ids = targets
    pos = pd.Series(np.arange(len(ids)), index=ids)
    sids = block.meta["session_id"]
    missing = sids[~sids.isin(ids)]
    if len(missing):
        raise ProbeDataError(f"{len(missing)} stored session(s) have no target (first: {missing.iloc[0]}); pass the "
                             f"sessions the store was captured from")
    if group_col not in block.meta.columns:
        raise ProbeDataError(f"group column {group_col!r} is not a label of the stored sessions")
    return y[pos[sids].to_numpy()], block.meta[group_col].astype(str).to_numpy()


def _per_cell_targets(y: np.ndarray, n_cells: int) -> torch.Tensor:
    """y [n, k] -> [cell * k, n]: every cell repeated once per target column (cell-major), to match
    `X.repeat_interleave(k, dim=0)`."""
    return torch.as_tensor(np.tile(y.T, (n_cells, 1)))


def _turn_distance(block: CellBlock, turn: int) -> float:
    """User turns from the image's turn to `turn` (NaN where sessions carry no image_turn label)."""
    if turn < 0 or "image_turn" not in block.meta.columns:
        return float("nan")
    return float((turn - int(block.meta["image_turn"].iloc[0])) // 2)


def probe_sweep(blocks: Sequence[CellBlock], targets: tuple[np.ndarray, list[str], pd.Index], target: str = "digits",
                method: str = "logreg", group_col: str = "identity_id", n_folds: int = 5, seed: int = 0,
                model: str = "", control: str = "none", n_classes: int | None = None, n_boot: int = 1000,
                control_task: bool = True, device: str | None = None, return_samples: bool = False,
                mdl: bool = False, family: str = "") -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Fit every cell of every block for every target column (and the control task); tidy rows, see the module
    docstring. Examples whose target is missing (-1) in a column are dropped from that column's fit.

    `return_samples=True` also returns the held-out correctness per example and cell (session_id, the group
    column, hook, layer, position_group, turn, correct, control_correct; mean over a string's characters): the
    input of a paired permutation test of probe against control (`analysis.stats.cell_tests`).

    `mdl=True` adds the online code of every cell and target column (`probes.mdl.online_codelength`, logistic
    probes whatever `method` is): metrics `online_codelength` (bits) and `compression`, and `control_compression`
    for the control task; for strings also summed over the characters."""
    y_all = targets[0]
    n_classes = int(n_classes or (y_all.max() + 1))
    rows, samples = [], []
    for block in blocks:
        y, groups = _align(block, targets, group_col)
        keep = (y >= 0).all(1)  # one example set for every column, so columns batch together
        if keep.sum() < n_folds * 2:
            continue
        y, groups = y[keep], groups[keep]
        sids = block.meta["session_id"].to_numpy()[keep]
        X = block.X[:, torch.as_tensor(keep)]
        n_cells, k = X.shape[0], y.shape[1]
        Xk = X.repeat_interleave(k, dim=0)  # [cell * k, n, d]: cell-major, then target column
        tasks = {"real": _per_cell_targets(y, n_cells)}
        if control_task:
            tasks["control_task"] = _per_cell_targets(control_labels(y, groups, n_classes, seed), n_cells)
        held, code = {}, {}
        for name, Yt in tasks.items():
            fit = fit_probes(Xk, Yt, groups, method=method, n_folds=n_folds, seed=seed, n_classes=n_classes,
                             device=device)
            held[name] = (fit.oof.numpy() == Yt.numpy())  # [cell * k, n] held-out correctness
            if mdl:
                code[name] = online_codelength(Xk, Yt, groups, seed=seed, n_classes=n_classes, device=device)
        for c, cell in block.cells.iterrows():
            base = {"model": model, "family": family, "hook": cell["hook"], "layer": int(cell["layer"]),
                    "position_group": cell["position_group"], "turn": int(cell["turn"]),
                    "turn_distance": _turn_distance(block, int(cell["turn"])), "target": target, "probe": method,
                    "control": control, "n": int(keep.sum())}
            real = held["real"][c * k:(c + 1) * k]  # [k, n]
            ctrl = held["control_task"][c * k:(c + 1) * k] if control_task else None
            for j, name in enumerate(targets[1]):
                chance = np.bincount(y[:, j], minlength=n_classes).max() / len(y)
                rows.append({**base, "target": name, "metric": "accuracy", **_ci(real[j], groups, n_boot, seed)})
                rows.append({**base, "target": name, "metric": "chance", "value": chance, "ci_low": np.nan,
                             "ci_high": np.nan})
                if ctrl is not None:
                    rows.append({**base, "target": name, "metric": "control_accuracy",
                                 **_ci(ctrl[j], groups, n_boot, seed)})
                    rows.append({**base, "target": name, "metric": "selectivity",
                                 **_ci(real[j].astype(float) - ctrl[j], groups, n_boot, seed)})
            for name, metric in (("real", "compression"), ("control_task", "control_compression")):
                if name in code:
                    rows += _code_rows(base, code[name].iloc[c * k:(c + 1) * k], targets[1], target, metric)
            if return_samples:
                samples.append(pd.DataFrame({
                    "session_id": sids, group_col: groups, "hook": cell["hook"], "layer": int(cell["layer"]),
                    "position_group": cell["position_group"], "turn": int(cell["turn"]), "target": target,
                    "correct": real.mean(0), "control_correct": ctrl.mean(0) if ctrl is not None else np.nan}))
            if k > 1:
                rows.append({**base, "metric": "char_accuracy", **_ci(real.mean(0), groups, n_boot, seed)})
                rows.append({**base, "metric": "exact_match", **_ci(real.all(0), groups, n_boot, seed)})
                if ctrl is not None:
                    rows.append({**base, "metric": "control_char_accuracy", **_ci(ctrl.mean(0), groups, n_boot, seed)})
                    rows.append({**base, "metric": "selectivity",
                                 **_ci(real.mean(0) - ctrl.mean(0), groups, n_boot, seed)})
    if not rows:
        raise ProbeDataError("probe_sweep: no block had enough examples with targets "
                             f"(need at least {2 * n_folds})")
    df = pd.DataFrame(rows)[RESULT_COLUMNS]
    if return_samples:
        return df, pd.concat(samples, ignore_index=True)
    return df


def _code_rows(base: dict, code: pd.DataFrame, names: list[str], target: str, metric: str) -> list[dict]:
    """Rows of one cell's online code (one per target column, and summed over a string's characters)."""
    bits, uniform = code["online_bits"].to_numpy(), code["uniform_bits"].to_numpy()
    parts = list(zip(names, bits, uniform)) + ([(target, bits.sum(), uniform.sum())] if len(names) > 1 else [])
    rows = []
    for name, b, u in parts:
        if metric == "compression":
            rows.append({**base, "target": name, "metric": "online_codelength", "value": float(b), "ci_low": np.nan,
                         "ci_high": np.nan})
        rows.append({**base, "target": name, "metric": metric, "value": float(u / b), "ci_low": np.nan,
                     "ci_high": np.nan})
    return rows


def main_metric(df: pd.DataFrame) -> str:
    """The headline metric of a `probe_sweep` table: per-character accuracy for strings, else accuracy."""
    return "char_accuracy" if (df["metric"] == "char_accuracy").any() else "accuracy"


def _ci(per_example: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    v = np.asarray(per_example, dtype=float)
    mean, lo, hi = cluster_bootstrap(v, groups, n_boot=n_boot, rng=np.random.default_rng(seed))
    return {"value": mean, "ci_low": lo, "ci_high": hi}


def transfer_matrix(block: CellBlock, targets: tuple[np.ndarray, list[str], pd.Index], position_group: str = "last",
                    method: str = "logreg", group_col: str = "identity_id", n_folds: int = 5, seed: int = 0,
                    n_classes: int | None = None, model: str = "", target: str = "digits") -> pd.DataFrame:
    """Train at turn i, test at turn j, for every layer and pair of turns of `position_group` in `block`: rows
    (model, layer, position_group, turn_train, turn_test, target, probe, metric=accuracy, value, n). The fold of
    each example is the same at every turn, so a test example's identity was never trained on at any turn."""
    y, groups = _align(block, targets, group_col)
    keep = (y >= 0).all(1)
    y, groups = y[keep], groups[keep]
    n_classes = int(n_classes or (targets[0].max() + 1))
    cells = block.cells.reset_index(drop=True)
    sel = cells[cells["position_group"] == position_group]
    if not len(sel):
        raise ProbeDataError(f"transfer_matrix: no cells of position group {position_group!r} in this block")
    folds = grouped_folds(groups, n_folds, seed)
    k = y.shape[1]
    rows = []
    for layer, g in sel.groupby("layer"):
        turns = g["turn"].to_numpy()
        X = block.X[torch.as_tensor(g.index.to_numpy().copy())][:, torch.as_tensor(keep)]  # [turn, n, d]
        Xk = X.repeat_interleave(k, dim=0)
        fit = fit_probes(Xk, _per_cell_targets(y, len(turns)), groups, method=method, n_folds=n_folds, seed=seed, n_classes=n_classes)
        for i, ti in enumerate(turns):
            for j, tj in enumerate(turns):
                correct = np.zeros((k, len(y)), dtype=bool)
                for f, (_, test) in enumerate(folds):
                    W, b = fit.fold_weights[i * k:(i + 1) * k, f], fit.fold_bias[i * k:(i + 1) * k, f]
                    logits = torch.bmm(X[j, test].float()[None].expand(k, -1, -1), W) + b[:, None]
                    correct[:, test] = logits.argmax(-1).numpy() == y[test].T
                rows.append({"model": model, "layer": int(layer), "position_group": position_group,
                             "turn_train": int(ti), "turn_test": int(tj), "target": target, "probe": method,
                             "metric": "char_accuracy" if k > 1 else "accuracy",
                             "value": float(correct.mean()), "n": len(y)})
    return pd.DataFrame(rows)


def run_probes(store_dir: str, out_dir: str, target: str = "digits", position_groups: Sequence[str] = ("last",),
               turns: Sequence[int] | None = None, layers: Sequence[int] | None = None, method: str = "logreg",
               pii_type: str | None = None, group_col: str = "identity_id", n_folds: int = 5, seed: int = 0,
               control: str = "none", n_boot: int = 1000, figures: bool = True, mdl: bool = False) -> pd.DataFrame:
    """`mmret probe`: sweep every cell of the store at `store_dir` for `target`, write probe_results.csv and, with
    `figures`, the layer x position heatmap and the retention curves beside it."""
    from pathlib import Path

    from probes.probe_data import probe_cells, session_targets
    from probes.session import atomic_write_bytes
    from probes.store import ActivationStore

    store = ActivationStore(store_dir)
    sessions = store.sessions()
    targets = session_targets(sessions, target, pii_type)
    blocks = probe_cells(store, position_groups, turns, layers)
    df = probe_sweep(blocks, targets, target=target, method=method, group_col=group_col, n_folds=n_folds, seed=seed,
                     model=str(store.spec.get("model", "")), family=str(store.spec.get("family", "")),
                     control=control, n_boot=n_boot, mdl=mdl)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "probe_results.csv", df.to_csv(index=False).encode())
    if figures:
        from analysis.figures import plot_probe_heatmap, plot_retention_curves

        metric = main_metric(df)
        plot_probe_heatmap(df, out, metric=metric)
        if df["turn_distance"].notna().any() and "last" in position_groups:
            plot_retention_curves(df, out, metric=metric)
    return df


def token_readout(loaded, store, session, target: str = "digits", layer: int | None = None,
                  method: str = "logreg", n_folds: int = 5, seed: int = 0, hook: str = "resid_post") -> pd.DataFrame:
    """Where in a transcript a probe reads the target, token by token.

    Fits the target's probe on the last token of the final turn of the sessions in `store` (at `layer`; None:
    the layer where that cell decodes best), then applies it to every position of `session` (a session not in the
    store: a held-out identity) captured at that layer. One row per position: position, turn, role, segment,
    token (its text), layer, value = the probe's mean probability of the session's true classes (for strings the
    mean over characters). Feeds `analysis.figures.plot_token_strip`."""
    import tempfile

    from probes.capture import capture
    from probes.probe_data import probe_cells, session_targets
    from probes.render import render

    sessions = store.sessions()
    y, _, ids = session_targets(sessions, target)
    y_new = session_targets([session], target)[0][0]
    blocks = probe_cells(store, ["last"])
    block = max(blocks, key=lambda b: len(b.meta))  # the cells every session has
    last_turn = int(block.cells["turn"].max())
    cells = block.cells[(block.cells["turn"] == last_turn) & (block.cells["position_group"] == "last")]
    yb = y[pd.Series(np.arange(len(ids)), index=ids)[block.meta["session_id"]].to_numpy()]
    keep = (yb >= 0).all(1)
    groups = block.meta["identity_id"].astype(str).to_numpy()[keep]
    k = min(yb.shape[1], len(y_new))
    X = block.X[torch.as_tensor(np.array(cells.index))][:, torch.as_tensor(keep)]  # [layer, n, d]
    Y = torch.as_tensor(yb[keep, :k].T)  # [k, n]
    if layer is None:  # best layer by held-out accuracy of the whole string's characters
        fit = fit_probes(X.repeat_interleave(k, 0), Y.repeat(len(cells), 1), groups, method=method,
                         n_folds=n_folds, seed=seed, n_classes=int(yb.max()) + 1)
        acc = (fit.oof == Y.repeat(len(cells), 1)).float().mean(1).reshape(len(cells), k).mean(1)
        layer = int(cells["layer"].iloc[int(acc.argmax())])
    c = int(np.flatnonzero(cells["layer"].to_numpy() == layer)[0])
    fit = fit_probes(X[c:c + 1].repeat(k, 1, 1), Y, groups, method=method, n_folds=n_folds, seed=seed,
                     n_classes=int(yb.max()) + 1)
    with tempfile.TemporaryDirectory() as tmp:
        one = capture(loaded, [session], tmp, hooks=hook, layers=[layer], positions="all", progress=False)
        Xs, meta = one.query(f"hook_{hook}")
    logits = fit.decision(Xs[:, 0].float().unsqueeze(0).expand(k, -1, -1))  # [k, positions, classes]
    prob = torch.softmax(logits, -1).gather(-1, torch.as_tensor(y_new[:k]).view(k, 1, 1).expand(-1, logits.shape[1], 1))
    ids_all = render(loaded.adapter, session).input_ids[0]
    tok = loaded.tokenizer
    meta = meta.reset_index(drop=True)
    text = [tok.decode([int(ids_all[p])]) if p < len(ids_all) else "" for p in meta["position"]]
    return pd.DataFrame({"position": meta["position"], "turn": meta["turn"], "role": meta["role"],
                         "segment": meta["segment"], "token": text, "layer": layer, "target": target,
                         "value": prob[..., 0].mean(0).detach().numpy()})
