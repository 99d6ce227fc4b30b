import json

import pytest

from probes.data.session import Session, SessionError, SessionImage, Turn, read_sessions, write_sessions
from tests.conftest import document_image


def three_turns(image):
    return Session("s0", [
        Turn("user", "My SSN is 123-45-6789. Keep it.", images=[image]).mark("ssn", "123-45-6789"),
        Turn("assistant", "Noted."),
        Turn("user", "What was it?"),
    ], labels={"identity_id": 7, "pii_type": "SSN"})


def test_jsonl_round_trip_keeps_turns_marks_images_and_labels(tmp_path, doc_image_path):
    s = three_turns(SessionImage.from_path(doc_image_path))
    path = write_sessions([s], tmp_path / "s.jsonl")
    (back,) = list(read_sessions(path))
    assert back.to_json() == s.to_json()
    assert back.turns[0].images[0].sha256 == s.turns[0].images[0].sha256
    assert back.turns[0].text[back.turns[0].marks[0].start:back.turns[0].marks[0].end] == "123-45-6789"
    assert back.turns[0].images[0].load().size == (80, 64)


def test_malformed_jsonl_line_is_named(tmp_path, doc_image_path):
    s = three_turns(SessionImage.from_path(doc_image_path))
    path = write_sessions([s], tmp_path / "s.jsonl")
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(SessionError, match=r"s\.jsonl:2: not valid JSON"):
        list(read_sessions(path))
    path.write_text(json.dumps({"session_id": "x"}) + "\n")
    with pytest.raises(SessionError, match=r"s\.jsonl:1: missing field 'turns'"):
        list(read_sessions(path))
    path.write_text(json.dumps({"session_id": "x", "turns": [{"role": "robot", "text": "hi"}]}) + "\n")
    with pytest.raises(SessionError, match=r"s\.jsonl:1: turns\[0\]: turn role 'robot'"):
        list(read_sessions(path))
    mark = {"label": "ssn", "start": "a", "end": 3}
    path.write_text(json.dumps({"session_id": "x", "turns": [{"role": "user", "text": "hi", "marks": [mark]}]}) + "\n")
    with pytest.raises(SessionError, match=r"s\.jsonl:1: turns\[0\]: malformed turn"):
        list(read_sessions(path))
    path.write_text(json.dumps({"session_id": "x", "turns": [{"role": "user", "text": "hi"}], "labels": None}) + "\n")
    with pytest.raises(SessionError, match=r"s\.jsonl:1: field 'labels' must be an object, got NoneType"):
        list(read_sessions(path))


def test_missing_changed_and_corrupt_images_are_named(tmp_path, doc_image_path):
    im = SessionImage.from_path(doc_image_path)
    doc_image_path.write_bytes(b"not a png at all")
    with pytest.raises(SessionError, match="does not match its sha256"):
        im.load()
    with pytest.raises(SessionError, match=r"doc\.png does not decode"):
        SessionImage(path=str(doc_image_path)).load()
    with pytest.raises(SessionError, match="image file not found: .*nope.png"):
        SessionImage.from_path(tmp_path / "nope.png")


def test_empty_session_and_bad_marks_are_refused():
    with pytest.raises(SessionError, match="has no turns"):
        Session("empty", [])
    with pytest.raises(SessionError, match="value not found"):
        Turn("user", "hello").mark("ssn", "123")
    with pytest.raises(SessionError, match="only an assistant turn"):
        Turn("user", None)


def test_in_memory_images_cannot_go_to_jsonl(tmp_path):
    s = three_turns(document_image())
    with pytest.raises(SessionError, match="in-memory image"):
        write_sessions([s], tmp_path / "s.jsonl")
    assert not (tmp_path / "s.jsonl").exists()


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    """mkstemp makes 0600 files; result files must stay readable as any other file the user writes."""
    import os

    from probes.data.files import atomic_write_bytes

    atomic_write_bytes(tmp_path / "a.csv", b"x")
    (tmp_path / "b.csv").write_bytes(b"x")
    assert (tmp_path / "a.csv").stat().st_mode & 0o777 == (tmp_path / "b.csv").stat().st_mode & 0o777
    assert os.stat(tmp_path / "a.csv").st_mode & 0o044  # readable by group/others under the usual umask


def test_directories_non_utf8_and_empty_files_are_named(tmp_path, doc_image_path):
    with pytest.raises(SessionError, match=r"is a directory, not a file; expected a sessions JSONL file"):
        list(read_sessions(tmp_path))
    path = write_sessions([three_turns(SessionImage.from_path(doc_image_path))], tmp_path / "s.jsonl")
    path.write_bytes(path.read_bytes() + b'{"session_id": "caf\xe9"}\n')
    with pytest.raises(SessionError, match=r"s\.jsonl:2: not UTF-8 text \(byte 19 of the line\)"):
        list(read_sessions(path))
    path.write_text("\n  \n")
    with pytest.raises(SessionError, match=r"s\.jsonl: no sessions \(the file is empty\)"):
        list(read_sessions(path))
    assert list(read_sessions(path, allow_empty=True)) == []


