"""What was said and shown: sessions of turns, with marked PII spans, saved as JSONL.

A `Session` is a list of `Turn`s (one message each: role, text, images). A substring of a turn's text can be
*marked* (for example the SSN inside a user turn), so the token map later knows its token span. Images are kept
by path plus sha256, so a JSONL file can be checked against the images it points at. An image can carry PII
*marks* too: label -> pixel boxes (x0, y0, x1, y1; x1/y1 exclusive) in the image's own coordinates (from the
drawn document, or found by OCR), which render turns into marks on the image tokens that cover them.

A turn index is the message index: turn 0 may be the system prompt, then user, assistant, user, ...
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image, UnidentifiedImageError

from probes.data.files import atomic_write_text

ROLES = ("system", "user", "assistant")
Box = tuple[int, int, int, int]


class SessionError(ValueError):
    """A session or session file is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class Mark:
    """A labelled character span `text[start:end]` of a turn (for example `label="ssn"`)."""

    label: str
    start: int
    end: int

    def to_json(self) -> dict:
        return {"label": self.label, "start": self.start, "end": self.end}


@dataclass
class SessionImage:
    """An image shown in a turn: a file path plus its sha256, or an in-memory PIL image; `marks`: PII label ->
    pixel boxes (x0, y0, x1, y1) in the image's own coordinates, checked on construction (`image_marks`)."""

    path: str | None = None
    sha256: str | None = None
    pil: Image.Image | None = field(default=None, repr=False, compare=False)
    marks: Any = field(default_factory=dict)  # any mapping of label -> boxes; normalised to dict[str, list[Box]]

    def __post_init__(self) -> None:
        self.marks = image_marks(self.marks)

    @classmethod
    def from_pil(cls, image: Image.Image, marks: Any = None) -> "SessionImage":
        return cls(pil=image, marks=marks or {})

    @classmethod
    def from_path(cls, path: str | os.PathLike, marks: Any = None) -> "SessionImage":
        path = str(path)
        return cls(path=path, sha256=file_sha256(path), marks=marks or {})

    def load(self) -> Image.Image:
        """The image as RGB; a missing, changed or undecodable file raises SessionError naming it."""
        if self.pil is not None:
            return self.pil.convert("RGB")
        if self.path is None:
            raise SessionError("image has neither a path nor pixels")
        if not os.path.exists(self.path):
            raise SessionError(f"image file not found: {self.path}")
        data = Path(self.path).read_bytes()
        if self.sha256 is not None and hashlib.sha256(data).hexdigest() != self.sha256:
            raise SessionError(f"image file {self.path} does not match its sha256 {self.sha256[:12]}...")
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (UnidentifiedImageError, OSError) as err:
            raise SessionError(f"image file {self.path} does not decode as an image: {err}") from err
        return image.convert("RGB")

    def to_json(self) -> dict:
        """{"path", "sha256"[, "marks"]}; an in-memory image has path None and the sha256 of its pixels. "marks"
        is written only when there are some, so a session without image marks saves as it always did."""
        if self.path is None and self.pil is not None:
            out = {"path": None, "sha256": hashlib.sha256(self.pil.tobytes()).hexdigest()}
        else:
            out = {"path": self.path, "sha256": self.sha256}
        if self.marks:
            out["marks"] = {label: [list(b) for b in boxes] for label, boxes in self.marks.items()}
        return out

    @classmethod
    def from_json(cls, obj: Any) -> "SessionImage":
        """From {"path", "sha256"[, "marks"]}; a file written before image marks existed has none."""
        if not isinstance(obj, dict):
            raise SessionError(f"expected an image object with 'path' and 'sha256', got {type(obj).__name__}")
        return cls(path=obj.get("path"), sha256=obj.get("sha256"), marks=obj.get("marks", {}))


