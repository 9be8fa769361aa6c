"""`SoftPromptModel` and its task subclasses: PEFT's task classes with a prompt that keeps outputs aligned
with the input, is padding invariant, survives transformers' cache API and can be saved, reloaded and resumed."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from torch import nn
from torch.nn import functional as F

from . import cache as kv
from .config import SoftPromptConfig
from .prompt import ADAPTER_WEIGHTS_NAME, SoftPromptEncoder, initial_prompt

logger = logging.getLogger(__name__)

_resuming = contextvars.ContextVar("softprompt_resuming", default=False)
BASE_ADAPTER = "__base__"  # in adapter_names: this row gets no prompt


@contextlib.contextmanager
def resuming_training() -> Iterator[None]:
    """Loads inside this block keep the adapter trainable (and a residual prompt unfolded)."""
    token = _resuming.set(True)
    try:
        yield
    finally:
        _resuming.reset(token)


def _max_positions(config: Any) -> int | None:
    """Absolute-position models can't take more than this many positions; None when unbounded (RoPE etc.)."""
    if getattr(config, "position_embedding_type", "absolute") != "absolute" and hasattr(config, "rope_theta"):
        return None
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0 and not hasattr(config, "rope_parameters"):
            return value
    return None


def _require_safetensors(model_id: str, subfolder: str | None) -> None:
    """PEFT falls back to pickle (adapter_model.bin) when safetensors is missing; we never do."""
    path = os.path.join(model_id, subfolder or "")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS_NAME)):
        raise FileNotFoundError(
            f"No {ADAPTER_WEIGHTS_NAME} in {path!r}; soft prompts load only from safetensors, never from pickle files."
        )


def _parameters_sharded(model: nn.Module) -> bool:
    """FSDP / ZeRO-3 free layer weights after forward: the shared prompt KV would reach them again in backward."""
    from .integrations import parameters_are_sharded

    return parameters_are_sharded(model)


