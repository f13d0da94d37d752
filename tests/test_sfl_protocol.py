"""The SFL protocol as typed messages (sflllm.sfl.protocol/messages/rng): payloads, recompute, per-party RNG."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

import sflllm.sfl.main_server as main_server
import sflllm.sfl.protocol as protocol
from sflllm.data import synthetic_examples
from sflllm.sfl import (
    CutActivations,
    CutGradients,
    CutSpec,
    Hyper,
    check_activations,
    check_gradients,
    client_step_backward,
    client_step_forward,
    main_server_step,
    make_federation,
    party_seed,
)
from sflllm.sfl.client import Batch
from test_sfl import SEQ_LEN, assert_close, client_data, global_lora, tiny_split


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data(tokenizer):
    return client_data(synthetic_examples(40, seed=3), tokenizer, [7, 9, 8])


def federation(tokenizer, data, **hyper):
    split = tiny_split("gpt2", len(tokenizer), dropout=0.2)
    return split, make_federation(split, data, Hyper(local_steps=2, lr=1e-2, seed=4, **hyper))


def run_by_steps(fed, rounds: int, order: list[int], keep_graph: bool) -> None:
    """Rounds of sfl driven step by step: clients forward and backward in ``order``; the main server
    sees the payloads in client order; FedAvg at the end of each round."""
    split, clients = fed.split, fed.clients
    for _ in range(rounds):
        fed.split.full.train()
        for _ in range(fed.hyper.local_steps):
            forwards = {k: client_step_forward(split.client, clients[k], keep_graph=keep_graph) for k in order}
            _, grads = main_server_step(split.server, fed.servers, fed.server_rng,
                                        [forwards[k][1] for k in range(len(clients))], fed.cut_spec)
            for k in order:
                client_step_backward(split.client, clients[k].adapter, forwards[k][0], grads[k])
        fed.aggregate()
    fed.load_global_adapter()


# ------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("server_adapter", ["shared", "per_client"])
@pytest.mark.parametrize(("order", "keep_graph"), [([0, 1, 2], False), ([2, 0, 1], True), ([1, 2, 0], False)])
def test_recompute_and_client_order_give_the_in_process_result(server_adapter, order, keep_graph, tokenizer, data):
    """Dropout 0.2 everywhere: recomputing the client forward (no graph kept between the steps) and
    running the clients in any order give exactly the Federation's adapters, RNG states and cursors."""
    split, fed = federation(tokenizer, data, server_adapter=server_adapter)
    for r in range(2):
        fed.run_round(r)
    fed.load_global_adapter()
    want, want_state = global_lora(split), fed.state_dict()

    split, fed = federation(tokenizer, data, server_adapter=server_adapter)
    run_by_steps(fed, 2, order, keep_graph)
    assert_close(global_lora(split), want, atol=0)
    got_state = fed.state_dict()
    for name, t in want_state.items():
        assert torch.equal(got_state[name], t), name


def test_dropout_is_on_and_streams_differ_per_party(tokenizer, data):
    """The equivalences above are not vacuous: with dropout the same client replays differently on
    another party's stream, and every party's seed differs."""
    _, fed = federation(tokenizer, data)
    fed.split.full.train()
    seeds = {party_seed(4, p) for p in ("client.0", "client.1", "client.2", "main_server")}
    assert len(seeds) == 4 and party_seed(4, "client.0") != party_seed(5, "client.0")
    client = fed.clients[0]
    pending, cut = client_step_forward(fed.split.client, client)
    again = protocol.recompute_forward(fed.split.client, client.adapter.tensors, pending.batch, pending.rng_state)
    other = protocol.recompute_forward(fed.split.client, client.adapter.tensors, pending.batch,
                                       fed.clients[1].rng.state)
    assert torch.equal(again, cut.hidden)
    assert not torch.allclose(other, cut.hidden)


def test_main_server_receives_only_cut_payloads(tokenizer, data, monkeypatch):
    """What reaches the main server is CutActivations (hidden, attention mask, labels, the float16
    loss scale's found_inf flag): no token ids."""
    seen = []
    for name in ("serve_shared", "serve_per_client"):
        real = getattr(protocol, name)

        def spy(module, adapters, cuts, real=real, **kwargs):
            seen.extend(cuts)
            return real(module, adapters, cuts, **kwargs)

        monkeypatch.setattr(protocol, name, spy)
    for server_adapter in ("shared", "per_client"):
        _, fed = federation(tokenizer, data, server_adapter=server_adapter)
        fed.run_round(0)
    assert len(seen) == 2 * 2 * 3
    for cut in seen:
        assert type(cut) is CutActivations
        assert [f.name for f in dataclasses.fields(cut)] == ["hidden", "attention_mask", "labels", "found_inf"]
        assert cut.found_inf is False  # float32: no loss scale
        assert cut.hidden.dtype == torch.float32 and cut.hidden.shape[-1] == 32
        assert not cut.hidden.requires_grad
    assert not hasattr(main_server, "Batch")  # the main server module has no notion of a client batch


# ------------------------------------------------------------------------- malformed payloads
SPEC = CutSpec(hidden_size=32, dtype=torch.float32, vocab_size=50, batch_size=2, seq_len=6)


