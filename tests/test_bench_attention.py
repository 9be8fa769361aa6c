"""Smoke test of benchmarks/bench_attention.py on a tiny Llama config's head shapes: it runs both calls on every
case and writes its JSON and table. Timings are never asserted (tests don't time anything)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import tiny

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"


def test_runs_every_case_and_writes_its_files(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        model = tmp_path / "model"
        tiny.llama_config().save_pretrained(model)
        argv = ["--model", str(model), "--out-dir", str(tmp_path), "--batch-sizes", "1", "3", "--keys", "5"]
        assert module.main([*argv, "--rounds", "2", "--calls", "1"]) == 0
    finally:
        sys.modules.pop(spec.name, None)
    report = json.loads((tmp_path / "attention_decode.json").read_text())
    assert report["heads"] == [4, 2, 8]
    cases = {(r["dtype"], r["batch"], r["keys"], r["masked"]) for r in report["rows"]}
    assert cases == {(d, b, 5, m) for d in ("bf16", "fp16") for b in (1, 3) for m in (False, True)}
    for r in report["rows"]:
        assert r["ratio_cpu"]["n"] == 2 and r["kernel_ms"] > 0 and r["ours_ms"] > 0
        errors = r["max_abs_error_vs_float64"]
        assert errors["ours"] <= errors["kernel"] + 1e-12  # one rounding, at the end
    table = (tmp_path / "attention_decode.md").read_text()
    assert "python benchmarks/bench_attention.py" in table and "| bf16 | 3 | 5 | yes |" in table
