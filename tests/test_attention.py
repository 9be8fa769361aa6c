"""The shared path's prefix-aware SDPA (`attention.py`): which kernel call it makes, that it stands in for
transformers' SDPA only for the call it wraps, and that its results are concatenation's."""

from __future__ import annotations

import pytest
import tiny
import torch
from peft import get_peft_model
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from transformers.modeling_layers import GradientCheckpointingLayer

from peft_softprompt_ext import ExecutionPath, SoftPromptConfig, attention
from peft_softprompt_ext.constants import PREFIX_ATTENTION_NAME, SDPA_NAME

P = 4


def make(arch: str = "llama", shared_prompt_kv: bool = True, attn: str | None = None):
    base = tiny.causal_lm(arch)
    if attn:
        base.set_attn_implementation(attn)
    config = SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, shared_prompt_kv=shared_prompt_kv)
    return get_peft_model(base, config).eval()


class SdpaCalls(TorchFunctionMode):
    """Records the key heads, mask and `enable_gqa` of every SDPA call (observes; changes nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, bool, bool]] = []
        self.queries: list[tuple[int, torch.dtype, bool]] = []  # query rows, dtype, autocast on

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append((args[1].shape[1], kwargs.get("attn_mask") is not None, bool(kwargs.get("enable_gqa"))))
            self.queries.append((args[0].shape[2], args[0].dtype, torch.is_autocast_enabled("cpu")))
        return func(*args, **kwargs)


def _layer_masks(model) -> list:
    """The mask each call of the first attention layer receives, and the implementation its config names then."""
    seen = []
    layer = next(m for n, m in model.get_base_model().named_modules() if n.endswith("self_attn"))

    def hook(module, args, kwargs):
        seen.append((kwargs.get("attention_mask"), module.config._attn_implementation))

    layer.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_grouped_query_heads_reach_sdpa_unrepeated(arch):
    """With the prompt in the cache the layers get a lower-right marker (no mask built) without pads, a real mask
    with them; on CPU SDPA gets the model's 2 key/value heads with `enable_gqa`, not 4 repeated ones."""
    model = make(arch)
    assert model.capabilities.prefix_kv and model.capabilities.prefix_attention
    heads = model.get_base_model().config.num_key_value_heads
    seen = _layer_masks(model)
    ids = tiny.random_ids(3, 6)
    padded, mask = tiny.left_pad([ids[0, :3], ids[1], ids[2, :5]])
    for kwargs in ({"input_ids": ids}, {"input_ids": padded, "attention_mask": mask}):
        with torch.no_grad(), SdpaCalls() as sdpa:
            model(**kwargs)
        layers = model.get_base_model().config.num_hidden_layers
        assert sdpa.calls[-layers:] == [(heads, True, True)] * layers
    assert seen[-2][0] is attention.LOWER_RIGHT and seen[-1][0] is not attention.LOWER_RIGHT
    # the prompt's own batch-1 pass (no cache, `is_causal`) stays on transformers' SDPA
    assert {name for mask, name in seen if mask is not None} == {PREFIX_ATTENTION_NAME}
    assert model.get_base_model().config._attn_implementation == SDPA_NAME  # only for the call


