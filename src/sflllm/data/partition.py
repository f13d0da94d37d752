"""Split examples across clients: IID or label-skewed (Dirichlet over an MR attribute).

numpy only. (flwr-datasets' partitioners were considered: they work on ``datasets.Dataset`` rows,
cannot keep MR groups together and reach a minimum partition size by resampling, which may not
terminate for small alpha; this module repairs empty clients instead, see :func:`partition`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from .e2e import E2E_SLOTS, Example, parse_mr

MISSING = "<missing>"  # class of examples whose MR lacks the partition attribute


def _units(examples: Sequence[Example], keep_mr_together: bool) -> list[np.ndarray]:
    """Indivisible units of rows: one per MR (first-appearance order) or one per row."""
    if not keep_mr_together:
        return [np.array([i]) for i in range(len(examples))]
    groups: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(example.mr, []).append(i)
    return [np.array(rows) for rows in groups.values()]


def _dirichlet_owners(classes: list[str], num_clients: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Owner client of each unit: for every class, shares ~ Dirichlet(alpha * 1_K) over clients,
    then the class's shuffled units are cut at the cumulative shares (the usual label-skew scheme)."""
    owners = np.empty(len(classes), dtype=np.int64)
    labels = np.array(classes, dtype=object)
    for cls in sorted(set(classes)):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for client, chunk in enumerate(np.split(members, cuts)):
            owners[chunk] = client
    return owners


def _fill_empty_clients(owners: np.ndarray, num_clients: int, rng: np.random.Generator) -> np.ndarray:
    """Give every client with no unit one random unit of the client that owns the most units.

    With at least ``num_clients`` units, the largest owner has >= 2 units whenever some client has
    none, so each move keeps the donor non-empty; the skew is disturbed by at most K-1 units.
    """
    owners = owners.copy()
    for client in range(num_clients):
        if not np.any(owners == client):
            donor = np.bincount(owners, minlength=num_clients).argmax()
            owners[rng.choice(np.flatnonzero(owners == donor))] = client
    return owners


def partition(
    examples: Sequence[Example],
    num_clients: int,
    *,
    scheme: Literal["iid", "dirichlet"] = "iid",
    alpha: float = 0.5,
    attribute: str = "eatType",
    seed: int = 0,
    keep_mr_together: bool = False,
) -> list[np.ndarray]:
    """Row indices (sorted int64 arrays) of each of ``num_clients`` clients; disjoint and covering.

    - ``"iid"``: shuffle the units, then split them into ``num_clients`` near-equal parts.
    - ``"dirichlet"``: non-IID label skew over the MR ``attribute`` (an E2E slot such as
      ``eatType`` or ``food``; MRs without it form their own class): see ``_dirichlet_owners``.
      Smaller ``alpha`` -> more skew. Every client is guaranteed at least one unit by moving units
      from the largest client to empty ones (``_fill_empty_clients``), never by resampling.

    A unit is a row, or with ``keep_mr_together`` all rows of one MR (so no MR is split across
    clients). Deterministic given ``seed``. Raises ``ValueError`` when there are fewer units than
    clients.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    units = _units(examples, keep_mr_together)
    if len(units) < num_clients:
        what = "distinct MRs (keep_mr_together=True)" if keep_mr_together else "examples"
        raise ValueError(f"cannot give {num_clients} clients at least one example each: only {len(units)} {what}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = rng.permutation(len(units))
        owners = np.empty(len(units), dtype=np.int64)
        for client, chunk in enumerate(np.array_split(order, num_clients)):
            owners[chunk] = client
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0 for the dirichlet scheme, got {alpha}")
        if attribute not in E2E_SLOTS:
            raise ValueError(f"attribute must be one of the E2E slots {list(E2E_SLOTS)}, got {attribute!r}")
        classes = [parse_mr(examples[int(u[0])].mr).get(attribute, MISSING) for u in units]
        owners = _fill_empty_clients(_dirichlet_owners(classes, num_clients, alpha, rng), num_clients, rng)
    else:
        raise ValueError(f"scheme must be 'iid' or 'dirichlet', got {scheme!r}")
    return [np.sort(np.concatenate([units[u] for u in np.flatnonzero(owners == client)])) for client in range(num_clients)]
