"""``softprompt info``: describe a saved soft-prompt adapter (no model is loaded)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .. import adapter_dir
from ..constants import TRAINING_INFO_NAME
from .common import CliError

SHOWN = (
    "path",
    "peft_type",
    "task_type",
    "num_virtual_tokens",
    "token_dim",
    "dtype",
    "parameters",
    "base_model",
    "init",
    "init_text",
    "reparameterization",
)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("info", help="Describe a saved soft-prompt adapter.")
    p.add_argument("adapter_dir", help="A saved adapter directory.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    p.set_defaults(func=run)


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


def adapter_info(folder: str) -> dict[str, Any]:
    """What `softprompt info` prints: the config, the tensors' shapes, file sizes and the training record."""
    if not os.path.isdir(folder):
        raise CliError(f"adapter directory not found: {folder}")
    saved = adapter_dir.read(folder, adapter_dir.PROMPT_TYPES)
    config, prompt = saved.config, saved.prompt
    files = {
        name: os.path.getsize(os.path.join(folder, name))
        for name in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, name)) and not name.startswith(".")
    }
    info_path = os.path.join(folder, TRAINING_INFO_NAME)
    training = adapter_dir.read_json_file(info_path) if os.path.isfile(info_path) else {}
    return {
        "path": os.path.abspath(folder),
        "peft_type": config.get("peft_type"),
        "task_type": config.get("task_type"),
        "num_virtual_tokens": int(prompt.shape[0]),
        "token_dim": int(prompt.shape[1]),
        "dtype": str(prompt.dtype).removeprefix("torch."),
        "parameters": sum(t.numel() for t in saved.tensors.values()),
        "base_model": config.get("base_model_name_or_path"),
        "init": config.get("init", config.get("prompt_tuning_init")),
        "init_text": config.get("init_text", config.get("prompt_tuning_init_text")),
        "reparameterization": config.get("reparameterization"),
        "files": files,
        "saved_with": training.get("versions") or {"peft": config.get("peft_version")},
        "training": {
            k: training[k]
            for k in ("task", "instruction", "settings", "before", "after", "train_seconds")
            if k in training
        },
    }


def run(args: argparse.Namespace) -> int:
    info = adapter_info(args.adapter_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in SHOWN:
        if info[key] is not None:
            print(f"{key + ':':<20}{info[key]}")
    print("files:              " + ", ".join(f"{n} ({_size(s)})" for n, s in info["files"].items()))
    print("saved with:         " + ", ".join(f"{k} {v}" for k, v in info["saved_with"].items() if v))
    training = info["training"]
    if "before" in training and "after" in training:
        b, a = training["before"], training["after"]
        print(f"trained on:         {training.get('task')} ({training['settings'].get('steps')} steps)")
        print(f"{b['metric']}: before {100 * b['accuracy']:.1f} %, after {100 * a['accuracy']:.1f} % (n={a['n']})")
    return 0
