"""The gRPC data plane (sflllm.deploy): TLS + token, rounds equal to the in-process engine, malformed
payloads refused while the server keeps serving, a client that stops responding dropped from its round.

Everything listens on 127.0.0.1 on a port the OS picks (port 0); every server is stopped in a
fixture/``finally``.  Clients run in threads of this process (the parties share torch's global RNG,
so they compute under one lock).
"""

from __future__ import annotations

import logging
import queue
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors.torch
import torch

grpc = pytest.importorskip("grpc", reason="grpcio comes with the flower extra (pip install 'sflllm[flower]')")
pytest.importorskip("cryptography", reason="cryptography comes with the flower extra")

from safetensors.torch import load_file  # noqa: E402

from sflllm.deploy import (  # noqa: E402
    DataPlaneClient,
    DataPlaneError,
    MainServerPlane,
    activation_limit,
    broadcast_average,
    client_round,
    encode_activations,
    federated_round,
    self_signed_certificate,
    serve,
)
from sflllm.deploy.dataplane import CLIENT_KEY, EXCHANGE, ITERATION_KEY, ROUND_KEY, TOKEN_KEY, encode  # noqa: E402
from sflllm.experiments.config import TrainConfig, TrainInputError, resolve_config  # noqa: E402
from sflllm.experiments.train import resume_train, run_train  # noqa: E402
from sflllm.sfl import client_step_forward, split_iteration  # noqa: E402
from sflllm.sfl.federation import training  # noqa: E402
from test_sfl_protocol import data  # noqa: E402,F401 - fixture (tokenizer: conftest)
from test_sfl_protocol import federation as split_and_federation  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

TOKEN = "run-token-4f2a"
MAIN_SERVER_PROCESS = Path(__file__).with_name("dataplane_main_server.py")
CLIENT_PROCESS = Path(__file__).with_name("dataplane_client.py")


@pytest.fixture(scope="module")
def tls():
    return self_signed_certificate(("localhost", "127.0.0.1"))


def federation(tokenizer, data, **hyper):
    """3 clients (7, 9, 8 examples), tiny GPT-2 with dropout 0.2, I=2, b=4."""
    return split_and_federation(tokenizer, data, **hyper)[1]


@contextmanager
def main_server(fed, tls, lock=None, client_timeout=30.0):
    plane = MainServerPlane(fed.split.server, fed.servers, fed.server_rng, fed.cut_spec, TOKEN,
                            client_timeout=client_timeout, compute_lock=lock)
    server, port = serve(plane, "127.0.0.1:0", tls[0], tls[1])
    try:
        yield plane, f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait(10)


@contextmanager
def data_plane_clients(address, tls, fed, tokens=None):
    planes = [DataPlaneClient(address, tls[0], TOKEN if tokens is None else tokens[k], k, fed.cut_spec, timeout=60)
              for k in range(fed.num_clients)]
    try:
        yield planes
    finally:
        for plane in planes:
            plane.close()


@contextmanager
def served_federation(tokenizer, data, tls, client_timeout=30.0, **hyper):
    """A fresh federation, its main server on a free port, its clients' ends of the data plane and
    the lock the parties compute under: ``(fed, lock, plane, planes)``."""
    fed, lock = federation(tokenizer, data, **hyper), threading.Lock()
    with main_server(fed, tls, lock, client_timeout) as (plane, address), \
            data_plane_clients(address, tls, fed) as planes:
        yield fed, lock, plane, planes


