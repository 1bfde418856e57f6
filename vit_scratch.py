# /// script
# requires-python = ">=3.10"
# dependencies = ["torch>=2.11", "torchvision>=0.26", "numpy", "pillow", "tqdm>=4.66", "matplotlib>=3.7"]
# ///
"""A Vision Transformer trained from scratch on CIFAR-10: the study guide's model, trained in seconds.

The guide's ViT (patch 4, CLS, learnable positions, pre-LN, embed 256, MLP 512, 8 heads, 6 layers) with two
recipes (RECIPES below): the guide's own (`--recipe guide`) and a faster, more accurate one chosen by measurement
(default: Muon + AdamW, warm-up + cosine, label smoothing, flip test-time augmentation). Crop and flip run on the
device; on one CUDA GPU the whole training step is captured once as a CUDA graph and replayed for every batch.

    python vit_scratch.py --epochs 10                           # downloads CIFAR-10 to ./data
    python vit_scratch.py --epochs 10 --data-dir /tmp/cifar10   # ImageFolder tree or torchvision folder
    python vit_scratch.py --epochs 10 --recipe guide            # the study guide's settings
    python vit_scratch.py --epochs 1 --limit-train 5000 --limit-test 1000 --device cpu   # CPU smoke run
    python vit_scratch.py --resume runs/vit_scratch/<run>/last.pt --epochs 20          # continue, or extend
    python vit_scratch.py --show-attention runs/vit_scratch/<run>/best.pt               # attention.png only
    torchrun --standalone --nproc_per_node=4 vit_scratch.py --epochs 10 --batch-size 64 # 4 GPUs, global batch 256

Measured (BENCHMARKS.md, CIFAR-10 JPEG q75 copy, one H100): `--epochs 10` 79.11% +- 0.35 (3 seeds) in 14.2 s of
training; the guide's recipe 66.17%. Outputs in --out-dir: config.json, metrics.jsonl, summary.json, last.pt,
best.pt, attention.png, curves.png, confusion.png. Needs common.py beside it.
"""
import argparse
import copy
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as plumbing  # part 2 of common.py: errors, flags, resume, run folders, torchrun, charts
from common import (CapturedStep, DataError, TensorLoader, accuracy_from, confusion_matrix, derived_seed,  # part 1
                    img_to_patch, load_cifar10, normalize)
from common import fraction, non_negative, positive_float, positive_int  # argparse types: a flag's range

SCRIPT = "vit_scratch"
LOG_EVERY = 20  # steps between reads of the running loss (each read waits for the device)


# ----------------------------------------------------------------------------------------------------
# Config: the recipes and the flags. Add a flag in build_parser (its range in type=), a rule between two flags in
# check_args (below the banner). A recipe value is its flag's default; a flag typed on the command line wins.

# "fast" was chosen on one H100 by benchmarks/sweep_vit.py (BENCHMARKS.md); "guide" is the study guide's own.
RECIPES = {
    "fast": dict(batch_size=256, optimizer="muon", lr=1e-3, muon_lr=0.01, weight_decay=0.05, schedule="step",
                 warmup=0.1, label_smoothing=0.1, dropout=0.0, init_std=0.02, tta=True),
    "guide": dict(batch_size=128, optimizer="adamw", lr=3e-4, muon_lr=None, weight_decay=0.01, schedule="epoch",
                  warmup=0.0, label_smoothing=0.0, dropout=0.1, init_std=1.0, tta=False),
}


