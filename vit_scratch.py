"""A Vision Transformer trained from scratch on CIFAR-10: the study guide's model and loop, made fast.

Reproduces the guide's ViT (patch 4 -> 64 tokens + CLS, learnable positions, pre-LN blocks, GELU MLP,
embed 256, MLP 512, 8 heads, 6 layers, dropout 0.1; 3,195,146 parameters) trained with AdamW, linear
warm-up + cosine decay, RandomCrop(32, pad 4) + flip, mixed precision and gradient clipping at 1.0.
The data and its augmentation live on the training device (common.TensorLoader), so the loop is never
input-bound, and attention runs through PyTorch's fused scaled_dot_product_attention.

    python vit_scratch.py --epochs 10                           # downloads CIFAR-10 to ./data
    python vit_scratch.py --epochs 10 --data-dir /tmp/cifar10   # ImageFolder tree or torchvision folder
    python vit_scratch.py --epochs 10 --compile                 # GPU: fewer, larger kernel launches
    python vit_scratch.py --epochs 1 --limit-train 5000 --limit-test 1000 --device cpu   # CPU smoke run
    python vit_scratch.py --resume runs/vit_scratch/<run>/last.pt                       # continue a run
    python vit_scratch.py --show-attention runs/vit_scratch/<run>/best.pt               # attention.png only
    torchrun --standalone --nproc_per_node=4 vit_scratch.py --epochs 10 --batch-size 64 # 4 GPUs, global batch 256

Measured: the CPU smoke run above reaches 23.2% test accuracy (chance 10%) in 61 s on a 2-core x86 CPU
(CIFAR-10 JPEG copy). The GPU target, at least 75% in 20 s of training for --epochs 10 --compile, is not
measured yet; BENCHMARKS.md holds every figure with its hardware and command.
Outputs go to --out-dir: config.json, metrics.jsonl, summary.json, last.pt, best.pt and the pictures
attention.png, curves.png, confusion.png (charts need matplotlib). Needs common.py.
"""
import argparse
import math
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (DataError, NonFiniteLoss, TensorLoader, all_reduce_sum, append_jsonl, confusion_matrix,
                    gather_shards, img_to_patch, init_distributed, load_checkpoint, load_cifar10, load_weights,
                    normalize, peak_memory_mb, per_class_accuracy, plot_confusion, plot_curves, prepare_out_dir,
                    progress_bar, read_jsonl, restore_rng, rng_state, save_checkpoint, set_global_batch,
                    stops_cleanly, stratified_subset, trim_metrics, wrap_distributed, write_json)

