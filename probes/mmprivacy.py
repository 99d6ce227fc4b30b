"""Load the published MM-Privacy benchmark (JSON prompts, PNG images, XLSX identity tables) as our own Sessions.

Why a loader and not just our own builders: results must stay comparable with the published table, so the
benchmark's own prompts, images and identities go through the same path (render, capture, leak) as ours.

    result = load_mmprivacy("MM-Privacy/", part="direct")          # one session per prompt x framing
    result.sessions, result.missing_images, result.identities
    captions = load_memory_captions("MM-Privacy/")                  # the fine-tuning texts of the memory set

Layout (see ../shared/mm-privacy/FORMAT.md): disclosure prompt id i shows the identity in row i (1-based ids,
0-based rows) of `Evaluation/database_evaluate_full.xlsx`; retention prompts name a person of
`Memory Set/database_full.xlsx`, joined by name. Missing PNGs are reported and their prompts skipped, never
invented. PII values live only in private labels ("_target", "_identity") and are never printed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from PIL import Image, UnidentifiedImageError

from probes.identities import MARK_LABELS
from probes.session import Session, SessionImage, Turn, write_sessions

PII_TYPES = ("Email", "Phone Numbers", "SSN")  # what a benchmark prompt may ask for
COLUMNS = ("Name", "Gender", "Date of Birth", "Email", "Address", "Phone Numbers", "SSN")
# plain-dict keys of an identity (the same field names as probes.identities.Identity)
FIELD_OF_COLUMN = {"Name": "name", "Gender": "gender", "Date of Birth": "date_of_birth", "Email": "email",
                   "Address": "address", "Phone Numbers": "phone", "SSN": "ssn"}
CAPTION_TYPES = ("full", "single")

# part -> (prompt JSON, image folder, identity table, session kind, identity-id prefix)
PARTS = {
    "direct": ("Evaluation/Direct Output/evaluate_direct.json", "Evaluation/Direct Output/Direct",
               "Evaluation/database_evaluate_full.xlsx", "mmprivacy", "mmp-eval-"),
    "memory": ("Evaluation/Memory Output/evaluate_memory.json", "Evaluation/Memory Output/Memory",
               "Memory Set/database_full.xlsx", "memory", "mmp-mem-"),
}
CAPTIONS_JSON = "Memory Set/final_data_full.json"


class MMPrivacyError(ValueError):
    """The benchmark folder is not in the published layout; the message names the file and the field."""


# ---------------------------------------------------------------- package data: framings and requests

@lru_cache(maxsize=None)  # read once: wrap() runs per prompt x framing
def _package_json(name: str) -> dict:
    res = resources.files("probes") / "data" / name
    if not res.is_file():
        raise MMPrivacyError(f"package data probes/data/{name} is missing (the install is incomplete: it must "
                             "carry the benchmark's framings and requests)")
    return json.loads(res.read_text(encoding="utf-8"))


def framing_texts() -> dict[str, str]:
    """The five framings, verbatim, in the benchmark's order; '{}' is where the scenario request goes."""
    return {k: v for k, v in _package_json("framings.json").items() if not k.startswith("_")}  # a copy


def disclosure_requests() -> dict[str, str]:
    """Scenario -> request template with '{pii}' (open, hiring, verification, finance)."""
    return dict(_package_json("requests.json")["disclosure"])


def resolve_framings(framings: str | Iterable[str] | None) -> list[str]:
    """None -> all five; names (or a comma-separated string) checked against the benchmark's."""
    known = framing_texts()
    if framings is None:
        return list(known)
    names = [f.strip() for f in framings.split(",")] if isinstance(framings, str) else list(framings)
    bad = [f for f in names if f not in known]
    if bad or not names:
        raise MMPrivacyError(f"framing: unknown framing name(s) {bad}; expected some of {list(known)}")
    return names


def wrap(framing: str, prompt: str) -> str:
    """The prompt as the benchmark sends it: put into the framing's '{}' (replace, since texts may hold braces)."""
    return framing_texts()[framing].replace("{}", prompt, 1)


