"""A Flower deployment of `sflllm train` (sflllm.flower.deployment, sflllm.experiments.deployment):
SuperLink and SuperNodes as real processes on 127.0.0.1 with TLS and SuperNode authentication.

The slow tests start a SuperLink and three SuperNodes (each in its own process group, ports chosen
free at run time, Flower's home in a temporary folder) and stop every process group they started,
by its id, in a fixture's teardown; scripts/local-deployment.sh does the same on its own.  The fast
tests check the decoding of the round message and of the reply (the new decoding that the Flower
message path adds; the data plane's own malformed payloads are tested in test_deploy_dataplane.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower comes with the flower extra (pip install 'sflllm[flower]')")
pytest.importorskip("grpc", reason="grpcio comes with the flower extra")
pytest.importorskip("cryptography", reason="cryptography comes with the flower extra")

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from flwr.app import Array, ConfigRecord, MetricRecord, RecordDict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sflllm.deploy import close_round, self_signed_certificate  # noqa: E402
from sflllm.experiments.config import TrainConfig  # noqa: E402
from sflllm.experiments.train import prepare, run_train  # noqa: E402
from sflllm.flower.deployment import (  # noqa: E402
    RoundReply,
    RoundTask,
    read_reply,
    read_task,
    reply_content,
    task_content,
)
from sflllm.flower.records import tensors_to_record  # noqa: E402
from sflllm.sfl import split_iteration  # noqa: E402
from sflllm.sfl.federation import check_state, client_state, training  # noqa: E402
from test_sfl_protocol import data  # noqa: E402,F401 - fixture (tokenizer: conftest)
from test_sfl_protocol import federation as split_and_federation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local-deployment.sh"
APP = REPO / "flower-app"
CHECKPOINTS = ("client_adapter.safetensors", "server_adapter.safetensors", "state.safetensors")
# a small run; LoRA dropout on, so that `sflllm train`'s default client_batching (auto) runs the clients
# one by one, as each ClientApp does: the deployment then equals it bit for bit
SMALL = {"clients": 3, "rounds": 2, "local_steps": 2, "batch_size": 4, "train_samples": 48, "eval_samples": 8,
         "lora_dropout": 0.1}


# ------------------------------------------------------------------------- the messages (fast)
@pytest.fixture(scope="module")
def fed(tokenizer, data):  # noqa: F811 - the fixture imported above
    return split_and_federation(tokenizer, data)[1]


def task(fed, **changes) -> RoundTask:
    fields = dict(round_index=1, config_json="{}", address="127.0.0.1:5", root_certificate=b"PEM", token="t",
                  timeout=30.0, adapter=fed.clients[0].adapter.tensors, state=client_state(0, fed.clients[0]))
    return RoundTask(**(fields | changes))


def test_round_message_and_reply_round_trip(fed):
    got = read_task(task_content(task(fed)))
    assert (got.round_index, got.address, got.root_certificate, got.token, got.timeout) == (1, "127.0.0.1:5", b"PEM",
                                                                                            "t", 30.0)
    assert all(torch.equal(got.adapter[n], t) for n, t in fed.clients[0].adapter.tensors.items())
    assert got.state.keys() == client_state(0, fed.clients[0]).keys()
    assert read_task(task_content(task(fed, state=None))).state is None
    k, client = 1, fed.clients[1]
    reply = read_reply(reply_content(RoundReply(client.adapter.tensors, client_state(k, client), client.num_examples)),
                       k, fed)
    assert reply.num_examples == client.num_examples == 9


def _bad_array(tensor: torch.Tensor, **changes) -> Array:
    record = tensors_to_record({"x": tensor})
    array = record["x"]
    return Array(**{"dtype": array.dtype, "shape": tuple(array.shape), "stype": array.stype, "data": array.data}
                 | changes)


@pytest.mark.parametrize(("spoil", "message"), [
    ("dtype", r"global adapter key '.*': expected \((\d+), (\d+)\) torch.float32, got \(\1, \2\) torch.float64"),
    ("shape", r"global adapter key '.*': expected \(\d+, \d+\) torch.float32, got \(\d+, \d+\) torch.float32"),
    ("truncated", r"global adapter.*: \d+ bytes for shape .*, expected \d+"),
    ("tenfold", r"global adapter.*: \d+ bytes for shape .*, expected \d+"),
    ("pickle", r"unsupported array \(stype 'numpy.ndarray'"),
])
def test_a_client_rejects_a_malformed_global_adapter(fed, spoil, message):
    """The ClientApp's checks (read_task, then check_state against its own adapter) refuse a wrong dtype,
    a wrong shape, truncated bytes and 10x the expected bytes, naming the field; no pickle is accepted."""
    adapter = dict(fed.clients[0].adapter.tensors)
    name = sorted(adapter)[0]
    content = task_content(task(fed, adapter=adapter))
    t = adapter[name]
    content["adapter"][name] = {
        "dtype": _bad_array(t.double()),
        "shape": _bad_array(t.reshape(-1)[: t.numel() // 2].reshape(t.shape[0], -1).contiguous()),
        "truncated": _bad_array(t, data=_bad_array(t).data[:-3]),
        "tenfold": _bad_array(t, data=_bad_array(t).data * 10),
        "pickle": _bad_array(t, stype="numpy.ndarray"),
    }[spoil]
    with pytest.raises(ValueError, match=message):
        got = read_task(content, "round message to client 0")
        check_state(got.adapter, fed.clients[0].adapter.tensors, "round message to client 0: global adapter")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("round", "1", r"round.round must be int, got str"),
    ("token", b"t", r"round.token must be str, got bytes"),
    ("timeout", -1.0, r"round.timeout a positive number"),
    ("root-certificate", "PEM", r"round.root-certificate must be bytes, got str"),
])
def test_a_client_rejects_a_malformed_round_config(fed, field, value, message):
    content = task_content(task(fed))
    content["round"][field] = value
    with pytest.raises(ValueError, match=message):
        read_task(content, "round message")
    del content["round"]
    with pytest.raises(ValueError, match="round message: no 'round' ConfigRecord"):
        read_task(content, "round message")


def test_the_federated_server_rejects_a_malformed_reply(fed):
    k, client = 2, fed.clients[2]
    good = RoundReply(client.adapter.tensors, client_state(k, client), client.num_examples)
    with pytest.raises(ValueError, match=r"client 2: reply: meta.num_examples is 80, expected 8 \(D_k\)"):
        read_reply(reply_content(RoundReply(good.adapter, good.state, 80)), k, fed)
    with pytest.raises(ValueError, match=r"client 2: reply: state is missing key 'client.2.adamw"):
        read_reply(reply_content(RoundReply(good.adapter, {n: t for n, t in good.state.items() if ".adamw." not in n},
                                            8)), k, fed)
    other = {n: t + 1 for n, t in good.adapter.items()}
    with pytest.raises(ValueError, match="client 2: reply: the adapter differs from the adapter in its state"):
        read_reply(reply_content(RoundReply(other, good.state, 8)), k, fed)
    content = reply_content(good)
    content["meta"] = ConfigRecord({"num_examples": 8})
    with pytest.raises(ValueError, match=r"meta.num_examples is None"):
        read_reply(content, k, fed)
    with pytest.raises(ValueError, match="client 2: reply: no 'state' record"):
        read_reply(RecordDict({"adapter": content["adapter"], "meta": MetricRecord({"num_examples": 8})}), k, fed)


def test_engine_flower_deployment_runs_only_inside_a_server_app(tmp_path):
    from typer.testing import CliRunner

    from sflllm.cli import app

    result = CliRunner().invoke(app, ["train", "--engine", "flower-deployment", "--rounds", "1", "--output",
                                      str(tmp_path / "o")])
    assert result.exit_code == 2 and not (tmp_path / "o").exists()
    assert "engine: 'flower-deployment' runs inside a Flower ServerApp" in result.output


@pytest.mark.parametrize(("run_config", "message"), [
    ({"output-dir": "x", "round": 2}, "run config: unknown key 'round'"),
    ({}, "run config output-dir: required"),
    ({"output-dir": "x", "rounds": "2"}, "run config rounds: expected int, got '2'"),
    ({"output-dir": "x", "client-timeout": 0}, "run config client-timeout: expected a positive number of seconds"),
    ({"output-dir": "x", "dataplane-certfile": "missing.pem"}, "run config dataplane-certfile: cannot read missing.pem"),
])
def test_a_bad_run_config_is_one_clear_error(run_config, message, tmp_path, monkeypatch):
    from sflllm.experiments.config import TrainInputError
    from sflllm.experiments.deployment import run_deployment

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainInputError, match=message):
        run_deployment(None, run_config)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- processes (slow)
def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_key(path: Path) -> Path:
    """An ECDSA P-384 SuperNode key pair in OpenSSH format at ``path`` (private) and ``path``.pub."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    path.with_suffix(".pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                        serialization.PublicFormat.OpenSSH))
    return path


def processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, command line) of the live (not zombie) processes."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z":
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found[int(entry.name)] = (int(fields[1]), int(fields[2]), cmd)
        except (OSError, ValueError):
            continue
    return found


def tree(pid: int) -> dict[int, str]:
    """pid -> command line of ``pid``, its process group and their descendants (Flower starts its
    SuperExec, ServerApp and ClientApp processes in sessions of their own)."""
    table = processes()
    found = {p for p, (_, group, _) in table.items() if group == pid} | ({pid} & table.keys())
    while True:
        more = {p for p, (parent, _, _) in table.items() if parent in found} - found
        if not more:
            return {p: table[p][2] for p in found}
        found |= more


def signal_tree(pid: int, sig: int) -> None:
    for p in tree(pid):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


class LocalFederation:
    """A SuperLink and K SuperNodes on 127.0.0.1 (TLS, SuperNode authentication); every process is
    started in its own process group, which :meth:`stop` ends by its id."""

    def __init__(self, root: Path, clients: int) -> None:
        self.root, self.clients = root, clients
        self.env = os.environ | {"FLWR_HOME": str(root / "flwr-home"), "HF_HUB_OFFLINE": "1",
                                 "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests"),
                                                                os.environ.get("PYTHONPATH", "")])}
        (root / "flwr-home").mkdir(parents=True)
        certificate, key = self_signed_certificate(("127.0.0.1",))
        self.ca = root / "ca.pem"
        self.ca.write_bytes(certificate)
        (root / "server.key").write_bytes(key)
        self.ports = free_ports(clients + 1)
        self.link = f"127.0.0.1:{self.ports[0]}"
        (root / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{self.link}"\n'
            f'root-certificates = "{self.ca}"\n')
        self.groups: list[int] = []
        self.nodes: dict[int, subprocess.Popen] = {}
        self.keys = [node_key(root / f"client{k}") for k in range(clients)]

    def popen(self, name: str, *args: str | Path) -> subprocess.Popen:
        proc = subprocess.Popen([str(a) for a in args], env=self.env, start_new_session=True,
                                stdout=open(self.root / f"{name}.log", "ab"), stderr=subprocess.STDOUT)
        self.groups.append(proc.pid)
        return proc

    def start(self) -> None:
        self.superlink = self.popen("superlink", "flower-superlink", "--port", self.ports[0],
                                    "--ssl-ca-certfile", self.ca, "--ssl-certfile", self.ca,
                                    "--ssl-keyfile", self.root / "server.key", "--enable-supernode-auth",
                                    "--disable-runtime-dependency-installation")
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.ports[0]), timeout=1).close()
                break
            except OSError:
                assert self.superlink.poll() is None and time.monotonic() < deadline, self.log("superlink")
                time.sleep(0.2)
        for k, key in enumerate(self.keys):
            subprocess.run(["flwr", "supernode", "register", str(key.with_suffix(".pub")), "local"], env=self.env,
                           check=True, capture_output=True, timeout=60)
            self.start_node(k)

    def start_node(self, k: int, key: Path | None = None, name: str | None = None) -> subprocess.Popen:
        args = ["flower-supernode", "--superlink", self.link, "--root-certificates", self.ca,
                "--port", self.ports[k + 1] if key is None else free_ports(1)[0],
                "--node-config", f"partition-id={k} num-partitions={self.clients}"]
        if key is not False:
            args += ["--auth-supernode-private-key", key or self.keys[k]]
        proc = self.popen(name or f"supernode{k}", *args)
        if key is None:
            self.nodes[k] = proc
        return proc

    def stop(self) -> None:
        """SIGTERM to every process started here and their descendants, SIGKILL to those left after 10 s."""
        started = {p: None for pid in self.groups for p in tree(pid)}
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (left := started.keys() & processes().keys()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def run(self, out: Path, config: Path, name: str = "run", **run_config) -> subprocess.Popen:
        """``flwr run flower-app local --stream`` of a run writing to ``out``."""
        values = {"output-dir": str(out), "config-file": str(config), "client-timeout": 30.0} | run_config
        spec = " ".join(f"{k}={json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
                        for k, v in values.items())
        return self.popen(name, "flwr", "run", APP, "local", "--stream", "--run-config", spec)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "small.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in SMALL.items()))
    return path


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """`sflllm train` of the small config, in process (the engine every deployment must equal)."""
    out = tmp_path_factory.mktemp("local") / "run"
    run_train(TrainConfig(**SMALL), out, progress=False)
    return out


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    federation = LocalFederation(tmp_path_factory.mktemp("flower"), SMALL["clients"])
    try:
        federation.start()
        yield federation
    finally:
        federation.stop()


def wait(proc: subprocess.Popen, federation: LocalFederation, name: str, timeout: float = 400) -> None:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} did not finish within {timeout} s:\n{federation.log(name)}")
    assert rc == 0, federation.log(name)