SCRIPT = "vit_scratch"
# Flags that describe the machine rather than the experiment: on --resume they come from the command
# line, everything else from the checkpoint.
RUNTIME_FLAGS = ("device", "no_progress", "no_plots", "compile", "compile_mode", "data_dir", "no_download", "resume",
                 "show_attention")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data
    a("--data-dir", default="./data", help="ImageFolder tree (train/<class>/*, test/<class>/*) or torchvision's CIFAR-10 folder")
    a("--no-download", action="store_true", help="never try to download CIFAR-10; fail if --data-dir has none")
    a("--limit-train", type=int, default=None, help="use a class-stratified subset of N training images")
    a("--limit-test", type=int, default=None, help="use a class-stratified subset of N test images")
    # model (the guide's table)
    a("--image-size", type=int, default=32, help="input height = width in pixels")
    a("--patch-size", type=int, default=4, help="patch side in pixels; must divide --image-size")
    a("--embed-dim", type=int, default=256, help="token width; must be divisible by --num-heads")
    a("--hidden-dim", type=int, default=512, help="MLP hidden width")
    a("--num-heads", type=int, default=8, help="attention heads")
    a("--num-layers", type=int, default=6, help="transformer blocks")
    a("--dropout", type=float, default=0.1, help="dropout after the embedding and inside each MLP, in [0, 1)")
    # optimisation
    a("--epochs", type=int, default=10, help="passes over the training set")
    a("--batch-size", type=int, default=256, help="images per step and process (under torchrun the global batch is this x processes)")
    a("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    a("--weight-decay", type=float, default=0.05, help="AdamW decoupled weight decay (not on norms, biases, CLS, positions)")
    a("--warmup", type=float, default=0.1, help="linear warm-up, as a fraction of all steps; cosine decay to 0 after")
    a("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing in [0, 1)")
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (0 = off)")
    a("--tta", action="store_true", help="evaluate with flip test-time augmentation (mean of image and mirror logits)")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps (smoke runs)")
    # machine
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to train; auto picks cuda, then mps, then cpu")
    a("--compile", action="store_true", help="torch.compile the model (GPU: fewer kernel launches; the first steps compile)")
    a("--compile-mode", default="max-autotune-no-cudagraphs", help="torch.compile mode, e.g. default, reduce-overhead, max-autotune")
    a("--seed", type=int, default=0, help="seeds initialisation, subsets, shuffling, augmentation and dropout")
    a("--out-dir", default=None, help="where results go (default runs/vit_scratch/<timestamp>)")
    a("--resume", default=None, help="continue from a last.pt; the experiment's flags come from the checkpoint")
    a("--no-progress", action="store_true", help="no tqdm bars (they are off anyway when stderr is not a terminal)")
    a("--no-plots", action="store_true", help="no pictures (attention.png, curves.png, confusion.png)")
    a("--show-attention", metavar="CHECKPOINT", default=None,
      help="only draw attention.png for a saved checkpoint (into --out-dir, default beside it), then exit")
    p.error = fail  # one line, not the usage block
    return p.parse_args(argv)


def fail(msg):
    """One line on stderr and exit status 2: the way every bad input ends, before any work is done."""
    print(f"{SCRIPT}.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check_args(args):
    for flag in ("epochs", "batch_size", "image_size", "patch_size", "embed_dim", "hidden_dim", "num_heads", "num_layers"):
        if getattr(args, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.lr <= 0:
        fail(f"--lr must be positive, got {args.lr}")
    if args.image_size % args.patch_size:
        fail(f"--image-size {args.image_size} is not divisible by --patch-size {args.patch_size}")
    if args.embed_dim % args.num_heads:
        fail(f"--embed-dim {args.embed_dim} is not divisible by --num-heads {args.num_heads}")
    for flag in ("dropout", "label_smoothing", "warmup"):
        if not 0 <= getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be in [0, 1), got {getattr(args, flag)}")
    for flag in ("limit_train", "limit_test", "max_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.weight_decay < 0 or args.grad_clip < 0:
        fail("--weight-decay and --grad-clip must be >= 0")


# ----------------------------------------------------------------------------------------------------
# Model

def attention_probs(q, k):
    """The plain math: softmax(Q K^T / sqrt(d)). (B, h, T, d) x 2 -> (B, h, T, T)."""
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention with the same weights layout as nn.MultiheadAttention (q, k, v stacked)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.fused = True  # False: the readable math path, kept for tests

    def qkv(self, x):
        B, T, D = x.shape
        return self.to_qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, d)

    def probs(self, x):
        """The attention weights (B, h, T, T), which the fused kernel never materialises: for pictures."""
        q, k, _ = self.qkv(x)
        return attention_probs(q, k)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v)  # the same softmax(QK^T/sqrt(d)) V, one kernel
        else:
            out = attention_probs(q, k) @ v
        return self.to_out(out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, hidden_dim, num_heads, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, *, image_size=32, patch_size=4, num_channels=3, num_classes=10, embed_dim=256,
                 hidden_dim=512, num_heads=8, num_layers=6, dropout=0.1):
        super().__init__()
        assert image_size % patch_size == 0, "image size must be divisible by the patch size"
        assert embed_dim % num_heads == 0, "embed dim must be divisible by the number of heads"
        num_patches = (image_size // patch_size) ** 2
        self.patch_size = patch_size
        self.to_patch_embedding = nn.Linear(num_channels * patch_size ** 2, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))  # the guide's initialisation
        self.pos_embedding = nn.Parameter(torch.randn(1, 1 + num_patches, embed_dim))
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(embed_dim, hidden_dim, num_heads, dropout) for _ in range(num_layers)])
        self.mlp_head = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, num_classes))

    def embed(self, x):
        x = self.to_patch_embedding(img_to_patch(x, self.patch_size))  # (B, T, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.pos_embedding  # (B, T+1, D)

    def forward_features(self, x):
        return self.blocks(self.dropout(self.embed(x)))

    def forward(self, x):
        return self.mlp_head(self.forward_features(x)[:, 0])  # classify from the CLS token


