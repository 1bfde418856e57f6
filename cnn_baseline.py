"""The CNN that the ViT is measured against: a compact residual network on the same CIFAR-10 data.

The study guide's lesson is that on 50,000 images a CNN beats a ViT trained from scratch (and a
pre-trained model beats both). This is the CNN side: a stem and three wide stages (conv, max-pool,
BatchNorm, GELU, plus a residual conv), max-pooled into a linear head; 1.98M parameters with the
default widths. Same data, same on-device augmentation (RandomCrop(32, pad 4) + flip, from common.py),
same kind of loop as vit_scratch.py: AdamW with warm-up + cosine, label smoothing, mixed precision,
gradient clipping at 1.0, channels_last on CUDA, flip test-time augmentation with --tta.

    python cnn_baseline.py --epochs 10 --data-dir /tmp/cifar10 --tta               # GPU
    python cnn_baseline.py --epochs 1 --limit-train 5000 --limit-test 1000 --device cpu
    python cnn_baseline.py --resume runs/cnn_baseline/<run>/last.pt                # continue a run
    python cnn_baseline.py --compare runs/          # table of the newest run of each script under runs/
    torchrun --standalone --nproc_per_node=4 cnn_baseline.py --sync-bn --batch-size 32   # 4 GPUs, global batch 128

Measured: the CPU run above reaches 33.7% test accuracy in 30 s on a 2-core x86 CPU (the ViT: 23.2% on
the same command); GPU figures are not measured yet. BENCHMARKS.md holds every figure with its command.
Outputs go to --out-dir: config.json, metrics.jsonl, summary.json, last.pt, best.pt, curves.png,
confusion.png. Needs common.py.
"""
import argparse
import json
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
                    gather_shards, init_distributed, load_checkpoint, load_cifar10, load_weights, peak_memory_mb,
                    per_class_accuracy, plot_confusion, plot_curves, prepare_out_dir, progress_bar, read_jsonl,
                    restore_rng, rng_state, save_checkpoint, set_global_batch, stops_cleanly, stratified_subset,
                    trim_metrics, wrap_distributed, write_json)

