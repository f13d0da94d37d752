"""Training time per sample: SFL (K clients, batch b each) vs centralized LoRA (batch K*b), in-process.

    python bench/bench_sfl_speed.py [--clients 4] [--batch-size 4] [--rounds 3] [--repeats 5] [--threads N]

Both modes run on the same frozen model (a random-init GPT-2 from ``build_demo_model``, offline) and
the same synthetic E2E data; every round processes K * I * b samples in either mode. Runs of the two
modes alternate so that load on a shared machine hits both alike; the medians of wall and CPU time
per sample and their ratio (target: SFL within 1.15x of centralized) are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sflllm.data import build_demo_tokenizer, synthetic_examples, tokenize
from sflllm.model import attach_lora, build_demo_model, split_model
from sflllm.sfl import Hyper, make_federation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--split-layer", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = build_demo_tokenizer()
    examples = synthetic_examples(64 * args.clients, seed=0)
    data = [tokenize(examples[k::args.clients], tokenizer, args.seq_len) for k in range(args.clients)]
    model = build_demo_model(len(tokenizer), seed=0, num_layers=args.layers, hidden_size=args.hidden_size,
                             num_heads=max(1, args.hidden_size // 64), max_positions=args.seq_len)
    split = split_model(attach_lora(model, rank=8, alpha=16, dropout=0.0), args.split_layer)

    federations = {
        mode: make_federation(split, data, Hyper(mode=mode, local_steps=args.local_steps,
                                                 batch_size=args.batch_size, lr=1e-3))
        for mode in ("sfl", "centralized")
    }
    samples = args.rounds * args.local_steps * args.batch_size * args.clients
    wall: dict[str, list[float]] = {mode: [] for mode in federations}
    cpu: dict[str, list[float]] = {mode: [] for mode in federations}
    for mode, federation in federations.items():
        federation.run_round(0)  # warm-up
    for repeat in range(args.repeats):
        for mode, federation in federations.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for r in range(args.rounds):
                federation.run_round(1 + repeat * args.rounds + r)
            wall[mode].append((time.perf_counter() - w0) / samples)
            cpu[mode].append((time.process_time() - c0) / samples)

    print(f"model: GPT-2 d={args.hidden_size} L={args.layers}, split_layer={args.split_layer}, rank 8; "
          f"K={args.clients} b={args.batch_size} I={args.local_steps} s={args.seq_len}; "
          f"{samples} samples per measurement, {args.repeats} repeats, torch threads {torch.get_num_threads()}")
    for mode in federations:
        print(f"{mode:12s} wall {1e3 * statistics.median(wall[mode]):8.3f} ms/sample "
              f"(min {1e3 * min(wall[mode]):.3f})   cpu {1e3 * statistics.median(cpu[mode]):8.3f} ms/sample")
    print(f"SFL / centralized: wall {statistics.median(wall['sfl']) / statistics.median(wall['centralized']):.3f}x, "
          f"cpu {statistics.median(cpu['sfl']) / statistics.median(cpu['centralized']):.3f}x  (target <= 1.15x)")


if __name__ == "__main__":
    main()