MODEL_FLAGS = ("image_size", "patch_size", "embed_dim", "hidden_dim", "num_heads", "num_layers", "dropout")


def model_config(args, num_classes):
    return {**{k: getattr(args, k) for k in MODEL_FLAGS}, "num_classes": num_classes}


# ----------------------------------------------------------------------------------------------------
# Attention maps: computed only for pictures, never during training

@torch.no_grad()
def attention_maps(model, x):
    """Per layer, the attention weights (B, h, T, T) for images x, recomputed with the plain softmax
    (the fused kernel used in training does not return them)."""
    model.eval()
    tokens, maps = model.embed(x), []
    for block in model.blocks:
        maps.append(block.attn.probs(block.norm1(tokens)))
        tokens = block(tokens)
    return maps


def attention_rollout(maps):
    """Attention rollout (Abnar & Zuidema, 2020): per layer the head-mean, mixed half-and-half with the
    identity for the residual path, rows renormalised, multiplied through the layers. (B, T, T)."""
    rollout = None
    for probs in maps:
        a = probs.mean(1)  # (B, T, T)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def fixed_examples(labels, per_class=2):
    """Indices of the first `per_class` images of each class: the same pictures every run."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in labels.unique()])


def cls_heatmaps(model, images, patch_size):
    """(B, 1 + layers + 1, g, g) in [0, 1]: the CLS token's attention to the patches for each layer
    (mean over heads) and for the rollout. Each map is scaled to its own maximum."""
    maps = attention_maps(model, images)
    rows = [m.mean(1)[:, 0, 1:] for m in maps] + [attention_rollout(maps)[:, 0, 1:]]  # (B, T-1) each
    grid = images.shape[-1] // patch_size
    heat = torch.stack(rows, 1).view(len(images), len(rows), grid, grid)
    return heat / heat.amax((-1, -2), keepdim=True).clamp(min=1e-12)


def save_attention_grid(model, images, labels, classes, path, cell=96):
    """One PNG: a row per image, columns = image, CLS attention per layer, rollout."""
    from common import draw_grid, heat_overlay
    images = images.to(next(model.parameters()).device)
    heat = cls_heatmaps(model, normalize(images), model.patch_size).cpu()
    images = images.cpu()
    cells = [[images[i]] + [heat_overlay(images[i], h, cell) for h in heat[i]] for i in range(len(images))]
    header = ["image"] + [f"layer {l + 1}" for l in range(heat.shape[1] - 1)] + ["rollout"]
    draw_grid(cells, header, [classes[int(y)] for y in labels], cell).save(path)
    return path


# ----------------------------------------------------------------------------------------------------
# Device, precision, optimiser, schedule

def pick_device(name, local_rank=0):
    """The device to train on; under torchrun, this process's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but PyTorch sees no CUDA GPU (use --device cpu or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        fail("--device mps, but this PyTorch has no MPS backend (use --device cpu or auto)")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def amp_dtype_for(device):
    """bf16 autocast where the GPU supports it, else fp16 (with a GradScaler); fp32 on CPU and MPS."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def make_optimizer(model, lr, weight_decay, device):
    """AdamW; no decay on norms, biases, the CLS token and the position embedding."""
    no_decay_names = {"cls_token", "pos_embedding"}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and name not in no_decay_names else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


def lr_factor(step, warmup_steps, total_steps):
    """Linear warm-up to 1, then cosine to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_schedule(optimizer, warmup_steps, total_steps):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps))


# ----------------------------------------------------------------------------------------------------
# Training and evaluation