def test_check_images_names_the_line_and_session(tmp_path, doc_image_path):
    """Each session remembers its file line; a missing, changed or undecodable image is named with it (null: the
    intact file passes)."""
    from probes.data.session import check_images

    other = tmp_path / "other.png"
    document_image(text="SSN 456").save(other)
    sessions = [three_turns(SessionImage.from_path(doc_image_path)), three_turns(SessionImage.from_path(other))]
    sessions[1].session_id = "s1"
    path = write_sessions(sessions, tmp_path / "s.jsonl")
    read = list(read_sessions(path))
    assert [s.source for s in read] == [f"{path}:1", f"{path}:2"]
    check_images(read)
    document_image(text="changed").save(other)
    with pytest.raises(SessionError, match=r"s\.jsonl:2: session 's1': image file .*other\.png does not match"):
        check_images(read)
    other.unlink()
    with pytest.raises(SessionError, match=r"s\.jsonl:2: session 's1': image file not found: .*other\.png"):
        check_images(read)


def test_public_drops_private_labels_only():
    s = Session("s", [Turn("user", "hi")], labels={"pii_type": "SSN", "_target": "123-45-6789", "_identity": {}})
    assert s.public().labels == {"pii_type": "SSN"}
    assert s.private_labels() == {"_target": "123-45-6789", "_identity": {}}
    assert s.labels["_target"] == "123-45-6789"  # the original keeps them


# ---- issue 18: PII marks on images (label -> pixel boxes), saved in the JSONL ----------------------------------------
def test_image_marks_round_trip_and_old_files_load_unchanged(tmp_path, doc_image_path):
    """A session without image marks saves exactly as before (no "marks" key on its images), so an old file reads
    back and re-saves byte for byte; image marks round-trip as {label: [[x0, y0, x1, y1], ...]}."""
    old = three_turns(SessionImage.from_path(doc_image_path))
    path = write_sessions([old], tmp_path / "old.jsonl")
    line = json.loads(path.read_text())
    assert set(line["turns"][0]["images"][0]) == {"path", "sha256"}  # what files written before issue 18 hold
    (back,) = list(read_sessions(path))
    assert back.turns[0].images[0].marks == {}
    assert write_sessions([back], tmp_path / "again.jsonl").read_text() == path.read_text()

    marked = three_turns(SessionImage.from_path(doc_image_path, marks={"ssn": [(4, 4, 40, 14)],
                                                                        "name": [[1, 2, 3, 4], (10, 20, 30, 40)]}))
    path = write_sessions([marked], tmp_path / "marked.jsonl")
    assert json.loads(path.read_text())["turns"][0]["images"][0]["marks"] == {
        "ssn": [[4, 4, 40, 14]], "name": [[1, 2, 3, 4], [10, 20, 30, 40]]}
    (back,) = list(read_sessions(path))
    assert back.turns[0].images[0].marks == {"ssn": [(4, 4, 40, 14)], "name": [(1, 2, 3, 4), (10, 20, 30, 40)]}
    assert back.to_json() == marked.to_json()


@pytest.mark.parametrize("marks, message", [
    (None, r"image field 'marks' must be an object .*got NoneType"),
    ([[1, 2, 3, 4]], r"image field 'marks' must be an object .*got list"),
    ({"ssn": [1, 2, 3, 4]}, r"image field marks\['ssn'\]\[0\]: expected 4 integer pixels"),
    ({"ssn": [[1, 2, 3]]}, r"image field marks\['ssn'\]\[0\]: expected 4 integer pixels \[x0, y0, x1, y1\], got "
                           r"\[1, 2, 3\]"),
    ({"ssn": [[1.5, 2, 3, 4]]}, r"image field marks\['ssn'\]\[0\]: expected 4 integer pixels"),
    ({"ssn": [[0, 0, 5, 5], [5, 2, 3, 4]]},
     r"image field marks\['ssn'\]\[1\]: box \[5, 2, 3, 4\] must have 0 <= x0 < x1"),
    ({"ssn": [[-1, 0, 5, 5]]}, r"image field marks\['ssn'\]\[0\]: box .* must have 0 <= x0"),
    ({"ssn": "1,2,3,4"}, r"image field marks\['ssn'\] must be a list of boxes"),
    ({"ssn|phone": [[0, 0, 5, 5]]}, r"image field 'marks': label 'ssn\|phone' must be a non-empty string without"),
    ({"": [[0, 0, 5, 5]]}, r"image field 'marks': label '' must be a non-empty string"),
])
def test_bad_image_marks_are_named_with_file_line_and_field(tmp_path, doc_image_path, marks, message):
    path = write_sessions([three_turns(SessionImage.from_path(doc_image_path))], tmp_path / "s.jsonl")
    obj = json.loads(path.read_text())
    obj["turns"][0]["images"][0]["marks"] = marks
    path.write_text(json.dumps(obj) + "\n")
    with pytest.raises(SessionError, match=r"s\.jsonl:1: turns\[0\]: images\[0\]: " + message):
        list(read_sessions(path))
    with pytest.raises(SessionError, match=message):  # the same check in memory
        SessionImage(path=str(doc_image_path), marks=marks)
