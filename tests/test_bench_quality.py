"""Smoke test of benchmarks/bench_quality.py at --quick settings on a tiny Llama, a tiny word-level tokenizer with a
chat template and a synthetic WordNet file: every method runs end to end and the JSON / markdown / PNG outputs hold
the expected rows. No accuracy assertions (a random tiny model learns nothing in 3 steps)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import tiny
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft_softprompt_ext.app.data import SUPERSENSE_LABELS

BENCH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "bench_quality.py")
WORDS = [f"word{i}" for i in range(40)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def make_tokenizer():
    vocab = ["<pad>", "<s>", "</s>", "<unk>", "system", "user", "assistant", ":", ",", "."]
    tokenizer = tiny.word_tokenizer(vocab + list(SUPERSENSE_LABELS) + WORDS, split_punctuation=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def wordnet_file(tmp_path_factory):
    """80 synsets in data.noun format over every noun lexicographer file (03..28)."""
    path = tmp_path_factory.mktemp("wordnet") / "data.noun"
    lines = ["  1 This is a license header line\n"]
    for i in range(80):
        lex = 3 + i % len(SUPERSENSE_LABELS)
        gloss = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(4))
        lines.append(f"{i:08d} {lex:02d} n 01 {WORDS[i % len(WORDS)]}_{i} 0 000 | {gloss}\n")
    path.write_text("".join(lines))
    return str(path)


def test_quick_run_writes_every_output(bench, tiny_model_dir, wordnet_file, tmp_path):
    out = tmp_path / "results"
    argv = ["--quick", "--model", tiny_model_dir, "--data-path", wordnet_file, "--out-dir", str(out)]
    argv += ["--num-virtual-tokens", "4", "--residual-hidden-size", "8", "--eval-batch-size", "8"]
    assert bench.main(argv) == 0

    report = json.loads((out / "quality_quick.json").read_text())
    methods = [r["method"] for r in report["results"]]
    assert methods == list(bench.ALL_METHODS)
    by = {r["method"]: r for r in report["results"]}
    for method in bench.ALL_METHODS:
        assert 0.0 <= by[method]["accuracy"] <= 1.0
    trained = [m for m in bench.ALL_METHODS if m not in ("zero_shot", "decoded")]
    for method in trained:
        row = by[method]
        assert row["trainable_params"] > 0 and row["adapter_bytes"] > 0 and row["train_seconds"] > 0
        assert len(row["losses"]) == report["settings"]["steps"]
    assert by["ours_text"]["trainable_params"] == 4 * 32
    assert by["ours_residual"]["inference_params"] == 4 * 32 < by["ours_residual"]["trainable_params"]
    assert by["lora"]["trainable_params"] > by["ours_text"]["trainable_params"]
    assert by["decoded"]["extra"]["num_tokens"] == 4 and by["decoded"]["extra"]["source"] in bench.OURS
    assert report["settings"]["n_test"] == 16 and report["calibration"] is None
    assert set(report["goal"]["per_method"]) == set(bench.OURS)

    table = (out / "quality_quick.md").read_text()
    for method in bench.ALL_METHODS:
        assert bench.DESCRIPTIONS[method] in table
    assert sum(line.startswith("|") for line in table.splitlines()) == len(bench.ALL_METHODS) + 2  # + header, rule
    assert "python benchmarks/bench_quality.py --quick" in table
    png = out / "quality_quick.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_wordnet_says_how_to_install(bench, tmp_path, capsys):
    assert bench.main(["--quick", "--data-path", str(tmp_path / "nope" / "data.noun"), "--out-dir", str(tmp_path)]) == 2
    assert "apt-get install wordnet-base" in capsys.readouterr().out


def test_readme_update_replaces_only_its_section(bench, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nintro\n\n## bench_speed\n\nspeed table\n")
    bench.update_readme("first table\n", readme)
    text = readme.read_text()
    assert "## bench_speed\n\nspeed table\n" in text and "first table" in text
    assert text.index("## bench_speed") < text.index("## bench_quality")

    readme.write_text(text + "\n## later\n\nkept\n")
    bench.update_readme("second table\n", readme)
    text = readme.read_text()
    assert "second table" in text and "first table" not in text
    assert "speed table" in text and "## later\n\nkept\n" in text
    assert text.count("## bench_quality") == 1
