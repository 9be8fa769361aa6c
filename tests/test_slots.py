"""Slots: virtual tokens spliced in at placeholder positions inside the input, checked against a manual splice of
the prompt embeddings into the input embeddings, on both paths, with padding, generate, gradients, mixed batches,
reload in a fresh process, the compiled fixed prefix and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import tiny
import torch
from conftest import make_tokenizer
from peft import PeftModel, get_peft_model

from peft_softprompt_ext import ExecutionPath, SoftPromptConfig, slots
from peft_softprompt_ext.slots import SlotError

SIZES = [2, 3]
P = sum(SIZES)
TESTS = os.path.dirname(__file__)


def make(arch: str = "llama", shared: bool = True, sizes=SIZES, tokenizer=None, seed: int = 0):
    config = SoftPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=sum(sizes), slots=list(sizes), shared_prompt_kv=shared, init_seed=seed
    )
    model = get_peft_model(tiny.causal_lm(arch), config).eval()
    tokenizer = tokenizer or make_tokenizer()
    slots.add_slot_tokens(tokenizer, model)
    return model, tokenizer


def texts(model) -> list[str]:
    """A fixed system-like prefix around both slots, then inputs of different lengths."""
    head = f"w5 w6 {slots.slot_text(model, 0)} w7 {slots.slot_text(model, 1)} w8"
    return [f"{head} w9 w10 w11", f"{head} w12"]


def encode(tokenizer, rows: list[str], side: str = "right"):
    tokenizer.padding_side = side
    enc = tokenizer(rows, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def spliced_embeds(model, ids: torch.Tensor) -> torch.Tensor:
    """Independent reference: embed the ids (placeholders as pad), then overwrite the slot positions by hand."""
    config = model.active_peft_config
    base = model.get_base_model()
    prompt = model.prompt_embeddings()
    clean = ids.masked_fill(torch.isin(ids, torch.tensor(config.slot_token_ids)), 0)
    rows = []
    for row, embedded in zip(ids, base.get_input_embeddings()(clean), strict=True):
        parts, offset = embedded, 0
        for token_id, size in zip(config.slot_token_ids, config.slots, strict=True):
            cols = (row == token_id).nonzero()[:, 0]
            parts = parts.index_put((cols,), prompt[offset : offset + size])
            offset += size
        rows.append(parts)
    return torch.stack(rows)


def reference_logits(model, ids, mask) -> torch.Tensor:
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return model.get_base_model()(
        inputs_embeds=spliced_embeds(model, ids), attention_mask=mask, position_ids=positions
    ).logits


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("shared", [True, False], ids=["compiled_prefix", "splice"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "opt"])
def test_forward_equals_manual_splice_with_the_input_length(arch, shared, side):
    model, tokenizer = make(arch, shared)
    ids, mask = encode(tokenizer, texts(model), side)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        expected = reference_logits(model, ids, mask)
    assert out.shape == (*ids.shape, tiny.VOCAB)
    real = mask.bool()
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-4)
    if shared:  # the fixed prefix (hard tokens + virtual ones) was compiled, under the adapter's name
        assert len(model.compiled_prompts) == 1 and "default" not in model.compiled_prompts
        model.compiled_prompts.discard("default")
        assert len(model.compiled_prompts) == 0


@pytest.mark.parametrize("keep", [1, 3, "indices"])
@pytest.mark.parametrize("rows", ["ragged_left", "ragged_right", "equal"])
def test_logits_to_keep_on_the_compiled_prefix(keep, rows):
    """A request's prefill asks for the last logits only: the compiled prefix serves it (equal remainders: the base
    model's own logits_to_keep; ragged ones: cut from the full logits), equal to the manual splice."""
    model, tokenizer = make("llama", shared=True)
    texts_ = texts(model)
    batch = {"ragged_left": (texts_, "left"), "ragged_right": (texts_, "right"), "equal": ([texts_[0]] * 2, "left")}
    ids, mask = encode(tokenizer, *batch[rows])
    kept = torch.tensor([0, ids.shape[1] - 1]) if keep == "indices" else keep
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=kept).logits
        full = reference_logits(model, ids, mask)
    expected = full[:, kept] if keep == "indices" else full[:, -keep:]
    assert out.shape == expected.shape
    real = (mask[:, kept] if keep == "indices" else mask[:, -keep:]).bool()
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-4)
    assert len(model.compiled_prompts) == 1, "logits_to_keep must not push a slotted batch off the compiled prefix"


