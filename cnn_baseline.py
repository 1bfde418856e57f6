# /// script
# requires-python = ">=3.10"
# dependencies = ["torch>=2.11", "torchvision>=0.26", "numpy", "pillow", "tqdm>=4.66", "matplotlib>=3.7"]
# ///
"""The CNN that the ViT is measured against: a compact residual network on the same CIFAR-10 data.

The study guide's lesson is that on 50,000 images a CNN beats a ViT trained from scratch (and a pre-trained model
beats both). This is the CNN side: a stem and three wide stages (conv, max-pool, BatchNorm, GELU, plus a residual
conv), max-pooled into a linear head; 1.98M parameters. Same data, augmentation and kind of loop as vit_scratch.py
(AdamW, warm-up + cosine, label smoothing, flip test-time augmentation, the step captured as a CUDA graph on a GPU).

    python cnn_baseline.py --epochs 10 --data-dir /tmp/cifar10                      # GPU
    python cnn_baseline.py --epochs 1 --limit-train 5000 --limit-test 1000 --device cpu
    python cnn_baseline.py --resume runs/cnn_baseline/<run>/last.pt                # continue a run
    python cnn_baseline.py --compare runs/          # table of the newest run of each script under runs/
    torchrun --standalone --nproc_per_node=4 cnn_baseline.py --sync-bn --batch-size 32   # 4 GPUs, global batch 128

Measured (BENCHMARKS.md, CIFAR-10 JPEG q75 copy, one H100): `--epochs 10` 89.32% +- 0.25 (3 seeds) in 5.7 s of
training once cuDNN is warm. Outputs in --out-dir: config.json, metrics.jsonl, summary.json, last.pt, best.pt,
curves.png, confusion.png. Needs common.py beside it.
"""
import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as plumbing  # part 2 of common.py: errors, flags, resume, run folders, torchrun, charts
from common import CapturedStep, DataError, TensorLoader, accuracy_from, confusion_matrix  # part 1
from common import fraction, non_negative, positive_float, positive_int  # argparse types: a flag's range

SCRIPT = "cnn_baseline"
LOG_EVERY = 20  # steps between reads of the running loss (each read waits for the device)


# ----------------------------------------------------------------------------------------------------
# Config: the flags. Add a flag in build_parser (its range in type=), a rule between two flags in check_args (below
# the banner).

def build_parser():
    p = plumbing.make_parser(__doc__, SCRIPT)
    a = p.add_argument
    # data
    a("--data-dir", default="./data", help="ImageFolder tree (train/<class>/*, test/<class>/*) or torchvision's folder")
    a("--no-download", action="store_true", help="never try to download CIFAR-10; fail if --data-dir has none")
    a("--limit-train", type=positive_int, help="use a class-stratified subset of N training images")
    a("--limit-test", type=positive_int, help="use a class-stratified subset of N test images")
    # model
    a("--widths", type=positive_int, nargs="+", default=[32, 64, 256, 256],
      help="stem width, then one width per stage (each stage halves the resolution)")
    # optimisation
    a("--epochs", type=positive_int, default=10, help="passes over the training set")
    a("--batch-size", type=positive_int, default=128, help="images per step and process (under torchrun: x processes)")
    a("--lr", type=positive_float, default=3e-3, help="peak AdamW learning rate")
    a("--weight-decay", type=non_negative, default=0.05, help="AdamW decoupled weight decay, not on norms and biases")
    a("--warmup", type=fraction, default=0.1, help="linear warm-up as a fraction of all steps; cosine decay to 0 after")
    a("--label-smoothing", type=fraction, default=0.1, help="cross-entropy label smoothing in [0, 1)")
    a("--grad-clip", type=non_negative, default=1.0, help="clip the global gradient norm to this (0 = off)")
    a("--sync-bn", action="store_true", help="under torchrun on GPUs: BatchNorm statistics over the global batch")
    a("--tta", action=argparse.BooleanOptionalAction, default=True, help="evaluate on mean image + mirror logits")
    a("--max-steps", type=positive_int, help="stop after this many optimizer steps (smoke runs)")
    a("--seed", type=int, default=0, help="seeds initialisation, subsets, shuffling and augmentation")
    plumbing.add_run_flags(p, SCRIPT, "curves.png, confusion.png")
    a("--compare", metavar="DIR", help="print a table of each script's newest summary.json under DIR (or of one), exit")
    return p