def image_marks(marks: Any) -> dict[str, list[Box]]:
    """Image marks checked and normalised: {label: [(x0, y0, x1, y1), ...]}, integer pixels with 0 <= x0 < x1 and
    0 <= y0 < y1. A label is a non-empty string without '|' or '+' (the token map joins labels with '|'; selectors
    join with '+'). Anything else raises SessionError naming the field ("marks['ssn'][0]") and what was expected."""
    if not isinstance(marks, dict):
        raise SessionError(f"image field 'marks' must be an object {{label: [[x0, y0, x1, y1], ...]}}, got "
                           f"{type(marks).__name__}")
    out: dict[str, list[Box]] = {}
    for label, boxes in marks.items():
        if not isinstance(label, str) or not label or "|" in label or "+" in label or ":" in label:
            raise SessionError(f"image field 'marks': label {label!r} must be a non-empty string without '|', '+' "
                               "or ':'")
        if not isinstance(boxes, (list, tuple)):
            raise SessionError(f"image field marks[{label!r}] must be a list of boxes [x0, y0, x1, y1], got "
                               f"{type(boxes).__name__}")
        out[label] = [_box(b, f"marks[{label!r}][{i}]") for i, b in enumerate(boxes)]
    return out


def _box(b: Any, where: str) -> Box:
    ok = isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, Integral) and not isinstance(v, bool)
                                                               for v in b)
    if not ok:
        raise SessionError(f"image field {where}: expected 4 integer pixels [x0, y0, x1, y1], got {b!r}")
    x0, y0, x1, y1 = (int(v) for v in b)
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise SessionError(f"image field {where}: box {[x0, y0, x1, y1]} must have 0 <= x0 < x1 and 0 <= y0 < y1")
    return (x0, y0, x1, y1)


@dataclass
class Turn:
    """One message. `text=None` on an assistant turn means: let the model write it at capture time."""

    role: str
    text: str | None = ""
    # SessionImages, or PIL images and paths (turned into SessionImages on construction)
    images: list[SessionImage | Image.Image | str | os.PathLike] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise SessionError(f"turn role {self.role!r} is not one of {ROLES}")
        if self.text is None and self.role != "assistant":
            raise SessionError("only an assistant turn may have text=None (to be generated)")
        self.images = [im if isinstance(im, SessionImage) else _as_image(im) for im in self.images]
        for m in self.marks:
            if self.text is None or not (0 <= m.start <= m.end <= len(self.text)):
                raise SessionError(f"mark {m.label!r} [{m.start}, {m.end}) lies outside the turn text")

    def mark(self, label: str, value: str, occurrence: int = 0) -> "Turn":
        """Mark the `occurrence`-th appearance of `value` in this turn's text under `label`."""
        if self.text is None:
            raise SessionError("cannot mark text of a turn that is still to be generated")
        start = -1
        for _ in range(occurrence + 1):
            start = self.text.find(value, start + 1)
            if start < 0:
                raise SessionError(f"mark {label!r}: value not found in the turn text")
        self.marks.append(Mark(label, start, start + len(value)))
        return self

    @property
    def generate(self) -> bool:
        return self.text is None


def _as_image(obj: Any) -> SessionImage:
    if isinstance(obj, Image.Image):
        return SessionImage.from_pil(obj)
    if isinstance(obj, (str, os.PathLike)):
        return SessionImage.from_path(obj)
    raise SessionError(f"an image must be a PIL image, a path or a SessionImage, not {type(obj).__name__}")


