"""The client libraries people train and evaluate adapters with, driven for real: TRL's SFTTrainer and DPOTrainer
at their defaults (gradient checkpointing on, TRL's fused LM head) on the bundled SmolLM2, the stock lm-eval CLI in
a fresh process, AutoPeftModelForCausalLM in a process that never imports us by name, transformers pipelines."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import tiny
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList, pipeline

from peft_softprompt_ext import SoftPromptConfig

TESTS = os.path.dirname(__file__)
QUESTIONS = [("What is 2+2?", " 4."), ("Capital of France?", " Paris."), ("Say hi.", " Hi!"), ("Sky colour?", " Blue.")]


def fresh(code: str, **env: str) -> str:
    """Run code in a new interpreter that never imports peft_softprompt_ext by name (the start-up hook does)."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": TESTS, **env},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


RELOAD = """
import json, torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained({adapter!r}).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor([{ids!r}])).logits
print(json.dumps({{"class": type(model).__name__, "logits": logits[0, -3:].tolist()}}))
"""


def assert_reloads_identically(model, adapter_dir: str, ids: list[int]) -> None:
    """A fresh process rebuilds base + adapter from the directory alone and gets our logits."""
    reloaded = json.loads(fresh(RELOAD.format(adapter=adapter_dir, ids=ids)).strip().splitlines()[-1])
    assert reloaded["class"] == "SoftPromptModelForCausalLM"
    model.eval()
    with torch.no_grad():
        here = model(input_ids=torch.tensor([ids])).logits[0, -3:]
    torch.testing.assert_close(torch.tensor(reloaded["logits"]), here, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- TRL

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
bundled = pytest.importorskip("peft_softprompt_ext.app.bundled")


def trl_dataset(mode: str):
    if mode == "prompt_completion":
        rows = [{"prompt": q, "completion": a} for q, a in QUESTIONS]
    elif mode == "messages":
        rows = [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QUESTIONS
        ]
    elif mode == "dpo":
        rows = [{"prompt": q, "chosen": a, "rejected": " I don't know."} for q, a in QUESTIONS]
    else:
        rows = [{"text": q + a} for q, a in QUESTIONS]
    return datasets.Dataset.from_list(rows)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["prompt_completion", "messages", "text", "packing", "dpo"])
