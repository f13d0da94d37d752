"""Wall and CPU time of the offline default `sflllm run` (subprocess, imports included), and its split.

    python bench/bench_run.py [--repeats 1]

Prints the wall and CPU (user + system) seconds of the whole command, the measured training time
summed over the trained (l, r) pairs (from metrics.json), the number of pairs and rounds, and the
headline. On a shared, loaded machine wall time exceeds CPU time; CPU time is what a quiet 2-core
machine would need (the demo trains on one thread).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMAND = "from sflllm.cli import app; app()"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            tic = time.perf_counter()
            subprocess.run([sys.executable, "-c", COMMAND, "run", "--quiet", "--output", str(out)],
                           capture_output=True, text=True, check=True)
            wall = time.perf_counter() - tic
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            metrics = json.loads((out / "metrics.json").read_text())
            training = sum(r["wall_time_s"] for pair in metrics["pairs"].values() for r in pair["rounds"])
            print(f"sflllm run (offline default): wall {wall:.1f} s, CPU {cpu:.1f} s; training {training:.1f} s wall "
                  f"over {len(metrics['pairs'])} (l, r) x {metrics['rounds']} rounds")
            for row in metrics["headline"]:
                reduction = row["reduction_by_proposed"]
                print(f"  {row['method']:>18} (l={row['split_layer']}, r={row['rank']}): time to target "
                      f"{row['time_to_target_s']:.4g} s" + ("" if reduction is None else f", reduction {100 * reduction:.1f}%"))


if __name__ == "__main__":
    main()
