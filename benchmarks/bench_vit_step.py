"""Training-step throughput: vit_scratch.py's loop against the study guide's plain recipe, in one run.

guide:  the guide's model (nn.MultiheadAttention, sequence-first) fed by a DataLoader of PIL images
        through torchvision transforms (RandomCrop, flip, ToTensor, Normalize), AdamW, fp16 + GradScaler
        on CUDA, gradient clipping.
eager:  vit_scratch.VisionTransformer (fused attention) fed by common.TensorLoader (data and augmentation
        on the device), the script's own optimizers (--optimizer), bf16 autocast, its train_one_epoch,
        each step launched from Python.
graph:  the same step captured once as a CUDA graph and replayed (CUDA only; the script's default).
compiled graph (--compile): each block compiled by torch.compile, then captured (compilation is timed apart).

Every variant trains the same architecture at the same batch size; images/s is measured after warm-up.

    python benchmarks/bench_vit_step.py --data-dir /tmp/cifar10 --device cuda --batch-size 256 --steps 100 --compile
    python benchmarks/bench_vit_step.py --device cpu --batch-size 64 --steps 8     # tiny shipped set, CPU
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import vit_scratch  # noqa: E402
from common import TensorLoader, load_cifar10  # noqa: E402
from guide_vit import GuideVisionTransformer, train_transform  # noqa: E402


class PILDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 dataset does: a uint8 array, one PIL image per __getitem__."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images.permute(0, 2, 3, 1).numpy(), labels.tolist(), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_guide(images, labels, args, device):
    """The guide's loop as written there."""
    model = GuideVisionTransformer().to(device)
    loader = torch.utils.data.DataLoader(PILDataset(images, labels, train_transform()), batch_size=args.batch_size,
                                         shuffle=True, drop_last=True, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    criterion = nn.CrossEntropyLoss()
    model.train()
    done, t0 = 0, None
    while done < args.warmup + args.steps:
        for x, y in loader:
            if done == args.warmup:
                sync(device)
                t0 = time.perf_counter()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = criterion(model(x), y)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            done += 1
            if done == args.warmup + args.steps:
                break
    sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def bench_ours(images, labels, args, device, capture, compile_blocks=False):
    """images/s of vit_scratch.py's own step (eager or captured), and the seconds its set-up took (capture,
    compilation)."""
    torch.manual_seed(0)
    model = vit_scratch.VisionTransformer(dropout=0.0, init_std=0.02).to(device)
    recipe = argparse.Namespace(
        optimizer=args.optimizer, lr=1e-3, muon_lr=0.01, muon_momentum=0.95, weight_decay=0.05, label_smoothing=0.1,
        grad_clip=1.0, ema=0.0
    )
    optimizers = vit_scratch.make_optimizers(model, recipe, device, capture)
    compiled = list(model.blocks) if compile_blocks else []
    for block in compiled:
        block.forward = torch.compile(block.forward)
    loader = TensorLoader(images, labels, args.batch_size, device, train=True)
    amp_dtype = vit_scratch.amp_dtype_for(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    stats = torch.zeros(2, device=device)
    sync(device)
    t0 = time.perf_counter()
    step = vit_scratch.make_step(model, optimizers, scaler, amp_dtype, recipe, stats, loader, capture, compiled)

    def run(steps, done=0):  # the script's loop, less its logging: the same step per batch
        while done < steps:
            model.train()
            for x, y in loader:
                step(x, y)
                done += 1
                if done >= steps:
                    break
        stats.tolist()  # the script reads its statistics back once an epoch
        return done

    done = run(args.warmup)  # includes compilation when compiled and not captured
    sync(device)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(args.warmup + args.steps, done)
    sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - t0), setup


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data-dir", default=str(ROOT / "tests" / "data" / "cifar10-tiny"), help="CIFAR-10 tree or torchvision folder"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator, workers)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers for the guide")
    p.add_argument("--compile", action="store_true", help="also time the compiled, captured step (CUDA)")
    p.add_argument("--optimizer", default="muon", choices=["muon", "adamw"], help="vit_scratch's optimizer set-up")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    data = load_cifar10(args.data_dir, download=False)
    images, labels = data.train_x, data.train_y
    repeat = -(-args.batch_size * 4 // len(labels))  # a small set is repeated so that epochs are not tiny
    images, labels = images.repeat(repeat, 1, 1, 1), labels.repeat(repeat)
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )
    print(f"device {name} | torch {torch.__version__} | batch {args.batch_size} | {args.steps} timed steps "
          f"after {args.warmup}")
    results = {"guide": bench_guide(images, labels, args, device)}
    print(f"guide  (nn.MultiheadAttention + PIL DataLoader): {results['guide']:10,.0f} img/s")
    variants = [("eager", False, False)] + ([("graph", True, False)] if device.type == "cuda" else [])
    if args.compile and device.type == "cuda":
        variants.append(("compiled graph", True, True))
    for label, capture, compile_blocks in variants:
        results[label], setup = bench_ours(images, labels, args, device, capture, compile_blocks)
        print(
            f"{label:<15} ({args.optimizer}, on-device data): {results[label]:10,.0f} img/s  "
            f"{results[label] / results['guide']:5.2f}x the guide | set-up {setup:.1f}s",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