def same_checkpoints(a: Path, b: Path, names=CHECKPOINTS) -> None:
    for name in names:
        got, want = load_file(a / name), load_file(b / name)
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), (name, [k for k in want if not torch.equal(got[k], want[k])])


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                    reason="scripts/local-deployment.sh needs openssl and ssh-keygen")
def test_local_deployment_script_equals_sflllm_train(tmp_path, small_config, local_run):
    """scripts/local-deployment.sh (SuperLink with TLS and SuperNode auth, 3 SuperNodes, 2 rounds) writes
    the checkpoints of `sflllm train` with the same config bit for bit, and metrics.json with the same
    losses and an empty "dropped" per round; it leaves no process and no temporary folder behind."""
    out = tmp_path / "deployed"
    env = os.environ | {"TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["bash", str(SCRIPT), str(out), "--clients", "3", "--rounds", "2", "--config",
                             str(small_config)], env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    same_checkpoints(out, local_run)
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, local_run))
    assert [r.pop("dropped") for r in got["rounds"]] == [{}, {}]
    for r in got["rounds"] + want["rounds"]:
        r.pop("wall_time_s")
    assert got == want
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("sflllm-deployment")] == []
    assert "SuperLink on 127.0.0.1:" in result.stdout


@pytest.mark.slow
def test_an_unauthenticated_supernode_is_refused(deployment):
    """A SuperNode whose key was never registered, and one without a key, cannot join."""
    for name, key, message in (("rogue", node_key(deployment.root / "rogue"), "Failed to activate SuperNode"),
                               ("keyless", False, "All SuperNodes must be registered")):
        proc = deployment.start_node(0, key=key, name=name)
        try:
            assert proc.wait(60) != 0
        except subprocess.TimeoutExpired:
            pytest.fail(f"the {name} SuperNode was not refused within 60 s:\n{deployment.log(name)}")
        assert message in deployment.log(name)


