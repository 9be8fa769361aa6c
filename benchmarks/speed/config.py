"""Method names, targets, references and the settings of a bench_speed run."""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.common import RESULTS_DIR

METHODS = ("bare", "lora", "peft_pt", "ours_shared", "ours_concat")
DEFAULT_METHODS = METHODS
PROMPT_METHODS = ("peft_pt", "ours_shared", "ours_concat")
TRAINABLE = ("lora", *PROMPT_METHODS)
CHECKPOINTED = ("lora", "ours_shared", "ours_concat")  # also timed with gradient checkpointing
AGREE = 0.05  # --compare: two runs agree when every headline ratio is within this fraction
FLOP_TOLERANCE = 0.05  # a time ratio "matches its FLOPs" within this fraction
SECTION = "## bench_speed"

TARGETS = {
    "train": ("<=", 1.0),  # ours_shared train step ×LoRA at P=20 (and the same with checkpointing)
    "memory_gc": ("<=", 1.0),  # ours_shared total peak ×LoRA, both checkpointed, P=20
    "vs_concat": ("<=", 1.0),  # ours_shared ×ours_concat, time, everywhere
    "vs_concat_rate": (">=", 1.0),  # the same as a throughput ratio (generate tokens/s)
    "prefill": ("<=", 1.05),  # ours_shared (compiled cache) prefill ×bare, everywhere
    "mixed": (">=", 0.9),  # mixed-prompt batch throughput ×single-prompt batch
    "system": ("<=", 1.05),  # system prompt + slot, compiled, ×bare prefill of the user turn alone (both kinds)
}


@dataclass
class Settings:
    """Everything that defines a run; written verbatim into the JSON."""

    model: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    prompt_lengths: list[int] = field(default_factory=lambda: [20, 100])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    seq_lengths: list[int] = field(default_factory=lambda: [64, 256])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    warmup: int = 1
    rounds: int = 7
    min_rounds: int = 3
    max_group_seconds: float | None = 150.0
    checkpointing: bool = True
    new_tokens: int = 16
    mixed_adapters: int = 8
    system_tokens: int = 200
    system_batch_sizes: list[int] = field(default_factory=lambda: [1, 8])  # requests per batch in the system row
    user_tokens: int = 64
    slot_tokens: int = 20
    lora_r: int = 8
    lora_targets: list[str] | None = None
    lr: float = 1e-3
    threads: int | None = 1
    jobs: int = 1  # measuring processes, each on its own core(s), running the whole plan; rounds pooled
    seed: int = 0
    memory: bool = True
    out_dir: str = str(RESULTS_DIR)
    name: str = "speed"
    plot: bool = True
    readme: bool = True
    quick: bool = False


# kind -> (reference method, ratio of throughput instead of time)
REFERENCES = {
    "train": ("lora", False),
    "train_gc": ("lora", False),
    "prefill": ("bare", False),
    "generate": ("bare", True),
    "mixed_prefill": ("ours_shared_single", True),
    "mixed_generate": ("ours_shared_single", True),
    "system": ("bare_user_turn", False),
    "system_last": ("bare_user_turn", False),
}
