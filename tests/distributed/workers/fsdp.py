"""Raw torch FSDP on CPU ranks (gloo): FSDP1 (use_orig_params=False) and FSDP2 (fully_shard).

accelerate and the Trainer silently fall back to DDP on CPU, so this drives torch's FSDP directly. For each mode:
train on different data per rank, check the prompt is in sync and equals one process on the combined batch, save
with every rank taking part (gathered) and with rank 0 alone (correct when the prompt is replicated, a fast
PromptShardedError when it is sharded: never a hang). Writes rank<r>.json with one entry per mode.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from common import global_batches, pg_timeout, prompt_of, soft_prompt_model, train_reference, write_result
from safetensors.torch import load_file

from peft_softprompt_ext.distributed import PromptShardedError
from peft_softprompt_ext.trainer import (
    fsdp_auto_wrap_policy,
    fully_shard_soft_prompt_model,
    gather_prompt_weight,
    save_adapter,
    unwrap_soft_prompt_model,
)

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--rows", type=int, default=8)
parser.add_argument("--shared-kv", type=int, default=1, help="SoftPromptConfig.shared_prompt_kv")
parser.add_argument("--modes", default="fsdp1-peft,fsdp1-replicated,fsdp2-sharded,fsdp2-replicated")
args = parser.parse_args()

dist.init_process_group("gloo", timeout=pg_timeout())
rank, world = dist.get_rank(), dist.get_world_size()
assert world == 2, world
reference = train_reference(args.steps, args.rows, shared_prompt_kv=bool(args.shared_kv))


def wrap(model, mode: str):
    if mode.startswith("fsdp1"):
        from peft.utils.other import fsdp_auto_wrap_policy as peft_policy
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        policy = peft_policy(model) if mode == "fsdp1-peft" else fsdp_auto_wrap_policy(model)
        # device_id: torch >= 2.6 refuses to infer a CPU device for FSDP1
        return FSDP(model, auto_wrap_policy=policy, use_orig_params=False, device_id=torch.device("cpu"))
    return fully_shard_soft_prompt_model(model, replicate_prompt=mode == "fsdp2-replicated")


def read_saved(path: str) -> list:
    return load_file(os.path.join(path, "adapter_model.safetensors"))["prompt_embeddings"].tolist()


def run(mode: str) -> dict:
    model = soft_prompt_model(seed=0, num_virtual_tokens=4, shared_prompt_kv=bool(args.shared_kv))
    model.train()
    initial = prompt_of(model)
    wrapped = wrap(model, mode)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-2, weight_decay=0.0)
    per_rank = args.rows // world
    losses = []
    for batch in global_batches(args.steps, args.rows):
        ids = batch[rank * per_rank : (rank + 1) * per_rank]
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    prompt = gather_prompt_weight(wrapped)  # every rank: a collective when sharded
    inner = unwrap_soft_prompt_model(wrapped)
    base = os.path.join(args.out, mode)

    # 1) every rank calls save (gathered, written once, atomically)
    save_adapter(wrapped, os.path.join(base, "all_ranks"))
    result = {
        "losses": losses,
        "prompt": prompt.tolist(),
        "saved_all_ranks": read_saved(os.path.join(base, "all_ranks")),
    }
    if mode.startswith("fsdp1"):  # 2) what accelerate/Trainer do: a gathered FULL_STATE_DICT handed to save_pretrained
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, cfg):
            state_dict = wrapped.state_dict()
        inner.save_pretrained(os.path.join(base, "full_state_dict"), state_dict=state_dict, is_main_process=rank == 0)
        dist.barrier()
        result["saved_full_state_dict"] = read_saved(os.path.join(base, "full_state_dict"))

    # 3) rank 0 alone saves, the other rank goes straight on to a barrier
    start = time.monotonic()
    if rank == 0:
        try:
            inner.save_pretrained(os.path.join(base, "rank0_only"))
            result["rank0_only"] = read_saved(os.path.join(base, "rank0_only"))
        except PromptShardedError as e:
            result["rank0_only_error"] = str(e)
    result["rank0_only_s"] = time.monotonic() - start
    dist.barrier()
    result["reference"] = reference.tolist()
    result["initial"] = initial.tolist()
    result["layer_sharding"] = layer_sharding(wrapped, inner)
    return result


def layer_sharding(wrapped, inner) -> dict:
    """Evidence that FSDP really shards the base model here (and how it holds the prompt)."""
    layer = inner.base_model.model.layers[0]
    full = sum(p.numel() for p in layer.parameters()) if mode_is_fsdp2(layer) else None
    if mode_is_fsdp2(layer):
        weight = layer.self_attn.q_proj.weight
        prompt = inner.prompt_encoder["default"].embedding.weight
        return {
            "layer_placements": [str(p) for p in weight.placements],
            "layer_local_rows": weight.to_local().shape[0],
            "layer_rows": weight.shape[0],
            "prompt_placements": [str(p) for p in prompt.placements],
            "prompt_local_rows": prompt.to_local().shape[0],
            "full_numel": full,
        }
    handle = layer._handle  # FSDP1 unit around the decoder layer
    prompt_handle = inner.prompt_encoder["default"].embedding._handle
    return {
        "layer_local_numel": handle.flat_param.numel(),
        "layer_numel": handle.flat_param._unpadded_unsharded_size.numel(),
        "prompt_local_numel": prompt_handle.flat_param.numel(),
        "prompt_numel": prompt_handle.flat_param._unpadded_unsharded_size.numel(),
    }


def mode_is_fsdp2(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


results = {}
for mode in args.modes.split(","):
    results[mode] = run(mode)
    dist.barrier()
write_result(args.out, rank, world=world, modes=results)
dist.destroy_process_group()
