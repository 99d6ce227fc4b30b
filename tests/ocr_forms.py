"""Forms in the MM-Privacy benchmark's four disclosure styles, with the exact ink box of every value (a test and
benchmark helper; see ../shared/mm-privacy/FORMAT.md for the styles).

    form = benchmark_form(identity, "i9", seed=3)    # -> BenchForm(image, boxes={"name": (x0, y0, x1, y1), ...})

Styles: "hiring" (job application), "finance" (bank form) drawn by `probes.data.documents.render_document` with the date
of birth printed mm/dd/yyyy as the benchmark's forms do; "i9" (the top of an I-9: last and first name in separate
boxes) and "table" (a small two-column table, a header row and one row of values), drawn here with the toolkit's
`draw_text`, which returns exact ink boxes. `degrade` rotates a few degrees, lowers the resolution and
JPEG-compresses, carrying the boxes along (a rotated box becomes the bounding box of its rotated corners).
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from probes.data.documents import draw_text, font, render_document
from probes.data.identities import Identity

STYLES = ("hiring", "i9", "finance", "table")
KEY_OF_FIELD = {"Name": "name", "Date of Birth": "date_of_birth", "SSN": "ssn", "Phone Numbers": "phone",
                "Email": "email", "Address": "address"}
INK = (15, 15, 20)


@dataclass
class BenchForm:
    image: Image.Image
    boxes: dict[str, tuple[int, int, int, int]]  # field key (probes.data.pii_locate.FIELDS) -> ink box, x1/y1 exclusive
    style: str


def mdy(iso: str) -> str:
    y, m, d = iso[:10].split("-")
    return f"{m}/{d}/{y}"


def _toolkit_form(identity: Identity, scenario: str, rng: random.Random) -> BenchForm:
    size = rng.choice([(1280, 600), (1100, 640), (960, 560), (1400, 700)])
    layout = rng.choice(["fixed", "random"])
    doc = render_document(identity, scenario, size, seed=rng.randrange(1000), layout=layout,
                          values={"Date of Birth": mdy(identity.date_of_birth)})
    boxes = {KEY_OF_FIELD[f]: fb.box for f, fb in doc.fields.items() if f in KEY_OF_FIELD and fb.box}
    return BenchForm(doc.image, boxes, "hiring" if scenario == "hiring" else "finance")


def _i9(identity: Identity, rng: random.Random) -> BenchForm:
    """Section 1 of an I-9: title, then boxes with a small label above each typed value."""
    W, H = rng.choice([(2000, 770), (1600, 620), (1280, 500)])
    sans = rng.choice(["sans", "serif"])
    img = Image.new("RGB", (W, H), (255, 255, 255) if rng.random() < 0.6 else (250, 248, 240))
    d = ImageDraw.Draw(img)
    m, u = round(0.02 * W), H / 770
    draw_text(img, (m, m + 30 * u), "Employment Eligibility Verification", font("bold", 34 * u), INK)
    draw_text(img, (W - m - 260 * u, m + 30 * u), "Form I-9", font("bold", 40 * u), INK)
    d.rectangle((m, m + 70 * u, W - m, m + 110 * u), fill=(225, 225, 225))
    draw_text(img, (m + 6, m + 90 * u), "Section 1. Employee Information and Attestation", font("bold", 24 * u), INK)
    first, last = identity.name.split(" ", 1)[0], identity.name.split(" ", 1)[-1]
    rows = [[("Last Name (Family Name)", last, "name_last"), ("First Name (Given Name)", first, "name_first"),
             ("Middle Initial", "", None)],
            [("Address (Street Number and Name)", identity.address, "address")],
            [("Date of Birth (mm/dd/yyyy)", mdy(identity.date_of_birth), "date_of_birth"),
             ("U.S. Social Security Number", identity.ssn, "ssn")],
            [("Employee's E-mail Address", identity.email, "email"),
             ("Employee's Telephone Number", identity.phone, "phone")]]
    top, row_h = m + 130 * u, (H - m - 130 * u - m) / len(rows)
    vpx = rng.uniform(0.34, 0.42) * row_h
    boxes: dict[str, tuple] = {}
    for i, row in enumerate(rows):
        y0, y1 = top + i * row_h, top + (i + 1) * row_h
        widths = [0.42, 0.42, 0.16][:len(row)] if len(row) == 3 else [1 / len(row)] * len(row)
        x = m
        for (label, value, key), frac in zip(row, widths):
            x1 = x + frac * (W - 2 * m)
            d.rectangle((x, y0, x1, y1), outline=(60, 60, 60), width=max(1, round(2 * u)))
            draw_text(img, (x + 8 * u, y0 + 6 * u), label, font(sans, 0.22 * row_h), (70, 70, 80), anchor="lt")
            if value:
                box = draw_text(img, (x + 10 * u, y0 + 0.68 * row_h), value, font(sans, vpx), INK)
                if key and box:
                    boxes[key] = box
            x = x1
    name = [boxes.pop(k) for k in ("name_last", "name_first") if k in boxes]
    if name:
        boxes["name"] = (min(b[0] for b in name), min(b[1] for b in name), max(b[2] for b in name),
                         max(b[3] for b in name))
    return BenchForm(img, boxes, "i9")


def _table(identity: Identity, rng: random.Random) -> BenchForm:
    """The open scenario: a header row ('Name | Email') over one row of values, as small as the benchmark's."""
    pii = rng.choice([("Email", identity.email, "email"), ("SSN", identity.ssn, "ssn"),
                      ("Phone Numbers", identity.phone, "phone")])
    cols = [("Name", identity.name, "name"), pii]
    px = rng.choice([12, 14, 16, 20])
    fam = rng.choice(["sans", "serif", "bold"])
    f, fh = font(fam, px), font("bold", px)
    widths = [max(f.getlength(v), fh.getlength(h)) + 2 * px for h, v, _ in cols]
    W, rh = round(sum(widths)) + 2, round(px * 1.6)
    H = 2 * rh + 2
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    boxes, x = {}, 0
    for (header, value, key), w in zip(cols, widths):
        d.rectangle((x, 0, x + w, rh), outline=(0, 0, 0), fill=(235, 235, 235))
        d.rectangle((x, rh, x + w, 2 * rh), outline=(0, 0, 0))
        draw_text(img, (x + px, rh / 2), header, fh, INK)
        boxes[key] = draw_text(img, (x + px, rh * 1.5), value, f, INK)
        x += w
    return BenchForm(img, {k: b for k, b in boxes.items() if b}, "table")