def build_parser():
    p = plumbing.make_parser(__doc__, SCRIPT, RECIPES)  # --help shows each recipe's value of a flag it sets
    a = p.add_argument
    # data
    a("--data-dir", default="./data", help="ImageFolder tree (train/<class>/*, test/<class>/*) or torchvision's folder")
    a("--no-download", action="store_true", help="never try to download CIFAR-10; fail if --data-dir has none")
    a("--limit-train", type=positive_int, help="use a class-stratified subset of N training images")
    a("--limit-test", type=positive_int, help="use a class-stratified subset of N test images")
    # model (the guide's table)
    a("--image-size", type=positive_int, default=32, help="input height = width in pixels")
    a("--patch-size", type=positive_int, default=4, help="patch side in pixels; must divide --image-size")
    a("--embed-dim", type=positive_int, default=256, help="token width; must be divisible by --num-heads")
    a("--hidden-dim", type=positive_int, default=512, help="MLP hidden width")
    a("--num-heads", type=positive_int, default=8, help="attention heads")
    a("--num-layers", type=positive_int, default=6, help="transformer blocks")
    # recipe: a flag left out takes its --recipe's value
    a("--recipe", default="fast", choices=sorted(RECIPES), help="fast: measured best; guide: the study guide's")
    a("--epochs", type=positive_int, default=10, help="passes over the training set")
    a("--batch-size", type=positive_int, help="images per step and process (under torchrun: x processes)")
    a("--optimizer", choices=["muon", "adamw"], help="muon: Muon on the blocks' 2-D weights, AdamW on the rest")
    a("--lr", type=positive_float, help="peak AdamW learning rate")
    a("--muon-lr", type=positive_float, help="peak Muon learning rate, with --optimizer muon (where -: fast's)")
    a("--muon-momentum", type=fraction, default=0.95, help="Muon's Nesterov momentum, with --optimizer muon")
    a("--weight-decay", type=non_negative, help="AdamW decoupled weight decay, not on norms, biases, CLS, positions")
    a("--schedule", choices=["step", "epoch"], help="cosine decay per iteration (after --warmup) or per epoch")
    a("--warmup", type=fraction, help="linear warm-up as a fraction of all steps, with --schedule step")
    a("--lr-shape", choices=["cosine", "linear", "trapezoid"], default="cosine",
      help="with --schedule step, after the warm-up: cosine or linear to 0, or flat then linear over its last 20%%")
    a("--label-smoothing", type=fraction, help="cross-entropy label smoothing")
    a("--dropout", type=fraction, help="dropout after the embedding and inside each MLP")
    a("--init-std", type=non_negative, help="standard deviation of the CLS token and positions at initialisation")
    a("--erase", type=fraction, default=0.0, help="random erasing of a quarter-side square, this probability")
    a("--tta", action=argparse.BooleanOptionalAction, help="evaluate on the mean logits of image and mirror")
    a("--tta-shift", type=positive_int, help="with --tta: also the images shifted by this many pixels (4 ways)")
    a("--ema", type=fraction, default=0.0, help="evaluate a moving average of the weights, this decay a step (0 = off)")
    a("--grad-clip", type=non_negative, default=1.0, help="clip the global gradient norm to this (0 = off)")
    a("--max-steps", type=positive_int, help="stop after this many optimizer steps (smoke runs)")
    a("--seed", type=int, default=0, help="seeds initialisation, subsets, shuffling, augmentation and dropout")
    a("--compile", action="store_true", help="torch.compile each transformer block (the first steps compile)")
    plumbing.add_run_flags(p, SCRIPT, "attention.png, curves.png, confusion.png")
    a("--show-attention", metavar="CHECKPOINT", help="only draw attention.png for a checkpoint (default: beside it)")
    return p


# ----------------------------------------------------------------------------------------------------
# Model: the guide's ViT. Edit freely: Muon takes every 2-D weight in the blocks, the pictures read the model only
# through VisionTransformer.attention_maps, and checkpoints record the flags in MODEL_FLAGS (below the banner).