# ----------------------------------------------------------------------------------------------------
# Model: edit freely; checkpoints record model_config, and BatchNorm's running statistics are part of the step.

BN_MOMENTUM = 0.6  # running stats follow the last few batches: short runs evaluate with current statistics


def conv_bn(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out, momentum=BN_MOMENTUM))


class ConvStage(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU, then a residual conv -> BN -> GELU at the new resolution."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(c_out, momentum=BN_MOMENTUM)
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


# ----------------------------------------------------------------------------------------------------
# Precision, optimizer and schedule. The learning rate is a device tensor under a CUDA graph: set it with
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


def make_optimizer(model, args, device, capture):
    """AdamW, no decay on BatchNorm weights and biases; under `capture` a device-tensor rate, capturable AdamW."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=device.type == "cuda", capturable=capture)
    plumbing.place_learning_rate(optimizer, args.lr, device, capture)
    return optimizer


def lr_factor(step, warmup_steps, total_steps):
    """Linear warm-up to 1, then cosine to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------------
# The step: edit train_step. On one CUDA GPU common.CapturedStep records it once as a CUDA graph and replays it
# unchanged, so nothing in it may read a value back to the host (no .item(), no print, no Python branch on a tensor);
# the running statistics stay on the device.

def train_step(model, optimizer, scaler, amp_dtype, label_smoothing, grad_clip, x, y, stats):
    """Forward, loss, backward, clipping, update (BatchNorm's running statistics included), and the running
    [loss sum, correct] added to `stats`. Gradients are set to None first: in a graph, backward then writes them in
    the graph's own memory."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(x.device, amp_dtype):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    stats += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum().float()])


# ----------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model, loader, amp_dtype, num_classes, tta=False):
    """(confusion matrix, mean cross-entropy) over the test set; under torchrun the shards' counts are summed."""
    model.eval()
    preds, labels, loss_sum = [], [], torch.zeros((), device=loader.device)
    for x, y in loader:
        x = x.contiguous(memory_format=channels_last(loader.device))
        with autocast(loader.device, amp_dtype):
            logits = model(x).float()
            if tta:
                logits = (logits + model(x.flip(3)).float()) / 2
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
        if args.compare:
            return compare(args.compare)
        rank, world_size, local_rank = plumbing.init_distributed(args.device)
        plumbing.set_global_batch(args, world_size, resuming=ckpt is not None)
        device = plumbing.pick_device(args.device, local_rank)
        check_sync_bn(args, world_size, device, resuming=ckpt is not None)
        out_dir = plumbing.open_run_folder(args, ckpt, report, rank)
        data, train_idx, test_idx = plumbing.load_classifier_data(args, ckpt)

        torch.manual_seed(args.seed)
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions once
        layout = channels_last(device)
        model = ResidualCNN(widths=args.widths, num_classes=len(data.classes)).to(device, memory_format=layout)
        train_loader = TensorLoader(data.train_x[train_idx], data.train_y[train_idx], args.batch_size, device,
                                    train=True, seed=args.seed, rank=rank, world_size=world_size)
        test_loader = TensorLoader(data.test_x[test_idx], data.test_y[test_idx], 2000, device, train=False,
                                   rank=rank, world_size=world_size)
        steps_per_epoch = len(train_loader)
        total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
        amp_dtype = amp_dtype_for(device)
        capture = device.type == "cuda" and amp_dtype == torch.bfloat16 and world_size == 1 and not args.eager
        optimizer = make_optimizer(model, args, device, capture)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        progress = plumbing.Progress()
        if ckpt:
            progress = restore_run(ckpt, args, model, optimizer, scaler, device, capture, len(data.classes))
            print(plumbing.resuming_line(args.resume, progress, steps_per_epoch, total_steps))
        start_run(args, report, out_dir, rank, progress, model, device, amp_dtype, capture, train_idx, test_idx,
                  steps_per_epoch)
        trained = plumbing.wrap_distributed(model, device, world_size, sync_bn=args.sync_bn)
        stats = torch.zeros(2, device=device)  # the epoch's [loss sum, correct], kept on the device
        step = make_step(trained, optimizer, scaler, amp_dtype, args, stats, train_loader, layout, capture)
        progress.train_seconds += getattr(step, "seconds", 0.0)  # a capture counts as training time

        cm = None
        for epoch in range(progress.epoch + 1, args.epochs + 1):
            if progress.step >= total_steps:
                break
            train_loader.set_epoch(epoch)
            trained.train()
            stats.zero_()
            seen = 0
            t0 = time.perf_counter()
            with plumbing.progress_bar(steps_per_epoch, f"epoch {epoch}/{args.epochs}",
                                       args.no_progress or rank != 0) as bar:
                for x, y in train_loader:
                    factor = lr_factor(progress.step, int(args.warmup * total_steps), total_steps)
                    lr = plumbing.set_learning_rates([optimizer], factor)
                    step(x.contiguous(memory_format=layout), y)
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
            cm, test_loss = evaluate(trained, test_loader, amp_dtype, len(data.classes), args.tta)
            progress.epoch = epoch
            progress.train_seconds += seconds
            progress.images_seen += seen
            row = dict(epoch=epoch, step=progress.step, train_loss=loss, train_acc=acc, test_loss=test_loss,
                       test_acc=accuracy_from(cm), lr=lr, epoch_seconds=seconds, images_per_second=seen / seconds)
            plumbing.log_epoch(args, out_dir, rank, row)
            if rank == 0:
                save_run(args, model, optimizer, scaler, progress, accuracy_from(cm), out_dir, data)
        if cm is None:  # resumed a finished run: evaluate what it left
            cm, _ = evaluate(trained, test_loader, amp_dtype, len(data.classes), args.tta)
        summary = write_summary(args, model, progress, data, cm, device, out_dir) if rank == 0 else None
        if world_size > 1:
            torch.distributed.destroy_process_group()
        return summary


# ===== Run plumbing: nothing below changes what is trained =====

# ----------------------------------------------------------------------------------------------------
# How the step runs: replayed as a CUDA graph where capture applies, else eagerly; the memory layout

def make_step(model, optimizer, scaler, amp_dtype, args, stats, loader, layout, capture):
    """The function that trains on one batch: a graph replay where capture applies (one CUDA GPU, bf16, no --eager),
    else train_step run eagerly; a capture that fails falls back to eager with one line."""
    step = partial(train_step, model, optimizer, scaler, amp_dtype, args.label_smoothing, args.grad_clip, stats=stats)
    if capture:
        model.train()
        x, y = next(iter(loader))
        captured = plumbing.capture_or_none(lambda: CapturedStep(step, (x.contiguous(memory_format=layout), y),
                                                                 [*model.state_dict().values(), stats], [optimizer]),
                                            stats.device)
        if captured is not None:
            return captured
    return step


def channels_last(device):
    """NHWC on CUDA, where cuDNN's convolutions are fastest in it; the default layout elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


# ----------------------------------------------------------------------------------------------------
# Flags on resume, the run folder, data checks, the machine

CHECKPOINT_VERSION = 2
RUNTIME_FLAGS = (*plumbing.RUN_FLAGS, "no_download")  # on --resume: from the command line


def experiment_args(argv):
    """(args, checkpoint or None): the command line, or on --resume the run's own flags (a flag that
    differs is refused, more --epochs or --max-steps extend the run)."""
    parser = build_parser()
    cli, given = plumbing.parse(parser, argv)
    unused = sorted(given - {"compare", "no_progress"}) if cli.compare else []  # bars off: harmless anywhere
    if unused:  # --compare only reads summaries: a training flag beside it would do nothing
        raise DataError(f"{plumbing.flag(unused[0])} has no effect with --compare (it only prints the table); drop it")
    if not cli.resume:
        cli.data_dir = str(Path(cli.data_dir).expanduser().resolve())  # so that a resume finds it from anywhere
        check_args(cli)
        return cli, None
    ckpt = plumbing.load_checkpoint(cli.resume, SCRIPT)
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise DataError(f"--resume {cli.resume}: written by an earlier version of {SCRIPT}.py and cannot be resumed")
    args = plumbing.resumed_args(ckpt["args"], cli, given, RUNTIME_FLAGS, extendable=("epochs", "max_steps"),
                                 parser=parser, state=ckpt["state"])
    return args, ckpt


def check_args(args):
    """The rules that involve two flags (each flag's own range is checked by its type=)."""
    if len(args.widths) < 2:
        raise DataError(f"--widths needs a stem width and at least one stage width; got {args.widths}")
    if len(args.widths) - 1 > 5:
        raise DataError(f"--widths gives {len(args.widths) - 1} stages, but 32-pixel images can only be halved 5 times")


def check_sync_bn(args, world_size, device, resuming):
    """--sync-bn needs torchrun's processes (a resume may continue a torchrun run alone) on CUDA GPUs."""
    if args.sync_bn and world_size == 1 and not resuming:
        raise DataError("--sync-bn has no effect in one process (it syncs BatchNorm across torchrun's "
                        "processes); drop it, or start with torchrun")
    if args.sync_bn and world_size > 1 and device.type != "cuda":
        raise DataError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm runs on GPUs only); drop it on CPU")


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
    print(f"{SCRIPT}: {sum(p.numel() for p in model.parameters()):,} parameters | {device} {amp_dtype or torch.float32}"
          f"{' graph' if capture else ''} | train {len(train_idx):,} test {len(test_idx):,} images | {steps_per_epoch} "
          f"steps/epoch x {args.epochs} epochs, batch {args.global_batch}{processes} | out {out_dir}", flush=True)


