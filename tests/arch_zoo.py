"""A zoo of tiny random models, one per architecture in transformers' own auto mappings, built from configs (no hub).

`cases(task)` lists every model_type of a task's mapping as a `Case`: `case.build()` returns a seeded, eval-mode,
tiny model; `case.skip_reason` is None when the architecture can be built and exercised with plain text input,
otherwise the exact reason from `UNBUILDABLE` (nothing is dropped silently). Sizes come from one generic rule set
(`GENERIC`, applied by key name to the config and each of its sub-configs) plus `OVERRIDES` where an architecture
needs something else. Sliding windows and attention chunks are set to `WINDOW` (shorter than prompt + input), and
architectures mixing layer kinds keep one layer of each kind (`layer_types`).
"""

from __future__ import annotations

import copy
import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import CONFIG_MAPPING, GenerationConfig
from transformers.models.auto import modeling_auto

VOCAB = 128
HIDDEN = 64
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
KV_HEADS = 2
FFN = 64
LAYERS = 2
POSITIONS = 128
WINDOW = 4  # < num_virtual_tokens + input length in the sweep: windowing is exercised
PAD, BOS, EOS = 0, 1, 2

TASK_MAPPINGS = {
    "CAUSAL_LM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "SEQ_CLS": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "TOKEN_CLS": modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    "FEATURE_EXTRACTION": modeling_auto.MODEL_MAPPING_NAMES,
    "SEQ_2_SEQ_LM": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
}
TASKS = tuple(TASK_MAPPINGS)
AUTO_CLASSES = {
    "CAUSAL_LM": transformers.AutoModelForCausalLM,
    "SEQ_CLS": transformers.AutoModelForSequenceClassification,
    "TOKEN_CLS": transformers.AutoModelForTokenClassification,
    "FEATURE_EXTRACTION": transformers.AutoModel,
    "SEQ_2_SEQ_LM": transformers.AutoModelForSeq2SeqLM,
}
NUM_LABELS = 3

# --------------------------------------------------------------------------------------------------- generic sizes
# key -> value, or a function of the default value (None: leave it). Applied only to keys the config has.


def _if_set(value: Any) -> Callable[[Any], Any]:
    """Override only when the default is a positive number (None / 0 mean "feature off": keep them off)."""
    return lambda default: (
        value if isinstance(default, (int, float)) and not isinstance(default, bool) and default > 0 else None
    )


def _at_most(value: int) -> Callable[[Any], Any]:
    return lambda default: min(default, value) if isinstance(default, int) and not isinstance(default, bool) else None


