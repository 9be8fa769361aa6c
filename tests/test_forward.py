"""Forward of every decoder: aligned outputs, equality with a hand-made concatenation, padding invariance."""

from __future__ import annotations

import pytest
import tiny
import torch
from peft import get_peft_model
from torch.nn import functional as F

from peft_softprompt_ext import ExecutionPath, SoftPromptConfig

P = 4
DECODERS = list(tiny.CAUSAL_LM)


def make(arch: str, shared_prompt_kv: bool = True, **kw):
    kw = {"num_virtual_tokens": P, **kw}
    config = SoftPromptConfig(task_type="CAUSAL_LM", shared_prompt_kv=shared_prompt_kv, **kw)
    return get_peft_model(tiny.causal_lm(arch), config).eval()


def reference_logits(model, ids: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
    """Independent reference: prompt embeddings concatenated by hand, positions 0..P+L-1, prompt cut off."""
    base = model.get_base_model()
    prompt = model.prompt_embeddings().detach()
    embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), base.get_input_embeddings()(ids)], dim=1)
    positions = torch.arange(embeds.shape[1]).unsqueeze(0)
    positions = torch.cat([positions[:, :P], positions[:, P:] + position_offset], dim=1)
    return base(inputs_embeds=embeds, position_ids=positions).logits[:, P:]


@pytest.mark.parametrize("shared", [True, False], ids=["prefix_kv", "concat"])
@pytest.mark.parametrize("arch", DECODERS)
def test_logits_aligned_and_equal_to_manual_concatenation(arch, shared):
    model = make(arch, shared)
    ids = tiny.random_ids(2, 7)
    out = model(input_ids=ids, output_hidden_states=True)
    assert out.logits.shape == (2, 7, tiny.VOCAB)
    assert all(h.shape[1] == 7 for h in out.hidden_states)
    torch.testing.assert_close(out.logits, reference_logits(model, ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", DECODERS)
def test_loss_is_cross_entropy_of_returned_logits(arch):
    for shared in (True, False):
        model = make(arch, shared)
        ids = tiny.random_ids(2, 6)
        labels = ids.clone()
        labels[0, :2] = -100
        out = model(input_ids=ids, labels=labels)
        expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, tiny.VOCAB), labels[:, 1:].reshape(-1))
        torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared", [True, False], ids=["prefix_kv", "concat"])
@pytest.mark.parametrize("arch", DECODERS)
def test_padding_invariance(arch, shared):
    model = make(arch, shared)
    short, long = tiny.random_ids(1, 5)[0], tiny.random_ids(1, 9, seed=2)[0]
    alone = model(input_ids=short[None]).logits[0]
    ids, mask = tiny.left_pad([short, long])
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[0, 4:], alone, atol=1e-4, rtol=0)
    ids, mask = tiny.right_pad([short, long])
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[0, :5], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", DECODERS)
def test_user_position_ids_are_honoured(arch):
    model = make(arch)
    ids = tiny.random_ids(1, 6)
    shifted = torch.arange(6).unsqueeze(0) + 3
    out = model(input_ids=ids, position_ids=shifted).logits
    torch.testing.assert_close(out, reference_logits(model, ids, position_offset=3), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out, model(input_ids=ids).logits, atol=1e-4)


@pytest.mark.parametrize("arch", DECODERS)
def test_inputs_embeds_equals_input_ids(arch):
    model = make(arch)
    ids = tiny.random_ids(2, 5)
    embeds = model.get_base_model().get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(input_ids=ids).logits, atol=1e-6, rtol=0)


def _prompt_grad(model, ids) -> torch.Tensor:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return model.prompt_encoder["default"].embedding.weight.grad.clone()


@pytest.mark.parametrize("arch", DECODERS)
def test_prefix_kv_gradients_equal_concatenation(arch):
    ids = tiny.random_ids(3, 6)
    grad_kv = _prompt_grad(make(arch, True), ids)
    grad_cat = _prompt_grad(make(arch, False), ids)
    torch.testing.assert_close(grad_kv, grad_cat, rtol=1e-5, atol=1e-7)


