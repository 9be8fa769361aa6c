"""Speed and memory of soft prompts against the bare model, LoRA and PEFT's own prompt tuning, side by side.

A number that does not reproduce steers nothing, so every result is a RATIO of two things timed in the same rounds
of one run: each round runs every task of a group once, in an order rotated by one place per round, and each ratio
is taken round by round (ours in round r / LoRA in round r), then summarised as median (min–max) over the rounds. A
ratio whose rounds span more than 10 % of its median is flagged noisy (⚠). Each ratio is given by process CPU time
(judged on CPU: it doesn't grow while the process waits for a core another job holds) and by wall clock, beside its
FLOP ratio (torch.utils.flop_counter, deterministic) and aten op counts. On CPU torch runs on ONE thread by default
(--threads): a single-threaded process is the least disturbed by other jobs, and no method gains or loses from
how well its op shapes split across cores.

The rest of the CPU is not left idle: --jobs measuring processes (default: one per --threads worth of usable CPUs,
so 2 on 2 cores) each run the whole plan on their own core, and their rounds are pooled (rounds pair within a
process; each process's median is kept beside the pooled one, so a shift between processes shows). The untimed
instrumented runs are split between them (FLOPs and ops in the first, memory in the second). Each process keeps its
freed memory (machine.steady_allocator), so no step faults its activations' pages in afresh: ~100,000 minor faults a
LoRA step at B=8, L=64 otherwise, varying from step to step and with the allocator's history.

Methods (the prompt methods wrap the SAME frozen base weights; LoRA injects into its own copy):
  bare            the base model, no adapter (inference only)
  lora            peft LoraConfig r=8 on PEFT's default targets (q_proj, v_proj for Llama), unmerged
  peft_pt         peft PromptTuningConfig (prompt concatenated to every row)
  ours_shared     SoftPromptConfig(shared_prompt_kv=True): prompt KV once per step in training, compiled per adapter
                  at inference
  ours_concat     SoftPromptConfig(shared_prompt_kv=False): our concatenation fallback

Measured per (P, B, L): training step (zero_grad + forward + backward + AdamW step), without and with gradient
checkpointing (transformers' default, non-reentrant), time and peak memory as ratios to LoRA (LoRA with
checkpointing for the checkpointed column); eval prefill (no_grad forward, use_cache=False) and greedy generate
tokens/s as ratios to the bare model. Mixed batches: --mixed-adapters rows, each with a different soft prompt
(adapter_names), against a single-prompt batch of the same size. System prompt (issue 16): a request of a fixed
--system-tokens system prompt (chat template included) + a --slot-tokens slot + a --user-tokens user turn; prefill
with the compiled prefix cache and recomputed every request (the cache dropped before each), against the bare
model's prefill of the user turn alone; with every position's logits and with the next-token logits only.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` above the step's start. On CPU the same quantity from
torch.profiler's allocator events during one extra, untimed step (benchmarks.common.measure.step_peak_bytes).
"total" adds the bytes live across steps (parameters, buffers, optimizer state; shared storages counted once).

    python benchmarks/bench_speed.py                 # full default grid, SmolLM2-135M-Instruct, CPU (~45 min idle)
    python benchmarks/bench_speed.py --quick         # P=20, B=8, L=64, every section (~10 min on 2 cores)
    python benchmarks/bench_speed.py --compare A.json B.json   # do two runs agree within 5 % on every headline?
                                                               # (also writes <out-dir>/<name>_agreement.md)
    python benchmarks/bench_speed.py --device cuda --dtype bf16
    python benchmarks/bench_speed.py --profile train:lora,ours_shared,ours_concat:20:8:64
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` and `benchmarks.speed` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see benchmarks.common.machine)

import argparse  # noqa: E402
import json  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.common import cli, machine, report  # noqa: E402
from benchmarks.speed.config import AGREE, DEFAULT_METHODS, METHODS, Settings  # noqa: E402
from benchmarks.speed.output import markdown, write_outputs  # noqa: E402
from benchmarks.speed.profiling import profile  # noqa: E402
from benchmarks.speed.summary import agreement  # noqa: E402
from benchmarks.speed.work import run  # noqa: E402

__all__ = ["DEFAULT_METHODS", "main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    d = Settings()
    argv_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_common_arguments(parser, name="speed (speed_quick with --quick)", threads=d.threads)
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=d.prompt_lengths, metavar="P")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=d.batch_sizes, metavar="B")
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=d.seq_lengths, metavar="L")
    parser.add_argument("--methods", nargs="+", default=d.methods, choices=METHODS)
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed runs of each task (>= 1: instrumented)")
    parser.add_argument("--rounds", type=int, default=d.rounds, help="timed interleaved rounds per group (at most)")
    parser.add_argument("--min-rounds", type=int, default=d.min_rounds, help="timed rounds per group (at least)")
    parser.add_argument(
        "--max-group-seconds",
        type=float,
        default=d.max_group_seconds,
        help="no new round once a group's timed runs took this long (0: always --rounds)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="measuring processes, each running the whole plan on its own core(s), rounds pooled (default: one per "
        "--threads worth of usable CPUs; 1 on CUDA)",
    )
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false", help="skip that column")
    parser.add_argument("--new-tokens", type=int, default=d.new_tokens, help="greedy tokens per row in generate")
    parser.add_argument("--mixed-adapters", type=int, default=d.mixed_adapters, help="prompts (= rows) per mixed batch")
    parser.add_argument("--system-tokens", type=int, default=d.system_tokens, help="system-prompt row (0: skip it)")
    parser.add_argument("--system-batch-sizes", type=int, nargs="+", default=d.system_batch_sizes, metavar="B")
    parser.add_argument("--user-tokens", type=int, default=d.user_tokens)
    parser.add_argument("--slot-tokens", type=int, default=d.slot_tokens)
    parser.add_argument("--lora-r", type=int, default=d.lora_r)
    parser.add_argument("--lora-targets", nargs="+", default=None, help="default: PEFT's for the model type")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak-memory measurement")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="P=20, B=8, L=64, every section, no peft_pt, 7-15 rounds a process (25 s a group), 8 new tokens, "
        "system row B=1",
    )
    parser.add_argument("--profile", default=None, metavar="KIND:METHODS:P:B:L", help="profile instead of bench")
    parser.add_argument("--compare", nargs=2, default=None, metavar="JSON", help="agreement of two runs' headlines")
    args = parser.parse_args(argv_list)
    if args.quick:  # the headline ratios only (PEFT's prompt tuning is in none); cheap groups get more rounds
        args.prompt_lengths, args.batch_sizes, args.seq_lengths = [20], [8], [64]
        args.rounds, args.min_rounds, args.max_group_seconds = 15, 7, 25
        args.new_tokens, args.system_batch_sizes = 8, [1]
        if "--methods" not in argv_list:
            args.methods = [m for m in args.methods if m != "peft_pt"]
    args.name = args.name or ("speed_quick" if args.quick else "speed")
    args.max_group_seconds = args.max_group_seconds or None
    args.jobs = args.jobs or default_jobs(args.device, args.threads)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    values = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    return Settings(**values), args


def default_jobs(device: str, threads: int | None) -> int:
    """One measuring process per `threads` usable CPUs (all of them when torch keeps its default); 1 on a GPU."""
    if not device.startswith("cpu"):
        return 1
    cpus = machine.usable_cpus()
    return max(1, cpus // (threads or cpus))


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    settings, args = parse_args(argv)
    cli.quiet_libraries()
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        table, ok = agreement(a, b)
        text = (
            f"# bench_speed: do two runs agree?\n\nA: `{args.compare[0]}`\nB: `{args.compare[1]}`\n\n{table}\n\n"
            f"all headline ratios within {AGREE:.0%}: {'yes' if ok else 'NO'}\n"
        )
        report.write_text(Path(settings.out_dir) / f"{settings.name}_agreement.md", text)
        print(text)
        return {"agree": ok, "table": table}
    if args.profile:
        text = profile(args.profile, settings)
        name = "profile_" + args.profile.replace(":", "_").replace(",", "-")
        report.write_text(Path(settings.out_dir) / f"{name}.md", text)
        print(text)
        return None
    results = run(settings)
    command = cli.command_line("benchmarks/bench_speed.py", argv)
    paths = write_outputs(results, settings, command)
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return results


if __name__ == "__main__":
    main()
