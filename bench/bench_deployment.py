"""Per-round wall time of a Flower deployment (scripts/local-deployment.sh) vs the in-process engine.

    python bench/bench_deployment.py [--clients 3] [--rounds 3] [--local-steps 2] [--batch-size 4]

Runs the offline demo (tiny GPT-2, synthetic data; LoRA dropout 0.1, so the in-process engine runs
the clients one by one, as the deployment does) in process and as a deployment on 127.0.0.1
(SuperLink with TLS and SuperNode authentication, one SuperNode per client, a ClientApp process per
round message, the cut exchanges over the gRPC data plane), and prints each round's wall time as
metrics.json records it (a deployed round: one Flower message per client, the ClientApp processes'
start and model build, the local iterations over the data plane, FedAvg), the medians, the whole
deployment's wall time (start of the processes, Flower's app install, the first "hello" query) and
the largest difference of the saved adapters.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from sflllm.experiments.config import TrainConfig
from sflllm.experiments.train import run_train

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "local-deployment.sh"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    fields = {"clients": args.clients, "rounds": args.rounds, "local_steps": args.local_steps,
              "batch_size": args.batch_size, "train_samples": 16 * args.clients, "eval_samples": 8,
              "lora_dropout": 0.1}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config_file = root / "config.yaml"
        config_file.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
        start = time.perf_counter()
        run_train(TrainConfig(**fields), root / "local", progress=False)
        local_total = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run(["bash", str(SCRIPT), str(root / "deployed"), "--clients", str(args.clients), "--rounds",
                        str(args.rounds), "--config", str(config_file)], check=True, stdout=subprocess.DEVNULL,
                       env=os.environ | {"TMPDIR": tmp})
        deployed_total = time.perf_counter() - start
        walls = {}
        for name, total in (("local", local_total), ("deployed", deployed_total)):
            walls[name] = [r["wall_time_s"] for r in json.loads((root / name / "metrics.json").read_text())["rounds"]]
            print(f"{name:>9}: rounds {', '.join(f'{w:.2f}' for w in walls[name])} s; "
                  f"median {statistics.median(walls[name]):.2f} s; whole run {total:.1f} s")
        print(f"deployed / local, median round: {statistics.median(walls['deployed']) / statistics.median(walls['local']):.1f}x"
              f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        for name in ("client_adapter.safetensors", "server_adapter.safetensors", "state.safetensors"):
            a, b = (load_file(root / d / name) for d in ("local", "deployed"))
            print(f"{name}: max |local - deployed| = {max(float((a[k] - b[k]).abs().max()) for k in a):.3g}")


if __name__ == "__main__":
    sys.exit(main())
