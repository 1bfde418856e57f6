#!/usr/bin/env bash
# Every GPU check of the open issues in one run sized for a 15-minute lease: about 7 minutes of checks on one
# H100, in order of importance: the GPU tests, then issue 23 (the headline ViT command: whole process, start-up
# breakdown, the sweep's candidates, compilation cold and warm; CLIP's captured fine-tuning; the captioner's host
# cache), then issue 24 (full fine-tuning, a composed captioner), then re-measurements (seeds, the CNN, the step).
# A check that would start after $BUDGET seconds is skipped and says so.
# Results land in $OUT (or ./gpu-results): results.md (the tables), checks.log (every check's output),
# gpu.txt (card, driver, versions). The device tool brings back at most 8 files.
#
# Prepare on the development machine (the data must travel with the checkout):
#     mkdir -p .gpu && cp ../shared/data/cifar10-jpeg.tar.gz .gpu/      # .gpu/ is git-ignored
# Then, on the lent machine, from the repository root (carry .gpu):
#     bash benchmarks/gpu_checks.sh
# Copy the figures into BENCHMARKS.md and the README with the card's name, the date and these commands.
set -uo pipefail
OUT=${OUT:-gpu-results}
BUDGET=${BUDGET:-420}
mkdir -p "$OUT" /tmp/cifar10 runs/gpu
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
LOG="$OUT/checks.log"
RESULTS="$OUT/results.md"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
  date -u +%Y-%m-%dT%H:%MZ; } 2>&1 | tee "$OUT/gpu.txt"
tar xzf .gpu/cifar10-jpeg.tar.gz -C /tmp/cifar10
START=$SECONDS

check() {  # name, seconds allowed, command...: output to checks.log; one failing check does not stop the others
    local name=$1 limit=$2 left; shift 2
    left=$((BUDGET - (SECONDS - START)))
    if (( left < 15 )); then echo "== $name: skipped, budget spent" | tee -a "$LOG" "$RESULTS"; return; fi
    (( limit > left )) && limit=$left
    echo "== $name (at $((SECONDS - START))s, limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
}

summary() {  # a run folder -> one table row
    python -c "import json,sys; s=json.load(open(sys.argv[1]+'/summary.json')); print(f\"| {sys.argv[2]} | {s['test_acc']:.2%} | {s['train_seconds']:.1f} | {s['images_per_second']:,.0f} | {s['peak_memory_mb']:,.0f} |\")" "$1" "$2" 2>/dev/null \
        || echo "| $2 | failed, see checks.log | | | |"
}

# the captured steps against the eager steps (tests/test_gpu.py; CI has no GPU and skips it)
check gpu_tests 90 python -m pytest -q -p no:cacheprovider tests/test_gpu.py
{ echo "## tests/test_gpu.py"; grep -E "passed|failed|error" "$LOG" | tail -1; } >> "$RESULTS"

# decode CIFAR-10 once (the scripts cache it beside the data): the targets are for a warm cache
check decode 60 python -c "import common; common.load_cifar10('/tmp/cifar10', download=False)"

# 1. issue 23: the main command as a user runs it (whole process timed), and where its time goes
check vit_default 60 bash -c "s=\$SECONDS; python vit_scratch.py --epochs 10 --data-dir /tmp/cifar10 --no-progress --out-dir runs/gpu/vit-default; echo \"whole process \$((SECONDS - s)) s\""
{ echo; echo "## vit_scratch.py --epochs 10 (defaults), whole process"; echo "| run | test acc | train s | img/s | peak MB |"; echo "|---|---:|---:|---:|---:|"
  summary runs/gpu/vit-default "fast, seed 0"; grep "whole process" "$LOG" | tail -1; } >> "$RESULTS"
check startup 45 python benchmarks/bench_startup.py --data-dir /tmp/cifar10 --epochs 10
{ echo; echo "## where vit_scratch.py --epochs 10 spends its time (benchmarks/bench_startup.py)"
  sed -n '/^| phase/,/whole process/p' "$LOG" | tail -12; } >> "$RESULTS"
# 2. issue 23: the sweep's candidates, one seed each, in sweep_vit.py's order (as many as fit)
check sweep_more 160 python benchmarks/sweep_vit.py --data-dir /tmp/cifar10 --deadline 145 --out "$OUT/sweep_more.md" \
    --only issue23
{ echo; echo "## sweep: issue 23's candidates, one seed each"; cat "$OUT/sweep_more.md" 2>/dev/null; } >> "$RESULTS"
# 3. issue 23: compilation (regional, then captured), cold caches, then warm (a second process)
check compile_cold 60 python vit_scratch.py --epochs 10 --data-dir /tmp/cifar10 --compile --no-progress --no-plots --out-dir runs/gpu/vit-compile-cold
check compile_warm 45 python vit_scratch.py --epochs 10 --data-dir /tmp/cifar10 --compile --no-progress --no-plots --out-dir runs/gpu/vit-compile-warm
{ echo; echo "## --compile (regional, captured)"; echo "| run | test acc | train s | img/s | peak MB |"; echo "|---|---:|---:|---:|---:|"
  summary runs/gpu/vit-compile-cold "compile, cold caches"; summary runs/gpu/vit-compile-warm "compile, warm caches"; } >> "$RESULTS"
