"""generate(): equal to a greedy loop over our own forward and to a hand-made reference, for every decoder."""

from __future__ import annotations

import pytest
import tiny
import torch
from peft import get_peft_model

from peft_softprompt_ext import SoftPromptConfig

P, NEW = 4, 5
DECODERS = list(tiny.CAUSAL_LM)


def make(arch: str, shared_prompt_kv: bool = True):
    config = SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, shared_prompt_kv=shared_prompt_kv)
    return get_peft_model(tiny.causal_lm(arch), config).eval()


@torch.no_grad()
def greedy_loop_forward(model, ids: torch.Tensor, steps: int = NEW) -> torch.Tensor:
    """Greedy decoding by repeated full forwards of our model (no cache)."""
    for _ in range(steps):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids


@torch.no_grad()
def greedy_loop_manual(model, ids: torch.Tensor, steps: int = NEW) -> torch.Tensor:
    """Independent reference: the base model on prompt embeddings concatenated by hand."""
    base = model.get_base_model()
    prompt = model.prompt_embeddings()
    for _ in range(steps):
        embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), base.get_input_embeddings()(ids)], dim=1)
        ids = torch.cat([ids, base(inputs_embeds=embeds).logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("shared", [True, False], ids=["prefix_kv", "concat"])
@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_generate_matches_loops(arch, shared):
    model = make(arch, shared)
    ids = tiny.random_ids(1, 6)
    out = model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False)
    assert out.shape == (1, 6 + NEW)
    assert torch.equal(out, greedy_loop_forward(model, ids))
    assert torch.equal(out, greedy_loop_manual(model, ids))
    with model.disable_adapter():
        bare = model(input_ids=ids).logits
    assert not torch.allclose(model(input_ids=ids).logits, bare, atol=1e-4), "the prompt must matter"


@pytest.mark.parametrize("arch", DECODERS)
def test_left_padded_batch_generates_like_rows_alone(arch):
    model = make(arch)
    short, long = tiny.random_ids(1, 4)[0], tiny.random_ids(1, 8, seed=2)[0]
    ids, mask = tiny.left_pad([short, long])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    for row, seq in enumerate([short, long]):
        new = model.generate(input_ids=seq[None], max_new_tokens=NEW, do_sample=False)[0, len(seq) :]
        assert torch.equal(out[row, ids.shape[1] : ids.shape[1] + len(new)], new)  # a row may stop early at EOS


def test_sampling_arguments_and_seed_reproducibility():
    model = make("llama")
    ids = tiny.random_ids(2, 5)
    kwargs = {"max_new_tokens": 6, "do_sample": True, "top_k": 20, "top_p": 0.9, "temperature": 0.7}
    torch.manual_seed(0)
    first = model.generate(input_ids=ids, **kwargs)
    torch.manual_seed(0)
    second = model.generate(input_ids=ids, **kwargs)
    assert first.shape == (2, 11) and torch.equal(first, second)
    assert torch.equal(first[:, :5], ids)


def test_max_length_counts_only_real_tokens():
    model = make("llama")
    ids = tiny.random_ids(1, 5)
    assert model.generate(input_ids=ids, max_length=9, do_sample=False).shape == (1, 9)


def test_return_dict_in_generate_strips_placeholders():
    model = make("qwen2")
    ids = tiny.random_ids(1, 5)
    out = model.generate(
        input_ids=ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True
    )
    assert out.sequences.shape == (1, 8) and torch.equal(out.sequences[:, :5], ids)
    assert len(out.scores) == 3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_beam_search_and_several_sequences_match_the_concatenation_path(arch):
    ids, mask = tiny.left_pad([tiny.random_ids(1, 4)[0], tiny.random_ids(1, 6, seed=3)[0]])
    kwargs = {"max_new_tokens": 4, "num_beams": 3, "num_return_sequences": 2, "do_sample": False}
    out = make(arch, True).generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert out.shape == (4, 10)
    assert torch.equal(out, make(arch, False).generate(input_ids=ids, attention_mask=mask, **kwargs))
