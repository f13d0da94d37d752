"""Client k in its own process, for tests/test_deploy_dataplane.py (not a test module).

    python dataplane_client.py ADDRESS CERT TOKEN K

Builds the protocol tests' 3-client federation, connects client K to the main server at ADDRESS,
prints ``ready``, waits for a line on stdin, runs round 0's first local iteration over the data
plane, prints ``iteration 0 done`` and then waits on stdin (the test kills it there).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from sflllm.data import build_demo_tokenizer, synthetic_examples  # noqa: E402
from sflllm.deploy import DataPlaneClient  # noqa: E402
from sflllm.sfl import client_step_backward, client_step_forward  # noqa: E402
from test_sfl import client_data  # noqa: E402
from test_sfl_protocol import federation  # noqa: E402


def main(address: str, cert: str, token: str, k: str) -> None:
    torch.set_num_threads(1)
    tokenizer = build_demo_tokenizer()
    _, fed = federation(tokenizer, client_data(synthetic_examples(40, seed=3), tokenizer, [7, 9, 8]))
    client = fed.clients[int(k)]
    channel = DataPlaneClient(address, Path(cert).read_bytes(), token, int(k), fed.cut_spec, timeout=120)
    fed.split.full.train()
    print("ready", flush=True)
    sys.stdin.readline()
    pending, cut = client_step_forward(fed.split.client, client)
    client_step_backward(fed.split.client, client.adapter, pending, channel.exchange(cut, 0, 0))
    print("iteration 0 done", flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main(*sys.argv[1:])
