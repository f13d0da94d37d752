"""Time per sample of SFL with sequential and batched clients against centralized LoRA, and the FLOP floor.

    python bench/bench_client_batching.py [--clients 1 5 20] [--batch-sizes 1 4] [--split-layers 3 11]
                                          [--seq-len 128] [--threads 2] [--repeats 2] [--dtype float32]

A GPT-2-small-shaped model (``GPT2Config()`` sizes, 124M parameters, random init, offline) with
rank-8 LoRA on ``c_attn``, dropout 0 (batched clients need a client part that draws no random
numbers, see :mod:`sflllm.sfl.batched`); synthetic token data (every position a target).  For each (l, K, b) one
local iteration of K clients with b samples each runs as ``sfl`` with ``client_batching`` =
``sequential`` and ``batched``, and as ``centralized`` on the same K*b samples; after one warm-up
iteration per mode (first configuration only) the modes alternate ``--repeats`` times (so load on a
shared machine hits them alike) and the minimum wall and CPU (process) time per sample are kept.

The FLOP floor is the step's FLOP count (spec §2 ``F_c + B_c + S`` per sample, from
:func:`sflllm.cost.profile.cost_numbers`) divided by the measured float32 (or ``--dtype``) matmul
throughput of this machine at the same thread count; ``floor %`` is floor time / measured time.
"""

from __future__ import annotations

import argparse
import time

import torch

from sflllm.cost.profile import cost_numbers, preset_profile
from sflllm.data import TokenizedExamples
from sflllm.model import attach_lora, resolve_dtype, split_model
from sflllm.sfl import Hyper, make_federation

MODES = {"centralized": ("centralized", "sequential"), "sfl sequential": ("sfl", "sequential"),
         "sfl batched": ("sfl", "batched")}


def matmul_flops_per_s(dtype: torch.dtype, size: int = 1536, repeats: int = 6) -> float:
    """Best-of-``repeats`` throughput of one (size x size) @ (size x size) matmul, in FLOP/s."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def synthetic_clients(num_clients: int, rows: int, seq_len: int, vocab_size: int) -> list[TokenizedExamples]:
    generator = torch.Generator().manual_seed(0)
    data = []
    for _ in range(num_clients):
        ids = torch.randint(0, vocab_size, (rows, seq_len), generator=generator)
        data.append(TokenizedExamples(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone(),
                                      mrs=("",) * rows, refs=("",) * rows))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--split-layers", type=int, nargs="+", default=[3, 11])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-samples", type=int, default=80, help="skip (K, b) with K*b above this")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 base weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    dtype = resolve_dtype(args.dtype)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=max(1024, args.seq_len), resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0)).eval().to(dtype)
    peft_model = attach_lora(model, rank=8, alpha=16, dropout=0.0)
    profile = preset_profile("gpt2")
    throughput = matmul_flops_per_s(dtype)
    print(f"GPT-2 small shape ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M), {args.dtype}, rank 8, "
          f"s={args.seq_len}, torch threads {torch.get_num_threads()}; matmul {throughput / 1e9:.1f} GFLOP/s; "
          f"min of {args.repeats} iterations after a warm-up, ms per sample")
    print(f"{'l':>3} {'K':>3} {'b':>3} | {'central':>8} {'sfl seq':>8} {'sfl bat':>8} | {'seq/c':>6} {'bat/c':>6} "
          f"{'bat/seq':>7} | cpu {'seq/c':>6} {'bat/c':>6} | {'floor':>7} {'floor% c':>8} {'floor% bat':>10}")
    warm = False
    for split_layer in args.split_layers:
        split = split_model(peft_model, split_layer)
        costs = cost_numbers(profile, split_layer, 8, seq_len=args.seq_len)
        floor_s = (costs.F_c + costs.B_c + costs.S) / throughput  # per sample
        for b in args.batch_sizes:
            for k in args.clients:
                if k * b > args.max_samples:
                    continue
                data = synthetic_clients(k, 2 * b * (args.repeats + 1), args.seq_len, model.config.vocab_size)
                feds = {name: make_federation(split, data, Hyper(mode=mode, local_steps=1, batch_size=b, lr=1e-3,
                                                                 client_batching=batching))
                        for name, (mode, batching) in MODES.items()}
                best = dict.fromkeys(feds, float("inf"))
                cpu = dict.fromkeys(feds, float("inf"))
                for name, fed in feds.items():
                    if not warm:
                        fed.local_iterations()  # warm-up
                warm = True
                for _ in range(args.repeats):
                    for name, fed in feds.items():
                        start, cpu_start = time.perf_counter(), time.process_time()
                        fed.local_iterations()
                        best[name] = min(best[name], (time.perf_counter() - start) / (k * b))
                        cpu[name] = min(cpu[name], (time.process_time() - cpu_start) / (k * b))
                c, seq, bat = best["centralized"], best["sfl sequential"], best["sfl batched"]
                print(f"{split_layer:>3} {k:>3} {b:>3} | {1e3 * c:8.1f} {1e3 * seq:8.1f} {1e3 * bat:8.1f} | "
                      f"{seq / c:6.2f} {bat / c:6.2f} {bat / seq:7.2f} | cpu "
                      f"{cpu['sfl sequential'] / cpu['centralized']:6.2f} "
                      f"{cpu['sfl batched'] / cpu['centralized']:6.2f} | "
                      f"{1e3 * floor_s:7.1f} "
                      f"{100 * floor_s / c:7.0f}% {100 * floor_s / bat:9.0f}%", flush=True)


if __name__ == "__main__":
    main()
