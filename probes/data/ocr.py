"""Text lines and their pixel boxes from any document image, offline, cached by image hash.

    lines = read_lines("form.png")                    # [OCRLine(text, score, box, quad, char_boxes), ...]
    df = lines_frame(lines)                           # one row per line (holds the text: may hold PII)

The engine is RapidOCR (`rapidocr-onnxruntime`): PaddleOCR's PP-OCRv4 detection and recognition networks as ONNX
files shipped inside the wheel and run by onnxruntime on the CPU, so nothing is downloaded at run time (see the
README's design section for why this engine). Each line comes with its four-corner box and, from the recogniser's
CTC alignment, one box per character of its text, which is what lets `probes.data.pii_locate` return the boxes of the
characters that hold a value rather than the whole line.

Cache: one JSON file per image, named by the sha256 of the image file's bytes (or of an in-memory image's pixels)
and the engine settings, in `cache_dir` (default $MMRET_OCR_CACHE, else ~/.cache/mm-retention/ocr). A benchmark
folder is read once; a file is written whole (temporary name, then renamed) so a killed run leaves no half file.
Cache files hold the recognised text (PII): they stay on the user's disk, never in logs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

Box = tuple[int, int, int, int]
ENGINE = "rapidocr-onnxruntime"
# Settings that change what the engine returns; part of the cache key, so changing one re-reads every image.
# upscale_below: images whose shorter side is under this many pixels are enlarged first (the small name/value
# tables of the benchmark are ~40 px high; the detector misses 8 px text).
# det_limit_side_len: an image whose shorter side is under this many pixels is enlarged to it for detection (the
# engine's limit type "min"; a larger image is detected at its own size). rec_batch_num: lines recognised per batch;
# one, because a batch pads every line to its widest one and the padding costs time (1,280 x 600 form, one thread:
# 1.6 CPU s at 16, 0.9 s at 1) and changes what is read (16 lost the spaces of 'Available Start Date' on one form).
# use_cls off: the 180-degree classifier is for upside-down photos; a few degrees of tilt the detector's quads handle.
# threads: onnxruntime threads per session. One: on a shared or busy CPU, idle pool threads spin and more than
# double the CPU time (1,280 x 600 form, measured: 2.1 CPU s with the default pool, 1.1 s with one thread; the
# same lines and boxes), and a caller wanting more throughput reads several images in parallel processes.
SETTINGS = {"use_cls": False, "upscale_below": 200, "max_upscale": 4.0, "text_score": 0.3,
            "det_limit_side_len": 480, "rec_batch_num": 1, "threads": 1, "version": 1}


class OCRError(ValueError):
    """The image cannot be read, the engine is missing, or a cache file is broken; the message names the file."""


@dataclass
class OCRLine:
    """One detected line: its text, the recogniser's score, its axis-aligned box (x0, y0, x1, y1; x1/y1
    exclusive), its four corners (clockwise from top-left; rotated text gives a slanted quad) and one box per
    character of `text` (spaces included, as the recogniser placed them)."""

    text: str
    score: float
    box: Box
    quad: list[tuple[int, int]]
    char_boxes: list[Box] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"text": self.text, "score": self.score, "box": list(self.box), "quad": [list(p) for p in self.quad],
                "char_boxes": [list(b) for b in self.char_boxes]}

    @classmethod
    def from_json(cls, d: dict) -> "OCRLine":
        return cls(str(d["text"]), float(d["score"]), tuple(int(v) for v in d["box"]),
                   [tuple(int(v) for v in p) for p in d["quad"]], [tuple(int(v) for v in b) for b in d["char_boxes"]])


def default_cache_dir() -> Path:
    return Path(os.environ.get("MMRET_OCR_CACHE") or Path.home() / ".cache" / "mm-retention" / "ocr")


@lru_cache(maxsize=1)
def engine() -> Any:
    """The RapidOCR engine, built once per process (its ONNX sessions take ~0.3 s to load)."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as err:
        raise OCRError("OCR needs the package 'rapidocr-onnxruntime' (pip install rapidocr-onnxruntime); "
                       f"it is not importable here ({err})") from err
    return RapidOCR(print_verbose=False, det_limit_side_len=SETTINGS["det_limit_side_len"],
                    rec_batch_num=SETTINGS["rec_batch_num"], intra_op_num_threads=SETTINGS["threads"],
                    inter_op_num_threads=SETTINGS["threads"])


