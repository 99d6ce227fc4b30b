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

import contextlib
import ctypes
import ctypes.util
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from jaxtyping import Float, Int
from torch import Tensor

from probes.activations.manifest import cover, finished_shards, read_rows
from probes.activations.store import ActivationStore, scope_of
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
                     "last_of_turn", "groups", "kind", "scope", "shard", "row", "layers", "_row"}  # not labels
Key = tuple[str, int]  # (position group, turn): one cell per layer


def _group_rows(m: pd.DataFrame, group: str) -> pd.DataFrame:
    """Manifest rows of one layer that make up `group`, with the turn they count for."""
    if group == "last":
        return m[m["last_of_turn"].astype(bool)]
    if group == "image":
        return m[m["segment"] == "image"]
    if group.startswith("mark:"):
        return m[m["mark"].astype(str).str.split("|").map(lambda ms: group[5:] in ms)]  # render joins with "|"
    if group == "final":
        last = m.loc[m.groupby("session_id", observed=True)["position"].idxmax()].copy()
        last["turn"] = -1
        return last
    return m[m["groups"].astype(str).str.split(",").map(lambda gs: group in gs)]


def _cell_rows(meta: pd.DataFrame, position_groups: Iterable[str], want_turns: set[int] | None,
               where: str | None = None) -> dict[Key, dict[str, np.ndarray]]:
    """(group, turn) -> session -> the rows of `meta` (its `_row` column) whose mean is that cell's example, in the
    order cells are first met (groups as given, then turns ascending). `where`: raise, naming it, when a group
    has no row at all (a session batch passes None: a group may be absent from some sessions)."""
    out: dict[Key, dict[str, np.ndarray]] = {}
    for group in position_groups:
        rows = _group_rows(meta, group)
        if not len(rows) and where is not None:
            raise ProbeDataError(f"position group {group!r}: no stored positions in {where}; stored groups: "
                                 f"{sorted(set(','.join(meta['groups'].astype(str)).split(',')))}")
        for (turn, sid), idx in rows.groupby(["turn", "session_id"], observed=True).indices.items():
            if want_turns is None or int(turn) in want_turns:
                out.setdefault((group, int(turn)), {})[str(sid)] = rows["_row"].to_numpy()[idx]
    return out


def _layout(keys: dict[Key, Iterable[str]]) -> list[tuple[tuple[str, ...], list[Key]]]:
    """Blocks: cells with the same set of sessions, in the order first met; each (sorted sessions, its (group,
    turn) keys ordered by turn, then group)."""
    by_sessions: dict[tuple[str, ...], list[Key]] = {}
    for key, sids in keys.items():
        by_sessions.setdefault(tuple(sorted(sids)), []).append(key)
    return [(sids, sorted(ks, key=lambda k: (k[1], k[0]))) for sids, ks in by_sessions.items()]


def _cells_frame(keys: list[Key], layer_ids: list[int], kind: str) -> pd.DataFrame:
    """One row per cell of a block: key-major, then layer (the order of the block's X)."""
    return pd.DataFrame([{"hook": kind, "layer": int(layer), "position_group": group, "turn": turn}
                         for group, turn in keys for layer in layer_ids])


def _session_labels(meta: pd.DataFrame) -> pd.DataFrame:
    """Each session's public labels (one row per session, indexed by session_id), as plain values: a categorical
    column's categories depend on which manifest rows were read, and must not make two reads differ."""
    labels = [c for c in meta.columns if c not in _POSITION_COLUMNS]
    out = meta.drop_duplicates("session_id")[labels]
    cats = {c: out[c].cat.categories.dtype for c in labels if isinstance(out[c].dtype, pd.CategoricalDtype)}
    return out.astype(cats).set_index("session_id")


def _want_turns(turns: Iterable[int] | None) -> set[int] | None:
    return None if turns is None else set(int(t) for t in turns) | {-1}