def _attention_calls(model) -> list[int]:
    """Counts calls of the first layer's attention: a checkpointed layer runs it again in backward."""
    calls = [0]
    attention = next(m for n, m in model.get_base_model().named_modules() if n.endswith(("self_attn", ".attn")))
    attention.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_same_prompt_gradients(arch, reentrant):
    ids = tiny.random_ids(2, 6)
    plain = _prompt_grad(make(arch), ids)
    model = make(arch)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    expected = ExecutionPath.CONCAT if reentrant else ExecutionPath.PREFIX_KV
    assert model.execution_path is expected
    calls = _attention_calls(model)
    torch.testing.assert_close(_prompt_grad(model, ids), plain, rtol=1e-5, atol=1e-7)
    # checkpointing really ran: forward + recompute, and on the shared path the prompt's own batch-1 pass, which is
    # checkpointed too (its forward + its recompute)
    assert calls[0] == (2 if reentrant else 4)


def _bytes_saved_for_backward(model, ids) -> int:
    """Bytes autograd keeps from the forward outside checkpointed regions (their own saved tensors are dropped)."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return total[0]


def test_checkpointed_prompt_pass_keeps_no_activations():
    """Under gradient checkpointing the prompt's batch-1 pass keeps only its keys/values: what the forward holds
    for the backward does not grow with the prompt's activations (P positions x every layer), as it does without
    checkpointing."""
    ids = tiny.random_ids(3, 6)

    def saved(length: int, checkpointing: bool) -> int:
        model = make("llama", num_virtual_tokens=length)
        if checkpointing:
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        assert model.execution_path is ExecutionPath.PREFIX_KV
        return _bytes_saved_for_backward(model, ids)

    per_token_plain = (saved(64, False) - saved(4, False)) / 60
    per_token_checkpointed = (saved(64, True) - saved(4, True)) / 60
    assert per_token_checkpointed < per_token_plain / 20


def test_one_row_in_training_takes_concatenation():
    """At B=1 sharing saves no positions (B*L + P either way) and splits the step in two, so a training forward of
    one row concatenates: one attention call per layer, no batch-1 prompt pass; gradients as with sharing off."""
    ids = tiny.random_ids(1, 6)
    model = make("llama")
    assert model.capabilities.prefix_kv  # the probe (its own forwards) runs first
    calls = _attention_calls(model)
    grad = _prompt_grad(model, ids)
    assert calls[0] == 1
    torch.testing.assert_close(grad, _prompt_grad(make("llama", shared_prompt_kv=False), ids), rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # inference of one row keeps the shared path: compile the prompt once, then reuse it
        model.eval()(input_ids=ids)
        calls[0] = 0
        model(input_ids=ids)
    assert calls[0] == 1 and len(model.compiled_prompts) == 1


def test_execution_path_is_public_and_follows_the_model_state():
    model = make("llama")
    assert model.execution_path is ExecutionPath.PREFIX_KV
    model.get_base_model().gradient_checkpointing_enable()  # transformers' default: non-reentrant
    model.train()
    assert model.execution_path is ExecutionPath.PREFIX_KV
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert model.execution_path is ExecutionPath.CONCAT
    model.eval()
    with torch.no_grad():
        assert model.execution_path is ExecutionPath.PREFIX_KV
    assert make("llama", shared_prompt_kv=False).execution_path is ExecutionPath.CONCAT


def test_bf16_base_with_fp32_prompt_trains_and_generates():
    base = tiny.causal_lm("llama").to(torch.bfloat16)
    model = get_peft_model(base, SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    weight = model.prompt_encoder["default"].embedding.weight
    assert weight.dtype == torch.float32
    ids = tiny.random_ids(2, 6)
    before = weight.detach().clone()
    optimizer = torch.optim.AdamW([weight], lr=1e-2)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, weight.detach())
    model.eval()
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 9) and torch.equal(out[:, :6], ids)


def test_input_too_long_for_absolute_positions_is_a_clear_error():
    model = make("gpt2")  # 64 positions
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        model(input_ids=tiny.random_ids(1, 61))
