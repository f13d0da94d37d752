"""What ``sflllm optimize`` shows while and after it runs: progress on stderr, the JSON on stdout.

Both matter at city scale (K = 1,000 clients, M = N = 2,730 subchannels): the solve takes seconds,
and the result holds millions of floats (the realised gains, spec §8).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from sflllm.allocation.optimize import phases
from sflllm.allocation.scenario import Realised

#: K (M + N) from which ``sflllm optimize`` shows its progress on stderr: the solve then takes a second
#: or more on a 2-core machine (K = 1,000, M = N = 2,730 is 5.5 million and takes about 3 s; K = 200,
#: M = N = 546 is 0.2 million and 0.3 s).
PROGRESS_MIN_SIZE = 1_000_000


@contextlib.contextmanager
def phase_progress(realised: Realised, method: str) -> Iterator[Callable[[str], None] | None]:
    """An ``on_phase`` callback for :func:`~sflllm.allocation.optimize.optimise` that shows a rich
    progress bar on stderr while the phases run, for a large scenario (``PROGRESS_MIN_SIZE``); None
    (nothing shown, rich not imported) otherwise.  stdout is left alone, so ``--json`` stays clean."""
    network = realised.scenario.network
    if realised.num_clients * (network.ms_subchannels + network.fs_subchannels) < PROGRESS_MIN_SIZE:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    steps = phases(method)
    columns = (TextColumn("sflllm optimize: {task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("starting", total=len(steps))

        def on_phase(name: str) -> None:
            progress.update(task, description=name.replace("_", " "), completed=steps.index(name))

        yield on_phase


def write_json_line(result: dict) -> None:
    """``result`` as one line of JSON on stdout, encoded by orjson.

    A city-scale result holds millions of floats (the realised gains): the standard library's encoder
    spends about 1 us per float (7 s at K = 1,000, M = N = 2,730), orjson 0.1 us.  Floats are written
    in their shortest round-trip form, so ``json.loads`` gives back the same numbers bit for bit.
    """
    import orjson

    sys.stdout.flush()
    stream = getattr(sys.stdout, "buffer", None)
    data = orjson.dumps(result, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)
    if stream is None:  # a text-only stdout (e.g. io.StringIO)
        sys.stdout.write(data.decode("utf-8"))
    else:
        stream.write(data)
        stream.flush()