def probe_cells(store: ActivationStore, position_groups: Iterable[str] = ("last",), turns: Iterable[int] | None = None,
                layers: Iterable[int] | None = None, kind: str = "hook_resid_post",
                sessions: Iterable[str] | None = None) -> list[CellBlock]:
    """Activation cells of `store`: every (layer, position group, turn) present, grouped into blocks of cells that
    have the same sessions. `turns` None: every turn; `final` always counts as turn -1. Reads every stored vector
    of the layers at once; `plan_cells` + `read_cells` (or `probe_sweep_streamed`) read a store larger than
    memory in parts, to the same blocks."""
    X, meta = store.query(kind, layers=layers)
    meta = meta.reset_index(drop=True)
    meta["_row"] = np.arange(len(meta))
    if sessions is not None:
        meta = meta[meta["session_id"].isin(set(sessions))]
    if not len(meta):
        raise ProbeDataError(f"{store.path}: no stored vectors for the requested sessions")
    layer_ids = list(meta["layers"].iloc[0])
    session_meta = _session_labels(meta)
    rows = _cell_rows(meta, position_groups, _want_turns(turns), where=str(store.path))
    blocks = []
    for sids, keys in _layout(rows):
        xs = [torch.stack([X[torch.as_tensor(rows[key][s])].float().mean(0) for s in sids], dim=1) for key in keys]
        blocks.append(CellBlock(torch.cat(xs), _cells_frame(keys, layer_ids, kind),
                                session_meta.loc[list(sids)].reset_index()))
    return blocks


@dataclass
class CellPlan:
    """What `read_cells` will read, planned from the store's manifest without reading a tensor, in compact arrays:
    the sessions that have a cell (sorted ids) with their stored positions (for sizing reads) and public labels
    (one compact row each), the blocks (each the indices of its sessions into `sessions`, ascending, and its
    (group, turn) keys, in `probe_cells`' order), the layers, the vector width d, the stored bytes per value, and
    `scan_rows`, the rows of the largest manifest row group (what any query decodes at least)."""

    store: ActivationStore
    kind: str
    layers: list[int]
    sessions: np.ndarray  # [session] str, sorted
    positions: np.ndarray  # [session] int64: stored positions of `kind`
    blocks: list[tuple[np.ndarray, list[Key]]]
    labels: pd.DataFrame  # row i: session i's public labels (session_id first), categoricals as read
    position_groups: tuple[str, ...]
    want_turns: set[int] | None
    d: int
    itemsize: int
    scan_rows: int

    def block_sessions(self, b: int) -> list[str]:
        return [str(s) for s in self.sessions[self.blocks[b][0]]]

    def block_meta(self, b: int) -> pd.DataFrame:
        """Block b's `meta` as `probe_cells` gives it: one row per session, plain values."""
        return _session_labels(self.labels.iloc[self.blocks[b][0]]).reset_index()

    def block_cells(self, b: int, layers: list[int] | None = None) -> pd.DataFrame:
        """The cells of block b (at `layers`, default all planned), in the order of its X."""
        return _cells_frame(self.blocks[b][1], self.layers if layers is None else layers, self.kind)

    def vectors_per_layer(self) -> int:
        """Cell examples per layer over every block (each a float32 vector of d once read)."""
        return sum(len(idx) * len(keys) for idx, keys in self.blocks)

    def nbytes(self) -> int:
        """Bytes the plan holds: its arrays, its label table (deep, and 64 per category: pandas caches them as
        Python strings) and about 200 per (group, turn) key."""
        arrays = self.sessions.nbytes + self.positions.nbytes + sum(idx.nbytes for idx, _ in self.blocks)
        keys = sum(len(keys) for _, keys in self.blocks)
        cats = sum(len(self.labels[c].cat.categories) for c in self.labels.columns
                   if isinstance(self.labels[c].dtype, pd.CategoricalDtype))
        return int(arrays + self.labels.memory_usage(deep=True, index=True).sum() + 64 * cats + 200 * keys)


PLAN_COLUMNS = ["session_id", "turn", "position", "segment", "mark", "last_of_turn", "groups"]  # what groups need


def manifest_files(store: ActivationStore) -> list[Path]:
    """The manifest files holding every finished session's rows once (consolidated parts, then loose files)."""
    store.finished_ids()  # consolidates many loose files into parts first, as every reader of the store does
    return cover(store.path, finished_shards(store.shards))[0]


