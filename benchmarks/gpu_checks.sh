#!/usr/bin/env bash
# Every GPU check the issues ask for, in one run that fits a 15-minute lease (about 8 minutes expected on
# an H100/H200). Results land in $OUT (or ./gpu-results) as three files (the device tool brings back at
# most 8): gpu.txt, checks.log (every check's output) and summaries.txt (one line per training run).
#
# Prepare on the development machine (the data must travel with the checkout):
#     mkdir -p .gpu && cp ../shared/data/cifar10-jpeg.tar.gz .gpu/      # .gpu/ is git-ignored
# Then, on the lent machine, from the repository root (carry .gpu):
#     bash benchmarks/gpu_checks.sh
# Copy the figures into BENCHMARKS.md with the card's name, the date and these commands.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT" /tmp/cifar10
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
tar xzf .gpu/cifar10-jpeg.tar.gz -C /tmp/cifar10

run() {  # name, command...: appended to $OUT/checks.log; one failing check does not stop the others
    local name=$1; shift
    echo "== $name: $*" | tee -a "$OUT/checks.log"
    timeout 300 "$@" 2>&1 | grep -v "it/s]" >> "$OUT/checks.log"; echo "== $name exit ${PIPESTATUS[0]}" | tee -a "$OUT/checks.log"
}

# issue 2: the full 10-epoch ViT run (target >= 75% in <= 20 s of training, compile included)
run vit10 python vit_scratch.py --epochs 10 --data-dir /tmp/cifar10 --compile --no-progress --no-plots --out-dir runs/gpu/vit10
run vit_bench python benchmarks/bench_vit_step.py --data-dir /tmp/cifar10 --device cuda --batch-size 256 --steps 100 --compile
# issue 3: the CNN over 3 seeds (target >= 90% in <= 10 s)
for seed in 0 1 2; do
    run cnn10_seed$seed python cnn_baseline.py --epochs 10 --data-dir /tmp/cifar10 --tta --compile --seed $seed \
        --no-progress --no-plots --out-dir runs/gpu/cnn10-seed$seed
done
# issue 4: preprocessing + encoding, full-size ViT-B/32 with random weights
run clip_bench python benchmarks/bench_clip_encode.py --arch base --device cuda --images 10000 --batch-size 500
# issue 5: LoRA against full fine-tuning at batch 32, 224 px
run lora_bench python benchmarks/bench_lora_vs_full.py --device cuda --batch-size 32 --steps 20
echo "run test_acc train_seconds images_per_second peak_memory_mb" > "$OUT/summaries.txt"
for f in runs/gpu/*/summary.json; do
    python -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[1], s['test_acc'], round(s['train_seconds'],1), round(s['images_per_second']), round(s['peak_memory_mb']))" "$f"
done | tee -a "$OUT/summaries.txt"
