"""accelerate DDP on 2 gloo CPU ranks: different data per rank, prompt in sync and equal to one process on the
combined batch; rank-0-only and all-rank saves; a dead or hung rank fails fast."""

from __future__ import annotations

import pytest
import torch
from dist_launch import launch, run_single

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    ddp = launch("ddp_accelerate.py", "--steps", "6", out_dir=root / "ddp", timeout_s=240).check()
    single = run_single("ddp_accelerate.py", "--steps", "6", "--expect-world", "1", out_dir=root / "single").check()
    return ddp, single


def test_two_ranks_are_connected_and_ddp_wrapped(ddp_runs):
    ddp, _ = ddp_runs
    assert [r["world"] for r in ddp.ranks] == [2, 2]
    assert {r["wrapped"] for r in ddp.ranks} == {"DistributedDataParallel"}
    assert ddp.ranks[0]["pid"] != ddp.ranks[1]["pid"]


def test_prompt_identical_across_ranks_and_equal_to_single_process_on_combined_batch(ddp_runs):
    ddp, single = ddp_runs
    p0, p1, ref = (torch.tensor(r["prompt"]) for r in (*ddp.ranks, single.ranks[0]))
    assert torch.equal(p0, p1)
    torch.testing.assert_close(p0, ref, rtol=1e-5, atol=1e-5)
    # the reduced loss of the 2-rank run is the loss of the combined batch
    torch.testing.assert_close(torch.tensor(ddp.ranks[0]["losses"]), torch.tensor(single.ranks[0]["losses"]))
    # and the prompt really trained (lr 3e-2, 6 Adam steps move every element by ~0.1)
    initial = torch.tensor(ddp.ranks[0]["initial"])
    assert torch.equal(initial, torch.tensor(single.ranks[0]["initial"]))
    assert (p0 - initial).abs().mean() > 0.05


def test_rank0_only_save_and_all_rank_save_hold_the_trained_prompt(ddp_runs):
    ddp, _ = ddp_runs
    prompt = torch.tensor(ddp.ranks[0]["prompt"])
    for rank in ddp.ranks:
        for name in ("rank0_only", "all_ranks"):
            assert torch.equal(torch.tensor(rank["saved"][name]), prompt), name


@pytest.mark.parametrize("fault", ["crash", "hang"])
def test_dead_or_hung_rank_fails_within_timeout(tmp_path, fault):
    result = launch("ddp_accelerate.py", "--fault", fault, out_dir=tmp_path, timeout_s=150, pg_timeout_s=10)
    assert not result.timed_out, "a hung rank blocked the launch until it was killed"
    assert result.returncode != 0
    assert result.wall_s < 150
    if fault == "crash":
        assert "injected fault" in result.output