def plan_cells(store: ActivationStore, position_groups: Iterable[str] = ("last",), turns: Iterable[int] | None = None,
               layers: Iterable[int] | None = None, kind: str = "hook_resid_post",
               sessions: Iterable[str] | None = None) -> CellPlan:
    """The cells `probe_cells` would return, from the manifest alone (arguments as there). The whole manifest is
    never held: one manifest file at a time, only the columns the position groups need, is reduced to which
    sessions have which (group, turn) and how many positions each session stores; labels come from each
    session's first row. One query of one position of one layer gives d and the stored dtype."""
    stored = store.layers(kind)
    layer_ids = stored if layers is None else [int(x) for x in layers]
    missing = sorted(set(layer_ids) - set(stored))
    if missing:
        raise ProbeDataError(f"{store.path}: layers {missing} not stored for {kind!r} (stored: {stored})")
    files = manifest_files(store)
    where: dict = {"scope": scope_of(kind)}
    if sessions is not None:
        where["session_id"] = sorted(set(str(s) for s in sessions))
    with system_arrow_pool():
        first = read_rows(files, {**where, "row": 0})  # each session's first row: its labels
    if not len(first):
        raise ProbeDataError(f"{store.path}: no stored positions of {kind!r} for the requested sessions")
    groups, want = tuple(position_groups), _want_turns(turns)
    found = _PlanScan(groups, want)
    loose = [f for f in files if f.parent.name == "shards"]
    for unit in [[f] for f in files if f.parent.name != "shards"] + ([loose] if loose else []):
        with system_arrow_pool():
            found.add(read_rows(unit, where, columns=[c for c in PLAN_COLUMNS if c in first.columns]))
    ids, positions, blocks = found.layout(str(store.path))
    release_freed_memory()
    first["session_id"] = first["session_id"].astype(str)
    labels = first.drop_duplicates("session_id").set_index("session_id", drop=False).loc[ids]
    labels = labels[[c for c in labels.columns if c not in _POSITION_COLUMNS]].reset_index(drop=True)
    labels["session_id"] = labels["session_id"].astype("category")
    one, _ = store.query(kind, layers=layer_ids[:1], session_id=str(ids[0]),
                         position=int(first.loc[first["session_id"] == ids[0], "position"].iloc[0]))
    return CellPlan(store, kind, layer_ids, ids, positions, blocks, labels, groups, want, int(one.shape[-1]),
                    one.element_size(), _largest_row_group(files))


def release_freed_memory() -> None:
    """Give memory freed by a read back to the system. pyarrow pools its freed buffers (about 8 MB after a scan
    of a 10^4-row manifest), and glibc keeps a freed query's vectors in its heap (its mmap threshold grows to the
    largest block freed) where small allocations made meanwhile stop it from shrinking: without this, a capped
    sweep's resident size grew by about 1 MB per query above what it held. Not glibc: pyarrow's pool only."""
    pa.default_memory_pool().release_unused()
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def system_arrow_pool() -> Iterator[None]:
    """pyarrow allocating from the system allocator while inside (the previous default pool after). Its default,
    mimalloc, keeps what the manifest scan's worker threads freed in their own heaps, out of reach of
    `release_freed_memory`: about 320 bytes per manifest row scanned stayed resident (8 MB for 26,000 rows)."""
    old = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(old)


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _largest_row_group(files: list[Path]) -> int:
    """Rows of the largest row group among `files` (from their footers): a filtered read decodes whole groups."""
    most = 0
    for f in files:
        meta = pq.read_metadata(f)
        most = max([most] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    return most


class _PlanScan:
    """What `plan_cells` keeps of the manifest files it reads one at a time: per (group, turn) the sessions that
    have it, each session's stored positions, and the position groups stored at all."""

    def __init__(self, groups: tuple[str, ...], want: set[int] | None) -> None:
        self.groups, self.want = groups, want
        self.keys: dict[Key, list[np.ndarray]] = {}
        self.ids: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self.stored: set[str] = set()
        self.seen: set[str] = set()

    def add(self, m: pd.DataFrame) -> None:
        if not len(m):
            return
        counts = m["session_id"].astype(str).value_counts()
        self.ids.append(counts.index.to_numpy(dtype=str))
        self.counts.append(counts.to_numpy(dtype=np.int64))
        self.stored |= set(",".join(map(str, m["groups"].unique())).split(","))
        m = m.reset_index(drop=True)
        for group in self.groups:
            rows = _group_rows(m, group)
            for turn, sub in rows[["turn", "session_id"]].drop_duplicates().groupby("turn", observed=True):
                if self.want is None or int(turn) in self.want:
                    self.keys.setdefault((group, int(turn)), []).append(sub["session_id"].to_numpy(dtype=str))
            if len(rows):
                self.seen.add(group)

    def layout(self, where: str) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, list[Key]]]]:
        """(sorted ids of the sessions with a cell, their stored positions, the blocks) in `probe_cells`' order:
        keys by group as given, then turn ascending; blocks as first met; a block's keys by turn, then group."""
        for group in self.groups:
            if group not in self.seen:
                raise ProbeDataError(f"position group {group!r}: no stored positions in {where}; stored groups: "
                                     f"{sorted(self.stored)}")
        order = [(g, t) for g in self.groups for t in sorted(t for gg, t in self.keys if gg == g)]
        ids = np.unique(np.concatenate([a for key in order for a in self.keys[key]]))
        all_ids, all_counts = np.concatenate(self.ids), np.concatenate(self.counts)
        positions = all_counts[np.argsort(all_ids)][np.searchsorted(np.sort(all_ids), ids)]
        by_sessions: dict[bytes, tuple[np.ndarray, list[Key]]] = {}
        for key in order:
            idx = np.searchsorted(ids, np.unique(np.concatenate(self.keys[key]))).astype(np.int32)
            by_sessions.setdefault(idx.tobytes(), (idx, []))[1].append(key)
        blocks = [(idx, sorted(ks, key=lambda k: (k[1], k[0]))) for idx, ks in by_sessions.values()]
        return ids, positions, blocks