def reference_without_client_2_in_round_1(config: TrainConfig, out: Path) -> dict[str, torch.Tensor]:
    """In process: round 1 with clients 0 and 1 only (FedAvg renormalised over them, broadcast to all),
    round 2 with all three; the federation's state."""
    fed = prepare(config).federation
    with training(fed.split.full):
        for _ in range(config.local_steps):
            split_iteration(fed.split.client, fed.split.server, fed.clients[:2], fed.servers, fed.server_rng,
                            fed.cut_spec)
    close_round(fed, 0, [1.0], [0, 1], {2: "killed"})
    fed.run_round(1)
    return fed.state_dict()


@pytest.mark.slow
def test_a_client_killed_mid_round_is_dropped_and_rejoins(deployment, small_config, tmp_path):
    """Client 2's ClientApp process, which has round 1's message, is killed (SIGKILL) and its SuperNode
    stopped: the round completes with clients 0 and 1, FedAvg renormalised over them, and metrics.json
    says so; restarted with the same key, the node rejoins in round 2 and gets its state back.  The
    result equals that schedule in process bit for bit."""
    out = tmp_path / "run"
    run = deployment.run(out, small_config, "drop", **{"client-timeout": 15.0})
    node = deployment.nodes[2]
    try:
        deadline = time.monotonic() + 300
        while "engine flower-deployment: started" not in deployment.log("drop"):  # every node said hello
            assert run.poll() is None and time.monotonic() < deadline, deployment.log("drop")
            time.sleep(0.05)
        hello = set(tree(node.pid))  # a ClientApp process that answered hello may linger
        while not any("flwr-clientapp" in cmd for pid, cmd in tree(node.pid).items() if pid not in hello):
            assert run.poll() is None and time.monotonic() < deadline, deployment.log("drop")
            time.sleep(0.05)
        for pid in set(tree(node.pid)) - {node.pid}:
            os.kill(pid, signal.SIGKILL)  # its ClientApp process (and SuperExec): the client dies mid-round
        node.terminate()  # its SuperNode leaves (a SIGKILLed one could rejoin only once Flower's
        node.wait(30)  # heartbeat timeout, 2 x 30 s, has passed: see docs/deployment.md)
        deployment.start_node(2)  # back during round 1: it joins round 2
        wait(run, deployment, "drop")
    finally:
        signal_tree(run.pid, signal.SIGKILL)
    metrics = json.loads((out / "metrics.json").read_text())
    (r1, r2) = metrics["rounds"]
    assert list(r1["dropped"]) == ["2"] and "no activations for iteration 0" in r1["dropped"]["2"], r1
    assert r1["samples"] == 2 * SMALL["local_steps"] * SMALL["batch_size"] and r2["dropped"] == {}
    want = reference_without_client_2_in_round_1(TrainConfig(**SMALL), out)
    got = load_file(out / "state.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]


@pytest.mark.slow
def test_a_killed_main_server_resumes_from_its_last_checkpoint(deployment, small_config, local_run, tmp_path):
    """The ServerApp process is killed after round 1's checkpoint; `flwr run` with resume=true continues
    from it (the clients get their states from the checkpoint) and the result equals the
    uninterrupted `sflllm train` bit for bit."""
    out = tmp_path / "run"
    first = deployment.run(out, small_config, "first")
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.json").exists():  # written last of round 1's checkpoint
            assert first.poll() is None and time.monotonic() < deadline, deployment.log("first")
            time.sleep(0.1)
        servers = [pid for pid, cmd in tree(deployment.superlink.pid).items() if "flwr-serverapp" in cmd]
        assert len(servers) == 1, tree(deployment.superlink.pid)
        os.kill(servers[0], signal.SIGKILL)
    finally:
        signal_tree(first.pid, signal.SIGKILL)
    assert len(json.loads((out / "metrics.json").read_text())["rounds"]) == 1
    second = deployment.run(out, small_config, "second", resume=True)
    try:
        wait(second, deployment, "second")
    finally:
        signal_tree(second.pid, signal.SIGKILL)
    same_checkpoints(out, local_run)
    assert [r["round"] for r in json.loads((out / "metrics.json").read_text())["rounds"]] == [1, 2]
