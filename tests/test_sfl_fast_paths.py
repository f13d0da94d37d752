"""Fast paths of the SFL engine against the plain one: batched clients == sequential clients, a
chunked main server == one server batch, and K adapters' joint AdamW step == K separate steps, to
float tolerance, K in {1, 3, 7}."""

from __future__ import annotations

import pytest
import torch

from sflllm.data import synthetic_examples
from sflllm.model import lora_parameters
from sflllm.sfl import CutActivations, Hyper, main_server_step, make_federation
from sflllm.sfl.adapter import Adapter, step_adapters
from sflllm.sfl.batched import GroupedLoRA, batching_applies, draws_randomness, grouped_lora
from sflllm.sfl.rng import PartyRng
from test_sfl import assert_close, client_data, global_lora, tiny_split

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def examples():
    return synthetic_examples(80, seed=5)


def trained(family, tokenizer, data, rounds=2, dropout=0.0, **hyper):
    split = tiny_split(family, len(tokenizer), split_layer=2, dropout=dropout)
    fed = make_federation(split, data, Hyper(local_steps=2, batch_size=2, lr=1e-2, seed=3, **hyper))
    losses = [fed.run_round(r)["train_loss"] for r in range(rounds)]
    fed.load_global_adapter()
    return fed, global_lora(split), losses


# ------------------------------------------------------------------------- batched clients
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("num_clients", [1, 3, 7])
def test_batched_clients_equal_sequential_clients(family, num_clients, tokenizer, examples):
    data = client_data(examples, tokenizer, [3 + k % 3 for k in range(num_clients)])
    initial = global_lora(tiny_split(family, len(tokenizer), split_layer=2))
    seq, want, seq_losses = trained(family, tokenizer, data, client_batching="sequential")
    bat, got, bat_losses = trained(family, tokenizer, data, client_batching="batched")
    assert batching_applies(bat.split.client, list(bat.clients[0].adapter.tensors), "batched")
    assert max(float((want[n] - initial[n]).abs().max()) for n in want) > 1e-2  # it did train
    assert_close(got, want, atol=2e-6)
    assert bat_losses == pytest.approx(seq_losses, abs=1e-5)
    for k in range(num_clients):  # every client's own AdamW state, cursor and (untouched) stream agree too
        assert_close(bat.clients[k].adapter.live_state("c"), seq.clients[k].adapter.live_state("c"), atol=2e-6)
        assert bat.clients[k].cursor == seq.clients[k].cursor
        assert torch.equal(bat.clients[k].rng.state, seq.clients[k].rng.state)


@pytest.mark.parametrize("num_clients", [1, 3, 7])
def test_joint_adamw_step_equals_a_step_per_adapter(num_clients):
    generator = torch.Generator().manual_seed(num_clients)
    initial = {"a": torch.randn(4, 6, generator=generator), "b": torch.randn(6, 4, generator=generator)}

    def adapters():
        return [Adapter(initial, lr=1e-2, weight_decay=0.1) for _ in range(num_clients)]

    apart, together = adapters(), adapters()
    for _ in range(3):  # a step with different gradients per adapter, moments and step counts carried on
        grads = [{n: torch.randn(t.shape, generator=generator) for n, t in initial.items()} for _ in apart]
        for adapter, grad in zip(apart, grads):
            adapter.set_gradients({n: g.clone() for n, g in grad.items()})
            adapter.step()
        for adapter, grad in zip(together, grads):
            adapter.set_gradients({n: g.clone() for n, g in grad.items()})
        step_adapters(together)
    for k, (got, want) in enumerate(zip(together, apart)):
        assert_close(got.live_state(f"client.{k}"), want.live_state(f"client.{k}"), atol=1e-7)
        assert all(t.grad is None for t in got.tensors.values())
    assert max(float((apart[0].tensors[n].detach() - initial[n]).abs().max()) for n in initial) > 1e-2  # it stepped


def test_joint_adamw_step_refuses_adapters_with_different_settings():
    initial = {"a": torch.ones(2, 2)}
    with pytest.raises(ValueError, match="equal AdamW settings; adapter 1"):
        step_adapters([Adapter(initial, lr=1e-2, weight_decay=0.0), Adapter(initial, lr=1e-3, weight_decay=0.0)])


