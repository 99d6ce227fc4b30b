"""How long `import probes` takes now that its names load on first use, side by side with importing every module of
the package (what the eager `probes/__init__` used to do), each in a fresh interpreter (issue 17).

    python benchmarks/import_time.py [--repeats 5]

    import_probes_seconds            median of `import probes`
    import_all_modules_seconds       median of importing every module under probes/
    import_probes_vs_all_modules     the ratio (lower is better)
    import_study_config_loads_torch  whether `import analysis.study.config` (mmret study validate) loads torch (0/1)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALL = "import pkgutil, importlib, probes\nfor m in pkgutil.walk_packages(probes.__path__, 'probes.'): importlib.import_module(m.name)"


def seconds(code: str) -> float:
    timed = f"import time\nt = time.perf_counter()\n{code}\nprint(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", timed], capture_output=True, text=True, cwd=ROOT,
                                check=True).stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    lazy = statistics.median(seconds("import probes") for _ in range(a.repeats))
    eager = statistics.median(seconds(ALL) for _ in range(a.repeats))
    torch = subprocess.run([sys.executable, "-c", "import sys, analysis.study.config; print(int('torch' in sys.modules))"],
                           capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
    print(f"import_probes_seconds: {lazy:.4f}")
    print(f"import_all_modules_seconds: {eager:.4f}")
    print(f"import_probes_vs_all_modules: {lazy / eager:.4f}")
    print(f"import_study_config_loads_torch: {torch}")


if __name__ == "__main__":
    main()