class Attention(nn.Module):
    """Multi-head self-attention, q, k and v from one stacked projection (nn.MultiheadAttention's weight layout)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.fused = True  # False: the readable math path, kept for tests

    def forward(self, x, probs_only=False):
        B, T, D = x.shape
        q, k, v = self.to_qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (B,h,T,d)
        if self.fused and not probs_only:
            out = F.scaled_dot_product_attention(q, k, v)  # softmax(Q K^T / sqrt(d)) V in one kernel
        else:
            probs = torch.softmax(q @ k.mT / math.sqrt(q.shape[-1]), dim=-1)  # (B, h, T, T)
            if probs_only:  # the weights the fused kernel never materialises: for pictures
                return probs
            out = probs @ v
        return self.to_out(out.transpose(1, 2).reshape(B, T, D))


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
                 hidden_dim=512, num_heads=8, num_layers=6, dropout=0.1, init_std=1.0):
        super().__init__()
        num_patches = (image_size // patch_size) ** 2  # check_args made sure the shapes divide
        self.patch_size = patch_size
        self.to_patch_embedding = nn.Linear(num_channels * patch_size ** 2, embed_dim)
        # The guide draws CLS and positions from N(0, 1), far louder than the patch embeddings; the fast
        # recipe scales them down (init_std 0.02), which is worth about 3 points at 10 epochs.
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * init_std)
        self.pos_embedding = nn.Parameter(torch.randn(1, 1 + num_patches, embed_dim) * init_std)
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

    @torch.no_grad()
    def attention_maps(self, x):
        """Per layer, the attention weights (B, h, T, T) for images x: what the pictures show."""
        tokens, maps = self.embed(x), []
        for block in self.blocks:
            maps.append(block.attn(block.norm1(tokens), probs_only=True))
            tokens = block(tokens)
        return maps


def hidden_matrices(model):
    """What Muon trains in the fast recipe: every 2-D weight inside the blocks (attention and MLP projections),
    found by shape, so that a block edited by hand (layers added, dropped or renamed) still gets Muon."""
    return [p for p in model.blocks.parameters() if p.ndim == 2]


# ----------------------------------------------------------------------------------------------------
# Device, precision, optimizers and schedule. Learning rates are device tensors under a CUDA graph: set them with
# plumbing.set_learning_rates (in place), never by assigning a float.

def amp_dtype_for(device):
    """bf16 autocast where the GPU has it natively (compute capability >= 8.0; a T4, 7.5, creates bf16 tensors but
    emulates their math, slowly), else fp16 with a GradScaler; fp32 on CPU and MPS."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def autocast(device, dtype):
    # No cast cache: inside a CUDA graph cached casts would be stale; each weight is cast once a step anyway.
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype is not None else nullcontext()


def newton_schulz(G, steps=5):
    """G's "zeroth power" (its singular values set to about 1), for a batch (n, rows, cols): five quintic
    Newton-Schulz steps with the coefficients of Keller Jordan's Muon, in bf16 (fp16 on a GPU without native
    bf16, such as a T4: the spectral norm is kept <= 1, well inside fp16's range)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.float16 if amp_dtype_for(G.device) == torch.float16 else torch.bfloat16)
    wide = X.size(-2) <= X.size(-1)
    X = X if wide else X.mT  # iterate on the smaller Gram matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X if wide else X.mT


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update of each 2-D weight is orthogonalised, scaled by sqrt(max(1, rows /
    cols)); written here so that the learning rate may be a device tensor in a CUDA graph."""

    def __init__(self, params, lr, momentum=0.95):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                grads = [p.grad for p in params]
                for p in params:
                    if "momentum_buffer" not in self.state[p]:  # created once, before any graph capture
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
                nesterov = torch.stack(grads).lerp_(torch.stack(bufs), group["momentum"])  # (n, rows, cols)
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                update = newton_schulz(nesterov).float() * (-group["lr"] * scale)
                torch._foreach_add_(params, list(update.unbind(0)))


