"""Per-iteration overhead of the gRPC data plane (TLS + token) against the in-process exchange.

    python bench/bench_dataplane.py [--sizes-mb 0.1,3,30] [--repeats 20]

For each activation size, a tiny GPT-2 (hidden 64, 2 blocks, cut after block 1, seq_len 128) with
the batch size that makes the client's activations that many MB, one client: times

* in process: ``client_step_forward`` -> ``main_server_step`` -> ``client_step_backward``;
* data plane: the same with ``DataPlaneClient.exchange`` over TLS on 127.0.0.1 in place of the
  direct ``main_server_step`` call;

alternately, and prints the medians and the median paired difference, the data plane's overhead per iteration (encode,
TLS, gRPC, decode and checks both ways).  The client's forward and backward make that difference
noisy on a loaded machine, so it also times the exchange alone: ``main_server_step`` on a fixed
payload called directly vs reached over the data plane.  Target (issue 8): under 20 ms at 3 MB.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time


from sflllm.data import build_demo_tokenizer, synthetic_examples, tokenize
from sflllm.deploy import DataPlaneClient, MainServerPlane, self_signed_certificate, serve
from sflllm.model import attach_lora, build_demo_model, split_model
from sflllm.sfl import Hyper, client_step_backward, client_step_forward, main_server_step, make_federation
from sflllm.sfl.federation import training

SEQ_LEN, HIDDEN = 128, 64


def federation(tokenizer, batch_size: int):
    model = build_demo_model(len(tokenizer), seed=0, num_layers=2, hidden_size=HIDDEN, num_heads=2)
    split = split_model(attach_lora(model, rank=4, alpha=8, dropout=0.0, seed=1), 1)
    data = tokenize(synthetic_examples(batch_size, seed=3), tokenizer, SEQ_LEN)
    return make_federation(split, [data], Hyper(batch_size=batch_size, seed=0))


def seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def interleaved(first, second, repeats: int) -> tuple[float, float, float]:
    """Medians of ``first``'s and ``second``'s times and of their paired differences, the two run
    alternately (so that the machine's load drifts alike for both)."""
    first(), second()  # warm-up
    pairs = [(seconds(first), seconds(second)) for _ in range(repeats)]
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
            statistics.median(b - a for a, b in pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="0.1,3,30")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    tokenizer = build_demo_tokenizer()
    cert, key = self_signed_certificate(("127.0.0.1",))
    for size_mb in (float(s) for s in args.sizes_mb.split(",")):
        batch_size = max(1, round(size_mb * 1e6 / (SEQ_LEN * HIDDEN * 4)))
        repeats = max(3, min(args.repeats, round(args.repeats * 3 / size_mb)))
        fed = federation(tokenizer, batch_size)
        client, split = fed.clients[0], fed.split

        def in_process() -> None:
            pending, cut = client_step_forward(split.client, client)
            _, grads = main_server_step(split.server, fed.servers, fed.server_rng, [cut], fed.cut_spec)
            client_step_backward(split.client, client.adapter, pending, grads[0])

        plane = MainServerPlane(split.server, fed.servers, fed.server_rng, fed.cut_spec, "bench-token",
                                compute_lock=threading.Lock())
        server, port = serve(plane, "127.0.0.1:0", cert, key)
        channel = DataPlaneClient(f"127.0.0.1:{port}", cert, "bench-token", 0, fed.cut_spec)
        rounds = iter(range(10**9))

        def over_data_plane() -> None:
            round_index = next(rounds)
            plane.begin_round(round_index, [0], 1)
            pending, cut = client_step_forward(split.client, client)
            grads = channel.exchange(cut, round_index, 0)
            client_step_backward(split.client, client.adapter, pending, grads)
            plane.end_round()

        def server_step() -> None:  # the main server's part alone, on a fixed payload
            main_server_step(split.server, fed.servers, fed.server_rng, [fixed_cut], fed.cut_spec)

        def server_step_over_data_plane() -> None:
            round_index = next(rounds)
            plane.begin_round(round_index, [0], 1)
            channel.exchange(fixed_cut, round_index, 0)
            plane.end_round()

        try:
            with training(split.full):
                local, remote, overhead = interleaved(in_process, over_data_plane, repeats)
                fixed_cut = client_step_forward(split.client, client)[1]
                _, _, exchange = interleaved(server_step, server_step_over_data_plane, 2 * repeats)
        finally:
            channel.close()
            server.stop(None).wait(10)
        megabytes = batch_size * SEQ_LEN * HIDDEN * 4 / 1e6
        print(f"activations {megabytes:6.2f} MB (b={batch_size}, s={SEQ_LEN}, d={HIDDEN}): in process "
              f"{local * 1e3:8.1f} ms, data plane {remote * 1e3:8.1f} ms, overhead {overhead * 1e3:7.1f} ms "
              f"per iteration (medians of {repeats} alternating pairs); the exchange alone (main server's "
              f"step over the data plane vs called directly, {2 * repeats} pairs): {exchange * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
