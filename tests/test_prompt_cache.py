"""Compiled prompt cache (never stale, bounded, released) and mixed-prompt batches."""

from __future__ import annotations

import pytest
import tiny
import torch
from peft import get_peft_model

from peft_softprompt_ext import SoftPromptConfig


def make(arch: str = "llama", num_virtual_tokens: int = 4, shared_prompt_kv: bool = True, seed: int = 0):
    config = SoftPromptConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        init="random",
        init_seed=seed,
        shared_prompt_kv=shared_prompt_kv,
    )
    return get_peft_model(tiny.causal_lm(arch), config).eval()


def with_adapters(arch: str = "llama", shared_prompt_kv: bool = True):
    """Three adapters with different prompt lengths on one model."""
    model = make(arch, 4, shared_prompt_kv)
    model.add_adapter(
        "b",
        SoftPromptConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=2, init="random", init_seed=1, shared_prompt_kv=shared_prompt_kv
        ),
    )
    model.add_adapter(
        "c",
        SoftPromptConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=6, init="random", init_seed=2, shared_prompt_kv=shared_prompt_kv
        ),
    )
    return model.eval()


def uncached_logits(model, ids, **kw):
    with torch.enable_grad():  # grad mode makes the model recompute the prompt's KV instead of using the compiled one
        return model(input_ids=ids, **kw).logits.detach()


@pytest.mark.parametrize("arch", list(tiny.CAUSAL_LM))
def test_compiled_cache_is_used_and_equals_uncached(arch):
    model = make(arch)
    ids = tiny.random_ids(2, 6)
    with torch.no_grad():
        compiled = model(input_ids=ids).logits
    assert "default" in model.compiled_prompts
    torch.testing.assert_close(compiled, uncached_logits(model, ids), atol=1e-6, rtol=0)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    concat = make(arch, shared_prompt_kv=False)
    assert torch.equal(generated, concat.generate(input_ids=ids, max_new_tokens=5, do_sample=False))


def test_training_step_never_serves_a_stale_cache():
    model = make()
    ids = tiny.random_ids(2, 6)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    optimizer = torch.optim.SGD([model.prompt_encoder["default"].embedding.weight], lr=50.0)
    model.train()
    assert len(model.compiled_prompts) == 0, "train() frees compiled caches"
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        after_logits = model(input_ids=ids).logits
    reference = make(shared_prompt_kv=False)
    reference.prompt_encoder["default"].load_state_dict(model.prompt_encoder["default"].state_dict())
    assert torch.equal(after, reference.generate(input_ids=ids, max_new_tokens=5, do_sample=False))
    torch.testing.assert_close(after_logits, uncached_logits(model, ids), atol=1e-6, rtol=0)
    assert not torch.allclose(before, after_logits, atol=1e-3), "the step must have changed the prompt's effect"


def test_in_place_edit_without_train_mode_rebuilds_the_cache():
    model = make()
    ids = tiny.random_ids(1, 5)
    with torch.no_grad():
        model(input_ids=ids)
        model.prompt_encoder["default"].embedding.weight.mul_(3.0)
        edited = model(input_ids=ids).logits
    torch.testing.assert_close(edited, uncached_logits(model, ids), atol=1e-6, rtol=0)


