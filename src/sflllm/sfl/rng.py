"""One random stream per party (spec §1 parties: clients, main server), seeded from ``(seed, party)``.

Dropout draws from torch's global generator, so a party's stream is a saved generator state that
is swapped in while that party computes (:meth:`PartyRng.active`) and saved back afterwards.  A
client's dropout masks then depend only on ``(seed, client)`` and on its own past work, never on
which clients ran before it, which is what lets a runtime run the clients in any order, in any
process.  The state is a uint8 tensor, so it checkpoints as a safetensors tensor.
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
    """The CPU random stream of one party; ``state`` is torch's generator state (uint8 tensor)."""

    def __init__(self, seed: int, party: str) -> None:
        self.state: Tensor = torch.Generator().manual_seed(party_seed(seed, party)).get_state()

    @contextmanager
    def active(self) -> Iterator[None]:
        """Run the block on this party's stream and keep where the stream ended; the caller's
        torch RNG is restored afterwards."""
        with replayed(self.state):
            try:
                yield
            finally:
                self.state = torch.get_rng_state()


@contextmanager
def replayed(state: Tensor) -> Iterator[None]:
    """Run the block on torch's CPU stream set to ``state`` (e.g. a party's state before a forward
    pass, to recompute it with the same dropout masks); the caller's torch RNG is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(state)
        yield
