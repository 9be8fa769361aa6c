"""Move soft prompts in and out of this package: vanilla PEFT prompt tuning and raw prompt embeddings.

- `export_peft_prompt_tuning`: an adapter dir that plain ``peft`` loads as PROMPT_TUNING without this package
  installed. The forward is the same on unpadded input; PEFT's own prompt tuning then returns P extra leading
  logit positions and, with left padding, puts the prompt before the pads (see the design brief).
- `import_peft_prompt_tuning` / `load_peft_prompt_tuning`: a PEFT PROMPT_TUNING dir into one of ours.
- `export_prompt_embeds`: the ``[num_virtual_tokens, hidden]`` tensor as safetensors plus a small JSON, for servers
  that take prompt embeddings (vLLM ``prompt_embeds``): prepend it to the embedded, tokenised input.

Every writer builds its output in a temporary sibling directory and moves it into place with `os.replace`, so a
reader never sees half an adapter; a non-empty target is only replaced with ``overwrite=True``. Only safetensors
are read (never pickles), and configs are read as JSON (never code).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_dir
from .prompt import ADAPTER_WEIGHTS_NAME, PROMPT_KEY, RAW_PREFIX

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
EMBEDS_WEIGHTS_NAME = "prompt_embeds.safetensors"
EMBEDS_METADATA_NAME = "prompt_embeds.json"
EMBEDS_KEY = "prompt_embeds"
SOFT_PROMPT_TYPE = "SOFT_PROMPT"
PEFT_PROMPT_TUNING_TYPE = "PROMPT_TUNING"
_SHARED_CONFIG_KEYS = ("task_type", "base_model_name_or_path", "revision", "num_attention_heads", "num_layers",
                       "modules_to_save", "tokenizer_name_or_path", "tokenizer_kwargs")  # fmt: skip


# --------------------------------------------------------------------------- reading adapter dirs


def _read_config(adapter_dir: str) -> dict[str, Any]:
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {CONFIG_NAME} in {adapter_dir!r}: not an adapter directory.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_weights(adapter_dir: str) -> dict[str, torch.Tensor]:
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {ADAPTER_WEIGHTS_NAME} in {adapter_dir!r}; only safetensors are read, never pickle (.bin) files."
        )
    state = load_file(path)
    if PROMPT_KEY not in state:
        raise ValueError(f"{path} has no '{PROMPT_KEY}' tensor; keys: {sorted(state)}.")
    return state


def read_adapter(
    adapter_dir: str | os.PathLike, peft_type: str | tuple[str, ...] = SOFT_PROMPT_TYPE
) -> tuple[dict, dict]:
    """(config dict, tensors) of an adapter dir, checking its peft_type (one name or a tuple of them)."""
    adapter_dir = os.fspath(adapter_dir)
    config = _read_config(adapter_dir)
    allowed = (peft_type,) if isinstance(peft_type, str) else peft_type
    if config.get("peft_type") not in allowed:
        raise ValueError(
            f"{adapter_dir!r} holds a {config.get('peft_type')!r} adapter; expected {' or '.join(allowed)}."
        )
    return config, _read_weights(adapter_dir)


def _adapter_dir_of(model: nn.Module, adapter_name: str | None, tmp: str) -> str:
    """Save one adapter of a live model with PEFT's own writer (prompt, plus any head in modules_to_save)."""
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise ValueError(f"No adapter {name!r}; this model has {sorted(model.peft_config)}.")
    model.save_pretrained(tmp, selected_adapters=[name])
    return tmp if name == "default" else os.path.join(tmp, name)


@contextlib.contextmanager
def _source_dir(source: nn.Module | str | os.PathLike, adapter_name: str | None) -> Iterator[str]:
    if isinstance(source, nn.Module):
        with tempfile.TemporaryDirectory(prefix="softprompt-export-") as tmp:
            yield _adapter_dir_of(source, adapter_name, tmp)
    else:
        yield os.fspath(source)


