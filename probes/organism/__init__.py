"""The embedded default model ("organism"): a small LLaVA trained here to read, leak/refuse and remember PII.

`default_model_path()` is the shipped HF model directory (open it with `probes.load_model`); `train.main_train`
is `mmret organism train`; `evaluate.measure` measures it; `analysis.organism_card.write_card` writes its model card.
"""

from __future__ import annotations

from pathlib import Path

from probes.models.loading import DEFAULT_MODEL


def default_model_path() -> Path:
    """The shipped model directory; a clear error when the package was installed without it."""
    if not (DEFAULT_MODEL / "model.safetensors").exists():
        raise FileNotFoundError(f"{DEFAULT_MODEL}: the default model is not there (train one with "
                                "`mmret organism train --out RUN` and copy RUN/model here)")
    return DEFAULT_MODEL
