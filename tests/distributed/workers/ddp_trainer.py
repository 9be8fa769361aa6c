"""HF Trainer under torchrun on CPU ranks (DDP, gloo) with a soft prompt.

Phases (each writes <out>/<phase>_rank<r>.json):
  full          8 steps, eval + adapter-only checkpoint every 2 steps, load_best_model_at_end, decode callback.
  interrupted   the same run, stopped after step 4 (its checkpoint-4 is what `resume` starts from).
  resume        a fresh process continues `interrupted` from checkpoint-4 to step 8.
The test compares the resumed losses with the uninterrupted ones.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from common import VOCAB, global_batches, pg_timeout, prompt_of, soft_prompt_model, tokenizer
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from peft_softprompt_ext.trainer import DecodedPromptCallback

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--phases", default="full,interrupted")
args = parser.parse_args()


class StopAfter(TrainerCallback):
    """Simulates an interruption: training stops after `step` (once that step's checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def dataset(n_batches: int, rows: int, seed: int) -> list[dict]:
    examples = []
    for batch in global_batches(n_batches, rows, length=10, seed=seed):
        for row in batch:
            examples.append({"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()})
    return examples


def training_args(output_dir: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        max_steps=8,
        # soft prompts want a large learning rate (1e-2 .. 3e-1); PEFT's 1e-4 barely moves them
        learning_rate=3e-2,
        optim="adamw_torch",
        weight_decay=0.0,
        lr_scheduler_type="linear",
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        # "best" = highest eval loss, so the best checkpoint is an early one and loading it visibly changes the
        # prompt (with the usual greater_is_better=False the best is usually the last, a weaker test)
        greater_is_better=True,
        use_cpu=True,
        ddp_backend="gloo",
        ddp_timeout=int(pg_timeout().total_seconds()),
        report_to="none",
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )


def run(phase: str) -> None:
    output_dir = os.path.join(args.out, "interrupted" if phase == "resume" else phase)
    model = soft_prompt_model(seed=0, num_virtual_tokens=4)
    decode = DecodedPromptCallback(tokenizer(), every_n_steps=2)
    callbacks = [decode] + ([StopAfter(4)] if phase == "interrupted" else [])
    trainer = Trainer(
        model=model,
        args=training_args(output_dir),
        train_dataset=dataset(8, 4, seed=1),
        eval_dataset=dataset(2, 4, seed=2),
        data_collator=default_data_collator,
        callbacks=callbacks,
    )
    checkpoint = os.path.join(output_dir, "checkpoint-4") if phase == "resume" else None
    trainer.train(resume_from_checkpoint=checkpoint)
    state = trainer.state
    rank = trainer.args.process_index
    result = {
        "world_size": trainer.args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "is_ddp": isinstance(trainer.model_wrapped, DistributedDataParallel),
        "losses": {str(e["step"]): e["loss"] for e in state.log_history if "loss" in e},
        "eval_losses": {str(e["step"]): e["eval_loss"] for e in state.log_history if "eval_loss" in e},
        "best_model_checkpoint": state.best_model_checkpoint,
        "global_step": state.global_step,
        "prompt": prompt_of(trainer.model).tolist(),
        "decoded": decode.history,
        "vocab": VOCAB,
    }
    path = os.path.join(args.out, f"{phase}_rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    if rank == 0:  # the launcher's rank<r>.json: which phases finished
        done = os.path.join(args.out, "rank0.json")
        phases = json.load(open(done))["phases"] if os.path.exists(done) else []
        with open(done + ".tmp", "w") as f:
            json.dump({"phases": [*phases, phase]}, f)
        os.replace(done + ".tmp", done)


for phase in args.phases.split(","):
    run(phase)