def model_config(args, num_classes):
    return {"widths": list(args.widths), "num_classes": num_classes}


def restore_run(ckpt, args, model, optimizer, scaler, device, capture, num_classes):
    """Weights, optimizer state and scaler from a checkpoint; returns its Progress."""
    plumbing.load_weights(model, ckpt, args.resume, model_config(args, num_classes))
    optimizer.load_state_dict(ckpt["optimizer"])
    plumbing.place_learning_rate(optimizer, args.lr, device, capture)  # a CPU checkpoint may resume under a CUDA graph
    plumbing.place_adamw_state(optimizer, device, capture)
    scaler.load_state_dict(ckpt["scaler"])
    plumbing.trim_metrics(Path(args.out_dir) / "metrics.jsonl", lambda row: row["epoch"] <= ckpt["state"]["epoch"])
    return plumbing.Progress(**ckpt["state"])


def save_run(args, model, optimizer, scaler, progress, test_acc, out_dir, data):
    """last.pt every epoch (best.pt is the same file, linked, when the test accuracy is the best yet)."""
    is_best = test_acc > progress.best_acc
    progress.best_acc = max(progress.best_acc, test_acc)
    ckpt = {"script": SCRIPT, "version": CHECKPOINT_VERSION, "model_config": model_config(args, len(data.classes)),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "state": asdict(progress), "args": vars(args),
            "data_fingerprint": data.fingerprint}
    plumbing.save_checkpoint(ckpt, out_dir / "last.pt", also=out_dir / "best.pt" if is_best else None)


