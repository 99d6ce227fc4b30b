"""What a probe is fitted on: activation cells from an ActivationStore and targets from the sessions' labels.

A *cell* is one (hook, layer, position group, turn). `probe_cells` turns a store into `X: [cell, n, d]` with one
example per session, so that `probes.probing.linear.fit_probes` fits every cell at once. Cells whose sessions differ (a
turn only some sessions have) are kept apart: each `CellBlock` holds cells that share their examples.

Position groups, evaluated per (session, turn) on the store's manifest:

    last            the last token of the turn (`last_of_turn`)
    image           the mean over the turn's image patch tokens
    mark:<label>    the mean over the turn's tokens marked <label>: a marked text span (e.g. mark:name in a name-only
                    prompt) and, where the turn shows an image with PII marks, the image tokens over that value
    final           the last stored position of the session (the token the answer is generated from); turn -1
    <selector>      the mean over the turn's positions picked by that capture selector (e.g. image:0)

Targets (`session_targets`) never pass through logs or the store: string-valued PII comes from the sessions'
private labels (`_target`, `_identity`), which the store leaves out by design.

    label:<column>  a categorical public label (pii_type, framing, reshow ...), one class per value
    identity        which identity (categorical over the identities present)
    digits          the PII value's digits, one 10-way target per digit position (an SSN gives 9)
    chars           letters and digits of the value, one 36-way target per character position (case folded)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from probes.activations.store import ActivationStore
from probes.data.identities import Identity
from probes.data.session import Session

ALPHABETS = {"digits": "0123456789", "chars": "abcdefghijklmnopqrstuvwxyz0123456789"}


class ProbeDataError(ValueError):
    pass


@dataclass
class CellBlock:
    """Cells that share their examples: X [cell, n, d], one row of `cells` per cell, one row of `meta` per n."""

    X: Float[Tensor, "cell n d"]
    cells: pd.DataFrame  # hook, layer, position_group, turn
    meta: pd.DataFrame  # session_id and the public labels of each example


_POSITION_COLUMNS = {"turn", "role", "position", "segment", "image_index", "tile", "patch_row", "patch_col", "mark",
                     "last_of_turn", "groups", "kind", "shard", "row", "layers", "_row"}  # not labels


def _group_rows(m: pd.DataFrame, group: str) -> pd.DataFrame:
    """Manifest rows of one layer that make up `group`, with the turn they count for."""
    if group == "last":
        return m[m["last_of_turn"].astype(bool)]
    if group == "image":
        return m[m["segment"] == "image"]
    if group.startswith("mark:"):
        return m[m["mark"].astype(str).str.split("|").map(lambda ms: group[5:] in ms)]  # render joins with "|"
    if group == "final":
        last = m.loc[m.groupby("session_id")["position"].idxmax()].copy()
        last["turn"] = -1
        return last
    return m[m["groups"].astype(str).str.split(",").map(lambda gs: group in gs)]


def probe_cells(store: ActivationStore, position_groups: Iterable[str] = ("last",), turns: Iterable[int] | None = None,
                layers: Iterable[int] | None = None, kind: str = "hook_resid_post",
                sessions: Iterable[str] | None = None) -> list[CellBlock]:
    """Activation cells of `store`: every (layer, position group, turn) present, grouped into blocks of cells that
    have the same sessions. `turns` None: every turn; `final` always counts as turn -1."""
    X, meta = store.query(kind, layers=layers)
    meta = meta.reset_index(drop=True)
    meta["_row"] = np.arange(len(meta))
    if sessions is not None:
        meta = meta[meta["session_id"].isin(set(sessions))]
    if not len(meta):
        raise ProbeDataError(f"{store.path}: no stored vectors for the requested sessions")
    layer_ids = list(meta["layers"].iloc[0])
    want_turns = None if turns is None else set(int(t) for t in turns) | {-1}
    labels = [c for c in meta.columns if c not in _POSITION_COLUMNS]
    session_meta = meta.drop_duplicates("session_id")[labels].set_index("session_id")
    pieces: dict[tuple[str, int], dict[str, Tensor]] = {}
    for group in position_groups:
        rows = _group_rows(meta, group)
        if not len(rows):
            raise ProbeDataError(f"position group {group!r}: no stored positions in {store.path}; stored groups: "
                                 f"{sorted(set(','.join(meta['groups'].astype(str)).split(',')))}")
        for (turn, sid), idx in rows.groupby(["turn", "session_id"]).indices.items():
            if want_turns is not None and int(turn) not in want_turns:
                continue
            r = torch.as_tensor(rows["_row"].to_numpy()[idx])
            pieces.setdefault((group, int(turn)), {})[sid] = X[r].float().mean(0)  # [layer, d]
    # Cells with the same set of sessions form one block.
    by_sessions: dict[tuple[str, ...], list[tuple[str, int]]] = {}
    for key, per in pieces.items():
        by_sessions.setdefault(tuple(sorted(per)), []).append(key)
    blocks = []
    for sids, keys in by_sessions.items():
        xs, rows = [], []
        for group, turn in sorted(keys, key=lambda k: (k[1], k[0])):
            v = torch.stack([pieces[(group, turn)][s] for s in sids], dim=1)  # [layer, n, d]
            xs.append(v)
            rows += [{"hook": kind, "layer": int(layer), "position_group": group, "turn": turn} for layer in layer_ids]
        blocks.append(CellBlock(torch.cat(xs), pd.DataFrame(rows),
                                session_meta.loc[list(sids)].reset_index()))
    return blocks


def char_classes(value: str, alphabet: str = "digits") -> list[int]:
    """Class index of each character of `value` that is in the alphabet, in order (others are skipped)."""
    chars = ALPHABETS[alphabet]
    return [chars.index(c) for c in value.lower() if c in chars]


def session_targets(sessions: Iterable[Session], target: str, pii_type: str | None = None
                    ) -> tuple[Int[np.ndarray, "n k"], list[str], pd.Index]:
    """(y [n sessions, k target positions] with -1 where a session has no value, names of the k targets, index of
    session ids) for `target` (see the module docstring). `pii_type` picks the field for digits/chars from the
    session's private identity (default: the value the session asks about, `_target`)."""
    sessions = list(sessions)
    ids = pd.Index([s.session_id for s in sessions], name="session_id")
    if target in ("digits", "chars"):
        values = []
        for s in sessions:
            if pii_type is not None:
                ident = s.labels.get("_identity")
                values.append(Identity(**ident).value(pii_type) if ident else "")
            else:
                values.append(str(s.labels.get("_target", "")))
        if not any(values):
            raise ProbeDataError(f"target {target!r}: no session carries a private value ('_target' or "
                                 f"'_identity'); build sessions with probes.data.builders")
        cls = [char_classes(v, target) for v in values]
        k = max(len(c) for c in cls)
        y = np.full((len(sessions), k), -1, dtype=np.int64)
        for i, c in enumerate(cls):
            y[i, :len(c)] = c
        return y, [f"{target}[{j}]" for j in range(k)], ids
    if target == "identity":
        column = [str(s.labels.get("identity_id", "")) for s in sessions]
    elif target.startswith("label:"):
        name = target[6:]
        missing = [s.session_id for s in sessions if name not in s.labels]
        if missing:
            raise ProbeDataError(f"target {target!r}: {len(missing)} session(s) lack label {name!r} "
                                 f"(first: {missing[0]})")
        column = [str(s.labels[name]) for s in sessions]
    else:
        raise ProbeDataError(f"unknown target {target!r}; expected label:<column>, identity, digits or chars")
    classes = sorted(set(column))
    y = np.array([[classes.index(c)] for c in column], dtype=np.int64)
    return y, [target], ids


