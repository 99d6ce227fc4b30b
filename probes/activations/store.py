"""ActivationStore: captured hidden states on disk, append-only, resumable, read lazily and in part.

Layout of a store folder (format 2):

    store.json                  the settings (probes.activations.folder)
    shards/<name>.safetensors   one per session: one tensor per hook kind, shaped [n_positions, n_layers, d] in the
                                 dtype captured (the model's own by default), e.g. "hook_resid_post" [37, 8, 256];
                                 metadata: the session JSON without its private labels, and per kind its layers
                                 along dim 1 and its scope (which manifest rows index it)
    shards/<name>.parquet       that session's manifest rows, written LAST: its presence marks the session done
    manifest/part-*.parquet     finished sessions' rows consolidated (probes.activations.manifest): a cache, the
                                 per-session files are the truth
    private_labels.jsonl        only when asked (see probes.activations.folder)
    .lock, .lock.<i>-of-<n>     while a capture writes (probes.activations.lock)

One manifest row per stored position: session_id, turn, role, position, segment, image_index, tile, patch_row,
patch_col, mark, last_of_turn, groups (the position selectors that picked it), scope ("lm": the row indexes every
LM hook kind's tensor; a vision kind's name: that kind's own rows), row (its index along the tensors' first axis),
shard, and every public label the session carries (labels whose key starts with "_", such as "_target", the PII
value a probe asks for, are private and not copied). Layers are the tensors' second axis, never rows.

Private labels never reach a shard or a manifest. Readers that need them (probe targets:
`probes.probing.targets.session_targets`) get them from `sessions(private_from=<the sessions JSONL or list>)`, or
from `private_labels.jsonl` when the capture was asked to keep it.

Every file is written to a temp name and renamed, so a capture killed at any moment leaves only finished sessions
(and stray `.tmp` files, which a writer opening the store removes). Reads memory-map the safetensors shards and
copy out only the rows and layers asked for.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import Tensor

from probes.activations.errors import StoreError
from probes.activations.folder import FORMAT, check_format, compare_spec, read_private_labels, read_spec, shard_name
from probes.activations.manifest import (
    CONSOLIDATE_AFTER,
    compact,
    consolidate,
    cover,
    drop_stale_parts,
    finished_shards,
    parquet_bytes,
    read_rows,
    union_schema,
)
from probes.data.files import atomic_write_bytes, atomic_write_text
from probes.data.session import Session, SessionError, read_sessions

log = logging.getLogger(__name__)
LM_SCOPE = "lm"


@dataclass
class SessionActivations:
    """What capture produced for one session, before it is written."""

    session: Session
    kinds: dict[str, Float[Tensor, "pos layer d"]]  # hook kind -> activations
    layers: dict[str, list[int]]  # hook kind -> layer index of each slot along dim 1
    rows: dict[str, pd.DataFrame]  # hook kind -> one row per position (token map columns + groups)


def scope_of(kind: str) -> str:
    """Which manifest rows index a kind's tensor: LM hooks share theirs; each vision-side kind has its own."""
    return kind if kind.startswith("vision") else LM_SCOPE


