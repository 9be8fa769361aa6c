"""Trainer callbacks and helpers for DDP, FSDP (1 and 2), DeepSpeed ZeRO and atomic adapter checkpoints.

Why this module exists: a soft prompt is tiny (``num_virtual_tokens x hidden``) but trains inside models whose
other weights may be sharded. Three things then go wrong in PEFT's own prompt tuning and are handled here:

* reading the prompt on one rank (``if rank == 0: model.save_pretrained(...)``) must never start a collective
  (it would hang) and must never silently save a shard: `local_prompt_weight` reads it without collectives or
  raises `PromptShardedError`;
* when every rank takes part, the prompt can be gathered: `gather_prompt_weight`, `save_adapter`;
* sharding a few kilobytes buys nothing, so `fsdp_auto_wrap_policy` / `fully_shard_soft_prompt_model` keep the
  prompt replicated (its gradient is still averaged), which makes a rank-0-only save correct.

Checkpoints are written atomically (`atomic_save_pretrained`): a crash mid-save leaves the previous one loadable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

__all__ = [
    "DecodedPromptCallback",
    "PromptShardedError",
    "atomic_save_pretrained",
    "decoded_prompt_tokens",
    "fsdp_auto_wrap_policy",
    "fully_shard_soft_prompt_model",
    "gather_prompt_weight",
    "gathered_params",
    "last_complete_checkpoint",
    "local_prompt_weight",
    "local_adapter_state_dict",
    "parameters_are_sharded",
    "save_adapter",
    "unwrap_soft_prompt_model",
]


class PromptShardedError(RuntimeError):
    """The prompt is split across ranks, so one rank alone cannot read it (and must not start a collective)."""


# --------------------------------------------------------------------------- finding the model


def unwrap_soft_prompt_model(model: nn.Module) -> nn.Module:
    """The `SoftPromptModel` inside DDP / FSDP1 / DeepSpeed engine / torch.compile wrappers."""
    from .model import SoftPromptModel

    seen = 0
    while not isinstance(model, SoftPromptModel):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or seen > 8:
            raise TypeError(f"No SoftPromptModel inside {type(model).__name__}.")
        model, seen = inner, seen + 1
    return model


def _prompt_module(model: nn.Module, adapter_name: str | None) -> nn.Module:
    inner = unwrap_soft_prompt_model(model)
    return inner.prompt_encoder[adapter_name or inner.active_adapter].embedding


# --------------------------------------------------------------------------- reading / gathering the prompt


def _fsdp_classes() -> tuple[type, ...]:
    """(FSDP1 wrapper, FSDP2 module mixin), or () on a torch built without distributed support."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return ()
    return FullyShardedDataParallel, FSDPModule


def _is_fsdp1_unit(module: nn.Module) -> bool:
    classes = _fsdp_classes()
    return bool(classes) and isinstance(module, classes[0])


def _is_fsdp_module(module: nn.Module) -> bool:
    classes = _fsdp_classes()
    return bool(classes) and isinstance(module, classes)


