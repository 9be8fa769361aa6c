"""Raw torch FSDP1 (use_orig_params=False) and FSDP2 (fully_shard) on 2 gloo CPU ranks.

accelerate and the Trainer fall back to DDP on CPU, so these drive torch's FSDP directly. Each mode: the base model
is really sharded, the prompt trains in sync and equals one process on the combined batch, an all-rank save holds
the trained prompt, and a rank-0-only save is correct when the prompt is replicated and a fast, clear error when
it is sharded (never a hang: the other rank waits at a barrier with a 60 s process-group timeout).
"""

from __future__ import annotations

import pytest
import torch
from dist_launch import launch

pytestmark = pytest.mark.slow

MODES = ("fsdp1-peft", "fsdp1-replicated", "fsdp2-sharded", "fsdp2-replicated")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return launch("fsdp.py", "--modes", ",".join(MODES), out_dir=out, timeout_s=300).check()


@pytest.mark.parametrize("mode", MODES)
def test_base_model_is_sharded(fsdp_run, mode):
    for rank in fsdp_run.ranks:
        info = rank["modes"][mode]["layer_sharding"]
        if mode.startswith("fsdp1"):
            assert info["layer_local_numel"] * 2 == info["layer_numel"]
            replicated = info["prompt_local_numel"] == info["prompt_numel"]
        else:
            assert info["layer_placements"] == ["S(0)"] and info["layer_local_rows"] * 2 == info["layer_rows"]
            replicated = info["prompt_local_rows"] == 4
        assert replicated == mode.endswith("replicated")


@pytest.mark.parametrize("mode", MODES)
def test_prompt_trains_in_sync_and_matches_single_process(fsdp_run, mode):
    r0, r1 = (rank["modes"][mode] for rank in fsdp_run.ranks)
    p0, p1 = torch.tensor(r0["prompt"]), torch.tensor(r1["prompt"])
    assert torch.equal(p0, p1)
    torch.testing.assert_close(p0, torch.tensor(r0["reference"]), rtol=1e-5, atol=1e-5)
    assert (p0 - torch.tensor(r0["initial"])).abs().mean() > 0.05


@pytest.mark.parametrize("mode", MODES)
def test_all_rank_save_holds_the_trained_prompt(fsdp_run, mode):
    result = fsdp_run.ranks[0]["modes"][mode]
    prompt = torch.tensor(result["prompt"])
    assert torch.equal(torch.tensor(result["saved_all_ranks"]), prompt)
    if mode.startswith("fsdp1"):  # FULL_STATE_DICT gathered by FSDP, as accelerate/Trainer hand it to save_pretrained
        assert torch.equal(torch.tensor(result["saved_full_state_dict"]), prompt)


@pytest.mark.parametrize("mode", MODES)
def test_rank0_only_save_is_correct_or_fails_fast(fsdp_run, mode):
    result = fsdp_run.ranks[0]["modes"][mode]
    assert result["rank0_only_s"] < 10
    if mode.endswith("replicated"):
        assert torch.equal(torch.tensor(result["rank0_only"]), torch.tensor(result["prompt"]))
    else:
        assert "rank0_only" not in result
        assert "sharded" in result["rank0_only_error"] and "every rank" in result["rank0_only_error"]
