"""Move soft prompts in and out of this package: vanilla PEFT prompt tuning and raw prompt embeddings.

- `export_peft_prompt_tuning`: an adapter dir that plain ``peft`` loads as PROMPT_TUNING without this package
  installed. The forward is the same on unpadded input; PEFT's own prompt tuning then returns P extra leading
  logit positions and, with left padding, puts the prompt before the pads (see the design brief).
- `import_peft_prompt_tuning` / `load_peft_prompt_tuning`: a PEFT PROMPT_TUNING dir into one of ours.
- `export_prompt_embeds`: the ``[num_virtual_tokens, hidden]`` tensor as safetensors plus a small JSON, for servers
  that take prompt embeddings (vLLM ``prompt_embeds``): prepend it to the embedded, tokenised input.

Reading and writing go through `adapter_dir` (safetensors and JSON only, validated, atomic; ``overwrite=True``
replaces only a directory this package wrote).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from peft import PeftModel, PromptTuningConfig
from safetensors.torch import save_file
from torch import nn

from . import adapter_dir
from .config import SoftPromptConfig
from .constants import (
    EMBEDS_FORMAT,
    EMBEDS_KEY,
    EMBEDS_METADATA_NAME,
    EMBEDS_WEIGHTS_NAME,
    EXPORT_DTYPES,
    PEFT_PROMPT_TUNING_TYPE,
    PEFT_TYPE_NAME,
    PROMPT_KEY,
    RESIDUAL_PREFIX,
    WEIGHTS_NAME,
)

logger = logging.getLogger(__name__)

_USAGE = {
    "prepend": "Prepend to the token embeddings of the tokenised input (BOS included) of the same base model: "
    "inputs_embeds = cat([prompt_embeds, embed_tokens(input_ids)]); vLLM: {'prompt_embeds': inputs_embeds}. "
    "peft_softprompt_ext.export.inputs_embeds_for does exactly this.",
    "slots": "Tokenise the request with the slot tokens added (slot_tokens; each slot written as its token repeated "
    "once per virtual token), embed it, and put the rows of prompt_embeds at the placeholder positions in order "
    "(slot after slot): peft_softprompt_ext.export.inputs_embeds_for; vLLM: {'prompt_embeds': inputs_embeds}.",
}
_SHARED_CONFIG_KEYS = (
    "task_type",
    "base_model_name_or_path",
    "revision",
    "num_attention_heads",
    "num_layers",
    "modules_to_save",
    "tokenizer_name_or_path",
    "tokenizer_kwargs",
)


def _mode(overwrite: bool) -> str:
    return "replace" if overwrite else "create"


def _adapter_dir_of(model: nn.Module, adapter_name: str | None, tmp: str) -> str:
    """Save one adapter of a live model with its own writer (prompt, plus any head in modules_to_save)."""
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise ValueError(f"No adapter {name!r}; this model has {sorted(model.peft_config)}.")
    model.save_pretrained(tmp, selected_adapters=[name])
    return tmp if name == "default" else os.path.join(tmp, name)


@contextlib.contextmanager
def _source_dir(source: nn.Module | str | os.PathLike, adapter_name: str | None) -> Iterator[str]:
    if isinstance(source, nn.Module):
        with tempfile.TemporaryDirectory(prefix="softprompt-export-") as tmp:
            yield _adapter_dir_of(source, adapter_name, os.path.join(tmp, "adapter"))
    else:
        yield os.fspath(source)


def _write_weights(state: dict[str, torch.Tensor], directory: str) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in EXPORT_DTYPES:
        raise ValueError(
            f"dtype must be one of {', '.join(EXPORT_DTYPES)} (a prompt is floating point), got {dtype!r}."
        )
    return getattr(torch, name)


# --------------------------------------------------------------------------- to / from vanilla PEFT


def export_peft_prompt_tuning(
    source: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write a vanilla PEFT PROMPT_TUNING adapter dir from a SoftPromptModel or one of our adapter dirs.

    The effective prompt is exported (a residual prompt is folded). ``num_transformer_submodules=1``, so for
    seq2seq models the prompt goes before the encoder input only, as ours does. Returns the output path.
    """
    with _source_dir(source, adapter_name) as src:
        saved = adapter_dir.read(src)
    if saved.config.get("slots"):
        raise ValueError(
            "This adapter puts its virtual tokens in slots inside the input; PEFT's PROMPT_TUNING can only put them "
            "before it. Export the embeddings instead (export_prompt_embeds / --to embeds)."
        )
    prompt = saved.prompt
    # tokenizer_kwargs: PEFT accepts them only with TEXT init, which an exported (trained) prompt doesn't need
    shared = {k: saved.config.get(k) for k in _SHARED_CONFIG_KEYS if k != "tokenizer_kwargs"}
    if base_model_name_or_path is not None:
        shared["base_model_name_or_path"] = base_model_name_or_path
    peft_config = PromptTuningConfig(
        **shared,
        num_virtual_tokens=prompt.shape[0],
        token_dim=prompt.shape[1],
        num_transformer_submodules=1,
        prompt_tuning_init="RANDOM",
        inference_mode=True,
    )
    others = {k: v for k, v in saved.tensors.items() if k != PROMPT_KEY and not k.startswith(RESIDUAL_PREFIX)}
    with adapter_dir.writing(out_dir, _mode(overwrite)) as tmp:
        peft_config.save_pretrained(tmp)
        _write_weights({PROMPT_KEY: prompt, **others}, tmp)
    logger.info("Exported a %d-token prompt as a PEFT PROMPT_TUNING adapter to %s", prompt.shape[0], out_dir)
    return os.path.abspath(os.fspath(out_dir))


def _init_fields(peft_cfg: dict[str, Any]) -> dict[str, Any]:
    """Our init fields recording how the PEFT prompt started (provenance only: loading never re-initialises)."""
    init = str(peft_cfg.get("prompt_tuning_init") or "RANDOM").upper()
    tokenizer_named = peft_cfg.get("tokenizer_name_or_path")
    if init == "TEXT" and peft_cfg.get("prompt_tuning_init_text") and tokenizer_named:
        return {"init": "text", "init_text": peft_cfg["prompt_tuning_init_text"]}
    return {"init": "random" if init == "RANDOM" else "vocab"}


def import_peft_prompt_tuning(
    peft_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> str:
    """Convert a PEFT PROMPT_TUNING adapter dir into a SOFT_PROMPT one (`PeftModel.from_pretrained` then builds
    ours). A seq2seq adapter with a decoder prompt (PEFT's default ``num_transformer_submodules=2``) can't be
    represented (ours prompts the encoder only) and is refused rather than silently changed."""
    saved = adapter_dir.read(peft_dir, (PEFT_PROMPT_TUNING_TYPE,))
    peft_cfg, prompt = saved.config, saved.prompt
    submodules = int(peft_cfg.get("num_transformer_submodules") or 1)
    if submodules != 1:
        raise ValueError(
            f"{os.fspath(peft_dir)!r} has num_transformer_submodules={submodules} (a decoder prompt as well); soft "
            "prompts only prompt the encoder input, so importing it would change the model's outputs."
        )
    tokenizer_kwargs = peft_cfg.get("tokenizer_kwargs")
    shared = {k: peft_cfg.get(k) for k in _SHARED_CONFIG_KEYS if k != "tokenizer_kwargs"}
    init = _init_fields(peft_cfg)
    if tokenizer_kwargs and init["init"] == "text":
        shared["tokenizer_kwargs"] = tokenizer_kwargs
    config = SoftPromptConfig(
        **shared,
        num_virtual_tokens=prompt.shape[0],
        token_dim=prompt.shape[1],
        num_transformer_submodules=1,
        inference_mode=True,
        **init,
    )
    others = {k: v for k, v in saved.tensors.items() if k != PROMPT_KEY}
    with adapter_dir.writing(out_dir, _mode(overwrite)) as tmp:
        config.save_pretrained(tmp)
        _write_weights({PROMPT_KEY: prompt, **others}, tmp)
    logger.info("Imported a %d-token PEFT prompt into %s", prompt.shape[0], out_dir)
    return os.path.abspath(os.fspath(out_dir))


def load_peft_prompt_tuning(
    model: nn.Module, peft_dir: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> Any:
    """A SoftPromptModel around `model` (a transformers model) holding the prompt of a PEFT PROMPT_TUNING dir."""
    with tempfile.TemporaryDirectory(prefix="softprompt-import-") as tmp:
        converted = import_peft_prompt_tuning(peft_dir, os.path.join(tmp, "adapter"))
        return PeftModel.from_pretrained(model, converted, adapter_name=adapter_name, is_trainable=is_trainable)


# --------------------------------------------------------------------------- raw prompt embeddings


def export_prompt_embeds(
    source: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> str:
    """Write ``prompt_embeds.safetensors`` (one ``[num_virtual_tokens, hidden]`` tensor, key ``prompt_embeds``)
    and ``prompt_embeds.json`` (shape, dtype, base model, how to use it) to `out_dir`.

    Use: ``inputs_embeds = cat([prompt_embeds, embed(tokenizer(text).input_ids)])`` with the same base model
    (the prompt goes before everything, BOS included), e.g. ``vllm.LLM.generate({"prompt_embeds": inputs_embeds})``.
    `dtype` (one of float32, float16, bfloat16, float64) casts to the server's dtype; default keeps the saved one.
    """
    target_dtype = _dtype(dtype)
    with _source_dir(source, adapter_name) as src:
        saved = adapter_dir.read(src, (PEFT_TYPE_NAME, PEFT_PROMPT_TUNING_TYPE))
    prompt = saved.prompt
    if target_dtype is not None:
        adapter_dir.check_representable(prompt, target_dtype, f"export to {target_dtype}")
        prompt = prompt.to(target_dtype)
    config = saved.config
    metadata = {
        "format": EMBEDS_FORMAT,
        "format_version": 1,
        "tensor_file": EMBEDS_WEIGHTS_NAME,
        "tensor_key": EMBEDS_KEY,
        "shape": list(prompt.shape),
        "num_virtual_tokens": prompt.shape[0],
        "hidden_size": prompt.shape[1],
        "dtype": str(prompt.dtype).removeprefix("torch."),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "revision": config.get("revision"),
        "task_type": config.get("task_type"),
        "tokenizer_name_or_path": config.get("tokenizer_name_or_path"),
        "adapter_name": adapter_name,
        "placement": "slots" if config.get("slots") else "prepend",
        "slots": config.get("slots"),
        "slot_tokens": config.get("slot_tokens"),
        "slot_token_ids": config.get("slot_token_ids"),
        "usage": _USAGE["slots" if config.get("slots") else "prepend"],
    }
    with adapter_dir.writing(out_dir, _mode(overwrite)) as tmp:
        save_file({EMBEDS_KEY: prompt.contiguous()}, os.path.join(tmp, EMBEDS_WEIGHTS_NAME), metadata={"format": "pt"})
        adapter_dir.write_json(tmp, EMBEDS_METADATA_NAME, metadata)
    logger.info("Exported prompt embeddings %s to %s", tuple(prompt.shape), out_dir)
    return os.path.abspath(os.fspath(out_dir))


def load_prompt_embeds(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """(tensor, metadata) from a directory written by `export_prompt_embeds`."""
    return adapter_dir.read_embeds(path)


def inputs_embeds_for(
    prompt: torch.Tensor, metadata: dict[str, Any], input_ids: list[int] | torch.Tensor, embed_tokens: nn.Module
) -> torch.Tensor:
    """The [length, hidden] inputs_embeds a server that takes prompt embeddings (vLLM ``prompt_embeds``) needs for
    one tokenised request, from an export: the prompt before the token embeddings, or spliced in at the slot
    placeholders (each placeholder position takes the next virtual token of its slot; placeholders are never
    embedded). `embed_tokens` is the base model's input embedding module."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    if metadata.get("placement") != "slots":
        return torch.cat([prompt.to(embed_tokens.weight.dtype), embed_tokens(ids.to(embed_tokens.weight.device))])
    placeholders = torch.tensor(metadata["slot_token_ids"], dtype=torch.long)
    embeds = embed_tokens(ids.masked_fill(torch.isin(ids, placeholders), 0).to(embed_tokens.weight.device))
    offset = 0
    for token_id, size in zip(metadata["slot_token_ids"], metadata["slots"], strict=True):
        cols = (ids == token_id).nonzero()[:, 0]
        if len(cols) != size:
            raise ValueError(f"The request has {len(cols)} placeholders of slot id {token_id}; the slot holds {size}.")
        embeds = embeds.index_put((cols.to(embeds.device),), prompt[offset : offset + size].to(embeds))
        offset += size
    return embeds