@pytest.mark.parametrize("shared", [True, False], ids=["compiled_prefix", "splice"])
def test_padding_invariance_both_sides(shared):
    model, tokenizer = make("llama", shared)
    rows = texts(model)
    with torch.no_grad():
        alone = model(input_ids=encode(tokenizer, rows[1:])[0]).logits[0]
        for side in ("left", "right"):
            ids, mask = encode(tokenizer, rows, side)
            logits = model(input_ids=ids, attention_mask=mask).logits[1]
            torch.testing.assert_close(logits[mask[1].bool()], alone, atol=1e-4, rtol=0)


def greedy_loop(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """One row, greedy, stopping at EOS as generate does."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
            if int(ids[0, -1]) == tiny.SPECIAL["eos_token_id"]:
                break
    return ids


@pytest.mark.parametrize("shared", [True, False], ids=["compiled_prefix", "splice"])
def test_greedy_generate_equals_greedy_loop_over_forward(shared):
    model, tokenizer = make("llama", shared)
    rows = texts(model)
    for row in rows:
        ids = encode(tokenizer, [row])[0]
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(out, greedy_loop(model, ids, 4))
    ids, mask = encode(tokenizer, rows, "left")  # a left-padded batch generates what each row does alone
    batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    for b, row in enumerate(rows):
        alone = model.generate(input_ids=encode(tokenizer, [row])[0], max_new_tokens=4, do_sample=False)
        new = alone.shape[1] - encode(tokenizer, [row])[0].shape[1]
        assert torch.equal(batched[b, ids.shape[1] : ids.shape[1] + new], alone[0, -new:])
        assert torch.equal(batched[b, : ids.shape[1]], ids[b])


def test_training_gradient_equals_manual_splice_gradient():
    model, tokenizer = make("llama", shared=True)
    ids, mask = encode(tokenizer, texts(model))
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    assert model(input_ids=ids, attention_mask=mask, labels=labels).loss is not None
    model.zero_grad()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    ours = model.prompt_encoder["default"].embedding.weight.grad.clone()
    model.zero_grad()
    logits = reference_logits(model, ids, mask)
    reference_labels = labels.masked_fill(torch.isin(ids, torch.tensor(model.active_peft_config.slot_token_ids)), -100)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, tiny.VOCAB), reference_labels[:, 1:].reshape(-1), ignore_index=-100
    )
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours, model.prompt_encoder["default"].embedding.weight.grad, rtol=1e-5, atol=1e-7)


def test_mixed_batch_each_row_its_own_slots_and_prepend_rows():
    model, tokenizer = make("llama")
    model.add_adapter(
        "other",
        SoftPromptConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, slots=[4], slot_tokens=["<|sp_other|>"], init_seed=3
        ),
    )
    slots.add_slot_tokens(tokenizer, model, "other")
    model.add_adapter("front", SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, init_seed=4))
    rows = [texts(model)[0], f"w5 {slots.slot_text(model, adapter_name='other')} w9", "w7 w8 w9", "w10 w11"]
    names = ["default", "other", "front", "__base__"]
    ids, mask = encode(tokenizer, rows, "left")
    for shared in (True, False):
        for config in model.peft_config.values():
            config.shared_prompt_kv = shared
        with torch.no_grad():
            batched = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
            for b, (row, name) in enumerate(zip(rows, names, strict=True)):
                alone = model(input_ids=encode(tokenizer, [row])[0], adapter_names=[name]).logits[0]
                torch.testing.assert_close(batched[b][mask[b].bool()], alone, atol=1e-4, rtol=0)


def test_compiled_prefix_is_invalidated_like_the_prompt_cache():
    model, tokenizer = make("llama")
    ids = encode(tokenizer, texts(model)[:1])[0]
    with torch.no_grad():
        first = model(input_ids=ids).logits
    assert len(model.compiled_prompts) == 1
    tiny_steps = torch.optim.SGD([model.prompt_encoder["default"].embedding.weight], lr=1.0)
    model.train()
    labels = ids.masked_fill(torch.isin(ids, torch.tensor(model.active_peft_config.slot_token_ids)), -100)
    model(input_ids=ids, labels=labels).loss.backward()
    tiny_steps.step()
    model.eval()
    assert len(model.compiled_prompts) == 0, "train() frees compiled prefixes"
    with torch.no_grad():
        after = model(input_ids=ids).logits
        torch.testing.assert_close(after, reference_logits(model, ids, torch.ones_like(ids)), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(first, after)


RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    import tiny
    from conftest import make_tokenizer
    from peft import PeftModel
    from peft_softprompt_ext import slots

    model = PeftModel.from_pretrained(tiny.causal_lm("llama"), {adapter!r}).eval()
    tokenizer = make_tokenizer()  # a user's tokenizer, rebuilt from what the adapter config records
    slots.add_slot_tokens(tokenizer, model)
    text = "w5 w6 " + slots.slot_text(model, 0) + " w7 " + slots.slot_text(model, 1) + " w8 w9"
    ids = tokenizer([text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        print(json.dumps({{"ids": ids.tolist(), "logits": model(input_ids=ids).logits.tolist()}}))
    """
)