def test_results_equal_concatenation_in_training_and_generation():
    """Logits (padded), prompt gradients (also under non-reentrant checkpointing) and greedy generation equal the
    concatenated prompt's, which never uses the prefix attention."""
    ids = tiny.random_ids(3, 6)
    padded, mask = tiny.left_pad([ids[0, :3], ids[1], ids[2, :5]])
    shared, concat = make(), make(shared_prompt_kv=False)
    with torch.no_grad():
        got = shared(input_ids=padded, attention_mask=mask).logits
        want = concat(input_ids=padded, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)

    def prompt_grad(model) -> torch.Tensor:
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        weight = model.prompt_encoder["default"].embedding.weight
        grad, weight.grad = weight.grad.clone(), None
        return grad

    reference = prompt_grad(concat)
    torch.testing.assert_close(prompt_grad(shared), reference, rtol=1e-5, atol=1e-7)
    shared.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert shared.train().execution_path is ExecutionPath.PREFIX_KV
    torch.testing.assert_close(prompt_grad(shared), reference, rtol=1e-5, atol=1e-7)

    generate = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        torch.testing.assert_close(
            shared.eval().generate(input_ids=padded, **generate), concat.eval().generate(input_ids=padded, **generate)
        )


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_layers_recompute_on_the_prefix_attention(reentrant):
    """Non-reentrant checkpointing: each layer's recompute in the backward, after the call has switched back, runs
    the prefix attention as its forward did (the same tensors saved, checked by torch's determinism check), with the
    same gradients. Reentrant checkpointing has no `context_fn`: the call stays on transformers' SDPA. Either way
    nothing stays switched."""
    model = make().train()
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    funcs = [layer._gradient_checkpointing_func for layer in layers]
    seen = _layer_masks(model)
    ids = tiny.random_ids(2, 6)
    with torch.no_grad():
        model(input_ids=ids)  # the first forward runs the capability probe
    seen.clear()
    model(input_ids=ids, labels=ids).loss.backward()
    calls = [(mask is attention.LOWER_RIGHT, name) for mask, name in seen if mask is not None]
    if reentrant:  # concatenation (a cache's tensors get no gradient there): no call on the prefix attention
        assert model.execution_path is ExecutionPath.CONCAT
        assert [name for _, name in seen] == [SDPA_NAME] * 2
    else:
        assert calls == [(True, PREFIX_ATTENTION_NAME)] * 2  # the layer's forward, then its recompute
    assert base.config._attn_implementation == SDPA_NAME
    assert [layer._gradient_checkpointing_func for layer in layers] == funcs


def test_other_implementations_are_left_alone():
    """A model on eager attention is never switched: the probe says so and its forward keeps its implementation."""
    model = make(attn="eager")
    assert model.capabilities.prefix_kv and not model.capabilities.prefix_attention
    seen = _layer_masks(model)
    with torch.no_grad():
        model(input_ids=tiny.random_ids(2, 5))
    assert {name for _, name in seen} == {"eager"}


def test_switch_is_undone_when_the_call_fails():
    base = tiny.causal_lm("llama")
    with pytest.raises(RuntimeError, match="inside"), attention.switched(base):
        assert base.config._attn_implementation == PREFIX_ATTENTION_NAME
        raise RuntimeError("inside")
    assert base.config._attn_implementation == SDPA_NAME


@pytest.mark.parametrize("how", ["autocast", "bf16 weights"])
def test_decoding_steps_in_reduced_precision_run_in_float32(how):
    """On CPU, a decoding step that SDPA would run in bf16 (autocast, or a bf16 model) gets float32 tensors with
    autocast off (torch's CPU kernel is several times slower on one bf16 query row: `benchmarks/bench_attention.py`);
    the prefill keeps the reduced-precision kernel. Padded and unpadded rows both take it."""
    model = make()
    if how == "bf16 weights":
        model = model.to(torch.bfloat16)
    padded, mask = tiny.left_pad([tiny.random_ids(1, 3)[0], tiny.random_ids(1, 6)[0]])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast")
    for kwargs in (
        {"input_ids": padded[1:], "attention_mask": mask[1:]},
        {"input_ids": padded, "attention_mask": mask},
    ):
        with torch.no_grad(), autocast, SdpaCalls() as sdpa:
            model.generate(**kwargs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        steps = [(dtype, on) for rows, dtype, on in sdpa.queries if rows == 1]
        layers = model.get_base_model().config.num_hidden_layers
        assert len(steps) == 2 * layers and set(steps) == {(torch.float32, False)}
        prefill = {(dtype, on) for rows, dtype, on in sdpa.queries if rows > 1}
        assert prefill == ({(torch.float32, True)} if how == "autocast" else {(torch.bfloat16, False)})


def test_decoding_step_is_float32_attention_rounded_once():
    """The step's result is SDPA on the float32 tensors, rounded once to bf16: at least as close to float64 as the
    bf16 kernel's, with and without a mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, t, 16, generator=g).to(torch.bfloat16) for h, t in ((4, 1), (2, 40), (2, 40)))
    module = type("Attention", (), {"num_key_value_groups": 2})()
    mask = torch.ones(3, 1, 1, 40, dtype=torch.bool)
    mask[0, ..., :9] = False
    for m in (None, mask):
        got = attention.prefix_sdpa(module, q, k, v, m)[0].transpose(1, 2)
        assert got.dtype == torch.bfloat16
        exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m, enable_gqa=True)
        torch.testing.assert_close(got, exact.to(torch.bfloat16), rtol=0, atol=0)
        double = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m, enable_gqa=True)
        kernel = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
        assert (got.double() - double).abs().max() <= (kernel.double() - double).abs().max()
