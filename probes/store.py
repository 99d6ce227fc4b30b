"""ActivationStore: captured hidden states on disk, append-only, resumable, read lazily.

Layout of a store folder:

    store.json                  what was captured: model, family, hooks, positions, dtype (the store's identity)
    shards/<name>.safetensors   one per session: tensor "<hook kind>" shaped [n_positions, n_layers, d]
                                 (e.g. "hook_resid_post" [37, 8, 256]); the session JSON in its metadata
    shards/<name>.parquet       that session's manifest rows, written LAST: its presence marks the session done
    manifest.parquet            all finished sessions' rows in one file (rebuilt on demand; a cache, not the truth)

One manifest row per stored vector: session_id, turn, role, position, segment, image_index, tile, patch_row,
patch_col, mark, last_of_turn, groups (the position selectors that picked it), hook, kind, layer, the row of
that vector's position in its shard tensor, and every public label the session carries (labels whose key
starts with "_", such as "_target", the PII value a probe asks for, are private and not copied).

Every file is written to a temp name and renamed, so a capture killed at any moment leaves only finished
sessions (and stray `.tmp` files, which opening the store removes). Reads memory-map the safetensors shards.
"""

from __future__ import annotations

import hashlib
import json
import re
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

from probes.session import Session, atomic_write_bytes, atomic_write_text

FORMAT = 1
# Columns of the store manifest that are not session labels.
BASE_COLUMNS = ["session_id", "turn", "role", "position", "segment", "image_index", "tile", "patch_row", "patch_col",
                "mark", "last_of_turn", "groups", "hook", "kind", "layer", "row", "shard"]


class StoreError(ValueError):
    pass


def shard_name(session_id: str) -> str:
    """A file-safe name for a session id (readable when it already is, else a hash)."""
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", session_id) and not session_id.startswith("."):
        return session_id
    return "s-" + hashlib.sha1(session_id.encode()).hexdigest()[:20]


@dataclass
class SessionActivations:
    """What capture produced for one session, before it is written."""

    session: Session
    kinds: dict[str, Float[Tensor, "pos layer d"]]  # hook kind -> activations
    layers: dict[str, list[int]]  # hook kind -> layer index of each slot along dim 1
    rows: dict[str, pd.DataFrame]  # hook kind -> one row per position (token map columns + groups)


def _read_spec(meta: Path) -> dict[str, Any]:
    try:
        spec = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{meta}: not valid JSON ({err}); expected the store's settings") from err
    if not isinstance(spec, dict):
        raise StoreError(f"{meta}: expected a JSON object of the store's settings, got {type(spec).__name__}")
    return spec


SHARDS_KEY = b"mmret_shards"  # schema metadata of manifest.parquet: the shards it consolidates


