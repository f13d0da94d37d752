"""User files, read and written safely: the one YAML 1.2 loader, the one atomic writer, output folders.

Both halves use it (``sflllm train``'s config file and ``sflllm optimize``'s scenario file), so it
imports no torch. Every failure is a :class:`FileInputError` whose one-line message names the file.

Limits of the loader (a YAML file is user input; without them a few hundred bytes of nested
aliases expand to gigabytes, and a 50 MB file of numbers took 216 s and 5.9 GB before its error):

* at most :data:`MAX_YAML_BYTES` bytes, checked with ``stat`` before reading;
* no aliases (``*name``): refused while composing, before anything is expanded;
* UTF-8 text only (a binary file is one error line, not a ``UnicodeDecodeError``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

MAX_YAML_BYTES = 4 * 1024 * 1024  # a realised 50-client x 500-subchannel scenario is about 1.1 MB
MAX_ECHO_CHARS = 200  # error messages quote at most this much of a user's value


DATA_FILE_SUFFIXES = (".csv", ".jsonl")  # what a local E2E data file may be (sflllm.data reads both)


class FileInputError(ValueError):
    """A file that cannot be read or written as asked; the message names it."""


def echo(value: Any, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters (``...`` and the full length when cut), for error messages."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


# ---------------------------------------------------------------------------------------------- YAML


def yaml_engine():
    """ruamel's safe, pure YAML 1.2 loader/dumper (``1e-3`` is a float, ``no`` a string), aliases refused."""
    from ruamel.yaml import YAML
    from ruamel.yaml.composer import Composer, ComposerError
    from ruamel.yaml.events import AliasEvent

    class NoAliasComposer(Composer):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.parser.check_event(AliasEvent):
                event = self.parser.peek_event()
                raise ComposerError(None, None, f"alias *{event.anchor[:40]} refused: aliases are not supported, "
                                    "write the value out", event.start_mark)
            return super().compose_node(parent, index)

    yaml = YAML(typ="safe", pure=True)
    yaml.Composer = NoAliasComposer
    return yaml


def load_yaml(path: str | Path, what: str) -> Any:
    """The document in the YAML 1.2 file ``path`` (None when empty), within the limits above.

    ``what`` names the file's role in every message (``scenario``, ``config file``).
    """
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    path = Path(path)
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise FileInputError(f"{what} {path}: is a folder, not a file")
        if size > MAX_YAML_BYTES:
            raise FileInputError(f"{what} {path}: {size / 2**20:.1f} MiB exceeds the limit of "
                                 f"{MAX_YAML_BYTES / 2**20:.0f} MiB for a YAML file")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileInputError(f"{what} {path}: file not found") from None
    except OSError as err:
        raise FileInputError(f"{what} {path}: cannot read ({_reason(err)})") from None
    except UnicodeDecodeError as err:
        raise FileInputError(f"{what} {path}: not a UTF-8 text file (byte {err.start})") from None
    try:
        return yaml_engine().load(text)
    except MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(err.problem or err.context or "").split())
        raise FileInputError(f"{what} {path}: invalid YAML{where}: {problem[:MAX_ECHO_CHARS]}") from None
    except YAMLError as err:
        raise FileInputError(f"{what} {path}: invalid YAML: {' '.join(str(err).split())[:MAX_ECHO_CHARS]}") from None


# ---------------------------------------------------------------------------------------------- writing


def ensure_output_dir(path: str | Path, what: str) -> Path:
    """Create the folder ``path`` (and its parents) or raise FileInputError naming it and why.

    ``what`` names the option (``--output``, ``--plot``) in the message.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FileInputError(f"{what} {path}: exists and is not a folder") from None
    except OSError as err:
        raise FileInputError(f"{what} {path}: cannot create the folder ({_reason(err)})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FileInputError(f"{what} {path}: folder is not writable")
    return path


def check_creatable_dir(path: str | Path, what: str) -> None:
    """Raise FileInputError unless the folder ``path`` exists writable or could be created. Creates nothing.

    For checks before any work: the nearest existing ancestor must be a writable folder.
    """
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise FileInputError(f"{what} {path}: cannot create the folder ({probe} is not a folder)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FileInputError(f"{what} {path}: {probe} is not writable")


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, fsync, ``os.replace``.

    The file gets mode 0666 & ~umask (0644 usually), like ``open()``. Any OSError (read-only file
    system, a parent that is a file, disk full) becomes a FileInputError naming ``path``; the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise FileInputError(f"cannot write {path}: {_reason(err)}") from None


def local_data_file(source: str | Path) -> Path | None:
    """The local file a data source names: a path ending in .csv or .jsonl, or any path that exists;
    None for a Hugging Face hub dataset name.  A local source never falls back to the hub."""
    path = Path(source)
    return path if path.suffix.lower() in DATA_FILE_SUFFIXES or path.exists() else None


def check_data_source(source: str | None) -> str | None:
    """``source`` unchanged, or ValueError when it names a local file that is missing or not a file
    (torch-free, so ``sflllm train`` / ``run`` / ``calibrate`` report it before anything heavy loads)."""
    path = None if source is None else local_data_file(source)
    if path is not None and not path.is_file():
        problem = "not a file" if path.exists() else "no such file"
        raise ValueError(f"{problem}: {echo(str(path))} (expected an E2E .csv or .jsonl file, or a hub dataset name)")
    return source