class SoftPromptModel(PeftModel):
    """The soft-prompt machinery shared by every task class (PEFT's own ``PeftModel`` API otherwise)."""

    _token_level_keys: tuple[str, ...] = ("last_hidden_state", "hidden_states")
    _loss_kind: str | None = None  # computed here on the aligned logits when the base model can't

    # ------------------------------------------------------------------ adapters

    def _setup_prompt_encoder(self, adapter_name: str) -> None:
        config: SoftPromptConfig = self.peft_config[adapter_name]
        if not hasattr(self, "prompt_encoder"):
            self.prompt_encoder = nn.ModuleDict({})
            self.prompt_tokens = {}
        for param in self.base_model.parameters():
            param.requires_grad = False
        embeddings = self.base_model.get_input_embeddings()
        self.word_embeddings = embeddings
        rows, dim = getattr(embeddings.weight, "ds_shape", embeddings.weight.shape)
        self._check_compatible(config, rows, dim)
        config.num_transformer_submodules = 1
        config.vocab_size = rows
        encoder = SoftPromptEncoder(
            config.num_virtual_tokens,
            dim,
            config.residual_hidden_size if config.reparameterization == "residual" else None,
        )
        if not config.inference_mode:
            with torch.no_grad():
                encoder.embedding.weight.copy_(initial_prompt(config, embeddings, self.base_model.config))
        device = embeddings.weight.device
        encoder.to(torch.device("cpu") if device.type == "meta" else device)
        self.prompt_encoder[adapter_name] = encoder
        self.prompt_tokens[adapter_name] = torch.arange(config.num_virtual_tokens)
        encoder.requires_grad_(not config.inference_mode)

    def _check_compatible(self, config: SoftPromptConfig, rows: int, dim: int) -> None:
        if config.token_dim not in (None, dim):
            raise ValueError(f"Adapter was made for hidden size token_dim={config.token_dim}; this model has {dim}.")
        if config.vocab_size not in (None, rows):
            raise ValueError(
                f"Adapter was made for a vocabulary of vocab_size={config.vocab_size}; this model's embedding "
                f"table has {rows} rows."
            )
        limit = _max_positions(self.base_model.config)
        if limit is not None and config.num_virtual_tokens >= limit:
            raise ValueError(
                f"num_virtual_tokens={config.num_virtual_tokens} leaves no room for input: the model takes at most "
                f"{limit} positions."
            )

    def _check_new_adapter_config(self, peft_config: Any, is_trainable: bool) -> None:
        """PEFT refuses trainable prompt-learning loads; soft prompts can resume training."""
        super()._check_new_adapter_config(peft_config, is_trainable=is_trainable and not self._is_ours(peft_config))

    @staticmethod
    def _is_ours(config: Any) -> bool:
        return isinstance(config, SoftPromptConfig)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self.prompt_encoder[name].requires_grad_(requires_grad)

    def make_trainable(self, adapter_name: str | None = None) -> None:
        """Resume training an adapter that was loaded for inference (prompt and, for SEQ/TOKEN_CLS, the head)."""
        name = adapter_name or self.active_adapter
        self.peft_config[name].inference_mode = False
        self.set_requires_grad(name, True)
        if name == self.active_adapter:
            self.set_adapter(name)

    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's, except that under FSDP with no `state_dict` given the prompt is read locally: PEFT would call
        `self.state_dict()`, a collective that hangs when only rank 0 saves (integrations.local_adapter_state_dict)."""
        if not kwargs.get("is_main_process", True):
            return None  # PEFT writes nothing here; reading a sharded prompt on this rank could only fail
        if kwargs.get("state_dict") is None:
            from .integrations import local_adapter_state_dict

            kwargs["state_dict"] = local_adapter_state_dict(self)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **kwargs: Any) -> Any:
        _require_safetensors(str(model_id), kwargs.get("subfolder"))
        is_trainable = is_trainable or _resuming.get()
        self._compiled.discard(adapter_name)
        result = super().load_adapter(model_id, adapter_name, is_trainable=is_trainable, **kwargs)
        if is_trainable:
            self.make_trainable(adapter_name)
        else:
            self.prompt_encoder[adapter_name].fold()
        return result

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        return self.prompt_encoder[adapter_name]().detach().cpu()

    def get_prompt(self, batch_size: int, task_ids: Any = None, max_cache_len: Any = None) -> torch.Tensor:
        """PEFT's API: the active prompt repeated over the batch, [B, P, d]."""
        return self.prompt_embeddings().unsqueeze(0).expand(batch_size, -1, -1)

    def prompt_embeddings(self, adapter_name: str | None = None) -> torch.Tensor:
        """The effective prompt of an adapter (default: the active one), [P, d], in the adapter's dtype."""
        return self.prompt_encoder[adapter_name or self.active_adapter]()

    def decode_prompt(
        self,
        tokenizer: Any = None,
        adapter_name: str | None = None,
        metric: str = "cosine",
        top_k: int = 5,
        skip_special_tokens: bool = True,
    ) -> Any:
        """Nearest vocabulary tokens of each virtual token (a `decode.DecodedPrompt`); see `decode.py`."""
        from .decode import decode_model_prompt

        return decode_model_prompt(self, tokenizer, adapter_name, metric, top_k, skip_special_tokens)

    # ------------------------------------------------------------------ which prompt for which row

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._compiled.discard(adapter_name)

    def train(self, mode: bool = True) -> SoftPromptModel:
        self._compiled.discard()  # training resumes: compiled caches would soon be stale, free them now
        return super().train(mode)

    @property
    def _compiled(self) -> kv.CompiledPrompts:
        if "_compiled_prompts" not in self.__dict__:
            self.__dict__["_compiled_prompts"] = kv.CompiledPrompts()
        return self.__dict__["_compiled_prompts"]

    def _row_adapters(self, adapter_names: Sequence[str] | None, batch: int) -> tuple[list[str | None], torch.Tensor]:
        """Distinct prompts of the batch (None: no prompt) and, per row, the index of its prompt."""
        if adapter_names is None:
            return [self.active_adapter], torch.zeros(batch, dtype=torch.long)
        if isinstance(adapter_names, str) or len(adapter_names) != batch:
            raise ValueError(
                f"adapter_names must be a list with one name per row ({batch} rows), got {adapter_names!r}."
            )
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(
                f"Unknown adapter name(s) {unknown} in adapter_names; loaded: {sorted(self.peft_config)} "
                f"(or {BASE_ADAPTER!r} for no prompt)."
            )
        distinct = list(dict.fromkeys(adapter_names))
        rows = torch.tensor([distinct.index(n) for n in adapter_names], dtype=torch.long)
        return [None if n == BASE_ADAPTER else n for n in distinct], rows

    def _needs_grad(self, name: str) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.prompt_encoder[name].parameters())

    def _adapter_cache(self, name: str) -> Any:
        """The prompt's batch-1 KV cache: compiled once for inference, recomputed (with grad) for training."""
        build = lambda: kv.prompt_cache(self.base_model, self.prompt_embeddings(name).to(self._model_dtype))  # noqa: E731
        if self._needs_grad(name) or self.base_model.training:
            return build()
        return self._compiled.get(name, self.prompt_encoder[name], self._model_dtype, build)

    def _prefix_cache(self, names: list[str | None], rows: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """KV cache for the batch and its [B, P_max] slot mask (1 where a row has a virtual token)."""
        if len(names) == 1:
            cache = self._adapter_cache(names[0])
            width = self.peft_config[names[0]].num_virtual_tokens
            return kv.for_batch(cache, len(rows)), torch.ones(len(rows), width, dtype=torch.long)
        cache, slots = kv.mixed_batch([None if n is None else self._adapter_cache(n) for n in names], rows)
        return cache, slots

    def _prompt_rows(self, names: list[str | None], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings per row [B, P_max, d], left-padded with zeros, and the [B, P_max] slot mask."""
        prompts = [None if n is None else self.prompt_embeddings(n).to(self._model_dtype) for n in names]
        width = max(0 if p is None else p.shape[0] for p in prompts)
        dim = self.word_embeddings.weight.shape[-1]
        padded, slots = [], []
        for prompt in prompts:
            length = 0 if prompt is None else prompt.shape[0]
            pad = self.word_embeddings.weight.new_zeros(width - length, dim)
            padded.append(pad if prompt is None else torch.cat([pad, prompt]))
            slots.append(torch.arange(width) >= width - length)
        return torch.stack(padded)[rows], torch.stack(slots)[rows].long()

    # ------------------------------------------------------------------ forward

    @property
    def _model_dtype(self) -> torch.dtype:
        return self.word_embeddings.weight.dtype

    def _use_prefix_kv(self) -> bool:
        return (
            self.active_peft_config.shared_prompt_kv
            and kv.supports_prefix_kv(self.base_model)
            and not kv.gradient_checkpointing_active(self.base_model)
            and not _parameters_sharded(self.base_model)
        )

    def _check_length(self, total: int) -> None:
        limit = _max_positions(self.base_model.config)
        if limit is not None and total > limit:
            raise ValueError(
                f"num_virtual_tokens + input length = {total} exceeds the model's {limit} positions; "
                "shorten the input or use fewer virtual tokens."
            )

    def _prompted_forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_dict: bool | None = None,
        adapter_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        kwargs.pop("task_ids", None)
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("Pass input_ids or inputs_embeds.")
        batch, length = reference.shape[:2]
        mask = attention_mask
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=reference.device)
        names, rows = self._row_adapters(adapter_names, batch)
        if names == [None]:
            return self.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                labels=labels,
                position_ids=position_ids,
                return_dict=return_dict,
                **kwargs,
            )
        self._check_length(max(self.peft_config[n].num_virtual_tokens for n in names if n) + length)
        run = self._forward_prefix if self._use_prefix_kv() else self._forward_concat
        outputs = run(names, rows.to(reference.device), input_ids, inputs_embeds, mask, labels, position_ids, **kwargs)
        return outputs if return_dict is not False else outputs.to_tuple()

    def _forward_prefix(self, names, rows, input_ids, inputs_embeds, mask, labels, position_ids, **kwargs) -> Any:
        """Decoder-only: the prompt lives in the KV cache; the model sees exactly the user's tokens."""
        base = self.base_model
        cache, slots = self._prefix_cache(names, rows)
        slots = slots.to(device=mask.device, dtype=mask.dtype)
        model_kwargs = {kv.cache_kwarg(base): cache}
        if kv.accepts(base, "position_ids"):
            model_kwargs["position_ids"] = kv.input_positions(mask, slots.long().sum(1, keepdim=True), position_ids)
        kwargs.setdefault("use_cache", False)
        return base(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=torch.cat([slots, mask], dim=1),
            labels=labels,
            return_dict=True,
            **model_kwargs,
            **kwargs,
        )

    def _forward_concat(self, names, rows, input_ids, inputs_embeds, mask, labels, position_ids, **kwargs) -> Any:
        """Encoders, the seq2seq encoder and checkpointed decoders: prepend the prompt, then cut it from outputs."""
        base = self.base_model
        prompts, slots = self._prompt_rows(names, rows)
        slots = slots.to(device=mask.device, dtype=mask.dtype)
        batch, width = slots.shape
        embeds = inputs_embeds if inputs_embeds is not None else self.word_embeddings(input_ids)
        seq = torch.cat([prompts, embeds.to(prompts.dtype)], dim=1)
        full_mask = torch.cat([slots, mask], dim=1)
        extra: dict[str, torch.Tensor] = {}
        if kv.accepts(base, "position_ids") and not base.config.is_encoder_decoder:
            prompt_pos = kv.input_positions(slots, 0)
            text_pos = kv.input_positions(mask, slots.long().sum(1, keepdim=True), position_ids)
            extra["position_ids"] = torch.cat([prompt_pos, text_pos], 1)
        token_type_ids = kwargs.pop("token_type_ids", None)
        if token_type_ids is not None:
            extra["token_type_ids"] = torch.cat([token_type_ids.new_zeros(batch, width), token_type_ids], 1)
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch",) if k in kwargs}
        order = self._left_align_order(full_mask)
        if order is not None:
            seq, full_mask = _take(seq, order), _take(full_mask, order)
            extra = {k: _take(v, order) for k, v in extra.items()}
        outputs = base(
            inputs_embeds=seq,
            attention_mask=full_mask,
            labels=None if self._loss_kind else labels,
            return_dict=True,
            **extra,
            **kwargs,
        )
        inverse = None if order is None else torch.argsort(order, dim=1)
        for key in self._token_level_keys:
            value = outputs.get(key)
            if value is not None:
                outputs[key] = _restore(value, inverse, width)
        if labels is not None and self._loss_kind:
            outputs["loss"] = self._loss(outputs["logits"], labels, **loss_kwargs)
        return outputs

    def _left_align_order(self, full_mask: torch.Tensor) -> torch.Tensor | None:
        """For decoders, move pads before the prompt so the last position is a real token whatever the padding
        side (sequence classification reads it); positions are explicit, so the result is unchanged."""
        if not kv.is_causal_decoder(self.base_model) or bool(full_mask[:, -1].all()):
            return None
        return torch.argsort(full_mask.long(), dim=1, stable=True)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, **loss_kwargs: Any) -> torch.Tensor:
        labels = labels.to(logits.device)
        if self._loss_kind == "causal_lm":
            return self.base_model.loss_function(
                logits=logits, labels=labels, vocab_size=logits.shape[-1], **loss_kwargs
            )
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs["input_ids"] = args[0]
        return self._prompted_forward(**kwargs)

    # ------------------------------------------------------------------ generation

    def _generate_prefix(self, names, rows, input_ids: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> Any:
        """Generate with the prompt's KV as a pre-filled cache. Transformers takes the cached part to be a prefix of
        input_ids, so placeholder ids stand in for the virtual tokens and are cut from the result."""
        base = self.base_model
        # generate repeats each row for beams / returned sequences but leaves a cache handed to it as it is
        config = kwargs.get("generation_config") or base.generation_config
        expand = max(
            kwargs.get("num_beams") or config.num_beams or 1,
            kwargs.get("num_return_sequences") or config.num_return_sequences or 1,
        )
        with torch.no_grad():
            cache, slots = self._prefix_cache(names, rows.repeat_interleave(expand))
        slots = slots[::expand].to(device=mask.device, dtype=mask.dtype)
        width = slots.shape[1]
        placeholder = input_ids.new_full((input_ids.shape[0], width), _placeholder_id(base.config))
        if kwargs.get("max_length") is not None:
            kwargs["max_length"] += width
        out = base.generate(
            input_ids=torch.cat([placeholder, input_ids], dim=1),
            attention_mask=torch.cat([slots, mask], dim=1),
            **{kv.cache_kwarg(base): cache},
            **kwargs,
        )
        return _strip_prefix(out, width)

    def _generate_concat(self, names, rows, input_ids, inputs_embeds, mask, **kwargs: Any) -> Any:
        """Generate from prompt + input embeddings (no cache hand-over): the fallback for any generative model."""
        base = self.base_model
        prompts, slots = self._prompt_rows(names, rows)
        slots = slots.to(device=mask.device, dtype=mask.dtype)
        width = slots.shape[1]
        embeds = inputs_embeds if inputs_embeds is not None else self.word_embeddings(input_ids)
        batch = embeds.shape[0]
        seq = torch.cat([prompts, embeds.to(prompts.dtype)], dim=1)
        if kwargs.get("max_length") is not None and not base.config.is_encoder_decoder:
            kwargs["max_length"] += width
        out = base.generate(inputs_embeds=seq, attention_mask=torch.cat([slots, mask], dim=1), **kwargs)
        if input_ids is None or base.config.is_encoder_decoder:
            return out
        # decoder-only generate from embeddings returns only the new tokens; give back input + new like the base
        if isinstance(out, torch.Tensor):
            return torch.cat([input_ids.repeat_interleave(out.shape[0] // batch, 0), out], dim=1)
        out.sequences = torch.cat([input_ids.repeat_interleave(out.sequences.shape[0] // batch, 0), out.sequences], 1)
        return out

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs["input_ids"] = args[0]
        if self._adapters_disabled:
            return self.base_model.generate(**kwargs)
        kwargs.pop("task_ids", None)
        input_ids, inputs_embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("generate() needs input_ids or inputs_embeds.")
        mask = kwargs.pop("attention_mask", None)
        if mask is None:
            mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        names, rows = self._row_adapters(kwargs.pop("adapter_names", None), reference.shape[0])
        if names == [None]:
            return self.base_model.generate(
                input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask, **kwargs
            )
        rows = rows.to(reference.device)
        user_cache = any(kwargs.get(name) is not None for name in kv.CACHE_NAMES)
        if input_ids is not None and inputs_embeds is None and not user_cache and self._use_prefix_kv():
            return self._generate_prefix(names, rows, input_ids, mask, **kwargs)
        return self._generate_concat(names, rows, input_ids, inputs_embeds, mask, **kwargs)


class SoftPromptModelForCausalLM(SoftPromptModel, PeftModelForCausalLM):
    """Causal LM: logits have the input's length; labels cover the user's tokens only."""

    _token_level_keys = ("logits", "hidden_states")
    _loss_kind = "causal_lm"


class SoftPromptModelForSequenceClassification(SoftPromptModel, PeftModelForSequenceClassification):
    """Sequence classification: the head is trained and saved with the prompt (PEFT's modules_to_save)."""

    _token_level_keys = ("hidden_states",)


class SoftPromptModelForTokenClassification(SoftPromptModel, PeftModelForTokenClassification):
    """Token classification: one logit row per input token."""

    _token_level_keys = ("logits", "hidden_states")
    _loss_kind = "token_cls"


class SoftPromptModelForFeatureExtraction(SoftPromptModel, PeftModelForFeatureExtraction):
    """Feature extraction: hidden states per input token."""


class SoftPromptModelForSeq2SeqLM(SoftPromptModel, PeftModelForSeq2SeqLM):
    """Seq2seq: the prompt goes before the encoder input; the decoder is untouched."""

    _token_level_keys = ("encoder_last_hidden_state", "encoder_hidden_states")

    def _use_prefix_kv(self) -> bool:
        return False


TASK_CLASSES: dict[type, type] = {
    PeftModel: SoftPromptModel,
    PeftModelForCausalLM: SoftPromptModelForCausalLM,
    PeftModelForSequenceClassification: SoftPromptModelForSequenceClassification,
    PeftModelForTokenClassification: SoftPromptModelForTokenClassification,
    PeftModelForFeatureExtraction: SoftPromptModelForFeatureExtraction,
    PeftModelForSeq2SeqLM: SoftPromptModelForSeq2SeqLM,
}


def _placeholder_id(config: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return 0


def _strip_prefix(out: Any, n: int) -> Any:
    if isinstance(out, torch.Tensor):
        return out[:, n:]
    out.sequences = out.sequences[:, n:]
    return out


def _take(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    index = order.view(*order.shape, *([1] * (tensor.dim() - 2))).expand(*order.shape, *tensor.shape[2:])
    return tensor.gather(1, index)


def _restore(value: Any, inverse: torch.Tensor | None, num_virtual: int) -> Any:
    """Undo the left-align permutation and drop the prompt positions (tensor or tuple of tensors)."""
    if isinstance(value, tuple):
        return tuple(_restore(v, inverse, num_virtual) for v in value)
    if inverse is not None:
        value = _take(value, inverse)
    return value[:, num_virtual:].contiguous()
