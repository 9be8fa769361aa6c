"""Smoke test of benchmarks/bench_speed.py (and the benchmarks.common pieces it stands on) on a tiny Llama built
from a config: the script runs end to end and writes its files with the expected rows. Timings are never asserted
(tests don't time anything)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import tiny

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny.causal_lm("llama").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def smoke(bench, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    argv = ["--model", tiny_dir, "--prompt-lengths", "3", "5", "--batch-sizes", "2", "--seq-lengths", "6"]
    argv += ["--rounds", "2", "--min-rounds", "1", "--new-tokens", "2", "--mixed-adapters", "3"]
    argv += [
        "--system-tokens",
        "8",
        "--system-batch-sizes",
        "2",
        "--user-tokens",
        "6",
        "--slot-tokens",
        "3",
        "--threads",
        "1",
        "--jobs",
        "2",
    ]
    argv += ["--methods", "bare", "lora", "peft_pt", "ours_shared", "ours_concat"]
    results = bench.main(argv + ["--out-dir", str(out), "--name", "speed_smoke"])
    return results, out


def test_bench_writes_json_markdown_and_plot(smoke):
    results, out = smoke
    data = json.loads((out / "speed_smoke.json").read_text())
    assert data["settings"]["prompt_lengths"] == [3, 5] and data["settings"]["seed"] == 0
    for key in ("cpu", "cpu_count", "torch", "transformers", "peft", "torch_threads"):
        assert data["machine"][key]
    assert data["load"]["start"] is not None and data["load"]["during_1min"]["n"] >= 1

    records = data["records"]
    kinds = {r["kind"] for r in records}
    assert kinds == {
        "train",
        "train_gc",
        "prefill",
        "generate",
        "mixed_prefill",
        "mixed_generate",
        "system",
        "system_last",
    }
    trains = [r for r in records if r["kind"] == "train"]
    assert len(trains) == 1 + 3 * 2  # lora + 3 prompt methods x 2 prompt lengths
    assert len([r for r in records if r["kind"] == "train_gc"]) == 1 + 2 * 2
    assert data["settings"]["jobs"] == 2 and data["machine"]["allocator"] == {
        "M_MMAP_MAX": 0,
        "M_TRIM_THRESHOLD": 2**31 - 1,
    }
    for r in records:  # two measuring processes, 1-2 rounds each, pooled in process order
        assert 2 <= len(r["times_s"]) == len(r["cpu_times_s"]) == len(r["process"]) <= 4
        assert r["process"] == sorted(r["process"]) and set(r["process"]) == {0, 1}
        assert r["flops"] > 0 and r["ops"] > 0
        if r["kind"].startswith("train"):
            assert r["step_peak_bytes"] > 0 and r["total_peak_bytes"] > r["step_peak_bytes"]
    system = {r["method"] for r in records if r["kind"] == "system"}
    assert system == {
        "bare_user_turn",
        "bare_hard_system",
        "ours_compiled",
        "ours_recomputed",
    }
    last = {r["method"] for r in records if r["kind"] == "system_last"}
    assert last == {"bare_user_turn", "ours_compiled"}

    ratios = data["ratios"]
    shared = [r for r in ratios if r["method"] == "ours_shared" and r["kind"] == "train" and r["against"] == "lora"]
    assert {r["P"] for r in shared} == {3, 5}
    for r in ratios:
        for clock in ("cpu", "wall"):
            spread, medians = r[clock], r["by_process"][clock]
            assert spread["min"] <= spread["median"] <= spread["max"] and isinstance(spread["noisy"], bool)
            assert len(medians) == 2 and all(spread["min"] <= m <= spread["max"] for m in medians)
    assert any(r["against"] == "ours_concat" and r["kind"] == "train_gc" for r in ratios)
    # no P=20 in this grid: no training target, but every other target is there
    targets = {t["target"].split(" ×")[0] for t in data["targets"]}
    assert {"prefill", "generate tokens/s", "train", "train_gc", "mixed prefill", "mixed generate"} <= targets
    assert any(t["target"].startswith("system prompt") for t in data["targets"])
    assert data["headline"] and all(isinstance(v, float) for v in data["headline"].values())
    assert results["headline"] == data["headline"]

    md = (out / "speed_smoke.md").read_text()
    for heading in ("## Training", "## Inference", "## Shared prompt KV", "## Mixed-prompt", "## System prompt"):
        assert heading in md
    assert "| ours_shared | 5 | 2 | 6 |" in md and "load average" in md and "checkpointed" in md
    assert (out / "speed_smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_two_runs(bench, smoke, capsys):
    _, out = smoke
    path = str(out / "speed_smoke.json")
    verdict = bench.main(["--compare", path, path, "--out-dir", str(out), "--name", "twice"])
    assert verdict["agree"] is True
    assert "within 5%: yes" in capsys.readouterr().out
    assert "within 5%: yes" in (out / "twice_agreement.md").read_text()


def test_quick_grid_and_readme_rules(bench):
    settings, _ = bench.parse_args(["--quick"])
    assert (settings.prompt_lengths, settings.batch_sizes, settings.seq_lengths) == ([20], [8], [64])
    assert settings.name == "speed_quick" and settings.quick
    assert (settings.min_rounds, settings.rounds, settings.max_group_seconds) == (7, 15, 25)
    assert settings.jobs == bench.default_jobs("cpu", 1) >= 1 and bench.parse_args(["--jobs", "3"])[0].jobs == 3
    assert bench.default_jobs("cuda", 1) == 1
    assert "peft_pt" not in settings.methods and {"lora", "ours_shared", "ours_concat", "bare"} <= set(settings.methods)
    assert "peft_pt" in bench.parse_args(["--quick", "--methods", "lora", "peft_pt"])[0].methods
    assert settings.threads == 1 and settings.checkpointing and settings.system_tokens == 200
    assert settings.system_batch_sizes == [1] and settings.new_tokens == 8


def test_profile_mode(bench, tiny_dir, tmp_path, capsys):
    argv = ["--model", tiny_dir, "--threads", "1", "--out-dir", str(tmp_path)]
    assert bench.main(argv + ["--profile", "train_gc:lora,ours_shared,ours_concat:3:2:6"]) is None
    report = capsys.readouterr().out
    assert "| op (self ms, calls) | lora | ours_shared | ours_concat |" in report and "**total**" in report
    assert (tmp_path / "profile_train_gc_lora-ours_shared-ours_concat_3_2_6.md").exists()


def test_common_readme_sections(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import readme

    path = tmp_path / "README.md"
    path.write_text("# Benchmarks\n\n## bench_quality\n\nQ\n\n## bench_quality: curve\n\nC\n")
    readme.update_section("## bench_speed", "S1", path)
    readme.update_section("## bench_quality", "Q2", path)
    readme.update_section("## bench_speed", "S2", path)
    assert readme.read_section("## bench_quality", path) == "Q2"
    assert readme.read_section("## bench_quality: curve", path) == "C"
    assert readme.read_section("## bench_speed", path) == "S2"


def test_common_interleaving_and_spread():
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import measure

    order = []
    samples = measure.interleaved(
        [lambda: order.append("a"), lambda: order.append("b"), lambda: order.append("c")],
        rounds=3,
        prepare=[lambda: order.append("pa"), None, None],
    )
    assert [x for x in order if x != "pa"] == list("abcbcacab") and order.count("pa") == 3
    assert [len(s) for s in samples] == [3, 3, 3]
    spread = measure.Spread.of([1.0, 1.2, 0.9])
    assert (spread.min, spread.median, spread.max) == (0.9, 1.0, 1.2) and spread.noisy()
    assert not measure.Spread.of([1.0, 1.05]).noisy()


ALLOCATOR_PROBE = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from benchmarks.common import machine
settings = machine.steady_allocator() if sys.argv[2] == "steady" else {}
import torch
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(256, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 256))
x = torch.randn(4096, 256)  # 32 MB activations: above glibc's mmap threshold
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).square().mean().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"settings": settings, "faults": faults, "allocator": machine.machine_info()["allocator"]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and minor-fault counts")
def test_steady_allocator_stops_refaulting_freed_memory():
    """Training steps of an MLP with 32 MB activations: by default every step faults its activations' pages in
    afresh; once the allocator keeps freed memory, steps after the first two fault (almost) none (a fresh process
    each way: mallopt is process-wide)."""
    import subprocess

    def probe(mode):
        command = [sys.executable, "-c", ALLOCATOR_PROBE, str(ROOT), mode]
        return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)

    default, steady = probe("default"), probe("steady")
    block_pages = 32 * 2**20 // 4096
    assert default["allocator"] == "default" and all(f >= block_pages for f in default["faults"])
    assert steady["settings"] == steady["allocator"] == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1}
    # after two steps the heap has grown to the step's size; at most a block's worth more now and then
    assert sum(steady["faults"][2:]) <= 2 * block_pages < sum(default["faults"][2:]) / 4
