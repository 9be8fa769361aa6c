"""The adapter directory on disk: its files, the tensors in them, and the only code that reads or writes them.

What this module promises (and `tests/test_reliability.py` checks):

* writes are atomic (`atomic.transaction`): a crash or ``kill -9`` at any moment leaves the previous adapter or the
  new one, concurrent writers are serialised by a lock, a reader never sees a missing or half-written adapter;
* only JSON and safetensors are read, never a pickle: not from a local folder, a hub id, the hub cache or a
  subfolder; a safetensors file that is not what a soft prompt holds (unknown tensors, integer or non-finite values,
  the wrong shape) is refused with the tensor's name;
* a directory is replaced wholesale (``--overwrite``) only when it is an adapter directory, never an empty path, the
  working directory or one of its parents, the home directory or ``/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import atomic
from .constants import (
    ADAPTER_FILES,
    CONFIG_NAME,
    EMBEDS_KEY,
    EMBEDS_METADATA_NAME,
    EMBEDS_WEIGHTS_NAME,
    PEFT_PROMPT_TUNING_TYPE,
    PEFT_TYPE_NAME,
    PICKLE_WEIGHTS_NAME,
    PROMPT_KEY,
    RESIDUAL_PREFIX,
    WEIGHTS_NAME,
)

logger = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few hundred bytes; anything this large is not one
PROMPT_TYPES = (PEFT_TYPE_NAME, PEFT_PROMPT_TUNING_TYPE)  # adapters whose prompt `info`/`decode`/`export` can read


class AdapterFormatError(ValueError):
    """An adapter directory whose files are not what a soft prompt adapter holds."""


@dataclass(frozen=True)
class Adapter:
    """An adapter read from disk: where from, its config (a JSON object) and its validated tensors."""

    path: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def prompt(self) -> torch.Tensor:
        return self.tensors[PROMPT_KEY]


# --------------------------------------------------------------------------- where an adapter is


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), CONFIG_NAME))


def is_written_by_us(path: str | os.PathLike) -> bool:
    """An adapter directory or a prompt-embeddings export: the directories `--overwrite` may replace."""
    return any(os.path.isfile(os.path.join(os.fspath(path), name)) for name in (CONFIG_NAME, EMBEDS_METADATA_NAME))


def _no_safetensors_error(where: str, pickle_present: bool) -> FileNotFoundError:
    found = f" (there is an {PICKLE_WEIGHTS_NAME}, a pickle, which is never loaded)" if pickle_present else ""
    return FileNotFoundError(
        f"No {WEIGHTS_NAME} in {where}{found}: soft prompts load only from safetensors. Re-save the adapter with "
        "save_pretrained (it writes safetensors)."
    )


def resolve(
    model_id: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> str:
    """The local directory holding an adapter's config and safetensors weights.

    A hub id downloads (or finds in the cache) exactly those two files, so PEFT's fallback to ``adapter_model.bin``
    (a pickle) can never run; a local folder without safetensors is refused the same way."""
    model_id = os.fspath(model_id)
    local = os.path.join(model_id, subfolder or "")
    if os.path.isdir(local):
        with atomic.reading(local):  # a write killed halfway is finished before we look
            if not os.path.lexists(os.path.join(local, WEIGHTS_NAME)):
                raise _no_safetensors_error(repr(local), os.path.isfile(os.path.join(local, PICKLE_WEIGHTS_NAME)))
        return local
    where = f"{model_id!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    kwargs = {"subfolder": subfolder or None, "revision": revision, "cache_dir": cache_dir, "token": token}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    try:
        hf_hub_download(model_id, CONFIG_NAME, **kwargs)
        weights = hf_hub_download(model_id, WEIGHTS_NAME, **kwargs)
    except EntryNotFoundError:
        raise _no_safetensors_error(f"the hub repository {where}", pickle_present=False) from None
    except (LocalEntryNotFoundError, RepositoryNotFoundError, OSError, ValueError) as err:
        raise FileNotFoundError(
            f"Adapter {where} is neither a local directory nor available from the hub or its cache ({err})."
        ) from None
    return os.path.dirname(weights)


# --------------------------------------------------------------------------- reading


def _regular_file(path: str, what: str) -> str:
    """Follow symlinks (the hub cache is made of them) but read only regular files: never a device or a fifo."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"No {what} at {path}.") from None
    if not stat.S_ISREG(mode):
        raise AdapterFormatError(f"{path} is not a regular file; refusing to read it as the {what}.")
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The adapter's config as a JSON object with a string ``peft_type`` (clear errors for anything else)."""
    file = os.path.join(os.fspath(path), CONFIG_NAME)
    if not os.path.exists(file):
        raise FileNotFoundError(f"No {CONFIG_NAME} in {os.fspath(path)!r}: not an adapter directory.")
    config = read_json_file(file)
    if not isinstance(config.get("peft_type"), str):
        raise AdapterFormatError(f"{file} has no 'peft_type' string; it is not a PEFT adapter config.")
    return config