def _write_weights(state: dict[str, torch.Tensor], directory: str) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(state, os.path.join(directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})


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
    from peft import PromptTuningConfig

    with _source_dir(source, adapter_name) as src:
        config, state = read_adapter(src)
    prompt = state[PROMPT_KEY]
    # tokenizer_kwargs: PEFT accepts them only with TEXT init, which an exported (trained) prompt doesn't need
    shared = {k: config.get(k) for k in _SHARED_CONFIG_KEYS if k != "tokenizer_kwargs"}
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
    others = {k: v for k, v in state.items() if k != PROMPT_KEY and not k.startswith(RAW_PREFIX)}
    with atomic_dir(out_dir, "replace" if overwrite else "error") as tmp:
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
    peft_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> str:
    """Convert a PEFT PROMPT_TUNING adapter dir into a SOFT_PROMPT one (`PeftModel.from_pretrained` then builds
    ours). A seq2seq adapter with a decoder prompt (PEFT's default ``num_transformer_submodules=2``) can't be
    represented (ours prompts the encoder only) and is refused rather than silently changed."""
    from .config import SoftPromptConfig

    peft_cfg, state = read_adapter(peft_dir, PEFT_PROMPT_TUNING_TYPE)
    prompt = state[PROMPT_KEY]
    num_virtual = int(peft_cfg["num_virtual_tokens"])
    submodules = int(peft_cfg.get("num_transformer_submodules") or 1)
    if submodules != 1:
        raise ValueError(
            f"{os.fspath(peft_dir)!r} has num_transformer_submodules={submodules} (a decoder prompt as well); soft "
            "prompts only prompt the encoder input, so importing it would change the model's outputs."
        )
    if tuple(prompt.shape) != (num_virtual, int(peft_cfg.get("token_dim") or prompt.shape[1])):
        raise ValueError(
            f"Saved prompt has shape {tuple(prompt.shape)} but the config says num_virtual_tokens={num_virtual}, "
            f"token_dim={peft_cfg.get('token_dim')}."
        )
    shared = {k: peft_cfg.get(k) for k in _SHARED_CONFIG_KEYS}
    config = SoftPromptConfig(
        **shared,
        num_virtual_tokens=num_virtual,
        token_dim=prompt.shape[1],
        num_transformer_submodules=1,
        inference_mode=True,
        **_init_fields(peft_cfg),
    )
    others = {k: v for k, v in state.items() if k != PROMPT_KEY}
    with atomic_dir(out_dir, "replace" if overwrite else "error") as tmp:
        config.save_pretrained(tmp)
        _write_weights({PROMPT_KEY: prompt, **others}, tmp)
    logger.info("Imported a %d-token PEFT prompt into %s", num_virtual, out_dir)
    return os.path.abspath(os.fspath(out_dir))


def load_peft_prompt_tuning(
    model: nn.Module,
    peft_dir: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> Any:
    """A SoftPromptModel around `model` (a transformers model) holding the prompt of a PEFT PROMPT_TUNING dir."""
    from peft import PeftModel

    from . import registry

    registry.register()
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
    `dtype` (e.g. ``"bfloat16"``) casts to the server's dtype; default keeps the saved one.
    """
    with _source_dir(source, adapter_name) as src:
        config, state = read_adapter(src)
    prompt = state[PROMPT_KEY]
    if dtype is not None:
        prompt = prompt.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    metadata = {
        "format": "peft_softprompt_ext.prompt_embeds",
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
        "usage": "Prepend to the token embeddings of the tokenised input (BOS included) of the same base model: "
        "inputs_embeds = cat([prompt_embeds, embed_tokens(input_ids)]); vLLM: {'prompt_embeds': inputs_embeds}.",
    }
    with atomic_dir(out_dir, "replace" if overwrite else "error") as tmp:
        save_file({EMBEDS_KEY: prompt.contiguous()}, os.path.join(tmp, EMBEDS_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, EMBEDS_METADATA_NAME), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2)
    logger.info("Exported prompt embeddings %s to %s", tuple(prompt.shape), out_dir)
    return os.path.abspath(os.fspath(out_dir))


def load_prompt_embeds(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """(tensor, metadata) from a directory written by `export_prompt_embeds`."""
    path = os.fspath(path)
    with open(os.path.join(path, EMBEDS_METADATA_NAME), encoding="utf-8") as f:
        metadata = json.load(f)
    tensor = load_file(os.path.join(path, metadata.get("tensor_file", EMBEDS_WEIGHTS_NAME)))[EMBEDS_KEY]
    return tensor, metadata
