"""Training-step throughput: vit_scratch.py's loop against the study guide's plain recipe, in one run.

guide: the guide's model (nn.MultiheadAttention, sequence-first) fed by a DataLoader of PIL images
       through torchvision transforms (RandomCrop, flip, ToTensor, Normalize), AdamW, fp16 + GradScaler
       on CUDA, gradient clipping.
ours:  vit_scratch.VisionTransformer (fused attention) fed by common.TensorLoader (data and augmentation
       on the device), fused AdamW on CUDA, bf16 autocast, the script's own train_one_epoch;
       --compile adds torch.compile.

Both train the same architecture at the same batch size; images/s is measured after warm-up steps.

    python benchmarks/bench_vit_step.py --data-dir /tmp/cifar10 --device cuda --batch-size 256 --compile
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
from common import TensorLoader, load_cifar10, progress_bar, train_transform  # noqa: E402
from guide_vit import GuideVisionTransformer  # noqa: E402


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


def bench_ours(images, labels, args, device):
    model = vit_scratch.VisionTransformer().to(device)
    trained = torch.compile(model, mode=args.compile_mode) if args.compile else model
    loader = TensorLoader(images, labels, args.batch_size, device, train=True)
    optimizer = vit_scratch.make_optimizer(model, 1e-3, 0.05, device)
    schedule = vit_scratch.make_schedule(optimizer, 10, 10_000)
    amp_dtype = vit_scratch.amp_dtype_for(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    bar = progress_bar(0, "", disable=True)

    def run(steps, step=0):
        while steps > step:
            step = vit_scratch.train_one_epoch(trained, loader, optimizer, schedule, scaler, criterion, amp_dtype,
                                               1.0, steps, step, bar)[3]
        return step

    step = run(args.warmup)  # includes compilation when --compile
    sync(device)
    t0 = time.perf_counter()
    run(args.warmup + args.steps, step)
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(ROOT / "tests" / "data" / "cifar10-tiny"), help="CIFAR-10 tree or torchvision folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator, workers)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers for the guide")
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    data = load_cifar10(args.data_dir, download=False)
    images, labels = data.train_x, data.train_y
    repeat = -(-args.batch_size * 4 // len(labels))  # a small set is repeated so that epochs are not tiny
    images, labels = images.repeat(repeat, 1, 1, 1), labels.repeat(repeat)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"device {name} | torch {torch.__version__} | batch {args.batch_size} | {args.steps} timed steps after {args.warmup}")
    guide = bench_guide(images, labels, args, device)
    print(f"guide  (nn.MultiheadAttention + PIL DataLoader): {guide:10,.0f} img/s")
    ours = bench_ours(images, labels, args, device)
    print(f"ours   (fused attention + on-device data{', compiled' if args.compile else ''}): {ours:10,.0f} img/s")
    print(f"ratio ours/guide: {ours / guide:.2f}x")
    return {"guide": guide, "ours": ours, "ratio": ours / guide}


if __name__ == "__main__":
    main()
