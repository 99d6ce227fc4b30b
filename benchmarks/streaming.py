"""A probe sweep streamed from disk under a memory cap, side by side with the in-memory sweep on the same store
(issue 20, item 4): a store about 3x the cap, captured from a tiny random llava widened to 8 layers x 256.

    python benchmarks/streaming.py [--cap-mb 32] [--work /tmp/streaming]

    streamed_sweep_peak_mb       peak resident memory the streamed sweep added (probe_sweep_streamed)
    in_memory_sweep_peak_mb      the same for probe_sweep(probe_cells(...)), which reads every layer at once
    memory_cap_mb                the cap given to the streamed sweep
    store_mb                     the store's size on disk (tensors and manifest)
    max_abs_accuracy_diff        largest |difference| of any result value between the two (0: the same)

    streamed_budget_mb           what `stream_budget` estimated the streamed sweep holds at its peak (<= the cap)
    streamed_plan_mb             of which the plan (`CellPlan.nbytes`: sessions, positions, blocks, labels)
    streamed_reserved_mb         of which the plan, the result rows and the allocators' slack (an eighth of the cap)

How peak memory is measured: each sweep runs in a fresh interpreter. First it runs a tiny warm-up sweep of the
same code path (every session, one layer of eight; `probe_sweep_streamed` for the streamed measurement,
`probe_sweep` of `probe_cells` for the in-memory one; every session, so that the solver runs at the same size),
so that the libraries' code pages, lazily built tables and thread pools
(pyarrow's dataset scanner, torch's linear algebra) are resident before the measurement: without it about 40 MB
of the streamed sweep's peak on a 95 MB store was code and allocator pools touched for the first time, not data.
Then the garbage collector runs, glibc's `malloc_trim(0)` and pyarrow's `release_unused()` give freed memory back
(so the warm-up leaves no free heap the sweep could reuse unseen), the kernel's peak resident size is reset
(`/proc/self/clear_refs` 5) and the resident size read (VmRSS); after the sweep (plan included), the peak
(VmHWM) minus that. Not ru_maxrss (it keeps a peak reached before the sweep), and not tracemalloc: it sees
only Python's and numpy's allocations, not torch's CPU tensors (the activations) nor the pages safetensors maps
in, and both are what the cap is about.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["last", "image", "final"]
KW = dict(target="label:cls", method="ridge", n_folds=5, n_boot=0)


def build_store(work: Path, target_mb: float) -> Path:
    """A store of about `target_mb` MB: sessions with a document image, every position captured at 8 layers."""
    from probes import ActivationStore, Session, SessionImage, Turn, capture, load_model
    from probes.models.tiny import build_tiny_model
    from tests.conftest import document_image

    store = work / "store"
    if (store / "store.json").exists() and _size_mb(store) >= target_mb:
        return store
    model = build_tiny_model("llava", work / "model", n_layers=8, d_model=256)
    loaded = load_model(model)
    img = work / "doc.png"
    document_image().save(img)
    per_session = 8 * 256 * 4 * 100 / 2 ** 20  # ~106 positions of 8 layers x 256 float32: a little over target
    sessions = [Session(f"s{i:04d}", [Turn("user", f"Form {i}: code {i % 7}.", images=[SessionImage.from_path(img)]),
                                      Turn("assistant", "Ok."), Turn("user", f"Which code {i % 3}?")],
                        labels={"identity_id": f"id{i}", "cls": str(i % 3)})
                for i in range(int(target_mb / per_session) + 1)]
    capture(loaded, sessions, str(store), positions="all", dtype="float32", progress=False)
    _ = ActivationStore(store).manifest  # consolidated once here: neither measured sweep pays for it
    return store


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2 ** 20


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _settle() -> None:
    """Give freed memory back to the system, so that the baseline holds no free heap the sweep could reuse."""
    import ctypes
    import gc

    import pyarrow as pa

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    pa.default_memory_pool().release_unused()


def _sweep(store, targets, mode: str, cap_mb: float, **where):
    """One sweep of `mode` (`where`: plan_cells/probe_cells' sessions and layers, for the warm-up)."""
    from probes.probing.stream import probe_sweep_streamed
    from probes.probing.sweep import probe_sweep
    from probes.probing.targets import plan_cells, probe_cells

    if mode == "streamed":
        return probe_sweep_streamed(plan_cells(store, GROUPS, **where), targets, max_memory_mb=cap_mb, **KW)
    return probe_sweep(probe_cells(store, GROUPS, **where), targets, **KW)


def child(store_dir: str, mode: str, cap_mb: float, out: str) -> None:
    """One sweep in this process, after a warm-up (module docstring): write its results to `out` and print its
    peak above the pre-sweep baseline."""
    from probes import ActivationStore
    from probes.probing.stream import stream_budget
    from probes.probing.sweep import SweepConfig
    from probes.probing.targets import plan_cells, session_targets

    store = ActivationStore(store_dir)
    targets = session_targets(store.sessions(), "label:cls")
    _sweep(store, targets, mode, cap_mb, layers=store.layers()[:1])
    _settle()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak, to the resident size now
    base = _status_mb("VmRSS")
    df = _sweep(store, targets, mode, cap_mb)
    peak = _status_mb("VmHWM")
    df.to_csv(out, index=False)
    figures = {"peak_mb": peak - base, "base_mb": base, "mode": mode}
    if mode == "streamed":  # the estimate the split was made from (computed again, after the measurement)
        plan = plan_cells(store, GROUPS)
        budget = stream_budget(plan, 1, int(targets[0].max()) + 1, cap_mb, SweepConfig(**KW), len(targets[2]))
        figures.update(budget_mb=budget.total / 2 ** 20, plan_mb=plan.nbytes() / 2 ** 20,
                       reserved_mb=budget.reserved / 2 ** 20)
    print(json.dumps(figures))


def measure(work: str | Path = "/tmp/streaming", cap_mb: float = 32.0) -> dict[str, float]:
    """Build (or reuse) a store of 3x `cap_mb`, run both sweeps in fresh interpreters, return the figures."""
    import pandas as pd

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    store = build_store(work, 3 * cap_mb)
    figures, tables = {}, {}
    for mode in ("in_memory", "streamed"):
        out = work / f"{mode}.csv"
        res = subprocess.run([sys.executable, __file__, "--child", mode, "--store", str(store), "--cap-mb",
                              str(cap_mb), "--out", str(out)], capture_output=True, text=True, cwd=ROOT, check=True)
        figures[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        tables[mode] = pd.read_csv(out)
    a, b = tables["in_memory"], tables["streamed"]
    same_cells = a[["layer", "position_group", "turn", "target", "metric"]].equals(
        b[["layer", "position_group", "turn", "target", "metric"]])
    streamed = figures["streamed"]
    return {"streamed_sweep_peak_mb": streamed["peak_mb"], "in_memory_sweep_peak_mb": figures["in_memory"]["peak_mb"],
            "memory_cap_mb": cap_mb, "streamed_budget_mb": streamed["budget_mb"], "streamed_plan_mb": streamed["plan_mb"],
            "streamed_reserved_mb": streamed["reserved_mb"],
            "store_mb": _size_mb(store), "same_rows": float(same_cells),
            "max_abs_accuracy_diff": float((a["value"] - b["value"]).abs().max()) if same_cells else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cap-mb", type=float, default=32.0)
    ap.add_argument("--work", default="/tmp/streaming")
    ap.add_argument("--child", choices=["in_memory", "streamed"])
    ap.add_argument("--store")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.child:
        child(a.store, a.child, a.cap_mb, a.out)
        return
    for name, value in measure(a.work, a.cap_mb).items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
