"""probes.data.ocr: text lines with boxes, cached by image hash (one small OCR'd form; the rest uses the cache)."""

import json

import pytest
from PIL import Image

import probes.data.ocr as ocr
from probes.data.documents import render_document
from probes.data.identities import make_identities


@pytest.fixture(scope="module")
def form():
    return render_document(make_identities(1, seed=3)[0], "finance", (640, 300), seed=1)


def test_lines_boxes_and_cache(form, tmp_path, monkeypatch):
    lines = ocr.read_lines(form.image, cache_dir=tmp_path)
    assert lines and all(len(ln.char_boxes) == len(ln.text) for ln in lines)
    ssn = form.fields["SSN"]
    line = next(ln for ln in lines if ssn.value.replace("-", "") in ln.text.replace("-", ""))
    b, t = line.box, ssn.box  # the line holding the SSN overlaps its drawn ink box
    assert min(b[2], t[2]) > max(b[0], t[0]) and min(b[3], t[3]) > max(b[1], t[1])
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["engine"] == ocr.ENGINE
    monkeypatch.setattr(ocr, "_run_engine", lambda rgb: pytest.fail("read again instead of from the cache"))
    again = ocr.read_lines(form.image, cache_dir=tmp_path)
    assert [ln.to_json() for ln in again] == [ln.to_json() for ln in lines]
    assert list(ocr.lines_frame(lines).columns) == ["line", "text", "score", "x0", "y0", "x1", "y1"]


def test_broken_cache_and_bad_image_are_named(form, tmp_path, monkeypatch):
    monkeypatch.setattr(ocr, "_run_engine", lambda rgb: [])
    ocr.read_lines(form.image, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("*.json")
    cached.write_text("{not json")
    with pytest.raises(ocr.OCRError, match=r"broken OCR cache file"):
        ocr.read_lines(form.image, cache_dir=tmp_path)
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ocr.OCRError, match=r"x\.png: image does not decode"):
        ocr.read_lines(bad, cache_dir=tmp_path)
    with pytest.raises(ocr.OCRError, match=r"nope\.png: image file not found"):
        ocr.read_lines(tmp_path / "nope.png", cache_dir=tmp_path)


def test_cache_key_is_the_image_not_the_object(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ocr, "_run_engine", lambda rgb: calls.append(1) or [])
    a = Image.new("RGB", (60, 60), "white")
    ocr.read_lines(a, cache_dir=tmp_path)
    ocr.read_lines(a.copy(), cache_dir=tmp_path)  # same pixels: cached
    ocr.read_lines(Image.new("RGB", (60, 60), "black"), cache_dir=tmp_path)  # other pixels: read
    assert len(calls) == 2
