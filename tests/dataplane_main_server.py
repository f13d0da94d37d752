"""A main server in its own process, for tests/test_deploy_dataplane.py (not a test module).

    python dataplane_main_server.py CERT KEY TOKEN STATE_OUT

Builds the protocol tests' 3-client federation, serves its main server on 127.0.0.1 (a free port,
printed as ``port N``), opens round 0 for clients 0..2, waits until it has been served, writes the
main server's state (server adapter, AdamW moments, RNG) to STATE_OUT as safetensors, prints
``done`` and exits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from sflllm.data import build_demo_tokenizer, synthetic_examples  # noqa: E402
from sflllm.deploy import MainServerPlane, serve  # noqa: E402
from test_sfl import client_data  # noqa: E402
from test_sfl_protocol import federation  # noqa: E402


def main(cert: str, key: str, token: str, state_out: str) -> None:
    torch.set_num_threads(1)
    tokenizer = build_demo_tokenizer()
    _, fed = federation(tokenizer, client_data(synthetic_examples(40, seed=3), tokenizer, [7, 9, 8]))
    plane = MainServerPlane(fed.split.server, fed.servers, fed.server_rng, fed.cut_spec, token, client_timeout=60)
    server, port = serve(plane, "127.0.0.1:0", Path(cert).read_bytes(), Path(key).read_bytes())
    try:
        plane.begin_round(0, [0, 1, 2], fed.hyper.local_steps)
        print(f"port {port}", flush=True)
        fed.split.full.train()
        if not plane.wait_round(timeout=120):
            sys.exit("round 0 was not served within 120 s")
        report = plane.end_round()
        state = {n: t.detach().clone() for n, t in fed.servers[0].live_state("server.0").items()}
        losses = torch.tensor(report.losses, dtype=torch.float64)
        save_file(state | {"rng.main_server": fed.server_rng.state, "losses": losses}, state_out)
        print(f"done dropped={sorted(report.dropped)}", flush=True)
    finally:
        server.stop(grace=10).wait(20)  # let the last answers go out


if __name__ == "__main__":
    main(*sys.argv[1:])
