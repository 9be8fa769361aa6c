"""Tiny random models built from configs (no hub), shared by the tests. Dropout is off so that
training-mode comparisons are exact."""

from __future__ import annotations

import json

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96
SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, VOCAB)]


def word_tokenizer(words: list[str] = WORDS, split_punctuation: bool = True):
    """A word-level tokenizer over `words` (ids in list order), built locally: pad/bos/eos/unk are the first four."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def llama_config(**kw):
    return LlamaConfig(
        **{
            **dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=VOCAB,
                max_position_embeddings=128,
                **SPECIAL,
            ),
            **kw,
        }
    )


def qwen2_config(**kw):
    return Qwen2Config(
        **{
            **dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=VOCAB,
                max_position_embeddings=128,
                **SPECIAL,
            ),
            **kw,
        }
    )


def gpt2_config(**kw):
    return GPT2Config(
        **{
            **dict(
                n_embd=32,
                n_layer=2,
                n_head=4,
                vocab_size=VOCAB,
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                **SPECIAL,
            ),
            **kw,
        }
    )


def opt_config(**kw):
    return OPTConfig(
        **{
            **dict(
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
                dropout=0.0,
                attention_dropout=0.0,
                **SPECIAL,
            ),
            **kw,
        }
    )


def bert_config(**kw):
    return BertConfig(
        **{
            **dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                pad_token_id=0,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            ),
            **kw,
        }
    )


def t5_config(**kw):
    return T5Config(
        **{
            **dict(
                d_model=32,
                d_ff=64,
                d_kv=8,
                num_layers=2,
                num_heads=4,
                vocab_size=VOCAB,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
                dropout_rate=0.0,
            ),
            **kw,
        }
    )


CAUSAL_LM = {
    "llama": (LlamaForCausalLM, llama_config),
    "qwen2": (Qwen2ForCausalLM, qwen2_config),
    "gpt2": (GPT2LMHeadModel, gpt2_config),
    "opt": (OPTForCausalLM, opt_config),
}
SEQ_CLS = {
    "llama": (LlamaForSequenceClassification, llama_config),
    "gpt2": (GPT2ForSequenceClassification, gpt2_config),
    "bert": (BertForSequenceClassification, bert_config),
}


def build(cls, make_config, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(make_config(**kw)).eval()


def causal_lm(arch: str = "llama", seed: int = 0, **kw):
    cls, make = CAUSAL_LM[arch]
    return build(cls, make, seed, **kw)


def bert(task: str, seed: int = 0, **kw):
    cls = {
        "SEQ_CLS": BertForSequenceClassification,
        "TOKEN_CLS": BertForTokenClassification,
        "FEATURE_EXTRACTION": BertModel,
    }[task]
    return build(cls, bert_config, seed, **kw)


def t5(seed: int = 0):
    return build(T5ForConditionalGeneration, t5_config, seed)


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def right_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def train_steps(model, steps: int, lr: float = 0.05) -> None:
    """A few AdamW steps of causal-LM loss on fixed random ids, leaving the model in eval mode."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = random_ids(4, 6)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def write_jsonl(path, rows: list[dict]) -> str:
    """A JSONL data file, one row per line (the CLI's --data format)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def staging_leftovers(directory) -> list[str]:
    """Hidden entries a write left in `directory`, other than the (permanent, empty) lock files."""
    import os

    return sorted(n for n in os.listdir(directory) if n.startswith(".") and not n.endswith(".lock"))
