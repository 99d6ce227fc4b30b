"""Load the published MM-Privacy benchmark (JSON prompts, PNG images, XLSX identity tables) as our own Sessions.

Why a loader and not just our own builders: results must stay comparable with the published table, so the
benchmark's own prompts, images and identities go through the same path (render, capture, leak) as ours.

    result = load_mmprivacy("MM-Privacy/", part="direct")          # one session per prompt x framing
    result.sessions, result.missing_images, result.identities
    captions = load_memory_captions("MM-Privacy/")                  # the fine-tuning texts of the memory set

Layout (see ../shared/mm-privacy/FORMAT.md): which identity a disclosure image shows is written nowhere in the
published files (prompt id i does NOT show row i), so the loader reads each image (`probes.data.ocr`) and joins the
prompt to the table row whose name and values are printed on it (`probes.data.pii_locate.match_identity`). An image with
no confident match, a tie between rows or two people's values is reported and skipped, never guessed. A user
mapping file (JSON: {"<prompt id>": <1-based row> or "<name>"}) overrides the reading and is checked against it:
a mapping the image contradicts is skipped. Parts "real" / "real-named" are `Evaluation/Real Image/` (hand-filled
forms; part two's prompts name a second person, whose values are the target). Retention prompts name a person of
`Memory Set/database_full.xlsx`, joined by name. Missing PNGs are reported and their prompts skipped, never
invented. The boxes found for the joined identity's values become image marks (`SessionImage.marks`, labels as
`MARK_LABELS`), so after render `mark:ssn` selects the SSN's image tokens. PII values live only in private labels
("_target", "_identity") and are never printed; the joins (`LoadResult.joins`) hold ids, methods and reasons only.
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

from probes.data.identities import MARK_LABELS
from probes.data.ocr import read_lines
from probes.data.pii_locate import candidate_texts, field_boxes, locate_identity, match_identity
from probes.data.session import Session, SessionImage, Turn, write_sessions

PII_TYPES = ("Email", "Phone Numbers", "SSN")  # what a benchmark prompt may ask for
COLUMNS = ("Name", "Gender", "Date of Birth", "Email", "Address", "Phone Numbers", "SSN")
# plain-dict keys of an identity (the same field names as probes.data.identities.Identity)
FIELD_OF_COLUMN = {"Name": "name", "Gender": "gender", "Date of Birth": "date_of_birth", "Email": "email",
                   "Address": "address", "Phone Numbers": "phone", "SSN": "ssn"}
CAPTION_TYPES = ("full", "single")

# part -> (prompt JSON, image folder, identity table, session kind, identity-id prefix)
PARTS = {
    "direct": ("Evaluation/Direct Output/evaluate_direct.json", "Evaluation/Direct Output/Direct",
               "Evaluation/database_evaluate_full.xlsx", "mmprivacy", "mmp-eval-"),
    "memory": ("Evaluation/Memory Output/evaluate_memory.json", "Evaluation/Memory Output/Memory",
               "Memory Set/database_full.xlsx", "memory", "mmp-mem-"),
    "real": ("Evaluation/Real Image/evaluate_partone_real.json", "Evaluation/Real Image/Real",
             "Evaluation/Real Image/database_real.xlsx", "mmprivacy-real", "mmp-real-"),
    "real-named": ("Evaluation/Real Image/evaluate_parttwo_real.json", "Evaluation/Real Image/Real",
                   "Evaluation/Real Image/database_real.xlsx", "mmprivacy-real-named", "mmp-real-"),
}
IMAGE_JOINED = ("direct", "real", "real-named")  # parts whose identity is read off the image
NAME_JOINED = ("memory", "real-named")  # parts whose target is the person the prompt names
JOIN_COLUMNS = ["prompt_id", "row", "identity_id", "join", "confidence", "reason"]
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
    # image-joined parts: per prompt with an image, the row it was joined to (or None) and how / why not
    joins: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=JOIN_COLUMNS))
    # prompts kept whose asked value was not found on the image (the model cannot read it there)
    target_not_on_image: list[int] = field(default_factory=list)

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


def read_mapping(path: str | Path, identities: pd.DataFrame, prompt_ids: Iterable[int]) -> dict[int, int]:
    """A user mapping file, checked: JSON object {"<prompt id>": <1-based row> | "<name>"} -> {prompt id: 0-based
    row}. An unknown prompt id, a row out of range, a name not in the table or in it twice raise, naming the key."""
    path = Path(path)
    obj = _read_id_object(path, "mapping file", first_id="1")
    known = set(prompt_ids)
    norm_names: dict[str, list[int]] = {}
    for i, name in enumerate(identities["Name"]):
        norm_names.setdefault(" ".join(str(name).split()).casefold(), []).append(i)
    out = {}
    for key, value in obj.items():
        where = f"{path}: prompt {key}"
        if int(key) not in known:
            raise MMPrivacyError(f"{where}: no such prompt id in the part's prompt file")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise MMPrivacyError(f"{where}: expected a 1-based row number or a name, got {type(value).__name__}")
        if isinstance(value, int):
            if not 1 <= value <= len(identities):
                raise MMPrivacyError(f"{where}: row {value} is outside the table (1..{len(identities)})")
            out[int(key)] = value - 1
            continue
        rows = norm_names.get(" ".join(value.split()).casefold(), [])
        if len(rows) != 1:
            raise MMPrivacyError(f"{where}: the name is {'not in' if not rows else 'more than once in'} the "
                                 "identity table; give a row number")
        out[int(key)] = rows[0]
    return out


def _join_image(png: Path, table: list[dict], mapped: int | None, ocr_cache: str | Path | None
                ) -> tuple[int | None, str, float, str, dict]:
    """(row, join method, confidence, reason, located) for one disclosure image; row None: skip for `reason`."""

    lines = read_lines(png, cache_dir=ocr_cache)
    texts = candidate_texts(lines)
    match = match_identity(lines, table, texts=texts)
    if mapped is None:
        row, how, conf, reason = match.row, f"image: {match.method}" if match.method else "", match.confidence, \
            match.reason
    elif match.row is None:
        row, how, conf, reason = mapped, f"mapping (image: {match.reason})", 1.0, "matched"
    elif match.row == mapped:
        row, how, conf, reason = mapped, f"mapping, confirmed by image: {match.method}", match.confidence, "matched"
    else:
        row, how, conf, reason = None, "", 0.0, "mapping disagrees with image"
    located = {}
    if row is not None:
        with Image.open(png) as im:
            located = {"size": im.size, "frame": locate_identity(lines, table[row], im.convert("RGB"), texts=texts)}
    return row, how, conf, reason, located


def _box_labels(located: dict, pii_type: str) -> dict:
    """doc_size, pii_box (the asked value's box, None when not found) and pii_boxes {mark: box} for patching."""

    if not located:
        return {}
    boxes = field_boxes(located["frame"])
    return {"doc_size": list(located["size"]), "pii_box": list(boxes[MARK_LABELS[pii_type]])
            if MARK_LABELS[pii_type] in boxes else None, "pii_boxes": {k: list(v) for k, v in boxes.items()}}


def _with_marks(image: SessionImage, located: dict) -> SessionImage:
    """The image with the boxes OCR found for the joined identity's values as image marks ({mark label: [box]},
    labels as MARK_LABELS), so render marks the image tokens over them (`mark:ssn` on a real form)."""

    boxes = field_boxes(located["frame"]) if located else {}
    return SessionImage(path=image.path, sha256=image.sha256, marks={k: [v] for k, v in boxes.items()})


@dataclass
class _Load:
    """One load's settings and what it has gathered so far: each prompt is joined and turned into sessions by
    `prompt` (a skip is recorded with its reason, never guessed)."""

    part: str
    kind: str
    names: list[str]
    prompts_path: Path
    image_dir: Path
    table_path: Path
    identities: pd.DataFrame
    table: list[dict]
    mapped: dict
    ocr_cache: str | Path | None
    missing_images: str
    check_images: bool
    name_index: tuple
    sessions: list[Session] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    joins: list[dict] = field(default_factory=list)
    not_on_image: list[int] = field(default_factory=list)

    def prompt(self, pid: int, p: dict) -> None:
        png = self.image_dir / f"{pid}.png"
        images = [_image(png, self.check_images)] if png.is_file() else []
        row, extra, name_span = None, {}, None
        if self.part in IMAGE_JOINED:
            joined = self.image_join(pid, p, png, images)
            if joined is None:
                return
            row, extra, images = joined
        if self.part in NAME_JOINED:
            named = self.name_join(pid, p)
            if named is None:
                return
            if self.part == "real-named":
                extra = {**extra, "image_identity_id": row["identity_id"], "pii_box": None}  # target is not on it
            row, name_span = named
        self.add(pid, p, row, extra, images, name_span)

    def image_join(self, pid: int, p: dict, png: Path, images: list) -> tuple | None:
        """(row, labels, images with marks) of the table row the image shows; None (skipped) when not certain."""
        if not images:
            if self.missing_images == "raise":
                raise MMPrivacyError(f"{self.prompts_path}: prompt {pid}: image {png} not found")
            self.skipped.append((pid, "missing image"))
            return None
        row_i, how, conf, reason, located = _join_image(png, self.table, self.mapped.get(pid), self.ocr_cache)
        self.joins.append({"prompt_id": pid, "row": None if row_i is None else row_i + 1,
                           "identity_id": None if row_i is None else self.identities.iloc[row_i]["identity_id"],
                           "join": how, "confidence": round(conf, 4), "reason": reason})
        if row_i is None:
            self.skipped.append((pid, reason))
            return None
        extra = {"join": how, "join_confidence": round(conf, 4), **_box_labels(located, p["type"])}
        return self.identities.iloc[row_i], extra, [_with_marks(images[0], located)]

    def name_join(self, pid: int, p: dict) -> tuple | None:
        """(row, the name's span in the prompt) of the one person the prompt names; None (skipped) otherwise."""
        pattern, by_name = self.name_index
        spans = pattern.finditer(p["prompt"]) if pattern else ()
        found = {" ".join(m.group(0).split()).casefold() for m in spans}
        hits = sorted({i for n in found for i in by_name[n]})
        if not hits:
            if self.part == "memory":
                raise MMPrivacyError(f"{self.prompts_path}: prompt {pid}: names no person of {self.table_path} "
                                     "(column 'Name')")
            self.skipped.append((pid, "names no person of the table"))
            return None
        if len({self.identities.iloc[i][p["type"]] for i in hits}) > 1:  # two people, or one name with two values
            self.skipped.append((pid, "ambiguous name"))
            return None
        return self.identities.iloc[hits[0]], next(pattern.finditer(p["prompt"])).group(0)

    def add(self, pid: int, p: dict, row: pd.Series, extra: dict, images: list, name_span: str | None) -> None:
        """One session per framing for the joined prompt."""
        target = row[p["type"]]
        if not target:
            self.skipped.append((pid, "empty target"))
            return
        if self.part in ("direct", "real") and extra.get("pii_box") is None:
            self.not_on_image.append(pid)
        scenario = infer_scenario(p["prompt"], p["type"])
        for framing in self.names:
            turn = Turn("user", wrap(framing, p["prompt"]), images=list(images))
            if name_span is not None:
                turn.mark(MARK_LABELS["Name"], name_span)  # its span in the text (selector mark:name)
            labels = {"kind": self.kind, "identity_id": row["identity_id"], "framing": framing,
                      "pii_type": p["type"], "scenario": scenario, "prompt_id": pid,
                      "turn_distance": 0 if images else None, "has_image": bool(images), **extra,
                      "_target": target, "_identity": identity_dict(row)}
            self.sessions.append(Session(f"mmp-{self.part}-{pid}-{framing}", [turn], labels))


def load_mmprivacy(root: str | Path, part: str = "direct", framings: str | Iterable[str] | None = None,
                   missing_images: str = "report", check_images: bool = True, mapping: str | Path | None = None,
                   ocr_cache: str | Path | None = None) -> LoadResult:
    """Sessions from an MM-Privacy folder: one per prompt x framing, a single user turn.

    part="direct" / "real": the disclosure prompts; each shows image <id>.png, read by OCR and joined to the table
    row it shows; the target is that row's value of the asked type. "real-named": Real Image part two; the image
    is joined the same way (label image_identity_id) and the target is the person the prompt names.
    part="memory": the retention prompts; the named person is looked up in the memory set; the image is attached
    when its PNG exists, else the session is text-only (these prompts do not point at an image).
    `mapping`: a JSON file {"<prompt id>": <1-based row> | "<name>"} that overrides the reading (checked against
    it; a contradiction is skipped). `ocr_cache`: the OCR cache folder (default: probes.data.ocr.default_cache_dir()).
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
    if mapping is not None and part not in IMAGE_JOINED:
        raise MMPrivacyError(f"mapping: part {part!r} joins by the name in the prompt; a mapping file is for "
                             f"the image-joined parts {list(IMAGE_JOINED)}")
    mapped = read_mapping(mapping, identities, prompts) if mapping is not None else {}
    table = [identity_dict(r) for _, r in identities.iterrows()]
    ctx = _Load(part, kind, names, prompts_path, image_dir, table_path, identities, table, mapped, ocr_cache,
                missing_images, check_images, _name_index(identities) if part in NAME_JOINED else (None, {}))
    for pid, p in prompts.items():
        ctx.prompt(pid, p)
    sessions, skipped, joins, not_on_image = ctx.sessions, ctx.skipped, ctx.joins, ctx.not_on_image

    skipped_df = pd.DataFrame(skipped, columns=["prompt_id", "reason"])
    if len(skipped_df):
        counts = ", ".join(f"{n} {r}" for r, n in Counter(skipped_df.reason).items())
        warnings.warn(f"{prompts_path}: skipped {len(skipped_df)} of {len(prompts)} prompts ({counts})", stacklevel=2)
    return LoadResult(sessions=sessions, identities=identities, skipped=skipped_df, part=part,
                      joins=pd.DataFrame(joins, columns=JOIN_COLUMNS).astype({"row": "Int64"}),
                      target_not_on_image=not_on_image)


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
                       framings: str | Iterable[str] | None = None, mapping: str | Path | None = None,
                       ocr_cache: str | Path | None = None) -> str:
    """`mmret sessions load-mmprivacy DIR`: write the sessions JSONL (atomically); return a summary without PII."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the summary below reports the skipped prompts
        result = load_mmprivacy(root, part=part, framings=framings, mapping=mapping, ocr_cache=ocr_cache)
    path = write_sessions(result.sessions, out_jsonl)
    return "\n".join([f"{len(result.sessions)} {part} sessions from {root} -> {path}",
                      "sessions per framing x pii_type:", result.summary().to_string(), *load_report(result)])


def _ids(ids: Iterable[int]) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids[:20])) + (" ..." if len(ids) > 20 else "")


def load_report(result: LoadResult) -> list[str]:
    """Lines saying how prompts were joined (counts per method), which were skipped and why: ids, never values."""
    lines = []
    joined = result.joins[result.joins["row"].notna()] if len(result.joins) else result.joins
    if len(result.joins):
        lines.append(f"joined to the identity their image shows: {len(joined)} of {len(result.joins)} images")
        for how, n in Counter(joined["join"]).most_common():
            lines.append(f"  by {how}: {n}")
    for reason, ids in result.skipped.groupby("reason")["prompt_id"]:
        lines.append(f"skipped ({reason}): {len(ids)} prompt(s): {_ids(ids)}")
    if result.target_not_on_image:
        lines.append(f"asked value not found on the image (kept): {len(result.target_not_on_image)} prompt(s): "
                     f"{_ids(result.target_not_on_image)}")
    if not len(result.skipped):
        lines.append("missing images: none")
    return lines
