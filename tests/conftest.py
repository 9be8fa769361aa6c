"""Shared fixtures: tiny models and a word-level tokenizer built locally (no hub)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import tiny  # noqa: E402

import peft_softprompt_ext  # noqa: E402,F401  (registers SOFT_PROMPT)

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, tiny.VOCAB)]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tokenizer_dir(tmp_path):
    path = tmp_path / "tokenizer"
    make_tokenizer().save_pretrained(path)
    return str(path)