def reference_dropping_client_1_at_iteration_1(tokenizer, data, *, its_last_forward: bool):
    """In process: round 0's iteration 0 with all three clients, iteration 1 with clients 0 and 2
    (client 1, dropped, computes its forward or not), FedAvg over clients 0 and 2 broadcast to all."""
    reference = federation(tokenizer, data)
    c = reference.clients
    with training(reference.split.full):
        split_iteration(reference.split.client, reference.split.server, c, reference.servers,
                        reference.server_rng, reference.cut_spec)
        if its_last_forward:
            client_step_forward(reference.split.client, c[1])  # a forward whose payload never leaves
        split_iteration(reference.split.client, reference.split.server, [c[0], c[2]], reference.servers,
                        reference.server_rng, reference.cut_spec)
    broadcast_average([c[0].adapter, c[2].adapter], [7, 8], reference.client_adapters)
    return reference


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("server_adapter", ["shared", "per_client"])
def test_rounds_over_the_data_plane_equal_the_in_process_engine(server_adapter, tokenizer, data, tls):
    """Dropout 0.2, 3 clients, 2 rounds of 2 iterations: adapters, AdamW moments, cursors and every
    party's RNG state equal the in-process Federation's bit for bit; the losses match."""
    reference = federation(tokenizer, data, server_adapter=server_adapter)
    expected = [reference.run_round(r) for r in range(2)]
    with served_federation(tokenizer, data, tls, server_adapter=server_adapter) as (fed, lock, plane, planes):
        got = [federated_round(fed, plane, planes, r, compute_lock=lock) for r in range(2)]
    assert_same_state(fed, reference)
    for g, e in zip(got, expected, strict=True):
        assert g["dropped"] == {}
        assert g["samples"] == e["samples"] and g["train_loss"] == pytest.approx(e["train_loss"], rel=1e-12)


# ------------------------------------------------------------------------- authentication
def one_exchange(plane, fed, client_plane, iteration=0):
    """Open a one-client, one-iteration round and run client 0's forward and exchange."""
    plane.begin_round(iteration, [0], 1)
    with training(fed.split.full):
        _, cut = client_step_forward(fed.split.client, fed.clients[0])
    grads = client_plane.exchange(cut, iteration, 0)
    plane.end_round()
    return cut, grads


@pytest.mark.parametrize("token", ["", "not-the-token", TOKEN + "x"])
def test_a_wrong_or_missing_token_is_refused_and_the_server_keeps_serving(token, tokenizer, data, tls, caplog):
    fed = federation(tokenizer, data)
    with main_server(fed, tls) as (plane, address), \
            data_plane_clients(address, tls, fed, tokens=[token, TOKEN, TOKEN]) as planes:
        good = DataPlaneClient(address, tls[0], TOKEN, 0, fed.cut_spec, timeout=60)
        try:
            with caplog.at_level(logging.WARNING, logger="sflllm.deploy"), \
                    pytest.raises(DataPlaneError, match="missing or wrong data-plane token") as refused:
                one_exchange(plane, fed, planes[0])
            assert refused.value.code == "UNAUTHENTICATED"
            assert "UNAUTHENTICATED" in caplog.text
            cut, grads = one_exchange(plane, fed, good, iteration=1)
        finally:
            good.close()
    assert grads.grad.shape == cut.hidden.shape and grads.grad.dtype == cut.hidden.dtype
    assert float(grads.grad.abs().sum()) > 0


def test_tls_is_required_and_checked(tokenizer, data, tls):
    """A plaintext client gets no answer, and neither does one that trusts another certificate."""
    fed = federation(tokenizer, data)
    other_ca, _ = self_signed_certificate(("127.0.0.1",))
    with main_server(fed, tls) as (plane, address):
        plane.begin_round(0, [0], 1)
        with training(fed.split.full):
            _, cut = client_step_forward(fed.split.client, fed.clients[0])
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as plain:
            channel.unary_unary(EXCHANGE)(encode_activations(cut), timeout=10,
                                          metadata=((TOKEN_KEY, TOKEN), (CLIENT_KEY, "0"), (ROUND_KEY, "0"),
                                                    (ITERATION_KEY, "0")))
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
        untrusting = DataPlaneClient(address, other_ca, TOKEN, 0, fed.cut_spec, timeout=10)
        try:
            with pytest.raises(DataPlaneError) as refused:
                untrusting.exchange(cut, 0, 0)
        finally:
            untrusting.close()
        assert refused.value.code == "UNAVAILABLE"


