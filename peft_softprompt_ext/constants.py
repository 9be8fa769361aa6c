"""Every name the package writes to disk, puts in a state dict or matches on: each is spelled here once.

No imports beyond the standard library, so anything (the CLI's argument parser, the start-up hook) may read it.
"""

from __future__ import annotations

VERSION = "0.2.0"

# --------------------------------------------------------------------------- PEFT
PEFT_TYPE_NAME = "SOFT_PROMPT"  # our member of peft.PeftType and the "peft_type" of our adapter_config.json
PEFT_PROMPT_TUNING_TYPE = "PROMPT_TUNING"  # PEFT's own prompt tuning, which we export to and import from
TESTED_PEFT = ("0.21.0", "0.22.0")  # [min, max) of the PEFT versions the patch module was written against

# --------------------------------------------------------------------------- the adapter directory
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's pickle fallback: never written, never read
MODEL_CARD_NAME = "README.md"
TRAINING_INFO_NAME = "training_info.json"  # written by the CLI's training recipe next to the adapter

# --------------------------------------------------------------------------- tensors in adapter_model.safetensors
PROMPT_KEY = "prompt_embeddings"  # the effective prompt [num_virtual_tokens, hidden]; PEFT's prompt tuning key too
RESIDUAL_PREFIX = "residual."  # raw parameters of a residual prompt, kept so that training can resume
RAW_PROMPT_KEY = RESIDUAL_PREFIX + "raw_prompt"


def prompt_parameter_key(adapter_name: str) -> str:
    """Where the prompt lives in `SoftPromptModel.state_dict()` (and in a gathered FSDP / DeepSpeed state dict)."""
    return f"prompt_encoder.{adapter_name}.embedding.weight"


# --------------------------------------------------------------------------- exports
EMBEDS_WEIGHTS_NAME = "prompt_embeds.safetensors"
EMBEDS_METADATA_NAME = "prompt_embeds.json"
EMBEDS_KEY = "prompt_embeds"
EMBEDS_FORMAT = "peft_softprompt_ext.prompt_embeds"
EXPORT_DTYPES = ("float32", "float16", "bfloat16", "float64")
# Every file this package writes into an adapter or export directory (what --overwrite may replace or remove).
ADAPTER_FILES = (
    CONFIG_NAME,
    WEIGHTS_NAME,
    MODEL_CARD_NAME,
    TRAINING_INFO_NAME,
    EMBEDS_WEIGHTS_NAME,
    EMBEDS_METADATA_NAME,
)

# --------------------------------------------------------------------------- runtime
BASE_ADAPTER = "__base__"  # in `adapter_names`: this row gets no prompt
METRICS = ("cosine", "l2", "dot")  # nearest-token metrics of decode.py
SDPA_NAME = "sdpa"  # transformers' attention implementation that `attention.py` stands in for
PREFIX_ATTENTION_NAME = "softprompt_sdpa"  # ours, registered with transformers' AttentionInterface
MAX_VIRTUAL_TOKENS = 16384  # beyond this a "prompt" is a second input; a typo like 1e8 must not allocate for minutes

# --------------------------------------------------------------------------- environment
AUTOLOAD_ENV = "PEFT_SOFTPROMPT_EXT_AUTOLOAD"  # "0": the start-up hook does not register SOFT_PROMPT with peft
CACHE_ENV = "SOFTPROMPT_CACHE_DIR"  # where bundled models are converted to (default under $HF_HOME)
LOCK_TIMEOUT_ENV = "SOFTPROMPT_LOCK_TIMEOUT"  # seconds a reader or writer waits for an adapter directory's lock