def good_cut() -> CutActivations:
    labels = torch.full((2, 6), -100, dtype=torch.int64)
    labels[:, 3:] = 7
    return CutActivations(torch.zeros(2, 6, 32), torch.ones(2, 6, dtype=torch.int64), labels)


@pytest.mark.parametrize(("change", "message"), [
    ({"hidden": torch.zeros(2, 6, 32, dtype=torch.float64)}, r"client 0: CutActivations.hidden has \(2, 6, 32\) torch.float64"),
    ({"hidden": torch.zeros(2, 6, 16)}, r"CutActivations.hidden has \(2, 6, 16\)"),
    ({"hidden": torch.zeros(2, 6)}, r"CutActivations.hidden has \(2, 6\)"),
    ({"hidden": torch.zeros(3, 6, 32)}, "CutActivations.hidden has 3 rows, expected batch_size 2"),
    ({"hidden": torch.zeros(2, 5, 32)}, "sequence length 5, expected seq_len 6"),
    ({"hidden": [[0.0]]}, "CutActivations.hidden has list"),
    ({"attention_mask": torch.ones(2, 6, dtype=torch.int32)}, "CutActivations.attention_mask has .* torch.int32"),
    ({"attention_mask": torch.ones(2, 5, dtype=torch.int64)}, r"CutActivations.attention_mask has \(2, 5\)"),
    ({"attention_mask": torch.full((2, 6), 2, dtype=torch.int64)}, "attention_mask holds values other than 0 and 1"),
    ({"labels": torch.ones(2, 6)}, "CutActivations.labels has .* torch.float32"),
    ({"labels": torch.full((2, 6), 50, dtype=torch.int64)}, r"labels holds ids outside 0..49"),
])
def test_malformed_activations_are_rejected_by_the_main_server(change, message):
    cut = dataclasses.replace(good_cut(), **change)
    assert check_activations(good_cut(), SPEC) is not None
    with pytest.raises(ValueError, match=message):
        check_activations(cut, SPEC, sender="client 0")


def test_a_batch_is_not_a_cut_payload():
    cut = good_cut()
    with pytest.raises(ValueError, match="expected CutActivations at the cut, got Batch"):
        check_activations(Batch(cut.labels.clamp(min=0), cut.attention_mask, cut.labels), SPEC)


def test_main_server_step_rejects_a_malformed_payload_and_changes_nothing(tokenizer, data):
    _, fed = federation(tokenizer, data)
    before = {n: t.detach().clone() for n, t in fed.servers[0].tensors.items()}
    rng_before = fed.server_rng.state.clone()
    pendings_cuts = [client_step_forward(fed.split.client, c) for c in fed.clients]
    cuts = [cut for _, cut in pendings_cuts]
    cuts[2] = dataclasses.replace(cuts[2], hidden=cuts[2].hidden.half())
    with pytest.raises(ValueError, match="client 2: CutActivations.hidden has .* torch.float16"):
        main_server_step(fed.split.server, fed.servers, fed.server_rng, cuts, fed.cut_spec)
    assert_close(fed.servers[0].tensors, before, atol=0)
    assert torch.equal(fed.server_rng.state, rng_before)


@pytest.mark.parametrize(("grad", "message"), [
    (torch.zeros(2, 6, 32, dtype=torch.bfloat16), "CutGradients.grad has .* torch.bfloat16"),
    (torch.zeros(2, 6, 31), r"CutGradients.grad has \(2, 6, 31\)"),
    (torch.zeros(1, 6, 32), r"expected \(2, 6, 32\) torch.float32"),
])
def test_malformed_gradients_are_rejected_by_the_client(grad, message):
    sent = torch.zeros(2, 6, 32)
    check_gradients(CutGradients(torch.ones(2, 6, 32)), sent)
    with pytest.raises(ValueError, match=message):
        check_gradients(CutGradients(grad), sent)
    with pytest.raises(ValueError, match="expected CutGradients, got Tensor"):
        check_gradients(grad, sent)


def test_client_step_backward_rejects_wrong_gradient_before_stepping(tokenizer, data):
    _, fed = federation(tokenizer, data)
    client = fed.clients[0]
    before = {n: t.detach().clone() for n, t in client.adapter.tensors.items()}
    pending, cut = client_step_forward(fed.split.client, client, keep_graph=False)
    with pytest.raises(ValueError, match="main server: CutGradients.grad"):
        client_step_backward(fed.split.client, client.adapter, pending, CutGradients(cut.hidden[:, :-1]))
    assert_close(client.adapter.tensors, before, atol=0)
    assert SEQ_LEN == cut.hidden.shape[1]


def test_the_local_engine_imports_no_flower():
    """A core install (no flower extra) trains: flwr and ray load only for --engine flower-sim, grpc
    and cryptography only when sflllm.deploy builds a data plane."""
    code = ("import sys, sflllm.sfl, sflllm.experiments.train, sflllm.cli, sflllm.deploy; "
            "print(sorted(m for m in ('flwr', 'ray', 'grpc', 'cryptography') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