# 4. issue 23: CLIP's captured fine-tuning, full and LoRA (ViT-B/32 tower, random weights): LoRA >= 1.3x full
check clip_bench 45 python benchmarks/bench_clip_finetune.py --arch base --device cuda
{ echo; echo "## bench_clip_finetune.py"; grep -A12 "^| mode" "$LOG" | head -14; } >> "$RESULTS"
# 5. issue 23: the captioner's step with the encoder cache on the GPU and in host memory (<= 1.3x), and full
# fine-tuning, full-size ViT-GPT2 with random weights, batch 32
check lora_bench 90 python benchmarks/bench_lora_vs_full.py --device cuda --batch-size 32 --steps 20 --deadline 80 \
    --variants lora+cache+bf16+graph lora+host+bf16+graph full lora+host+bf16 lora+cache+bf16
{ echo; echo "## bench_lora_vs_full.py"; sed -n '/^| variant/,$p' "$LOG" | head -30; } >> "$RESULTS"
# the real LoRA loop on the GPU (encoder cache, bf16 frozen weights) with a tiny random captioner
check lora_smoke 75 bash -c "python -c \"import sys; sys.path.insert(0, 'tests'); from pathlib import Path; \
from conftest import build_tiny_captioner as b; b(Path('/tmp/tiny-cap'))\" && python lora_caption.py --model /tmp/tiny-cap \
--data-dir tests/data/captions-tiny --device cuda --max-steps 30 --batch-size 10 --eval-every 10 --no-plots \
--no-progress --out-dir runs/gpu/lora-smoke"
{ echo; echo "## lora_caption.py on the GPU (tiny captioner)"; grep -E "encoder output|capture|pairs/s|BLEU" "$LOG" | tail -4; } >> "$RESULTS"
# issue 24: --finetune full (eager: the encoder trains), with --freeze-encoder (cached, captured), and a captioner
# composed from a tiny ViT + GPT-2 (LoRA + the new cross-attention in full; cached, captured)
check lora_full_composed 90 bash -c "python -c \"import sys; sys.path.insert(0, 'tests'); from pathlib import Path; \
from conftest import build_tiny_parts as b, build_tiny_captioner as c; b(Path('/tmp/tiny-parts')); \
c(Path('/tmp/tiny-cap'))\" && for run in 'full=--model /tmp/tiny-cap --finetune full' \
'full-frozen=--model /tmp/tiny-cap --finetune full --freeze-encoder' \
'composed=--encoder /tmp/tiny-parts/encoder --decoder /tmp/tiny-parts/decoder'; do echo \"run \${run%%=*}\"; \
python lora_caption.py \${run#*=} --data-dir tests/data/captions-tiny --device cuda --max-steps 30 --batch-size 10 \
--eval-every 10 --no-plots --no-progress --out-dir runs/gpu/lora-\${run%%=*}; done"
{ echo; echo "## lora_caption.py --finetune full, --freeze-encoder, composed (tiny)"
  grep -E "^run |step: eager|captured|pairs/s" "$LOG" | tail -9; } >> "$RESULTS"

# 6. re-measurements: the default's other seeds, the guide's recipe, the CNN; the step against the guide's loop
check sweep_main 170 python benchmarks/sweep_vit.py --data-dir /tmp/cifar10 --deadline 140 --out "$OUT/sweep_main.md" \
    --recipe "fast s1=--seed 1" --recipe "fast s2=--seed 2" --recipe "guide=--recipe guide" \
    --recipe "cnn:default s0=--seed 0" --recipe "cnn:default s1=--seed 1" --recipe "cnn:default s2=--seed 2"
{ echo; echo "## sweep: default seeds, the guide's recipe, the CNN"; cat "$OUT/sweep_main.md" 2>/dev/null; } >> "$RESULTS"

check step_bench 60 python benchmarks/bench_vit_step.py --data-dir /tmp/cifar10 --device cuda --batch-size 256 --steps 100
{ echo; echo "## bench_vit_step.py"; grep -E "^(device|guide|eager|graph)" "$LOG" | tail -4; } >> "$RESULTS"

echo "checks done after $((SECONDS - START))s" | tee -a "$LOG"
cat "$RESULTS"
