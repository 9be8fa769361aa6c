"""Smoke test of benchmarks/bench_speed.py on a tiny Llama built from a config: every output is written with the
expected rows. Timings are never asserted (tests don't time anything)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import tiny

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_speed.py"


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


def test_bench_writes_json_markdown_and_plot(bench, tiny_dir, tmp_path):
    out = tmp_path / "results"
    # --threads 1: the test shares the machine; timings are irrelevant here, only the outputs are checked
    argv = ["--model", tiny_dir, "--prompt-lengths", "3", "5", "--batch-sizes", "2", "--seq-lengths", "6"]
    argv += ["--warmup", "1", "--repeats", "2", "--new-tokens", "2", "--mixed-adapters", "3", "--threads", "1"]
    results = bench.main(argv + ["--out-dir", str(out), "--name", "speed_smoke"])

    data = json.loads((out / "speed_smoke.json").read_text())
    assert data["settings"]["prompt_lengths"] == [3, 5] and data["settings"]["seed"] == 0
    for key in ("cpu", "cpu_count", "torch", "transformers", "peft"):
        assert data["machine"][key]
    rows = {(r["method"], r["P"], r["B"], r["L"]) for r in data["rows"]}
    expected = {("bare", None, 2, 6), ("lora", None, 2, 6)}
    expected |= {(m, p, 2, 6) for m in ("peft_pt", "ours_shared", "ours_concat") for p in (3, 5)}
    assert rows == expected
    for row in data["rows"]:
        assert row["prefill_vs_bare"] is not None and row["gen_vs_bare"] is not None
        if row["method"] != "bare":
            assert row["train_vs_lora"] is not None and row["train_vs_lora_cpu"] is not None
            assert row["step_peak_vs_lora"] is not None
    trains = [r for r in data["records"] if r["kind"] == "train"]
    assert len(trains) == 7 and all(len(r["times_s"]) >= 1 and r["step_peak_bytes"] > 0 for r in trains)
    generates = [r for r in data["records"] if r["kind"] == "generate"]
    assert all(r["tokens"] == 2 * 2 for r in generates)
    assert [(r["P"], r["B"], r["L"]) for r in data["mixed"]] == [(3, 3, 6), (5, 3, 6)]
    assert all(r["prefill_mixed_vs_single"] is not None and r["generate_mixed_vs_single"] for r in data["mixed"])
    # no B=8, L=64 in this grid: no training target
    assert {t["target"] for t in data["targets"]} == {
        "prefill ×bare",
        "mixed prefill ×single",
        "mixed generate ×single",
    }
    assert results["rows"] == data["rows"]

    md = (out / "speed_smoke.md").read_text()
    assert "## Training" in md and "## Inference" in md and "## Mixed-prompt" in md and "## Targets" in md
    assert md.count("| ours_shared | 5 | 2 | 6 |") == 2  # a training row and an inference row
    assert (out / "speed_smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_profile_mode(bench, tiny_dir, capsys):
    argv = ["--model", tiny_dir, "--threads", "1", "--profile", "train:lora,ours_shared:3:2:6"]
    assert bench.main(argv) is None
    report = capsys.readouterr().out
    assert "## lora" in report and "## ours_shared" in report and "Self CPU" in report
