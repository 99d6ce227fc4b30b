"""Write the notebooks of this folder from their sources in notebooks/src/: `python notebooks/build_notebooks.py`
(`--check`: only say whether the committed files are what the sources give; exit 1 if not).

A source is a Python file in jupytext's percent format (`# %%` starts a code cell, `# %% [markdown]` a markdown
cell of `# `-commented lines); what comes before its first `# %%` is the file's own header (what it is, lint
directives) and not part of the notebook. The .ipynb files are committed exactly as written here: no outputs, fixed
cell ids and metadata, so a diff of a notebook is a diff of its cells. `tests/test_notebooks.py` executes every
notebook and checks the files match their sources.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jupytext
import nbformat

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "src"
NOTEBOOKS = sorted(p.stem for p in SOURCES.glob("*.py"))
METADATA = {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
            "language_info": {"name": "python"}}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook of notebooks/src/<name>.py without outputs; cell ids are `<name>-<index>`, so rebuilding gives
    the same file."""
    text = (SOURCES / f"{name}.py").read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.startswith("# %%")), None)
    if first is None:
        raise ValueError(f"{SOURCES / name}.py: no cell marker ('# %%' or '# %% [markdown]') found")
    nb = jupytext.reads("".join(lines[first:]), fmt="py:percent")
    nb.metadata = METADATA
    for i, cell in enumerate(nb.cells):
        cell.id, cell.metadata = f"{name.replace('_', '-')}-{i}", {}
    nbformat.validate(nb)
    return nb


def render_text(name: str) -> str:
    return nbformat.writes(build(name)) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare with the committed files")
    args = ap.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = HERE / f"{name}.ipynb"
        text = render_text(name)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    extra = sorted(p.name for p in HERE.glob("*.ipynb") if p.stem not in NOTEBOOKS)
    if extra:  # a notebook without a source would never be checked
        print(f"notebooks without a source in {SOURCES}: {', '.join(extra)}", file=sys.stderr)
    if stale:
        print(f"out of date (run python notebooks/{Path(__file__).name}): {', '.join(stale)}", file=sys.stderr)
    return 1 if stale or extra else 0


if __name__ == "__main__":
    sys.exit(main())