class ActivationStore:
    """A folder of captured activations; see the module docstring for the layout."""

    def __init__(self, path: str | os.PathLike, spec: dict[str, Any] | None = None) -> None:
        """Open (or, with `spec`, create) a store. Reopening with a different spec is an error; so is a store
        written in another format (StoreError saying what to do)."""
        self.path = Path(path)
        self.shards = self.path / "shards"
        meta = self.path / "store.json"
        if spec is not None:
            spec = {"format": FORMAT, **spec}
            self.shards.mkdir(parents=True, exist_ok=True)
            if meta.exists():
                compare_spec(meta, read_spec(meta), spec)
            else:
                atomic_write_text(meta, json.dumps(spec, indent=2, sort_keys=True))
        elif not meta.exists():
            raise StoreError(f"{self.path}: not an activation store (no store.json)")
        self.spec: dict[str, Any] = read_spec(meta)
        check_format(meta, self.spec)
        self._manifest: pd.DataFrame | None = None
        self._kinds: dict[str, dict[str, Any]] | None = None

    # ---- writing -----------------------------------------------------------------------------------------
    def clear_debris(self) -> None:
        """Remove what killed writers left: temp files (never finished files) and manifest parts naming a session
        that is no longer finished. Only the one writer holding the store's lock exclusively may: a reader, or a
        shard worker beside others, would delete a live writer's temp file before its rename."""
        for tmp in self.shards.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        drop_stale_parts(self.path, finished_shards(self.shards))

    def done(self, session_id: str) -> bool:
        return (self.shards / f"{shard_name(session_id)}.parquet").exists()

    def write(self, acts: SessionActivations) -> None:
        """Write one session: tensors first, manifest rows last (the commit marker)."""
        sid = acts.session.session_id
        name = shard_name(sid)
        tensors = {k: v.contiguous() for k, v in acts.kinds.items()}
        kinds = {k: {"layers": [int(x) for x in acts.layers[k]], "scope": scope_of(k)} for k in tensors}
        # The session goes in without its private labels (PII values): a store can be shared, they must not be.
        blob = st_save(tensors, metadata={"session": json.dumps(acts.session.public().to_json()),
                                          "kinds": json.dumps(kinds), "format": str(FORMAT)})
        atomic_write_bytes(self.shards / f"{name}.safetensors", blob)
        frames = {}
        for kind, rows in acts.rows.items():
            scope = scope_of(kind)
            if scope not in frames:
                frames[scope] = rows.assign(scope=scope, row=np.arange(len(rows)))
        df = pd.concat(frames.values(), ignore_index=True) if frames else pd.DataFrame()
        df.insert(0, "session_id", sid)
        df["shard"] = name
        for key, value in acts.session.labels.items():
            if key.startswith("_"):  # private labels (the PII value a probe asks for ...) stay out of manifests
                continue
            col = key if key not in df.columns else f"label_{key}"
            df[col] = _scalar(value)
        atomic_write_bytes(self.shards / f"{name}.parquet", parquet_bytes(compact(df), {name: sid}))
        self._manifest = None

    # ---- reading -----------------------------------------------------------------------------------------
    def _cover(self, consolidate_now: bool = False) -> tuple[list[Path], dict[str, str]]:
        files, ids = cover(self.path, finished_shards(self.shards))
        loose = sum(f.parent.name == "shards" for f in files)
        if loose >= 2 and (consolidate_now or loose >= CONSOLIDATE_AFTER):
            files = consolidate(self.path, files)
        return files, ids

    def finished_ids(self) -> set[str]:
        """Ids of the finished sessions (from the manifest files' metadata: no row is read)."""
        return set(self._cover()[1].values())

    @property
    def manifest(self) -> pd.DataFrame:
        """All finished sessions' rows, one per stored position (read once; consolidated into parts when many
        sessions' files are loose). For one cell of a big store, `query` reads far less."""
        if self._manifest is None:
            self._manifest = read_rows(self._cover(consolidate_now=True)[0])
        return self._manifest

    def kinds(self) -> dict[str, list[int]]:
        """Stored hook kind -> its layers along the tensors' second axis."""
        return {k: list(v["layers"]) for k, v in self._kind_info().items()}

    def layers(self, kind: str = "hook_resid_post") -> list[int]:
        """The layers stored for `kind` (StoreError naming the stored kinds if there is none)."""
        info = self._kind_info()
        if kind not in info:
            raise StoreError(f"{self.path}: no hook kind {kind!r}; stored kinds: {sorted(info)}")
        return list(info[kind]["layers"])

    def _kind_info(self) -> dict[str, dict[str, Any]]:
        if self._kinds is None:
            first = next(iter(sorted(self._cover()[1])), None)
            if first is None:
                raise StoreError(f"{self.path}: the store is empty")
            self._kinds = _shard_kinds(self.shards / f"{first}.safetensors")
        return self._kinds

    def query(
        self,
        kind: str = "hook_resid_post",
        layers: Iterable[int] | None = None,
        position_group: str | None = None,
        **filters: Any,
    ) -> tuple[Float[Tensor, "n layer d"], pd.DataFrame]:
        """Vectors of one hook kind, stacked as [n, layer, d], with one metadata row per n.

        `filters` are manifest columns = value (or a list of values), e.g. `turn=3, last_of_turn=True` or
        `session_id=[...]`; `position_group` keeps positions picked by that selector at capture time (e.g.
        "mark:ssn"). Only the manifest rows and the tensor rows and layers asked for are read.
        """
        files, _ = self._cover()
        if not files:
            raise StoreError(f"{self.path}: the store is empty")
        info = self._kind_info()
        stored = self.layers(kind)
        want = [int(x) for x in layers] if layers is not None else stored
        missing = sorted(set(want) - set(stored))
        if missing:
            raise StoreError(f"query: layers {missing} not stored for {kind!r} (stored: {stored})")
        schema = union_schema(files)
        for col in filters:
            if col not in schema.names:
                raise StoreError(f"query: unknown column {col!r}; columns: {', '.join(schema.names)}")
        meta = read_rows(files, {**filters, "scope": info[kind]["scope"]}, schema=schema)
        if position_group is not None and len(meta):
            meta = meta[meta["groups"].astype(str).str.split(",").map(lambda g: position_group in g)]
        meta = meta.drop(columns=["scope"]).reset_index(drop=True)
        slots = [stored.index(layer) for layer in want]
        out = _read_vectors(self.shards, kind, meta, slots)
        meta["kind"] = kind
        meta["layers"] = [want] * len(meta)
        return out, meta

    def session(self, session_id: str, private_from: str | os.PathLike | Iterable[Session] | None = None
                ) -> Session:
        """The session as captured (with any generated assistant text filled in); its private labels come from
        `private_from` or `private_labels.jsonl` (see `sessions`)."""
        return self._with_private([self._stored(session_id)], private_from)[0]

    def sessions(self, private_from: str | os.PathLike | Iterable[Session] | None = None) -> list[Session]:
        """Every finished session as captured. Shards hold no private labels: they come from `private_from` (a
        sessions JSONL path or the Session objects that were captured, joined by session_id and checked to be the
        same sessions) or, when the capture kept them, from the store's `private_labels.jsonl`. With neither, the
        sessions have their public labels only."""
        return self._with_private([self._stored(s) for s in sorted(self.finished_ids())], private_from)

    def _stored(self, session_id: str) -> Session:
        path = self.shards / f"{shard_name(session_id)}.safetensors"
        if not path.exists():
            raise StoreError(f"{self.path}: no session {session_id!r}")
        with safe_open(str(path), framework="pt") as fh:
            return Session.from_json(json.loads(fh.metadata()["session"]), where=str(path))

    def _with_private(self, stored: list[Session], private_from: Any) -> list[Session]:
        if private_from is None:
            labels = read_private_labels(self.path)
            for s in stored:
                s.labels.update(labels.get(s.session_id, {}))
            return stored
        given = _given_sessions(private_from)
        missing = [s.session_id for s in stored if s.session_id not in given]
        if missing:
            raise StoreError(f"{self.path}: {len(missing)} stored session(s) are not in {_name_of(private_from)} "
                             f"(first: {missing[0]!r}); expected the sessions that were captured")
        for s in stored:
            g = given[s.session_id]
            if not _same_session(s, g):
                raise StoreError(f"{self.path}: session {s.session_id!r} differs from the one of that id in "
                                 f"{_name_of(private_from)} (labels, texts or images); expected the sessions that "
                                 "were captured")
            s.labels.update(g.private_labels())
        return stored

    def summary(self) -> str:
        """A short human-readable description (what `mmret inspect` prints); no PII values."""
        m = self.manifest
        n_sessions = len(self.finished_ids())
        lines = [f"store: {self.path}", f"model: {self.spec.get('model')} (family {self.spec.get('family')})"]
        kinds = self.kinds() if n_sessions else {}
        per_layer = {k: int((m["scope"] == scope_of(k)).sum()) if len(m) else 0 for k in kinds}
        lines.append(f"sessions: {n_sessions}, positions: {len(m)}, "
                     f"vectors: {sum(per_layer[k] * len(v) for k, v in kinds.items())}")
        for kind, layers in kinds.items():
            lines.append(f"  {kind}: layers {layers}, vectors per layer {per_layer[kind]}")
        if len(m):
            lines.append(f"turns: {[int(t) for t in sorted(m['turn'].unique())]}")
            lines.append(f"segments: {_counts(m['segment'])}")
            lines.append(f"position groups: {_counts(m['groups'].astype(str).str.split(',').explode())}")
        lines.append(f"hooks: {', '.join(self.spec.get('hooks', []))}")
        lines.append(f"positions: {self.spec.get('positions')}  dtype: {self.spec.get('dtype')}")
        return "\n".join(lines)


