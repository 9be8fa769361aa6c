"""`SoftPromptModel`: the adapter lifecycle (add, load, save, resume, delete) and the dispatch of each forward and
generate to an execution strategy (`strategies.py`). Task classes live in `tasks.py`."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from .. import adapter_dir, card, slots
from .. import cache as kv
from ..architecture import Capabilities, UnsupportedModelError, max_positions, probe
from ..config import SoftPromptConfig
from ..constants import CONFIG_NAME, MODEL_CARD_NAME, PEFT_TYPE_NAME, prompt_parameter_key
from ..decode import decode_model_prompt
from ..distributed import PromptShardedError, full_shape, is_fsdp_module, local_weight, parameters_are_sharded
from ..initializers import initial_prompt
from ..prompt import SoftPromptEncoder
from ..vocab import embed
from .batch import IGNORE_INDEX, LabelLayout, PromptBatch, make_batch, safe_token_id
from .packing import Packing
from .strategies import STRATEGIES, ExecutionPath, Purpose, choose, new_positions

logger = logging.getLogger(__name__)

_resuming = contextvars.ContextVar("softprompt_resuming", default=False)
HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "local_files_only")
_NO_MERGE = (
    "A soft prompt has no weights to merge into the base model: it is an input, not a change to the weights. Keep "
    "the adapter (PeftModel.from_pretrained(base, DIR)), use get_base_model() for the bare model, or export the "
    "prompt's embeddings for servers that take prompt embeddings (peft_softprompt_ext.export.export_prompt_embeds, "
    "`softprompt export DIR --to embeds OUT`)."
)


@contextlib.contextmanager
def resuming_training(active: bool = True) -> Iterator[None]:
    """Loads inside this block keep the adapter trainable (and a residual prompt unfolded)."""
    token = _resuming.set(active)
    try:
        yield
    finally:
        _resuming.reset(token)


class SoftPromptModel(PeftModel):
    """The soft-prompt machinery shared by every task class (PEFT's own ``PeftModel`` API otherwise)."""

    token_level_keys: tuple[str, ...] = ("last_hidden_state", "hidden_states")
    shifted_token_keys: tuple[str, ...] = ()
    label_layout: LabelLayout = LabelLayout.PER_SEQUENCE
    model_card_info: dict[str, Any] | None = None  # what the model card reports beyond the config (card.py)

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, adapter_name: str, peft_config: Any, *args: Any, **kwargs: Any) -> None:
        """PEFT's, after filling the model fields PEFT's prompt-learning preparation insists on: an input-level
        prompt needs only the hidden size, so models without attention heads (Mamba) are fine."""
        if isinstance(peft_config, SoftPromptConfig):
            self._fill_model_fields(peft_config)
        super().add_adapter(adapter_name, peft_config, *args, **kwargs)

    def _fill_model_fields(self, config: SoftPromptConfig) -> None:
        model_config = getattr(self.base_model, "config", None)
        text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        if config.token_dim is None:
            config.token_dim = int(full_shape(self._input_embeddings().weight)[1])
        for field, names in {
            "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
            "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
        }.items():
            if getattr(config, field) is None:
                found = next((getattr(text, n) for n in names if isinstance(getattr(text, n, None), int)), None)
                setattr(config, field, found if found is not None else 1)  # unused by an input-level prompt

    def _input_embeddings(self) -> nn.Module:
        """The base model's token embedding module: a soft prompt lives in its space (refused when there is none)."""
        embeddings = self.base_model.get_input_embeddings()
        if not isinstance(embeddings, nn.Module) or not isinstance(getattr(embeddings, "weight", None), torch.Tensor):
            raise UnsupportedModelError(
                f"{type(self.base_model).__name__}.get_input_embeddings() is a {type(embeddings).__name__}, not an "
                "embedding module with a weight: soft prompts need one (the model takes something other than tokens)."
            )
        return embeddings

    def _setup_prompt_encoder(self, adapter_name: str) -> None:
        config: SoftPromptConfig = self.peft_config[adapter_name]
        if not hasattr(self, "prompt_encoder"):
            self.prompt_encoder = nn.ModuleDict({})
            self.prompt_tokens = {}
        for param in self.base_model.parameters():
            param.requires_grad = False
        embeddings = self._input_embeddings()
        self.word_embeddings = embeddings
        rows, dim = full_shape(embeddings.weight)
        self._check_compatible(config, rows, dim)
        config.num_transformer_submodules = 1
        config.vocab_size = rows
        residual = config.residual_hidden_size if config.reparameterization == "residual" else None
        encoder = SoftPromptEncoder(config.num_virtual_tokens, dim, residual)
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
        limit = max_positions(self.base_model.config)
        if limit is not None and config.num_virtual_tokens >= limit:
            raise ValueError(
                f"num_virtual_tokens={config.num_virtual_tokens} leaves no room for input: the model takes at most "
                f"{limit} positions."
            )

    def _check_new_adapter_config(self, peft_config: Any, is_trainable: bool) -> None:
        """PEFT refuses trainable prompt-learning loads; soft prompts can resume training."""
        ours = isinstance(peft_config, SoftPromptConfig)
        super()._check_new_adapter_config(peft_config, is_trainable=is_trainable and not ours)

    def _adapter(self, name: str | None) -> str:
        name = name or self.active_adapter
        if name not in self.prompt_encoder:
            raise ValueError(f"No soft-prompt adapter {name!r}; this model has {sorted(self.prompt_encoder)}.")
        return name

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self.prompt_encoder[self._adapter(name)].requires_grad_(requires_grad)

    def make_trainable(self, adapter_name: str | None = None) -> None:
        """Resume training an adapter that was loaded for inference (prompt and, for SEQ/TOKEN_CLS, the head)."""
        name = self._adapter(adapter_name)
        self.peft_config[name].inference_mode = False
        self.set_requires_grad(name, True)
        if name == self.active_adapter:
            self.set_adapter(name)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.compiled_prompts.discard(adapter_name)

    def train(self, mode: bool = True) -> SoftPromptModel:
        self.compiled_prompts.discard()  # training resumes: compiled caches would soon be stale, free them now
        return super().train(mode)

    # ------------------------------------------------------------------ save / load

    def _unsharded_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The prompts read without collectives when FSDP manages the model, else None (PEFT reads them itself).

        PEFT's `save_pretrained` calls `self.state_dict()` when no state dict is given; under FSDP1 every state-dict
        type runs a collective, so a rank-0-only save hangs, and under FSDP2 it returns DTensors safetensors can't
        write. `local_weight` needs no collective (and raises PromptShardedError when the prompt is sharded)."""
        if not any(is_fsdp_module(m) for m in self.modules()):
            return None
        if any(getattr(self, "modules_to_save", None) or ()):
            raise PromptShardedError(
                "Under FSDP a soft prompt with modules_to_save (e.g. a classification head) can't be saved by one rank "
                "alone: call peft_softprompt_ext.trainer.save_adapter on every rank, or the Trainer's save."
            )
        state: dict[str, torch.Tensor] = {}
        for name, encoder in self.prompt_encoder.items():
            if encoder.residual is not None:
                raise PromptShardedError(
                    "Under FSDP a residual soft prompt can't be saved by one rank alone: fold() it first or save on "
                    "every rank."
                )
            state[prompt_parameter_key(name)] = local_weight(encoder.embedding).clone()
        return state

    def save_pretrained(
        self, save_directory: str | os.PathLike, safe_serialization: bool = True, is_main_process: bool = True, **kwargs
    ) -> None:
        """PEFT's, made atomic: staged, synced and moved into place under the directory's lock
        (`adapter_dir.writing`), so a crash at any moment leaves the previous adapter or the new one. Never a pickle
        (`safe_serialization=False` is refused), never a collective (the prompt is read, not run)."""
        adapter_dir.refuse_pickle(safe_serialization)
        if not is_main_process:
            return  # PEFT writes nothing here; reading a sharded prompt on this rank could only fail
        if kwargs.get("state_dict") is None:
            kwargs["state_dict"] = self._unsharded_state_dict()
        kwargs.setdefault("save_embedding_layers", False)  # a soft prompt never changes the vocabulary
        with adapter_dir.writing(save_directory, "overlay") as staging:
            card.carry_user_card(save_directory, staging)
            super().save_pretrained(staging, safe_serialization=True, is_main_process=True, **kwargs)

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Our model card (card.py) instead of PEFT's empty template; a README the user wrote is left alone."""
        card.write(os.path.join(output_dir, MODEL_CARD_NAME), self)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **kwargs) -> Any:
        """PEFT's, from a folder holding safetensors only (a hub id downloads just the config and the safetensors),
        with the files validated first and read under the directory's lock."""
        is_trainable = is_trainable or _resuming.get()
        folder = adapter_dir.resolve(model_id, **{k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs})
        with adapter_dir.reading(folder):
            saved = adapter_dir.read(folder)
            adapter_dir.check_representable(saved.prompt, self._model_dtype, folder)
            self.compiled_prompts.discard(adapter_name)
            result = super().load_adapter(folder, adapter_name, is_trainable=False, **kwargs)
        if is_trainable:
            self.make_trainable(adapter_name)
        else:
            self.prompt_encoder[adapter_name].fold()
        return result

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(_NO_MERGE)

    merge_adapter = unload = merge_and_unload

    # ------------------------------------------------------------------ the prompt

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        return self.prompt_encoder[adapter_name]().detach().cpu()

    def get_prompt(self, batch_size: int, task_ids: Any = None, max_cache_len: Any = None) -> torch.Tensor:
        """PEFT's API: the active prompt repeated over the batch, [B, P, d]."""
        return self.prompt_embeddings().unsqueeze(0).expand(batch_size, -1, -1)

    def prompt_embeddings(self, adapter_name: str | None = None) -> torch.Tensor:
        """The effective prompt of an adapter (default: the active one), [P, d], in the adapter's dtype."""
        return self.prompt_encoder[self._adapter(adapter_name)]()

    def decode_prompt(
        self,
        tokenizer: Any = None,
        adapter_name: str | None = None,
        metric: str = "cosine",
        top_k: int = 5,
        skip_special_tokens: bool = True,
    ) -> Any:
        """Nearest vocabulary tokens of each virtual token (a `decode.DecodedPrompt`); see `decode.py`."""
        return decode_model_prompt(self, tokenizer, adapter_name, metric, top_k, skip_special_tokens)

    @property
    def _model_dtype(self) -> torch.dtype:
        return self.word_embeddings.weight.dtype

    @property
    def compiled_prompts(self) -> kv.CompiledPrompts:
        """The inference caches of the prompts (`name in model.compiled_prompts`, `len(...)`): built on the first
        eval-mode forward or generate of an adapter, rebuilt when its prompt changes, dropped by `train()`."""
        if "_compiled_prompts" not in self.__dict__:  # outside nn.Module's registries: not state, not a submodule
            self.__dict__["_compiled_prompts"] = kv.CompiledPrompts()
        return self.__dict__["_compiled_prompts"]

    def _needs_grad(self, name: str) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.prompt_encoder[name].parameters())

    def _trains_prompt(self, batch: PromptBatch) -> bool:
        return any(self._needs_grad(n) for n in batch.names if n)

    def _adapter_cache(self, name: str) -> Any:
        """The prompt's batch-1 KV cache: compiled once for inference, recomputed (with grad) for training."""

        def build() -> Any:
            checkpointed = self._needs_grad(name) and kv.gradient_checkpointing_active(self.base_model)
            embeds = self.prompt_embeddings(name).to(self._model_dtype)
            return kv.prompt_cache(self.base_model, embeds, checkpointed=checkpointed)

        if self._needs_grad(name) or self.base_model.training:
            return build()
        return self.compiled_prompts.get(name, self.prompt_encoder[name], self._model_dtype, build)

    def prefix_cache(self, batch: PromptBatch, frozen: bool, expand: int = 1) -> tuple[Any, torch.Tensor, dict]:
        """KV cache for the batch (rows repeated `expand` times), its [B, W] mask of cached positions, and the
        logits of each compiled slot prefix (by prompt index). A prompt before the input caches its virtual tokens;
        a prompt with slots caches its fixed prefix (`slot_prefix`)."""
        rows = batch.rows.repeat_interleave(expand)
        prefixes = batch.plan.fixed_prefixes(batch.input_ids, batch.mask, batch.rows) if batch.plan is not None else {}
        caches, logits = [], {}
        for u, name in enumerate(batch.names):
            if name is None:
                caches.append(None)
            elif u in (prefixes or {}):
                cache, logits[u] = self.slot_prefix(name, prefixes[u])
                caches.append(cache)
            else:
                caches.append(self._adapter_cache(name))
        if len(caches) == 1:
            width = kv.cache_length(caches[0])
            return kv.for_batch(caches[0], len(rows), frozen), torch.ones(len(rows), width, dtype=torch.long), logits
        cache, cached = kv.mixed_batch(caches, rows, frozen)
        return cache, cached, logits

    def _prepends(self, name: str | None) -> bool:
        return name is not None and not self.peft_config[name].slots

    def prompt_rows(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings per row [B, P_max, d] of the prompts that go before the input (zero width for rows
        without one or with slots), left-padded with zeros, and the [B, P_max] mask of those virtual tokens."""
        prompts = [self.prompt_embeddings(n).to(self._model_dtype) if self._prepends(n) else None for n in batch.names]
        width = max(0 if p is None else p.shape[0] for p in prompts)
        dim = self.word_embeddings.weight.shape[-1]
        padded, slots = [], []
        for prompt in prompts:
            length = 0 if prompt is None else prompt.shape[0]
            pad = self.word_embeddings.weight.new_zeros(width - length, dim)
            padded.append(pad if prompt is None else torch.cat([pad, prompt]))
            slots.append(torch.arange(width) >= width - length)
        rows = batch.rows.to(padded[0].device)
        return torch.stack(padded)[rows], torch.stack(slots).to(batch.device)[batch.rows].long()

    def slot_prompts(self, batch: PromptBatch) -> dict[int, torch.Tensor]:
        """The [P, d] prompt of each of the batch's prompts that has slots, by its index in `batch.names`."""
        return {
            u: self.prompt_embeddings(n).to(self._model_dtype)
            for u, n in enumerate(batch.names)
            if n is not None and self.peft_config[n].slots
        }

    def slot_prefix(self, name: str, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """(KV cache, logits) of a fixed prefix holding adapter `name`'s slots (the hard tokens with the virtual
        ones spliced in), batch 1: compiled once per adapter and prefix for inference, like the prompt cache."""

        def build() -> tuple[Any, torch.Tensor]:
            row = ids.view(1, -1)
            plan = slots.plan(row, torch.ones_like(row), [name], self.peft_config)
            embeds = embed(self.word_embeddings, plan.clean_ids(row, safe_token_id(self.base_model.config)))
            prompt = self.prompt_embeddings(name).to(self._model_dtype)
            embeds = plan.splice(embeds, {0: prompt}, torch.zeros(1, dtype=torch.long, device=row.device))
            positions = torch.arange(row.shape[1], device=row.device).unsqueeze(0)
            extra = {"position_ids": positions} if kv.accepts(self.base_model, "position_ids") else {}
            with kv.checkpointing_suspended(self.base_model):  # the head's logits, then the backbone's cache
                # a copy: some models scale the embeddings they are given in place (CTRL)
                logits = self.base_model(
                    inputs_embeds=embeds.clone(), use_cache=False, return_dict=True, **extra
                ).logits
            return kv.prompt_cache(self.base_model, embeds[0]), logits

        key = kv.CompiledPrompts.key(name, tuple(ids.tolist()))
        return self.compiled_prompts.get(key, self.prompt_encoder[name], self._model_dtype, build)

    # ------------------------------------------------------------------ which path

    @property
    def capabilities(self) -> Capabilities:
        """What the base model supports (`architecture.probe`), decided once and logged."""
        found = self.__dict__.get("_capabilities")
        if found is None:
            if self.word_embeddings.weight.device.type == "meta":
                return Capabilities(False, "the model is on the meta device")
            found = probe(self.base_model, self.word_embeddings)
            self.__dict__["_capabilities"] = found
            model_type = getattr(self.base_model.config, "model_type", type(self.base_model).__name__)
            path = "shared prompt KV" if found.prefix_kv else "concatenation"
            path += " (prefix-aware SDPA)" if found.prefix_attention else ""
            logger.info("Soft prompts on %s use %s: %s.", model_type, path, found.reason)
        return found

    def _blockers(self) -> list[str]:
        """Reasons, as the model is now, against sharing the prompt's KV."""
        reasons = []
        if parameters_are_sharded(self.base_model):
            reasons.append("parameters are sharded (FSDP / ZeRO-3 would refetch layers outside their hooks)")
        if kv.gradient_checkpointing_active(self.base_model) and kv.checkpointing_is_reentrant(self.base_model):
            reasons.append("reentrant gradient checkpointing (gradients would not reach the shared cache)")
        return reasons

    def _slot_blockers(self, batch: PromptBatch, purpose: Purpose) -> list[str]:
        """Reasons against the compiled-prefix path for a batch with slots (they then splice: concatenation)."""
        if batch.plan is None or not bool(batch.plan.slotted.any()):
            return []
        reasons = []
        if self.label_layout is not LabelLayout.NEXT_TOKEN:
            reasons.append("slots outside a causal LM (the task's outputs are spliced, not compiled)")
        if purpose is Purpose.FORWARD:
            if batch.labels is not None or self._trains_prompt(batch) or self.base_model.training:
                reasons.append("slots in training (the prompt is spliced in and trained there)")
            wanted = [k for k in ("output_hidden_states", "output_attentions") if batch.kwargs.get(k)]
            if wanted or batch.position_ids is not None:
                reasons.append(f"slots with {wanted or ['position_ids']}")
        if batch.plan.fixed_prefixes(batch.input_ids, batch.mask, batch.rows) is None:
            reasons.append("rows of one prompt differ before its last slot (no fixed prefix to compile)")
        return reasons

    def _path(self, batch: PromptBatch | None, purpose: Purpose) -> ExecutionPath:
        names = [n for n in (batch.names if batch else [self.active_adapter]) if n is not None]
        shared = all(self.peft_config[n].shared_prompt_kv for n in names)
        capabilities = self.capabilities
        capabilities.check_supported(getattr(self.base_model.config, "model_type", type(self.base_model).__name__))
        blockers = self._blockers()
        if batch is not None:
            blockers += self._slot_blockers(batch, purpose)
            if batch.labels is not None and self.label_layout is LabelLayout.PER_TOKEN:
                blockers.append("token labels (a token-classification loss reads the attention mask as its own)")
            if purpose is Purpose.FORWARD and batch.batch_size == 1 and self._trains_prompt(batch):
                # B*L + P positions either way; sharing only splits every matmul in two (benchmarks/README.md)
                blockers.append("one row in training (sharing the prompt's keys/values saves no positions)")
        path, _ = choose(capabilities, shared, blockers, batch, purpose)
        return path

    @property
    def execution_path(self) -> ExecutionPath:
        """The path a forward of the active adapter takes now (training mode and checkpointing included)."""
        return self._path(None, Purpose.FORWARD)

    # ------------------------------------------------------------------ forward / generate

    def _check_length(self, batch: PromptBatch, extra: int = 0) -> None:
        limit = max_positions(self.base_model.config)
        total = max(self.peft_config[n].num_virtual_tokens for n in batch.names if n) + batch.length + extra
        if limit is not None and total > limit:
            grows = f" + {extra} new tokens" if extra else ""
            raise ValueError(
                f"num_virtual_tokens + input length{grows} = {total} exceeds the model's {limit} positions; "
                "shorten the input, generate fewer tokens or use fewer virtual tokens."
            )

    def _batch(self, kwargs: dict[str, Any]) -> PromptBatch:
        kwargs.pop("task_ids", None)
        batch = make_batch(active=self.active_adapter, loaded=list(self.peft_config), **kwargs)
        row_names = [batch.names[u] for u in batch.rows.tolist()]
        batch.plan = slots.plan(batch.input_ids, batch.mask, row_names, self.peft_config)
        if batch.plan is not None and batch.labels is not None and batch.labels.shape == batch.mask.shape:
            placeholders = torch.isin(batch.input_ids, batch.plan.placeholder_ids.to(batch.device))
            batch.labels = batch.labels.masked_fill(placeholders.to(batch.labels.device), IGNORE_INDEX)
        return batch

    def _bare_inputs(self, batch: PromptBatch) -> dict[str, Any]:
        """The batch as the base model alone takes it (rows without a prompt: `adapter_names` all "__base__")."""
        given = {
            "input_ids": batch.input_ids,
            "inputs_embeds": batch.inputs_embeds,
            "attention_mask": batch.mask,
            "labels": batch.labels,
            "position_ids": batch.position_ids,
            "token_type_ids": batch.token_type_ids,
        }
        return {k: v for k, v in given.items() if v is not None}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs["input_ids"] = args[0]
        return_dict = kwargs.pop("return_dict", None)
        packing = Packing.detect(kwargs)
        if packing is not None:  # documents packed in a row: each gets its prompt, none sees another
            outputs = self.forward(**packing.unpack(kwargs, safe_token_id(self.base_model.config)))
            outputs = packing.repack(outputs, self.token_level_keys, self.shifted_token_keys)
            return outputs if return_dict is not False else outputs.to_tuple()
        batch = self._batch(kwargs)
        if not batch.prompted:
            outputs = self.base_model(**self._bare_inputs(batch), return_dict=True, **batch.kwargs)
        else:
            self._check_length(batch)
            path = self._path(batch, Purpose.FORWARD)
            local = path is ExecutionPath.PREFIX_KV and self.capabilities.pads_matter
            outputs = STRATEGIES[path].forward(self, batch, local)
        return outputs if return_dict is not False else outputs.to_tuple()

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs["input_ids"] = args[0]
        if self._adapters_disabled:
            return self.base_model.generate(**kwargs)
        batch = self._batch(kwargs)
        if not batch.prompted:
            return self.base_model.generate(**self._bare_inputs(batch), **batch.kwargs)
        self._check_length(batch, new_positions(self.base_model, batch.kwargs, batch.length))
        path = self._path(batch, Purpose.GENERATE)
        return STRATEGIES[path].generate(self, batch, **batch.kwargs)


# --------------------------------------------------------------------------- PeftModel.from_pretrained for ours


def is_soft_prompt_source(model_id: Any, config: Any, kwargs: dict[str, Any]) -> bool:
    """Whether `PeftModel.from_pretrained(model, model_id, config=config, **kwargs)` loads one of ours. A local
    folder is recovered first (a write killed halfway is finished); its config's errors are ours to report."""
    if config is not None:
        return isinstance(config, SoftPromptConfig)
    folder = os.path.join(os.fspath(model_id), kwargs.get("subfolder") or "")
    if os.path.isdir(folder):
        with adapter_dir.reading(folder):
            if not os.path.lexists(os.path.join(folder, CONFIG_NAME)):
                return False  # not an adapter directory at all: PEFT says so in its own words
            return adapter_dir.read_config(folder).get("peft_type") == PEFT_TYPE_NAME
    try:
        folder = adapter_dir.resolve(model_id, **{k: kwargs[k] for k in HUB_KWARGS if k in kwargs})
        return adapter_dir.read_config(folder).get("peft_type") == PEFT_TYPE_NAME
    except (OSError, ValueError):
        return False


def from_pretrained(
    original: Any,
    cls: type,
    model: nn.Module,
    model_id: Any,
    adapter_name: str,
    is_trainable: bool,
    config: Any,
    kwargs,
) -> Any:
    """PEFT's `from_pretrained` for a soft prompt: from a safe local folder, under its lock, maybe trainable."""
    folder = adapter_dir.resolve(model_id, **{k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs})
    with adapter_dir.reading(folder), resuming_training(is_trainable):
        return original(cls, model, folder, adapter_name, is_trainable=False, config=config, **kwargs)
