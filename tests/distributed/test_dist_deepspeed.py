"""DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU ranks (DS_ACCELERATOR=cpu, gloo) with raw `deepspeed.initialize`.

Opt-in: deepspeed is an optional extra (`pip install -e .[deepspeed]`) and its first run JIT-builds a small
shared-memory extension (about 5 minutes on 2 busy cores, cached afterwards), so CI skips it. Run it with
    RUN_DEEPSPEED=1 python -m pytest -q tests/distributed/test_dist_deepspeed.py
Checks: the base model's embedding table is really partitioned, text and vocab init gather it (the prompt starts
exactly at the text's / sampled ids' embedding rows), training matches one process on the combined batch, decoding
gathers the table on every rank, all-rank / consolidated saves hold the prompt, and a rank-0-only save is correct
when ZeRO-3 keeps the small prompt whole (persistence threshold) and a fast, clear error when the prompt itself is
partitioned (never a hang).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from dist_launch import launch

MODES = ("zero2", "zero3", "zero3-raw", "zero3-prompt-partitioned")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.deepspeed,
    pytest.mark.skipif(os.environ.get("RUN_DEEPSPEED") != "1", reason="opt-in: set RUN_DEEPSPEED=1"),
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed"),
]


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    # generous: the first run on a machine JIT-compiles deepspeed's CPU communication extension
    return launch(
        "deepspeed_zero.py", "--modes", ",".join(MODES), out_dir=out, timeout_s=900, env={"DS_ACCELERATOR": "cpu"}
    ).check()


@pytest.mark.parametrize("mode", MODES)
def test_init_reads_the_gathered_table(ds_run, mode):
    for rank in ds_run.ranks:
        result = rank["modes"][mode]
        assert result["table_partitioned"] == mode.startswith("zero3")
        assert torch.equal(torch.tensor(result["initial"]), torch.tensor(result["expected_init"]))
        assert torch.tensor(result["initial"]).abs().sum() > 0
        if result["init_kind"] == "vocab":  # distinct sampled ids, none special (0-3 here), all found in the table
            ids = result["init_ids"]
            assert min(ids) >= 4 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("mode", MODES)
def test_trains_in_sync_and_matches_single_process(ds_run, mode):
    r0, r1 = (rank["modes"][mode] for rank in ds_run.ranks)
    p0 = torch.tensor(r0["prompt"])
    assert torch.equal(p0, torch.tensor(r1["prompt"]))
    torch.testing.assert_close(p0, torch.tensor(r0["reference"]), rtol=1e-5, atol=1e-5)
    assert (p0 - torch.tensor(r0["initial"])).abs().mean() > 0.05


@pytest.mark.parametrize("mode", MODES)
def test_decoding_gathers_on_every_rank(ds_run, mode):
    r0, r1 = (rank["modes"][mode] for rank in ds_run.ranks)
    assert r0["decoded"] == r1["decoded"] and len(r0["decoded"]["token_ids"]) == 4


@pytest.mark.parametrize("mode", MODES)
def test_saves(ds_run, mode):
    result = ds_run.ranks[0]["modes"][mode]
    prompt = torch.tensor(result["prompt"])
    assert torch.equal(torch.tensor(result["saved_all_ranks"]), prompt)
    if mode.startswith("zero3"):
        assert torch.equal(torch.tensor(result["saved_consolidated"]), prompt)
    assert result["rank0_only_s"] < 10
    if mode == "zero3-prompt-partitioned":
        assert not result["prompt_persistent"]
        assert "partitioned" in result["rank0_only_error"] and "every rank" in result["rank0_only_error"]
    else:
        assert torch.equal(torch.tensor(result["rank0_only"]), prompt)