def _shard_kinds(path: Path) -> dict[str, dict[str, Any]]:
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "kinds" not in meta:
        raise StoreError(f"{path}: a shard without its kinds' layers (written by another format); capture again")
    return json.loads(meta["kinds"])


def _read_vectors(shards: Path, kind: str, meta: pd.DataFrame, slots: list[int]) -> Tensor:
    """[len(meta), len(slots), d]: for each shard, only the span of rows asked for and the layers asked for are
    copied out of the memory-mapped file, straight into the answer."""
    out: Tensor | None = None
    for shard, idx in meta.groupby("shard", observed=True).indices.items():
        rows = meta["row"].to_numpy()[idx].astype(np.int64)
        with safe_open(str(shards / f"{shard}.safetensors"), framework="pt") as fh:
            sl = fh.get_slice(kind)
            r0, r1 = int(rows.min()), int(rows.max()) + 1
            if slots == list(range(slots[0], slots[0] + len(slots))):
                t = sl[r0:r1, slots[0]:slots[-1] + 1]
            else:
                t = sl[r0:r1][:, slots]
        if out is None:
            out = torch.empty(len(meta), len(slots), t.shape[-1], dtype=t.dtype)
        out[torch.as_tensor(idx)] = t[torch.as_tensor(rows - r0)]
        del t
    return out if out is not None else torch.empty(0, len(slots), 0)


