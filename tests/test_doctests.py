"""Every docstring example (`>>>`) in `probes` and `analysis` runs and prints what it shows."""

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                 for pkg in ("probes", "analysis") for p in (ROOT / pkg).rglob("*.py")
                 if ">>>" in p.read_text(encoding="utf-8"))


def test_some_module_has_examples():
    assert MODULES  # the check below would pass vacuously otherwise


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, f"{name}: {result.failed} of {result.attempted} failed"
