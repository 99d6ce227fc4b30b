"""The store's manifest on disk: one row per stored position, kept small in memory and read only where asked.

Every session's rows are written beside its tensors (`shards/<name>.parquet`, the session's done-marker). Reading
10^4 small files for every query would be slow, so finished sessions' rows are consolidated into parts
(`manifest/part-<digest>.parquet`, at most PART_ROWS rows each) that name the shards they hold in their schema
metadata. The per-session files stay the truth: a part is used only while every shard it names is still finished,
and parts that overlap (two readers consolidated at once) are never both used. A query reads only the columns and
rows it asks for, through pyarrow's dataset filters, so opening a store of 10^7 positions costs what the answer
costs, not the whole manifest.

In memory, text columns are categoricals and integer columns the narrowest type that holds them (about 30 bytes
per row where plain pandas objects take several hundred).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pandas.api.types import union_categoricals

from probes.data.files import atomic_write_bytes

log = logging.getLogger(__name__)

SHARDS_KEY = b"mmret_shards"  # schema metadata: {shard name: session id} of the sessions a file holds
PART_ROWS = 1_000_000
ROW_GROUP = 65_536  # a filtered read decodes whole row groups: this bounds what one costs (about 4 MB)
CONSOLIDATE_AFTER = 64  # unconsolidated finished sessions a reader tolerates before it writes a part
# Columns of the manifest that are not session labels; `scope` says which tensors a row indexes ("lm": every LM
# hook kind of the shard, "vision": every vision-tower kind), `row` its index along their first dimension.
BASE_COLUMNS = ["session_id", "turn", "role", "position", "segment", "image_index", "tile", "patch_row", "patch_col",
                "mark", "last_of_turn", "groups", "scope", "row", "shard"]


def compact(df: pd.DataFrame) -> pd.DataFrame:
    """The same rows with text columns as categoricals and integers downcast (values unchanged)."""
    out = {}
    for col in df.columns:
        s = df[col]
        if s.dtype == object or (pd.api.types.is_string_dtype(s.dtype) and s.dtype != "category"):
            if pd.api.types.infer_dtype(s, skipna=True) in ("string", "empty"):
                s = s.astype("category")
        elif pd.api.types.is_integer_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
            s = pd.to_numeric(s, downcast="integer")
        out[col] = s
    return pd.DataFrame(out, index=df.index)


def parquet_bytes(df: pd.DataFrame, shards: dict[str, str]) -> bytes:
    """Parquet of `df`, naming in its schema metadata the shards (name -> session id) whose rows it holds."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), SHARDS_KEY: json.dumps(shards).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP)
    return buf.getvalue()


def shards_in(path: Path) -> dict[str, str]:
    """shard name -> session id of a manifest file (from its schema metadata; no row is read)."""
    stored = (pq.read_schema(path).metadata or {}).get(SHARDS_KEY)
    if stored is None:
        raise ValueError(f"{path}: a manifest file without the shards it holds")
    value = json.loads(stored)
    return value if isinstance(value, dict) else {}


def finished_shards(shards_dir: Path) -> list[str]:
    return sorted(p.stem for p in shards_dir.glob("*.parquet") if not p.name.startswith("."))


def cover(folder: Path, finished: Sequence[str]) -> tuple[list[Path], dict[str, str]]:
    """The files whose rows are exactly the finished shards' rows, each once: current consolidated parts (largest
    first, skipping any that overlaps one taken), then the per-session files of what they leave out. Also returns
    shard -> session id for every finished shard."""
    want = set(finished)
    files: list[Path] = []
    ids: dict[str, str] = {}
    parts = sorted((folder / "manifest").glob("part-*.parquet")) if (folder / "manifest").is_dir() else []
    named = []
    for part in parts:
        try:
            named.append((part, shards_in(part)))
        except (OSError, ValueError, pa.ArrowException):  # half-gone or foreign file: the shards are still there
            continue
    for part, held in sorted(named, key=lambda x: -len(x[1])):
        if held and set(held) <= want and not set(held) & set(ids):
            files.append(part)
            ids.update(held)
    for name in sorted(want - set(ids)):
        path = folder / "shards" / f"{name}.parquet"
        files.append(path)
        ids.update(shards_in(path))
    return files, ids