GENERIC: dict[str, Any] = {
    # width
    **dict.fromkeys(
        ["hidden_size", "d_model", "n_embd", "embed_dim", "emb_dim", "embedding_dim", "word_embed_proj_dim", "dim"],
        HIDDEN,
    ),
    "embedding_size": _if_set(HIDDEN),
    "input_embedding_size": _if_set(HIDDEN),
    "output_embedding_size": _if_set(HIDDEN),
    # feed-forward
    **dict.fromkeys(
        [
            "intermediate_size",
            "ffn_dim",
            "d_ff",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "dim_ff",
            "feed_forward_size",
            "ffn_hidden_size",
            "intermediate_size_mlp",
            "dense_intermediate_size",
            "d_inner",
            "dff",
            "hidden_dim",
        ],
        FFN,
    ),
    "n_inner": _if_set(FFN),
    **dict.fromkeys(
        [
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "expert_ffn_hidden_size",
            "moe_shared_expert_intermediate_size",
            "shared_experts_intermediate_size",
        ],
        _if_set(32),
    ),
    "shared_intermediate_size": _if_set(32),
    # depth
    **dict.fromkeys(
        ["num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers"], LAYERS
    ),
    **dict.fromkeys(["num_decoder_layers", "num_encoder_layers"], _if_set(LAYERS)),
    # heads
    **dict.fromkeys(
        [
            "num_attention_heads",
            "n_head",
            "n_heads",
            "num_heads",
            "encoder_attention_heads",
            "decoder_attention_heads",
            "attention_heads",
            "num_decoder_attention_heads",
            "num_encoder_attention_heads",
        ],
        HEADS,
    ),
    # kv heads: GQA with 2 groups; MQA (default 1) stays MQA; None (= num heads) stays None
    **dict.fromkeys(["num_key_value_heads", "num_kv_heads"], lambda d: 1 if d == 1 else KV_HEADS),
    "head_dim": HEAD_DIM,  # also when the default is None: some models read it unconditionally
    **dict.fromkeys(
        ["d_kv", "d_head", "dim_head", "attention_head_size", "attention_head_dim", "kv_channels"], _if_set(HEAD_DIM)
    ),
    "rotary_dim": _if_set(HEAD_DIM // 2),
    # vocabulary and positions
    "vocab_size": VOCAB,
    "decoder_vocab_size": _if_set(VOCAB),
    **dict.fromkeys(
        ["max_position_embeddings", "n_positions", "n_ctx", "max_target_positions", "max_source_positions"],
        _if_set(POSITIONS),
    ),
    "original_max_position_embeddings": _if_set(POSITIONS),
    # mixture of experts
    # (also when the default is None: several MoE configs leave them unset yet read them)
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"], 4),
    **dict.fromkeys(["num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token"], 2),
    **dict.fromkeys(["n_group", "topk_group", "num_expert_group"], _if_set(1)),
    **dict.fromkeys(
        ["n_shared_experts", "num_shared_experts", "moe_num_shared_experts"], lambda d: 1 if d is None else min(d, 1)
    ),
    **dict.fromkeys(["first_k_dense_replace", "num_dense_layers", "moe_layer_start_index"], _at_most(1)),
    "num_nextn_predict_layers": _at_most(0),
    "num_kv_shared_layers": _at_most(0),
    # multi-head latent attention
    "kv_lora_rank": _if_set(16),
    "q_lora_rank": _if_set(16),
    "o_lora_rank": _if_set(16),
    "qk_rope_head_dim": _if_set(8),
    "qk_nope_head_dim": _if_set(8),
    "qk_head_dim": _if_set(16),
    "v_head_dim": _if_set(HEAD_DIM),
    # sparse-attention indexers
    "index_head_dim": _if_set(16),
    "index_n_heads": _if_set(2),
    # state-space / linear attention (expand 2 x hidden 64 = 128 = 8 heads x 16)
    **dict.fromkeys(["state_size", "ssm_state_size", "mamba_d_state"], _if_set(8)),
    **dict.fromkeys(["time_step_rank", "mamba_dt_rank"], _if_set(8)),
    **dict.fromkeys(["mamba_n_heads", "mamba_num_heads"], _if_set(8)),
    **dict.fromkeys(["mamba_d_head", "mamba_headdim", "mamba_head_dim"], _if_set(16)),
    "mamba_chunk_size": _if_set(8),
    **dict.fromkeys(["mamba_n_groups", "n_groups"], _if_set(1)),
    **dict.fromkeys(["linear_key_head_dim", "linear_value_head_dim", "linear_head_dim"], _if_set(16)),
    "linear_num_key_heads": _if_set(2),
    "linear_num_value_heads": _if_set(4),
    "linear_num_heads": _if_set(4),
    # windows / chunks: shorter than prompt + input
    # (sliding_window also where the default is None: Mixtral, Starcoder2, Phi-3... support it when set; Qwen2-likes
    # gate it with use_sliding_window and apply it from layer max_window_layers on: layer 0 full, layer 1 sliding)
    "sliding_window": WINDOW,
    "use_sliding_window": True,
    "max_window_layers": 1,
    **dict.fromkeys(
        ["attention_window_size", "attention_chunk_size", "window_size", "local_attention_window_len"], _if_set(WINDOW)
    ),
    # per-layer inputs and other widths
    "hidden_size_per_layer_input": _if_set(16),
    "vocab_size_per_layer_input": _if_set(VOCAB),
    "laurel_rank": _if_set(8),
    "router_hidden_size": _if_set(32),
    "classifier_proj_size": _if_set(32),
    "global_head_dim": _if_set(2 * HEAD_DIM),  # keeps full-attention layers' wider heads (Gemma 4) heterogeneous
    **dict.fromkeys(["swa_num_attention_heads"], _if_set(HEADS)),
    **dict.fromkeys(["swa_num_key_value_heads"], _if_set(KV_HEADS)),
    "swa_head_dim": _if_set(HEAD_DIM),
    "sliding_window_size": _if_set(WINDOW),
    "attention_window": _if_set(WINDOW),
    **dict.fromkeys(["unpadded_vocab_size", "src_vocab_size", "tgt_vocab_size"], _if_set(VOCAB)),
    **dict.fromkeys(["max_encoder_position_embeddings", "max_decoder_position_embeddings"], _if_set(POSITIONS)),
    "zero_expert_num": _if_set(2),
    # smaller side tables: entities (LUKE), glyph shapes / pronunciations (RoCBert), latents (Perceiver)
    **dict.fromkeys(["entity_vocab_size", "shape_vocab_size", "pronunciation_vocab_size"], _if_set(32)),
    **dict.fromkeys(["entity_emb_size", "shape_embed_dim", "pronunciation_embed_dim"], _if_set(32)),
    "encoder_hash_byte_group_vocab": _if_set(64),  # BLT's hashed byte n-gram table (500k rows by default)
    "d_latents": _if_set(HIDDEN),
    "num_latents": _if_set(16),
    "num_self_attends_per_block": _if_set(LAYERS),
    **dict.fromkeys(["num_self_attention_heads", "num_cross_attention_heads"], _if_set(HEADS)),
    # modality adapters feeding the text model
    **dict.fromkeys(["adapter_in_dim", "adapter_out_dim", "adapter_input_size"], _if_set(HIDDEN)),
}
# float settings that make train mode random (the gradient check compares two runs): all set to 0
_RANDOM = ("dropout", "pdrop", "layerdrop", "drop_path", "jitter", "drop_rate", "noise")
SPECIAL_IDS = {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
SUB_CONFIG_SKIP = ("quantization_config",)

# --------------------------------------------------------------------------------------------------- per-architecture

# Merged over the generic sizes (sub-config dicts merge key by key). `layer_types` given here replaces the derived one.
DROP = object()  # in OVERRIDES: remove a key the generic rules set
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
# Dots 3 Note's sliding layers take their own (MLA) sizes from swa_* constructor arguments
_DOTS3_SWA = {
    "swa_num_attention_heads": HEADS,
    "swa_num_key_value_heads": HEADS,
    "swa_q_lora_rank": 16,
    "swa_kv_lora_rank": 16,
    "swa_head_dim": 24,
    "swa_qk_nope_head_dim": 16,
    "swa_v_head_dim": HEAD_DIM,
}
OVERRIDES: dict[str, dict[str, Any]] = {
    # hybrids: keep at least one attention layer next to the recurrent / SSM / conv ones
    "bamba": {"attn_layer_indices": [1]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "zamba": {
        "num_hidden_layers": 3,
        "layer_types": DROP,
        "layers_block_type": ["linear_attention", "hybrid", "hybrid"],
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "head_dim": 2 * HIDDEN // HEADS,
    },
    # (zamba ties the shared transformer across hybrid layers: its tie-key regex needs two of them)
    "zamba2": {"num_hidden_layers": 2, "layer_types": DROP, "layers_block_type": ["linear_attention", "hybrid"]},
    "dbrx": {
        "attn_config": {"rope_theta": 10000.0, "kv_n_heads": KV_HEADS, "clip_qkv": 8.0},
        "ffn_config": {"moe_num_experts": 4, "moe_top_k": 2, "ffn_hidden_size": FFN},
    },
    "xlstm": {"qk_dim_factor": 1.0},
    "dory": {
        "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "n_input_layers": 1,
        "n_recurrent_layers": 1,
        "n_output_layers": 1,
    },
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "cohere_compass_text": {
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"sliding_attention": _ROPE, "full_attention": _ROPE},
    },
    # SSM head geometry: expand * hidden = heads * head_dim
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1, "chunk_size": 8},
    "falcon_h1": {"mamba_d_ssm": 2 * HIDDEN},
    # validators
    "dots3_note_text": {"num_key_value_heads": HEADS, **_DOTS3_SWA},
    "dots3_note": {"text_config": {"num_key_value_heads": HEADS, **_DOTS3_SWA}},
    "zaya": {"num_experts_per_tok": 1},
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 4,
        "indexer_compress_ratio": 2,
    },
    "qwen4_exp": {
        "text_config": {
            "indexer_n_heads": 2,
            "indexer_kv_heads": 1,
            "indexer_head_dim": 16,
            "indexer_budget": 4,
            "indexer_compress_ratio": 2,
        }
    },
    "reformer": {
        "axial_pos_embds_dim": [32, 32],
        "axial_pos_shape": [8, 16],
        "attn_layers": ["local", "lsh"],
        "local_attn_chunk_length": 4,
        "lsh_attn_chunk_length": 4,
        "num_buckets": 2,
        "num_hashes": 1,
    },
    "xmod": {"default_language": "en_XX"},
    "esmc": {"num_key_value_heads": HEADS},  # no GQA
    "funnel": {"block_sizes": [1, 1], "num_decoder_layers": 1},
    "layoutlmv3": {"coordinate_size": 8, "shape_size": 16},  # 4 x 8 + 2 x 16 = hidden size
    "lilt": {"hidden_size": 48},  # its 2D position embeddings need hidden_size divisible by 6
}

