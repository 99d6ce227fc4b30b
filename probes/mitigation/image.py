"""Black-box input protection: transformations of the image sent to the model, each with one strength knob in [0, 1].

Strength 0 returns the image unchanged (the same pixels), and larger strengths protect more:

- global: `blur` (Gaussian radius up to 8 px), `pixelate` (blocks up to 32 px), `downscale` (to as little as 1/8 of
  each side, then back up), `jpeg` (quality from 100 down to 5);
- regional, on boxes (the PII regions: a drawn document's exact value boxes, the oracle, or boxes read by OCR):
  `mask` (filled with the page colour), `region_blur`, `region_pixelate`. Regional protections take their strength
  as the box dilation too: each box grows by `dilation * strength` pixels on every side (a knob for regions a
  little larger than the value), and strength 0 touches nothing.

    protect = ImageProtection("region_pixelate", 0.5, dilation=8)
    safe = protect.apply(image, boxes=[(x0, y0, x1, y1), ...])
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageDraw, ImageFilter

GLOBAL = ("blur", "pixelate", "downscale", "jpeg")
REGIONAL = ("mask", "region_blur", "region_pixelate")
KINDS = GLOBAL + REGIONAL
MAX_BLUR = 8.0  # px of Gaussian radius at strength 1
MAX_BLOCK = 32  # px of a pixelation block at strength 1
MIN_SCALE = 1 / 8  # downscale factor of each side at strength 1
PAGE = (255, 255, 255)  # the colour a mask paints (forms are printed on white)

Number = float | int  # a knob or a pixel coordinate given as an int is accepted too
Box = tuple[Number, Number, Number, Number]


class ProtectionError(ValueError):
    pass


@dataclass(frozen=True)
class ImageProtection:
    """One transformation and its strength; `dilation` (px at strength 1) only for the regional kinds."""

    kind: str
    strength: Number
    dilation: Number = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ProtectionError(f"protection kind {self.kind!r}: expected one of {KINDS}")
        if not 0.0 <= float(self.strength) <= 1.0:
            raise ProtectionError(f"protection {self.kind}: strength {self.strength!r}: expected a number in [0, 1]")
        if float(self.dilation) < 0:
            raise ProtectionError(f"protection {self.kind}: dilation {self.dilation!r}: expected >= 0 px")

    @property
    def regional(self) -> bool:
        return self.kind in REGIONAL

    def apply(self, image: Image.Image, boxes: Sequence[Box] = ()) -> Image.Image:
        """The protected copy of `image` (RGB). Regional kinds need `boxes` (pixel (x0, y0, x1, y1)); a regional
        protection with no boxes leaves the image as it is (nothing was found to protect)."""
        rgb = image.convert("RGB")
        if self.strength == 0:
            return rgb.copy()
        if not self.regional:
            return _global(rgb, self.kind, float(self.strength))
        out = rgb.copy()
        grow = float(self.dilation) * float(self.strength)
        for box in boxes:
            _region(out, _dilated(box, grow, out.size), self.kind, float(self.strength))
        return out


def _global(rgb: Image.Image, kind: str, s: float) -> Image.Image:
    if kind == "blur":
        return rgb.filter(ImageFilter.GaussianBlur(radius=MAX_BLUR * s))
    if kind == "pixelate":
        return _pixelate(rgb, _block(s))
    if kind == "downscale":
        scale = 1 - (1 - MIN_SCALE) * s
        small = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BILINEAR)
        return small.resize(rgb.size, Image.BILINEAR)
    buf = io.BytesIO()  # jpeg
    rgb.save(buf, format="JPEG", quality=int(round(100 - 95 * s)))
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")


def _block(s: float) -> int:
    """The pixelation block (px) at strength s: 1 (nothing) at 0, MAX_BLOCK at 1."""
    return max(1, round(1 + (MAX_BLOCK - 1) * s))


def _pixelate(rgb: Image.Image, block: int) -> Image.Image:
    if block <= 1:
        return rgb.copy()
    small = rgb.resize((max(1, rgb.width // block), max(1, rgb.height // block)), Image.BOX)
    return small.resize(rgb.size, Image.NEAREST)


def _dilated(box: Box, grow: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    if len(box) != 4:
        raise ProtectionError(f"box {box!r}: expected (x0, y0, x1, y1) in pixels")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise ProtectionError(f"box {box!r}: x1 < x0 or y1 < y0")
    w, h = size
    return (max(0, int(x0 - grow)), max(0, int(y0 - grow)), min(w, int(round(x1 + grow))),
            min(h, int(round(y1 + grow))))


def _region(out: Image.Image, box: tuple[int, int, int, int], kind: str, s: float) -> None:
    if box[2] <= box[0] or box[3] <= box[1]:
        return
    if kind == "mask":
        ImageDraw.Draw(out).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=PAGE)
        return
    patch = out.crop(box)
    if kind == "region_blur":
        patch = _global(patch, "blur", s)
    else:
        patch = _pixelate(patch, _block(s))
    out.paste(patch, box[:2])