def consolidate(folder: Path, files: list[Path]) -> list[Path]:
    """Write the per-session files among `files` into parts; return the new cover. A store this process cannot
    write into (shared read-only) is read as it is."""
    loose = [f for f in files if f.parent.name == "shards"]
    if len(loose) < 2:
        return files
    kept = [f for f in files if f.parent.name != "shards"]
    batch: list[pd.DataFrame] = []
    names: dict[str, str] = {}
    try:
        (folder / "manifest").mkdir(exist_ok=True)
        for i, f in enumerate(loose):
            batch.append(pd.read_parquet(f))
            names.update(shards_in(f))
            if sum(len(b) for b in batch) >= PART_ROWS or i == len(loose) - 1:
                kept.append(_write_part(folder, batch, names))
                batch, names = [], {}
    except OSError as err:
        log.warning("%s: cannot consolidate the manifest (%s); reading the sessions' own files", folder, err)
        return files
    return kept


def _write_part(folder: Path, frames: list[pd.DataFrame], names: dict[str, str]) -> Path:
    df = concat([compact(f) for f in frames]) if frames else pd.DataFrame()
    digest = hashlib.sha1(json.dumps(sorted(names)).encode()).hexdigest()[:16]
    path = folder / "manifest" / f"part-{digest}.parquet"
    if not path.exists():
        atomic_write_bytes(path, parquet_bytes(df, names))
    return path


def drop_stale_parts(folder: Path, finished: Iterable[str]) -> None:
    """Remove parts naming a shard that is no longer finished (a writer's cleanup: readers never delete)."""
    want = set(finished)
    for part in (folder / "manifest").glob("part-*.parquet") if (folder / "manifest").is_dir() else []:
        try:
            stale = not set(shards_in(part)) <= want
        except (OSError, ValueError, pa.ArrowException):
            stale = True
        if stale:
            part.unlink(missing_ok=True)


def read_rows(files: list[Path], filters: dict[str, Any] | None = None, columns: list[str] | None = None,
              schema: pa.Schema | None = None) -> pd.DataFrame:
    """Rows of `files` where every `filters` column is one of the given values, compacted; pyarrow reads only the
    row groups and columns it needs. The files' union of columns (sessions may carry other labels): `schema`, when
    the caller has already read it (`union_schema`)."""
    if not files:
        return pd.DataFrame(columns=BASE_COLUMNS)
    dataset = ds.dataset([str(f) for f in files], format="parquet", schema=schema or union_schema(files))
    expr = None
    for col, values in (filters or {}).items():
        values = list(values) if isinstance(values, (list, tuple, set, np.ndarray)) else [values]
        term = ds.field(col).isin(pa.array(values, type=dataset.schema.field(col).type))
        expr = term if expr is None else expr & term
    frames = [compact(b.to_pandas()) for b in dataset.to_batches(filter=expr, columns=columns)]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=columns or dataset.schema.names)
    return concat(frames)


def concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """pd.concat that keeps categoricals categorical (their categories united) and integers narrow."""
    if len(frames) == 1:
        return frames[0]
    cols = list(dict.fromkeys(c for f in frames for c in f.columns))
    out = {}
    for c in cols:
        parts = [f[c] if c in f.columns else pd.Series([None] * len(f), dtype=object) for f in frames]
        if all(p.dtype == "category" or p.isna().all() for p in parts) and any(p.dtype == "category" for p in parts):
            out[c] = pd.Series(union_categoricals([_object_categories(p) for p in parts], ignore_order=True))
        else:
            out[c] = pd.concat([p.astype(object) if p.dtype == "category" else p for p in parts], ignore_index=True)
    return compact(pd.DataFrame(out))


def _object_categories(part: pd.Series) -> pd.Categorical:
    """A categorical with object categories (an all-missing part: none), so that parts unite."""
    if part.dtype != "category":
        return pd.Categorical([None] * len(part), categories=pd.Index([], dtype=object))
    return pd.Categorical(part).set_categories(part.cat.categories.astype(object))


def union_schema(files: list[Path]) -> pa.Schema:
    """Every column any of the files has, each with a type that holds all of them (schemas only, no rows)."""
    schemas = [pq.read_schema(f) for f in files]
    fields: dict[str, pa.Field] = {}
    for s in schemas:
        for f in s:
            t = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
            if f.name not in fields or pa.types.is_null(fields[f.name].type):
                fields[f.name] = pa.field(f.name, t)
            elif fields[f.name].type != t:  # e.g. int8 in one session, int16 in another
                fields[f.name] = pa.field(f.name, _wider(fields[f.name].type, t))
    return pa.schema(list(fields.values()))


def _wider(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        return pa.int64()
    if (pa.types.is_integer(a) or pa.types.is_floating(a)) and (pa.types.is_integer(b) or pa.types.is_floating(b)):
        return pa.float64()
    return pa.string()


def memory_mb(df: pd.DataFrame) -> float:
    """Resident size of a manifest frame in MB (categories counted once)."""
    return float(df.memory_usage(deep=True, index=True).sum()) / 2**20


def file_bytes(folder: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