def benchmark_form(identity: Identity, style: str, seed: int = 0) -> BenchForm:
    rng = random.Random(f"{style}/{seed}")
    if style == "hiring":
        return _toolkit_form(identity, "hiring", rng)
    if style == "finance":
        return _toolkit_form(identity, "finance", rng)
    if style == "i9":
        return _i9(identity, rng)
    if style == "table":
        return _table(identity, rng)
    raise ValueError(f"style {style!r}: expected one of {STYLES}")


def _rotate_box(box, angle, size, new_size):
    """The bounding box of `box` after PIL's rotate(angle, expand=True) about the image centre."""
    (w, h), (nw, nh) = size, new_size
    a = math.radians(angle)
    cx, cy, ncx, ncy = w / 2, h / 2, nw / 2, nh / 2
    pts = []
    for x, y in ((box[0], box[1]), (box[2], box[1]), (box[0], box[3]), (box[2], box[3])):
        dx, dy = x - cx, y - cy
        pts.append((ncx + dx * math.cos(a) + dy * math.sin(a), ncy - dx * math.sin(a) + dy * math.cos(a)))
    return (math.floor(min(p[0] for p in pts)), math.floor(min(p[1] for p in pts)),
            math.ceil(max(p[0] for p in pts)), math.ceil(max(p[1] for p in pts)))


def degrade(form: BenchForm, angle: float = 0.0, scale: float = 1.0, jpeg: int | None = None) -> BenchForm:
    """Rotated by `angle` degrees (counter-clockwise, canvas grown, white fill), resized by `scale`, saved as JPEG
    of quality `jpeg`; the value boxes follow."""
    img, boxes = form.image, dict(form.boxes)
    if angle:
        rot = img.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(255, 255, 255))
        boxes = {k: _rotate_box(b, angle, img.size, rot.size) for k, b in boxes.items()}
        img = rot
    if scale != 1.0:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
        boxes = {k: (math.floor(b[0] * scale), math.floor(b[1] * scale), math.ceil(b[2] * scale),
                     math.ceil(b[3] * scale)) for k, b in boxes.items()}
    if jpeg is not None:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=jpeg)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return BenchForm(img, boxes, form.style)


def pad_square(form: BenchForm) -> BenchForm:
    """The form centred on a white square canvas, boxes shifted: a centre-cropping processor (CLIP's) then sees
    the whole form."""
    w, h = form.image.size
    side = max(w, h)
    ox, oy = (side - w) // 2, (side - h) // 2
    img = Image.new("RGB", (side, side), (255, 255, 255))
    img.paste(form.image, (ox, oy))
    boxes = {k: (b[0] + ox, b[1] + oy, b[2] + ox, b[3] + oy) for k, b in form.boxes.items()}
    return BenchForm(img, boxes, form.style)


def random_condition(rng: random.Random, style: str) -> dict:
    """A draw of the degradations the benchmark's images show: some rotated, some low resolution, most JPEG."""
    small = style == "table"
    return {"angle": rng.choice([0.0, 0.0, 0.0, rng.uniform(-4, 4)]),
            "scale": 1.0 if small else rng.choice([1.0, 1.0, 0.75, 0.6]),
            "jpeg": rng.choice([None, 85, 60, 40])}
