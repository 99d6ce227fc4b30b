"""ActivationStore: captured hidden states on disk, append-only, resumable, read lazily.

Layout of a store folder:

    store.json                  what was captured: model, family, hooks, positions, dtype, and the model's
                                 fingerprint (its checkpoint files: a resume with other weights is refused)
    shards/<name>.safetensors   one per session: tensor "<hook kind>" shaped [n_positions, n_layers, d]
                                 (e.g. "hook_resid_post" [37, 8, 256]); the session JSON in its metadata, without
                                 its private labels
    shards/<name>.parquet       that session's manifest rows, written LAST: its presence marks the session done
    manifest.parquet            all finished sessions' rows in one file (rebuilt on demand; a cache, not the truth)

One manifest row per stored vector: session_id, turn, role, position, segment, image_index, tile, patch_row,
patch_col, mark, last_of_turn, groups (the position selectors that picked it), hook, kind, layer, the row of
that vector's position in its shard tensor, and every public label the session carries (labels whose key
starts with "_", such as "_target", the PII value a probe asks for, are private and not copied).

    private_labels.jsonl        only when asked (`capture(keep_private_labels=True)`): each session's private
                                 labels ("_target", "_identity": PII values). Leave it out when sharing a store.
    .lock                       while a capture writes: its process id (a second writer is refused)

Private labels (keys starting with "_") never reach a shard or a manifest. Readers that need them (probe targets:
`probes.probing.targets.session_targets`) get them from `sessions(private_from=<the sessions JSONL or list>)`, or from
`private_labels.jsonl` when the capture was asked to keep it.

Every file is written to a temp name and renamed, so a capture killed at any moment leaves only finished
sessions (and stray `.tmp` files, which opening the store removes). Reads memory-map the safetensors shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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

from probes.data.files import atomic_write_bytes, atomic_write_text
from probes.data.session import Session, SessionError, read_sessions

FORMAT = 1
PRIVATE_FILE = "private_labels.jsonl"
LOCK_FILE = ".lock"
# What a store folder holds (anything else in a folder without store.json: not a store, never written into).
STORE_ENTRIES = {"store.json", "shards", "manifest.parquet", PRIVATE_FILE, LOCK_FILE}
log = logging.getLogger(__name__)
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


def compare_spec(meta: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to add to a store (`meta`: its store.json, holding `old`) sessions captured with the settings `new`:
    other weights (fingerprints differ), a store.json from a version without fingerprints, or other settings."""
    new = {"format": FORMAT, **new}
    again = "capture into a new folder, or pass force_new=True (--force-new) to start this store over"
    if "fingerprint" in new and "fingerprint" not in old:
        raise StoreError(f"{meta}: written by an older version that recorded no model fingerprint, so the weights "
                         f"it was captured with cannot be checked; {again}")
    if old.get("fingerprint") != new.get("fingerprint"):
        files = _files_that_differ(old.get("fingerprint_files") or [], new.get("fingerprint_files") or [])
        raise StoreError(f"{meta}: this store was captured from other weights (store fingerprint "
                         f"{old.get('fingerprint')}, this model {new.get('fingerprint')}"
                         f"{'; files that differ: ' + ', '.join(files) if files else ''}); {again}")
    diff = {k for k in set(old) | set(new) if old.get(k) != new.get(k)}
    if diff:
        raise StoreError(f"{meta}: this store was captured with other settings ({', '.join(sorted(diff))} differ); "
                         f"{again}")


def _files_that_differ(old: list, new: list) -> list[str]:
    a, b = {f[0]: list(f) for f in old}, {f[0]: list(f) for f in new}
    return sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))