def test_save_and_reload_in_a_fresh_process_keeps_the_slots(tmp_path):
    model, tokenizer = make("llama")
    tiny_optimizer = torch.optim.AdamW([model.prompt_encoder["default"].embedding.weight], lr=0.1)
    ids = encode(tokenizer, texts(model)[:1])[0]
    model.train()
    labels = ids.masked_fill(torch.isin(ids, torch.tensor(model.active_peft_config.slot_token_ids)), -100)
    model(input_ids=ids, labels=labels).loss.backward()
    tiny_optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["slots"] == SIZES and saved["slot_tokens"] == ["<|soft_prompt_0|>", "<|soft_prompt_1|>"]
    assert saved["slot_token_ids"] == model.active_peft_config.slot_token_ids
    env = {**os.environ, "PYTHONPATH": TESTS}
    script = RELOAD.format(tests=TESTS, adapter=str(tmp_path / "adapter"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        here = model(input_ids=torch.tensor(fresh["ids"])).logits
    torch.testing.assert_close(torch.tensor(fresh["logits"]), here, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- bad input


def test_wrong_number_of_slot_tokens_names_the_slot_and_row():
    model, tokenizer = make("llama")
    short = f"w5 {model.active_peft_config.slot_tokens[0]} w7 {slots.slot_text(model, 1)} w8"
    ids, mask = encode(tokenizer, [texts(model)[0], short])
    with pytest.raises(SlotError, match=r"Row 1 \(adapter 'default'\) has 1 '<\|soft_prompt_0\|>' tokens, but slot 0"):
        model(input_ids=ids, attention_mask=mask)
    extra = texts(model)[0] + " " + slots.slot_text(model, 1)
    with pytest.raises(SlotError, match=r"Row 0 .* has 6 '<\|soft_prompt_1\|>' tokens, but slot 1 holds 3"):
        model.generate(input_ids=encode(tokenizer, [extra])[0], max_new_tokens=2)


def test_slot_token_in_a_row_without_slots():
    model, tokenizer = make("llama")
    model.add_adapter("front", SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ids, mask = encode(tokenizer, texts(model), "left")
    with pytest.raises(SlotError, match=r"Row 1 \(adapter 'front'\) holds slot token '<\|soft_prompt_0\|>' of "):
        model(input_ids=ids, attention_mask=mask, adapter_names=["default", "front"])
    with pytest.raises(SlotError, match=r"Row 0 \(no prompt\) holds slot token"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["__base__", "default"])


def test_slot_inside_the_padding():
    model, tokenizer = make("llama")
    ids, mask = encode(tokenizer, texts(model))
    mask[0, 2] = 0  # a placeholder position marked as padding
    with pytest.raises(SlotError, match=r"Slot 0 \('<\|soft_prompt_0\|>'\) of row 0 .* falls inside the padding"):
        model(input_ids=ids, attention_mask=mask)


def test_tokenizer_without_the_added_token():
    config = SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, slots=SIZES)
    model = get_peft_model(tiny.causal_lm("llama"), config)
    ids = make_tokenizer()(["w5 w6"], return_tensors="pt")["input_ids"]
    with pytest.raises(SlotError, match="has slots but no placeholder ids: call slots.add_slot_tokens"):
        model(input_ids=ids)
    slots.add_slot_tokens(make_tokenizer(), model)
    plain = make_tokenizer()  # never told about the placeholders: the text falls apart into ordinary tokens
    ids = plain([f"w5 {slots.slot_text(model)} w6"], return_tensors="pt")["input_ids"]
    with pytest.raises(SlotError, match="add_slot_tokens"):
        model(input_ids=ids)
    other = make_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["<|unrelated|>"]})
    with pytest.raises(SlotError, match="was saved with"):
        slots.add_slot_tokens(other, model)


def test_bad_slot_configs_name_the_field():
    with pytest.raises(ValueError, match="slots must be positive sizes summing to num_virtual_tokens=5"):
        SoftPromptConfig(num_virtual_tokens=5, slots=[2, 2])
    with pytest.raises(ValueError, match="slot_tokens must hold 2 distinct entries"):
        SoftPromptConfig(num_virtual_tokens=5, slots=[2, 3], slot_tokens=["<a>", "<a>"])
    with pytest.raises(ValueError, match="need slots"):
        SoftPromptConfig(num_virtual_tokens=5, slot_tokens=["<a>"])


def test_reload_with_peft_from_pretrained_and_path(tmp_path):
    model, tokenizer = make("llama")
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tiny.causal_lm("llama"), str(tmp_path)).eval()
    assert again.active_peft_config.slot_token_ids == model.active_peft_config.slot_token_ids
    ids = encode(tokenizer, texts(model)[:1])[0]
    assert again.execution_path is ExecutionPath.PREFIX_KV
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6, rtol=1e-5)