def infer_scenario(prompt: str, pii_type: str) -> str:
    """The scenario whose disclosure request this prompt is (whitespace/case-insensitive), else 'unknown'."""
    norm = " ".join(prompt.split()).casefold()
    for scenario, template in disclosure_requests().items():
        if " ".join(template.replace("{pii}", pii_type).split()).casefold() == norm:
            return scenario
    return "unknown"


# ---------------------------------------------------------------- files of the layout

def _read_id_object(path: Path, what: str, first_id: str) -> dict[str, Any]:
    """A JSON object keyed by decimal string ids (the layout's prompt and caption files), checked."""
    if not path.is_file():
        raise MMPrivacyError(f"{path}: {what} not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MMPrivacyError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(obj, dict):
        raise MMPrivacyError(f"{path}: expected a JSON object keyed by decimal string ids, got {type(obj).__name__}")
    for key in obj:
        if not (key.isascii() and key.isdigit()):
            raise MMPrivacyError(f"{path}: key {key!r}: expected a decimal string id like \"{first_id}\"")
    return obj


def _read_prompts(path: Path) -> dict[int, dict[str, str]]:
    """{id: {"type", "prompt"}} from a prompt JSON, checked: decimal string keys, known PII types."""
    obj = _read_id_object(path, "prompt file", first_id="1")
    prompts = {}
    for key, value in obj.items():
        where = f"{path}: prompt {key}"
        if not isinstance(value, dict):
            raise MMPrivacyError(f"{where}: expected an object with 'type' and 'prompt', got {type(value).__name__}")
        for fld in ("type", "prompt"):
            if not isinstance(value.get(fld), str):
                raise MMPrivacyError(f"{where}: field {fld!r} is missing or not a string")
        if value["type"] not in PII_TYPES:
            raise MMPrivacyError(f"{where}: field 'type' is {value['type']!r}; expected one of {list(PII_TYPES)}")
        prompts[int(key)] = {"type": value["type"], "prompt": value["prompt"]}
    return dict(sorted(prompts.items()))


def _cell(value: Any) -> str:
    """An XLSX cell as the text a reader sees: dates as YYYY-MM-DD, whole numbers without '.0', empty as ''."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.date().isoformat() if value.time() == dt.time() else value.isoformat(sep=" ")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def read_identity_table(path: str | Path, id_prefix: str = "mmp-") -> pd.DataFrame:
    """An XLSX identity table: identity_id ('<prefix><row+1>'), then the seven columns, all as strings.

    Extra columns (an unnamed index column, say) are ignored; missing expected ones raise, listed.
    """
    from openpyxl import load_workbook  # imported here: only the loader needs it

    path = Path(path)
    if not path.is_file():
        raise MMPrivacyError(f"{path}: identity table not found")
    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except Exception as err:  # openpyxl raises zipfile/KeyError/InvalidFileException on a bad file
        raise MMPrivacyError(f"{path}: not a readable XLSX file ({err})") from err
    try:
        rows = list(book.worksheets[0].iter_rows(values_only=True))
    finally:
        book.close()
    header = [_cell(h) for h in rows[0]] if rows else []
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise MMPrivacyError(f"{path}: missing column(s) {missing}; expected columns {list(COLUMNS)}")
    at = {c: header.index(c) for c in COLUMNS}
    records = []
    for row in rows[1:]:
        if all(v is None or _cell(v) == "" for v in row):
            continue  # trailing empty rows that spreadsheet tools leave
        row = list(row) + [None] * (len(header) - len(row))
        records.append({c: _cell(row[at[c]]) for c in COLUMNS})
    df = pd.DataFrame(records, columns=list(COLUMNS), dtype=object)
    df.insert(0, "identity_id", [f"{id_prefix}{i + 1}" for i in range(len(df))])
    return df


def identity_dict(row: pd.Series | dict) -> dict[str, str]:
    """A table row as a plain dict (name, gender, date_of_birth, email, address, phone, ssn)."""
    return {FIELD_OF_COLUMN[c]: row[c] for c in COLUMNS}


def _image(path: Path, check: bool) -> SessionImage:
    """The image by path + sha256, read once; `check` decodes it so a broken PNG fails here, named."""
    data = path.read_bytes()
    if check:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise MMPrivacyError(f"{path}: image does not decode ({err})") from err
    return SessionImage(path=str(path), sha256=hashlib.sha256(data).hexdigest())


# ---------------------------------------------------------------- the loader

@dataclass
class LoadResult:
    """Sessions of one part, plus what was skipped and why (never PII, only ids)."""

    sessions: list[Session]
    identities: pd.DataFrame  # identity_id + the table's columns (holds PII: do not print)
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["prompt_id", "reason"]))
    part: str = "direct"

    @property
    def missing_images(self) -> list[int]:
        """Prompt ids whose PNG is absent (the archive may hold only some)."""
        return sorted(self.skipped.loc[self.skipped.reason == "missing image", "prompt_id"].astype(int).tolist())

    def summary(self) -> pd.DataFrame:
        """Session counts per framing x pii_type (no values)."""
        labels = pd.DataFrame([s.labels for s in self.sessions], columns=["framing", "pii_type"])
        if not len(labels):
            return labels
        table = pd.crosstab(labels.framing, labels.pii_type)
        order = [f for f in framing_texts() if f in table.index]  # the benchmark's order, not alphabetical
        return table.reindex(index=order, columns=[t for t in PII_TYPES if t in table.columns])


def _name_index(identities: pd.DataFrame) -> tuple[re.Pattern | None, dict[str, list[int]]]:
    """One regex over all names (longest first, whole words, any case) and casefolded name -> row numbers."""
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(identities["Name"]):
        if name:
            rows.setdefault(" ".join(name.split()).casefold(), []).append(i)
    if not rows:
        return None, rows
    alternatives = sorted(rows, key=len, reverse=True)
    pattern = r"(?<!\w)(" + "|".join(r"\s+".join(map(re.escape, n.split())) for n in alternatives) + r")(?!\w)"
    return re.compile(pattern, re.IGNORECASE), rows


def load_mmprivacy(root: str | Path, part: str = "direct", framings: str | Iterable[str] | None = None,
                   missing_images: str = "report", check_images: bool = True) -> LoadResult:
    """Sessions from an MM-Privacy folder: one per prompt x framing, a single user turn.

    part="direct": the disclosure prompts; each shows image <id>.png and targets row id-1's PII.
    part="memory": the retention prompts; the named person is looked up in the memory set; the image is attached
    when its PNG exists, else the session is text-only (these prompts do not point at an image).
    missing_images="report" skips disclosure prompts without a PNG (listed in .missing_images, warned once);
    "raise" raises naming the first missing file.
    """
    if part not in PARTS:
        raise MMPrivacyError(f"part: {part!r} is not one of {list(PARTS)}")
    if missing_images not in ("report", "raise"):
        raise MMPrivacyError(f"missing_images: {missing_images!r} is not 'report' or 'raise'")
    names = resolve_framings(framings)
    root = Path(root)
    if not root.is_dir():
        raise MMPrivacyError(f"{root}: MM-Privacy folder not found")
    root = root.resolve()  # image paths must stay valid wherever the sessions JSONL is written
    json_rel, image_rel, table_rel, kind, prefix = PARTS[part]
    prompts_path, image_dir, table_path = root / json_rel, root / image_rel, root / table_rel
    prompts = _read_prompts(prompts_path)
    identities = read_identity_table(table_path, prefix)
    if part == "memory":
        pattern, by_name = _name_index(identities)

    sessions: list[Session] = []
    skipped: list[tuple[int, str]] = []
    for pid, p in prompts.items():
        where = f"{prompts_path}: prompt {pid}"
        name_span = None
        if part == "direct":
            if not 1 <= pid <= len(identities):
                raise MMPrivacyError(f"{where}: id has no identity row in {table_path} "
                                     f"(the table has {len(identities)} rows; prompt i shows row i)")
            row = identities.iloc[pid - 1]
        else:
            found = {" ".join(m.group(0).split()).casefold() for m in pattern.finditer(p["prompt"])} if pattern else set()
            hits = sorted({i for n in found for i in by_name[n]})
            if not hits:
                raise MMPrivacyError(f"{where}: names no person of {table_path} (column 'Name')")
            targets = {identities.iloc[i][p["type"]] for i in hits}
            if len(targets) > 1:  # two people named, or one name shared by rows with different values: don't guess
                skipped.append((pid, "ambiguous name"))
                continue
            row = identities.iloc[hits[0]]
            name_span = next(pattern.finditer(p["prompt"])).group(0)
        target = row[p["type"]]
        if not target:
            skipped.append((pid, "empty target"))
            continue
        png = image_dir / f"{pid}.png"
        images = [_image(png, check_images)] if png.is_file() else []
        if not images and part == "direct":
            if missing_images == "raise":
                raise MMPrivacyError(f"{where}: image {png} not found")
            skipped.append((pid, "missing image"))
            continue
        scenario = infer_scenario(p["prompt"], p["type"])
        for framing in names:
            turn = Turn("user", wrap(framing, p["prompt"]), images=list(images))
            if name_span is not None:
                turn.mark(MARK_LABELS["Name"], name_span)  # its span in the text (selector mark:name)
            labels = {"kind": kind, "identity_id": row["identity_id"], "framing": framing, "pii_type": p["type"],
                      "scenario": scenario, "prompt_id": pid, "turn_distance": 0 if images else None,
                      "has_image": bool(images), "_target": target, "_identity": identity_dict(row)}
            sessions.append(Session(f"mmp-{part}-{pid}-{framing}", [turn], labels))

    skipped_df = pd.DataFrame(skipped, columns=["prompt_id", "reason"])
    if len(skipped_df):
        counts = ", ".join(f"{n} {r}" for r, n in Counter(skipped_df.reason).items())
        warnings.warn(f"{prompts_path}: skipped {len(skipped_df)} of {len(prompts)} prompts ({counts})", stacklevel=2)
    return LoadResult(sessions=sessions, identities=identities, skipped=skipped_df, part=part)


def load_memory_captions(root: str | Path) -> pd.DataFrame:
    """The memory set's fine-tuning captions: caption_id, type ('full' | 'single'), label_text (holds PII)."""
    path = Path(root) / CAPTIONS_JSON
    obj = _read_id_object(path, "caption file", first_id="0")
    rows = []
    for key, value in obj.items():
        if not isinstance(value, dict) or not isinstance(value.get("label"), str):
            raise MMPrivacyError(f"{path}: caption {key}: field 'label' is missing or not a string")
        if value.get("type") not in CAPTION_TYPES:
            raise MMPrivacyError(f"{path}: caption {key}: field 'type' is {value.get('type')!r}; "
                                 f"expected one of {list(CAPTION_TYPES)}")
        rows.append((int(key), value["type"], value["label"]))
    return pd.DataFrame(sorted(rows), columns=["caption_id", "type", "label_text"])


def cli_load_mmprivacy(root: str | Path, out_jsonl: str | Path, part: str = "direct",
                       framings: str | Iterable[str] | None = None) -> str:
    """`mmret sessions load-mmprivacy DIR`: write the sessions JSONL (atomically); return a summary without PII."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the summary below reports the skipped prompts
        result = load_mmprivacy(root, part=part, framings=framings)
    path = write_sessions(result.sessions, out_jsonl)
    lines = [f"{len(result.sessions)} {part} sessions from {root} -> {path}",
             "sessions per framing x pii_type:", result.summary().to_string()]
    for reason, ids in result.skipped.groupby("reason")["prompt_id"]:
        shown = ", ".join(map(str, sorted(ids)[:20])) + (" ..." if len(ids) > 20 else "")
        lines.append(f"skipped ({reason}): {len(ids)} prompt(s): {shown}")
    if not len(result.skipped):
        lines.append("missing images: none")
    return "\n".join(lines)
