"""Memory of simulated SFL vs the number of clients K, on a GPT-2-small-shaped model (random init).

    python bench/bench_sfl_memory.py [--clients 1 10 50] [--seq-len 32] [--batch-size 1] [--split-layer 2]
                                     [--server-chunk 5]

Each K runs in a fresh subprocess: build the model (``GPT2Config()`` default sizes, 124M parameters,
offline) with rank-8 LoRA, then measure the resident set size (RSS, from /proc/self/statm, after
``malloc_trim``) before and after ``make_federation`` (the persistent per-client state: LoRA tensors
and AdamW moments), and the peak RSS sampled every millisecond during one round (adds the K client
graphs kept alive at the cut, the concatenated server batch and its logits). The same peak is
measured for centralized LoRA with batch K*b, which does the same main-server work. One frozen base
serves every client, so the persistent state grows per client by 3x the client-LoRA size, not by
the model size; the round peak grows like centralized training on K*b samples.  With
``--server-chunk N`` the same round is also measured with the main server running N clients at a
time (``Hyper.server_chunk``): its graph and logits then exist for N clients only, so the peak no
longer grows with K beyond the clients' own cut-layer graphs.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def settled_rss() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


class PeakSampler:
    """Samples RSS every millisecond in a background thread while active."""

    def __enter__(self) -> PeakSampler:
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def measure(num_clients: int, seq_len: int, batch_size: int, split_layer: int, mode: str,
            server_chunk: int | None = None) -> dict:
    """One K and mode, in this process: persistent and peak memory of a federation of ``num_clients`` clients."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from sflllm.data import TokenizedExamples
    from sflllm.model import attach_lora, lora_parameters, split_model
    from sflllm.sfl import Hyper, make_federation

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    split = split_model(attach_lora(model, rank=8, alpha=16, dropout=0.0), split_layer)
    generator = torch.Generator().manual_seed(0)
    rows = 8 * batch_size
    data = []
    for _ in range(num_clients):
        ids = torch.randint(0, model.config.vocab_size, (rows, seq_len), generator=generator)
        data.append(TokenizedExamples(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone(),
                                      mrs=("",) * rows, refs=("",) * rows))
    base = settled_rss()
    federation = make_federation(split, data, Hyper(mode=mode, local_steps=1, batch_size=batch_size,
                                                                server_chunk=server_chunk))
    after_setup = settled_rss()
    with PeakSampler() as sampler:
        federation.run_round(0)
    state_bytes = sum(t.numel() * t.element_size() for t in federation.state_dict().values())
    client_lora = sum(p.numel() * p.element_size() for p in lora_parameters(split.client).values())
    return {
        "clients": num_clients,
        "model_params": sum(p.numel() for p in model.parameters()),
        "client_lora_bytes": client_lora,
        "state_dict_bytes": state_bytes,
        "setup_rss_bytes": after_setup - base,
        "round_peak_rss_bytes": sampler.peak - base,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--split-layer", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one K, print JSON
    parser.add_argument("--server-chunk", type=int, default=None, help="also measure sfl with this server chunk")
    parser.add_argument("--mode", default="sfl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.seq_len, args.batch_size, args.split_layer, args.mode,
                                 args.server_chunk)))
        return

    def run(k: int, mode: str, chunk: int | None = None) -> dict:
        done = subprocess.run([sys.executable, "-W", "ignore", __file__, "--one", str(k), "--mode", mode,
                               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                               "--split-layer", str(args.split_layer),
                               *(["--server-chunk", str(chunk)] if chunk else [])],
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    results = []
    for k in args.clients:
        result = run(k, "sfl") | {"central_peak": run(k, "centralized")["round_peak_rss_bytes"]}
        if args.server_chunk:
            result["chunked_peak"] = run(k, "sfl", args.server_chunk)["round_peak_rss_bytes"]
        results.append(result)
    first = results[0]
    print(f"GPT-2 small shape ({first['model_params'] / 1e6:.1f}M params, fp32 {first['model_params'] * 4 / MIB:.0f} MiB), "
          f"split_layer={args.split_layer}, rank 8, s={args.seq_len}, b={args.batch_size}; "
          f"client LoRA {first['client_lora_bytes'] / MIB:.3f} MiB (x3 with AdamW moments "
          f"= {3 * first['client_lora_bytes'] / MIB:.3f} MiB)")
    chunk_head = f" {f'peak, server_chunk={args.server_chunk} MiB':>28}" if args.server_chunk else ""
    print(f"{'K':>4} {'state_dict MiB':>15} {'setup RSS MiB':>14} {'round peak RSS MiB':>19}{chunk_head} "
          f"{'centralized (batch K*b) peak MiB':>33}")
    for r in results:
        chunked = f" {r['chunked_peak'] / MIB:>28.2f}" if args.server_chunk else ""
        print(f"{r['clients']:>4} {r['state_dict_bytes'] / MIB:>15.2f} {r['setup_rss_bytes'] / MIB:>14.2f} "
              f"{r['round_peak_rss_bytes'] / MIB:>19.2f}{chunked} {r['central_peak'] / MIB:>33.2f}")
    last = results[-1]
    span = last["clients"] - first["clients"]
    if span:
        for key, label in (("state_dict_bytes", "state_dict"), ("setup_rss_bytes", "setup RSS"),
                           ("round_peak_rss_bytes", "round peak RSS"),
                           *((("chunked_peak", f"round peak RSS, server_chunk={args.server_chunk}"),)
                             if args.server_chunk else ()),
                           ("central_peak", "centralized peak RSS")):
            print(f"growth per client, {label}: {(last[key] - first[key]) / span / MIB:.3f} MiB")


if __name__ == "__main__":
    main()
