"""What the CLI's commands share: the one error type, devices, loading a base model safely, option types."""

from __future__ import annotations

import argparse
import os
import platform
import socket
from typing import Any
from urllib.parse import urlparse

import accelerate
import peft
import torch
import transformers
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..constants import VERSION
from .bundled import bundled_folder, name_as_hub_id, smollm2_path

HUB_PROBE_TIMEOUT_S = 3.0


class CliError(Exception):
    """A user-facing error: printed as one line, never with a traceback."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise CliError(f"--device: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (or anything that exists) is a local path."""
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name


def _hub_reachable() -> bool:
    url = urlparse(hub_constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def resolve_model(name: str | None) -> tuple[str, dict[str, Any]]:
    """(what to pass to from_pretrained, extra kwargs): the bundled SmolLM2 for None or its hub id, a local folder,
    a cached hub id (loaded without the network) or, only if the hub answers, a hub id to download. An id that is
    neither cached nor reachable fails in seconds, naming it."""
    if name is None:
        return smollm2_path(), {"local_files_only": True}
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded, {"local_files_only": True}
    if looks_like_path(name):
        raise CliError(f"model path not found: {name}")
    bundled = bundled_folder(name)
    if bundled is not None:
        return bundled, {"local_files_only": True}
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name, {"local_files_only": True}
    if hub_constants.HF_HUB_OFFLINE:
        raise CliError(f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    if not _hub_reachable():
        raise CliError(
            f"model {name!r} is not in the local Hugging Face cache and the hub ({hub_constants.ENDPOINT}) "
            "is unreachable"
        )
    return name, {}


def load_model(name: str | None, device: torch.device) -> tuple[Any, Any, str]:
    """(causal LM in eval mode, tokenizer with a pad token, the name adapters should record). Safetensors only,
    never code from the model folder (`trust_remote_code=False`), one-line errors."""
    path, extra = resolve_model(name)
    dtype = torch.float32 if device.type == "cpu" else "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=False, use_safetensors=True, **extra
        )
    except (OSError, ValueError) as err:
        raise load_error(name or path, err) from err
    if name is None or bundled_folder(name) is not None:
        name_as_hub_id(model, tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer, model.name_or_path or path


def load_error(name: str, err: BaseException) -> CliError:
    """One line for a failed load; a folder that needs its own code says so (never offered: we don't run it)."""
    if "trust_remote_code" in str(err):
        return CliError(
            f"{name!r} needs custom code from its folder (auto_map) to load; peft-softprompt-ext never runs code "
            "named by a model folder or a saved config (trust_remote_code=False)"
        )
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CliError(f"could not load model {name!r}: {first}")


def versions() -> dict[str, str]:
    """Library versions recorded next to a saved adapter, so `softprompt info` can tell what made it."""
    return {
        "peft_softprompt_ext": VERSION,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }
