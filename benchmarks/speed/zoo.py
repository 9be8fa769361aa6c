"""The models under test: LoRA on its own copy of the base, every prompt method wrapping the base itself."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.common import models

from .config import PROMPT_METHODS, Settings


@dataclass
class Zoo:
    """The models under test. Prompt wrappers (`prompt`, `mixed`, `slot`) wrap `base` itself (no copy)."""

    base: nn.Module
    tokenizer: Any
    lora: nn.Module | None
    lora_targets: list[str]
    prompt: dict[tuple[str, int], nn.Module]
    mixed: dict[int, nn.Module]
    slot: nn.Module | None
    slot_recomputed: nn.Module | None  # the same prompt; its own compiled cache, dropped before each of its runs
    optimizers: dict[tuple[str, int | None], torch.optim.Optimizer]

    def model(self, method: str, p: int | None) -> nn.Module:
        if method == "bare":
            return self.base
        if method == "lora":
            return self.lora
        return self.prompt[(method, p)]

    def wrappers(self) -> list[nn.Module]:
        return [
            m
            for m in (self.lora, *self.prompt.values(), *self.mixed.values(), self.slot, self.slot_recomputed)
            if m is not None
        ]

    def configure(self, method: str, checkpointing: bool = False) -> None:
        """Put the shared base (and LoRA's copy) in the state `method`'s next run needs: gradient checkpointing on
        or off."""
        for net, on in (
            (self.base, checkpointing and method != "lora"),
            (self.lora, checkpointing and method == "lora"),
        ):
            if net is not None:
                set_checkpointing(net, on)


def set_checkpointing(net: nn.Module, on: bool) -> None:
    """Gradient checkpointing of the transformers model inside `net` (non-reentrant, transformers' default)."""
    inner = net.get_base_model() if hasattr(net, "get_base_model") else net
    new_name = hasattr(type(inner), "is_activation_checkpointing")  # the old names warn in transformers 5.2x
    if (inner.is_activation_checkpointing if new_name else inner.is_gradient_checkpointing) == on:
        return
    prefix = "activation" if new_name else "gradient"
    if on:
        kwargs = {f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}
        getattr(inner, f"{prefix}_checkpointing_enable")(**kwargs)
    else:
        getattr(inner, f"{prefix}_checkpointing_disable")()


def build_lora(base: nn.Module, s: Settings) -> tuple[nn.Module | None, list[str]]:
    from peft import LoraConfig, get_peft_model

    if "lora" not in s.methods:
        return None, []
    config = LoraConfig(
        task_type="CAUSAL_LM", r=s.lora_r, lora_alpha=2 * s.lora_r, lora_dropout=0.0, target_modules=s.lora_targets
    )
    lora = get_peft_model(copy.deepcopy(base), config)
    return lora, sorted(lora.peft_config["default"].target_modules)


def build_prompts(base: nn.Module, s: Settings) -> dict[tuple[str, int], nn.Module]:
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    from peft_softprompt_ext import SoftPromptConfig

    prompt: dict[tuple[str, int], nn.Module] = {}
    for p in s.prompt_lengths:
        for method in (m for m in PROMPT_METHODS if m in s.methods):
            if method == "peft_pt":
                config = PromptTuningConfig(
                    task_type="CAUSAL_LM", num_virtual_tokens=p, prompt_tuning_init=PromptTuningInit.RANDOM
                )
            else:
                shared = method != "ours_concat"
                config = SoftPromptConfig(
                    task_type="CAUSAL_LM", num_virtual_tokens=p, shared_prompt_kv=shared, init_seed=s.seed
                )
            prompt[(method, p)] = get_peft_model(base, config)
    return prompt


def build_mixed(base: nn.Module, s: Settings) -> dict[int, nn.Module]:
    from peft import get_peft_model

    from peft_softprompt_ext import SoftPromptConfig

    if "ours_shared" not in s.methods or s.mixed_adapters < 2:
        return {}
    mixed: dict[int, nn.Module] = {}
    for p in s.prompt_lengths:
        configs = [
            SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=p, init_seed=s.seed + i, inference_mode=True)
            for i in range(s.mixed_adapters)
        ]
        wrapper = get_peft_model(base, configs[0], adapter_name="task0")
        for i, config in enumerate(configs[1:], start=1):
            wrapper.add_adapter(f"task{i}", config)
        mixed[p] = wrapper
    return mixed


def build_slot(base: nn.Module, tokenizer: Any, s: Settings) -> nn.Module | None:
    """A soft prompt with one slot of `slot_tokens` virtual tokens (placed in the system turn by `system_inputs`).
    Built twice (same seed, same prompt): dropping one's compiled cache must not make the other rebuild its own."""
    from peft import get_peft_model

    from peft_softprompt_ext import SoftPromptConfig, slots

    if "ours_shared" not in s.methods or s.system_tokens <= 0:
        return None
    config = SoftPromptConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=s.slot_tokens,
        slots=[s.slot_tokens],
        init_seed=s.seed,
        inference_mode=True,
    )
    if tokenizer is None:  # no tokenizer (tiny test models): a placeholder id past the vocabulary, never embedded
        config.slot_token_ids = [base.config.vocab_size]
    wrapper = get_peft_model(base, config)
    if tokenizer is not None:
        slots.add_slot_tokens(tokenizer, wrapper)
    return wrapper


def build_zoo(loaded: models.Loaded, s: Settings) -> Zoo:
    base = loaded.model
    lora, targets = build_lora(base, s)
    prompt = build_prompts(base, s)
    optimizers: dict[tuple[str, int | None], torch.optim.Optimizer] = {}
    for key, net in ([(("lora", None), lora)] if lora is not None else []) + list(prompt.items()):
        optimizers[key] = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=s.lr)
    slot, again = build_slot(base, loaded.tokenizer, s), build_slot(base, loaded.tokenizer, s)
    return Zoo(base, loaded.tokenizer, lora, targets, prompt, build_mixed(base, s), slot, again, optimizers)