def test_grouped_lora_multiplies_each_group_by_its_own_weight():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, 4, generator=generator)
    x = torch.randn(6, 7, 4, generator=generator)  # 3 groups of 2 rows
    got = GroupedLoRA(weight)(x)
    want = torch.cat([x[2 * k : 2 * k + 2] @ weight[k].T for k in range(3)])
    torch.testing.assert_close(got, want)


def test_grouped_lora_restores_the_model_and_gives_each_client_its_gradient(tokenizer, examples):
    split = tiny_split("gpt2", len(tokenizer), split_layer=2)
    before = {name: id(module) for name, module in split.full.named_modules()}
    lora = {name: p.detach().clone() for name, p in lora_parameters(split.client).items()}
    loras = [{n: (t + 0.1 * k).requires_grad_(True) for n, t in lora.items()} for k in range(2)]
    (data,) = client_data(examples, tokenizer, [4])
    with grouped_lora(split.client, loras):
        hidden = split.client(data.input_ids, data.attention_mask)
    assert {name: id(module) for name, module in split.full.named_modules()} == before
    hidden[2:].sum().backward()  # rows of client 1 only
    assert all(t.grad is None or not t.grad.any() for t in loras[0].values())
    assert any(t.grad is not None and t.grad.any() for t in loras[1].values())


def test_batched_clients_need_a_client_part_without_dropout(tokenizer, examples):
    """Per-party streams cannot be drawn in one batched pass: 'batched' is refused, 'auto' runs sequentially
    and gives exactly the sequential result."""
    data = client_data(examples, tokenizer, [4, 4, 4])
    split = tiny_split("gpt2", len(tokenizer), split_layer=2, dropout=0.1)
    names = list(lora_parameters(split.client))
    assert draws_randomness(split.client)
    assert not batching_applies(split.client, names, "auto")
    with pytest.raises(ValueError, match="client_batching='batched' needs a client part without dropout"):
        batching_applies(split.client, names, "batched")
    with pytest.raises(ValueError, match="client_batching='batched' needs a client part without dropout"):
        make_federation(split, data, Hyper(client_batching="batched"))  # refused up front
    _, auto, _ = trained("gpt2", tokenizer, data, dropout=0.1, client_batching="auto")
    _, seq, _ = trained("gpt2", tokenizer, data, dropout=0.1, client_batching="sequential")
    assert_close(auto, seq, atol=0)


def test_llama_attention_dropout_counts_as_randomness():
    split = tiny_split("llama", 50)
    assert not draws_randomness(split.client)
    for module in split.client.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.1
    assert draws_randomness(split.client)


# ------------------------------------------------------------------------- chunked main server
@pytest.mark.parametrize("num_clients", [1, 3, 7])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunked_main_server_equals_one_batch(num_clients, chunk, tokenizer, examples):
    data = client_data(examples, tokenizer, [4] * num_clients)
    split = tiny_split("llama", len(tokenizer), split_layer=1)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in lora_parameters(split.server).items():  # non-zero B: the server adapter matters
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        cuts = [CutActivations(split.client(d.input_ids, d.attention_mask), d.attention_mask, d.labels) for d in data]
    spec_fed = make_federation(split, data, Hyper(batch_size=4))
    results = []
    for server_chunk in (None, chunk):
        adapter = Adapter(lora_parameters(split.server), lr=1e-2, weight_decay=0.0)
        losses, grads = main_server_step(split.server, [adapter], PartyRng(0, "main_server"), cuts,
                                         spec_fed.cut_spec, server_chunk=server_chunk)
        results.append((losses, [g.grad for g in grads], adapter.live_state("s")))
    (want_losses, want_grads, want_state), (got_losses, got_grads, got_state) = results
    assert got_losses == pytest.approx(want_losses, abs=1e-6)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)
    assert_close(got_state, want_state, atol=1e-6)


@pytest.mark.parametrize("num_clients", [3, 7])
def test_training_with_a_chunked_server_equals_one_batch(num_clients, tokenizer, examples):
    data = client_data(examples, tokenizer, [3 + k % 2 for k in range(num_clients)])
    _, want, _ = trained("gpt2", tokenizer, data)
    _, got, _ = trained("gpt2", tokenizer, data, server_chunk=2)
    assert_close(got, want, atol=2e-6)


@pytest.mark.parametrize(("field", "value"), [("server_chunk", 0), ("server_chunk", True), ("client_batching", "vmap")])
def test_hyper_rejects_bad_fast_path_fields(field, value):
    with pytest.raises(ValueError, match=f"Hyper.{field}"):
        Hyper(**{field: value})