def test_exported_embeddings_reproduce_our_logits_where_a_server_splices_them(tmp_path):
    from peft_softprompt_ext.export import (
        export_peft_prompt_tuning,
        export_prompt_embeds,
        inputs_embeds_for,
        load_prompt_embeds,
    )

    model, tokenizer = make("llama")
    export_prompt_embeds(model, tmp_path / "embeds")
    prompt, metadata = load_prompt_embeds(tmp_path / "embeds")
    assert metadata["placement"] == "slots" and metadata["slots"] == SIZES
    assert metadata["slot_token_ids"] == model.active_peft_config.slot_token_ids
    base = model.get_base_model()
    for text in texts(model):
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():  # what a server taking prompt embeddings computes (vLLM: {"prompt_embeds": embeds})
            embeds = inputs_embeds_for(prompt, metadata, ids, base.get_input_embeddings())
            served = base(inputs_embeds=embeds[None]).logits
            torch.testing.assert_close(served, model(input_ids=torch.tensor([ids])).logits, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="PROMPT_TUNING can only put them before it"):
        export_peft_prompt_tuning(model, tmp_path / "peft")


def test_decoding_with_the_slot_tokenizer():
    """The tokenizer that carries the slot placeholders (added ids beyond the embedding table: never embedded)
    decodes the prompt as the plain tokenizer does, never to a placeholder, and drives PEZ projection."""
    from peft_softprompt_ext.decode import projected_prompt

    model, tokenizer = make()
    plain = make_tokenizer()
    assert len(tokenizer) > model.get_input_embeddings().weight.shape[0] >= len(plain)
    got, want = model.decode_prompt(tokenizer, top_k=3), model.decode_prompt(plain, top_k=3)
    assert torch.equal(got.token_ids, want.token_ids) and got.text == want.text
    assert not set(got.token_ids.flatten().tolist()) & set(model.active_peft_config.slot_token_ids)
    ids, mask = encode(tokenizer, texts(model))
    with projected_prompt(model, tokenizer=tokenizer) as state:
        model(input_ids=ids, attention_mask=mask)
    assert state.token_ids == got.top1_ids
