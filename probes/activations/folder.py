"""A store folder's own files, apart from tensors and manifest: its settings (store.json), the private labels
kept on request, the checks made before anything is written, and clearing a store to start over.

    store.json                  what was captured: model, family, hooks, positions, dtype, the store's format, and
                                 the model's fingerprint (its checkpoint files: a resume with other weights is refused)
    private_labels.jsonl        only when asked (`capture(keep_private_labels=True)`): each session's private
                                 labels ("_target", "_identity": PII values). Leave it out when sharing a store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

from probes.activations.errors import StoreError
from probes.activations.lock import LOCK_FILE, exclusive
from probes.data.files import atomic_write_text
from probes.data.session import Session

# 2: one manifest row per stored position, layers along the tensors' second axis, manifest parts. 1 (before
# 2026-12): one manifest row per stored vector and layer; its tensors are the same, its manifest is not.
FORMAT = 2
PRIVATE_FILE = "private_labels.jsonl"
# What a store folder holds (anything else in a folder without store.json: not a store, never written into).
STORE_ENTRIES = {"store.json", "shards", "manifest", "manifest.parquet", PRIVATE_FILE, LOCK_FILE}


def _is_store_entry(name: str) -> bool:
    return name in STORE_ENTRIES or name.startswith(LOCK_FILE + ".")


def shard_name(session_id: str) -> str:
    """A file-safe name for a session id (readable when it already is, else a hash)."""
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", session_id) and not session_id.startswith("."):
        return session_id
    return "s-" + hashlib.sha1(session_id.encode()).hexdigest()[:20]


def compare_spec(meta: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to add to a store (`meta`: its store.json, holding `old`) sessions captured with the settings `new`:
    other weights (fingerprints differ), a store.json from a version without fingerprints, or other settings."""
    check_format(meta, old)
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
        return read_spec(meta)
    if path.is_dir():
        other = sorted(p.name for p in path.iterdir() if not _is_store_entry(p.name))
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
    shutil.rmtree(path / "manifest", ignore_errors=True)
    for name in ("manifest.parquet", PRIVATE_FILE, "store.json"):
        (path / name).unlink(missing_ok=True)


def write_private_labels(path: str | os.PathLike, sessions: Iterable[Session]) -> Path:
    """`<store>/private_labels.jsonl`: the private labels of `sessions`, added to those already there (PII: the
    file to leave out when sharing a store)."""
    return add_private_labels(path, {s.session_id: s.private_labels() for s in sessions})


def add_private_labels(path: str | os.PathLike, new: dict[str, dict[str, Any]]) -> Path:
    """`write_private_labels` from session id -> private labels (another store's file, when merging)."""
    target = Path(path) / PRIVATE_FILE
    with exclusive(Path(path) / f"{LOCK_FILE}.private"):  # shard workers add theirs at the same time
        labels = {**read_private_labels(path), **new}
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


def read_spec(meta: Path) -> dict[str, Any]:
    try:
        spec = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{meta}: not valid JSON ({err}); expected the store's settings") from err
    if not isinstance(spec, dict):
        raise StoreError(f"{meta}: expected a JSON object of the store's settings, got {type(spec).__name__}")
    return spec


def check_format(meta: Path, spec: dict[str, Any]) -> None:
    """Refuse a store written in another format: read with this version's layout it would be misread."""
    found = spec.get("format", 1)
    if found != FORMAT:
        raise StoreError(f"{meta}: a store in format {found} (one manifest row per stored vector and layer); this "
                         f"version reads format {FORMAT} only (one row per position). Capture again into a new "
                         "folder, or resume with force_new=True (--force-new) to start this store over")
