"""One decoding step's attention on CPU in bf16/fp16: torch's SDPA kernel on the reduced-precision tensors against
the package's `attention.prefix_sdpa`, which computes a single query row in float32 and rounds once.

Why it exists: under bf16 (weights or autocast) torch's CPU flash kernel is several times slower for one query row
than for the same row in float32, although it accumulates in float32 either way. Generation spends most of its
decoding steps there, so the package's prefix-aware SDPA upcasts that case (`peft_softprompt_ext/attention.py`);
this measures the choice on the machine at hand (rerun it when torch changes).

Shapes are a decoding step of the bundled SmolLM2-135M (9 query heads, 3 key/value heads, head dim 64): batch B,
keys K (the cache: prompt + input + tokens so far), with a padding mask (a ragged batch) and without. Each case
times both calls in interleaved rounds (`benchmarks.common.measure`); the ratio is taken round by round and given
as median (min-max) by CPU time; rows whose rounds spread more than 10 % are flagged.

    python benchmarks/bench_attention.py                  # bf16 and fp16, 1 thread (~1 min)
    python benchmarks/bench_attention.py --threads 2 --dtypes bf16

Writes ``<out-dir>/<name>.{json,md}`` (default ``attention_decode``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see benchmarks.common.machine)

import argparse  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import cli, machine, measure, models, report  # noqa: E402
from peft_softprompt_ext.attention import prefix_sdpa  # noqa: E402

SCRIPT = "benchmarks/bench_attention.py"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_common_arguments(p, name="attention_decode", threads=1, readme=False)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], metavar="B")
    p.add_argument("--keys", type=int, nargs="+", default=[64, 256, 1024], metavar="K")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=20, help="calls per timed run (one step is sub-millisecond)")
    return p.parse_args(argv)


def heads_of(model: str | None) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of the model's config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(models.model_path(model))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads, config.num_key_value_heads, head_dim


def case(heads: tuple[int, int, int], dtype: torch.dtype, b: int, k: int, masked: bool, seed: int) -> dict[str, Any]:
    """Tensors of one decoding step: query [B, H, 1, D], keys/values [B, KV, K, D], a ragged-batch mask or None."""
    h, kv, d = heads
    g = torch.Generator().manual_seed(seed)
    q, key, value = (torch.randn(b, n, t, d, generator=g).to(dtype) for n, t in ((h, 1), (kv, k), (kv, k)))
    mask = None
    if masked:
        mask = torch.ones(b, 1, 1, k, dtype=torch.bool)
        mask[: b // 2 + 1, ..., : k // 4] = False  # half the rows left-padded by a quarter of the keys
    return {"q": q, "k": key, "v": value, "mask": mask, "module": SimpleNamespace(num_key_value_groups=h // kv)}


def kernel_call(t: dict[str, Any]) -> torch.Tensor:
    """What runs without the package's branch: SDPA on the reduced-precision tensors (transformers' SDPA makes
    this call for a decoding step without a mask, the package's masked CPU path made it with one)."""
    return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=t["mask"], enable_gqa=True)


def ours_call(t: dict[str, Any]) -> torch.Tensor:
    return prefix_sdpa(t["module"], t["q"], t["k"], t["v"], t["mask"])[0].transpose(1, 2)


def repeated(fn: Any, t: dict[str, Any], calls: int) -> Any:
    def run() -> None:
        for _ in range(calls):
            fn(t)

    return run


def measure_case(t: dict[str, Any], rounds: int, calls: int) -> dict[str, Any]:
    """Both calls timed in the same rounds; their ratio (kernel / ours) and each one's error against float64."""
    as_double = {name: t[name].double() for name in ("q", "k", "v")}
    reference = kernel_call({**t, **as_double})
    errors = {
        name: (fn(t).double() - reference).abs().max().item()
        for name, fn in (("kernel", kernel_call), ("ours", ours_call))
    }
    samples = measure.interleaved([repeated(kernel_call, t, calls), repeated(ours_call, t, calls)], rounds, warmup=1)
    return {
        "kernel_ms": 1e3 * measure.spread(samples[0], "cpu").median / calls,
        "ours_ms": 1e3 * measure.spread(samples[1], "cpu").median / calls,
        "ratio_cpu": measure.paired_ratio(samples[0], samples[1], "cpu"),
        "ratio_wall": measure.paired_ratio(samples[0], samples[1], "wall"),
        "max_abs_error_vs_float64": errors,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine.prepare_environment()
    machine.set_threads(args.threads)
    heads = heads_of(args.model)
    rows, table = [], []
    with machine.LoadMonitor() as load:
        for name in args.dtypes:
            for b in args.batch_sizes:
                for k in args.keys:
                    for masked in (False, True):
                        t = case(heads, models.DTYPES[name], b, k, masked, args.seed)
                        r = {"dtype": name, "batch": b, "keys": k, "masked": masked}
                        r |= measure_case(t, args.rounds, args.calls)
                        rows.append(r)
                        err = r["max_abs_error_vs_float64"]
                        table.append(
                            [
                                name,
                                str(b),
                                str(k),
                                "yes" if masked else "no",
                                f"{r['kernel_ms']:.3f}",
                                f"{r['ours_ms']:.3f}",
                                report.fmt_spread(r["ratio_cpu"]),
                                f"{err['kernel']:.1e} / {err['ours']:.1e}",
                            ]
                        )
    info = machine.machine_info("cpu")
    lines = report.provenance(
        model=f"attention shapes of {'bundled SmolLM2-135M' if args.model is None else args.model}: {heads}",
        data=f"random normal q/k/v (seed {args.seed}); masked: half the rows lose a quarter of the keys",
        steps=f"{args.rounds} interleaved rounds of {args.calls} calls",
        seed=args.seed,
        machine=info,
        load=load.summary(),
    )
    headers = ["dtype", "B", "keys", "mask", "kernel ms", "ours ms", "kernel / ours (CPU time)", "max error vs fp64"]
    text = "\n".join(
        [f"`{cli.command_line(SCRIPT, argv)}`", "", *lines, "", report.md_table(headers, table, "lrrlrrrr")]
    )
    out = Path(args.out_dir) / (args.name or "attention_decode")
    payload = {"command": cli.command_line(SCRIPT, argv), "heads": heads, "machine": info, "rows": rows}
    report.write_json(out.with_suffix(".json"), payload | {"load": load.summary()})
    report.write_text(out.with_suffix(".md"), text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
