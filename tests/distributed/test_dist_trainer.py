"""HF Trainer under 2-rank CPU DDP (gloo): adapter-only checkpoints, resume reproduces the uninterrupted losses,
load_best_model_at_end restores the best prompt, and the decode callback logs on rank 0 only."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from dist_launch import launch
from safetensors.torch import load_file

from peft_softprompt_ext.trainer import last_complete_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    launch("ddp_trainer.py", "--phases", "full,interrupted", out_dir=out, timeout_s=300).check()
    launch("ddp_trainer.py", "--phases", "resume", out_dir=out, timeout_s=300).check()
    results = {
        phase: [json.loads((out / f"{phase}_rank{r}.json").read_text()) for r in range(2)]
        for phase in ("full", "interrupted", "resume")
    }
    return out, results


def test_trainer_ran_ddp_on_two_ranks(runs):
    _, results = runs
    for phase in results.values():
        for rank in phase:
            assert rank["world_size"] == 2 and rank["is_ddp"], rank["wrapped"]


def test_checkpoints_are_adapter_only(runs):
    out, _ = runs
    checkpoints = sorted((out / "full").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    for ckpt in checkpoints:
        names = {p.name for p in ckpt.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "optimizer.pt"} <= names
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
        weights = load_file(ckpt / "adapter_model.safetensors")
        assert set(weights) == {"prompt_embeddings"} and tuple(weights["prompt_embeddings"].shape) == (4, 32)
        assert (ckpt / "adapter_model.safetensors").stat().st_size < 4096
        assert json.loads((ckpt / "adapter_config.json").read_text())["peft_type"] == "SOFT_PROMPT"


def test_resume_from_checkpoint_reproduces_uninterrupted_losses(runs):
    _, results = runs
    full, interrupted, resumed = (results[p][0] for p in ("full", "interrupted", "resume"))
    assert interrupted["global_step"] == 4 and resumed["global_step"] == 8
    for step in ("1", "2", "3", "4"):
        assert interrupted["losses"][step] == pytest.approx(full["losses"][step], rel=1e-6)
    for step in ("5", "6", "7", "8"):
        assert resumed["losses"][step] == pytest.approx(full["losses"][step], rel=1e-6), step
    assert resumed["eval_losses"]["8"] == pytest.approx(full["eval_losses"]["8"], rel=1e-6)


def test_load_best_model_at_end_restores_best_checkpoint_prompt(runs):
    out, results = runs
    for phase, directory in (("full", "full"), ("resume", "interrupted")):
        rank0 = results[phase][0]
        evals = {int(k): v for k, v in rank0["eval_losses"].items()}
        best_step = max(evals, key=evals.get)  # greater_is_better=True in the worker
        assert rank0["best_model_checkpoint"].endswith(f"{directory}/checkpoint-{best_step}")
        best = load_file(out / directory / f"checkpoint-{best_step}" / "adapter_model.safetensors")
        last = load_file(out / directory / "checkpoint-8" / "adapter_model.safetensors")
        for rank in results[phase]:
            assert torch.equal(torch.tensor(rank["prompt"]), best["prompt_embeddings"])
        if best_step != 8:
            assert not torch.equal(best["prompt_embeddings"], last["prompt_embeddings"])


def test_decode_callback_logs_top1_tokens_on_rank0_only(runs):
    out, results = runs
    rank0, rank1 = results["full"]
    assert [e["step"] for e in rank0["decoded"]] == [2, 4, 6, 8]
    assert rank1["decoded"] == []
    for entry in rank0["decoded"]:
        assert len(entry["token_ids"]) == 4 and entry["text"] == " ".join(entry["tokens"])
        assert all(0 <= i < rank0["vocab"] for i in entry["token_ids"])
    lines = (out / "full" / "decoded_prompt.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 6, 8]


def test_last_complete_checkpoint_skips_a_half_written_one(runs, tmp_path):
    out, _ = runs
    run_dir = tmp_path / "run"
    shutil.copytree(out / "full", run_dir, ignore=shutil.ignore_patterns("*.pt", "*.pth", "*.bin"))
    assert last_complete_checkpoint(run_dir) == str(run_dir / "checkpoint-8")
    partial = run_dir / "checkpoint-10"  # a crash mid-save: the weights are cut short, no trainer_state yet
    partial.mkdir()
    data = (run_dir / "checkpoint-8" / "adapter_model.safetensors").read_bytes()
    (partial / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copy(run_dir / "checkpoint-8" / "adapter_config.json", partial)
    assert last_complete_checkpoint(run_dir) == str(run_dir / "checkpoint-8")
