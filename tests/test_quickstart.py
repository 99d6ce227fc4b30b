"""The README's quickstart runs as written: its python block and its command-line block, offline, in a fresh
folder, on the embedded model and a form the toolkit draws."""

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_blocks(language: str) -> list[str]:
    """The ```language blocks between the '## Quickstart' heading and the next '## ' heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index("## Quickstart")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end >= 0 else len(text)]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """The lines of a bash block as argument lists (a trailing '\\' continues a line; '#' starts a comment)."""
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if shlex.split(line, comments=True)]


def test_the_quickstart_has_one_python_and_one_bash_block():
    assert len(quickstart_blocks("python")) == 1 and len(quickstart_blocks("bash")) == 1


def test_python_quickstart_runs(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(quickstart_blocks("python")[0], "README.md (quickstart)", "exec"), scope)
    x, meta = scope["x"], scope["meta"]
    loaded = scope["loaded"]
    # the asked turn's last position, at every layer of the embedded model
    assert tuple(x.shape) == (1, loaded.n_layers, loaded.d_model) and len(meta) == 1
    assert (tmp_path / "store" / "store.json").exists()
    groups = set(scope["store"].manifest["groups"].str.split(",").explode())
    assert {"last:*", "mark:ssn", "image:0"} <= groups  # every part of the selector kept positions


def test_command_line_quickstart_runs(tmp_path, monkeypatch, capsys, one_thread):
    from analysis.cli import main

    monkeypatch.chdir(tmp_path)
    cmds = commands(quickstart_blocks("bash")[0])
    assert cmds and all(c[0] == "mmret" for c in cmds)
    for argv in cmds:
        extra = ["--no-progress"] if argv[1] in ("capture", "leak") else []
        assert main(argv[1:] + extra) == 0, argv
    printed = capsys.readouterr().out
    assert "sessions:" in printed and "ASR" in printed
    assert (tmp_path / "results" / "leak" / "results.csv").exists()
    assert (tmp_path / "tiny-qwen" / "config.json").exists()