@dataclass
class Session:
    """A multi-turn conversation with images, an id, and labels (identity id, PII type, framing ...)."""

    session_id: str
    turns: list[Turn]
    labels: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False, repr=False)  # "file:line" when read from JSONL

    def __post_init__(self) -> None:
        if not self.turns:
            raise SessionError(f"session {self.session_id!r} has no turns")

    @property
    def images(self) -> list[SessionImage]:
        return [im for t in self.turns for im in t.images]

    @property
    def where(self) -> str:
        """How an error names this session: "<file>:<line>: session '<id>'" (or just the session)."""
        return f"{self.source}: session {self.session_id!r}" if self.source else f"session {self.session_id!r}"

    def public(self) -> "Session":
        """This session without its private labels (keys starting with "_": PII values), turns shared."""
        return Session(self.session_id, self.turns, {k: v for k, v in self.labels.items() if not k.startswith("_")},
                       self.source)

    def private_labels(self) -> dict[str, Any]:
        return {k: v for k, v in self.labels.items() if k.startswith("_")}

    def to_json(self) -> dict:
        return {
            "session_id": self.session_id,
            "labels": self.labels,
            "turns": [
                {
                    "role": t.role,
                    "text": t.text,
                    "images": [im.to_json() for im in t.images],
                    "marks": [m.to_json() for m in t.marks],
                }
                for t in self.turns
            ],
        }

    @classmethod
    def from_json(cls, obj: Any, where: str = "session") -> "Session":
        """Build from a JSON object; errors name `where` (file and line) and the field."""
        if not isinstance(obj, dict):
            raise SessionError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("session_id", "turns"):
            if key not in obj:
                raise SessionError(f"{where}: missing field {key!r}")
        if not isinstance(obj["turns"], list):
            raise SessionError(f"{where}: field 'turns' must be a list")
        turns = []
        for i, t in enumerate(obj["turns"]):
            try:
                turns.append(
                    Turn(
                        role=t["role"],
                        text=t.get("text", ""),
                        images=[_image_from_json(im, j) for j, im in enumerate(t.get("images", []))],
                        marks=[Mark(m["label"], int(m["start"]), int(m["end"])) for m in t.get("marks", [])],
                    )
                )
            except SessionError as err:
                raise SessionError(f"{where}: turns[{i}]: {err}") from err
            except (KeyError, TypeError, AttributeError, ValueError) as err:  # ValueError: int("a") in a mark
                raise SessionError(f"{where}: turns[{i}]: malformed turn ({err!r})") from err
        labels = obj.get("labels", {})
        if not isinstance(labels, dict):
            raise SessionError(f"{where}: field 'labels' must be an object, got {type(labels).__name__}")
        try:
            return cls(session_id=str(obj["session_id"]), turns=turns, labels=dict(labels))
        except SessionError as err:
            raise SessionError(f"{where}: {err}") from err


def _image_from_json(obj: Any, j: int) -> SessionImage:
    try:
        return SessionImage.from_json(obj)
    except SessionError as err:
        raise SessionError(f"images[{j}]: {err}") from None


def file_sha256(path: str | os.PathLike) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError as err:
        raise SessionError(f"image file not found: {path}") from err


def read_sessions(path: str | os.PathLike, allow_empty: bool = False) -> Iterator[Session]:
    """Sessions from a JSONL file, one per line; a malformed line raises SessionError naming file and line.

    Image paths are resolved relative to the JSONL file's folder. A directory, bytes that are not UTF-8, and (unless
    `allow_empty`) a file with no session are SessionErrors naming the file. Each session's `source` is its
    "file:line". Images are not opened here: `check_images` does that.
    """
    path = Path(path)
    if not path.exists():
        raise SessionError(f"sessions file not found: {path}")
    if not path.is_file():
        raise SessionError(f"{path}: is a directory, not a file; expected a sessions JSONL file")
    seen: set[str] = set()
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise SessionError(f"{where}: not UTF-8 text (byte {err.start} of the line); expected a sessions "
                                   "JSONL file") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise SessionError(f"{where}: not valid JSON ({err.msg}, column {err.colno}); expected one session "
                                   "object a line") from None
            session = Session.from_json(obj, where)
            if session.session_id in seen:
                raise SessionError(f"{where}: duplicate session_id {session.session_id!r}")
            seen.add(session.session_id)
            session.source = where
            for im in session.images:
                if im.path is None:
                    raise SessionError(f"{where}: an image has no 'path'")
                if not os.path.isabs(im.path):
                    im.path = str(path.parent / im.path)
            yield session
    if not seen and not allow_empty:
        raise SessionError(f"{path}: no sessions (the file is empty); expected one JSON session object a line")


def check_images(sessions: Iterable[Session]) -> None:
    """Open every image of `sessions` (each file once): it must exist, match its sha256 and decode. A failure is a
    SessionError naming the session's file line and id, and the image file."""
    checked: set[tuple[str | None, str | None]] = set()
    for s in sessions:
        for im in s.images:
            if im.pil is not None or (im.path, im.sha256) in checked:
                continue
            try:
                im.load()
            except SessionError as err:
                raise SessionError(f"{s.where}: {err}") from None
            checked.add((im.path, im.sha256))


def write_sessions(sessions: Iterable[Session], path: str | os.PathLike) -> Path:
    """Write sessions as JSONL atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sessions = list(sessions)
    for s in sessions:
        if any(im.path is None for im in s.images):
            raise SessionError(f"session {s.session_id!r}: an in-memory image cannot be saved to JSONL; save it "
                               "to a file and use SessionImage.from_path")
    lines = [json.dumps(s.to_json(), ensure_ascii=False) for s in sessions]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path