# model_type -> reason it cannot be swept; key (task, model_type) for a single task, or model_type for all tasks.
_SPEECH_TO_TEXT = (
    "audioflamingo3",
    "glmasr",
    "granite_speech",
    "granite_speech_plus",
    "moss_transcribe_diarize",
    "musicflamingo",
    "nemo_speechlm",
    "omniasr",
    "qwen2_audio",
    "qwen3_asr",
    "vibevoice_asr",
    "voxtral",
    "voxtral_realtime",
)
UNBUILDABLE: dict[Any, str] = {
    **{
        ("SEQ_2_SEQ_LM", name): "speech-to-text: a decoder-only LM over audio features (is_encoder_decoder=False); "
        "the seq2seq 'encoder input' is audio, not text"
        for name in _SPEECH_TO_TEXT
    },
    "canine": "character-level: ids are Unicode code points hashed into buckets, no token embedding table "
    "(get_input_embeddings raises NotImplementedError) to build a prompt from",
    "layoutlmv2": "visual backbone needs the `detectron2` package, not installed",
    ("TOKEN_CLS", "bros"): "needs a bbox per token (forward raises 'You have to specify bbox'); not text-only",
    ("FEATURE_EXTRACTION", "perceiver"): "PerceiverModel takes preprocessed `inputs`, not input_ids/inputs_embeds",
    "musicgen": "audio-token decoder: input_ids are [batch * num_codebooks, length] EnCodec codes, not text",
    "musicgen_melody": "audio-token decoder: input_ids are [batch * num_codebooks, length] EnCodec codes, not text",
    "gemma4_assistant": "speculative-decoding drafter: its forward needs the target model's shared_kv_states",
    "gemma4_unified_assistant": "speculative-decoding drafter: its forward needs the target model's shared_kv_states",
    "gemma3n": "vision tower is a TimmWrapperModel: needs the `timm` package, not installed",
}