def _is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def _dtensor_is_sharded(tensor: torch.Tensor) -> bool | None:
    """None when `tensor` is not a DTensor; else whether any mesh dimension of size > 1 shards it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        return None
    if not isinstance(tensor, DTensor):
        return None
    mesh = tensor.device_mesh
    return any(p.is_shard() and mesh.size(i) > 1 for i, p in enumerate(tensor.placements))


def local_prompt_weight(embedding: nn.Module) -> torch.Tensor:
    """The full prompt weight as this rank holds it, read without any collective (safe on one rank alone).

    Raises `PromptShardedError` when this rank only holds a shard (FSDP FULL_SHARD, FSDP2 sharded, ZeRO-3
    partitioned): then every rank must take part (`gather_prompt_weight`, `save_adapter`, or the Trainer's save).
    """
    if _is_fsdp1_unit(embedding):
        handle = embedding._handle
        flat = handle.flat_param
        if handle.uses_sharded_strategy and handle.world_size > 1:
            raise PromptShardedError(
                "The soft prompt is sharded by FSDP (FULL_SHARD/SHARD_GRAD_OP), so one rank can't read it. Call "
                "save on every rank (peft_softprompt_ext.integrations.save_adapter or the Trainer), or wrap with "
                "peft_softprompt_ext.integrations.fsdp_auto_wrap_policy, which keeps the prompt replicated."
            )
        shape, numel = flat._shapes[0], flat._numels[0]
        return flat.detach()[:numel].view(shape)
    weight = embedding.weight
    sharded = _dtensor_is_sharded(weight)
    if sharded:
        raise PromptShardedError(
            "The soft prompt is a sharded DTensor (FSDP2 fully_shard), so one rank can't read it. Call save on "
            "every rank, or shard with peft_softprompt_ext.integrations.fully_shard_soft_prompt_model, which "
            "keeps the prompt replicated."
        )
    if sharded is False:
        return weight.detach().to_local()
    if _is_zero3_param(weight) and weight.numel() != int(torch.Size(weight.ds_shape).numel()):
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
    partitioned = [p for p in params if _is_zero3_param(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def gather_prompt_weight(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """The full prompt weight, a CPU copy on every rank. A collective when the prompt is sharded: call on all ranks."""
    module = _prompt_module(model, adapter_name)
    if _is_fsdp1_unit(module):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(module, recurse=False, writeback=False):
            return module.weight.detach().cpu().clone()
    weight = module.weight
    if _dtensor_is_sharded(weight) is not None:
        return weight.detach().full_tensor().cpu().clone()
    with gathered_params([weight]):
        return weight.detach().cpu().clone()


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# --------------------------------------------------------------------------- saving


def parameters_are_sharded(model: nn.Module) -> bool:
    """Whether FSDP (1 or 2) or ZeRO-3 manages parameters inside `model`. Those free a layer's weights after its
    forward and fetch them again from hooks on its outputs in backward, so a layer must not be reached through a
    side channel (the shared prompt KV cache is one): the model then uses the concatenated forward."""
    return any(_is_fsdp_module(m) for m in model.modules()) or any(_is_zero3_param(p) for p in model.parameters())


def local_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """An adapter state dict read without collectives when FSDP (1 or 2) manages `model`, else None.

    Why: PEFT's `save_pretrained` calls `model.state_dict()` when no state dict is given; under FSDP1 every
    state-dict type (FULL, SHARDED, even LOCAL: ShardedTensor metadata) runs a collective, so a rank-0-only save
    hangs, and under FSDP2 it returns DTensors safetensors can't write. `local_prompt_weight` needs no collective
    (and raises PromptShardedError when the prompt is sharded). Other trainable modules (a classification head)
    or a residual prompt under FSDP must be saved on every rank (`save_adapter`)."""
    from .model import SoftPromptModel

    if not isinstance(model, SoftPromptModel) or not any(_is_fsdp_module(m) for m in model.modules()):
        return None
    if any(getattr(model, "modules_to_save", None) or ()):
        raise PromptShardedError(
            "Under FSDP a soft prompt with modules_to_save (e.g. a classification head) can't be saved by one rank "
            "alone: call peft_softprompt_ext.integrations.save_adapter on every rank, or the Trainer's save."
        )
    state: dict[str, torch.Tensor] = {}
    for name, encoder in model.prompt_encoder.items():
        if encoder.residual is not None:
            raise PromptShardedError(
                "Under FSDP a residual soft prompt can't be saved by one rank alone: fold() it first or save on "
                "every rank."
            )
        state[f"prompt_encoder.{name}.embedding.weight"] = local_prompt_weight(encoder.embedding).clone()
    return state


def atomic_save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> str:
    """`model.save_pretrained(save_directory, **kwargs)`, made atomic with `atomic.atomic_dir`: the files are
    written to a hidden staging directory, synced, then swapped in with renames, so a crash at any moment leaves the
    previous adapter or the new one (never a mix). Only the main process writes (`is_main_process`)."""
    from .atomic import atomic_dir

    save_directory = os.path.abspath(os.fspath(save_directory))
    if not kwargs.get("is_main_process", True):
        model.save_pretrained(save_directory, **kwargs)  # computes nothing collective, writes nothing
        return save_directory
    with atomic_dir(save_directory, if_exists="replace") as staging:
        model.save_pretrained(staging, **kwargs)
    return save_directory


def save_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike,
    adapter_name: str | None = None,
    is_main_process: bool | None = None,
    **kwargs: Any,
) -> str | None:
    """Save the adapter from a distributed run. Call it on EVERY rank: the prompt is gathered (a collective when
    it is sharded), then the main process alone writes it atomically. Returns the directory on the main process."""
    import torch.distributed as dist

    inner = unwrap_soft_prompt_model(model)
    name = adapter_name or inner.active_adapter
    full = gather_prompt_weight(model, name)
    main = _is_main_process() if is_main_process is None else is_main_process
    result = None
    if main:
        state_dict = {f"prompt_encoder.{name}.embedding.weight": full}
        result = atomic_save_pretrained(
            inner, save_directory, selected_adapters=[name], state_dict=state_dict, **kwargs
        )
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # nobody reads the directory before it is complete
    return result


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_complete(path: str) -> bool:
    from safetensors import safe_open

    from .prompt import ADAPTER_WEIGHTS_NAME

    weights = os.path.join(path, ADAPTER_WEIGHTS_NAME)
    config = os.path.join(path, "adapter_config.json")
    state = os.path.join(path, "trainer_state.json")
    try:
        for file in (config, state):
            with open(file) as f:
                json.load(f)
        with safe_open(weights, "pt") as f:
            list(f.keys())
    except (OSError, ValueError, RuntimeError):
        return False
    return True


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` under `output_dir` whose adapter, config and trainer state all load; pass it to
    ``trainer.train(resume_from_checkpoint=...)``. Unlike transformers' `get_last_checkpoint` it skips a
    checkpoint that a crash left half-written (the Trainer writes checkpoints in place)."""
    import re

    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for entry in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", entry)
        if match and os.path.isdir(os.path.join(output_dir, entry)):
            steps.append((int(match.group(1)), os.path.join(output_dir, entry)))
    for step, path in sorted(steps, reverse=True):
        if _checkpoint_complete(path):
            return path
        logger.warning("Skipping incomplete checkpoint %s (step %d).", path, step)
    return None


# --------------------------------------------------------------------------- FSDP


def _prompt_leaf_modules(model: nn.Module) -> set[nn.Module]:
    from .prompt import SoftPromptEncoder

    leaves: set[nn.Module] = set()
    for module in model.modules():
        if isinstance(module, SoftPromptEncoder):
            leaves.update(m for m in module.modules() if not list(m.children()))
    return leaves


def fsdp_auto_wrap_policy(model: nn.Module) -> Any:
    """FSDP1 auto-wrap policy: PEFT's (`peft.utils.other.fsdp_auto_wrap_policy`), except that the prompt's units
    use NO_SHARD. The prompt stays whole on every rank (its gradient is all-reduced), so a rank-0-only save reads
    it without collectives, and it costs a few kilobytes per rank."""
    from peft.utils.other import fsdp_auto_wrap_policy as peft_policy
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import CustomPolicy

    peft_fn = peft_policy(model)
    prompt_leaves = _prompt_leaf_modules(model)

    def lambda_fn(module: nn.Module) -> bool | dict[str, Any]:
        if module in prompt_leaves:
            return {"sharding_strategy": ShardingStrategy.NO_SHARD}
        return bool(peft_fn(module=module, recurse=False, nonwrapped_numel=0))

    return CustomPolicy(lambda_fn)


def fully_shard_soft_prompt_model(
    model: nn.Module,
    layer_classes: Iterable[type] | None = None,
    replicate_prompt: bool = True,
    **fully_shard_kwargs: Any,
) -> nn.Module:
    """Apply FSDP2 `fully_shard` to a soft-prompt model: each decoder layer, the prompt, then the root.

    With `replicate_prompt` the prompt gets a (world, 1) HSDP mesh: replicated on every rank, gradients averaged,
    so a rank-0-only save needs no collective. Without it the prompt is sharded like everything else."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    inner = unwrap_soft_prompt_model(model)
    device_type = fully_shard_kwargs.pop("device_type", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    if layer_classes is None:
        names = set(getattr(inner.base_model, "_no_split_modules", None) or [])
        layer_classes = {type(m) for m in inner.base_model.modules() if type(m).__name__ in names}
    layer_classes = tuple(layer_classes)
    for module in inner.base_model.modules():
        if layer_classes and isinstance(module, layer_classes):
            fully_shard(module, **fully_shard_kwargs)
    for encoder in inner.prompt_encoder.values():
        kwargs = dict(fully_shard_kwargs)
        if replicate_prompt:
            kwargs["mesh"] = init_device_mesh(
                device_type, (dist.get_world_size(), 1), mesh_dim_names=("replicate", "shard")
            )
        fully_shard(encoder.embedding, **kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


# --------------------------------------------------------------------------- decoding callback


def _nearest_tokens(prompt: torch.Tensor, table: torch.Tensor, chunk_rows: int = 8192) -> list[int]:
    """Top-1 vocabulary id by cosine for each prompt row, chunked over the vocabulary (no [P, V] float copy)."""
    prompt = nn.functional.normalize(prompt.float(), dim=-1)
    best_score = torch.full((prompt.shape[0],), -2.0)
    best_id = torch.zeros(prompt.shape[0], dtype=torch.long)
    for start in range(0, table.shape[0], chunk_rows):
        rows = nn.functional.normalize(table[start : start + chunk_rows].detach().float().cpu(), dim=-1)
        score, index = (prompt @ rows.T).max(dim=-1)
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_id = torch.where(better, index + start, best_id)
    return best_id.tolist()


def decoded_prompt_tokens(model: nn.Module, tokenizer: Any = None, adapter_name: str | None = None) -> dict:
    """Top-1 nearest tokens (cosine) of each virtual token: ``{"token_ids": [...], "tokens": [...], "text": str}``.

    Uses the model's own `decode_prompt` (so the callback and the CLI agree), except under FSDP, where the prompt
    is gathered with `gather_prompt_weight` and decoded here. A collective under ZeRO-3 / FSDP: call on every rank.
    """
    inner = unwrap_soft_prompt_model(model)
    name = adapter_name or inner.active_adapter
    decode = getattr(inner, "decode_prompt", None)
    fsdp = any(_is_fsdp1_unit(m) for m in inner.modules()) or any(
        _dtensor_is_sharded(p) is not None for p in inner.parameters()
    )
    if decode is not None and not fsdp:
        ids = [int(i) for i in decode(tokenizer, adapter_name=name, metric="cosine", top_k=1).top1_ids]
    else:
        prompt = gather_prompt_weight(model, name)
        encoder = inner.prompt_encoder[name]
        if getattr(encoder, "residual", None) is not None and not fsdp:
            with torch.no_grad():
                prompt = encoder().detach().float().cpu()
        table = inner.word_embeddings.weight
        with gathered_params([table]):
            ids = _nearest_tokens(prompt, table)
    tokens = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [str(i) for i in ids]
    text = tokenizer.decode(ids) if tokenizer is not None else " ".join(tokens)
    return {"token_ids": ids, "tokens": tokens, "text": text}


class DecodedPromptCallback(TrainerCallback):
    """Log what the prompt "says" while it trains: every `every_n_steps` steps (and at the end), the top-1
    nearest vocabulary token of each virtual token by cosine.

    Every rank computes (the gather is a collective under ZeRO-3 / FSDP); only the main process logs, keeps
    `history` and, when `jsonl_path` is given (default ``<output_dir>/decoded_prompt.jsonl``), appends a line.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        every_n_steps: int = 50,
        jsonl_path: str | None = None,
        write_jsonl: bool = True,
        adapter_name: str | None = None,
    ) -> None:
        if not isinstance(every_n_steps, int) or every_n_steps <= 0:
            raise ValueError(f"DecodedPromptCallback.every_n_steps must be a positive integer, got {every_n_steps!r}.")
        self.tokenizer = tokenizer
        self.every_n_steps = every_n_steps
        self.jsonl_path = jsonl_path
        self.write_jsonl = write_jsonl
        self.adapter_name = adapter_name
        self.history: list[dict] = []
        self._last_step = -1

    def _record(self, args: Any, state: Any, model: nn.Module | None, tokenizer: Any) -> None:
        if model is None or state.global_step == self._last_step:
            return
        self._last_step = state.global_step
        decoded = decoded_prompt_tokens(model, tokenizer or self.tokenizer, self.adapter_name)
        if not state.is_world_process_zero:
            return
        entry = {"step": state.global_step, **decoded}
        self.history.append(entry)
        logger.info("step %d decoded prompt: %r", state.global_step, decoded["text"])
        if self.write_jsonl:
            path = self.jsonl_path or os.path.join(args.output_dir, "decoded_prompt.jsonl")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if state.global_step % self.every_n_steps == 0:
            self._record(args, state, model, kwargs.get("processing_class"))

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        self._record(args, state, model, kwargs.get("processing_class"))
