"""DeepSpeed ZeRO-2 / ZeRO-3 on CPU ranks (DS_ACCELERATOR=cpu, gloo) with raw `deepspeed.initialize`.

Modes (one entry each in rank<r>.json):
  zero2            optimizer state + gradients partitioned.
  zero3            the base model is built under `deepspeed.zero.Init` (its embedding table partitioned from birth)
                   with transformers' HfDeepSpeedConfig alive, as accelerate/Trainer do; text init must gather the
                   table; the prompt is small, so ZeRO-3 keeps it whole (persistence threshold).
  zero3-raw        the same without HfDeepSpeedConfig (plain deepspeed users), with init="vocab": init must still
                   gather.
  zero3-prompt-partitioned
                   stage3_param_persistence_threshold=0: the prompt itself is partitioned; a rank-0-only save must
                   fail fast with a clear error, an all-rank save must gather it.
Each mode trains on different data per rank and compares with one process on the combined batch, decodes the
prompt on every rank, saves with every rank taking part and with rank 0 alone (no hang).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import deepspeed
import torch
import torch.distributed as dist
from common import (
    global_batches,
    pg_timeout,
    tiny_llama,
    tiny_llama_config,
    tokenizer,
    train_reference,
    write_result,
)
from safetensors.torch import load_file

from peft_softprompt_ext.distributed import PromptShardedError
from peft_softprompt_ext.trainer import (
    decoded_prompt_tokens,
    gather_prompt_weight,
    save_adapter,
)

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--rows", type=int, default=8)
parser.add_argument("--modes", default="zero2,zero3,zero3-raw,zero3-prompt-partitioned")
args = parser.parse_args()

deepspeed.init_distributed(dist_backend="gloo", timeout=pg_timeout())
rank, world = dist.get_rank(), dist.get_world_size()
assert world == 2, world
INIT_TEXT = "w10 w11 w12 w13"
tok = tokenizer()
INIT = {
    "text": {"init": "text", "init_text": INIT_TEXT, "tokenizer": tok},
    "vocab": {"init": "vocab", "tokenizer": tok},
}
references = {kind: train_reference(args.steps, args.rows, **kwargs) for kind, kwargs in INIT.items()}


def init_kind(mode: str) -> str:
    return "vocab" if mode == "zero3-raw" else "text"  # both init methods, both ZeRO-3 gathering paths


def ds_config(stage: int, persistence: int | None) -> dict:
    zero: dict = {"stage": stage}
    if persistence is not None:
        zero["stage3_param_persistence_threshold"] = persistence
    return {
        "train_micro_batch_size_per_gpu": args.rows // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**6,
        "wall_clock_breakdown": False,
    }


def build(mode: str, config: dict):
    """The base model (partitioned from birth under ZeRO-3) and the soft prompt on it, text-initialised."""
    hf_config = None
    if mode in ("zero3", "zero3-prompt-partitioned"):
        from transformers.integrations import HfDeepSpeedConfig

        hf_config = HfDeepSpeedConfig(config)  # must stay alive: transformers/PEFT check it through a weakref
    if hf_config is not None:  # transformers builds it under zero.Init itself, as from_pretrained does
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        base = LlamaForCausalLM._from_config(tiny_llama_config())
        # the same weights as the single-process reference (transformers' ZeRO-3 init draws them differently)
        with deepspeed.zero.GatheredParameters(list(base.parameters()), modifier_rank=0):
            if dist.get_rank() == 0:
                base.load_state_dict(tiny_llama(seed=0).state_dict())
    else:
        base = tiny_llama(seed=0)
        if mode == "zero3-raw":  # plain deepspeed: partition the built model before the prompt is added
            deepspeed.zero.Init(module=base, config_dict_or_path=config)
    table = base.get_input_embeddings().weight
    partitioned = hasattr(table, "ds_id") and table.numel() == 0
    from peft import get_peft_model

    from peft_softprompt_ext import SoftPromptConfig

    sp_config = SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, **INIT[init_kind(mode)])
    model = get_peft_model(base, sp_config)
    return model, hf_config, partitioned


def saved(path: str) -> list:
    return load_file(os.path.join(path, "adapter_model.safetensors"))["prompt_embeddings"].tolist()


def run(mode: str) -> dict:
    stage = 2 if mode == "zero2" else 3
    config = ds_config(stage, 0 if mode == "zero3-prompt-partitioned" else None)
    model, hf_config, table_partitioned = build(mode, config)
    initial = gather_prompt_weight(model)  # whole here: not yet under deepspeed.initialize
    # the text's own embedding rows, gathered explicitly (independent of the code under test)
    table = model.base_model.get_input_embeddings().weight
    with deepspeed.zero.GatheredParameters([table]) if hasattr(table, "ds_id") else contextlib.nullcontext():
        full_table = table.detach().clone()
    if init_kind(mode) == "text":
        ids = tok(INIT_TEXT, add_special_tokens=False)["input_ids"]
    else:  # vocab init: each row must be some non-special row of the gathered table
        ids = [
            int((full_table == row).all(-1).nonzero()[0, 0]) if (full_table == row).all(-1).any() else -1
            for row in initial
        ]
    expected_init = full_table[ids].clone()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    per_rank = args.rows // world
    losses = []
    for batch in global_batches(args.steps, args.rows):
        ids_batch = batch[rank * per_rank : (rank + 1) * per_rank]
        loss = engine(input_ids=ids_batch, labels=ids_batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    inner = engine.module
    prompt = gather_prompt_weight(inner)
    weight = inner.prompt_encoder["default"].embedding.weight
    result = {
        "table_partitioned": table_partitioned,
        "prompt_zero3": hasattr(weight, "ds_id"),
        "prompt_persistent": bool(getattr(weight, "ds_persist", False)),
        "initial": initial.tolist(),
        "expected_init": expected_init.tolist(),
        "reference": references[init_kind(mode)].tolist(),
        "init_kind": init_kind(mode),
        "init_ids": ids,
        "prompt": prompt.tolist(),
        "losses": losses,
        "decoded": decoded_prompt_tokens(inner, tok),  # every rank: gathers the table under ZeRO-3
    }
    base = os.path.join(args.out, mode)
    save_adapter(inner, os.path.join(base, "all_ranks"))
    result["saved_all_ranks"] = saved(os.path.join(base, "all_ranks"))
    if stage == 3:  # what the Trainer does under ZeRO-3: a consolidated state dict handed to save_pretrained
        state_dict = engine._zero3_consolidated_16bit_state_dict()
        inner.save_pretrained(os.path.join(base, "consolidated"), state_dict=state_dict, is_main_process=rank == 0)
        dist.barrier()
        result["saved_consolidated"] = saved(os.path.join(base, "consolidated"))
    start = time.monotonic()
    if rank == 0:
        try:
            inner.save_pretrained(os.path.join(base, "rank0_only"))
            result["rank0_only"] = saved(os.path.join(base, "rank0_only"))
        except PromptShardedError as e:
            result["rank0_only_error"] = str(e)
    result["rank0_only_s"] = time.monotonic() - start
    dist.barrier()
    engine.destroy()
    del hf_config
    return result


results = {mode: run(mode) for mode in args.modes.split(",")}
write_result(args.out, rank, world=world, modes=results)
dist.destroy_process_group()