def _load(image: str | os.PathLike | Image.Image | bytes) -> tuple[Image.Image, str]:
    """The image as RGB and its cache key (sha256 of the file bytes, or of mode+size+pixels in memory)."""
    if isinstance(image, Image.Image):
        rgb = image.convert("RGB")
        digest = hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
        return rgb, digest
    if isinstance(image, bytes):
        data, where = image, "image bytes"
    else:
        where = str(image)
        if not Path(image).is_file():
            raise OCRError(f"{where}: image file not found")
        data = Path(image).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise OCRError(f"{where}: image does not decode ({err})") from err
    return rgb, hashlib.sha256(data).hexdigest()


def _settings_key() -> str:
    return hashlib.sha256(json.dumps({"engine": ENGINE, **SETTINGS}, sort_keys=True).encode()).hexdigest()[:12]


def _run_engine(rgb: Image.Image) -> list[OCRLine]:
    """OCR one RGB image; small images are enlarged first and every box is mapped back to original pixels."""
    w, h = rgb.size
    scale = 1.0
    if min(w, h) < SETTINGS["upscale_below"]:
        scale = min(SETTINGS["max_upscale"], SETTINGS["upscale_below"] / min(w, h))
        rgb = rgb.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
    bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
    result, _ = engine()(bgr, use_cls=SETTINGS["use_cls"], return_word_box=True, text_score=SETTINGS["text_score"])
    lines = []
    for item in result or []:
        quad = [(int(round(x / scale)), int(round(y / scale))) for x, y in item[0]]
        text, score = str(item[1]), float(item[2])
        chars = item[3] if len(item) > 3 and item[3] else []
        char_boxes = [_rect([(x / scale, y / scale) for x, y in c], w, h) for c in chars]
        box = _rect(quad, w, h)
        if len(char_boxes) != len(text):  # no usable alignment: split the line box evenly (documented fallback)
            char_boxes = _even_split(box, len(text))
        lines.append(OCRLine(text, score, box, quad, char_boxes))
    return lines


def _rect(points: list[tuple[int | float, int | float]], w: int, h: int) -> Box:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, y0 = max(0, int(np.floor(min(xs)))), max(0, int(np.floor(min(ys))))
    return (x0, y0, max(x0 + 1, min(w, int(np.ceil(max(xs))))), max(y0 + 1, min(h, int(np.ceil(max(ys))))))


def _even_split(box: Box, n: int) -> list[Box]:
    if n <= 0:
        return []
    x0, y0, x1, y1 = box
    edges = np.linspace(x0, x1, n + 1)
    return [(int(edges[i]), y0, max(int(edges[i]) + 1, int(edges[i + 1])), y1) for i in range(n)]


def _read_cache(path: Path) -> list[OCRLine] | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        return [OCRLine.from_json(d) for d in obj["lines"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise OCRError(f"{path}: broken OCR cache file ({type(err).__name__}); delete it to read the image again") \
            from err


def _write_cache(path: Path, lines: list[OCRLine], size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"engine": ENGINE, "settings": SETTINGS, "size": list(size),
                          "lines": [ln.to_json() for ln in lines]})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_lines(image: str | os.PathLike | Image.Image | bytes, cache_dir: str | os.PathLike | None = None,
               use_cache: bool = True) -> list[OCRLine]:
    """The text lines of `image` (a path, PIL image or encoded bytes) with their boxes, in the engine's reading
    order; read from the cache when this image was read before with the same settings."""
    rgb, digest = _load(image)
    path = Path(cache_dir or default_cache_dir()) / f"{digest}-{_settings_key()}.json"
    if use_cache:
        cached = _read_cache(path)
        if cached is not None:
            return cached
    lines = _run_engine(rgb)
    if use_cache:
        _write_cache(path, lines, rgb.size)
    return lines


def lines_frame(lines: list[OCRLine]) -> pd.DataFrame:
    """One row per line: line, text, score, x0, y0, x1, y1 (text may hold PII: do not print)."""
    rows = [{"line": i, "text": ln.text, "score": ln.score, **dict(zip(("x0", "y0", "x1", "y1"), ln.box))}
            for i, ln in enumerate(lines)]
    return pd.DataFrame(rows, columns=["line", "text", "score", "x0", "y0", "x1", "y1"])