# ------------------------------------------------------------------------- malformed payloads
def malformed(cut):
    """name -> (request bytes, expected status, message pattern)."""
    b, s, d = cut.hidden.shape
    valid = encode_activations(cut)
    fields = cut.to_tensors()
    return {
        "wrong dtype": (encode(fields | {"hidden": cut.hidden.half()}), "INVALID_ARGUMENT",
                        r"hidden has \(4, 96, 32\) torch\.float16"),
        "wrong shape": (encode(fields | {"hidden": cut.hidden[:, :, : d // 2]}), "INVALID_ARGUMENT",
                        r"hidden has \(4, 96, 16\)"),
        "labels shape": (encode(fields | {"labels": cut.labels[:, :-1]}), "INVALID_ARGUMENT",
                         r"labels has \(4, 95\)"),
        "missing field": (encode({"hidden": cut.hidden, "labels": cut.labels}), "INVALID_ARGUMENT",
                          r"fields \['hidden', 'labels'\], expected"),
        "found_inf not a flag": (encode(fields | {"found_inf": torch.tensor([2], dtype=torch.uint8)}),
                                 "INVALID_ARGUMENT", r"found_inf has \(1,\) torch\.uint8, expected one torch\.uint8 0 or 1"),
        "found_inf on a float32 cut": (encode(fields | {"found_inf": torch.tensor([1], dtype=torch.uint8)}),
                                       "INVALID_ARGUMENT", r"found_inf is True, expected a bool, False for a torch\.float32"),
        "truncated": (valid[:-10], "INVALID_ARGUMENT", "not a valid safetensors payload"),
        "garbage": (b"\x00\x01not a tensor", "INVALID_ARGUMENT", "not a valid safetensors payload"),
        "10x size": (valid * 10, "RESOURCE_EXHAUSTED", "larger than max"),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                                   torch.int32, torch.int8, torch.uint8, torch.bool])
def test_encode_writes_safetensors_that_safetensors_reads_back(dtype):
    """The data plane's one-copy encoder writes safetensors that safetensors' own parser reads back as
    the same tensors (any dtype, mixed widths, an empty, a 0-d and a non-contiguous tensor); with one
    dtype the bytes are exactly safetensors.torch.save's (which orders mixed dtypes its own way)."""
    tensors = {"hidden": torch.randn(3, 5, 4).to(dtype), "mask": torch.ones(3, 5, dtype=torch.int64),
               "empty": torch.zeros(0, 2, dtype=dtype), "scalar": torch.tensor(3).to(dtype),
               "strided": torch.arange(12).reshape(3, 4).t().to(dtype)}
    back = safetensors.torch.load(encode(tensors))
    assert back.keys() == tensors.keys()
    assert all(back[n].dtype == t.dtype and torch.equal(back[n], t) for n, t in tensors.items())
    same = {n: t.contiguous() for n, t in tensors.items() if n != "mask"}
    assert encode(same) == safetensors.torch.save(same)


def test_malformed_payloads_are_refused_and_the_server_keeps_serving(tokenizer, data, tls, caplog):
    """Each malformed message gets a clear error status (logged at the server), changes nothing, and
    a valid exchange afterwards is served."""
    fed = federation(tokenizer, data)
    before = fed.state_dict()
    metadata = ((TOKEN_KEY, TOKEN), (CLIENT_KEY, "0"), (ROUND_KEY, "0"), (ITERATION_KEY, "0"))
    with main_server(fed, tls) as (plane, address):
        plane.begin_round(0, [0], 1)
        with training(fed.split.full):
            _, cut = client_step_forward(fed.split.client, fed.clients[0])
        cases = malformed(cut)
        assert len(cases["10x size"][0]) > 9 * activation_limit(fed.cut_spec)
        credentials = grpc.ssl_channel_credentials(tls[0])
        with grpc.secure_channel(address, credentials, [("grpc.max_send_message_length", -1)]) as channel:
            call = channel.unary_unary(EXCHANGE)
            for name, (request, code, pattern) in cases.items():
                with caplog.at_level(logging.WARNING, logger="sflllm.deploy"), \
                        pytest.raises(grpc.RpcError) as refused:
                    call(request, timeout=30, metadata=metadata)
                assert refused.value.code().name == code, name
                assert re.search(pattern, refused.value.details()), (name, refused.value.details())
                if code == "INVALID_ARGUMENT":
                    assert refused.value.details() in caplog.text, name
            # the server state is untouched and it still serves the valid payload
            after = fed.state_dict()
            assert all(torch.equal(before[n], after[n]) for n in before if not n.startswith(("cursor", "rng.client")))
            reply = call(encode_activations(cut), timeout=30, metadata=metadata)
    assert len(reply) > cut.hidden.numel() * 4


# ------------------------------------------------------------------------- client drop
class StopsResponding:
    """Client k's data plane that, in round ``round_index`` iteration ``iteration``, computes its
    forward but never sends it (until released, then it fails)."""

    def __init__(self, plane, round_index, iteration):
        self.plane, self.round_index, self.iteration = plane, round_index, iteration
        self.spec = plane.spec
        self.stalled, self.release = threading.Event(), threading.Event()

    def exchange(self, cut, round_index, iteration):
        if (round_index, iteration) == (self.round_index, self.iteration):
            self.stalled.set()
            self.release.wait(30)
            raise DataPlaneError("client stopped responding", "UNAVAILABLE")
        return self.plane.exchange(cut, round_index, iteration)


def test_a_client_that_stops_responding_is_dropped_and_fedavg_renormalised(tokenizer, data, tls, caplog):
    """Client 1 stops before sending iteration 1 of round 0: after client_timeout the main server
    goes on with clients 0 and 2; the round's global adapter is the FedAvg of clients 0 and 2 with
    weights D_k / (D_0 + D_2), and the drop is in the round's metrics and the log.  In round 1
    client 1 is back.  Everything equals the same schedule run in process."""
    reference = reference_dropping_client_1_at_iteration_1(tokenizer, data, its_last_forward=True)
    expected_round_1 = reference.run_round(1)

    with served_federation(tokenizer, data, tls, client_timeout=2.0) as (fed, lock, plane, planes):
        stopping, busy = StopsResponding(planes[1], 0, 1), {}
        try:
            with caplog.at_level(logging.WARNING, logger="sflllm.deploy"):
                round_0 = federated_round(fed, plane, [planes[0], stopping, planes[2]], 0, compute_lock=lock,
                                          busy=busy)
            assert stopping.stalled.is_set() and list(busy) == [1]
        finally:
            stopping.release.set()
        busy[1].join(30)
        round_1 = federated_round(fed, plane, planes, 1, compute_lock=lock, busy=busy)
    assert list(round_0["dropped"]) == ["1"]
    assert "no activations for iteration 1 within 2 s" in round_0["dropped"]["1"]
    assert "client 1 dropped" in caplog.text
    assert round_0["samples"] == 2 * 4 * 2  # I * b * the two clients that completed the round
    assert round_1["dropped"] == {} and round_1["samples"] == expected_round_1["samples"]
    assert round_1["train_loss"] == pytest.approx(expected_round_1["train_loss"], rel=1e-12)
    assert_same_state(fed, reference)


# ------------------------------------------------------------------------- sflllm train --engine dataplane
def test_train_engine_dataplane_equals_local_and_resumes(tmp_path):
    """`sflllm train --engine dataplane` (3 clients, dropout on): round 1, then a resumed round 2 with a
    fresh main server and fresh clients, equal the local engine's 2 rounds bit for bit; metrics.json
    records each round's (empty) drops."""
    config = TrainConfig(clients=3, rounds=2, local_steps=2, batch_size=4, train_samples=48, eval_samples=8,
                         lora_dropout=0.1, generate=False)
    local = run_train(config, tmp_path / "local", progress=False)
    run_train(config.model_copy(update={"rounds": 1, "engine": "dataplane"}), tmp_path / "dp", progress=False)
    resumed = resume_train(tmp_path / "dp", {"rounds": 2}, progress=False)
    for name in ("client_adapter.safetensors", "server_adapter.safetensors", "state.safetensors"):
        got, want = load_file(tmp_path / "dp" / name), load_file(tmp_path / "local" / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    for got, want in zip(resumed.metrics["rounds"], local.metrics["rounds"], strict=True):
        assert got["dropped"] == {} and "dropped" not in want
        assert (got["train_loss"], got["heldout_loss"]) == (want["train_loss"], want["heldout_loss"])


def test_engine_dataplane_runs_mode_sfl_only():
    with pytest.raises(TrainInputError, match="engine: 'dataplane' applies to mode 'sfl' only, not 'sl'"):
        resolve_config({"mode": "sl", "engine": "dataplane"}, {})


def test_a_client_still_stuck_sits_rounds_out_and_rejoins_when_it_is_back(tokenizer, data, tls):
    """Client 2 hangs before its first payload of round 0: dropped after client_timeout; in round 1
    it is still hanging, so it sits the round out (no waiting); once it has ended, it takes part in
    round 2.  After every round all three clients hold the same (broadcast) adapter."""
    with served_federation(tokenizer, data, tls, client_timeout=2.0) as (fed, lock, plane, planes):
        stopping, busy = StopsResponding(planes[2], 0, 0), {}
        try:
            round_0 = federated_round(fed, plane, [planes[0], planes[1], stopping], 0, compute_lock=lock, busy=busy)
            round_1 = federated_round(fed, plane, planes, 1, compute_lock=lock, busy=busy)
        finally:
            stopping.release.set()
        busy[2].join(30)
        round_2 = federated_round(fed, plane, planes, 2, compute_lock=lock, busy=busy)
    assert "no activations for iteration 0 within 2 s" in round_0["dropped"]["2"]
    assert round_1["dropped"] == {"2": "still running its part of an earlier round"}
    assert round_0["samples"] == round_1["samples"] == 2 * 4 * 2 and round_2["samples"] == 2 * 4 * 3
    assert round_2["dropped"] == {} and busy == {}
    adapters = [c.adapter.tensors for c in fed.clients]
    assert all(torch.equal(a[n], adapters[0][n]) for a in adapters[1:] for n in a)


# ------------------------------------------------------------------------- across processes
def lines_of(proc) -> queue.Queue:
    """A queue that a daemon thread fills with ``proc``'s output lines (None at the end)."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def expect_line(lines: queue.Queue, prefix: str, output: list[str]) -> str:
    while True:
        line = lines.get(timeout=180)
        assert line is not None, f"the main server process ended before printing {prefix!r}:\n{''.join(output)}"
        output.append(line)
        if line.startswith(prefix):
            return line.strip()


def test_a_main_server_in_its_own_process_serves_a_round_equal_to_the_in_process_one(tokenizer, data, tls, tmp_path):
    """The main server runs in a separate process (stopped by its PID at the end), the 3 clients
    here; round 0 over TLS between the two processes leaves the clients' and the main server's
    state exactly as the in-process round does."""
    reference = federation(tokenizer, data)
    expected = reference.run_round(0)
    want = reference.state_dict()
    (tmp_path / "cert.pem").write_bytes(tls[0])
    (tmp_path / "key.pem").write_bytes(tls[1])
    command = [sys.executable, str(MAIN_SERVER_PROCESS), str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), TOKEN,
               str(tmp_path / "main_server.safetensors")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines, output = lines_of(proc), []
        port = int(expect_line(lines, "port ", output).split()[1])
        fed, lock, failures = federation(tokenizer, data), threading.Lock(), []
        with data_plane_clients(f"127.0.0.1:{port}", tls, fed) as planes, training(fed.split.full):
            def run(k: int) -> None:
                try:
                    client_round(fed.split.client, fed.clients[k], planes[k], 0, fed.hyper.local_steps, lock)
                except Exception as err:  # reported below
                    failures.append(err)

            threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
        assert not failures and not any(t.is_alive() for t in threads), failures
        assert expect_line(lines, "done", output) == "done dropped=[]"
        assert proc.wait(60) == 0, "".join(output)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    broadcast_average([c.adapter for c in fed.clients], fed.data_sizes, fed.client_adapters)
    got = {n: t for n, t in fed.state_dict().items() if not n.startswith(("server.", "rng.main_server"))}
    got |= {n: t for n, t in load_file(tmp_path / "main_server.safetensors").items() if n != "losses"}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want), [n for n in want if not torch.equal(got[n], want[n])]
    losses = load_file(tmp_path / "main_server.safetensors")["losses"]
    assert float(losses.mean()) == pytest.approx(expected["train_loss"], rel=1e-12)


def test_a_client_process_killed_mid_round_is_dropped_and_the_round_completes(tokenizer, data, tls, tmp_path):
    """Client 1 runs in its own process, which is killed (SIGKILL, by its PID) after its first
    iteration of round 0; clients 0 and 2 (threads here) finish the round without it after
    client_timeout, and FedAvg over them gives the same adapters, and main-server state, as the
    same schedule in process."""
    reference = reference_dropping_client_1_at_iteration_1(tokenizer, data, its_last_forward=False)

    failures = []
    (tmp_path / "cert.pem").write_bytes(tls[0])
    with served_federation(tokenizer, data, tls, client_timeout=5.0) as (fed, lock, plane, planes):
        address = planes[0].address
        proc = subprocess.Popen([sys.executable, str(CLIENT_PROCESS), address, str(tmp_path / "cert.pem"), TOKEN, "1"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            lines, output = lines_of(proc), []
            expect_line(lines, "ready", output)
            plane.begin_round(0, [0, 1, 2], fed.hyper.local_steps)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            with training(fed.split.full):
                def run(k: int) -> None:
                    try:
                        client_round(fed.split.client, fed.clients[k], planes[k], 0, fed.hyper.local_steps, lock)
                    except Exception as err:  # reported below
                        failures.append(err)

                threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in (0, 2)]
                for thread in threads:
                    thread.start()
                expect_line(lines, "iteration 0 done", output)
                proc.kill()
                assert proc.wait(30) != 0
                for thread in threads:
                    thread.join(120)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
        report = plane.end_round()
    assert not failures and not any(t.is_alive() for t in threads), failures
    assert list(report.dropped) == [1] and "no activations for iteration 1" in report.dropped[1]
    broadcast_average([fed.clients[0].adapter, fed.clients[2].adapter], [7, 8], fed.client_adapters)
    got, want = fed.state_dict(), reference.state_dict()
    compared = [n for n in want if not n.startswith("client.1.") and n not in ("cursor.1", "rng.client.1")]
    assert any(n.startswith("server.0.") for n in compared) and "rng.main_server" in compared
    assert all(torch.equal(got[n], want[n]) for n in compared), [n for n in compared if not torch.equal(got[n], want[n])]
    assert all(torch.equal(t, reference.clients[1].adapter.tensors[n]) for n, t in fed.clients[1].adapter.tensors.items())


def test_train_engine_dataplane_honours_cut_precision_and_server_chunks(tmp_path):
    """An int8 cut and a chunked main server travel through the data plane as they run in process."""
    # sequential client passes in process, as the data plane runs them (batched ones differ in the last
    # float bit, which int8 rounding may turn into one quantisation step)
    config = TrainConfig(clients=3, rounds=1, local_steps=2, batch_size=4, train_samples=48, eval_samples=8,
                         act_bits=8, server_chunk=2, generate=False, client_batching="sequential")
    run_train(config, tmp_path / "local", progress=False)
    run_train(config.model_copy(update={"engine": "dataplane"}), tmp_path / "dp", progress=False)
    got, want = load_file(tmp_path / "dp" / "state.safetensors"), load_file(tmp_path / "local" / "state.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
