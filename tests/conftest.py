"""Shared fixtures: tiny models and a word-level tokenizer built locally (no hub)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import tiny  # noqa: E402  (tests/ is on pytest's pythonpath)

import peft_softprompt_ext  # noqa: E402,F401  (registers SOFT_PROMPT)


def make_tokenizer():
    return tiny.word_tokenizer()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tokenizer_dir(tmp_path):
    path = tmp_path / "tokenizer"
    make_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama saved with the word-level tokenizer: a local base model for the CLI and the loaders."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny.causal_lm("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)