# ----------------------------------------------------------------------------------------------------
# The summary: summary.json, the result lines, the pictures

def write_summary(args, model, progress, data, cm, device, out_dir):
    summary = plumbing.classifier_summary(SCRIPT, args, model, progress, data, cm, device, out_dir)
    if not args.no_plots and not plumbing.has_matplotlib():
        print("skipped the pictures (curves.png, confusion.png): they need matplotlib (pip install matplotlib)")
    elif not args.no_plots:  # after the results: a picture that cannot be written loses nothing printed above
        plumbing.plot_curves(plumbing.read_jsonl(out_dir / "metrics.jsonl"), out_dir / "curves.png")
        plumbing.plot_confusion(cm, data.classes, out_dir / "confusion.png")
        print(f"pictures in {out_dir}: curves.png, confusion.png")
    return summary


# ----------------------------------------------------------------------------------------------------
# The comparison a student pastes into a report

def compare(root):
    table = plumbing.Table(comparison_table(newest_summaries(root)))
    print(table)
    return table


def newest_summaries(root):
    """The newest summary.json of each script (and fine-tuning mode) under root, by file time; root may also be
    one summary.json. Files that are not a run's summary are skipped with a word."""
    root = Path(root)
    if root.is_file() and root.name.endswith(".json"):
        paths = [root]
    elif root.is_dir():
        paths = list(root.rglob("summary.json"))
    else:
        raise DataError(f"--compare {root}: no such folder or summary.json")
    newest, skipped = {}, []
    for path in paths:
        try:
            summary = json.loads(path.read_text())
            script, params = summary["script"], summary["params"]
            assert isinstance(script, str) and isinstance(params, int)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            skipped.append(str(path))  # a run still writing, or not ours
            continue
        key, mtime = (script, row_kind(summary)), path.stat().st_mtime
        if key not in newest or mtime > newest[key][0]:
            newest[key] = (mtime, summary, path.parent)
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not a run's summary: {', '.join(skipped[:3])}", file=sys.stderr)
    if not newest:
        raise DataError(f"--compare {root}: no summary.json found under it")
    return [{**newest[k][1], "run": str(newest[k][2])} for k in sorted(newest)]


