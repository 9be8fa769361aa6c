"""Is a parameter sharded (FSDP 1/2, DeepSpeed ZeRO-3), how to read it on one rank, and how to gather it.

A soft prompt is a few kilobytes, but it trains inside models whose other weights may be sharded. Reading the prompt
on one rank alone (``if rank == 0: save``) must never start a collective, which would hang, and must never silently
save a shard; gathering is a collective that every rank enters. Only torch here (DeepSpeed through the imports gate),
so every other module can ask these questions without depending on the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .imports import require

try:  # a torch built without distributed support has none of these
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    FSDPModule = FullyShardedDataParallel = DTensor = None


class PromptShardedError(RuntimeError):
    """The prompt is split across ranks, so one rank alone cannot read it (and must not start a collective)."""


def is_fsdp1_unit(module: nn.Module) -> bool:
    return FullyShardedDataParallel is not None and isinstance(module, FullyShardedDataParallel)


def is_fsdp_module(module: nn.Module) -> bool:
    """An FSDP1 wrapper or a module FSDP2's `fully_shard` has been applied to."""
    return FSDPModule is not None and isinstance(module, FullyShardedDataParallel | FSDPModule)


def is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's logical shape, also when ZeRO-3 has partitioned it (its local tensor is then empty)."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


def dtensor_is_sharded(tensor: torch.Tensor) -> bool | None:
    """None when `tensor` is not a DTensor; else whether any mesh dimension of size > 1 shards it."""
    if DTensor is None or not isinstance(tensor, DTensor):
        return None
    mesh = tensor.device_mesh
    return any(p.is_shard() and mesh.size(i) > 1 for i, p in enumerate(tensor.placements))


def is_fsdp_managed(model: nn.Module) -> bool:
    """FSDP1 units or FSDP2 DTensor parameters anywhere inside `model`."""
    return any(is_fsdp1_unit(m) for m in model.modules()) or any(
        dtensor_is_sharded(p) is not None for p in model.parameters()
    )


def parameters_are_sharded(model: nn.Module) -> bool:
    """Whether FSDP (1 or 2) or ZeRO-3 manages parameters inside `model`. Those free a layer's weights after its
    forward and fetch them again from hooks on its outputs in backward, so a layer must not be reached through a
    side channel (the shared prompt KV cache is one): the model then uses the concatenated forward."""
    return any(is_fsdp_module(m) for m in model.modules()) or any(is_zero3_param(p) for p in model.parameters())


def local_weight(module: nn.Module) -> torch.Tensor:
    """`module.weight` whole, as this rank holds it, read without any collective (safe on one rank alone).

    Raises `PromptShardedError` when this rank only holds a shard (FSDP FULL_SHARD, FSDP2 sharded, ZeRO-3
    partitioned): then every rank must take part (`gather_weight`)."""
    if is_fsdp1_unit(module):
        handle = module._handle
        flat = handle.flat_param
        if handle.uses_sharded_strategy and handle.world_size > 1:
            raise PromptShardedError(
                "The soft prompt is sharded by FSDP (FULL_SHARD/SHARD_GRAD_OP), so one rank can't read it. Call "
                "save on every rank (peft_softprompt_ext.trainer.save_adapter or the Trainer), or wrap with "
                "peft_softprompt_ext.trainer.fsdp_auto_wrap_policy, which keeps the prompt replicated."
            )
        shape, numel = flat._shapes[0], flat._numels[0]
        return flat.detach()[:numel].view(shape)
    weight = module.weight
    sharded = dtensor_is_sharded(weight)
    if sharded:
        raise PromptShardedError(
            "The soft prompt is a sharded DTensor (FSDP2 fully_shard), so one rank can't read it. Call save on "
            "every rank, or shard with peft_softprompt_ext.trainer.fully_shard_soft_prompt_model, which keeps the "
            "prompt replicated."
        )
    if sharded is False:
        return weight.detach().to_local()
    if is_zero3_param(weight) and weight.numel() != full_shape(weight).numel():
        raise PromptShardedError(
            "The soft prompt is partitioned by DeepSpeed ZeRO-3, so one rank can't read it. Call save on every "
            "rank, or raise zero_optimization.stage3_param_persistence_threshold above num_virtual_tokens * "
            "hidden_size so ZeRO-3 keeps the prompt whole on every rank."
        )
    return weight.detach()


@contextlib.contextmanager
def gathered_params(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Gather ZeRO-3 partitioned parameters for the block (a collective: every rank must enter); a no-op for
    anything else. Unlike PEFT's `gather_params_ctx` this looks at the parameters themselves, so it also works
    with raw `deepspeed.initialize` / `deepspeed.zero.Init`, where transformers' global ZeRO-3 flag is unset."""
    partitioned = [p for p in params if is_zero3_param(p)]
    if not partitioned:
        yield
        return
    deepspeed = require("deepspeed", "Reading a ZeRO-3 partitioned parameter")
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def gather_weight(module: nn.Module) -> torch.Tensor:
    """`module.weight` whole, a CPU copy on every rank. A collective when it is sharded: call on all ranks."""
    if is_fsdp1_unit(module):
        with FullyShardedDataParallel.summon_full_params(module, recurse=False, writeback=False):
            return module.weight.detach().cpu().clone()
    weight = module.weight
    if dtensor_is_sharded(weight) is not None:
        return weight.detach().full_tensor().cpu().clone()
    with gathered_params([weight]):
        return weight.detach().cpu().clone()


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