def session_batches(plan: CellPlan, max_positions: int) -> Iterator[list[str]]:
    """The planned sessions (sorted) in consecutive batches of at most `max_positions` stored positions (a
    session with more is a batch of its own)."""
    batch: list[str] = []
    size = 0
    for sid, n in zip(plan.sessions, plan.positions):
        if batch and size + int(n) > max_positions:
            yield batch
            batch, size = [], 0
        batch.append(str(sid))
        size += int(n)
    if batch:
        yield batch


def read_cells(plan: CellPlan, layers: list[int] | None = None, max_positions: int | None = None
               ) -> list[CellBlock]:
    """The blocks of `plan` at `layers` (default: all planned), equal to `probe_cells`' at those layers, read
    `max_positions` stored positions at a time (None: all at once): each batch of sessions is queried, reduced to
    its cell means at once, and written into blocks allocated once, so memory holds the blocks and one batch."""
    layer_ids = plan.layers if layers is None else list(layers)
    index = {key: (b, k) for b, (_, keys) in enumerate(plan.blocks) for k, key in enumerate(keys)}
    L = len(layer_ids)
    X = [torch.empty(len(keys) * L, len(idx), plan.d) for idx, keys in plan.blocks]
    filled = [np.zeros((len(keys), len(idx)), dtype=bool) for idx, keys in plan.blocks]
    for batch in session_batches(plan, max_positions or int(plan.positions.sum())):
        with system_arrow_pool():
            V, meta = plan.store.query(plan.kind, layers=layer_ids, session_id=batch)
        meta = meta.reset_index(drop=True)
        meta["_row"] = np.arange(len(meta))
        for key, per in _cell_rows(meta, plan.position_groups, plan.want_turns).items():
            for sid, rows in per.items():
                b, k = index.get(key, (0, -1))
                s = _slot(plan, b, sid)
                if k < 0 or s < 0:
                    raise ProbeDataError(f"{plan.store.path}: session {sid!r} has positions for {key} that its "
                                         "manifest did not plan (the store changed since `plan_cells`?)")
                X[b][k * L:(k + 1) * L, s] = V[torch.as_tensor(rows)].float().mean(0)
                filled[b][k, s] = True
        del V, meta
        release_freed_memory()
    if not all(f.all() for f in filled):
        raise ProbeDataError(f"{plan.store.path}: planned cells not found in the stored tensors' positions (the "
                             "store changed since `plan_cells`?)")
    return [CellBlock(x, _cells_frame(keys, layer_ids, plan.kind), plan.block_meta(b))
            for b, (x, (_, keys)) in enumerate(zip(X, plan.blocks))]


def _slot(plan: CellPlan, b: int, sid: str) -> int:
    """Where session `sid` sits in block b's examples (-1: not one of them)."""
    i = int(np.searchsorted(plan.sessions, sid))
    if i >= len(plan.sessions) or plan.sessions[i] != sid:
        return -1
    idx = plan.blocks[b][0]
    j = int(np.searchsorted(idx, i))
    return j if j < len(idx) and idx[j] == i else -1


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
    session_meta = _session_labels(meta.drop(columns="_i")).loc[sids].reset_index()
    return CellBlock(torch.cat(xs), pd.DataFrame(rows), session_meta)


