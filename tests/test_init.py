"""Initialisation: text, vocab, random, pretrained; and the errors for bad input."""

from __future__ import annotations

import logging

import pytest
import tiny
import torch
from peft import get_peft_model

from peft_softprompt_ext import SoftPromptConfig


def prompt_of(config: SoftPromptConfig, arch: str = "llama") -> tuple[torch.Tensor, torch.Tensor]:
    model = get_peft_model(tiny.causal_lm(arch), config)
    return model.prompt_embeddings().detach(), model.get_base_model().get_input_embeddings().weight.detach()


def rows_of(table: torch.Tensor, prompt: torch.Tensor) -> list[int]:
    """Which embedding row each prompt vector is (exact match)."""
    return [int((table == vec).all(-1).nonzero()[0]) for vec in prompt]


def test_text_init_with_tokenizer_object(tokenizer):
    config = SoftPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, init="text", init_text="w10 w11 w12", tokenizer=tokenizer
    )
    prompt, table = prompt_of(config)
    assert rows_of(table, prompt) == [10, 11, 12]


def test_text_init_with_tokenizer_path_repeats_and_logs(tokenizer_dir, caplog):
    config = SoftPromptConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=5,
        init="text",
        init_text="</s> w7 w8",
        tokenizer_name_or_path=tokenizer_dir,
    )
    with caplog.at_level(logging.INFO, logger="peft_softprompt_ext.initializers"):
        prompt, table = prompt_of(config)
    assert rows_of(table, prompt) == [7, 8, 7, 8, 7], "special tokens are excluded, the rest repeated"
    assert "repeating" in caplog.text


def test_text_init_truncates_with_warning(tokenizer, caplog):
    config = SoftPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=2, init="text", init_text="w20 w21 w22 w23", tokenizer=tokenizer
    )
    with caplog.at_level(logging.WARNING, logger="peft_softprompt_ext.initializers"):
        prompt, table = prompt_of(config)
    assert rows_of(table, prompt) == [20, 21]
    assert any(r.levelno == logging.WARNING and "truncating" in r.message for r in caplog.records)


def test_text_init_config_saves_tokenizer_name(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    config = SoftPromptConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=2,
        init="text",
        init_text="w9",
        tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir),
    )
    assert config.to_dict()["tokenizer_name_or_path"] == tokenizer_dir
    assert "tokenizer" not in config.to_dict()


def test_vocab_init_is_seeded_and_avoids_special_tokens(tokenizer):
    def ids(seed: int, top_k=None) -> list[int]:
        config = SoftPromptConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=8,
            init="vocab",
            init_seed=seed,
            init_vocab_top_k=top_k,
            tokenizer=tokenizer,
        )
        prompt, table = prompt_of(config)
        return rows_of(table, prompt)

    first = ids(0)
    assert first == ids(0) and first != ids(1)
    assert len(set(first)) == 8 and not set(first) & {0, 1, 2, 3}
    assert all(i < 12 for i in ids(3, top_k=12))


def test_vocab_init_without_tokenizer_uses_model_special_ids():
    config = SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, init="vocab", init_vocab_top_k=9)
    prompt, table = prompt_of(config)
    assert set(rows_of(table, prompt)) == set(range(3, 9))  # 0,1,2 are pad/bos/eos


def test_random_init_matches_embedding_statistics():
    config = SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=100, init="random", init_seed=3)
    model = get_peft_model(tiny.causal_lm("llama", max_position_embeddings=512), config)
    prompt, table = model.prompt_embeddings().detach(), model.get_base_model().get_input_embeddings().weight
    torch.testing.assert_close(prompt.mean(0), table.mean(0).detach(), atol=0.01, rtol=0)
    torch.testing.assert_close(prompt.std(0), table.std(0).detach(), atol=0.01, rtol=0.25)
    assert prompt.std().item() < 0.1, "PEFT's N(0,1) would be far off the embedding manifold (std ~0.02)"


def test_pretrained_init_transfers_a_saved_prompt(tmp_path):
    source = get_peft_model(tiny.causal_lm("llama"), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    source.save_pretrained(tmp_path / "src")
    config = SoftPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, init="pretrained", init_from=str(tmp_path / "src")
    )
    prompt, _ = prompt_of(config, "qwen2")
    torch.testing.assert_close(prompt, source.prompt_embeddings().detach())


def test_pretrained_init_with_other_hidden_size_is_an_error(tmp_path):
    source = get_peft_model(
        tiny.causal_lm("llama", hidden_size=48), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    source.save_pretrained(tmp_path / "src")
    config = SoftPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, init="pretrained", init_from=str(tmp_path / "src")
    )
    with pytest.raises(ValueError, match="hidden size 48, this model 32"):
        prompt_of(config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
        ({"num_virtual_tokens": -3}, "num_virtual_tokens must be a positive integer"),
        ({"num_virtual_tokens": 4, "init": "gaussian"}, "init must be one of"),
        ({"num_virtual_tokens": 4, "init": "text"}, "init_text must be set"),
        ({"num_virtual_tokens": 4, "init": "text", "init_text": "hi"}, "needs a tokenizer"),
        ({"num_virtual_tokens": 4, "init": "pretrained"}, "init_from must be set"),
        ({"num_virtual_tokens": 4, "init_vocab_top_k": 0}, "init_vocab_top_k must be a positive integer"),
        ({"num_virtual_tokens": 4, "reparameterization": "mlp"}, "reparameterization must be one of"),
    ],
)
def test_bad_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SoftPromptConfig(task_type="CAUSAL_LM", **kwargs)


def test_too_many_virtual_tokens_for_positions():
    with pytest.raises(ValueError, match="num_virtual_tokens=64 leaves no room"):
        prompt_of(SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=64), "gpt2")


def test_tokenizer_larger_than_embedding_table(tokenizer):
    base = tiny.causal_lm("llama", vocab_size=50)
    config = SoftPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=2, init="text", init_text="w60 w70", tokenizer=tokenizer
    )
    with pytest.raises(ValueError, match="Tokenizer id 70 is outside the model's embedding table of 50 rows"):
        get_peft_model(base, config)


def test_trust_remote_code_is_stripped(caplog):
    config = SoftPromptConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=2, tokenizer_kwargs={"trust_remote_code": True, "use_fast": True}
    )
    assert config.tokenizer_kwargs == {"use_fast": True}


def test_a_new_init_method_is_one_function_and_one_registry_entry():
    """The whole diff of adding an initialiser: the decorated function below. Config validation, get_peft_model and
    the CLI's --init choices all pick it up."""
    from peft_softprompt_ext.app.cli import build_parser
    from peft_softprompt_ext.initializers import INITIALIZERS, InitContext, embedding_rows, register_initializer

    @register_initializer("first_ids", help="embeddings of ids 3, 4, 5, ... (a throwaway for this test)")
    def first_ids(ctx: InitContext) -> torch.Tensor:
        return embedding_rows(ctx.embeddings, list(range(3, 3 + ctx.num_virtual_tokens)))

    try:
        model = get_peft_model(
            tiny.causal_lm("llama"), SoftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, init="first_ids")
        )
        table = model.get_base_model().get_input_embeddings().weight
        torch.testing.assert_close(model.prompt_embeddings().detach(), table[3:6].detach())
        args = build_parser().parse_args(["train", "--out", "x", "--init", "first_ids"])
        assert args.init == "first_ids"
    finally:
        del INITIALIZERS["first_ids"]
    with pytest.raises(ValueError, match="SoftPromptConfig.init must be one of"):
        SoftPromptConfig(num_virtual_tokens=3, init="first_ids")
