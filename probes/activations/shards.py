"""One capture split over n workers, and the checks that put it back together.

`shard_batches` splits the sessions deterministically: the sessions, in the order given, are cut into batches of
`batch_size` first, and batch k goes to worker k mod n. Every session is then captured with the same batch-mates
(and the same padding) as in a single-process run, so the tensors are equal byte for byte, not only within float
rounding. The workers write into one store at once (`probes.activations.lock` lets them); `verify_store` checks
that every session is there once and whole, and `merge_stores` copies the sessions of stores written apart (node-
local disks) into one, refusing a session that two of them hold differently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, TypeVar

import pyarrow.parquet as pq
from safetensors import safe_open

from probes.activations.errors import StoreError
from probes.activations.folder import add_private_labels, compare_spec, read_private_labels, read_spec
from probes.activations.lock import StoreLock
from probes.activations.manifest import consolidate, cover, finished_shards, shards_in
from probes.activations.store import ActivationStore
from probes.data.session import Session
from probes.models.hooks import split_hook

T = TypeVar("T")


def parse_shard(shard: tuple[int, int] | Sequence[int] | str) -> tuple[int, int]:
    """"2/4" or (2, 4) -> (2, 4): worker 2 of 4 (0-based); ValueError-like StoreError on anything else."""
    if isinstance(shard, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if m is None:
            raise StoreError(f"shard {shard!r}: expected i/n with 0 <= i < n, e.g. 0/4")
        shard = (int(m.group(1)), int(m.group(2)))
    try:
        i, n = (int(x) for x in shard)
    except (TypeError, ValueError):
        raise StoreError(f"shard {shard!r}: expected i/n with 0 <= i < n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise StoreError(f"shard {i}/{n}: expected 0 <= i < n and n >= 1")
    return i, n


def shard_batches(items: Sequence[T], batch_size: int, shard: tuple[int, int] | None = None) -> list[list[T]]:
    """The batches of `items` (in order, `batch_size` each) that worker `shard` = (i, n) captures: batch k goes to
    worker k mod n; every batch when `shard` is None."""
    batches = [list(items[k:k + batch_size]) for k in range(0, len(items), batch_size)]
    if shard is None:
        return batches
    i, n = shard
    return batches[i::n]


@dataclass
class StoreCheck:
    """What `verify_store` found; `ok` when every expected session is there once, whole, and nothing else is."""

    path: Path
    sessions: int = 0
    missing: list[str] = field(default_factory=list)  # expected, not finished
    unexpected: list[str] = field(default_factory=list)  # finished, not expected
    unfinished: list[str] = field(default_factory=list)  # tensors written, manifest not (a killed worker)
    broken: list[str] = field(default_factory=list)  # "shard: why"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.broken)

    def report(self) -> str:
        lines = [f"store: {self.path}", f"sessions finished: {self.sessions}"]
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("unfinished (will be captured on resume)", self.unfinished), ("broken", self.broken)):
            if items:
                lines.append(f"{name}: {len(items)} (first: {items[0]})")
        lines.append("ok" if self.ok else "NOT OK")
        return "\n".join(lines)


def verify_store(path: str | os.PathLike, expected: Iterable[Session] | Iterable[str] | None = None) -> StoreCheck:
    """Check a store: each finished shard's tensors exist, hold the kinds and layers its settings name, in one
    dtype, with as many rows as its manifest rows of their scope; with `expected` (sessions or ids), that each is
    finished exactly once and no other is."""
    path = Path(path)
    spec = read_spec(path / "store.json")
    finished = finished_shards(path / "shards")
    _, ids = cover(path, finished)
    check = StoreCheck(path, sessions=len(ids))
    dtypes: set[str] = set()
    for name in finished:
        why = _check_shard(path / "shards", name, spec, dtypes)
        if why:
            check.broken.append(f"{name}: {why}")
    if len(dtypes) > 1:
        check.broken.append(f"dtypes differ between shards: {sorted(dtypes)}")
    check.unfinished = sorted(p.stem for p in (path / "shards").glob("*.safetensors")
                              if not (path / "shards" / f"{p.stem}.parquet").exists())
    if expected is not None:
        want = [e.session_id if isinstance(e, Session) else str(e) for e in expected]
        if len(set(want)) < len(want):
            raise StoreError("expected sessions: duplicate session ids; a store keeps one session per id")
        have = set(ids.values())
        check.missing = [s for s in want if s not in have]
        check.unexpected = sorted(have - set(want))
    return check


def _check_shard(shards: Path, name: str, spec: dict, dtypes: set[str]) -> str | None:
    tensors = shards / f"{name}.safetensors"
    if not tensors.exists():
        return "manifest without tensors"
    try:
        rows = pq.read_table(shards / f"{name}.parquet", columns=["scope"]).column("scope").to_pylist()
    except (KeyError, OSError, ValueError):
        rows = []  # a session whose selector kept nothing has no scope column
    with safe_open(str(tensors), framework="pt") as fh:
        meta = fh.metadata() or {}
        kinds = json.loads(meta.get("kinds", "{}"))
        if json.loads(meta.get("session", "{}")).get("session_id") != shards_in(shards / f"{name}.parquet").get(name):
            return "tensors and manifest name other sessions"
        want = {split_hook(h)[0] for h in spec.get("hooks", [])}
        if rows and set(kinds) != want:
            return f"kinds {sorted(kinds)}, settings name {sorted(want)}"
        for kind, info in kinds.items():
            sl = fh.get_slice(kind)
            shape = sl.get_shape()
            dtypes.add(str(sl.get_dtype()))
            n = sum(r == info["scope"] for r in rows)
            if shape[0] != n or (n and shape[1] != len(info["layers"])):
                return f"{kind}: tensor {shape}, manifest {n} rows x {len(info['layers'])} layers"
    return None


def merge_stores(out: str | os.PathLike, sources: Sequence[str | os.PathLike]) -> StoreCheck:
    """Copy every finished session of the stores `sources` into the store `out` (created with their settings if
    absent; hard links where the filesystem allows), then consolidate its manifest and verify it. All must have
    the same settings and weights. A session two of them hold with different bytes is refused (StoreError);
    held identically, it is kept once. With no sources, `out` is consolidated and verified as it is."""
    out = Path(out)
    specs = [(Path(s), read_spec(Path(s) / "store.json")) for s in sources]
    if not (out / "store.json").exists():
        if not specs:
            raise StoreError(f"{out}: not an activation store (no store.json) and nothing to merge into it")
        out.mkdir(parents=True, exist_ok=True)
        (out / "shards").mkdir(exist_ok=True)
        shutil.copyfile(specs[0][0] / "store.json", out / "store.json")
    target = read_spec(out / "store.json")
    for src, spec in specs:
        compare_spec(src / "store.json", spec, {k: v for k, v in target.items() if k != "format"})
    with StoreLock(out):
        ActivationStore(out).clear_debris()
        for src, _ in specs:
            for name in finished_shards(src / "shards"):
                _copy_session(src / "shards", out / "shards", name)
            private = read_private_labels(src)
            if private:
                add_private_labels(out, private)
        finished = finished_shards(out / "shards")
        consolidate(out, cover(out, finished)[0])
    return verify_store(out)


def _copy_session(src: Path, dst: Path, name: str) -> None:
    for ext in (".safetensors", ".parquet"):  # tensors first: the manifest file marks the session done
        a, b = src / f"{name}{ext}", dst / f"{name}{ext}"
        if b.exists():
            if _same_bytes(a, b):
                continue
            raise StoreError(f"{b}: session {shards_in(src / f'{name}.parquet').get(name)!r} is in {src.parent} "
                             f"and in {dst.parent} with different contents; expected each session captured once")
        tmp = dst / f".{name}{ext}.merge.tmp"
        try:
            os.link(a, tmp)
        except OSError:
            shutil.copyfile(a, tmp)
        os.replace(tmp, b)


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True