def iter_patch_cells(store: ActivationStore, layers: Iterable[int] | None = None, turn: int = 0,
                     image_index: int = 0, kind: str = "hook_resid_post", max_memory_mb: float | None = None
                     ) -> Iterator[CellBlock]:
    """`patch_cells` in parts for a store larger than memory: blocks of consecutive patches (all layers each, the
    same sessions) whose concatenation is `patch_cells`' block. Planned from the manifest; each part is read by
    batches of sessions; a part's cells and one batch's read take at most about `max_memory_mb` (None: one part,
    one read). Feed the parts to `probes.probing.stream.probe_sweep_chunks`."""
    m = read_rows(manifest_files(store), {"scope": scope_of(kind), "turn": turn, "segment": "image",
                                           "image_index": image_index})  # only these rows: not the whole manifest
    m = m[(m["tile"] == m["tile"].min()) & (m["patch_row"] >= 0)] if len(m) else m
    if not len(m):
        raise ProbeDataError(f"{store.path}: no image patch positions stored for turn {turn}; capture with "
                             f"positions including image:{image_index}")
    tile, layer_ids = int(m["tile"].min()), store.layers(kind) if layers is None else [int(x) for x in layers]
    sids = sorted(set(m["session_id"].astype(str)))
    patches = [rc for rc, sub in m.groupby(["patch_row", "patch_col"], observed=True)
               if sub["session_id"].nunique() == len(sids)]  # a patch some sessions lack: not comparable
    session_meta = _session_labels(m).loc[sids].reset_index()
    one, _ = store.query(kind, layers=layer_ids[:1], session_id=sids[0], position=int(m["position"].iloc[0]))
    per_patch = len(layer_ids) * len(sids) * one.shape[-1] * 4
    per_session = int(m["session_id"].astype(str).value_counts().max()) * len(layer_ids) * one.shape[-1] * 4
    step = len(patches) if max_memory_mb is None else max(1, int(max_memory_mb * 2 ** 19) // per_patch)
    per_read = len(sids) if max_memory_mb is None else max(1, int(max_memory_mb * 2 ** 19) // max(per_session, 1))
    for lo in range(0, len(patches), step):
        yield _read_patches(store, kind, layer_ids, (turn, image_index, tile), patches[lo:lo + step], sids,
                            per_read, session_meta)


def _read_patches(store: ActivationStore, kind: str, layer_ids: list[int], where: tuple[int, int, int],
                  patches: list[tuple[int, int]], sids: list[str], per_read: int,
                  session_meta: pd.DataFrame) -> CellBlock:
    """One part of `iter_patch_cells`: X [patch * layer, n, d] filled `per_read` sessions at a time."""
    turn, image_index, tile = where
    L, slot = len(layer_ids), {s: i for i, s in enumerate(sids)}
    index = {(int(r), int(c)): p for p, (r, c) in enumerate(patches)}
    X: Tensor | None = None
    for lo in range(0, len(sids), per_read):
        V, meta = store.query(kind, layers=layer_ids, turn=turn, segment="image", image_index=image_index,
                              session_id=sids[lo:lo + per_read])
        meta = meta.reset_index(drop=True)
        meta["_i"] = np.arange(len(meta))
        meta = meta[(meta["tile"] == tile) & (meta["patch_row"] >= 0)].drop_duplicates(
            ["patch_row", "patch_col", "session_id"])
        if X is None:
            X = torch.empty(len(patches) * L, len(sids), V.shape[-1])
        for r, c, sid, i in zip(meta["patch_row"], meta["patch_col"], meta["session_id"].astype(str), meta["_i"]):
            p = index.get((int(r), int(c)))
            if p is not None:
                X[p * L:(p + 1) * L, slot[sid]] = V[int(i)].float()
        del V, meta
    rows = [{"hook": kind, "layer": int(layer), "position_group": f"patch:{r},{c}", "turn": turn,
             "patch_row": int(r), "patch_col": int(c)} for r, c in patches for layer in layer_ids]
    return CellBlock(X, pd.DataFrame(rows), session_meta)
