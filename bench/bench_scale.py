"""Time and peak memory of `sflllm optimize --json` as the network grows, with a log-log plot.

    python bench/bench_scale.py [--clients 50 200 1000] [--ratio 2.73] [--repeats 3] [--plot scale.png]

For each K it writes a scenario (configs/scenario-k50.yaml's shape: K clients, M = N = round(ratio K)
subchannels, everything else at the spec defaults) and runs, each in a fresh process:

* "all methods": the whole command, ``sflllm optimize --scenario FILE --json`` (proposed and every
  baseline, the JSON on stdout);
* "proposed alone": the same steps with only the proposed method (load, realise, solve, spec §8 JSON
  of the solution without the baselines), since the command always runs every baseline.

It prints the median wall time, the median CPU time (user + sys, less sensitive to other load) and
the peak resident memory of each process (``os.wait4``), and fits the growth exponent a of
time ~ K^a and memory ~ K^a (least squares on the logs).  ``--plot PATH`` writes both on log-log
axes as a PNG.  Timings on a shared machine are pessimistic: compare runs taken under the same load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

COMMAND = "from sflllm.cli import app; app()"
PROPOSED_ALONE = """
import sys
from pathlib import Path
import orjson
from sflllm.allocation.optimize import Optimiser, build_problem, check_size
from sflllm.allocation.report import plain, scenario_json
from sflllm.allocation.scenario import load_scenario, realise
scenario = load_scenario(Path(sys.argv[1]))
check_size(scenario)
realised = realise(scenario)
solution = Optimiser(build_problem(realised)).proposed()
result = {"split_layer": solution.split_layer, "rank": solution.rank, "total_delay_s": solution.total_delay_s,
          "assignment_ms": solution.ms.owner, "assignment_fs": solution.fs.owner,
          "power_ms_w": solution.ms.power_w, "power_fs_w": solution.fs.power_w}
result = plain(result)
result["scenario"] = scenario_json(realised.scenario)
sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS))
"""
MODES = {"all methods": [COMMAND, "optimize", "--json", "--scenario"], "proposed alone": [PROPOSED_ALONE]}


def run_once(argv: list[str], scenario: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + sys) and peak RSS (MiB) of one child process."""
    tic = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", *argv, str(scenario)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - tic
    child.returncode = os.waitstatus_to_exitcode(status)
    error = child.stderr.read().decode() if child.stderr else ""
    if child.returncode != 0:
        raise SystemExit(f"{scenario}: exit {child.returncode}: {error.strip()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def exponent(clients: list[int], values: list[float]) -> float:
    """a in value ~ K^a, least squares on log-log."""
    return float(np.polyfit(np.log(clients), np.log(values), 1)[0])


def plot(path: Path, clients: list[int], table: dict[str, dict[str, list[float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "wall", "wall time (s)"), (axes[1], "rss", "peak resident memory (MiB)")):
        for mode, rows in table.items():
            ax.loglog(clients, rows[key], "o-", label=f"{mode}: ~K^{exponent(clients, rows[key]):.2f}")
        ax.set_xlabel("clients K (M = N = 2.7 K subchannels)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("sflllm optimize --json at scale")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--ratio", type=float, default=2.73, help="subchannels per client on each link")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plot", type=Path, default=None, help="write the log-log plot to this PNG")
    args = parser.parse_args()

    table = {mode: {"wall": [], "cpu": [], "rss": []} for mode in MODES}
    with tempfile.TemporaryDirectory() as folder:
        for K in args.clients:
            M = max(K, round(args.ratio * K))
            scenario = Path(folder) / f"k{K}.yaml"
            scenario.write_text(f"clients:\n  count: {K}\nnetwork:\n  ms_subchannels: {M}\n  fs_subchannels: {M}\n")
            for mode, argv in MODES.items():
                runs = [run_once(argv, scenario) for _ in range(args.repeats)]
                wall, cpu, rss = (statistics.median(column) for column in zip(*runs))
                for key, value in (("wall", wall), ("cpu", cpu), ("rss", rss)):
                    table[mode][key].append(value)
                print(f"K = {K:5d}, M = N = {M:5d}  {mode:<15} wall {wall:7.2f} s  CPU {cpu:7.2f} s  "
                      f"peak RSS {rss:7.1f} MiB  (median of {args.repeats})", flush=True)
    if len(args.clients) > 1:
        for mode, rows in table.items():
            print(f"growth, {mode}: wall ~K^{exponent(args.clients, rows['wall']):.2f}, "
                  f"CPU ~K^{exponent(args.clients, rows['cpu']):.2f}, memory ~K^{exponent(args.clients, rows['rss']):.2f}"
                  f"  (between the two largest K, where start-up matters least: wall ~K^"
                  f"{exponent(args.clients[-2:], rows['wall'][-2:]):.2f}, memory ~K^"
                  f"{exponent(args.clients[-2:], rows['rss'][-2:]):.2f})")
    if args.plot is not None:
        plot(args.plot, args.clients, table)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
