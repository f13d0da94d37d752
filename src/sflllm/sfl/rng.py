"""One random stream per party (spec §1 parties: clients, main server), seeded from ``(seed, party)``.

Dropout draws from torch's global generator, so a party's stream is a saved generator state that
is swapped in while that party computes (:meth:`PartyRng.active`) and saved back afterwards.  A
client's dropout masks then depend only on ``(seed, client)`` and on its own past work, never on
which clients ran before it, which is what lets a runtime run the clients in any order, in any
process.  The state is a uint8 tensor, so it checkpoints as a safetensors tensor.

On an accelerator (CUDA, MPS) dropout draws from that device's generator instead.  The party's CPU
state stays the one source of truth: entering the party's stream draws one 63-bit seed from it and
seeds the device generator with it.  So the checkpointed state is the same kind of tensor on every
device (a run saved on a GPU resumes on a CPU and the reverse), and replaying a saved state replays
the device's masks too.  On the CPU nothing extra is drawn.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor


def party_seed(seed: int, party: str) -> int:
    """A 63-bit seed drawn from ``(seed, party)`` (e.g. ``"client.3"``, ``"main_server"``)."""
    words = np.random.SeedSequence([seed, *party.encode("utf-8")]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class PartyRng:
    """The random stream of one party; ``state`` is torch's CPU generator state (uint8 tensor), which also
    seeds the ``device`` generator where the party computes on an accelerator."""

    def __init__(self, seed: int, party: str, device: torch.device | str | None = None) -> None:
        self.state: Tensor = torch.Generator().manual_seed(party_seed(seed, party)).get_state()
        self.device = torch.device("cpu" if device is None else device)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Run the block on this party's stream and keep where the stream ended; the caller's
        torch RNG is restored afterwards."""
        with replayed(self.state, self.device):
            try:
                yield
            finally:
                self.state = torch.get_rng_state()


@contextmanager
def replayed(state: Tensor, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block on torch's CPU stream set to ``state`` (e.g. a party's state before a forward
    pass, to recompute it with the same dropout masks), and on an accelerator ``device`` with its
    generator seeded from that stream; the caller's torch RNG states are restored afterwards."""
    device = torch.device("cpu" if device is None else device)
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(state)
        if device.type == "cpu":
            yield
            return
        backend = torch.get_device_module(device.type)
        saved = backend.get_rng_state(device) if device.type == "cuda" else backend.get_rng_state()
        seed = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64))
        try:
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            else:
                backend.manual_seed(seed)
            yield
        finally:
            if device.type == "cuda":
                backend.set_rng_state(saved, device)
            else:
                backend.set_rng_state(saved)