def check_peft_type(config: Mapping[str, Any], path: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if config.get("peft_type") not in allowed:
        raise AdapterFormatError(
            f"{path} holds a {config.get('peft_type')!r} adapter; expected {' or '.join(allowed)}."
        )


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    folder = os.fspath(path)
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.exists(weights):
        raise _no_safetensors_error(repr(folder), os.path.isfile(os.path.join(folder, PICKLE_WEIGHTS_NAME)))
    _regular_file(weights, WEIGHTS_NAME)
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"{weights} is not a readable safetensors file ({err}).") from None


def _allowed(key: str, config: Mapping[str, Any]) -> bool:
    if key == PROMPT_KEY:
        return True
    if key.startswith(RESIDUAL_PREFIX):
        return config.get("reparameterization") == "residual"
    # PEFT wraps every module whose name ends with a modules_to_save entry; its parameters (and its children's) follow
    parts = key.split(".")[:-1]
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p.endswith(name) for p in prefixes for name in config.get("modules_to_save") or ())


def validate_tensors(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], source: str) -> None:
    """Refuse what a soft prompt adapter never holds, naming the tensor: a missing prompt, unknown tensors (a
    ``lm_head.weight`` would be silently ignored otherwise), residual tensors without a residual config, integer or
    bool values, NaN/Inf, a prompt whose shape disagrees with the config."""
    if PROMPT_KEY not in tensors:
        raise AdapterFormatError(f"{source} has no '{PROMPT_KEY}' tensor; it holds {sorted(tensors)}.")
    unknown = sorted(k for k in tensors if not _allowed(k, config))
    if unknown:
        why = {
            True: "residual tensors need reparameterization='residual' in the config",
            False: f"a soft prompt adapter holds '{PROMPT_KEY}', residual.* and its modules_to_save only",
        }[all(k.startswith(RESIDUAL_PREFIX) for k in unknown)]
        raise AdapterFormatError(f"{source} holds unexpected tensors {unknown}: {why}.")
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterFormatError(f"{source}: tensor '{key}' has dtype {tensor.dtype}; expected a floating type.")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise AdapterFormatError(f"{source}: tensor '{key}' has {bad} NaN/Inf values of {tensor.numel()}.")
    prompt = tensors[PROMPT_KEY]
    rows = config.get("num_virtual_tokens")
    if isinstance(rows, int) and config.get("peft_type") == PEFT_PROMPT_TUNING_TYPE:  # PEFT stacks a decoder prompt
        rows *= int(config.get("num_transformer_submodules") or 1)
    expected = (rows, config.get("token_dim") or (prompt.shape[-1] if prompt.dim() else None))
    if prompt.dim() != 2 or tuple(prompt.shape) != expected:
        raise AdapterFormatError(
            f"{source}: '{PROMPT_KEY}' has shape {tuple(prompt.shape)} but the config says "
            f"(num_virtual_tokens, token_dim) = {expected}."
        )


def check_representable(prompt: torch.Tensor, dtype: torch.dtype, source: str) -> None:
    """A prompt cast to a narrower float type must not overflow (fp16 tops out at 65504: inf logits follow)."""
    if not dtype.is_floating_point:
        raise ValueError(f"{source}: can't store a prompt as {dtype}; use a floating type.")
    limit = torch.finfo(dtype).max
    peak = float(prompt.detach().abs().max()) if prompt.numel() else 0.0
    if not math.isfinite(peak) or peak > limit:
        raise ValueError(
            f"{source}: the prompt's largest magnitude {peak:.4g} exceeds what {dtype} can hold ({limit:.4g}); "
            "use float32 or bfloat16."
        )


def read(path: str | os.PathLike, peft_types: Iterable[str] = (PEFT_TYPE_NAME,)) -> Adapter:
    """Config and validated tensors of an adapter directory, read consistently (lock held, interrupted writes
    finished first)."""
    with atomic.reading(path) as folder:
        config = read_config(folder)
        check_peft_type(config, folder, peft_types)
        tensors = read_weights(folder)
    validate_tensors(tensors, config, os.path.join(folder, WEIGHTS_NAME))
    return Adapter(path=folder, config=config, tensors=tensors)