class ActivationStore:
    """A folder of captured activations; see the module docstring for the layout."""

    def __init__(self, path: str | Path, spec: dict[str, Any] | None = None) -> None:
        """Open (or, with `spec`, create) a store. Reopening with a different spec is an error."""
        self.path = Path(path)
        self.shards = self.path / "shards"
        meta = self.path / "store.json"
        if spec is not None:
            spec = {"format": FORMAT, **spec}
            self.shards.mkdir(parents=True, exist_ok=True)
            if meta.exists():
                old = _read_spec(meta)
                diff = {k for k in set(old) | set(spec) if old.get(k) != spec.get(k)}
                if diff:
                    raise StoreError(
                        f"{meta}: this store was captured with other settings ({', '.join(sorted(diff))} differ); "
                        "use a new output folder"
                    )
            else:
                atomic_write_text(meta, json.dumps(spec, indent=2, sort_keys=True))
            # Temp files left by a killed writer are never finished files. Only a writer clears them: a reader
            # (mmret inspect during a capture) would delete the live writer's file before its rename.
            for tmp in self.shards.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        elif not meta.exists():
            raise StoreError(f"{self.path}: not an activation store (no store.json)")
        self.spec: dict[str, Any] = _read_spec(meta)
        self._manifest: pd.DataFrame | None = None

    # ---- writing -----------------------------------------------------------------------------------------
    def done(self, session_id: str) -> bool:
        return (self.shards / f"{shard_name(session_id)}.parquet").exists()

    def finished_ids(self) -> set[str]:
        return set(self.manifest["session_id"].unique()) if len(self.manifest) else set()

    def write(self, acts: SessionActivations) -> None:
        """Write one session: tensors first, manifest rows last (the commit marker)."""
        sid = acts.session.session_id
        name = shard_name(sid)
        tensors = {k: v.contiguous() for k, v in acts.kinds.items()}
        blob = st_save(tensors, metadata={"session": json.dumps(acts.session.to_json())})
        atomic_write_bytes(self.shards / f"{name}.safetensors", blob)
        frames = []
        for kind, rows in acts.rows.items():
            n = len(rows)
            for slot, layer in enumerate(acts.layers[kind]):
                f = rows.copy()
                f["row"] = np.arange(n)
                f["kind"] = kind
                f["layer"] = layer
                f["slot"] = slot
                f["hook"] = _hook_name(kind, layer)
                frames.append(f)
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=BASE_COLUMNS)
        df.insert(0, "session_id", sid)
        df["shard"] = name
        for key, value in acts.session.labels.items():
            if key.startswith("_"):  # private labels (the PII value a probe asks for ...) stay out of manifests
                continue
            col = key if key not in df.columns else f"label_{key}"
            df[col] = _scalar(value)
        buf = _parquet_bytes(df)
        atomic_write_bytes(self.shards / f"{name}.parquet", buf)
        self._manifest = None

    # ---- reading -----------------------------------------------------------------------------------------
    @property
    def manifest(self) -> pd.DataFrame:
        """All finished sessions' rows (read once; consolidated into manifest.parquet when stale)."""
        if self._manifest is not None:
            return self._manifest
        parts = sorted(self.shards.glob("*.parquet"))
        names = {p.stem for p in parts}
        cons = self.path / "manifest.parquet"
        df = None
        # The consolidated file records the shards it was made from (a session whose selectors picked no
        # position has a shard but no rows, so the rows alone cannot say).
        if cons.exists() and _shards_of(cons) == names:
            df = pd.read_parquet(cons)
        if df is None:
            frames = [pd.read_parquet(p) for p in parts]
            df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=BASE_COLUMNS)
            if frames:
                atomic_write_bytes(cons, _parquet_bytes(df, shards=names))
        self._manifest = df
        return df

    def session(self, session_id: str) -> Session:
        """The session as captured (with any generated assistant text filled in)."""
        path = self.shards / f"{shard_name(session_id)}.safetensors"
        if not path.exists():
            raise StoreError(f"{self.path}: no session {session_id!r}")
        with safe_open(str(path), framework="pt") as fh:
            return Session.from_json(json.loads(fh.metadata()["session"]), where=str(path))

    def sessions(self) -> list[Session]:
        return [self.session(s) for s in sorted(self.finished_ids())]

    def query(
        self,
        kind: str = "hook_resid_post",
        layers: Iterable[int] | None = None,
        position_group: str | None = None,
        **filters: Any,
    ) -> tuple[Float[Tensor, "n layer d"], pd.DataFrame]:
        """Vectors of one hook kind, stacked as [n, layer, d], with one metadata row per n.

        `filters` are manifest columns = value (or a list of values), e.g. `turn=3, last_of_turn=True`;
        `position_group` keeps positions picked by that selector at capture time (e.g. "mark:ssn").
        """
        m = self.manifest
        if not len(m):
            raise StoreError(f"{self.path}: the store is empty")
        sel = m["kind"] == kind
        if not sel.any():
            raise StoreError(f"{self.path}: no hook kind {kind!r}; stored kinds: {sorted(m['kind'].unique())}")
        for col, value in filters.items():
            if col not in m.columns:
                raise StoreError(f"query: unknown column {col!r}; columns: {', '.join(m.columns)}")
            values = value if isinstance(value, (list, tuple, set, np.ndarray)) else [value]
            sel &= m[col].isin(values)
        if position_group is not None:
            sel &= m["groups"].map(lambda g: position_group in str(g).split(","))
        rows = m[sel]
        all_layers = [int(x) for x in sorted(rows["layer"].unique())]
        want = list(layers) if layers is not None else all_layers
        missing = set(want) - set(all_layers)
        if missing:
            raise StoreError(f"query: layers {sorted(missing)} not stored for {kind!r} (stored: {all_layers})")
        rows = rows[rows["layer"].isin(want)]
        meta = (rows.drop(columns=["layer", "slot", "hook"]).drop_duplicates(["session_id", "row"])
                .reset_index(drop=True))
        slots = {layer: slot for layer, slot in rows[["layer", "slot"]].drop_duplicates().itertuples(index=False)}
        out = torch.empty(len(meta), len(want), _d_of(self, meta, kind),
                          dtype=getattr(torch, self.spec.get("dtype", "float32")))
        for shard, idx in meta.groupby("shard").indices.items():
            with safe_open(str(self.shards / f"{shard}.safetensors"), framework="pt") as fh:
                t = fh.get_tensor(kind)
            out[idx] = t[torch.as_tensor(meta["row"].to_numpy()[idx])][:, [slots[l] for l in want]]
        meta["layers"] = [want] * len(meta)
        return out, meta

    def summary(self) -> str:
        """A short human-readable description (what `mmret inspect` prints); no PII values."""
        m = self.manifest
        lines = [f"store: {self.path}", f"model: {self.spec.get('model')} (family {self.spec.get('family')})"]
        lines.append(f"sessions: {m['session_id'].nunique() if len(m) else 0}, vectors: {len(m)}")
        if len(m):
            for kind, g in m.groupby("kind"):
                layers = [int(x) for x in sorted(g["layer"].unique())]
                lines.append(f"  {kind}: layers {layers}, vectors per layer {g.groupby(['session_id', 'row']).ngroups}")
            lines.append(f"turns: {[int(t) for t in sorted(m['turn'].unique())]}")
            per_pos = m.drop_duplicates(["session_id", "row", "kind"])
            lines.append(f"segments: {_counts(per_pos['segment'])}")
            lines.append(f"position groups: {_counts(per_pos['groups'].str.split(',').explode())}")
        lines.append(f"hooks: {', '.join(self.spec.get('hooks', []))}")
        lines.append(f"positions: {self.spec.get('positions')}  dtype: {self.spec.get('dtype')}")
        return "\n".join(lines)


