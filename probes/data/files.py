"""Files that are never seen half-written: atomic writes (temp file, fsync, rename) and the folders where resumable
work keeps its finished parts."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def parts_folder(out_dir: str | os.PathLike, name: str, *key: Any) -> Path:
    """`out_dir/.<name>-<hash of key>`: where resumable work keeps the parts it has finished, so that a killed run
    started again with the same key finds them and a run with anything changed starts afresh in another folder.
    Nothing is deleted here (a run with a typo must not wipe a killed run's work, nor one run another's): the run
    removes its own folder when it is done, and older folders of other keys are left for the user to delete.
    `key`: bytes (e.g. a sessions file) or JSON-able settings (give lists, not generators)."""
    h = hashlib.sha256()
    for k in key:
        h.update(k if isinstance(k, bytes) else json.dumps(k, sort_keys=True, default=str).encode())
    return Path(out_dir) / f".{name}-{h.hexdigest()[:16]}"


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; set it straight back
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file gets the mode open() would give it
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None:  # a full disk names no file: name the one written
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