def read_json_file(file: str) -> dict[str, Any]:
    _regular_file(file, os.path.basename(file))
    if os.path.getsize(file) > MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"{file} is larger than {MAX_CONFIG_BYTES} bytes.")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as err:
        raise AdapterFormatError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    except json.JSONDecodeError as err:
        raise AdapterFormatError(
            f"{file} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})."
        ) from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{file} holds a JSON {type(data).__name__}, expected an object.")
    return data


def read_embeds(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """(prompt embeddings, metadata) of a directory written by `export.export_prompt_embeds`, validated."""
    with atomic.reading(path) as folder:
        metadata = read_json_file(os.path.join(folder, EMBEDS_METADATA_NAME))
        file = _regular_file(os.path.join(folder, EMBEDS_WEIGHTS_NAME), EMBEDS_WEIGHTS_NAME)
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterFormatError(f"{file} is not a readable safetensors file ({err}).") from None
    if set(tensors) != {EMBEDS_KEY}:
        raise AdapterFormatError(f"{file} must hold exactly one tensor '{EMBEDS_KEY}', it holds {sorted(tensors)}.")
    prompt = tensors[EMBEDS_KEY]
    if not prompt.is_floating_point() or prompt.dim() != 2 or not bool(torch.isfinite(prompt).all()):
        raise AdapterFormatError(f"{file}: '{EMBEDS_KEY}' must be a finite floating [P, hidden] tensor.")
    return prompt, metadata


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[str]:
    """For readers that are not ours (PEFT's `from_pretrained` reading our files): lock held, recovery done."""
    with atomic.reading(path) as folder:
        yield folder


# --------------------------------------------------------------------------- writing


def _dangerous(path: str) -> str | None:
    """Why replacing `path` wholesale would destroy something that is not an adapter, or None."""
    cwd = atomic.normalize(os.getcwd())
    home = atomic.normalize(os.path.expanduser("~"))
    if path == os.path.dirname(path):
        return "it is the filesystem root"
    if path == home:
        return "it is the home directory"
    if path == cwd:
        return "it is the working directory"
    if cwd.startswith(path + os.sep):
        return "it contains the working directory"
    if os.path.isdir(path) and os.listdir(path) and not is_written_by_us(path):
        return f"it is a non-empty directory without {CONFIG_NAME} (not an adapter directory this package wrote)"
    return None


def check_replaceable(path: str | os.PathLike, option: str = "the output directory") -> str:
    """The normalised path if it may be replaced wholesale; a one-line ValueError naming `option` otherwise."""
    raw = os.fspath(path)
    if not raw.strip():
        raise ValueError(
            f"{option} is an empty path; refusing to replace it (an empty $OUT names the working directory)."
        )
    target = atomic.normalize(os.path.expanduser(raw))
    reason = _dangerous(target)
    if reason:
        raise ValueError(f"Refusing to replace {option} {raw!r}: {reason}, whatever --overwrite says.")
    return target


def check_writable(path: str | os.PathLike, option: str = "the output directory") -> None:
    """Fail before any work when `path` could not be written: under a file, or in a directory we may not write."""
    target = atomic.normalize(os.path.expanduser(os.fspath(path)))
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ValueError(f"{option} {os.fspath(path)!r} exists and is not a directory.")
    probe = target
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{option} {os.fspath(path)!r} lies under {probe!r}, which is a file.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {os.fspath(path)!r} can't be written: no write permission on {probe!r}.")


def refuse_pickle(safe_serialization: bool) -> None:
    """`save_pretrained(safe_serialization=False)` would write a pickle that no loader here ever reads."""
    if not safe_serialization:
        raise ValueError(
            f"safe_serialization=False would write {PICKLE_WEIGHTS_NAME}, a pickle; soft prompts are saved and "
            f"loaded as safetensors only ({WEIGHTS_NAME}). Drop the argument."
        )


def _ours_to_remove(entry: str) -> bool:
    """What ``--overwrite`` may delete from an adapter directory: the files this package writes, nothing else."""
    return entry in ADAPTER_FILES


@contextlib.contextmanager
def writing(path: str | os.PathLike, mode: atomic.WriteMode = "overlay") -> Iterator[str]:
    """A staging directory whose files become the adapter directory's atomically (see `atomic.transaction`).
    ``"replace"`` is allowed on directories this package wrote only (`check_replaceable`), and removes only the
    files it writes (a user's notes beside the adapter stay)."""
    if mode == "replace":
        check_replaceable(path)
    with atomic.transaction(path, mode, removable=_ours_to_remove) as staging:
        yield staging


def write_json(directory: str, name: str, data: Mapping[str, Any]) -> None:
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
