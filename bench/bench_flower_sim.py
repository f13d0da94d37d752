"""Per-round wall time of `--engine local` vs `--engine flower-sim` (Flower Simulation Engine, Ray).

    python bench/bench_flower_sim.py [--clients 3] [--rounds 4] [--local-steps 2] [--batch-size 4]
                                     [--engines local,flower-sim]   (or e.g. local,dataplane)

Runs the offline demo (tiny GPT-2, synthetic data) with each engine into a temporary directory and
prints each round's wall time (local iterations + aggregation, as metrics.json records it; the
simulation's start-up is printed apart), the median over rounds, and the largest difference of the
saved adapters between the engines.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from sflllm.experiments.config import TrainConfig
from sflllm.experiments.train import run_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--engines", default="local,flower-sim", help="two engines, the reference first")
    args = parser.parse_args()
    engines = args.engines.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        walls = {}
        for engine in engines:
            config = TrainConfig(engine=engine, clients=args.clients, rounds=args.rounds, local_steps=args.local_steps,
                                 batch_size=args.batch_size, train_samples=16 * args.clients, eval_samples=8)
            start = time.perf_counter()
            result = run_train(config, Path(tmp) / engine, progress=False)
            total = time.perf_counter() - start
            walls[engine] = [r["wall_time_s"] for r in result.metrics["rounds"]]
            print(f"{engine:>10}: rounds {', '.join(f'{w:.3f}' for w in walls[engine])} s; "
                  f"median {statistics.median(walls[engine]):.3f} s; whole run {total:.1f} s")
        ratio = statistics.median(walls[engines[1]]) / statistics.median(walls[engines[0]])
        print(f"{engines[1]} / {engines[0]}, median round: {ratio:.2f}x")
        for name in ("client_adapter.safetensors", "server_adapter.safetensors"):
            a, b = (load_file(Path(tmp) / engine / name) for engine in engines)
            print(f"{name}: max |{engines[0]} - {engines[1]}| = {max(float((a[k] - b[k]).abs().max()) for k in a):.3g}")


if __name__ == "__main__":
    main()