def train_one_epoch(model, loader, optimizer, schedule, scaler, criterion, amp_dtype, grad_clip, max_steps, step, bar):
    """One pass; returns (mean loss, accuracy, images seen, global step). Statistics stay on the device
    and are read every 20 steps (a host sync: progress and the non-finite check) and at the end."""
    model.train()
    device = loader.device
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long), 0
    t0 = time.perf_counter()
    for x, y in loader:
        with autocast(device, amp_dtype):
            logits = model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        loss_sum += loss.detach().float() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen, step = seen + len(y), step + 1
        bar.update(1)
        if step % 20 == 0:
            check_progress(bar, loss_sum.item() / seen, correct.item() / seen, seen / (time.perf_counter() - t0), schedule, step)
        if max_steps and step >= max_steps:
            break
    seen *= loader.world_size  # the epoch's statistics over all processes
    loss_sum, correct = all_reduce_sum(loss_sum, loader.world_size), all_reduce_sum(correct, loader.world_size)
    loss, acc = loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)
    check_progress(bar, loss, acc, seen / (time.perf_counter() - t0), schedule, step)
    return loss, acc, seen, step


def check_progress(bar, loss, acc, images_per_second, schedule, step):
    lr = schedule.get_last_lr()[0]
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"the training loss became {loss} by step {step} (lr {lr:.2e})")
    if not bar.disable:
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", img_s=f"{images_per_second:,.0f}", lr=f"{lr:.2e}")


@torch.no_grad()
def evaluate(model, loader, amp_dtype, tta=False):
    """(predictions, mean cross-entropy) over the whole test set, in order; under torchrun each process
    evaluates its shard and the results are gathered, so every image counts exactly once."""
    model.eval()
    preds, loss_sum = [], torch.zeros((), device=loader.device)
    for x, y in loader:
        with autocast(loader.device, amp_dtype):
            logits = model(x).float()
            if tta:
                logits = (logits + model(x.flip(3)).float()) / 2
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        preds.append(logits.argmax(1))
    preds = gather_shards(torch.cat(preds), loader.total, loader.world_size)  # every process: the full set, in order
    return preds, all_reduce_sum(loss_sum, loader.world_size).item() / loader.total


# ----------------------------------------------------------------------------------------------------
# Resuming: the checkpoint (common.load_checkpoint) holds plain values and the flags of the run

def resumed_args(ckpt, cli_args):
    """The experiment as the checkpoint recorded it, with this machine's runtime flags."""
    args = argparse.Namespace(**ckpt["args"])
    for flag in RUNTIME_FLAGS:
        setattr(args, flag, getattr(cli_args, flag))
    args.out_dir = cli_args.out_dir if cli_args.show_attention and cli_args.out_dir else \
        str(Path(cli_args.resume or cli_args.show_attention).parent)
    return args


# ----------------------------------------------------------------------------------------------------
# The experiment

def load_data(args, log):
    try:
        data = load_cifar10(args.data_dir, download=not args.no_download, image_size=args.image_size, log=log)
        train_idx = stratified_subset(data.train_y, args.limit_train, seed=args.seed)
        test_idx = stratified_subset(data.test_y, args.limit_test, seed=args.seed)
    except DataError as e:
        fail(str(e))
    if len(train_idx) < args.global_batch:
        processes = f" x {args.world_size} processes" if args.world_size > 1 else ""
        fail(f"--batch-size {args.batch_size}{processes} is larger than the {len(train_idx)} training images")
    return data, train_idx, test_idx


