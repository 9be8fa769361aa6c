"""Training around the model: Trainer callbacks, distributed saving, checkpoint discovery and FSDP wrapping.

Nothing in the core imports this module. It exists for three things PEFT's own prompt tuning gets wrong when the
rest of the model is sharded:

* when every rank takes part, the prompt is gathered and the main process writes it (`save_adapter`); a rank that
  saves alone reads the prompt without collectives or refuses (`distributed.local_weight`);
* sharding a few kilobytes buys nothing, so `fsdp_auto_wrap_policy` / `fully_shard_soft_prompt_model` keep the
  prompt replicated (its gradient is still averaged), which makes a rank-0-only save correct;
* the Trainer writes checkpoints in place: `last_complete_checkpoint` skips one a crash left half-written.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from typing import Any

import torch
from peft.utils.other import fsdp_auto_wrap_policy as peft_fsdp_policy
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import ShardingStrategy, fully_shard
from torch.distributed.fsdp.wrap import CustomPolicy
from transformers import TrainerCallback

from . import decode
from .constants import CONFIG_NAME, WEIGHTS_NAME, prompt_parameter_key
from .distributed import barrier, gather_weight, is_fsdp_managed
from .distributed import is_main_process as is_main
from .prompt import SoftPromptEncoder
from .tuner import SoftPromptModel

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"


def unwrap_soft_prompt_model(model: nn.Module) -> SoftPromptModel:
    """The `SoftPromptModel` inside DDP / FSDP1 / DeepSpeed engine / torch.compile wrappers."""
    seen = 0
    while not isinstance(model, SoftPromptModel):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or seen > 8:
            raise TypeError(f"No SoftPromptModel inside {type(model).__name__}.")
        model, seen = inner, seen + 1
    return model


def gather_prompt_weight(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """The full prompt weight, a CPU copy on every rank. A collective when the prompt is sharded: call on all ranks."""
    inner = unwrap_soft_prompt_model(model)
    return gather_weight(inner.prompt_encoder[adapter_name or inner.active_adapter].embedding)


def save_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike,
    adapter_name: str | None = None,
    is_main_process: bool | None = None,
    **kwargs: Any,
) -> str | None:
    """Save the adapter from a distributed run. Call it on EVERY rank: the prompt is gathered (a collective when
    it is sharded), then the main process alone writes it atomically. Returns the directory on the main process."""
    inner = unwrap_soft_prompt_model(model)
    name = adapter_name or inner.active_adapter
    full = gather_prompt_weight(model, name)
    main = is_main() if is_main_process is None else is_main_process
    result = None
    if main:
        state_dict = {prompt_parameter_key(name): full}
        inner.save_pretrained(save_directory, selected_adapters=[name], state_dict=state_dict, **kwargs)
        result = os.path.abspath(os.fspath(save_directory))
    barrier()  # nobody reads the directory before it is complete
    return result


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_complete(path: str) -> bool:
    try:
        for name in (CONFIG_NAME, TRAINER_STATE_NAME):
            with open(os.path.join(path, name)) as f:
                json.load(f)
        with safe_open(os.path.join(path, WEIGHTS_NAME), "pt") as f:
            list(f.keys())
    except (OSError, ValueError, SafetensorError):
        return False
    return True


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` under `output_dir` whose adapter, config and trainer state all load; pass it to
    ``trainer.train(resume_from_checkpoint=...)``. Unlike transformers' `get_last_checkpoint` it skips a
    checkpoint that a crash left half-written (the Trainer writes checkpoints in place)."""
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
    leaves: set[nn.Module] = set()
    for module in model.modules():
        if isinstance(module, SoftPromptEncoder):
            leaves.update(m for m in module.modules() if not list(m.children()))
    return leaves


def fsdp_auto_wrap_policy(model: nn.Module) -> CustomPolicy:
    """FSDP1 auto-wrap policy: PEFT's (`peft.utils.other.fsdp_auto_wrap_policy`), except that the prompt's units
    use NO_SHARD. The prompt stays whole on every rank (its gradient is all-reduced), so a rank-0-only save reads
    it without collectives, and it costs a few kilobytes per rank."""
    peft_fn = peft_fsdp_policy(model)
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
            world = torch.distributed.get_world_size()
            kwargs["mesh"] = init_device_mesh(device_type, (world, 1), mesh_dim_names=("replicate", "shard"))
        fully_shard(encoder.embedding, **kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model


# --------------------------------------------------------------------------- decoding callback


def decoded_prompt_tokens(model: nn.Module, tokenizer: Any = None, adapter_name: str | None = None) -> dict:
    """Top-1 nearest tokens (cosine) of each virtual token: ``{"token_ids": [...], "tokens": [...], "text": str}``.

    The model's own `decode_prompt` (so the callback and the CLI agree), except under FSDP, where the prompt is
    gathered first. A collective under ZeRO-3 / FSDP: call on every rank."""
    inner = unwrap_soft_prompt_model(model)
    name = adapter_name or inner.active_adapter
    if not is_fsdp_managed(inner):
        ids = inner.decode_prompt(tokenizer, adapter_name=name, metric="cosine", top_k=1).top1_ids
    else:
        prompt = gather_prompt_weight(model, name)  # the table is gathered by the search itself
        ids = decode.nearest_tokens(prompt, inner.word_embeddings, "cosine", 1)[0][:, 0].tolist()
    ids = [int(i) for i in ids]
    tokens = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [str(i) for i in ids]
    text = tokenizer.decode(ids) if tokenizer is not None else " ".join(tokens)
    return {"token_ids": ids, "tokens": tokens, "text": text}


class DecodedPromptCallback(TrainerCallback):
    """Log what the prompt "says" while it trains: every `every_n_steps` steps (and at the end), the top-1
    nearest vocabulary token of each virtual token by cosine.

    Every rank computes (the gather is a collective under ZeRO-3 / FSDP); only the main process logs, keeps
    `history` and, when `write_jsonl` (default ``<output_dir>/decoded_prompt.jsonl``), appends a line.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        every_n_steps: int = 50,
        jsonl_path: str | None = None,
        write_jsonl: bool = True,
        adapter_name: str | None = None,
    ) -> None:
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps <= 0:
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
