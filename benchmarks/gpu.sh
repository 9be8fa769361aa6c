#!/usr/bin/env bash
# The GPU run, in one script that finishes in <= 8 minutes on one GPU (each step has its own time limit; the
# limits plus their kill grace sum to 475 s):
#
#   1. bench_speed --device cuda --dtype bf16 on a reduced grid (P=20; B 1, 8; L 64, 256): ours_shared (its prefix
#      attention runs lower-right causal through the flash kernel) beside ours_concat, LoRA and the bare model
#   2. bench_quality --quick --device cuda
#   3. the DDP example: examples/train_causal_lm.py under accelerate launch --config_file examples/accelerate/ddp.yaml
#      (one process per visible GPU; 30 steps)
#   4. a profile (self device time per op) of a bf16 training step: LoRA, ours_shared, ours_concat
#
# Usage:  bash benchmarks/gpu.sh [RESULTS_DIR]        (default benchmarks/results/gpu)
#         GPU_SH_DRY_RUN=1 bash benchmarks/gpu.sh /tmp/gpu_dry   # the same pieces on CPU with tiny budgets
#
# Writes into RESULTS_DIR: speed_gpu.{json,md,png}, quality_gpu.*, ddp/ (the adapter), profile_*.md, one log per step,
# environment.txt (GPU, driver, versions) and summary.txt (each step's exit code and seconds). Commit RESULTS_DIR
# and the "## bench_speed on GPU" section bench_speed writes into benchmarks/README.md (a copy is put in RESULTS_DIR)
# together, with the device named (environment.txt).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS="${1:-benchmarks/results/gpu}"
DRY="${GPU_SH_DRY_RUN:-0}"
PYTHON="${PYTHON:-python}"
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
: >"$SUMMARY"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
START=$(date +%s)

# step NAME SECONDS COMMAND...: run under a time limit (SIGINT first, SIGKILL 5 s later), log to RESULTS/NAME.log
step() {
    local name=$1 limit=$2 begin rc
    shift 2
    begin=$(date +%s)
    echo "== $name (limit ${limit} s): $*" | tee -a "$SUMMARY"
    timeout --signal=INT --kill-after=5 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    rc=$?
    echo "   $name: exit $rc after $(($(date +%s) - begin)) s$([ "$rc" -eq 124 ] && echo ' (TIMED OUT)')" | tee -a "$SUMMARY"
    tail -n 3 "$RESULTS/$name.log" | sed 's/^/   | /'
    return 0 # a failed step must not stop the others: summary.txt has every exit code
}

if [ "$DRY" = 1 ]; then
    TINY="$RESULTS/tiny_llama"
    "$PYTHON" - "$TINY" <<'EOF'
import sys
sys.path.insert(0, "tests")
import tiny
tiny.causal_lm("llama").save_pretrained(sys.argv[1])
EOF
    SPEED_ARGS=(--model "$TINY" --prompt-lengths 3 --batch-sizes 1 2 --seq-lengths 6 --rounds 2 --min-rounds 1
        --new-tokens 2 --mixed-adapters 3 --system-tokens 8 --system-batch-sizes 2 --user-tokens 6 --slot-tokens 3 --threads 1)
    QUALITY_ARGS=(--device cpu --threads 1 --task supersense --seeds 0) # the CPU quick run of both tasks takes ~3 min
    NPROC=1
    DDP=(torchrun --standalone --nproc_per_node 1) # accelerate's MULTI_GPU config needs GPUs
    EXAMPLE_ARGS=(--cpu --model tiny --max-steps 2 --batch-size 2 --n-train 16 --n-eval 8 --eval-steps 2 --decode-every 2)
    PROFILE_ARGS=(--model "$TINY" --threads 1 --profile train:lora,ours_shared,ours_concat:3:2:6)
else
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "no CUDA device visible to torch: nothing to run (GPU_SH_DRY_RUN=1 runs the CPU dry run)" | tee -a "$SUMMARY"
        exit 2
    fi
    SPEED_ARGS=(--device cuda --dtype bf16 --prompt-lengths 20 --batch-sizes 1 8 --seq-lengths 64 256 --rounds 5
        --min-rounds 5 --max-group-seconds 0)
    QUALITY_ARGS=(--device cuda)
    NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    DDP=(accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes "$NPROC")
    EXAMPLE_ARGS=(--model smollm2 --bf16 --max-steps 30 --eval-steps 15 --decode-every 15 --n-train 512 --n-eval 64)
    PROFILE_ARGS=(--device cuda --dtype bf16 --profile train:lora,ours_shared,ours_concat:20:8:256)
fi

{
    echo "date: $(date -u '+%F %T UTC'); host: $(hostname); dry run: $DRY; processes for DDP: $NPROC"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PYTHON" -c "
import torch, transformers, peft, accelerate
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__,
      'peft', peft.__version__, 'accelerate', accelerate.__version__)
print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
} >"$RESULTS/environment.txt" 2>&1
cat "$RESULTS/environment.txt"

# the bundled model is converted from its GGUF once per machine (~30 s); do it before the timed steps
[ "$DRY" = 1 ] || step prepare_model 50 "$PYTHON" -c \
    "from peft_softprompt_ext.app.bundled import smollm2_path; print(smollm2_path())"

step bench_speed 140 "$PYTHON" benchmarks/bench_speed.py "${SPEED_ARGS[@]}" \
    --methods bare lora peft_pt ours_shared ours_concat --out-dir "$RESULTS" --name speed_gpu
step bench_quality 115 "$PYTHON" benchmarks/bench_quality.py --quick "${QUALITY_ARGS[@]}" \
    --out-dir "$RESULTS" --name quality_gpu
step ddp_example 100 "${DDP[@]}" examples/train_causal_lm.py --output-dir "$RESULTS/ddp" "${EXAMPLE_ARGS[@]}"
step profile 45 "$PYTHON" benchmarks/bench_speed.py "${PROFILE_ARGS[@]}" --out-dir "$RESULTS"

cp benchmarks/README.md "$RESULTS/README.md" 2>/dev/null || true
echo "total $(($(date +%s) - START)) s; results in $RESULTS" | tee -a "$SUMMARY"
! grep -q "exit [1-9]" "$SUMMARY"