def patch_cells(store: ActivationStore, layers: Iterable[int] | None = None, turn: int = 0, image_index: int = 0,
                kind: str = "hook_resid_post") -> CellBlock:
    """One cell per (image patch, layer): each session's vector at that patch token of image `image_index` in
    `turn` (tile 0: the base view), position group `patch:<row>,<col>`; the cells carry patch_row/patch_col.

    A probe per patch says where on the document a target is decodable (`analysis.figures.plot_patch_overlay`
    draws the result over the image). Needs the store to hold the image positions (capture selector image:0)."""
    X, meta = store.query(kind, layers=layers, turn=turn, segment="image", image_index=image_index)
    meta = meta.reset_index(drop=True)
    meta["_i"] = np.arange(len(meta))
    meta = meta[(meta["tile"] == meta["tile"].min()) & (meta["patch_row"] >= 0)]
    if not len(meta):
        raise ProbeDataError(f"{store.path}: no image patch positions stored for turn {turn}; capture with "
                             f"positions including image:{image_index}")
    sids = sorted(set(meta["session_id"]))
    layer_ids = list(meta["layers"].iloc[0])
    xs, rows = [], []
    for (r, c), sub in meta.groupby(["patch_row", "patch_col"]):
        sub = sub.drop_duplicates("session_id").set_index("session_id")
        if len(sub) != len(sids):  # a patch some sessions lack (images of other sizes): not comparable
            continue
        xs.append(X[torch.as_tensor(sub.loc[sids, "_i"].to_numpy().copy())].float().transpose(0, 1))  # [layer, n, d]
        rows += [{"hook": kind, "layer": int(layer), "position_group": f"patch:{r},{c}", "turn": turn,
                  "patch_row": int(r), "patch_col": int(c)} for layer in layer_ids]
    labels = [col for col in meta.columns if col not in _POSITION_COLUMNS and col != "_i"]
    session_meta = meta.drop_duplicates("session_id")[labels].set_index("session_id").loc[sids].reset_index()
    return CellBlock(torch.cat(xs), pd.DataFrame(rows), session_meta)