# Extra constructor arguments per task (merged into the config).
TASK_CONFIG: dict[str, dict[str, Any]] = {
    "CAUSAL_LM": {"is_decoder": True},  # BERT-likes under AutoModelForCausalLM are decoders only with this flag
    "SEQ_CLS": {"num_labels": NUM_LABELS, "classifier_dropout": 0.0},
    "TOKEN_CLS": {"num_labels": NUM_LABELS, "classifier_dropout": 0.0},
}


# --------------------------------------------------------------------------------------------------- building


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sub_config_defaults(owner: str, key: str, default: dict[str, Any]) -> dict[str, Any]:
    """What the parent config sets in a sub-config beyond that sub-config class's own defaults."""
    try:
        sub_class = CONFIG_MAPPING[owner].sub_configs[key]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            own = sub_class().to_dict()
    except Exception:  # noqa: BLE001  (no class or no defaults: take the parent's values as they are)
        return dict(default)
    return {k: v for k, v in default.items() if k not in own or own[k] != v}


def _shrink(defaults: dict[str, Any], owner: str | None) -> dict[str, Any]:
    """Constructor kwargs for a tiny version of a config whose default values are `defaults` (its to_dict()).
    `owner` is the model_type of the top-level config (None for a nested sub-config)."""
    top = owner is not None
    kwargs: dict[str, Any] = {}
    for key, default in defaults.items():
        if isinstance(default, dict) and "model_type" in default and key not in SUB_CONFIG_SKIP:
            parent = _sub_config_defaults(owner, key, default) if top else dict(default)
            kwargs[key] = {**parent, **_shrink(default, None), "model_type": default["model_type"]}
            continue
        rule = GENERIC.get(key)
        if rule is not None:
            value = rule(default) if callable(rule) else rule
            if value is not None:
                kwargs[key] = value
        elif _is_number(default) and not isinstance(default, int) and any(word in key for word in _RANDOM):
            kwargs[key] = 0.0
        elif key in SPECIAL_IDS and (top or default is not None):
            kwargs[key] = SPECIAL_IDS[key]
    if "kv_lora_rank" in defaults:  # multi-head latent attention: one latent KV per head
        kwargs["num_key_value_heads"] = HEADS
        # head_dim is the rotary part (DeepSeek) or the whole query/key head (Mistral 4): keep the same meaning
        for part in ("qk_rope_head_dim", "qk_head_dim"):
            if defaults.get("head_dim") is not None and defaults.get(part) == defaults["head_dim"] and part in kwargs:
                kwargs["head_dim"] = kwargs[part]
                break
    if top and defaults.get("is_encoder_decoder"):
        # the decoder starts from <pad> where the architecture does (T5), from <eos> where it doesn't (BART, M2M100):
        # position ids computed from "non-pad" decoder ids depend on it
        start, pad = defaults.get("decoder_start_token_id"), defaults.get("pad_token_id")
        kwargs["decoder_start_token_id"] = PAD if start is None or start == pad else EOS
    # per-layer kind lists (layer_types, mlp_layer_types, ...): one layer of each kind, same length for all
    kinds = {
        key: list(dict.fromkeys(value))
        for key, value in defaults.items()
        if key.endswith("layer_types") and isinstance(value, (list, tuple)) and value and isinstance(value[0], str)
    }
    if "use_sliding_window" in defaults and kinds.get("layer_types") == ["full_attention"]:
        del kinds["layer_types"]  # derived again from use_sliding_window / max_window_layers (see GENERIC)
        kwargs["layer_types"] = None
    if kinds:
        depth = max(LAYERS, *(len(k) for k in kinds.values()))
        for key, values in kinds.items():
            kwargs[key] = (values * depth)[:depth]
        for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
            if key in defaults:
                kwargs[key] = depth
    return kwargs


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if value is DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and "model_type" in out[key]:
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@functools.cache
def _defaults(model_type: str) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CONFIG_MAPPING[model_type]().to_dict()