def check_store_folder(path: str | os.PathLike) -> dict[str, Any] | None:
    """Whether a capture may write into `path`, checked without writing: None when there is no store there yet
    (the folder is absent or empty, and it or its nearest existing parent is writable), the settings of the store
    found there otherwise. A file, an unwritable place, or a non-empty folder that is not a store: StoreError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: is a file; expected a folder for the activation store (new or one to resume)")
    base = path
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise StoreError(f"{path}: {base} is a file; expected a folder for the activation store")
    if not os.access(base, os.W_OK | os.X_OK):
        raise StoreError(f"{path}: cannot write into {base} (permission denied); expected a writable folder")
    meta = path / "store.json"
    if meta.exists():
        return _read_spec(meta)
    if path.is_dir():
        other = sorted(p.name for p in path.iterdir() if p.name not in STORE_ENTRIES)
        if other:
            raise StoreError(f"{path}: a folder that is not an activation store (no store.json) and not empty "
                             f"(holds {other[0]!r}{' ...' if len(other) > 1 else ''}); expected a new or empty "
                             "folder, or a store to resume")
    return None


def clear_store(path: str | os.PathLike) -> None:
    """Remove a store's own files (and nothing else) from `path`: the done-markers first, so that a clear killed
    half way leaves a store that resumes from scratch rather than one that trusts half its sessions."""
    path = Path(path)
    shards = path / "shards"
    if shards.is_dir():
        for pattern in ("*.parquet", "*.safetensors", ".*.tmp"):
            for f in shards.glob(pattern):
                f.unlink(missing_ok=True)
        if not any(shards.iterdir()):
            shards.rmdir()
    for name in ("manifest.parquet", PRIVATE_FILE, "store.json"):
        (path / name).unlink(missing_ok=True)


class StoreLock:
    """`with StoreLock(folder):` one writer at a time. A second is refused with a StoreError naming the process
    that holds the lock. The lock is the kernel's (flock), so a writer killed at any moment holds it no more; the
    pid it left in the lock file is then taken over, and the log says so."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "StoreLock":
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _pid_in(fd)
                os.close(fd)
                raise StoreError(f"{self.path.parent}: another capture (process {holder or 'unknown'}) is writing "
                                 f"into this store (lock file {self.path}); wait for it to end or use another "
                                 "folder") from None
            except OSError as err:  # a filesystem without locks: go on, but say that nothing is guarded
                log.warning("%s: cannot lock (%s); a second writer would not be stopped", self.path, err)
                break
            try:  # a finishing writer unlinks the file: the one locked must still be the one at the path
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        old = _pid_in(fd)
        if old is not None and old != os.getpid():
            state = "no longer running" if not _alive(old) else "no longer holding it"
            log.warning("%s: took over the lock left by process %d (%s)", self.path, old, state)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def _pid_in(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_private_labels(path: str | os.PathLike, sessions: Iterable[Session]) -> Path:
    """`<store>/private_labels.jsonl`: the private labels of `sessions`, added to those already there (PII: the
    file to leave out when sharing a store)."""
    target = Path(path) / PRIVATE_FILE
    labels = read_private_labels(path)
    for s in sessions:
        labels[s.session_id] = s.private_labels()
    lines = [json.dumps({"session_id": sid, "labels": lab}, ensure_ascii=False, sort_keys=True)
             for sid, lab in sorted(labels.items())]
    atomic_write_text(target, "".join(line + "\n" for line in lines))
    return target


def read_private_labels(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """session_id -> private labels, from `<store>/private_labels.jsonl` ({} when the store has none)."""
    target = Path(path) / PRIVATE_FILE
    if not target.exists():
        return {}
    out = {}
    for lineno, line in enumerate(target.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
            out[str(row["session_id"])] = dict(row["labels"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise StoreError(f"{target}:{lineno}: not a private-labels row ({type(err).__name__}); expected "
                             '{"session_id": ..., "labels": {...}}') from None
    return out


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

    def __init__(self, path: str | os.PathLike, spec: dict[str, Any] | None = None) -> None:
        """Open (or, with `spec`, create) a store. Reopening with a different spec is an error."""
        self.path = Path(path)
        self.shards = self.path / "shards"
        meta = self.path / "store.json"
        if spec is not None:
            spec = {"format": FORMAT, **spec}
            self.shards.mkdir(parents=True, exist_ok=True)
            if meta.exists():
                compare_spec(meta, _read_spec(meta), spec)
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
        # The session goes in without its private labels (PII values): a store can be shared, they must not be.
        blob = st_save(tensors, metadata={"session": json.dumps(acts.session.public().to_json())})
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

    def session(self, session_id: str, private_from: str | os.PathLike | Iterable[Session] | None = None
                ) -> Session:
        """The session as captured (with any generated assistant text filled in); its private labels come from
        `private_from` or `private_labels.jsonl` (see `sessions`)."""
        return self._with_private([self._stored(session_id)], private_from)[0]

    def sessions(self, private_from: str | os.PathLike | Iterable[Session] | None = None) -> list[Session]:
        """Every finished session as captured. Shards hold no private labels: they come from `private_from` (a
        sessions JSONL path or the Session objects that were captured, joined by session_id and checked to be the
        same sessions) or, when the capture kept them, from the store's `private_labels.jsonl`. With neither, the
        sessions have their public labels only (a store written before private labels were left out still has
        them in its shards)."""
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