def make_optimizers(model, args, device, capture):
    """[AdamW] or [AdamW, Muon]: AdamW (no decay on norms, biases, CLS, positions), Muon on hidden_matrices. With
    `capture` the learning rates are device tensors and AdamW is capturable."""
    muon_params = {id(p) for p in hidden_matrices(model)} if args.optimizer == "muon" else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if id(p) not in muon_params:
            (decay if p.ndim >= 2 and name not in ("cls_token", "pos_embedding") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizers = [torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda", capturable=capture)]
    if muon_params:
        optimizers.append(Muon([p for p in model.parameters() if id(p) in muon_params], lr=args.muon_lr,
                               momentum=args.muon_momentum))
    for opt, peak in zip(optimizers, (args.lr, args.muon_lr)):
        plumbing.place_learning_rate(opt, peak, device, capture)
    return optimizers


def lr_factor(step, warmup_steps, total_steps):
    """Linear warm-up to 1, then cosine to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def schedule_factor(args, step, steps_per_epoch, total_steps):
    """step: warm-up, then per iteration --lr-shape (cosine, linear, or flat then linear over the last 20%); epoch:
    the guide's CosineAnnealingLR(T_max=epochs)."""
    if args.schedule == "epoch":
        return 0.5 * (1 + math.cos(math.pi * (step // steps_per_epoch) / args.epochs))
    warmup_steps = int(args.warmup * total_steps)
    if args.lr_shape == "cosine" or step < warmup_steps:
        return lr_factor(step, warmup_steps, total_steps)
    left = 1 - min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))  # 1 -> 0 after the warm-up
    return left if args.lr_shape == "linear" else min(1.0, left / 0.2)


# ----------------------------------------------------------------------------------------------------
# The step: edit train_step. On one CUDA GPU common.CapturedStep records it once as a CUDA graph and replays it
# unchanged, so nothing in it may read a value back to the host (no .item(), no print, no Python branch on a tensor);
# the running statistics stay on the device.

def train_step(model, optimizers, scaler, amp_dtype, label_smoothing, grad_clip, x, y, stats, ema=None):
    """Forward, loss, backward, clipping, update, and the running [loss sum, correct] added to `stats`; with `ema`
    ((averaged, trained) weights, decay) the moving average follows the update. Gradients are set to None first: in a
    graph, backward then writes them in the graph's own memory."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    with autocast(x.device, amp_dtype):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    scaler.scale(loss).backward()
    if grad_clip:
        for opt in optimizers:
            scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    if ema is not None:
        torch._foreach_lerp_(ema[0], ema[1], 1 - ema[2])  # average += (1 - decay) (weight - average)
    stats += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum().float()])


# ----------------------------------------------------------------------------------------------------
# Evaluation

def test_views(x, loader, shift=None):
    """What test-time augmentation averages over: each image and its mirror, and with `shift` both moved by that
    many pixels up, down, left and right (the border black, as training's crops pad it)."""
    views = [x]
    if shift:
        B, C, H, W = x.shape
        black = (-loader.mean / loader.std).view(1, C, 1, 1)  # uint8 0, normalised
        padded = black.expand(B, C, H + 2 * shift, W + 2 * shift).clone()
        padded[:, :, shift:shift + H, shift:shift + W] = x
        views += [padded[:, :, dy:dy + H, dx:dx + W] for dy, dx in ((0, shift), (2 * shift, shift), (shift, 0),
                                                                    (shift, 2 * shift))]
    return views + [v.flip(3) for v in views]


@torch.no_grad()
def evaluate(model, loader, amp_dtype, num_classes, tta=False, shift=None):
    """(confusion matrix, mean cross-entropy) over the test set, with `tta` the mean logits over test_views; under
    torchrun the shards' counts are summed."""
    model.eval()
    preds, labels, loss_sum = [], [], torch.zeros((), device=loader.device)
    for x, y in loader:
        views = test_views(x, loader, shift) if tta else [x]
        with autocast(loader.device, amp_dtype):
            logits = sum(model(v).float() for v in views) / len(views)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        preds.append(logits.argmax(1))
        labels.append(y)
    cm = confusion_matrix(torch.cat(preds), torch.cat(labels), num_classes).to(loader.device)
    cm, loss_sum = (plumbing.all_reduce_sum(t, loader.world_size) for t in (cm, loss_sum))
    return cm.cpu(), loss_sum.item() / loader.total


# ----------------------------------------------------------------------------------------------------
# The experiment: everything a run does, in order, with the loop written out

def main(argv=None):
    with plumbing.one_line_errors(SCRIPT) as report:
        args, ckpt = experiment_args(argv)
        if args.show_attention:
            return show_attention(args)
        rank, world_size, local_rank = plumbing.init_distributed(args.device)
        plumbing.set_global_batch(args, world_size, resuming=ckpt is not None)
        device = plumbing.pick_device(args.device, local_rank)
        out_dir = plumbing.open_run_folder(args, ckpt, report, rank)
        data, train_idx, test_idx = plumbing.load_classifier_data(args, ckpt, args.image_size)

        torch.manual_seed(args.seed)
        model = VisionTransformer(**model_config(args, len(data.classes)), init_std=args.init_std).to(device)
        train_loader = TensorLoader(data.train_x[train_idx], data.train_y[train_idx], args.batch_size, device,
                                    train=True, seed=args.seed, rank=rank, world_size=world_size, erase=args.erase)
        test_loader = TensorLoader(data.test_x[test_idx], data.test_y[test_idx], 2000, device, train=False,
                                   rank=rank, world_size=world_size)
        steps_per_epoch = len(train_loader)
        total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
        amp_dtype = amp_dtype_for(device)
        capture = device.type == "cuda" and amp_dtype == torch.bfloat16 and world_size == 1 and not args.eager
        optimizers = make_optimizers(model, args, device, capture)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        ema = copy.deepcopy(model).requires_grad_(False) if args.ema else None  # --ema: the weights evaluated
        progress = plumbing.Progress()
        if ckpt:
            progress = restore_run(ckpt, args, model, optimizers, scaler, device, capture, len(data.classes), ema)
            print(plumbing.resuming_line(args.resume, progress, steps_per_epoch, total_steps))
        start_run(args, report, out_dir, rank, progress, model, device, amp_dtype, capture, train_idx, test_idx,
                  steps_per_epoch)
        compiled = compile_blocks(model, device) if args.compile else []
        trained = plumbing.wrap_distributed(model, device, world_size)
        stats = torch.zeros(2, device=device)  # the epoch's [loss sum, correct], kept on the device
        step = make_step(trained, optimizers, scaler, amp_dtype, args, stats, train_loader, capture, compiled, ema)
        progress.train_seconds += getattr(step, "seconds", 0.0)  # a capture (and compilation) counts as training

        cm = None
        for epoch in range(progress.epoch + 1, args.epochs + 1):
            if progress.step >= total_steps:
                break
            train_loader.set_epoch(epoch)
            torch.manual_seed(derived_seed(args.seed, "dropout", epoch, rank))  # resumable at any process count
            trained.train()
            stats.zero_()
            seen = 0
            t0 = time.perf_counter()
            with plumbing.progress_bar(steps_per_epoch, f"epoch {epoch}/{args.epochs}",
                                       args.no_progress or rank != 0) as bar:
                for x, y in train_loader:
                    factor = schedule_factor(args, progress.step, steps_per_epoch, total_steps)
                    lr = plumbing.set_learning_rates(optimizers, factor)
                    step(x, y)
                    progress.step += 1
                    seen += len(y)
                    bar.update(1)
                    if progress.step % LOG_EVERY == 0:  # a host read: the bar and the non-finite check
                        plumbing.check_progress(stats, seen, progress.step, lr, bar)
                    if progress.step >= total_steps:
                        break
                totals = plumbing.all_reduce_sum(stats.clone(), world_size)  # the epoch over all processes
                seen *= world_size
                loss, acc = plumbing.check_progress(totals, seen, progress.step, lr, bar)
            seconds = time.perf_counter() - t0  # the read-back above waited for the device
            cm, test_loss = evaluate(ema or trained, test_loader, amp_dtype, len(data.classes), args.tta,
                                     args.tta_shift)
            progress.epoch = epoch
            progress.train_seconds += seconds
            progress.images_seen += seen
            row = dict(epoch=epoch, step=progress.step, train_loss=loss, train_acc=acc, test_loss=test_loss,
                       test_acc=accuracy_from(cm), lr=lr, epoch_seconds=seconds, images_per_second=seen / seconds)
            plumbing.log_epoch(args, out_dir, rank, row)
            if rank == 0:
                save_run(args, model, optimizers, scaler, progress, accuracy_from(cm), out_dir, data, ema)
        if cm is None:  # resumed a finished run: evaluate what it left
            cm, _ = evaluate(ema or trained, test_loader, amp_dtype, len(data.classes), args.tta, args.tta_shift)
        summary = write_summary(args, model, progress, data, cm, device, out_dir, ema) if rank == 0 else None
        if world_size > 1:
            torch.distributed.destroy_process_group()
        return summary


# ===== Run plumbing: nothing below changes what is trained =====

# ----------------------------------------------------------------------------------------------------
# How the step runs: replayed as a CUDA graph where capture applies, else eagerly; --compile

def make_step(model, optimizers, scaler, amp_dtype, args, stats, loader, capture, compiled, ema=None):
    """The function that trains on one batch: a graph replay where capture applies (one CUDA GPU, bf16, no --eager),
    else train_step run eagerly; a capture that fails falls back to eager with one line. `ema`: the averaged model."""
    averaging = (list(ema.parameters()), list(model.parameters()), args.ema) if ema is not None else None
    step = partial(train_step, model, optimizers, scaler, amp_dtype, args.label_smoothing, args.grad_clip, stats=stats,
                   ema=averaging)
    if capture:
        model.train()
        state = [*model.state_dict().values(), *(ema.state_dict().values() if ema is not None else []), stats]
        captured = plumbing.capture_or_none(lambda: CapturedStep(step, next(iter(loader)), state, optimizers),
                                            stats.device)
        if captured is not None:
            return captured
        for module in compiled:  # a failed capture: back to the plain modules too
            del module.forward
    return step


def compile_blocks(model, device):
    """--compile: regional compilation, one block's code compiled once and reused by every block."""
    if device.type != "cuda":
        plumbing.quiet_compile_on_cpu()
    for block in model.blocks:
        block.forward = torch.compile(block.forward)
    return list(model.blocks)


# ----------------------------------------------------------------------------------------------------
# Flags on resume, the run folder, data checks, the machine

CHECKPOINT_VERSION = 2
RUNTIME_FLAGS = (*plumbing.RUN_FLAGS, "compile", "no_download")  # on --resume: from the command line


def experiment_args(argv):
    """(args, checkpoint or None): the command line with its recipe filled in, or on --resume the run's
    own flags (a flag that differs is refused, more --epochs or --max-steps extend the run)."""
    parser = build_parser()
    cli, given = plumbing.parse(parser, argv)
    if cli.show_attention:
        unused = sorted(given - {"show_attention", "data_dir", "no_download", "device", "out_dir", "no_progress"})
        if unused:
            raise DataError(f"{plumbing.flag(unused[0])} has no effect with --show-attention (it only draws); drop it")
        cli.data_dir = cli.data_dir if "data_dir" in given else None  # None: the checkpoint's own
        return cli, None
    if not cli.resume:
        check_no_effect(cli, given)
        for name, value in RECIPES[cli.recipe].items():
            if getattr(cli, name) is None:
                setattr(cli, name, value)
        if cli.optimizer == "muon" and cli.muon_lr is None:  # the guide's recipe has no Muon: take the fast one's
            cli.muon_lr = RECIPES["fast"]["muon_lr"]
        cli.data_dir = str(Path(cli.data_dir).expanduser().resolve())  # so that a resume finds it from anywhere
        check_args(cli)
        return cli, None
    ckpt = plumbing.load_checkpoint(cli.resume, SCRIPT)
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise DataError(f"--resume {cli.resume}: written by an earlier version of {SCRIPT}.py and cannot be resumed "
                        f"(its weights still load with --show-attention)")
    args = plumbing.resumed_args(ckpt["args"], cli, given, RUNTIME_FLAGS, extendable=("epochs", "max_steps"),
                                 parser=parser, state=ckpt["state"])
    for name, value in RECIPES[args.recipe].items():  # a flag newer than the checkpoint: its recipe value
        if getattr(args, name) is None and name != "muon_lr":
            setattr(args, name, value)
    return args, ckpt


def check_args(args):
    """The rules that involve two flags (each flag's own range is checked by its type=)."""
    if args.image_size % args.patch_size:
        raise DataError(f"--image-size {args.image_size} is not divisible by --patch-size {args.patch_size}")
    if args.tta_shift and args.tta_shift > args.image_size // 4:
        raise DataError(f"--tta-shift {args.tta_shift} is more than a quarter of --image-size {args.image_size}")
    if args.embed_dim % args.num_heads:
        raise DataError(f"--embed-dim {args.embed_dim} is not divisible by --num-heads {args.num_heads}")
    if args.schedule == "epoch" and args.warmup:
        raise DataError("--warmup applies to --schedule step; the per-epoch cosine starts at the peak")


def check_no_effect(cli, given):
    """A typed flag that would change nothing is refused: the user meant something else."""
    optimizer = cli.optimizer or RECIPES[cli.recipe]["optimizer"]
    for name in ("muon_lr", "muon_momentum"):
        if name in given and optimizer != "muon":
            raise DataError(f"{plumbing.flag(name)} has no effect with --optimizer {optimizer} (recipe {cli.recipe}); "
                            f"drop it, or add --optimizer muon")
    schedule = cli.schedule or RECIPES[cli.recipe]["schedule"]
    for name in ("warmup", "lr_shape"):
        if name in given and schedule == "epoch":
            raise DataError(f"{plumbing.flag(name)} has no effect with --schedule epoch (the guide's per-epoch "
                            f"cosine); drop it, or add --schedule step")
    if "tta_shift" in given and not (cli.tta if cli.tta is not None else RECIPES[cli.recipe]["tta"]):
        raise DataError(f"--tta-shift has no effect without --tta (recipe {cli.recipe}); drop it, or add --tta")




def start_run(args, report, out_dir, rank, progress, model, device, amp_dtype, capture, train_idx, test_idx,
              steps_per_epoch):
    """config.json (on a resume too: the flags in force), what Ctrl-C reports, and the start line."""
    if rank == 0:
        plumbing.write_json(out_dir / "config.json", vars(args))
    last = out_dir / "last.pt"
    report.resume = last
    report.saved = lambda: (f"the last checkpoint is {last} (epoch {progress.epoch})" if last.exists() else
                            "nothing was saved yet (the first checkpoint is written at the end of epoch 1)")
    processes = f" ({args.world_size} processes x {args.batch_size})" if args.world_size > 1 else ""
    print(f"{SCRIPT}: {sum(p.numel() for p in model.parameters()):,} parameters | recipe {args.recipe} "
          f"({args.optimizer}) | {device} {amp_dtype or torch.float32}{' graph' if capture else ''} | "
          f"train {len(train_idx):,} test {len(test_idx):,} images | {steps_per_epoch} steps/epoch x {args.epochs} "
          f"epochs, batch {args.global_batch}{processes} | out {out_dir}", flush=True)


MODEL_FLAGS = ("image_size", "patch_size", "embed_dim", "hidden_dim", "num_heads", "num_layers", "dropout")


def model_config(args, num_classes):
    return {**{k: getattr(args, k) for k in MODEL_FLAGS}, "num_classes": num_classes}


def restore_run(ckpt, args, model, optimizers, scaler, device, capture, num_classes, ema=None):
    """Weights (and their --ema average), optimizer states and scaler from a checkpoint; returns its Progress."""
    plumbing.load_weights(model, ckpt, args.resume, model_config(args, num_classes))
    if ema is not None:
        try:
            ema.load_state_dict(ckpt["ema"])
        except (KeyError, TypeError, RuntimeError):
            raise DataError(f"--resume {args.resume}: its --ema average is missing or does not fit the model") from None
    if len(ckpt["optimizers"]) != len(optimizers):
        raise DataError(f"--resume {args.resume}: its optimizer state does not fit --optimizer {args.optimizer}")
    for opt, state, peak in zip(optimizers, ckpt["optimizers"], (args.lr, args.muon_lr)):
        opt.load_state_dict(state)
        plumbing.place_learning_rate(opt, peak, device, capture)  # a CPU checkpoint may resume under a CUDA graph
        if isinstance(opt, torch.optim.AdamW):
            plumbing.place_adamw_state(opt, device, capture)
    scaler.load_state_dict(ckpt["scaler"])
    plumbing.trim_metrics(Path(args.out_dir) / "metrics.jsonl", lambda row: row["epoch"] <= ckpt["state"]["epoch"])
    return plumbing.Progress(**ckpt["state"])


def save_run(args, model, optimizers, scaler, progress, test_acc, out_dir, data, ema=None):
    """last.pt every epoch (best.pt is the same file, linked, when the test accuracy is the best yet); with --ema
    the average too, which --show-attention draws."""
    is_best = test_acc > progress.best_acc
    progress.best_acc = max(progress.best_acc, test_acc)
    ckpt = {"script": SCRIPT, "version": CHECKPOINT_VERSION, "model_config": model_config(args, len(data.classes)),
            "model": model.state_dict(), "optimizers": [opt.state_dict() for opt in optimizers],
            "scaler": scaler.state_dict(), "state": asdict(progress), "args": vars(args),
            "data_fingerprint": data.fingerprint, "ema": ema.state_dict() if ema is not None else None}
    plumbing.save_checkpoint(ckpt, out_dir / "last.pt", also=out_dir / "best.pt" if is_best else None)


# ----------------------------------------------------------------------------------------------------
# The summary: summary.json, the result lines, the pictures

def write_summary(args, model, progress, data, cm, device, out_dir, ema=None):
    """summary.json, the result lines, then the pictures (of the --ema average where there is one: what was scored)."""
    summary = plumbing.classifier_summary(SCRIPT, args, model, progress, data, cm, device, out_dir,
                                          recipe=args.recipe)
    if not args.no_plots:  # after the results: a picture that cannot be written loses nothing printed above
        save_pictures(out_dir, ema or model, data, cm)
    return summary


# ----------------------------------------------------------------------------------------------------
# Pictures: attention maps (computed only for pictures, never during training), curves, confusion

def attention_maps(model, x):
    """Per layer, the attention weights (B, h, T, T) for images x: the model's own attention_maps, in eval mode."""
    model.eval()
    return model.attention_maps(x)


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


def attention_figure(images, heat, labels, log=print, name="attention.png"):
    """A matplotlib Figure: a row per uint8 image (3, H, W), its label under it; then per column of `heat`
    (B, columns, g, g) in [0, 1] the map drawn over the image (inferno, bilinear, alpha 0.55). Each column is one
    image composed here: an axes per cell made this picture the slowest part of a short run (160 axes for 20 images
    and 6 layers). None without matplotlib."""
    titles = ["image"] + [f"layer {n + 1}" for n in range(heat.shape[1] - 1)] + ["rollout"]
    fig = plumbing.new_figure(name, log, figsize=(1.1 * len(titles), 1.25 * len(images)))
    if fig is None:
        return None
    from matplotlib import colormaps
    B, _, H, W = images.shape
    up, gap = 4, H  # tiles at 4x (square pixels, smooth maps); a quarter tile between rows for the labels
    pictures = images.float().div(255).repeat_interleave(up, 2).repeat_interleave(up, 3)  # (B, 3, 4H, 4W)
    maps = F.interpolate(heat.float(), size=(up * H, up * W), mode="bilinear", align_corners=False).clamp(0, 1)
    colours = torch.from_numpy(colormaps["inferno"](maps.numpy())[..., :3]).float().permute(0, 1, 4, 2, 3)
    axes = fig.subplots(1, len(titles), squeeze=False)[0]
    for j, ax in enumerate(axes):
        tiles = pictures if j == 0 else 0.45 * pictures + 0.55 * colours[:, j - 1]
        strip = torch.ones(3, B * (up * H + gap) - gap, up * W)  # white between the rows
        for i in range(B):
            strip[:, i * (up * H + gap):i * (up * H + gap) + up * H] = tiles[i]
        ax.imshow(strip.permute(1, 2, 0).numpy())
        ax.set_axis_off()
        ax.set_title(titles[j], fontsize=8)
    for i, label in enumerate(labels):
        axes[0].text(up * W / 2, i * (up * H + gap) + up * H + 1, label, ha="center", va="top", fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.3 / B, bottom=0.2 / B, wspace=0.05)  # the last label too
    return fig


def save_attention_grid(model, images, labels, classes, path, log=print):
    """One PNG: a row per image, columns = image, CLS attention per layer, rollout. None without matplotlib."""
    heat = cls_heatmaps(model, normalize(images.to(next(model.parameters()).device)), model.patch_size).cpu()
    fig = attention_figure(images, heat, [classes[int(y)] for y in labels], log, Path(path).name)
    return plumbing.save_figure(fig, path) if fig is not None else None


def save_pictures(out_dir, model, data, cm):
    if not plumbing.has_matplotlib():
        print("skipped the pictures (attention.png, curves.png, confusion.png): they need matplotlib "
              "(pip install matplotlib)")
        return
    plumbing.plot_curves(plumbing.read_jsonl(out_dir / "metrics.jsonl"), out_dir / "curves.png")
    plumbing.plot_confusion(cm, data.classes, out_dir / "confusion.png")
    picked = fixed_examples(data.test_y)
    save_attention_grid(model, data.test_x[picked], data.test_y[picked], data.classes, out_dir / "attention.png")
    print(f"pictures in {out_dir}: attention.png, curves.png, confusion.png")


def show_attention(args):
    """--show-attention: attention.png for a saved checkpoint, nothing trained. The checkpoint's data
    folder is used unless --data-dir is given."""
    ckpt = plumbing.load_checkpoint(args.show_attention, SCRIPT, option="--show-attention")
    data_dir = args.data_dir or ckpt.get("args", {}).get("data_dir", "./data")
    data = load_cifar10(data_dir, download=not args.no_download, image_size=ckpt["model_config"]["image_size"])
    device = plumbing.pick_device(args.device)
    model = VisionTransformer(**ckpt["model_config"]).to(device)
    plumbing.load_weights(model, {**ckpt, "model": ckpt.get("ema") or ckpt["model"]}, args.show_attention)
    out_dir = Path(args.out_dir or plumbing.checkpoint_arg(args.show_attention, "--show-attention").parent)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out-dir {out_dir}: cannot write there ({e.strerror or e})") from None
    picked = fixed_examples(data.test_y)
    path = save_attention_grid(model, data.test_x[picked], data.test_y[picked], data.classes, out_dir / "attention.png")
    if path:
        print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