def config_kwargs(model_type: str, task: str) -> dict[str, Any]:
    kwargs = _shrink(_defaults(model_type), model_type)
    kwargs = _merge(kwargs, TASK_CONFIG.get(task, {}))
    return _merge(kwargs, OVERRIDES.get(model_type, {}))


def make_config(model_type: str, task: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CONFIG_MAPPING[model_type](**config_kwargs(model_type, task))


def _reset_generation_config(model: torch.nn.Module) -> None:
    """Plain greedy defaults: configs carry beams, n-gram bans, forced tokens... that a greedy loop doesn't model."""
    if getattr(model, "generation_config", None) is None:
        return
    start = getattr(model.config, "decoder_start_token_id", None)
    model.generation_config = GenerationConfig(
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=PAD if start is None and model.config.is_encoder_decoder else start,
        do_sample=False,
        num_beams=1,
    )


@dataclass
class Case:
    model_type: str
    task: str
    class_name: str
    skip_reason: str | None = None
    build_seconds: float | None = field(default=None, compare=False)

    @property
    def id(self) -> str:
        return f"{self.task}-{self.model_type}"

    def model_class(self) -> type:
        return getattr(transformers, self.class_name)

    def config(self) -> Any:
        return make_config(self.model_type, self.task)

    def build(self, seed: int = 0) -> torch.nn.Module:
        """The tiny model, seeded and in eval mode (build time recorded in `build_seconds`)."""
        start = time.perf_counter()
        config = self.config()
        config.architectures = [self.class_name]  # AutoModel picks among several classes by it (Funnel)
        for sub in {id(config): config, id(text := config.get_text_config()): text}.values():
            if getattr(sub, "pad_token_id", None) is None:  # composite configs leave it to the text part
                sub.pad_token_id = PAD
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AUTO_CLASSES[self.task].from_config(config)  # as users build them (composite -> text config)
        for module in model.modules():  # dropout hard-wired in modules (classifier heads default to 0.1)
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model.eval()
        _reset_generation_config(model)
        self.build_seconds = time.perf_counter() - start
        return model


def _text_encoder(model_type: str) -> bool:
    """FEATURE_EXTRACTION sweeps text encoders only: types that also have a sequence-classification head, aren't
    decoder-only causal LMs (in the causal-LM mapping but not the masked-LM one) and aren't encoder-decoders."""
    if model_type not in modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return False
    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if model_type in causal and model_type not in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    try:
        return not _defaults(model_type).get("is_encoder_decoder", False)
    except Exception:  # noqa: BLE001  (a config that can't even be made is reported through UNBUILDABLE)
        return True


def model_types(task: str) -> list[str]:
    mapping = TASK_MAPPINGS[task]
    names = sorted(mapping)
    if task == "FEATURE_EXTRACTION":
        names = [n for n in names if _text_encoder(n)]
    return names


def skip_reason(task: str, model_type: str) -> str | None:
    return UNBUILDABLE.get((task, model_type)) or UNBUILDABLE.get(model_type)


def cases(task: str) -> list[Case]:
    mapping = TASK_MAPPINGS[task]
    out = []
    for name in model_types(task):
        class_name = mapping[name]
        if isinstance(class_name, (list, tuple)):
            class_name = class_name[0]
        out.append(Case(name, task, class_name, skip_reason(task, name)))
    return out


def all_cases() -> list[Case]:
    return [case for task in TASKS for case in cases(task)]


def clone(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)
