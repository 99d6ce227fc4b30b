"""GPU check: every GPU figure the issues ask for, measured side by side in one run; prints `name: value` lines.

    python benchmarks/gpu_check.py --device cuda [--out DIR]   # the real sizes, under 8 minutes on one GPU
    python benchmarks/gpu_check.py --device cpu --quick         # tiny sizes: shows the script works (tests run it)

Needs: a CUDA build of torch and the project's own dependencies, less the ones this script never imports: torch,
transformers (<5.24, as pyproject.toml pins), tokenizers, safetensors, numpy, pandas, scikit-learn, threadpoolctl,
jaxtyping, pillow and tqdm. Faker, transformer-lens, beartype, submitit, openpyxl, concept-erasure and rapidocr are
not needed (checked by running it with them unimportable), so a stock PyTorch CUDA image runs it from a checkout, the
project uninstalled (the checkout is put on sys.path). Nothing is downloaded: the model is random-initialised from
transformers' config classes into a temporary folder, the two people on the form are made up here, and
HF_HUB_OFFLINE=1 is set. `--out DIR` also writes DIR/gpu_check.json (the same figures, nan as null).

Header: torch_version, device, device_name, dtype (bfloat16 where the GPU supports it, else float32), cpu_cores.

Probe fitting (issue 5's target for `fit_probes` against sklearn: a speedup >= 20 on a GPU). The data is that of
benchmarks/probes_fit.py: 192 cells of synthetic activations, d 256, 2,000 examples in 200 identity groups of 10,
10 classes, each cell with the class signal at its own strength (none to easy), Gaussian noise and per-identity
offsets. Both sides: the same 5 grouped folds, C grid, L2 multinomial logreg with intercept, C chosen by mean
held-out accuracy (flat CV, `nested=False`: what LogisticRegressionCV does), refit, lbfgs stopping at tol 1e-4 or
100 iterations. sklearn runs one thread (its fastest, see probes_fit.py) on cells spread evenly over the sweep, half
before and half after the batched fit; its time is scaled to every fitted cell.

    probe_fit_batched_seconds          fit_probes over all fitted cells (probe_fit_cells), batched on the device
    probe_fit_sklearn_loop_seconds     a loop of LogisticRegressionCV, one cell at a time, scaled to the same cells
    probe_fit_speedup                  sklearn loop / batched
    probe_fit_accuracy_max_abs_diff    largest |batched - sklearn| mean held-out accuracy over the compared cells
                                       (probe_fit_compared_cells), each at its own chosen C: both fit the same model
    probe_fit_batched_nested_seconds   fit_probes' default protocol (nested CV) over the same cells (nan when the
                                       time guard leaves it out)

Patching (benchmarks/patching.py's targets: batched_vs_serial_exact >= 3, atp_vs_exact_cost <= 0.1), on a
llava-shaped model at d_model 896 (8 LM layers, 14 heads, CLIP 4 layers, 336 px / patch 14 = 576 image tokens), one
image pair (a form and the same form with another identity's values) in a 3-message session; cells = 3 components
(resid_pre, attn_out, mlp_out) x every layer x 6 position groups. The pair is rendered once; each sweep runs from
its two unpatched forwards (prepare_pair) to its rows. Times are medians of interleaved repeats.

    patching_batched_seconds       exact patching of every cell, `patch_batch` cells per forward
    patching_serial_seconds        the same, one cell per forward
    patching_batched_speedup       serial / batched
    patching_batched_max_abs_diff  largest |batched - serial| logit difference over the cells: the same numbers, so
                                   0 up to the dtype's rounding (float32 on a CPU: 0; bf16: about
                                   patching_logit_diff_max_abs x 2^-8 or a few times that, as the batch changes the
                                   kernels); patching_logit_diff_spread, the range over cells, shows they differ
    patching_atp_seconds, patching_atp_vs_exact_cost   attribution patching of the same cells / exact batched

Capture (issue 20's figures for planning a large run) on the same model: sessions of 8 messages with one image,
resid_post of every layer at every position kept (float32 on the host, as `capture` stores it).

    capture_vs_plain_forward          one session's capture / a plain forward of the same tokens (target <= 1.10)
    capture_positions_per_second      positions captured per second, `capture_batch` sessions batched
    capture_hours_per_1000_sessions   1,000 such sessions on this device at that rate

Time guard: a pilot of each part sets its size (probe cells, sklearn cells, repeats) so that the whole run stays
within `--budget-s` (default 450 s, counted from the start of the imports; a part's first round runs whatever is
left, hence the margin under 8 minutes); `total_seconds` is printed last. A part that fails prints `# <part>
failed: ...` and its figures as nan, and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

STARTED = time.perf_counter()  # before the heavy imports: total_seconds counts them
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from probes import (  # noqa: E402
    Session,
    SessionImage,
    Turn,
    build_tiny_model,
    capture_session,
    load_model,
    render,
    resolve_hooks,
)
from probes.activations.capture import capture_batch  # noqa: E402
from probes.data.builders import multiturn_sessions  # noqa: E402
from probes.data.identities import Identity  # noqa: E402
from probes.patching import attribution_patching, build_pair, exact_patching, prepare_pair, sweep_cells  # noqa: E402
from probes.probing.linear import DEFAULT_CS, fit_probes, grouped_folds  # noqa: E402

GROUPS = ("pii_patches", "other_image", "turn0", "turn1", "turn2", "final")
COMPONENTS = ("resid_pre", "attn_out", "mlp_out")


@dataclass(frozen=True)
class Sizes:
    """What one run measures: the probe sweep, the model, the sessions and the most repeats."""

    cells: int  # probe sweep: cells, identity groups x examples per group, width, classes
    n_groups: int
    per_group: int
    d_probe: int
    n_classes: int
    sklearn_cells: int  # most cells the sklearn loop runs on
    model: dict = field(default_factory=dict)  # build_tiny_model("llava", ...) overrides
    doc_px: int = 336  # rendered document size
    turns: int = 8  # messages of a capture session
    capture_batch: int = 8
    patch_batch: int = 32  # cells per batched patching forward
    patch_groups: tuple = GROUPS  # position groups patched (those present on both sides of the pair)
    repeats: int = 5  # most timing rounds


FULL = Sizes(cells=192, n_groups=200, per_group=10, d_probe=256, n_classes=10, sklearn_cells=16,
             model=dict(n_layers=8, d_model=896, n_heads=14, image_size=336, patch_size=14, vision_layers=4,
                        d_vision=448))
QUICK = Sizes(cells=4, n_groups=30, per_group=4, d_probe=16, n_classes=3, sklearn_cells=2,
              model=dict(n_layers=2, d_model=64, n_heads=4, image_size=32, patch_size=8, vision_layers=1,
                         d_vision=32),
              doc_px=64, turns=3, capture_batch=2, patch_batch=4, patch_groups=("pii_patches", "final"), repeats=1)


class Budget:
    """The run's time limit: each part gets a share of what is left when it starts."""

    def __init__(self, seconds: float, start: float | None = None):
        self.start = time.perf_counter() if start is None else start
        self.seconds = float(seconds)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def deadline(self, share: float) -> float:
        """A perf_counter time: now + `share` of what is left (never in the past)."""
        return time.perf_counter() + max(0.0, share * self.left())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def interleaved_until(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                      deadline: float) -> tuple[dict[str, float], dict[str, object]]:
    """Median time of each function over round-robin rounds (one warm-up call each first): `repeats` rounds, fewer
    when `deadline` passes (one at least). Also each function's last output."""
    last = {k: fn() for k, fn in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for k, fn in fns.items():
            t, last[k] = timed(fn, device)
            times[k].append(t)
        if time.perf_counter() > deadline:
            break
    return {k: statistics.median(v) for k, v in times.items()}, last


def plan_cells(n_cells: int, seconds_per_cell: float, available_s: float, chunk: int) -> int:
    """How many cells (a multiple of `chunk`, at least one chunk, at most n_cells) fit in `available_s`."""
    fit = int(available_s / max(seconds_per_cell, 1e-9)) // chunk * chunk
    return int(min(n_cells, max(chunk, fit)))


def spread(n: int, k: int) -> np.ndarray:
    """k indices spread evenly over range(n) (fewer when n < k)."""
    return np.unique(np.linspace(0, n - 1, max(1, min(k, n))).round().astype(int))


# ---- probe fitting ----------------------------------------------------------------------------------------------
def make_sweep(sizes: Sizes, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """X [cell, n, d] float32, y [n], groups [n]: the label belongs to the identity (as a PII digit does); cell c
    holds the class signal at strength 1.2 (c / (cells - 1))^2, from none (chance) to easily decodable."""
    g = torch.Generator().manual_seed(seed)
    n, d = sizes.n_groups * sizes.per_group, sizes.d_probe
    groups = np.repeat(np.arange(sizes.n_groups), sizes.per_group)
    y = torch.randint(0, sizes.n_classes, (sizes.n_groups,), generator=g)[torch.as_tensor(groups)]
    strength = 1.2 * torch.linspace(0, 1, sizes.cells) ** 2
    class_dirs = torch.randn(sizes.n_classes, d, generator=g)
    offsets = 0.5 * torch.randn(sizes.n_groups, d, generator=g)[torch.as_tensor(groups)]
    X = torch.randn(sizes.cells, n, d, generator=g)
    X += offsets + strength[:, None, None] * class_dirs[y]
    X += 3.0 * torch.randn(d, generator=g)  # features with a mean, as real activations have
    return X, y, groups


def sklearn_cell(X: np.ndarray, y: np.ndarray, folds: list, Cs: np.ndarray) -> tuple[float, float]:
    """(chosen C, mean held-out accuracy at it) of LogisticRegressionCV on one cell, X standardised on all
    examples (it cannot scale inside its folds). Works with sklearn's new (1.8+) and legacy attributes."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    kw = dict(Cs=Cs, cv=folds, solver="lbfgs", scoring="accuracy", tol=1e-4, max_iter=100)
    if "use_legacy_attributes" in inspect.signature(LogisticRegressionCV).parameters:
        kw.update(l1_ratios=(0.0,), use_legacy_attributes=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)
        m = LogisticRegressionCV(**kw).fit(StandardScaler().fit_transform(X.astype(np.float64)), y)
    scores = next(iter(m.scores_.values())) if isinstance(m.scores_, dict) else m.scores_
    C = float(np.ravel(m.C_)[0])
    best = int(np.flatnonzero(np.isclose(m.Cs_, C))[0])
    return C, float(scores.reshape(len(folds), -1)[:, best].mean())


def sklearn_loop(X: torch.Tensor, y: np.ndarray, folds: list, cells: np.ndarray,
                 until: float) -> tuple[float, dict[int, float]]:
    """(seconds, held-out accuracy per cell): one cell at a time, one thread, stopping at `until` (one cell at
    least)."""
    from threadpoolctl import threadpool_limits

    out, t0 = {}, time.perf_counter()
    with threadpool_limits(1):
        for c in cells:
            out[int(c)] = sklearn_cell(X[c].numpy(), y, folds, DEFAULT_CS)[1]
            if time.perf_counter() > until:
                break
    return time.perf_counter() - t0, out


def probe_figures(sizes: Sizes, device: torch.device, budget: Budget, share: float,
                  cells_per_batch: int = 16) -> dict[str, float]:
    deadline = budget.deadline(share)
    X, y, groups = make_sweep(sizes)
    yn, folds, chunk = y.numpy(), grouped_folds(groups), min(16, sizes.cells)

    def batched(n: int, nested: bool = False):
        return fit_probes(X[:n], y, groups, device=device, cells_per_batch=chunk, nested=nested)

    # warm-ups: kernels and allocator, then scipy and BLAS for sklearn; their times plan the sweep
    few = slice(0, 5 * sizes.per_group * 4)  # 20 identities: enough for 5 folds
    fit_probes(X[:1, few], y[few], groups[few], device=device, nested=False)
    pilot, _ = timed(lambda: batched(chunk), device)
    sklearn_loop(X, yn, folds, np.array([0]), 0.0)
    available = deadline - time.perf_counter()
    # an eighth of the part for the flat fit, about 3/8 for the nested one (about 3x the work), a quarter sklearn
    n_fit = plan_cells(sizes.cells, pilot / chunk, available / 8, chunk)
    compare = spread(n_fit, sizes.sklearn_cells)
    s1, sk = sklearn_loop(X, yn, folds, compare[::2], time.perf_counter() + available / 8)
    t_batched, fit = timed(lambda: batched(n_fit), device)
    s2, sk2 = sklearn_loop(X, yn, folds, compare[1::2], time.perf_counter() + available / 8)
    sk.update(sk2)
    fits_in_time = time.perf_counter() + 4 * t_batched < deadline  # nested CV is about 3x the flat fit's work
    t_nested = timed(lambda: batched(n_fit, nested=True), device)[0] if fits_in_time else math.nan
    t_sklearn = (s1 + s2) / len(sk) * n_fit
    per_cell = fit.table.groupby("cell").accuracy.mean()
    diff = max(abs(per_cell[c] - acc) for c, acc in sk.items())
    return {"probe_fit_cells": n_fit, "probe_fit_compared_cells": len(sk),
            "probe_fit_batched_seconds": t_batched, "probe_fit_sklearn_loop_seconds": t_sklearn,
            "probe_fit_speedup": t_sklearn / t_batched, "probe_fit_accuracy_max_abs_diff": diff,
            "probe_fit_batched_nested_seconds": t_nested}


# ---- patching ---------------------------------------------------------------------------------------------------
def placeholder_identities() -> list[Identity]:
    """Two made-up people in the benchmark's formats, written here rather than drawn with Faker, which a bare CUDA
    image lacks (the figures do not depend on who is on the form)."""
    def person(i: int, name: str, gender: str) -> Identity:
        return Identity(identity_id=f"gpu-check-{i}", name=name, gender=gender, date_of_birth=f"1980-0{i + 1}-1{i}",
                        address=f"{10 + i} Example Street, Springfield, ST 0000{i}", email=f"person{i}@example.com",
                        phone=f"(555) 010-000{i}", ssn=f"{900 + i}-0{i}-000{i + 1}")
    return [person(0, "Alex Example", "Female"), person(1, "Sam Placeholder", "Male")]


def patching_figures(loaded, sizes: Sizes, scratch: Path, budget: Budget, share: float) -> dict[str, float]:
    deadline = budget.deadline(share)
    people = placeholder_identities()
    session = multiturn_sessions(people[:1], scratch / "img", k_distractors=[0], reshow=[False],
                                 framing_pairs=[("direct", "caption")], pii_types=["SSN"], scenarios=["open"],
                                 size=sizes.doc_px)[0]
    pair = build_pair(loaded, session, "image", other=people[1])  # rendered once: the sweeps are the device's work
    groups = [g for g in sizes.patch_groups if all(len(run.group(g)) for run in (pair.clean, pair.corrupt))]
    cells = sweep_cells(loaded.n_layers, COMPONENTS, groups)
    hooks = sorted({c.hook for c in cells})

    def exact(batch: int):
        return exact_patching(loaded, prepare_pair(loaded, pair, hooks), cells, "denoise", batch_size=batch)

    def atp():
        return attribution_patching(prepare_pair(loaded, pair, hooks, grad={"corrupt"}), cells, "denoise")

    t, rows = interleaved_until({"batched": lambda: exact(sizes.patch_batch), "serial": lambda: exact(1),
                                 "atp": atp}, loaded.device, sizes.repeats, deadline)

    def logit_diffs(out) -> np.ndarray:
        return np.array([r["value"] for r in out if r["metric"] == "logit_diff"])

    batched, serial = logit_diffs(rows["batched"]), logit_diffs(rows["serial"])
    return {"patching_cells": len(cells), "patching_positions": pair.clean.n, "patching_batch": sizes.patch_batch,
            "patching_batched_seconds": t["batched"], "patching_serial_seconds": t["serial"],
            "patching_batched_speedup": t["serial"] / t["batched"],
            "patching_batched_max_abs_diff": float(np.abs(batched - serial).max()),
            "patching_logit_diff_spread": float(serial.max() - serial.min()),
            "patching_logit_diff_max_abs": float(np.abs(serial).max()),
            "patching_atp_seconds": t["atp"], "patching_atp_vs_exact_cost": t["atp"] / t["batched"]}


# ---- capture ----------------------------------------------------------------------------------------------------
def capture_session_of(sizes: Sizes, seed: int) -> Session:
    """A session of `sizes.turns` messages, the first with a form image (fake digits), the rest text."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (sizes.doc_px, sizes.doc_px), "white")
    ImageDraw.Draw(img).text((4, sizes.doc_px // 2), f"SSN 000-00-{seed:04d}", fill="black")
    turns = [Turn("user", "Here is my application form. Please read it carefully and keep it.",
                  images=[SessionImage.from_pil(img)])]
    for i in range(1, sizes.turns):
        role = "assistant" if i % 2 else "user"
        turns.append(Turn(role, f"This is message {i} of our conversation about the weather and other things."))
    return Session(f"gpu-check-{seed}", turns)


def capture_figures(loaded, sizes: Sizes, budget: Budget, share: float) -> dict[str, float]:
    deadline = budget.deadline(share)
    hooks = resolve_hooks(loaded, "resid_post")
    batch = [capture_session_of(sizes, seed) for seed in range(sizes.capture_batch)]
    rendered = [render(loaded.adapter, s) for s in batch]
    one, one_r = batch[0], rendered[0]
    plain_kw = {"input_ids": one_r.input_ids.to(loaded.device), "logits_to_keep": 1,
                **{k: v.to(loaded.device) if isinstance(v, torch.Tensor) else v
                   for k, v in loaded.adapter.image_inputs(one_r.images).items()}}
    with torch.no_grad():
        t, _ = interleaved_until({
            "plain": lambda: loaded.hf_model(**plain_kw),
            "capture": lambda: capture_session(loaded, one, hooks, "all", rendered=one_r),
            "batch": lambda: capture_batch(loaded, batch, hooks, "all", mode="auto", rendered=rendered),
        }, loaded.device, sizes.repeats, deadline)
    positions = sum(r.n_positions for r in rendered)
    return {"capture_session_positions": one_r.n_positions, "capture_layers": len(hooks),
            "capture_batch_sessions": len(batch), "capture_plain_forward_seconds": t["plain"],
            "capture_seconds": t["capture"], "capture_vs_plain_forward": t["capture"] / t["plain"],
            "capture_positions_per_second": positions / t["batch"],
            "capture_hours_per_1000_sessions": 1000 * t["batch"] / len(batch) / 3600}


# ---- the run ----------------------------------------------------------------------------------------------------
PARTS = {  # part -> the figures it prints (as nan when it fails)
    "probe_fit": ("probe_fit_cells", "probe_fit_compared_cells", "probe_fit_batched_seconds",
                  "probe_fit_sklearn_loop_seconds", "probe_fit_speedup", "probe_fit_accuracy_max_abs_diff",
                  "probe_fit_batched_nested_seconds"),
    "model": ("model_build_seconds",),
    "patching": ("patching_cells", "patching_positions", "patching_batch", "patching_batched_seconds",
                 "patching_serial_seconds", "patching_batched_speedup", "patching_batched_max_abs_diff",
                 "patching_logit_diff_spread", "patching_logit_diff_max_abs", "patching_atp_seconds",
                 "patching_atp_vs_exact_cost"),
    "capture": ("capture_session_positions", "capture_layers", "capture_batch_sessions",
                "capture_plain_forward_seconds", "capture_seconds", "capture_vs_plain_forward",
                "capture_positions_per_second", "capture_hours_per_1000_sessions"),
}
FIGURES = tuple(name for names in PARTS.values() for name in names) + ("total_seconds",)


def header(device: torch.device, dtype: torch.dtype, quick: bool) -> dict[str, str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"torch_version": torch.__version__, "device": str(device), "device_name": name,
            "dtype": str(dtype).removeprefix("torch."), "cpu_cores": str(os.cpu_count()),
            "torch_threads": str(torch.get_num_threads()), "sizes": "quick" if quick else "full"}


def run_part(name: str, fn: Callable[[], dict[str, float]], out: dict[str, float]) -> bool:
    """Print the part's figures as they come; a failure prints `# <part> failed: ...` and its figures as nan."""
    try:
        got = fn()
    except Exception as e:  # noqa: BLE001  (one part's failure must not cost the others their device time)
        print(f"# {name} failed: {type(e).__name__}: {e}", flush=True)
        got = {k: math.nan for k in PARTS[name]}
    for k, v in got.items():
        out[k] = float(v)
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}", flush=True)
    return all(math.isfinite(float(v)) or k == "probe_fit_batched_nested_seconds" for k, v in got.items())


def choose_dtype(device: torch.device, name: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def write_json(out_dir: Path, head: dict[str, str], figures: dict[str, float]) -> Path:
    """out_dir/gpu_check.json, written whole or not at all (a temporary file renamed into place)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_check.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".gpu_check.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"header": head, "figures": {k: (v if math.isfinite(v) else None) for k, v in figures.items()}},
                      f, indent=1)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="the model's dtype (auto: bfloat16 where the GPU supports it, else float32)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a check that the script works, ~1 minute)")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="time limit of the whole run, imports included (default 7.5 minutes: each part's first "
                         "round runs whatever is left, so 8 minutes hold)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--cells-per-batch", type=int, default=16, help="fit_probes' cells solved together (its default)")
    ap.add_argument("--out", default=None, help="also write the figures to OUT/gpu_check.json")
    args = ap.parse_args(argv)
    budget = Budget(args.budget_s, STARTED if __name__ == "__main__" else None)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    sizes, dtype = (QUICK if args.quick else FULL), choose_dtype(device, args.dtype)
    head = header(device, dtype, args.quick)
    for k, v in head.items():
        print(f"{k}: {v}", flush=True)
    torch.manual_seed(0)
    figures: dict[str, float] = {}
    ok = run_part("probe_fit", lambda: probe_figures(sizes, device, budget, 0.4, args.cells_per_batch), figures)
    with tempfile.TemporaryDirectory(prefix="mmret-gpu-check-") as scratch:
        holder = {}

        def build() -> dict[str, float]:
            t0 = time.perf_counter()
            path = build_tiny_model("llava", Path(scratch) / "llava", **sizes.model)
            holder["loaded"] = load_model(path, device=device, dtype=dtype)
            return {"model_build_seconds": time.perf_counter() - t0}

        ok &= run_part("model", build, figures)
        if "loaded" in holder:
            loaded = holder["loaded"]
            ok &= run_part("patching", lambda: patching_figures(loaded, sizes, Path(scratch), budget, 0.6), figures)
            ok &= run_part("capture", lambda: capture_figures(loaded, sizes, budget, 0.8), figures)
        else:
            for part in ("patching", "capture"):
                ok &= run_part(part, lambda: {k: math.nan for k in PARTS[part]}, figures)
    figures["total_seconds"] = budget.seconds - budget.left()
    print(f"total_seconds: {figures['total_seconds']:.4g}", flush=True)
    if args.out:
        print(f"# wrote {write_json(Path(args.out), head, figures)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
