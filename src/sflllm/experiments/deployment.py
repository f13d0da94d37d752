"""``sflllm train`` as a Flower deployment: the ServerApp and ClientApp that ``flwr run`` starts.

``flower-app/pyproject.toml`` points Flower at :data:`server_app` and :data:`client_app`.  The
ServerApp runs :func:`~sflllm.experiments.train.run_train` (or ``resume_train``) with engine
``flower-deployment``: the same preparation, per-round evaluation, checkpoints (the safetensors
files of ``sflllm train``, after every completed round) and ``metrics.json``, with the rounds run by
:class:`~sflllm.flower.FlowerDeployment` (one Flower message per client per round, the cut exchanges
over the gRPC data plane).  A ServerApp that was killed is restarted with ``resume=true``: it
continues from the last completed round's checkpoint in ``output-dir``.  Each ClientApp rebuilds its
part of the run from the TrainConfig in the round message and its node's ``partition-id``.

The run config (``flwr run ... --run-config 'key=value ...'``, keys of ``[tool.flwr.app.config]``):
``output-dir`` (required, on the ServerApp's machine), ``config-file`` (a YAML TrainConfig as for
``sflllm train --config``; empty: the defaults), ``clients`` and ``rounds`` (0: the config's),
``resume``, ``dataplane-bind``, ``dataplane-host``, ``dataplane-certfile``, ``dataplane-keyfile``,
``dataplane-ca-certfile`` (empty: a throw-away self-signed certificate), ``client-timeout``,
``round-timeout``, ``ready-timeout`` (seconds).  See docs/deployment.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from sflllm.experiments.config import TrainConfig, TrainInputError, read_config_file, resolve_config
from sflllm.experiments.train import client_federation, resume_train, run_train
from sflllm.flower.deployment import DeploymentSettings, FlowerDeployment, make_deployment_client_app
from sflllm.sfl import Federation

ENGINE = "flower-deployment"
RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "output-dir": "", "config-file": "", "clients": 0, "rounds": 0, "resume": False,
    "dataplane-bind": "127.0.0.1:0", "dataplane-host": "127.0.0.1", "dataplane-certfile": "",
    "dataplane-keyfile": "", "dataplane-ca-certfile": "", "client-timeout": 60.0, "round-timeout": 3600.0,
    "ready-timeout": 300.0,
}


def _value(run_config: Mapping[str, Any], key: str) -> Any:
    default = RUN_CONFIG_DEFAULTS[key]
    value = run_config.get(key, default)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise TrainInputError(f"run config {key}: expected {type(default).__name__}, got {value!r}")
    if isinstance(value, float) and not value > 0:
        raise TrainInputError(f"run config {key}: expected a positive number of seconds, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise TrainInputError(f"run config {key}: expected 0 or more, got {value!r}")
    return value


def _read(run_config: Mapping[str, Any], key: str) -> bytes | None:
    path = _value(run_config, key)
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TrainInputError(f"run config {key}: cannot read {path}: {e.strerror or e}") from None


def deployment_settings(run_config: Mapping[str, Any]) -> DeploymentSettings:
    """The data plane's settings from the run config; TrainInputError naming the key."""
    tls = [_read(run_config, key) for key in ("dataplane-certfile", "dataplane-keyfile", "dataplane-ca-certfile")]
    if (tls[0] is None) != (tls[1] is None):
        raise TrainInputError("run config dataplane-certfile and dataplane-keyfile: give both or neither")
    return DeploymentSettings(
        bind=_value(run_config, "dataplane-bind"), host=_value(run_config, "dataplane-host"),
        certificate=tls[0], private_key=tls[1], root_certificate=tls[2],
        client_timeout=_value(run_config, "client-timeout"), round_timeout=_value(run_config, "round-timeout"),
        ready_timeout=_value(run_config, "ready-timeout"),
    )


def train_overrides(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields the run config sets: the engine, and ``clients``/``rounds`` unless 0."""
    overrides: dict[str, Any] = {"engine": ENGINE}
    for key in ("clients", "rounds"):
        if value := _value(run_config, key):
            overrides[key] = value
    return overrides


def run_deployment(grid: Grid, run_config: Mapping[str, Any], console: Console | None = None) -> None:
    """Train (or, with ``resume``, continue) the run of ``run_config`` with the clients behind ``grid``."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG_DEFAULTS))
    if unknown:
        raise TrainInputError(f"run config: unknown key {unknown[0]!r} (known: {', '.join(RUN_CONFIG_DEFAULTS)})")
    out = _value(run_config, "output-dir")
    if not out:
        raise TrainInputError("run config output-dir: required (where metrics.json and the checkpoints go)")
    settings = deployment_settings(run_config)
    overrides = train_overrides(run_config)
    console = console or Console(soft_wrap=True)

    def engine(config: TrainConfig, federation: Federation) -> FlowerDeployment:
        return FlowerDeployment(federation, grid, config.model_dump_json(), settings)

    if _value(run_config, "resume"):
        resume_train(Path(out), overrides, console=console, progress=False, make_engine=engine)
        return
    file = _value(run_config, "config-file")
    config = resolve_config(read_config_file(Path(file)) if file else {}, overrides, source=file or "run config")
    run_train(config, Path(out), console=console, progress=False, make_engine=engine)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run_deployment(grid, dict(context.run_config))
    except TrainInputError as e:
        print(f"error: {e}", flush=True)
        raise SystemExit(2) from None


client_app = make_deployment_client_app(client_federation)

__all__ = ["RUN_CONFIG_DEFAULTS", "client_app", "deployment_settings", "run_deployment", "server_app",
           "train_overrides"]
