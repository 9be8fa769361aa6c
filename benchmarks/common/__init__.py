"""Shared pieces of every benchmark in ``benchmarks/`` (stable API: import these, don't copy them).

Modules (each documented in its own docstring):

- ``benchmarks.common.machine``: the environment before torch loads (`prepare_environment`), thread setup
  (`set_threads`), what the machine is (`machine_info`, `device_label`) and how loaded it was while the benchmark
  ran (`LoadMonitor`). Importing it does not import torch.
- ``benchmarks.common.measure``: timing (`timed`, `Sample`, `interleaved`), spreads and paired ratios
  (`Spread`, `paired_ratio`, `NOISY`), peak memory (`step_peak_bytes`, `PeakMemory`), structural work
  (`count_work`: FLOPs and aten ops), live bytes (`tensor_bytes`, `persistent_bytes`), seeding (`seeded`).
- ``benchmarks.common.models``: dtypes by name (`DTYPES`) and loading a causal LM, the bundled SmolLM2 by default
  (`load_causal_lm` -> `Loaded`).
- ``benchmarks.common.report``: formatting (`fmt`, `fmt_bytes`, `fmt_spread`, `fmt_load`), markdown tables
  (`md_table`), provenance lines (`provenance`), atomic JSON/text writing (`write_json`, `write_text`) and
  matplotlib helpers (`figure`, `grouped_bars`).
- ``benchmarks.common.readme``: replacing one ``## `` section of ``benchmarks/README.md`` (`update_section`,
  `read_section`), safe against another benchmark writing its own section at the same time.
- ``benchmarks.common.cli``: the arguments every benchmark takes (`add_common_arguments`), quieting libraries
  (`quiet_libraries`) and the reproducible command line (`command_line`).

Scripts run as ``python benchmarks/<name>.py``; to import this package they put the repository root on
``sys.path`` first (`benchmarks/bench_speed.py` shows the three lines).
"""

from __future__ import annotations

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"

__all__ = ["BENCH_DIR", "README", "REPO_ROOT", "RESULTS_DIR"]