def main(argv=None):
    cli = parse_args(argv)
    try:
        ckpt = load_checkpoint(cli.resume or cli.show_attention, SCRIPT) if cli.resume or cli.show_attention else None
    except DataError as e:
        fail(str(e))
    args = resumed_args(ckpt, cli) if ckpt else cli
    check_args(args)
    rank, world_size, local_rank = init_distributed(args.device)
    try:
        set_global_batch(args, world_size, resuming=ckpt is not None)
    except DataError as e:
        fail(str(e))
    device = pick_device(args.device, local_rank)
    if cli.show_attention:
        return show_attention(args, ckpt, device)
    out_dir = Path(args.out_dir or f"runs/{SCRIPT}/{datetime.now():%Y%m%d-%H%M%S}")
    try:
        prepare_out_dir(out_dir)
    except DataError as e:
        fail(str(e))
    data, train_idx, test_idx = load_data(args, print)

    torch.manual_seed(args.seed)
    model = VisionTransformer(**model_config(args, len(data.classes))).to(device)
    train_loader = TensorLoader(data.train_x[train_idx], data.train_y[train_idx], args.batch_size, device, train=True,
                                seed=args.seed, rank=rank, world_size=world_size)
    test_loader = TensorLoader(data.test_x[test_idx], data.test_y[test_idx], 1000, device, train=False, rank=rank,
                               world_size=world_size)
    total_steps = min(args.epochs * len(train_loader), args.max_steps or math.inf)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device)
    schedule = make_schedule(optimizer, int(args.warmup * total_steps), total_steps)
    amp_dtype = amp_dtype_for(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = {"epoch": 0, "step": 0, "best_acc": -1.0, "train_seconds": 0.0, "images_seen": 0}
    if ckpt:
        try:
            load_weights(model, ckpt, cli.resume, model_config(args, len(data.classes)))
        except DataError as e:
            fail(str(e))
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"], device)
        state = ckpt["state"]
        trim_metrics(out_dir / "metrics.jsonl", state["epoch"])
        print(f"resuming {cli.resume} after epoch {state['epoch']} (step {state['step']})")
    elif rank == 0:
        write_json(out_dir / "config.json", vars(args))
    run = dict(model=model, optimizer=optimizer, schedule=schedule, scaler=scaler, amp_dtype=amp_dtype,
               train_loader=train_loader, test_loader=test_loader, total_steps=total_steps, out_dir=out_dir,
               main_process=rank == 0, targets=data.test_y[test_idx].to(device))
    print(f"{SCRIPT}: {sum(p.numel() for p in model.parameters()):,} parameters | {device} "
          f"{amp_dtype or torch.float32} | train {len(train_idx):,} test {len(test_idx):,} images | "
          f"{len(train_loader)} steps/epoch x {args.epochs} epochs, batch {args.global_batch}"
          f"{f' ({world_size} processes x {args.batch_size})' if world_size > 1 else ''} | out {out_dir}")
    last = out_dir / "last.pt"
    saved = lambda: (f"the last checkpoint is {last} (epoch {state['epoch']})" if last.exists()
                     else "nothing was saved yet (the first checkpoint is written at the end of epoch 1)")
    with stops_cleanly(SCRIPT, last, saved):
        preds = fit(args, run, state)
    summary = write_summary(args, run, state, data, preds, run["targets"]) if rank == 0 else None
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return summary


def fit(args, run, state):
    """Epoch loop: train, evaluate, log, checkpoint. Returns the final test predictions."""
    model, device = run["model"], run["train_loader"].device
    trained = wrap_distributed(model, device, args.world_size)
    trained = torch.compile(trained, mode=args.compile_mode) if args.compile else trained
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    preds = None
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        if state["step"] >= run["total_steps"]:
            break
        run["train_loader"].set_epoch(epoch)
        # Dropout draws depend on (seed, epoch, process) only: a resumed run, on any number of processes,
        # continues exactly as one that never stopped.
        torch.manual_seed(args.seed * 1_000_003 + epoch * 1_009 + run["train_loader"].rank)
        with progress_bar(len(run["train_loader"]), f"epoch {epoch}/{args.epochs}",
                          args.no_progress or not run["main_process"]) as bar:
            t0 = time.perf_counter()
            loss, acc, seen, state["step"] = train_one_epoch(
                trained, run["train_loader"], run["optimizer"], run["schedule"], run["scaler"], criterion,
                run["amp_dtype"], args.grad_clip, run["total_steps"], state["step"], bar)
            seconds = time.perf_counter() - t0  # .item() above synchronised the device
        preds, test_loss = evaluate(trained, run["test_loader"], run["amp_dtype"], args.tta)
        test_acc = (preds == run["targets"]).float().mean().item()
        state.update(epoch=epoch, train_seconds=state["train_seconds"] + seconds, images_seen=state["images_seen"] + seen)
        row = {"epoch": epoch, "step": state["step"], "train_loss": loss, "train_acc": acc, "test_loss": test_loss,
               "test_acc": test_acc, "lr": run["schedule"].get_last_lr()[0], "epoch_seconds": seconds,
               "images_per_second": seen / seconds}
        if run["main_process"]:
            append_jsonl(run["out_dir"] / "metrics.jsonl", row)
        print(f"epoch {epoch:>3}/{args.epochs} | train loss {loss:.4f} acc {acc:.2%} | test loss {test_loss:.4f} "
              f"acc {test_acc:.2%} | lr {row['lr']:.2e} | {row['images_per_second']:,.0f} img/s | {seconds:.1f}s", flush=True)
        if run["main_process"]:
            save_epoch(args, run, state, test_acc)
    if preds is None:  # resumed a finished run: evaluate what it left
        preds, _ = evaluate(trained, run["test_loader"], run["amp_dtype"], args.tta)
    return preds


def save_epoch(args, run, state, test_acc):
    is_best = test_acc > state["best_acc"]
    state["best_acc"] = max(state["best_acc"], test_acc)
    ckpt = {"script": SCRIPT, "model_config": model_config(args, run["model"].mlp_head[-1].out_features),
            "model": run["model"].state_dict(), "optimizer": run["optimizer"].state_dict(),
            "schedule": run["schedule"].state_dict(), "scaler": run["scaler"].state_dict(),
            "rng": rng_state(run["train_loader"].device), "state": dict(state), "args": vars(args)}
    save_checkpoint(ckpt, run["out_dir"] / "last.pt")
    if is_best:
        save_checkpoint(ckpt, run["out_dir"] / "best.pt")


def write_summary(args, run, state, data, preds, targets):
    device, model = run["train_loader"].device, run["model"]
    cm = confusion_matrix(preds, targets, len(data.classes))
    summary = {
        "script": SCRIPT, "dataset": f"CIFAR-10 ({data.source}: {args.data_dir})",
        "train_images": run["train_loader"].total, "test_images": len(targets),
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "epochs": state["epoch"], "steps": state["step"], "world_size": args.world_size, "global_batch": args.global_batch,
        "test_acc": cm.diag().sum().item() / len(targets), "best_test_acc": state["best_acc"],
        "train_seconds": state["train_seconds"],
        "images_per_second": state["images_seen"] / max(state["train_seconds"], 1e-9),
        "peak_memory_mb": peak_memory_mb(device),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "args": vars(args), "classes": data.classes,
        "per_class_acc": dict(zip(data.classes, per_class_accuracy(cm))), "confusion_matrix": cm.tolist(),
    }
    write_json(run["out_dir"] / "summary.json", summary)
    if not args.no_plots:
        save_pictures(run["out_dir"], model, data, cm)
    print(f"test accuracy {summary['test_acc']:.2%} (best {state['best_acc']:.2%}) | {summary['train_seconds']:.1f}s "
          f"training | {summary['images_per_second']:,.0f} img/s | peak {summary['peak_memory_mb']:,.0f} MB")
    print("per class: " + ", ".join(f"{c} {a:.1%}" for c, a in summary["per_class_acc"].items()))
    return summary


def save_pictures(out_dir, model, data, cm):
    plot_curves(read_jsonl(out_dir / "metrics.jsonl"), out_dir / "curves.png")
    plot_confusion(cm, data.classes, out_dir / "confusion.png")
    picked = fixed_examples(data.test_y)
    save_attention_grid(model, data.test_x[picked], data.test_y[picked], data.classes, out_dir / "attention.png")
    print(f"pictures in {out_dir}: attention.png, curves.png, confusion.png")


def show_attention(args, ckpt, device):
    """--show-attention: attention.png for a saved checkpoint, nothing trained."""
    try:
        data = load_cifar10(args.data_dir, download=not args.no_download, image_size=args.image_size)
    except DataError as e:
        fail(str(e))
    model = VisionTransformer(**ckpt["model_config"]).to(device)
    try:
        load_weights(model, ckpt, args.show_attention)
    except DataError as e:
        fail(str(e))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    picked = fixed_examples(data.test_y)
    path = save_attention_grid(model, data.test_x[picked], data.test_y[picked], data.classes, out_dir / "attention.png")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