def _counts(col: pd.Series) -> str:
    return ", ".join(f"{k} {int(v)}" for k, v in col.value_counts().items())


def _d_of(store: ActivationStore, meta: pd.DataFrame, kind: str) -> int:
    shard = meta["shard"].iloc[0] if len(meta) else store.manifest["shard"].iloc[0]
    with safe_open(str(store.shards / f"{shard}.safetensors"), framework="pt") as fh:
        return int(fh.get_slice(kind).get_shape()[-1])


def _hook_name(kind: str, layer: int) -> str:
    if kind.startswith("vision."):
        return f"vision_encoder.encoder_layers.{layer}.{kind.split('.', 1)[1]}"
    if kind.startswith("hook_"):
        return f"blocks.{layer}.{kind}"
    return kind


def _scalar(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value)


def _parquet_bytes(df: pd.DataFrame, shards: set[str] | None = None) -> bytes:
    """Parquet of df; `shards` (for the consolidated manifest) is kept in the file's schema metadata."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    if shards is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               SHARDS_KEY: json.dumps(sorted(shards)).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _shards_of(cons: Path) -> set[str] | None:
    import pyarrow.parquet as pq

    stored = (pq.read_schema(cons).metadata or {}).get(SHARDS_KEY)
    return set(json.loads(stored)) if stored is not None else None