def _given_sessions(private_from: Any) -> dict[str, Session]:
    if isinstance(private_from, (str, os.PathLike)):
        try:
            return {s.session_id: s for s in read_sessions(private_from)}
        except SessionError as err:
            raise StoreError(f"private labels: {err}") from None
    return {s.session_id: s for s in private_from}


def _name_of(private_from: Any) -> str:
    return str(private_from) if isinstance(private_from, (str, os.PathLike)) else "the sessions given"


def _same_session(stored: Session, given: Session) -> bool:
    """Whether `given` is the session that was captured as `stored`: the same public labels, turns, texts (a turn
    the model wrote is None in `given`) and images (by sha256)."""
    def public(labels: dict) -> Any:  # as JSON stores them (tuples come back as lists)
        return json.loads(json.dumps({k: v for k, v in labels.items() if not k.startswith("_")}, default=str))

    if public(given.labels) != public(stored.labels) or len(given.turns) != len(stored.turns):
        return False
    for a, b in zip(stored.turns, given.turns):
        if a.role != b.role or (b.text is not None and a.text != b.text):
            return False
        if [im.to_json()["sha256"] for im in a.images] != [im.to_json()["sha256"] for im in b.images]:
            return False
    return True


def _counts(col: pd.Series) -> str:
    return ", ".join(f"{k} {int(v)}" for k, v in col.value_counts().items())


def _scalar(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value)
