"""Find an identity's PII on a document image from its OCR lines, tolerant of OCR faults; and who is on the image.

    lines = probes.data.ocr.read_lines("form.png")
    found = locate_identity(lines, identity, image)       # one row per field: score, box, char boxes
    match = match_identity(lines, table)                   # which row of an identity table the image shows, or why not
    hits = find_unlabelled(lines)                           # no table: values by pattern and by their printed label
    marks = token_marks(adapter, image.size, {"ssn": box})  # the image tokens that cover a box, with a mark label

How values are compared: both the value and each OCR line are reduced to a *skeleton*: case folded, everything
but letters and digits dropped (so lost or extra spaces and punctuation do not matter), and the characters OCR
confuses mapped to one class ('o'/'O' -> '0', 'l'/'i'/'I'/'|' -> '1', 's' -> '5', 'z' -> '2', 'b' -> '8'). A value
is then searched as an approximate substring (fewest edits, Sellers' algorithm) of each line and of each pair of
neighbouring lines (a value split over two lines or two boxes); a name is also searched word by word (an I-9 prints
last and first name in separate boxes). Score = 1 - edits / skeleton length. Dates are tried in the formats forms
use (mm/dd/yyyy, m/d/yyyy, yyyy-mm-dd, dd/mm/yyyy, 'March 5, 1990'); a phone number also without its extension.

The box of a found value is the union of the boxes of the characters that matched, shrunk to the ink inside it
when the image is given (the recogniser's character boxes are line-high).
Values never leave these functions in messages; results hold them only in private columns ('_value').
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pandas as pd
from PIL import Image

from probes.data.documents import patches_for_box
from probes.data.ocr import Box, OCRLine, read_lines

# field keys (as probes.data.identities.Identity / probes.data.mmprivacy.identity_dict) -> mark label of the token map
FIELDS = {"name": "name", "date_of_birth": "dob", "ssn": "ssn", "phone": "phone", "email": "email",
          "address": "address"}
IDENTIFYING = ("name", "ssn", "phone", "email")  # one of these found is evidence of who is on the image
VALUE_FIELDS = ("ssn", "phone", "email")  # values no two people share
STRONG = 0.9  # score from which a field counts as found (at most one edit in ten characters)
FOUND = 0.8  # score from which `locate_identity` reports a field as present
_CONFUSE = str.maketrans({"o": "0", "l": "1", "i": "1", "|": "1", "!": "1", "s": "5", "z": "2", "b": "8"})


class LocateError(ValueError):
    """Bad input to the locator (unknown field, empty table ...); the message names the field."""


# ---------------------------------------------------------------- skeletons and approximate search

def skeleton(text: str) -> tuple[str, list[int]]:
    """The comparison form of `text` and, per skeleton character, its index in `text`."""
    chars, where = [], []
    for i, ch in enumerate(text):
        if ch.isalnum():
            chars.append(ch.casefold().translate(_CONFUSE)[:1])
            where.append(i)
    return "".join(chars), where


def fuzzy_find(pattern: str, text: str) -> tuple[int, int, int]:
    """(edits, start, end): the substring text[start:end] nearest to the whole `pattern` (Sellers' algorithm)."""
    m = len(pattern)
    prev, prev_start = list(range(m + 1)), [0] * (m + 1)
    best = (m, 0, 0)
    for j, tc in enumerate(text, start=1):
        cur, cur_start = [0] * (m + 1), [j] * (m + 1)
        for i in range(1, m + 1):
            d, s = prev[i - 1] + (pattern[i - 1] != tc), prev_start[i - 1]  # match / substitute
            if cur[i - 1] + 1 < d:
                d, s = cur[i - 1] + 1, cur_start[i - 1]  # a pattern character missing from the text
            if prev[i] + 1 < d:
                d, s = prev[i] + 1, prev_start[i]  # an extra text character
            cur[i], cur_start[i] = d, s
        if cur[m] < best[0] or (cur[m] == best[0] and j - cur_start[m] < best[2] - best[1]):
            best = (cur[m], cur_start[m], j)
        prev, prev_start = cur, cur_start
    return best


def _trigrams(s: str) -> set[str]:
    return {s[i:i + 3] for i in range(len(s) - 2)}


# ---------------------------------------------------------------- candidate texts (lines and neighbour pairs)

@dataclass
class _Text:
    """A searchable text: one OCR line, or two neighbouring lines joined; per character its box and line."""

    skel: str
    boxes: list[Box | None]  # per skeleton character
    lines: list[int]  # per skeleton character, the OCR line it came from
    score: float  # the recogniser's (lowest) line score


def _line_text(k: int, line: OCRLine) -> tuple[str, list[Box | None], list[int]]:
    skel, where = skeleton(line.text)
    boxes = [line.char_boxes[i] if i < len(line.char_boxes) else line.box for i in where]
    return skel, boxes, [k] * len(skel)


def page_slope(lines: list[OCRLine]) -> float:
    """dy/dx of the page's rows: the width-weighted median slope of the lines' top edges (a tilted scan or photo
    tilts every row alike; a short line's own slope is mostly rounding)."""
    slopes, weights = [], []
    for ln in lines:
        (x0, y0), (x1, y1) = ln.quad[0], ln.quad[1]
        if x1 - x0 > 4:
            slopes.append((y1 - y0) / (x1 - x0))
            weights.append(x1 - x0)
    if not slopes:
        return 0.0
    order = np.argsort(slopes)
    cum = np.cumsum(np.asarray(weights, dtype=float)[order])
    return float(np.asarray(slopes)[order][np.searchsorted(cum, cum[-1] / 2)])


def _neighbours(lines: list[OCRLine]) -> list[tuple[int, int]]:
    """Pairs (a, b): b is the nearest line right of a on the same (possibly tilted) row, or the nearest just below."""
    pairs = []
    centres = [((ln.box[0] + ln.box[2]) / 2, (ln.box[1] + ln.box[3]) / 2) for ln in lines]
    slope = page_slope(lines)
    for a, la in enumerate(lines):
        ax0, ay0, ax1, ay1 = la.box
        acx, acy = centres[a]
        h = max(1.0, (ay1 - ay0) - abs(slope) * (ax1 - ax0))  # the text height, not the tilted box's
        right, below = None, None
        for b, lb in enumerate(lines):
            if b == a:
                continue
            bx0, by0, bx1, by1 = lb.box
            bcx, bcy = centres[b]
            row_y = acy + slope * (bcx - acx)  # where a's row passes at b's centre
            if abs(bcy - row_y) < 0.5 * h and bx0 >= ax1 - 2 - abs(slope) * h and bx0 - ax1 < 30 * h:
                if right is None or bx0 < lines[right].box[0]:
                    right = b
            elif min(ax1, bx1) - max(ax0, bx0) > 0 and 0 < bcy - row_y < 2.5 * h:
                if below is None or bcy < centres[below][1]:
                    below = b
        pairs += [(a, b) for b in (right, below) if b is not None]
    return pairs


def candidate_texts(lines: list[OCRLine]) -> list[_Text]:
    """Every line, then every pair of neighbouring lines joined (reading order: left to right, top to bottom)."""
    parts = [_line_text(k, ln) for k, ln in enumerate(lines)]
    texts = [_Text(s, b, l, lines[k].score) for k, (s, b, l) in enumerate(parts) if s]
    for a, b in _neighbours(lines):
        (sa, ba, la), (sb, bb, lb) = parts[a], parts[b]
        if sa and sb:
            texts.append(_Text(sa + sb, ba + bb, la + lb, min(lines[a].score, lines[b].score)))
    return texts


# ---------------------------------------------------------------- variants of a value

def date_variants(iso: str) -> list[str]:
    """A YYYY-MM-DD date as forms print it; anything else as given."""
    m = re.fullmatch(r"\s*(\d{4})-(\d{1,2})-(\d{1,2})(?:[ T].*)?", iso or "")
    if not m:
        return [iso] if iso else []
    y, mo, d = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if not (1 <= mo <= 12 and 1 <= d <= 31):
        return [iso]
    month = calendar.month_name[mo]
    return list(dict.fromkeys([f"{mo:02d}/{d:02d}/{y}", f"{y}-{mo:02d}-{d:02d}", f"{mo}/{d}/{y}",
                               f"{d:02d}/{mo:02d}/{y}", f"{month} {d}, {y}", f"{d} {month} {y}"]))


def value_variants(key: str, value: str) -> list[str]:
    """The printed forms a table value may take on an image, most likely first."""
    value = (value or "").strip()
    if not value:
        return []
    if key == "date_of_birth":
        return date_variants(value)
    if key == "phone":
        main = re.split(r"\s*(?:x|ext\.?)\s*\d+$", value, flags=re.IGNORECASE)[0]
        return list(dict.fromkeys([value, main]))
    return [value]


# ---------------------------------------------------------------- locating one value

@dataclass
class Hit:
    """Where a value was found: score (1 = exact up to skeleton), its box and character boxes, its lines."""

    key: str
    score: float
    box: Box | None
    char_boxes: list[Box] = field(default_factory=list)
    lines: tuple[int, ...] = ()
    variant: int = 0  # index of the printed form that matched (value_variants order)


def _union(boxes: Iterable[Box | None]) -> Box | None:
    bs = [b for b in boxes if b is not None]
    if not bs:
        return None
    return (min(b[0] for b in bs), min(b[1] for b in bs), max(b[2] for b in bs), max(b[3] for b in bs))


def _search(skel_value: str, texts: list[_Text], exact_only: bool) -> tuple[float, list[Box], tuple[int, ...]]:
    """Best (score, character boxes, lines) of one skeleton over the candidate texts."""
    best = (0.0, [], ())
    m = len(skel_value)
    for t in texts:
        if exact_only or len(t.skel) < m // 2:
            k = t.skel.find(skel_value)
            if k < 0:
                continue
            edits, a, b = 0, k, k + m
        else:
            if skel_value in t.skel:
                k = t.skel.find(skel_value)
                edits, a, b = 0, k, k + m
            else:
                edits, a, b = fuzzy_find(skel_value, t.skel)
        score = 1.0 - edits / m
        if score > best[0] or (score == best[0] and len(set(t.lines[a:b])) < len(best[2])):
            best = (score, [bx for bx in t.boxes[a:b] if bx is not None], tuple(sorted(set(t.lines[a:b]))))
        if best[0] == 1.0 and len(best[2]) == 1:
            break
    return best


def _find_value(key: str, value: str, texts: list[_Text]) -> Hit:
    best = Hit(key, 0.0, None)
    for v, variant in enumerate(value_variants(key, value)):
        skel, _ = skeleton(variant)
        if not skel:
            continue
        score, boxes, lines = _search(skel, texts, exact_only=len(skel) < 6)
        if score > best.score:
            best = Hit(key, score, _union(boxes), boxes, lines, v)
    if key == "name":  # word by word: last and first name in two boxes, or in the other order
        words = [skeleton(w)[0] for w in value.split()]
        words = [w for w in words if w]
        if len(words) > 1:
            found = [_search(w, texts, exact_only=len(w) < 4) for w in words]
            score = sum(f[0] * len(w) for f, w in zip(found, words)) / sum(len(w) for w in words)
            if score > best.score + 1e-9:
                boxes = [b for f in found for b in f[1]]
                best = Hit(key, score, _union(boxes), boxes, tuple(sorted({k for f in found for k in f[2]})), 0)
    return best


def tighten(image: Image.Image | None, box: Box | None, pad: int = 2) -> Box | None:
    """`box` grown by `pad` pixels and shrunk to the dark ink inside it, leaving out ruled lines (rows or columns
    that are nearly all ink). Unchanged when there is no image or no contrast."""
    if image is None or box is None:
        return box
    W, H = image.size
    x0, y0, x1, y1 = max(0, box[0] - pad), max(0, box[1] - pad), min(W, box[2] + pad), min(H, box[3] + pad)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return box
    g = np.asarray(image.convert("L").crop((x0, y0, x1, y1)), dtype=np.float32)
    lo, hi = float(g.min()), float(g.max())
    if hi - lo < 40:
        return box
    ink = g < (lo + hi) / 2
    ink[ink.mean(axis=1) > 0.85, :] = False  # horizontal rules
    ink[:, ink.mean(axis=0) > 0.9] = False  # vertical borders
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if not len(rows):
        return box
    return (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)


def _tight_box(image: Image.Image | None, hit: Hit, lines: list[OCRLine]) -> Box | None:
    """The union, over the lines a value spans, of its characters' ink on that line."""
    if hit.box is None:
        return None
    per_line = []
    for k in hit.lines:
        lb = lines[k].box
        mine = [b for b in hit.char_boxes if b[1] < lb[3] and b[3] > lb[1] and b[0] < lb[2] and b[2] > lb[0]]
        per_line.append(tighten(image, _union(mine)))
    return _union(per_line) or hit.box


def locate_identity(lines: list[OCRLine], identity: dict[str, str], image: Image.Image | None = None,
                    fields: Iterable[str] = tuple(FIELDS), texts: list[_Text] | None = None) -> pd.DataFrame:
    """One row per field of `identity` (keys as `FIELDS`): field, mark, score, found (score >= FOUND), x0..y1 of
    the value's box (ink-tight when `image` is given), n_chars, lines, variant, and '_char_boxes' (private).
    A field the identity has no value for gets score NaN; one not on the image, found False."""
    bad = [f for f in fields if f not in FIELDS]
    if bad:
        raise LocateError(f"fields: unknown field(s) {bad}; expected some of {list(FIELDS)}")
    texts = candidate_texts(lines) if texts is None else texts
    rows = []
    for key in fields:
        value = identity.get(key, "") or ""
        hit = _find_value(key, value, texts) if value.strip() else Hit(key, float("nan"), None)
        box = _tight_box(image, hit, lines) if hit.score >= FOUND else None
        rows.append({"field": key, "mark": FIELDS[key], "score": hit.score, "found": bool(hit.score >= FOUND),
                     "x0": box[0] if box else None, "y0": box[1] if box else None,
                     "x1": box[2] if box else None, "y1": box[3] if box else None,
                     "n_chars": len(hit.char_boxes), "lines": list(hit.lines), "variant": hit.variant,
                     "_char_boxes": [list(b) for b in hit.char_boxes] if box else []})
    return pd.DataFrame(rows)


def field_boxes(located: pd.DataFrame) -> dict[str, Box]:
    """{mark label: box} of the found fields of a `locate_identity` frame."""
    ok = located[located["found"]]
    return {r.mark: (int(r.x0), int(r.y0), int(r.x1), int(r.y1)) for r in ok.itertuples()}


# ---------------------------------------------------------------- who is on the image

@dataclass
class IdentityMatch:
    """The table row an image shows (`row`, 0-based) or None with the reason; `method` names the fields that
    matched (e.g. 'name+ssn+email'); `scores` has per candidate row the per-field scores (no values)."""

    row: int | None
    reason: str
    method: str = ""
    confidence: float = 0.0
    scores: pd.DataFrame = field(default_factory=pd.DataFrame)


def _support(scores: dict[str, float]) -> float:
    strong = [k for k in IDENTIFYING if scores.get(k, 0) >= STRONG]
    return len(strong) + (0.5 if scores.get("date_of_birth", 0) >= STRONG else 0.0)


def match_identity(lines: list[OCRLine], table: pd.DataFrame | list[dict[str, str]],
                   texts: list[_Text] | None = None) -> IdentityMatch:
    """Which row of `table` (rows as dicts with FIELDS keys, or a DataFrame with those columns) the image shows.

    Null: the image shows none of the rows; then no row has a field found with score >= STRONG except by chance.
    Rule: support = identifying fields (name, ssn, phone, email) found with score >= STRONG, + 0.5 for the date
    of birth. The best row must have support >= 2, or exactly one field matched exactly with >= 8 skeleton
    characters. Skipped (row None) when no row qualifies ('no confident match'), when the two best rows have the
    same support ('tie'), or when another row's SSN, phone or email is also on the image in ink of its own, i.e.
    with most of its matched characters outside the best row's found values ('conflicting values'; a value
    matched inside the best row's own value, such as a near-duplicate email, is that value read twice).
    A name that is a word-prefix of another matched row's name (Peter Vance / Peter Vanceworth) does not count.
    """
    rows = table.to_dict("records") if isinstance(table, pd.DataFrame) else list(table)
    if not rows:
        raise LocateError("table: no identities to match against")
    texts = candidate_texts(lines) if texts is None else texts
    hits = _row_hits(rows, texts)
    per_row = {r: {k: h.score for k, h in found.items()} for r, found in hits.items()}
    _drop_prefix_names(per_row, rows)
    ranked = sorted(per_row, key=lambda r: (-_support(per_row[r]), -sum(per_row[r].values())))
    frame = pd.DataFrame([{"row": r, "support": _support(per_row[r]), **per_row[r]} for r in ranked])
    if not ranked:
        return IdentityMatch(None, "no confident match", scores=frame)
    best = per_row[ranked[0]]
    strong = [k for k in IDENTIFYING if best.get(k, 0) >= STRONG]
    exact_single = len(strong) == 1 and best[strong[0]] == 1.0 and \
        len(skeleton(str(rows[ranked[0]].get(strong[0])))[0]) >= 8
    if _support(best) < 2 and not exact_single:
        return IdentityMatch(None, "no confident match", scores=frame)
    if len(ranked) > 1:
        if _support(per_row[ranked[1]]) == _support(best):
            return IdentityMatch(None, "tie", scores=frame)
        taken = {b for k, h in hits[ranked[0]].items() if best.get(k, 0) >= FOUND for b in h.char_boxes}
        if any(_own_value(hits[r], per_row[r], taken) for r in ranked[1:]):
            return IdentityMatch(None, "conflicting values", scores=frame)
    if "date_of_birth" in best and best["date_of_birth"] >= STRONG:
        strong.append("date_of_birth")
    conf = float(np.mean([best[k] for k in strong]))
    return IdentityMatch(ranked[0], "matched", "+".join(strong), conf, frame)


def _row_hits(rows: list[dict], texts: list[_Text]) -> dict[int, dict[str, Hit]]:
    """Per table row with an identifying field found (score >= STRONG), its hits on the image (name, ssn, phone,
    email, date of birth); rows whose values are not even plausibly on the image are not searched."""
    grams = set().union(*(_trigrams(t.skel) for t in texts)) if texts else set()
    out: dict[int, dict[str, Hit]] = {}
    for r, ident in enumerate(rows):
        found = {}
        for key in (*IDENTIFYING, "date_of_birth"):
            value = str(ident.get(key) or "")
            if value.strip() and _plausible(key, value, grams):
                found[key] = _find_value(key, value, texts)
        if any(h.score >= STRONG for k, h in found.items() if k in IDENTIFYING):
            out[r] = found
    return out


def _own_value(hits: dict[str, Hit], scores: dict[str, float], taken: set[Box]) -> bool:
    """Whether another row's SSN, phone or email is on the image in ink of its own: found (score >= STRONG) with
    most of its matched characters outside the best row's values. A near-duplicate read inside the best row's own
    value ('andrew99@...' inside 'andrew59@...') is that value, not a second person's."""
    for key in VALUE_FIELDS:
        h = hits.get(key)
        if h is not None and scores.get(key, 0) >= STRONG:
            outside = sum(b not in taken for b in h.char_boxes)
            if not h.char_boxes or outside > len(h.char_boxes) / 2:
                return True
    return False


def _plausible(key: str, value: str, grams: set[str]) -> bool:
    """Quick filter before the approximate search: enough of the value's trigrams occur on the image."""
    skels = [skeleton(v)[0] for v in value_variants(key, value)]
    if key == "name":
        skels += [skeleton(w)[0] for w in value.split()]
    for s in skels:
        g = _trigrams(s)
        if not g:
            return True  # too short to filter: search it
        if len(g & grams) >= 0.5 * len(g):
            return True
    return False


def _drop_prefix_names(per_row: dict[int, dict[str, float]], rows: list[dict]) -> None:
    """A matched name contained in another matched row's longer name is the longer one's, not its own."""
    named = [r for r in per_row if per_row[r].get("name", 0) >= STRONG]
    for r in named:
        mine = skeleton(str(rows[r].get("name", "")))[0]
        if any(o != r and len(theirs := skeleton(str(rows[o].get("name", "")))[0]) > len(mine) and mine in theirs
               for o in named):
            per_row[r]["name"] = 0.0
    for r in [r for r in per_row if not any(per_row[r].get(k, 0) >= STRONG for k in IDENTIFYING)]:
        del per_row[r]


# ---------------------------------------------------------------- without a table: patterns and labels

_DIGITISH = str.maketrans({"O": "0", "o": "0", "D": "0", "l": "1", "I": "1", "|": "1", "S": "5", "B": "8",
                           "Z": "2"})
PATTERNS = {
    "ssn": re.compile(r"(?<![\d-])\d{3}[-\s.]\d{2}[-\s.]\d{4}(?![\d-])|(?<!\d)\d{9}(?!\d)"),
    "phone": re.compile(r"(?<![\d\w])(?:\+?1[-.\s]?|001[-.\s]?)?(?:\(\d{3}\)\s?|\d{3}[-.\s])\d{3}[-.\s]?\d{4}"
                        r"(?:\s?(?:x|ext\.?)\s?\d{1,6})?(?!\d)", re.IGNORECASE),
    "email": re.compile(r"[A-Za-z0-9._%+-]+\s?@\s?[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    "date_of_birth": re.compile(r"(?<!\d)(?:\d{1,2}[/-]\d{1,2}[/-]\d{4}|\d{4}-\d{2}-\d{2})(?!\d)"),
}
LABELS = {
    "name": re.compile(r"\b(?:full\s*name|name|applicant\s*name|employee\s*name|last\s*name|first\s*name)\b", re.I),
    "date_of_birth": re.compile(r"date\s*of\s*birth|\bdob\b|birth\s*date", re.I),
    "ssn": re.compile(r"social\s*security|\bssn\b|\bs\.s\.n", re.I),
    "phone": re.compile(r"phone|telephone|\btel\b|mobile", re.I),
    "email": re.compile(r"e-?\s?mail", re.I),
    "address": re.compile(r"address|\baddr\b", re.I),
}
_LABEL_ORDER = ("date_of_birth", "ssn", "phone", "email", "address", "name")  # 'Name' last: it is in other labels


def _digitised(text: str) -> str:
    """Letters OCR reads for digits, turned into digits where a digit is beside them (same length as `text`)."""
    out = list(text)
    for i, ch in enumerate(text):
        if ch in "OoDlI|SBZ":
            near = text[max(0, i - 1):i] + text[i + 1:i + 2]
            if any(c.isdigit() for c in near):
                out[i] = ch.translate(_DIGITISH)
    return "".join(out)


def _span_box(line: OCRLine, a: int, b: int) -> Box | None:
    return _union(line.char_boxes[a:b]) if line.char_boxes else line.box


def _label_of(text: str) -> tuple[str, int] | None:
    """(field, end of the label) when the line starts with or is a field label."""
    for key in _LABEL_ORDER:
        m = LABELS[key].search(text)
        if m and m.start() <= 3:
            return key, m.end()
    return None


def find_unlabelled(lines: list[OCRLine], image: Image.Image | None = None) -> pd.DataFrame:
    """Values found without an identity table: by pattern (SSN, phone, email, date) and by the label printed
    beside or above them. Columns: field, mark, method ('pattern' | 'label' | 'pattern+label'), confidence,
    x0..y1, line, '_value' (private: the value as read)."""
    found: dict[tuple[str, int, int, int], dict] = {}

    def add(key: str, k: int, a: int, b: int, method: str, conf: float) -> None:
        box = tighten(image, _span_box(lines[k], a, b))
        slot = (key, k, a, b)
        if slot in found:
            found[slot]["method"] = "pattern+label"
            found[slot]["confidence"] = max(found[slot]["confidence"], conf)
            return
        found[slot] = {"field": key, "mark": FIELDS[key], "method": method, "confidence": conf,
                       "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3], "line": k,
                       "_value": lines[k].text[a:b].strip()}

    for k, ln in enumerate(lines):
        text = _digitised(ln.text)
        for key, pat in PATTERNS.items():
            for m in pat.finditer(text):
                add(key, k, m.start(), m.end(), "pattern", ln.score)
    for k, ln in enumerate(lines):
        lab = _label_of(ln.text)
        if lab is None:
            continue
        key, end = lab
        rest = ln.text[end:]
        lead = len(rest) - len(rest.lstrip(" :.-\t"))
        inline = rest.lstrip().startswith(":") or any(c.isdigit() or c == "@" for c in rest)
        if inline and len(rest.strip(" :.-\t")) >= 2:  # 'SSN: 123-45-6789' on one line ('Phone Number' is no value)
            target = (k, end + lead, len(ln.text))
        else:
            j = _value_line(lines, k)
            if j is None:
                continue
            target = (j, 0, len(lines[j].text))
        j, a, b = target
        conf = ln.score * lines[j].score
        pat = PATTERNS.get(key)
        if pat is not None:
            m = pat.search(_digitised(lines[j].text), a, b)
            if m:
                a, b = m.start(), m.end()
            else:
                conf *= 0.5  # a labelled value that does not look like one
        add(key, j, a, b, "label", conf)
    cols = ["field", "mark", "method", "confidence", "x0", "y0", "x1", "y1", "line", "_value"]
    return pd.DataFrame(list(found.values()), columns=cols)


def _value_line(lines: list[OCRLine], k: int) -> int | None:
    """The line holding label k's value: its neighbour to the right on the same row, else the one below; a line
    that is itself a label is no value."""
    for a, b in _neighbours(lines):  # right neighbour comes first in the pairs of a line
        if a == k and _label_of(lines[b].text) is None:
            return b
    return None


# ---------------------------------------------------------------- image tokens

def token_marks(adapter: Any, image_size: tuple[int, int], boxes: dict[str, Box]) -> pd.DataFrame:
    """The image tokens (tile, patch_row, patch_col) under each box, with its mark label (a token under two
    boxes appears twice). Through the adapter's `token_boxes`, as `probes.data.documents.patches_for_box`."""

    parts = []
    for mark, box in boxes.items():
        hit = patches_for_box(adapter, tuple(image_size), tuple(box))
        parts.append(hit.assign(mark=mark))
    if not parts:
        return pd.DataFrame(columns=["tile", "patch_row", "patch_col", "mark"])
    return pd.concat(parts, ignore_index=True)


def mask_value(text: str) -> str:
    """A value with its letters and digits hidden (shape kept): for printing what was found without the PII."""
    return "".join("#" if c.isdigit() else ("x" if c.isalpha() else c) for c in text)


def cli_ocr(image: str, show_values: bool = False, cache_dir: str | None = None) -> str:
    """`mmret ocr IMAGE`: the lines read and the PII found by pattern and label; letters and digits of every
    text masked (shape kept) unless `show_values`."""

    with Image.open(image) as im:
        rgb = im.convert("RGB")
    lines = read_lines(image, cache_dir=cache_dir)
    shown = (lambda t: t) if show_values else mask_value
    out = [f"{image}: {rgb.size[0]}x{rgb.size[1]} px, {len(lines)} text line(s)"
           + ("" if show_values else " (values masked; --show-values to print them)")]
    for k, ln in enumerate(lines):
        out.append(f"  line {k:>3}  score {ln.score:.2f}  box {ln.box}  {shown(ln.text)}")
    found = find_unlabelled(lines, rgb)
    out.append(f"PII found without a table: {len(found)}")
    for _, r in found.iterrows():
        out.append(f"  {r['field']:<13} {r['method']:<13} conf {r['confidence']:.2f}  "
                   f"box ({r['x0']}, {r['y0']}, {r['x1']}, {r['y1']})  {shown(r['_value'])}")
    return "\n".join(out)