def test_trl_trains_at_its_defaults_and_the_adapter_reloads(mode, tmp_path):
    try:
        base, tokenizer = bundled.load_smollm2()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        pytest.skip(f"bundled SmolLM2 not installed: {err}")
    config = SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)
    common = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=8,
        per_device_train_batch_size=2,
        learning_rate=5e-2,  # soft prompts want 1e-2 .. 1e-1 (TRL's 2e-5 default is for full weights)
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        max_length=64,
        bf16=False,  # TRL's default bf16=True is refused on a CPU; everything else is TRL's default
        use_cpu=True,
        seed=0,
    )
    if mode == "dpo":
        args = trl.DPOConfig(**common)
        trainer = trl.DPOTrainer(
            model=base, args=args, train_dataset=trl_dataset(mode), processing_class=tokenizer, peft_config=config
        )
    else:
        args = trl.SFTConfig(packing=mode == "packing", **common)
        trainer = trl.SFTTrainer(
            model=base, args=args, train_dataset=trl_dataset(mode), processing_class=tokenizer, peft_config=config
        )
    assert args.gradient_checkpointing, "TRL's default"
    assert "forward" in trainer.model.get_base_model().__dict__, "TRL installed its fused LM head"
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    trainer.save_model(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SOFT_PROMPT" and saved["base_model_name_or_path"] == bundled.SMOLLM2_HUB_ID
    ids = tokenizer("What is 2+2? 4.")["input_ids"]
    assert_reloads_identically(trainer.model, str(tmp_path / "adapter"), ids)


def test_packed_documents_each_get_the_prompt_and_see_only_themselves():
    """TRL's default packing (padding-free: position ids restart per document, no mask) equals each document alone."""
    model = get_peft_model(tiny.causal_lm("llama"), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    docs = [tiny.random_ids(1, n, seed=n)[0] for n in (5, 3, 6)]
    packed = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = packed.clone()
    starts = torch.tensor([0, 5, 8])
    labels[0, starts] = -100  # as TRL's collator does: no pair across documents
    out = model(input_ids=packed, position_ids=positions, labels=labels)
    assert out.logits.shape == (1, 14, tiny.VOCAB)
    losses, count = [], 0
    for doc, start in zip(docs, starts.tolist(), strict=True):
        alone = model(input_ids=doc[None], labels=doc[None])
        torch.testing.assert_close(out.logits[0, start : start + len(doc)], alone.logits[0], atol=1e-5, rtol=1e-4)
        losses.append(alone.loss * (len(doc) - 1))
        count += len(doc) - 1
    torch.testing.assert_close(out.loss, sum(losses) / count, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- lm-eval

TASKS = {
    "sp_mc.yaml": """
        task: sp_mc
        dataset_path: json
        dataset_kwargs:
          data_files: {data}
        test_split: train
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
    """,
    "sp_gen.yaml": """
        task: sp_gen
        dataset_path: json
        dataset_kwargs:
          data_files: {data}
        test_split: train
        output_type: generate_until
        doc_to_text: "{{{{question}}}}"
        doc_to_target: "{{{{target}}}}"
        generation_kwargs:
          until: ["w90"]
          max_gen_toks: 6
          do_sample: false
        metric_list:
          - metric: exact_match
    """,
}


@pytest.fixture(scope="module")
def lm_eval_setup(tmp_path_factory):
    pytest.importorskip("lm_eval")
    root = tmp_path_factory.mktemp("lmeval")
    base = tiny.causal_lm("llama")
    base.save_pretrained(root / "base")
    tokenizer = tiny.word_tokenizer()
    tokenizer.save_pretrained(root / "base")
    config = SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, init="random", init_seed=1)
    model = get_peft_model(base, config)
    with torch.no_grad():  # a prompt far from the initial one, so the scores must move
        model.prompt_encoder["default"].embedding.weight.mul_(8.0)
    model.save_pretrained(root / "adapter")
    rows = []
    for i in range(12):
        words = [f"w{4 + (i * 7 + k) % 80}" for k in range(3 + i % 4)]
        rows.append({"question": " ".join(words), "choices": ["w10", "w20", "w30"], "answer": i % 3, "target": "w11"})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, text in TASKS.items():
        (tasks / name).write_text(textwrap.dedent(text).format(data=str(root / "data.jsonl")))
    return root


def run_lm_eval(root, peft: bool, batch_size: int, output: str) -> dict:
    model_args = f"pretrained={root / 'base'}" + (f",peft={root / 'adapter'}" if peft else "")
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "run",
        "--model",
        "hf",
        "--model_args",
        model_args,
        "--tasks",
        "sp_mc,sp_gen",
        "--include_path",
        str(root / "tasks"),
        "--device",
        "cpu",
        "--batch_size",
        str(batch_size),
        "--output_path",
        output,
        "--log_samples",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(root))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    found = [os.path.join(d, f) for d, _, fs in os.walk(output) for f in fs if f.startswith("samples_sp_mc")]
    samples = [json.loads(line) for line in open(found[0])]
    return {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}  # log-likelihood per choice


@pytest.mark.slow
def test_stock_lm_eval_cli_sees_the_adapter_and_batching_does_not_change_scores(lm_eval_setup, tmp_path):
    """`lm_eval --model hf --model_args pretrained=...,peft=DIR` in a fresh process: the adapter loads (no import of
    ours: the start-up hook), changes the log-likelihoods, and batch sizes 1 and 4 agree."""
    bare = run_lm_eval(lm_eval_setup, peft=False, batch_size=4, output=str(tmp_path / "bare"))
    one = run_lm_eval(lm_eval_setup, peft=True, batch_size=1, output=str(tmp_path / "one"))
    four = run_lm_eval(lm_eval_setup, peft=True, batch_size=4, output=str(tmp_path / "four"))
    assert sorted(one) == sorted(four) == sorted(bare)
    for doc in one:
        torch.testing.assert_close(torch.tensor(one[doc]), torch.tensor(four[doc]), atol=1e-4, rtol=1e-5)
    assert max(abs(a - b) for doc in one for a, b in zip(one[doc], bare[doc], strict=True)) > 1e-2


class _Seen(StoppingCriteria):
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(input_ids.clone())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@pytest.mark.parametrize("shared", [True, False], ids=["prefix_kv", "concat"])
def test_stopping_criteria_see_the_input_and_new_tokens_as_without_a_prompt(shared):
    """lm-eval's `until` checks `input_ids[:, context_len:]`: the ids must be the user's, whatever the path."""
    config = SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, shared_prompt_kv=shared)
    model = get_peft_model(tiny.causal_lm("llama"), config).eval()
    ids, mask = tiny.left_pad([tiny.random_ids(1, 5)[0], tiny.random_ids(1, 7, seed=3)[0]])
    seen = _Seen()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=3,
        do_sample=False,
        stopping_criteria=StoppingCriteriaList([seen]),
    )
    assert seen.seen[-1].shape == out.shape
    assert torch.equal(seen.seen[-1], out) and torch.equal(seen.seen[0][:, : ids.shape[1]], ids)


# --------------------------------------------------------------------------- AutoPeft and pipelines


def test_auto_peft_model_in_a_fresh_process_without_importing_us(tmp_path):
    tiny.causal_lm("llama").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, init="random"))
    tiny.train_steps(model, 2)
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base"
    )
    assert_reloads_identically(model, str(tmp_path / "adapter"), tiny.random_ids(1, 6)[0].tolist())
    code = "from peft import PeftConfig; print(type(PeftConfig.from_pretrained({d!r})).__name__)".format(
        d=str(tmp_path / "adapter")
    )
    assert fresh(code).strip() == "SoftPromptConfig"


def test_text_generation_pipeline_equals_generate_batched_and_single(caplog):
    tokenizer = tiny.word_tokenizer()
    model = get_peft_model(tiny.causal_lm("llama"), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.eval()
    with caplog.at_level(logging.ERROR):
        generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    assert "is not supported for text-generation" not in caplog.text
    texts = ["w5 w6 w7", "w8 w9 w10 w11 w12 w13"]
    settings = dict(max_new_tokens=4, do_sample=False, return_full_text=False)
    single = [generator(text, **settings)[0]["generated_text"] for text in texts]
    batched = [r[0]["generated_text"] for r in generator(texts, batch_size=2, **settings)]
    assert single == batched
    for text, generated in zip(texts, single, strict=True):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == generated
