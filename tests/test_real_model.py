"""SmolLM2-135M-Instruct (the bundled real model): training lowers the loss, a fresh process reloads the adapter
and generates identically, and the shared prompt KV equals plain concatenation on a real network."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import get_peft_model

from peft_softprompt_ext import SoftPromptConfig

pytestmark = pytest.mark.slow
bundled = pytest.importorskip("peft_softprompt_ext.app.bundled")

QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of Germany?", "Berlin"),
]


@pytest.fixture(scope="module")
def smollm2():
    try:
        return bundled.load_smollm2()
    except ModuleNotFoundError as error:
        pytest.skip(str(error))


def batch(tokenizer, pairs):
    """Chat prompt + one-word answer; loss only on the answer tokens."""
    tokenizer.padding_side = "left"
    texts, answers = [], []
    for question, answer in pairs:
        texts.append(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        )
        answers.append(f"The answer: {answer}.")
    prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
    targets = tokenizer(answers, add_special_tokens=False)["input_ids"]
    rows = [p + t for p, t in zip(prompts, targets, strict=True)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        row = p + t
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
        labels[i, width - len(t) :] = torch.tensor(t)
    return ids, mask, labels


def test_train_save_reload_in_fresh_process_generates_identically(smollm2, tmp_path):
    base, tokenizer = smollm2
    config = SoftPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=8, init="text", init_text="Answer with one word.", tokenizer=tokenizer
    )
    model = get_peft_model(base, config)
    assert model.get_nb_trainable_parameters()[0] == 8 * 576
    ids, mask, labels = batch(tokenizer, QUESTIONS)
    optimizer = torch.optim.AdamW([model.prompt_encoder["default"].embedding.weight], lr=3e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    question = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Portugal?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(question, return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    torch.save({"ids": ids, "expected": expected}, tmp_path / "expected.pt")
    script = f"""
        import torch, peft_softprompt_ext
        from peft import PeftModel
        from peft_softprompt_ext.app.bundled import load_smollm2
        base, _ = load_smollm2()
        data = torch.load({str(tmp_path / "expected.pt")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        out = model.generate(input_ids=data["ids"], max_new_tokens=12, do_sample=False)
        assert torch.equal(out, data["expected"]), (out, data["expected"])
        print("identical")
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    assert result.returncode == 0 and "identical" in result.stdout, result.stderr[-3000:]


def test_shared_prompt_kv_equals_concatenation_on_smollm2(smollm2):
    base, tokenizer = smollm2
    config = dict(task_type="CAUSAL_LM", num_virtual_tokens=20, init="vocab", init_seed=3, tokenizer=tokenizer)
    shared = get_peft_model(base, SoftPromptConfig(**config, shared_prompt_kv=True))
    ids, mask, labels = batch(tokenizer, QUESTIONS[:3])
    shared.train()
    out_kv = shared(input_ids=ids, attention_mask=mask, labels=labels)
    out_kv.loss.backward()
    grad_kv = shared.prompt_encoder["default"].embedding.weight.grad.clone()
    shared.prompt_encoder["default"].embedding.weight.grad = None
    shared.peft_config["default"].shared_prompt_kv = False
    out_cat = shared(input_ids=ids, attention_mask=mask, labels=labels)
    out_cat.loss.backward()
    grad_cat = shared.prompt_encoder["default"].embedding.weight.grad
    real = mask.bool()
    scale = out_cat.logits.abs().max()
    assert ((out_kv.logits - out_cat.logits)[real].abs().max() / scale) < 1e-4
    assert ((grad_kv - grad_cat).norm() / grad_cat.norm()) < 1e-5
