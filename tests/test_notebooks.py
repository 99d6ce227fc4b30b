"""The notebooks in notebooks/ run top to bottom on the embedded default model (offline, one thread, a kernel of this
interpreter), write what they say they write, and write it under $MMRET_NOTEBOOK_OUT only, and show their figures
inline from the Figure objects the figure functions return. The committed files carry no outputs and are exactly what
notebooks/build_notebooks.py writes from their sources in notebooks/src/."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
DEFAULT_CONFIG = json.loads((Path(__file__).resolve().parents[1] / "probes/organism/default/config.json").read_text())
N_LAYERS = DEFAULT_CONFIG["text_config"]["num_hidden_layers"]  # of the default model the notebooks run
KERNEL = "mmret-test"
CELL_TIMEOUT = 240

# Per notebook: files it must write (relative to $MMRET_NOTEBOOK_OUT/<notebook>), text its outputs must show and how
# many matplotlib figures it shows inline.
FIGURE = ("pdf", "png", "csv")
EXPECTED = {
    "01_quickstart": {
        "files": ["multiturn.jsonl", "store/store.json",
                  *[f"figures/quickstart_resid_norm.{x}" for x in FIGURE]],
        "outputs": ["blocks.0.hook_resid_post", "mark:ssn", f"hook_attn_out: layers {list(range(N_LAYERS))}"],
        "figures": 1,
    },
    "02_leakage": {
        "files": ["mmprivacy.jsonl", "leakage/leakage_table.csv", "leakage/leakage_table.tex",
                  "leakage/leakage_long.csv", "leak/results.csv", "leak/leakage_table.csv", "leak/leakage.png",
                  *[f"figures/leakage.{x}" for x in FIGURE], *[f"figures/leakage_memory.{x}" for x in FIGURE]],
        "outputs": ["ASR", "RR", "classification", "memory_unseen"],
        "figures": 2,
    },
    "03_probes": {
        "files": ["store/store.json", "probe_results_digits.csv",
                  "probe_results_pii_type.csv",
                  *[f"figures/{name}.{x}" for name in ("probe_heatmap_pii_type", "transfer_pii_type",
                                                        "probe_heatmap_digits", "retention_curves_digits",
                                                        "erasure_asr") for x in FIGURE]],
        "outputs": ["char_accuracy_chance", "random_subspace", "leace"],
        "figures": 5,
    },
    "04_patching": {
        "files": ["patching/patching_atp.csv", "patching/patching_atp_summary.csv", "patching/atp_agreement.csv",
                  "knockout/patching_knockout.csv",
                  *[f"figures/{name}.{x}" for name in ("patching_denoise_pii_logprob", "patching_noise_pii_logprob",
                                                        "atp_agreement_pii_logprob", "knockout_pii_logprob")
                    for x in FIGURE]],
        "outputs": ["pii_patches", "spearman", "top_k_recall"],
        "figures": 4,
    },
    "05_custom_models": {
        "files": ["tiny_qwen2_5_vl/config.json", "tiny_idefics3/config.json", "store_qwen2_5_vl/store.json",
                  "store_idefics3/store.json"],
        "outputs": ["Qwen2_5_VLForConditionalGeneration", "Idefics3ForConditionalGeneration", "gemma3"],
        "figures": 0,
    },
    "06_mitigation": {
        "files": ["patching/patching_taskswap.csv", "mitigation/mitigation_points.csv",
                  "mitigation/mitigation_hypervolume.csv",
                  *[f"figures/{n}.{x}" for n in ("mitigation_fronts", "framing_shift") for x in FIGURE]],
        "outputs": ["located: blocks.", "random layer control: blocks.", "hypervolume gain, located vs random layer"],
        "figures": 2,
    },
}


def _builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", NOTEBOOKS / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory) -> Path:
    """A kernelspec whose argv is this interpreter (the venv's), whatever `python` is on PATH."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("kernelspec")
    install(kernel_name=KERNEL, prefix=str(prefix))
    return prefix / "share" / "jupyter" / "kernels"


def run_notebook(name: str, kernel_dir: Path, tmp_path: Path, **env_extra: str) -> tuple[object, Path, Path]:
    """Execute notebooks/<name>.ipynb in a fresh kernel with cwd and outputs in tmp_path; returns (nb, out, cwd)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MMRET_CHECKPOINT"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", MMRET_NOTEBOOK_OUT=str(out), **env_extra)
    km = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    assert km.kernel_spec.argv[0] == sys.executable
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(cwd)}}).execute(env=env)
    return nb, out, cwd


def shown_text(nb) -> str:
    """Everything the executed notebook shows as text (streams, plain-text results)."""
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            parts.append(o.get("text", "") if o.output_type == "stream" else o.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def figures_shown(nb) -> int:
    """How many matplotlib figures the executed notebook shows inline: PNG outputs of a Figure object (a picture read
    back from a file, or a PIL image, shows another text/plain)."""
    return sum(1 for cell in nb.cells for o in cell.get("outputs", [])
               if "image/png" in o.get("data", {}) and o["data"].get("text/plain", "").startswith("<Figure size"))


def check_ran(nb, name: str, out: Path, cwd: Path) -> Path:
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"{name}: a code cell did not run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    assert not any(cwd.iterdir()), f"{name} wrote outside $MMRET_NOTEBOOK_OUT: {sorted(p.name for p in cwd.iterdir())}"
    assert sorted(p.name for p in out.iterdir()) == [name], f"{name} wrote outside its own folder"
    here = out / name
    missing = [f for f in EXPECTED[name]["files"] if not (here / f).is_file() or (here / f).stat().st_size == 0]
    assert not missing, f"{name} did not write {missing}"
    text = shown_text(nb)
    absent = [s for s in EXPECTED[name]["outputs"] if s not in text]
    assert not absent, f"{name}: its outputs do not show {absent}"
    assert figures_shown(nb) == EXPECTED[name]["figures"], f"{name}: shows {figures_shown(nb)} figures inline"
    return here


@pytest.mark.parametrize("name", list(EXPECTED))
def test_notebook_runs(name, kernel_dir, tmp_path):
    nb, out, cwd = run_notebook(name, kernel_dir, tmp_path)
    here = check_ran(nb, name, out, cwd)
    if name == "01_quickstart":
        from probes.activations.store import ActivationStore

        store = ActivationStore(here / "store")
        assert "quickstart-0" in store.finished_ids() and len(store.finished_ids()) == 5
        norms = pd.read_csv(here / "figures" / "quickstart_resid_norm.csv")
        assert set(norms["position_group"]) == {"image:0", "mark:ssn", "last:*"} and len(norms) == 3 * N_LAYERS
    elif name == "02_leakage":
        from probes.data.identities import make_identities

        results = pd.read_csv(here / "leak" / "results.csv")
        assert len(results) == 30 and "response" not in results.columns
        table = pd.read_csv(here / "leakage" / "leakage_table.csv")
        assert list(table["framing"]) == ["direct", "VQA", "caption", "rephrasing", "classification"]
        written = "".join(p.read_text() for p in here.rglob("*.csv")) + (here / "leakage/leakage_table.tex").read_text()
        for person in make_identities(6, seed=0):  # result files hold no PII
            assert person.ssn not in written and person.email not in written
    elif name == "03_probes":
        digits = pd.read_csv(here / "probe_results_digits.csv")
        assert {"char_accuracy", "char_accuracy_chance", "exact_match"} <= set(digits["metric"])
        assert sorted(digits.loc[digits["position_group"] == "last", "turn"].unique()) == list(range(8))
        erasure = pd.read_csv(here / "figures" / "erasure_asr.csv")
        assert set(erasure["method"]) == {"none", "leace", "random_subspace"}
        assert set(erasure["layer"]) == set(range(N_LAYERS))
    elif name == "04_patching":
        rows = pd.read_csv(here / "patching" / "patching_atp.csv")
        assert set(rows["method"]) == {"atp", "exact"} and set(rows["direction"]) == {"denoise", "noise"}
        assert rows["session_id"].nunique() == 3
    elif name == "05_custom_models":
        assert not (here / "store_checkpoint").exists()  # guarded: no MMRET_CHECKPOINT


def test_custom_models_runs_guarded_cells_on_a_checkpoint(kernel_dir, tmp_path):
    """With MMRET_CHECKPOINT set (here: the default model's directory, on the CPU), the guarded cells of
    05_custom_models load it, capture and generate."""
    from probes.activations.store import ActivationStore
    from probes.organism import DEFAULT_MODEL

    nb, out, cwd = run_notebook("05_custom_models", kernel_dir, tmp_path, MMRET_CHECKPOINT=str(DEFAULT_MODEL))
    here = check_ran(nb, "05_custom_models", out, cwd)
    store = ActivationStore(here / "store_checkpoint")
    assert len(store.finished_ids()) == 6 and store.spec["dtype"] == "float16"
    assert f"llava: {N_LAYERS} layers" in shown_text(nb)


def test_committed_notebooks_are_their_sources_without_outputs():
    builder = _builder()
    assert builder.main(["--check"]) == 0
    assert sorted(builder.NOTEBOOKS) == sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)
    for name in builder.NOTEBOOKS:
        path = NOTEBOOKS / f"{name}.ipynb"
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells
                   if c.cell_type == "code"), f"{path.name} carries outputs"
        assert path.read_text() == builder.render_text(name), f"{path.name} differs from src/{name}.py"


def test_build_reads_percent_sources(tmp_path, monkeypatch):
    """A percent-format source becomes markdown and code cells in order, its header (before the first `# %%`) left
    out; a changed source makes --check fail; a source without a cell marker is refused, naming the file."""
    builder = _builder()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "00_demo.py").write_text(
        "# header: not in the notebook\n# ruff: noqa: E402\n\n# %% [markdown]\n# # Title\n#\n# text\n\n"
        "# %%\nx = 1\n\n\ndef f():\n    return x\n\n# %%\nf()\n")
    monkeypatch.setattr(builder, "HERE", tmp_path)
    monkeypatch.setattr(builder, "SOURCES", tmp_path / "src")
    monkeypatch.setattr(builder, "NOTEBOOKS", ["00_demo"])
    nb = builder.build("00_demo")
    assert [(c.cell_type, c.source, c.id) for c in nb.cells] == [
        ("markdown", "# Title\n\ntext", "00-demo-0"), ("code", "x = 1\n\n\ndef f():\n    return x", "00-demo-1"),
        ("code", "f()", "00-demo-2")]
    assert builder.main(["--check"]) == 1  # not written yet
    assert builder.main([]) == 0 and builder.main(["--check"]) == 0
    (tmp_path / "src" / "00_demo.py").write_text("# %%\nx = 2\n")
    assert builder.main(["--check"]) == 1
    (tmp_path / "src" / "00_demo.py").write_text("x = 2\n")
    with pytest.raises(ValueError, match="00_demo.py: no cell marker"):
        builder.build("00_demo")
