"""Wall time of the whole `sflllm optimize` command (subprocess, imports included) and its phases.

    python bench/bench_optimize.py [--scenario configs/scenario-k50.yaml] [--repeats 7]

Prints the median (and min/max) wall time and CPU time of the command, the median of each phase reported in
the JSON's timings_s, and the import time of the command's modules. Timings on a shared, loaded
machine are pessimistic: compare medians taken under the same load.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND = "from sflllm.cli import app; app()"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", type=Path, default=REPO / "configs" / "scenario-k50.yaml")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    walls, cpus, phases = [], [], []
    for _ in range(args.repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        tic = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", COMMAND, "optimize", "--scenario", str(args.scenario), "--json"],
                              capture_output=True, text=True, check=True)
        walls.append(time.perf_counter() - tic)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        result = json.loads(done.stdout)
        phases.append({**result["timings_s"], "solve_time_s": result["solve_time_s"]})
    imports = []
    for _ in range(args.repeats):
        tic = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sflllm.cli, sflllm.experiments.optimize"], check=True)
        imports.append(time.perf_counter() - tic)
    bare = []
    for _ in range(args.repeats):
        tic = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.perf_counter() - tic)

    print(f"scenario: {args.scenario}  repeats: {args.repeats}")
    print(f"whole command (wall):   median {statistics.median(walls):.3f} s  "
          f"(min {min(walls):.3f}, max {max(walls):.3f})")
    print(f"whole command (CPU user+sys): median {statistics.median(cpus):.3f} s  (less sensitive to other load)")
    print(f"python + imports only:  median {statistics.median(imports):.3f} s  "
          f"(bare interpreter {statistics.median(bare):.3f} s)")
    print("phases (median, s):")
    for name in phases[0]:
        print(f"  {name:<16} {statistics.median(p[name] for p in phases):.4f}")
    print(f"result: l = {result['split_layer']}, r = {result['rank']}, T_total = {result['total_delay_s']:.2f} s; "
          + ", ".join(f"{k} {v / result['total_delay_s']:.3f}x" for k, v in result["baselines"].items()))


if __name__ == "__main__":
    main()