def row_kind(summary):
    """What makes a run a row of its own beside its script: the fine-tuning mode (full, lora), an ImageNet ViT in
    place of CLIP's tower (backbone), a captioner composed from two models (composed), a saved adapter evaluated
    without training (adapter: it must not take the place of the run that trained it), CLIP's linear probe (its
    row shows the probe's accuracy, not the zero-shot one its run also measured)."""
    args = summary.get("args") if isinstance(summary.get("args"), dict) else {}
    kinds = [summary["finetune"]] if summary.get("finetune") else []
    kinds += ["linear probe"] * isinstance(summary.get("linear_probe"), dict)
    kinds += ["backbone"] * bool(args.get("backbone")) + ["composed"] * bool(summary.get("composed_from"))
    kinds += ["adapter"] * bool(summary.get("adapter"))
    return ", ".join(kinds)


def comparison_table(summaries):
    """A Markdown table: one row per run. The score is a classifier's test accuracy or a captioner's BLEU-4; a field
    a script does not have, or a value that cannot be right (not finite, negative), shows '-'."""
    def cell(value, spec):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        return format(value, spec) if ok else "-"

    def score(s):
        if isinstance(s.get("linear_probe"), dict):  # the zero-shot accuracy its run measured too
            return f"acc {cell(s['linear_probe'].get('test_acc'), '.2%')} (zero-shot {cell(s.get('test_acc'), '.2%')})"
        if s.get("test_acc") is not None:
            return f"acc {cell(s['test_acc'], '.2%')}"
        if s.get("bleu4") is not None:
            return f"BLEU-4 {cell(s['bleu4'], '.4f')}"
        return "-"

    header = "| model | data | params | trainable | epochs | test score | train s | img/s | peak MB | device | run |"
    rows = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for s in summaries:
        kind = row_kind(s)
        name = s["script"] + (f" ({kind})" if kind else "")
        rate = s.get("images_per_second") if s.get("images_per_second") is not None else s.get("pairs_per_second")
        unit = " pairs" if s.get("images_per_second") is None and rate is not None else ""
        millions = lambda v: f"{v / 1e6:.2f}M" if cell(v, "g") != "-" else "-"
        rows.append(f"| {name} | {s.get('dataset', '-')} | {millions(s['params'])} | "
                    f"{millions(s.get('trainable_params'))} | "
                    f"{cell(s.get('epochs'), 'g')} | {score(s)} | {cell(s.get('train_seconds'), '.1f')} | "
                    f"{cell(rate, ',.0f')}{unit if cell(rate, ',.0f') != '-' else ''} | "
                    f"{cell(s.get('peak_memory_mb'), ',.0f')} | {s.get('device_name', '-')} | {s['run']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