SCRIPT = "cnn_baseline"
# Flags that describe the machine rather than the experiment: on --resume they come from the command
# line, everything else from the checkpoint.
RUNTIME_FLAGS = ("device", "no_progress", "no_plots", "compile", "compile_mode", "data_dir", "no_download", "resume")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data
    a("--data-dir", default="./data", help="ImageFolder tree (train/<class>/*, test/<class>/*) or torchvision's CIFAR-10 folder")
    a("--no-download", action="store_true", help="never try to download CIFAR-10; fail if --data-dir has none")
    a("--limit-train", type=int, default=None, help="use a class-stratified subset of N training images")
    a("--limit-test", type=int, default=None, help="use a class-stratified subset of N test images")
    # model
    a("--widths", type=int, nargs="+", default=[32, 64, 256, 256], help="stem width, then one width per stage (each stage halves the resolution)")
    # optimisation
    a("--epochs", type=int, default=10, help="passes over the training set")
    a("--batch-size", type=int, default=128, help="images per step and process (under torchrun the global batch is this x processes)")
    a("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    a("--weight-decay", type=float, default=0.05, help="AdamW decoupled weight decay (not on BatchNorm weights and biases)")
    a("--warmup", type=float, default=0.1, help="linear warm-up, as a fraction of all steps; cosine decay to 0 after")
    a("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing in [0, 1)")
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (0 = off)")
    a("--sync-bn", action="store_true", help="under torchrun on GPUs: BatchNorm statistics over the global batch")
    a("--tta", action="store_true", help="evaluate with flip test-time augmentation (mean of image and mirror logits)")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps (smoke runs)")
    # machine
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to train; auto picks cuda, then mps, then cpu")
    a("--compile", action="store_true", help="torch.compile the model (GPU: fewer kernel launches; the first steps compile)")
    a("--compile-mode", default="max-autotune-no-cudagraphs", help="torch.compile mode, e.g. default, reduce-overhead, max-autotune")
    a("--seed", type=int, default=0, help="seeds initialisation, subsets, shuffling and augmentation")
    a("--out-dir", default=None, help="where results go (default runs/cnn_baseline/<timestamp>)")
    a("--resume", default=None, help="continue from a last.pt; the experiment's flags come from the checkpoint")
    a("--no-progress", action="store_true", help="no tqdm bars (they are off anyway when stderr is not a terminal)")
    a("--no-plots", action="store_true", help="no pictures (curves.png, confusion.png)")
    a("--compare", metavar="DIR", default=None, help="print a table of the newest summary.json of each script under DIR, then exit")
    p.error = fail  # one line, not the usage block
    return p.parse_args(argv)


def fail(msg):
    """One line on stderr and exit status 2: the way every bad input ends, before any work is done."""
    print(f"{SCRIPT}.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check_args(args):
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if len(args.widths) < 2 or min(args.widths) <= 0:
        fail(f"--widths needs a stem width and at least one stage width, all positive; got {args.widths}")
    if len(args.widths) - 1 > 5:
        fail(f"--widths gives {len(args.widths) - 1} stages, but 32-pixel images can only be halved 5 times")
    if args.lr <= 0:
        fail(f"--lr must be positive, got {args.lr}")
    for flag in ("label_smoothing", "warmup"):
        if not 0 <= getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be in [0, 1), got {getattr(args, flag)}")
    for flag in ("limit_train", "limit_test", "max_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.weight_decay < 0 or args.grad_clip < 0:
        fail("--weight-decay and --grad-clip must be >= 0")


# ----------------------------------------------------------------------------------------------------
# Model: a few wide stages, each halving the resolution (the shape the fast CIFAR-10 trainers use)

BN_MOMENTUM = 0.6  # running stats follow the last few batches: short runs evaluate with current statistics


def batch_norm(c):
    return nn.BatchNorm2d(c, momentum=BN_MOMENTUM)


def conv_bn(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), batch_norm(c_out))


class ConvStage(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU, then a residual conv -> BN -> GELU at the new resolution."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = batch_norm(c_out)
        self.conv2 = conv_bn(c_out, c_out)
        self.act = nn.GELU()

    def forward(self, x):
        x = self.act(self.norm1(self.pool(self.conv1(x))))  # (B, c_out, H/2, W/2)
        return x + self.act(self.conv2(x))


class ResidualCNN(nn.Module):
    def __init__(self, *, widths=(32, 64, 256, 256), num_classes=10):
        super().__init__()
        stem, *stages = widths
        self.stem = nn.Sequential(conv_bn(3, stem), nn.GELU())  # (B, stem, 32, 32)
        self.stages = nn.Sequential(*[ConvStage(a, b) for a, b in zip(widths[:-1], stages)])  # 32 -> 16 -> 8 -> 4
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(self.pool(x).flatten(1))


def channels_last(device):
    """NHWC on CUDA, where cuDNN's convolutions are fastest in it; the default layout elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def model_config(args, num_classes):
    return {"widths": list(args.widths), "num_classes": num_classes}


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
    """AdamW; no decay on BatchNorm weights and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
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
        x = x.contiguous(memory_format=channels_last(device))
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
        x = x.contiguous(memory_format=channels_last(loader.device))
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
    args.out_dir = str(Path(cli_args.resume).parent)
    return args


# ----------------------------------------------------------------------------------------------------
# The experiment

def load_data(args, log):
    try:
        data = load_cifar10(args.data_dir, download=not args.no_download, log=log)
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
    if cli.compare:
        table = comparison_table(newest_summaries(cli.compare))
        print(table)
        return table
    try:
        ckpt = load_checkpoint(cli.resume, SCRIPT) if cli.resume else None
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
    if args.sync_bn and world_size > 1 and device.type != "cuda":
        fail("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm runs on GPUs only); drop it on CPU")
    out_dir = Path(args.out_dir or f"runs/{SCRIPT}/{datetime.now():%Y%m%d-%H%M%S}")
    try:
        prepare_out_dir(out_dir)
    except DataError as e:
        fail(str(e))
    data, train_idx, test_idx = load_data(args, print)

    torch.manual_seed(args.seed)
    model = ResidualCNN(widths=args.widths, num_classes=len(data.classes)).to(device, memory_format=channels_last(device))
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
    trained = wrap_distributed(model, device, args.world_size, sync_bn=args.sync_bn)
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
    ckpt = {"script": SCRIPT, "model_config": model_config(args, run["model"].head.out_features),
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
        plot_curves(read_jsonl(run["out_dir"] / "metrics.jsonl"), run["out_dir"] / "curves.png")
        plot_confusion(cm, data.classes, run["out_dir"] / "confusion.png")
    print(f"test accuracy {summary['test_acc']:.2%} (best {state['best_acc']:.2%}) | {summary['train_seconds']:.1f}s "
          f"training | {summary['images_per_second']:,.0f} img/s | peak {summary['peak_memory_mb']:,.0f} MB")
    print("per class: " + ", ".join(f"{c} {a:.1%}" for c, a in summary["per_class_acc"].items()))
    return summary


# ----------------------------------------------------------------------------------------------------
# The comparison a student pastes into a report

def newest_summaries(root):
    """The newest summary.json of each script under root (newest by file time), in script order."""
    if not Path(root).is_dir():
        fail(f"--compare {root}: no such folder")
    newest = {}
    for path in Path(root).rglob("summary.json"):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a run still writing, or not ours
        script, mtime = summary.get("script"), path.stat().st_mtime
        if script and (script not in newest or mtime > newest[script][0]):
            newest[script] = (mtime, summary, path.parent)
    if not newest:
        fail(f"--compare {root}: no summary.json found under it")
    return [{**newest[k][1], "run": str(newest[k][2])} for k in sorted(newest)]


def comparison_table(summaries):
    """A Markdown table: one row per run. Fields a script does not have (a captioner's accuracy) show '-'."""
    def cell(value, spec):
        return "-" if value is None else format(value, spec)

    header = "| model | params | epochs | test acc | train s | img/s | peak MB | device | run |"
    rows = [header, "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for s in summaries:
        rows.append(f"| {s['script']} | {s['params'] / 1e6:.2f}M | {s['epochs']} | {cell(s.get('test_acc'), '.2%')} | "
                    f"{cell(s.get('train_seconds'), '.1f')} | {cell(s.get('images_per_second'), ',.0f')} | "
                    f"{cell(s.get('peak_memory_mb'), ',.0f')} | {s.get('device_name', '-')} | {s['run']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