def test_reload_and_delete_invalidate_and_release(tmp_path):
    model = with_adapters()
    other = make(seed=9)
    other.save_pretrained(tmp_path)
    ids = tiny.random_ids(1, 5)
    with torch.no_grad():
        for name in ("default", "b", "c"):
            model.set_adapter(name)
            model(input_ids=ids)
    assert len(model.compiled_prompts) == 3
    model.delete_adapter("c")
    assert "c" not in model.compiled_prompts and len(model.compiled_prompts) == 2
    model.delete_adapter("b")
    model.load_adapter(str(tmp_path), adapter_name="b")
    model.set_adapter("b")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, other(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_compiled_cache_memory_is_bounded():
    model = make()
    model.compiled_prompts.max_entries = 2
    for i in range(4):
        model.add_adapter(f"a{i}", SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ids = tiny.random_ids(1, 4)
    with torch.no_grad():
        for i in range(4):
            model(input_ids=ids, adapter_names=[f"a{i}"])
    assert len(model.compiled_prompts) == 2 and "a3" in model.compiled_prompts and "a0" not in model.compiled_prompts


def rows_alone(model, ids, mask, names):
    """Reference: each row run alone with its adapter active (or the bare model)."""
    out = []
    for row, name in enumerate(names):
        real = ids[row][mask[row].bool()][None]
        if name == "__base__":
            with model.disable_adapter():
                out.append(model(input_ids=real).logits[0])
        else:
            model.set_adapter(name)
            out.append(model(input_ids=real).logits[0])
    model.set_adapter("default")
    return out


@pytest.mark.parametrize("shared", [True, False], ids=["prefix_kv", "concat"])
@pytest.mark.parametrize("arch", list(tiny.CAUSAL_LM))
def test_mixed_prompt_batch_equals_rows_alone(arch, shared):
    model = with_adapters(arch, shared)
    rows = [tiny.random_ids(1, n, seed=n)[0] for n in (5, 7, 4, 6, 3)]
    names = ["b", "default", "__base__", "c", "b"]
    for pad in (tiny.left_pad, tiny.right_pad):
        ids, mask = pad(rows)
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                logits = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
            for row, expected in enumerate(rows_alone(model, ids, mask, names)):
                torch.testing.assert_close(logits[row][mask[row].bool()], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shared", [True, False], ids=["prefix_kv", "concat"])
def test_mixed_prompt_generate_equals_rows_alone(shared):
    model = with_adapters("qwen2", shared)
    rows = [tiny.random_ids(1, n, seed=n)[0] for n in (5, 7, 4)]
    names = ["c", "__base__", "b"]
    ids, mask = tiny.left_pad(rows)
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=5, do_sample=False)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(input_ids=rows[row][None], max_new_tokens=5, do_sample=False)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=rows[row][None], max_new_tokens=5, do_sample=False)
        new = alone[0, len(rows[row]) :]  # generation may stop early at EOS; the batch pads such rows
        assert torch.equal(out[row, ids.shape[1] : ids.shape[1] + len(new)], new)


def test_mixed_batch_gradients_reach_each_prompt():
    model = with_adapters()
    model.train()
    ids = tiny.random_ids(3, 5)
    model(input_ids=ids, labels=ids, adapter_names=["default", "c", "__base__"]).loss.backward()
    assert model.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
    assert model.prompt_encoder["c"].embedding.weight.grad.abs().sum() > 0
    assert model.prompt_encoder["b"].embedding.weight.grad is None


def test_mixed_batch_on_an_encoder_uses_concatenation():
    cls, make_config = tiny.SEQ_CLS["bert"]
    model = get_peft_model(
        tiny.build(cls, make_config, num_labels=2), SoftPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=3)
    ).eval()
    model.add_adapter("x", SoftPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=5, init="random"))
    ids, mask = tiny.right_pad([tiny.random_ids(1, 4)[0], tiny.random_ids(1, 6, seed=4)[0]])
    logits = model(input_ids=ids, attention_mask=mask, adapter_names=["x", "default"]).logits
    model.set_adapter("x")
    torch.testing.assert_close(logits[:1], model(input_ids=ids[:1, :4]).logits, atol=1e-4, rtol=0)


def test_bad_adapter_names_are_clear_errors():
    model = with_adapters()
    ids = tiny.random_ids(2, 4)
    with pytest.raises(ValueError, match=r"Unknown adapter name\(s\) \['nope'\].*loaded: \['b', 'c', 'default'\]"):
        model(input_ids=ids, adapter_names=["nope", "b"])
    with pytest.raises(ValueError, match="one name per row \\(2 rows\\)"):
        model(input_ids=ids, adapter_names=["b"])
    with pytest.raises(ValueError, match="one name per row"):
        model.generate(input_ids=ids, adapter_names="b", max_new_tokens=2)
