"""What the course scripts share. Part 1, what the experiments use: CIFAR-10 in memory, its augmentation on the
device (TensorLoader), patching, metrics, seeds, the captured step (CUDA graphs). Part 2, below the banner, run plumbing
(errors, flags, resume, run folders, atomic outputs, torchrun, charts). Models, loops and optimisers stay in each
script."""
import argparse
import errno
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import pickle
import re
import resource
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import zipfile
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the study guide's constants
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


# ----------------------------------------------------------------------------------------------------
# CIFAR-10 into memory: uint8 [N,3,H,W] + int64 labels, from an ImageFolder tree or torchvision's folder
@dataclass
class ImageDataset:
    train_x: torch.Tensor  # uint8 [N, 3, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list
    source: str  # "imagefolder" or "torchvision"

    @functools.cached_property
    def fingerprint(self):
        """A hash of classes, labels and pixels (0.25 s for CIFAR-10): do two folders hold the same data?"""
        h = hashlib.blake2b(repr(self.classes).encode(), digest_size=8)
        for t in (self.train_x, self.train_y, self.test_x, self.test_y):
            h.update(t.contiguous().numpy().data)
        return h.hexdigest()


def load_cifar10(data_dir, download=True, image_size=32, log=print, resumed_from=None):
    """CIFAR-10 from `data_dir`: an ImageFolder tree (train/<class>/*, test/<class>/*) or torchvision's folder,
    downloaded there when neither is present (never for a resumed run: `resumed_from`, its checkpoint)."""
    root = Path(data_dir).expanduser()
    if (root / "train").is_dir() and (root / "test").is_dir():
        return _load_imagefolder_cached(root, image_size, log)
    batches = root if root.name == "cifar-10-batches-py" else root / "cifar-10-batches-py"
    if not batches.is_dir():
        _download_cifar10(root, batches, download, resumed_from)
    data = _load_torchvision_batches(batches)
    if image_size != 32:
        data.train_x, data.test_x = _resize(data.train_x, image_size), _resize(data.test_x, image_size)
    return data


def open_rgb(path):
    """A path or an open image as 8-bit RGB (every script's decoder): EXIF rotation applied, 16-bit scaled."""
    from PIL import Image, ImageOps
    with Image.open(path) if isinstance(path, (str, Path)) else nullcontext(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            im = Image.fromarray((np.asarray(im, dtype=np.float32) / 257).clip(0, 255).astype(np.uint8))
        return im.convert("RGB")


def stratified_subset(labels, n, seed=0, name="--limit", every_class=False):
    """Sorted indices of a deterministic, class-balanced subset of n (None: all); `every_class`: at least one each."""
    if n is None or n == len(labels):
        return torch.arange(len(labels))
    if not 0 < n <= len(labels):
        raise DataError(f"{name} {n}: asked for a subset of {n} images but the split holds {len(labels)}")
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    if every_class and n < len(classes):  # training on a class that is never seen says nothing
        raise DataError(f"{name} {n}: fewer images than the {len(classes)} classes, so some class would have none; "
                        f"use at least {len(classes)}")
    per_class = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    picked = []
    for c, k in zip(classes, per_class):
        members = torch.nonzero(labels == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[:k]])
    picked = torch.cat(picked)
    if len(picked) < n:  # some class is too small: top up from the rest, still deterministic
        others = torch.from_numpy(np.setdiff1d(np.arange(len(labels)), picked.numpy()))
        picked = torch.cat([picked, others[torch.randperm(len(others), generator=g)[:n - len(picked)]]])
    return picked.sort().values


# ----------------------------------------------------------------------------------------------------
# The guide's augmentation as batched tensor ops on the device

def normalize(x, mean=CIFAR_MEAN, std=CIFAR_STD):
    """uint8 [B,3,H,W] -> float [B,3,H,W], as ToTensor + Normalize (mean, std: sequences or device tensors)."""
    mean, std = (torch.as_tensor(v, device=x.device).view(1, -1, 1, 1) for v in (mean, std))
    return (x.float().div_(255) - mean) / std


def crop_flip_params(batch, padding=4, generator=None, device="cpu"):
    """Random crop offsets and flips for a batch: (dy, dx, flip), each (batch, 1)."""
    dy = torch.randint(0, 2 * padding + 1, (batch, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch, 1), device=device, generator=generator)
    flip = torch.rand(batch, 1, device=device, generator=generator) < 0.5
    return dy, dx, flip


def apply_crop_flip(x, params, padding=4):
    """RandomCrop(size, padding) + RandomHorizontalFlip of a batch in one gather, with no host synchronisation."""
    B, C, H, W = x.shape
    dy, dx, flip = params
    padded = F.pad(x, (padding,) * 4)  # zeros, like torchvision's default fill
    rows = dy + torch.arange(H, device=x.device)  # (B, H)
    cols = dx + torch.arange(W, device=x.device)  # (B, W)
    cols = torch.where(flip, cols.flip(1), cols)  # a flipped crop reads its columns backwards
    b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    c = torch.arange(C, device=x.device).view(1, C, 1, 1)
    return padded[b, c, rows.view(B, 1, H, 1), cols.view(B, 1, 1, W)]


def apply_erase(x, y0, x0, on, size):
    """RandomErasing(value=0) of a normalised batch (0 is the mean colour): a size x size square at (y0, x0), each
    (B, 1), in the images where `on`; one masked fill, no host sync."""
    B, C, H, W = x.shape
    rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    inside = ((rows >= y0) & (rows < y0 + size)).view(B, 1, H, 1) & ((cols >= x0) & (cols < x0 + size)).view(B, 1, 1, W)
    return x.masked_fill(inside & on.view(B, 1, 1, 1), 0.0)


class TensorLoader:
    """uint8 images on the training device, shuffled and augmented there (crop, flip; `erase` > 0: random erasing of
    a quarter-side square with that probability), normalised with the guide's constants, or with `raw` left uint8
    for a model that preprocesses its own (CLIP); draws depend only on (seed, epoch), so a resumed run sees the
    same batches. Under torchrun each process takes its slice of every global batch, or a shard to evaluate."""

    def __init__(self, images, labels, batch_size, device, train, seed=0, rank=0, world_size=1, erase=0.0, raw=False):
        self.total = len(labels)
        if not train:  # a contiguous shard per process
            shard = slice(self.total * rank // world_size, self.total * (rank + 1) // world_size)
            images, labels = images[shard], labels[shard]
        self.device = torch.device(device)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.batch_size, self.train, self.seed, self.epoch = batch_size, train, seed, 0
        self.rank, self.world_size, self.erase, self.raw = rank, world_size, erase, raw
        self.mean, self.std = torch.tensor(CIFAR_MEAN, device=self.device), torch.tensor(CIFAR_STD, device=self.device)

    def __len__(self):
        if self.train:
            return self.total // (self.batch_size * self.world_size)  # the ragged tail is dropped
        return -(-len(self.labels) // self.batch_size)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        if not self.train:
            for i in range(0, len(self.labels), self.batch_size):
                rows = slice(i, i + self.batch_size)
                yield normalize(self.images[rows], self.mean, self.std), self.labels[rows]
            return
        g = torch.Generator(device=self.device).manual_seed(derived_seed(self.seed, "batches", self.epoch))
        order = torch.randperm(self.total, device=self.device, generator=g)
        global_batch = self.batch_size * self.world_size
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        side = self.images.shape[-1]  # a generator of its own: without erasing, the batches are as before
        e = torch.Generator(device=self.device).manual_seed(derived_seed(self.seed, "erase", self.epoch))
        for i in range(len(self)):
            idx = order[i * global_batch:(i + 1) * global_batch][mine]
            params = [p[mine] for p in crop_flip_params(global_batch, generator=g, device=self.device)]
            x = apply_crop_flip(self.images[idx], params)
            if self.raw:
                yield x, self.labels[idx]
                continue
            x = normalize(x, self.mean, self.std)
            if self.erase:  # drawn for the global batch, as the crops: any process count sees the same squares
                corners = torch.randint(0, side - side // 4 + 1, (2, global_batch, 1), device=self.device, generator=e)
                on = torch.rand(global_batch, 1, device=self.device, generator=e) < self.erase
                x = apply_erase(x, corners[0][mine], corners[1][mine], on[mine], side // 4)
            yield x, self.labels[idx]


# ----------------------------------------------------------------------------------------------------
# Patching

def img_to_patch(x, patch_size, flatten_channels=True):
    """[B, C, H, W] -> [B, num_patches, C*P*P] (or [B, num_patches, C, P, P]): the study guide's function."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // patch_size, patch_size, W // patch_size, patch_size)
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, H', W', C, P, P]
    x = x.flatten(1, 2)  # [B, H'*W', C, P, P]
    if flatten_channels:
        x = x.flatten(2, 4)  # [B, H'*W', C*P*P]
    return x


# ----------------------------------------------------------------------------------------------------
# Classification metrics

def confusion_matrix(preds, targets, num_classes):
    """[K, K] counts, rows = true class, columns = predicted class."""
    idx = targets.long().cpu() * num_classes + preds.long().cpu()
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def accuracy_from(cm):
    """Top-1 accuracy from a confusion matrix, computed on integers (no float32 noise in the summary)."""
    return int(cm.diag().sum()) / max(int(cm.sum()), 1)


def per_class_accuracy(cm):
    """Per true class, the fraction predicted right; None for a class with no test image."""
    return [int(cm[k, k]) / int(cm[k].sum()) if cm[k].sum() else None for k in range(len(cm))]


# ----------------------------------------------------------------------------------------------------
# Seeds and the captured step (CUDA graphs)

def derived_seed(*parts):
    """A 63-bit seed for one random stream, e.g. (seed, "dropout", epoch, rank): hashing keeps streams apart."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def undo_steps(tensors, optimizers, rng=None):
    """A function that puts back what optimizer steps from now on change: `tensors` (weights, buffers), the
    optimizers' state (new state back to zero, as a fresh optimizer's) and `rng`'s state (torch or torch.cuda)."""
    saved = [t.detach().clone() for t in tensors]
    before = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
              for opt in optimizers for p, s in opt.state.items()}
    rng_state = rng.get_rng_state() if rng else None

    def undo():
        for t, w in zip(tensors, saved):
            t.detach().copy_(w)
        for opt in optimizers:
            for p, state in opt.state.items():
                old = before.get(id(p), {})
                for k, v in state.items():
                    if torch.is_tensor(v) and k in old:
                        v.copy_(old[k])
                    elif torch.is_tensor(v):
                        v.zero_()
        if rng:
            rng.set_rng_state(rng_state)
    return undo


class CapturedStep:
    """`step(*batch)` recorded once as a CUDA graph and replayed for every batch copied into its input buffers: the
    step's hundreds of kernels launched at once instead of one Python call each. `step` must set the gradients to
    None first (backward then writes them in the graph's own memory) and read nothing back to the host. Warm-up
    steps run first, on a side stream as torch asks; what they change (`state`: weights, buffers, running
    statistics; the optimizers; the generator dropout draws from) is undone, so training starts where an eager run
    would, and an eager fallback after a failed capture starts from the weights as they were."""

    def __init__(self, step, batch, state, optimizers, warmup=3):
        self.batch = [t.clone() for t in batch]  # clone keeps the memory format (channels_last)
        undo = undo_steps(state, optimizers, torch.cuda if self.batch[0].is_cuda else torch)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    step(*self.batch)
            torch.cuda.current_stream().wait_stream(side)
            undo()
            for opt in optimizers:  # the warm-up's gradients freed before the capture starts, not during it
                opt.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                step(*self.batch)
            torch.cuda.synchronize()
        except BaseException:
            torch.cuda.synchronize()
            undo()
            for opt in optimizers:  # gradients in the half-built graph's pool: let capture_or_none free it
                opt.zero_grad(set_to_none=True)
            raise

    def __call__(self, *batch):
        for static, new in zip(self.batch, batch):
            static.copy_(new)
        self.graph.replay()


# ===== Run plumbing: nothing below changes what is trained =====

# Every from_pretrained of a model passes these: transformers >= 5.x would otherwise fetch kernels from the Hub and
# swap them into the model at train()/eval() (code from the network, other numbers offline than online).
NO_HUB_KERNELS = {"use_kernels": False}


# ----------------------------------------------------------------------------------------------------
# Errors and the command line: every way a run ends early is one line on stderr

class DataError(Exception):
    """Bad input (a flag, the data, a checkpoint); the message says what is wrong and what to do."""


class NonFiniteLoss(ArithmeticError):
    """The training loss became NaN or infinite; the message names the step and learning rate."""


class OutputWriteError(OSError):
    """An output file (checkpoint, summary, picture, ...) could not be written (full disk, ...); the previous
    version of that file, if any, is intact."""


CheckpointWriteError = OutputWriteError  # the name the scripts and tests have used


def error_line(error, limit=200):
    """An exception in one short line, for a fallback's log: its type and the first line of its message, if any
    (some errors, such as a bare AssertionError, have none)."""
    first = (str(error).strip().splitlines() or [""])[0][:limit]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


class StopRun(Exception):
    """The run cannot go on (the message says what to do); `code` is the exit status (a notebook: RunFailed)."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


class RunFailed(Exception):
    """In a notebook, a run that ends early raises this instead of SystemExit: the cell shows the one line (no
    traceback: IPython calls _render_traceback_) and Run All stops there. `code` is the exit status a shell gets."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code

    def _render_traceback_(self):
        return [str(self)]


def in_notebook():
    """True inside a Jupyter (or Colab) kernel: main() was called from a cell or by %run, not by python."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and hasattr(shell, "kernel")


def parse(parser, argv):
    """(flags, the names of those typed). argv: a list, a string (split as a shell splits it), or None: the command
    line, which in a notebook's kernel is the kernel's own (then no flags; under %run, the flags after the name)."""
    if isinstance(argv, str):
        import shlex
        argv = shlex.split(argv, posix=os.name != "nt")  # Windows paths keep their backslashes, and their quotes:
        argv = [a[1:-1] if len(a) > 1 and a[0] == a[-1] and a[0] in "'\"" else a for a in argv]  # taken off
    elif argv is None and in_notebook() and kernel_command_line():
        argv = []
    return parser.parse_args(argv), given_flags(parser, argv)


def kernel_command_line():
    """sys.argv is the kernel's own (ipykernel_launcher.py -f .../kernel-*.json, Colab's launcher): not %run's."""
    launcher = Path(sys.argv[0]).name.endswith("kernel_launcher.py")
    return launcher or (len(sys.argv) > 2 and sys.argv[1] == "-f" and sys.argv[2].endswith(".json"))


@contextmanager
def one_line_errors(script, memory_hint="--batch-size"):
    """The one path from a failure to its one-line message: bad input (DataError, argparse's included) exits 2;
    Ctrl-C 130, with the resume command; out of GPU memory, a non-finite loss, a failed checkpoint write 1 (in a
    notebook: RunFailed with the line, and --help just prints). The script fills in the report (saved(): what is
    on disk; resume: the file --resume takes). An output folder this run created and left empty is removed. The
    process-wide state a run changes (random generators, cuDNN's autotuner, transformers' progress bars) is put
    back afterwards, and the run's own peak memory is measured (peak_memory_mb)."""
    global _run_memory
    report = SimpleNamespace(script=script, saved=lambda: "nothing was saved", resume=None, out_dir=None,
                             created_out_dir=False, created_parents=[], lock=None)
    restore = save_process_state()
    memory = _run_memory = RunMemory()
    if torch.cuda.is_initialized():  # an earlier run in this process (a notebook): this run's peak starts here
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
    try:
        yield report
    except SystemExit as e:
        if not (in_notebook() and e.code in (0, None)):  # --help in a notebook: printed, nothing more
            raise
    except StopRun as e:
        _stop(script, str(e), e.code, report)
    except DataError as e:
        _stop(script, str(e), 2, report)
    except KeyboardInterrupt:
        resume = report.resume and Path(report.resume).exists()
        hint = f"\nresume with: python {script_path(script)} --resume {report.resume}" if resume else ""
        if resume and in_notebook():  # one line in the cell, and the way a cell resumes
            hint = f"; resume with {script}.main([\"--resume\", {str(report.resume)!r}])"
        _stop(script, f"interrupted; {report.saved()}{hint}", 130, report, prefix="")
    except torch.OutOfMemoryError:
        _stop(script, f"out of GPU memory; try a smaller {memory_hint}; {report.saved()}", 1, report)
    except NonFiniteLoss as e:
        _stop(script, f"{e}; try a lower --lr (or a smaller --grad-clip); {report.saved()}", 1, report)
    except OutputWriteError as e:
        _stop(script, f"{e}; free some space or pick another --out-dir", 1, report)
    finally:
        if report.lock is not None:  # main() may be called again in the same process (a notebook)
            report.lock.close()
            report.lock = None
        memory.close()
        restore()


def script_path(script):
    """The script as the user ran it (`python ../vit_scratch.py` from elsewhere), so that a printed command works
    pasted as it is; its bare name where it was not run as a file (a test, a notebook)."""
    ran = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    return shlex.quote(str(ran)) if ran is not None and ran.name == f"{script}.py" else f"{script}.py"


def _stop(script, message, code, report, prefix="error: "):
    out = report.out_dir
    if report.created_out_dir and out and out.is_dir() and {p.name for p in out.iterdir()} <= {LOCK_FILE}:
        (out / LOCK_FILE).unlink(missing_ok=True)  # a failed run leaves no empty folder behind
        out.rmdir()
        for parent in report.created_parents:  # nor the runs/<script>/ made for it
            with suppress(OSError):
                parent.rmdir()  # only while empty: another run's folder keeps it
    if in_notebook():
        raise RunFailed(f"{script}.py: {prefix}{message}", code) from None
    print(f"{'' if prefix else chr(10)}{script}.py: {prefix}{message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def save_process_state():
    """A function that puts back what a run (or a Python API call such as lora_caption.load_trained) changes in the
    process: torch's random generators (CPU, CUDA's: as they were, or seeded as they would have been if the run
    started CUDA; MPS's), cudnn.benchmark, the progress bars of transformers and huggingface_hub."""
    cpu, seed, benchmark = torch.get_rng_state(), torch.initial_seed(), torch.backends.cudnn.benchmark
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    mps = torch.mps.get_rng_state() if torch.backends.mps.is_available() else None
    transformers_bars, hub_bars = _bars_on()

    def restore():  # each part on its own: a failure here must not hide the run's own ending
        torch.set_rng_state(cpu)
        torch.backends.cudnn.benchmark = benchmark
        with suppress(Exception):  # a failed graph capture can leave CUDA's generator unusable
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            elif torch.cuda.is_initialized():  # started by the run: as a first use after the user's seed would be
                torch.cuda.manual_seed_all(seed)
        with suppress(Exception):
            if mps is not None:
                torch.mps.set_rng_state(mps)
        with suppress(Exception):
            transformers_logging, hub = sys.modules.get(TRANSFORMERS_LOGGING), sys.modules.get(HUB_UTILS)
            hub_now = _bars_on()[1] is not False  # the run's ending state; on if the hub is not loaded
            if transformers_logging is not None:  # loaded by the run: as transformers starts, with the hub's setting
                on = transformers_bars if transformers_bars is not None else hub_now
                (transformers_logging.enable_progress_bar if on else transformers_logging.disable_progress_bar)()
            on = hub_bars if hub_bars is not None else hub_now
            if hub is not None and on != _bars_on()[1]:  # after transformers, whose switch sets the hub's too;
                (hub.enable_progress_bars if on else hub.disable_progress_bars)()  # each also resets group settings
    return restore


TRANSFORMERS_LOGGING, HUB_UTILS = "transformers.utils.logging", "huggingface_hub.utils"


def _bars_on():
    """(transformers' progress bars on, huggingface_hub's on), None for a library not loaded yet."""
    transformers_logging, hub = sys.modules.get(TRANSFORMERS_LOGGING), sys.modules.get(HUB_UTILS)
    return (transformers_logging.is_progress_bar_enabled() if transformers_logging is not None else None,
            not hub.are_progress_bars_disabled() if hub is not None else None)


class RunMemory:
    """The run's own peak resident memory on a CPU: the process's peak if the run raised it (exact), else the
    highest of samples every 20 ms (a notebook that ran a larger run before: the process's peak is that run's)."""

    def __init__(self):
        now = _rss_mb()  # None where /proc is missing: the process's peak only
        self.start_peak, self.sampled, self.done = _max_rss_mb(), now or 0.0, threading.Event()
        if now is not None:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self.done.wait(0.02):
            self.sampled = max(self.sampled, _rss_mb())

    def peak(self):
        now = _max_rss_mb()
        return now if now > self.start_peak else max(self.sampled, _rss_mb() or 0.0)

    def close(self):
        self.done.set()


def _max_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rss_mb():
    """The resident memory now (Linux), None elsewhere."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return None


_run_memory = None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default once, and only where it says something (not None, not a switch's False); a flag that a
    recipe sets shows each recipe's value instead."""

    def __init__(self, prog, recipes=None):
        super().__init__(prog)
        self.recipes = recipes or {}

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None and self.recipes and all(action.dest in r for r in self.recipes.values()):
            values = ", ".join(f"{name}: {_shown(r[action.dest])}" for name, r in self.recipes.items())
            return f"{text} (recipe {values})"
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or hidden or not action.option_strings:  # 0 and 0.0 are shown: they say something
            return text
        return f"{text} (default: %(default)s)"


def _shown(value):
    """A recipe's value as --help shows it: - for none, on / off for a switch, 1e-3 as 0.001."""
    if value is None or isinstance(value, bool):
        return {None: "-", True: "on", False: "off"}[value]
    return f"{value:g}" if isinstance(value, float) else str(value)


def make_parser(doc, script, recipes=None):
    """A parser described by the docstring's first paragraph, its commands as epilog, errors as DataError; with
    `recipes` ({name: {flag: value}}) --help shows each recipe's value of the flags they set."""
    examples = [line for line in doc.splitlines() if line.split()[:1] in (["python"], ["torchrun"])]
    parser = argparse.ArgumentParser(prog=f"{script}.py", description=doc.split("\n\n")[0],
                                     formatter_class=functools.partial(HelpFormatter, recipes=recipes),
                                     epilog="examples:\n" + "\n".join(examples) if examples else None)

    def error(message):  # "argument --lr: must be positive, got 0" -> "--lr must be positive, got 0"
        raise DataError(re.sub(r"^argument (-[\w-]+)(?:/[\w/-]+)?: (must .*)", r"\1 \2", message))
    parser.error = error
    return parser


# The flags that describe the machine and the run folder, not the experiment: on --resume they come from the command
# line, not the checkpoint (a script adds its own machine flags to these).
RUN_FLAGS = ("device", "eager", "no_progress", "no_plots", "overwrite")


def add_run_flags(parser, script, pictures, resume="a run folder or its last.pt", eager_when="CUDA"):
    """Every script's machine and run-folder flags, after its experiment's (`resume=None`: it declares its own)."""
    a = parser.add_argument
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto picks cuda, then mps, then cpu")
    a("--eager", action="store_true",
      help=f"{eager_when}: run each step eagerly instead of replaying a captured CUDA graph")
    a("--out-dir", help=f"where results go (default: a new folder runs/{script}/<date-time>)")
    a("--overwrite", action="store_true", help="replace the results of another run in --out-dir")
    if resume:
        a("--resume", help=f"continue from {resume}; its flags are kept (--epochs and --max-steps may grow)")
    a("--no-progress", action="store_true", help="no tqdm bars (they are off anyway when stderr is not a terminal)")
    a("--no-plots", action="store_true", help=f"no pictures ({pictures})")


# argparse types: each flag's range is checked where the flag is declared (type=positive_int, ...)

def _number_type(kind, ok, rule):
    def parse(text):
        value = kind(text)  # a ValueError: argparse says "invalid int value: 'two'"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {value}")
        return value
    parse.__name__ = kind.__name__  # argparse's own message for a non-number: "invalid int value: 'two'"
    return parse


positive_int = _number_type(int, lambda v: v > 0, "must be positive")
positive_float = _number_type(float, lambda v: v > 0, "must be positive")
non_negative = _number_type(float, lambda v: v >= 0, "must be a number >= 0")
fraction = _number_type(float, lambda v: 0 <= v < 1, "must be in [0, 1)")


def given_flags(parser, argv):
    """The destinations of the flags typed on the command line, whatever their values."""
    actions = [a for a in parser._actions if a.option_strings]
    defaults = [a.default for a in actions]
    for a in actions:
        a.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(argv)))
    finally:
        for a, d in zip(actions, defaults):
            a.default = d


def flag(name):
    return "--" + name.replace("_", "-")


def resumed_args(saved, cli, given, runtime, extendable=(), parser=None, state=None):
    """The flags a checkpoint saved, with the `runtime` ones from the command line. Other typed flags must
    equal the saved ones (DataError naming both as a user types them), except `extendable` ones (--epochs,
    --max-steps), which may grow but not shrink: a resumed run can be extended, never shortened. A model folder the
    run read (MOVABLE_FLAGS) may be given at a new place once the old one is gone. With the checkpoint's `state`
    (its epoch and step), an extension that would train nothing is refused too."""
    cli.resume = str(checkpoint_arg(cli.resume))  # a run folder stands for its checkpoint
    args = argparse.Namespace(**saved)
    for action in parser._actions if parser else []:  # a flag added after the checkpoint was written: its default
        if action.dest != "help" and not hasattr(args, action.dest):
            setattr(args, action.dest, action.default)
    for name in runtime:
        setattr(args, name, getattr(cli, name))
    for name in sorted(given - set(runtime) - {"resume", "out_dir", "data_dir"}):
        new, old = getattr(cli, name), getattr(args, name)  # a flag newer than the checkpoint: its default
        if new == old:
            continue
        moved = name in MOVABLE_FLAGS and old and Path(old).is_absolute() and not Path(old).exists()  # a local folder
        if moved and Path(new).expanduser().is_dir():  # (recorded resolved) that is gone
            if os.environ.get("RANK", "0") == "0":  # under torchrun: said once
                print(f"{flag(name)} {new}: in place of the run's {old}, which is gone (moved?)", flush=True)
            setattr(args, name, new)  # the same model at its new place; a model of other shapes fails to load
            continue
        if name not in extendable:
            raise DataError(f"{as_typed(parser, name, new)} differs from the checkpoint's {as_typed(parser, name, old)}"
                            f": a resumed run keeps its settings; drop {flag(name)}, or start a new run to change it")
        if (math.inf if new is None else new) < (math.inf if old is None else old):
            below = f"would cap a run started without {flag(name)} (it runs all its --epochs)"
            if old is not None:
                below = f"is below the run's {as_typed(parser, name, old)}"
            raise DataError(f"{as_typed(parser, name, new)} {below}: a resumed run can be extended, not shortened; "
                            f"start a new run for a shorter one")
        setattr(args, name, new)
    if "out_dir" in given and Path(cli.out_dir).resolve() != Path(cli.resume).parent.resolve():
        raise DataError(f"--out-dir {cli.out_dir}: a resumed run continues in its own folder "
                        f"({Path(cli.resume).parent}); copy that folder first to branch off")
    args.resume, args.out_dir = cli.resume, str(Path(cli.resume).parent)
    if "data_dir" in given:
        args.data_dir = cli.data_dir  # the script checks that it holds the run's data
    if state is not None:
        check_extension(args, saved, state)
    return args


def check_extension(args, saved, state):
    """More --epochs, or more --max-steps, trains nothing while the other limit still holds the run where it
    stopped (the run would only be evaluated again): one line naming the flag to raise as well."""
    raised = [name for name in ("epochs", "max_steps") if getattr(args, name) != saved.get(name)]
    if not raised:
        return  # a plain resume: a finished run is evaluated as it left off
    asked = f"{flag(raised[0])} {getattr(args, raised[0])}"
    if args.max_steps is not None and state["step"] >= args.max_steps:
        raise DataError(f"{asked} trains nothing: --max-steps {args.max_steps} still stops the run where it is (step "
                        f"{state['step']}); raise --max-steps as well")
    if "batch" not in state and state["epoch"] >= args.epochs:  # per-epoch checkpoints (the captioner's: its own)
        raise DataError(f"{asked} trains nothing: the run has done all its --epochs {args.epochs} (a batch that "
                        f"--max-steps left out of the last one is not trained on resume); raise --epochs as well")


def as_typed(parser, name, value):
    """A flag's value as a user types it: --tta / --no-tta, --eager, --widths 32 64; (no --limit-train) for unset."""
    action = next((a for a in parser._actions if a.dest == name), None) if parser else None
    if isinstance(action, argparse.BooleanOptionalAction):
        return action.option_strings[0] if value else action.option_strings[-1]
    if isinstance(action, argparse._StoreTrueAction):
        return flag(name) if value else f"(no {flag(name)})"
    if value is None:
        return f"(no {flag(name)})"
    if isinstance(value, (list, tuple)):
        return f"{flag(name)} {' '.join(map(str, value))}"
    return f"{flag(name)} {value}"


@dataclass
class Progress:
    """What a classifier's checkpoint records of its run besides weights and flags (vit, cnn; clip adds a field)."""
    epoch: int = 0
    step: int = 0
    best_acc: float = -1.0
    train_seconds: float = 0.0
    images_seen: int = 0


def resuming_line(path, progress, steps_per_epoch, total_steps):
    """What a run resumed from a per-epoch checkpoint prints first. Batches of an epoch that --max-steps cut
    short are not trained on resume (the next epoch starts): the line says how many."""
    line = f"resuming {path} after epoch {progress.epoch} (step {progress.step})"
    cut = progress.epoch * steps_per_epoch - progress.step
    if cut > 0 and progress.step < total_steps:
        line += f"; --max-steps stopped that epoch {cut} of {steps_per_epoch} batches short (skipped)"
    return line


# ----------------------------------------------------------------------------------------------------
# The captured step's set-up: the one-line fallback to eager, the learning rates the graph reads

def capture_or_none(build, device):
    """`build()` (a CapturedStep), timed and said in one line; None where it fails, the eager step then
    training instead: one line names the error (its cause, where torch's follow-up "during capture" error hides it)
    and the half-built graph's memory is freed. A capture that left CUDA's random generator unusable (some torch
    versions do) stops the run in one line instead, since every later draw would fail."""
    import gc
    import time
    t0 = time.perf_counter()
    try:
        captured = build()
    except Exception as error:  # the fast path must not end the run
        while error.__context__ is not None and "during capture" in str(error):
            error = error.__context__
        why = error_line(error)
        gc.collect()  # the half-built graph and its memory pool
        if device.type == "cuda":  # (CapturedStep has waited for the device and undone its warm-up)
            torch.cuda.empty_cache()
        if not cuda_generator_works(device):
            raise StopRun(f"CUDA graph capture failed ({why}) and left CUDA's random generator unusable; nothing "
                          f"was lost: run the same command again with --eager") from None
        print(f"CUDA graph capture failed ({why}); training eagerly", flush=True)
        return None
    captured.seconds = time.perf_counter() - t0
    print(f"captured the training step as a CUDA graph in {captured.seconds:.1f}s", flush=True)
    return captured


def place_learning_rate(optimizer, peak, device, capture):
    """Each group's peak rate, and its current rate: under `capture` a device tensor, which the graph reads and the
    schedule fills in place (a float otherwise)."""
    for group in optimizer.param_groups:
        group["peak_lr"] = peak
        group["lr"] = torch.tensor(peak, dtype=torch.float32, device=device) if capture else float(peak)


def set_learning_rates(optimizers, factor):
    """Peak x factor into every group of `optimizers` (a list): a device tensor is filled in place, since the graph
    reads that very tensor (assigning a float would leave the graph on the old rate). Returns the first group's
    rate, for the log."""
    for opt in optimizers:
        for group in opt.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(group["peak_lr"] * factor)
            else:
                group["lr"] = group["peak_lr"] * factor
    return optimizers[0].param_groups[0]["peak_lr"] * factor


def place_adamw_state(optimizer, device, capture):
    """A loaded AdamW set up for this machine: the flags a checkpoint holds are the saving machine's (fused on CUDA;
    capturable under a CUDA graph), and fused and capturable AdamW keep their step counts on the device."""
    for group in optimizer.param_groups:
        group["fused"], group["capturable"] = device.type == "cuda", capture
    for state in optimizer.state.values():
        state["step"] = state["step"].to(device if device.type == "cuda" else "cpu", torch.float32)


def cuda_generator_works(device):
    """After a failed capture some torch versions leave the CUDA generator capturing: every draw then fails."""
    try:
        torch.rand(1, device=device)
        return True
    except RuntimeError:
        return False


# ----------------------------------------------------------------------------------------------------
# torchrun: one process per device; without torchrun everything below is a no-op

def pick_device(name, local_rank=0):
    """The device --device names (auto: cuda, then mps, then cpu); under torchrun, this process's GPU (LOCAL_RANK).
    A device PyTorch cannot use is one line."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda, but PyTorch sees no CUDA GPU (use --device cpu or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DataError("--device mps, but this PyTorch has no MPS backend (use --device cpu or auto)")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def api_device(device):
    """The device= of a Python API (load_trained, load_adapter): "auto", "cpu", "cuda", "cuda:1", "mps" or a
    torch.device; one PyTorch cannot use here is one DataError, as --device is."""
    if str(device) == "auto":
        return pick_device("auto")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DataError(f"device={device!r}: not a device; pass 'auto', 'cpu', 'cuda', 'cuda:1', 'mps' or a "
                        f"torch.device") from None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise DataError(f"device={str(device)!r}: PyTorch sees {gpus} CUDA GPU(s) here; pass 'cpu' or 'auto'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DataError(f"device={str(device)!r}: this PyTorch has no MPS backend; pass 'cpu' or 'auto'")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DataError(f"device={str(device)!r}: the scripts run on cpu, cuda or mps")
    return device


def init_distributed(device_name):
    """(rank, world_size, local_rank), joining the process group (NCCL or gloo) under torchrun; only rank 0 prints."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # one log, rank 0's; errors still reach stderr
    return dist.get_rank(), world_size, local_rank


def set_global_batch(args, world_size, resuming):
    """--batch-size is per process. A resumed run keeps its global batch, and so its schedule, whatever the number
    of processes now."""
    if resuming:
        if args.global_batch % world_size:
            raise DataError(f"--resume: the run's global batch {args.global_batch} does not split over "
                            f"{world_size} processes")
        args.batch_size = args.global_batch // world_size
    args.world_size, args.global_batch = world_size, args.batch_size * world_size


def wrap_distributed(model, device, world_size, sync_bn=False):
    """DistributedDataParallel under torchrun, the model itself otherwise (SyncBatchNorm keeps BatchNorm's keys)."""
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(value, world_size):
    if world_size > 1:
        import torch.distributed as dist
        dist.all_reduce(value)
    return value


# ----------------------------------------------------------------------------------------------------
# CIFAR-10 reading (load_cifar10's helpers): downloads, allow-listed pickles, odd files in ImageFolder trees, decoding,
# the decode cache

def _resize(x, size):
    x = F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def _load_torchvision_batches(batches):
    text = lambda v: v.decode("latin1") if isinstance(v, bytes) else v  # keys and names are bytes in some files

    def split(names):
        parts = [{text(k): v for k, v in _read_batch(batches / n).items()} for n in names]
        x = np.concatenate([np.asarray(p["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for p in parts])
        y = np.concatenate([np.asarray(p["labels"], dtype=np.int64) for p in parts])
        return torch.from_numpy(x), torch.from_numpy(y)

    train_x, train_y = split([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = split(["test_batch"])
    meta = {text(k): v for k, v in _read_batch(batches / "batches.meta").items()}
    return ImageDataset(train_x, train_y, test_x, test_y, [text(c) for c in meta["label_names"]], "torchvision")


def _decode_one(path, image_size):
    from PIL import Image
    im = open_rgb(path)
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _decode_split(root, files, image_size, log):
    """(images, labels) of one split, decoded in one thread (faster for tiny images); unreadable ones skipped."""
    images, labels, bad = [], [], []
    for rel, k in files:
        try:
            images.append(_decode_one(root / rel, image_size))
            labels.append(k)
        except Exception as e:
            bad.append(f"{rel} ({type(e).__name__})")
    if bad:
        log(f"skipped {len(bad)} unreadable image(s) in {root}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    if not images:
        raise DataError(f"no readable images under {root}")
    return np.stack(images), np.array(labels, dtype=np.int64)


def _class_folders(root):
    """The names of root's entries if it looks like one split of an ImageFolder tree: two or more entries, every one
    a folder with images in it (a shared ./data holding other datasets beside is no such split)."""
    with suppress(OSError):  # an unreadable folder: no split, the caller says what it finds
        entries = _visible(root) if root.is_dir() else []
        images = [e for e in entries if e.is_dir() and any(
            f.suffix.lower() in IMAGE_SUFFIXES for f in itertools.islice(Path(e).iterdir(), 100))]
        return [e.name for e in images] if len(entries) >= 2 and len(images) == len(entries) else []
    return []


def _download_cifar10(root, batches, download, resumed_from):
    """torchvision's download into `root`, or one line saying what is missing; a failed download leaves no folder
    behind, and a resumed run never downloads (load_run_cifar10)."""
    missing = (f"no CIFAR-10 found in {root}: pass --data-dir pointing at an ImageFolder tree (train/<class>/*, "
               f"test/<class>/*) or at torchvision's folder holding cifar-10-batches-py (downloaded when online)")
    splits = [name for name in ("train", "test") if (root / name).is_dir()]
    if splits:  # half an ImageFolder tree: said as such, and nothing downloaded beside it
        raise DataError(f"--data-dir {root}: has {splits[0]}/ but no {'test' if splits == ['train'] else 'train'}/; "
                        f"an ImageFolder tree needs both (train/<class>/*, test/<class>/*)")
    classes = _class_folders(root)
    if classes:  # one split of a tree, given one level too deep: a download would land among its classes
        raise DataError(f"--data-dir {root}: holds class folders of images ({', '.join(classes[:3])}, ...), not "
                        f"train/ and test/; pass the folder that holds train/ and test/")
    if resumed_from:
        raise DataError(f"--resume {resumed_from}: the run's data folder {root} no longer holds CIFAR-10 (moved or "
                        f"deleted?); pass --data-dir with the folder that holds it now")
    if root.exists() and not root.is_dir():
        raise DataError(f"--data-dir {root}: a file, not a folder; {missing.split(': ', 1)[1]}")
    if not download:
        raise DataError(missing)
    from torchvision.datasets import CIFAR10
    created = [p for p in (root, *root.parents) if not p.exists()]
    try:
        CIFAR10(root=str(root), train=True, download=True)
    except Exception as e:  # offline, proxy, disk full...: all mean the same thing to the user
        for folder in created:  # what the failed download made, if nothing else is in it
            with suppress(OSError):
                shutil.rmtree(folder) if folder == root and not batches.exists() else folder.rmdir()
        raise DataError(f"{missing}; the download failed: {type(e).__name__}: {e}") from None


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles: allow only what they hold (numpy arrays; protocol-2 files spell bytes as
    _codecs.encode), so that a tampered file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}  # protocol 5

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _read_batch(path):
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path} is missing: the torchvision CIFAR-10 folder is incomplete") from None
    except Exception as e:
        raise DataError(f"{path} is unreadable ({type(e).__name__}: {e}); delete the folder to re-download") from None


def _visible(folder):
    """A folder's entries by name (scandir: no system call per file), hidden ones (.DS_Store, ...) left out."""
    return sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)


def _list_imagefolder(root, image_size, log):
    """({split: [(path, class index)]}, class names, a key of every image's name, size and time for the decode
    cache). Non-images (by suffix) are reported and skipped."""
    classes = [e.name for e in _visible(root / "train") if e.is_dir()]
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders (expected train/<class>/<image>)")
    test_classes = [e.name for e in _visible(root / "test") if e.is_dir()]
    if not test_classes:
        raise DataError(f"{root / 'test'} has no class folders (expected test/<class>/<image>)")
    if test_classes != classes:
        missing = sorted(set(classes) ^ set(test_classes))
        raise DataError(f"train/ and test/ of {root} have different class folders: {missing}")
    files, others, broken, key = {}, [], [], hashlib.sha1(f"v1 {image_size}".encode())
    for split in ("train", "test"):
        entries = []
        for k, c in enumerate(classes):
            for e in _visible(root / split / c):
                stat = loop = None
                try:  # follows links: a link loop raises, a dangling link is no file
                    stat = e.stat() if e.is_file() else None
                except OSError as error:
                    loop = error.errno == errno.ELOOP
                if stat is not None:
                    entries.append((f"{split}/{c}/{e.name}", k, stat))
                elif e.is_symlink():
                    broken.append(f"{split}/{c}/{e.name} ({'link loop' if loop else 'dangling link'})")
        images = [(rel, k, st) for rel, k, st in entries if os.path.splitext(rel)[1].lower() in IMAGE_SUFFIXES]
        others += [rel for rel, _, _ in entries if os.path.splitext(rel)[1].lower() not in IMAGE_SUFFIXES]
        if not images:
            raise DataError(f"{root / split} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files[split] = [(rel, k) for rel, k, _ in images]
        key.update("".join(f"{rel} {k} {st.st_size} {st.st_mtime_ns}\n" for rel, k, st in images).encode())
    if others:
        log(f"ignored {len(others)} non-image file(s) in {root}: {', '.join(others[:3])}{' ...' * (len(others) > 3)}")
    if broken:
        log(f"skipped {len(broken)} broken link(s) in {root}: {', '.join(broken[:3])}{' ...' * (len(broken) > 3)}")
    return files, classes, key.hexdigest()


def _load_imagefolder_cached(root, image_size, log):
    """Decode the tree once: the arrays are cached beside it (in ~/.cache when that is read-only), keyed by the
    files' names, sizes and times; a cache that cannot be read is rebuilt."""
    files, classes, key = _list_imagefolder(root, image_size, log)
    name, names = f".decoded-{image_size}px.npz", ("train_x", "train_y", "test_x", "test_y")
    user = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vit-course"
    paths = [root / name, user / f"{hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]}{name}"]
    for path in filter(Path.is_file, paths):
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["fingerprint"]) == key:
                    return ImageDataset(*(torch.from_numpy(z[k]) for k in names), classes, "imagefolder")
        except Exception as e:  # cut short or corrupted: a miss
            log(f"the decode cache {path} could not be read ({type(e).__name__}); decoding the images again")
    arrays = dict(zip(names, [*_decode_split(root, files["train"], image_size, log),
                              *_decode_split(root, files["test"], image_size, log)]))
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, lambda f: np.savez(f, fingerprint=key, **arrays))
            break
        except OSError:
            continue  # read-only data folder: try the user cache
    return ImageDataset(*(torch.from_numpy(arrays[k]) for k in names), classes, "imagefolder")


# ----------------------------------------------------------------------------------------------------
# Run outputs: written atomically, so an interrupted run never leaves a half-written file behind

# What makes a folder another run's: a config.json alone is a run that stopped before any result, and is reused.
RESULT_FILES = ("metrics.jsonl", "summary.json", "last.pt", "best.pt", "training_state.pt", "adapter")
# everything a run writes into its folder: what --overwrite removes, so that no file of the replaced run stays
OUTPUT_FILES = (*RESULT_FILES, "config.json", "curves.png", "confusion.png", "attention.png", "captions.html")
INPUT_FLAGS = ("data_dir", "model", "adapter", "backbone", "prompts", "encoder", "decoder")  # what a run reads
MOVABLE_FLAGS = ("model", "backbone", "encoder", "decoder")  # local model folders a resume may find at a new place
CHECKPOINT_FILES = ("last.pt", "training_state.pt")  # what --resume takes, by script
LOCK_FILE = ".lock"  # held (flock) by the one process that writes into a run folder


def new_run_dir(script):
    """runs/<script>/<YYYYmmdd-HHMMSS>, or -2, -3, ... if taken (mkdir is atomic: no two runs share one)."""
    base = Path("runs") / script / f"{datetime.now():%Y%m%d-%H%M%S}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = base.with_name(f"{base.name}-{n}") if n > 1 else base
        with suppress(FileExistsError):
            path.mkdir()
            return path


def open_run_folder(args, ckpt, report, rank):
    """The run's folder, locked and proven writable before any work (rank 0 only; the others write nothing)."""
    if rank == 0:
        args.out_dir = str(prepare_out_dir(args.out_dir, report, args.overwrite, resuming=ckpt is not None,
                                           inputs=run_inputs(args)))
    return Path(args.out_dir or ".")


def run_inputs(args):
    """(flag, resolved path) of each local file or folder the run reads (a hub id or a keyword is no path)."""
    found = []
    for name in INPUT_FLAGS:
        value = getattr(args, name, None)
        if value and Path(value).expanduser().exists():
            found.append((flag(name), Path(value).expanduser().resolve()))
    return found


def check_inputs_kept(folder, inputs, removed=()):
    """A run must not write its results into a folder it reads (an --adapter's own), nor --overwrite remove what it
    reads (the --adapter or --model inside the run folder it replaces): that input would be lost. `removed`: the
    names --overwrite is about to remove from the folder."""
    folder = Path(folder).resolve()  # as the run will write it (no ~ expansion: prepare_out_dir does none)
    removed = [(folder / name).resolve() for name in removed]
    for option, source in inputs:
        if source == folder:
            raise DataError(f"--out-dir {folder} is the {option} folder this run reads: its results would be mixed "
                            f"into it; pick another --out-dir")
        lost = next((r for r in removed if r == source or r in source.parents), None)
        if lost:
            raise DataError(f"--out-dir {folder} --overwrite would delete {lost.name}, which holds the {option} this "
                            f"run reads ({source}); pick another --out-dir")


def replaced_files(folder):
    """What --overwrite removes from a folder that holds a run: every file a run writes there (a captioner run's
    model/ and base/ too), none of the user's own."""
    lora = (folder / "training_state.pt").exists() or run_owner(folder) == "lora_caption"  # not a user's model/
    names = OUTPUT_FILES + (("model", "base") if lora else ())
    return [name for name in names if (folder / name).exists() or (folder / name).is_symlink()]


def prepare_out_dir(path, report, overwrite=False, resuming=False, inputs=()):
    """The run's output folder (new under runs/ for None), proven writable and locked for this process before any
    work (a second run into the same folder is refused while this one lives); one holding another run's results is
    refused unless resuming or `overwrite` (which removes every file a run writes there). `inputs`: (flag, path) of
    what the run reads, which the folder must leave intact."""
    if path is not None:
        check_inputs_kept(path, inputs)  # before anything is written into it
    given, report.created_out_dir = path is not None, path is None or not Path(path).exists()
    target = Path(path) if given else Path("runs") / report.script / "new"
    report.created_parents = [p for p in target.parents if p != Path(".") and not p.exists()]  # deepest first
    try:
        path = report.out_dir = Path(path) if given else new_run_dir(report.script)
        path.mkdir(parents=True, exist_ok=True)
        lock = open(path / LOCK_FILE, "a+")
    except OSError as e:
        where = f"--out-dir {path}" if given else f"the default output folder {path or Path('runs') / report.script}"
        hint = "pass another --out-dir" if given else "pass --out-dir"
        tried = Path(path or Path("runs") / report.script)
        blocker = next((p for p in (tried, *tried.parents) if p.exists() and not p.is_dir()), None)
        why = f"{'it' if blocker == tried else blocker} is a file, not a folder" if blocker else e.strerror or e
        raise DataError(f"{where}: cannot write there ({why}); {hint}") from None
    hold_lock(lock, path, report)
    names = RESULT_FILES + (("model", "base") if report.script == "lora_caption" else ())  # its model folders
    previous = [name for name in names if (path / name).exists() or (path / name).is_symlink()] if not resuming else []
    if previous and not overwrite:
        owner = run_owner(path)
        if owner not in (None, report.script):
            raise DataError(f"--out-dir {path} holds a {owner}.py run ({', '.join(previous)}); pick a new folder, "
                            f"or add --overwrite to replace it")
        resume = next((f" (resume it with --resume {path / n})" for n in CHECKPOINT_FILES if n in previous), "")
        raise DataError(f"--out-dir {path} holds another run's results ({', '.join(previous)}){resume}; "
                        f"pick a new folder, or add --overwrite to replace them")
    # --overwrite: every file of the replaced run goes, so that none is left to mix with this run's
    replaced = list(dict.fromkeys([*previous, *replaced_files(path)])) if previous else []
    check_inputs_kept(path, inputs, replaced)
    for name in replaced:
        if (path / name).is_symlink() or not (path / name).is_dir():
            (path / name).unlink()
        else:
            shutil.rmtree(path / name)
    for stale in path.glob(".*.tmp"):  # left by a run killed while writing; the real files are intact
        stale.unlink(missing_ok=True)
    return path


def hold_lock(lock, path, report):
    """Take the run folder's lock for this process (released when main() ends), or refuse in one line."""
    try:
        import fcntl
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # Windows: a lock on the file's first byte
        import msvcrt
        try:
            lock.seek(0)
            msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            lock.close()
            raise DataError(f"--out-dir {path} is in use by a run still going; wait for it to end, or pick another "
                            f"folder") from None
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        report.created_out_dir = False  # the folder is the other run's: a failed start must not remove it
        raise DataError(f"--out-dir {path} is in use by a run still going ({holder}); wait for it to end, or pick "
                        f"another folder") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()} on {socket.gethostname()}, started {datetime.now():%Y-%m-%d %H:%M:%S}")
    lock.flush()
    report.lock = lock


def run_owner(path):
    """Which script wrote the run in `path` (from its summary.json or checkpoint), None if unknown."""
    with suppress(Exception):
        return json.loads((path / "summary.json").read_text())["script"]
    for name in CHECKPOINT_FILES:
        with suppress(Exception):  # mmap: only the small "script" entry is read from disk
            return torch.load(path / name, map_location="cpu", weights_only=True, mmap=True)["script"]
    return None


def _atomic_write(path, write):
    """write(file) into a temporary file, renamed over `path`: a crash or full disk leaves the old file intact
    (OutputWriteError says so). Ctrl-C waits until the file is complete (inside torch.save it would surface as a
    RuntimeError); a process that ignores Ctrl-C (nohup, a background job) keeps ignoring it."""
    path, held = Path(path), []
    # Signal handlers belong to the main thread; an ignored SIGINT stays ignored.
    main = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) != signal.SIG_IGN
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True)) if main else None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if main:
            signal.signal(signal.SIGINT, previous)
        raise _write_error(path, e) from None
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def _write_error(path, error):
    if isinstance(error, OutputWriteError):
        return error
    return OutputWriteError(error.errno, f"could not write {path} ({error.strerror or error}); the previous "
                                         f"{Path(path).name}, if any, is intact")


def save_figure(fig, path):
    """A matplotlib figure as a PNG, atomically (a full disk leaves the previous picture and says so)."""
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return path


def save_checkpoint(obj, path, also=None):
    """torch.save, atomically; `also` (best.pt) becomes the same file: a hard link (a copy where links fail)."""
    try:
        _atomic_write(path, lambda f: torch.save(obj, f))
        if also:
            tmp = Path(also).with_name(f".{Path(also).name}.link.tmp")  # a stale one is removed at the next start
            tmp.unlink(missing_ok=True)
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, also)
    except OSError as e:
        raise _write_error(path, e) from None


def save_adapter(model, out_dir, base_model=None):
    """A peft model's adapter into out_dir/adapter/, swapped in whole (save_folder). `base_model` (the checkpoint
    it adapts) goes into adapter_config.json, so a later load can check it."""
    if base_model is not None:
        for config in model.peft_config.values():
            config.base_model_name_or_path = str(base_model)
    save_folder(out_dir / "adapter", [model])


def save_folder(final, parts, files=None):
    """save_pretrained of each part (a model, tokenizer, processor; or (model, state_dict)) and `files` ({name:
    text}) into a folder written beside `final` and swapped in whole: a failed write leaves the previous one intact."""
    final = Path(final)
    tmp, old = final.with_name(f"{final.name}.tmp"), final.with_name(f"{final.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for part in parts:
            part, state = part if isinstance(part, tuple) else (part, None)
            part.save_pretrained(tmp, **({"state_dict": state} if state is not None else {}))
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputWriteError(e.errno, f"could not write {final.name}/ ({e.strerror or e}); the previous {final} "
                                        f"is intact") from None
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def trainable_state(model):
    """The parameters that train (a LoRA model's adapters, a head), as CPU copies for a checkpoint."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def write_json(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_summary(path, summary):
    """summary.json, and the dict main() returns: a Summary, which a notebook shows in one line, not ~85."""
    write_json(path, summary)
    return Summary(summary)


class Summary(dict):
    """A run's summary.json as a dict; its repr is one line (script, score, time, folder)."""

    def __repr__(self):
        score = (f"test_acc {self['test_acc']:.2%}" if isinstance(self.get("test_acc"), float) else
                 f"BLEU-4 {self['bleu4']:.4f}" if isinstance(self.get("bleu4"), float) else "no score")
        folder = (self.get("args") or {}).get("out_dir")
        return (f"<{self.get('script')} summary: {score}, {self.get('train_seconds') or 0:.1f}s training"
                f"{f', in {folder}' if folder else ''}; a dict of {len(self)} keys>")

    def _repr_pretty_(self, printer, cycle):  # IPython's display of a cell's value
        printer.text(repr(self))


class Table(str):
    """The --compare table: printed by the run; as a cell's value it says so instead of echoing it quoted."""

    def __repr__(self):
        return f"<comparison table of {self.count(chr(10)) - 1} runs, printed above; a str>"

    def _repr_pretty_(self, printer, cycle):
        printer.text(repr(self))


def write_text_atomic(path, text):
    _atomic_write(path, lambda f: f.write(text.encode()))


def folder_bytes(path):
    """The bytes of every file under a folder (a saved adapter or model)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def read_jsonl(path):
    """The rows of a .jsonl file; a line cut short (a full disk, a kill mid-write) is left out."""
    path = Path(path)
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def append_jsonl(path, obj):
    try:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")
    except OSError as e:  # the lines already there stay; a half line is dropped by the next resume's trim
        raise OutputWriteError(e.errno, f"could not add a line to {path} ({e.strerror or e})") from None


def trim_metrics(path, keep):
    """Drop the metric lines a checkpoint does not cover (the run died after logging them); keep(row) -> bool."""
    path = Path(path)
    if path.exists():
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if keep(r)))


def load_checkpoint(path, script, option="--resume"):
    """A checkpoint of plain values (weights_only=True: nothing in it can run code) written by `script`."""
    path = checkpoint_arg(path, option)
    if not zipfile.is_zipfile(path):  # what torch.save writes
        with open(path, "rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"
        if zip_start:  # a zip archive whose end is missing or garbled: a copy or write cut short
            raise DataError(f"{option} {path}: truncated or damaged ({path.stat().st_size:,} bytes, its end is "
                            f"missing); use best.pt or another copy of the run")
        raise DataError(f"{option} {path}: not a PyTorch checkpoint; pass the last.pt of a run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch refused a pickled object (it could run code), or the archive is damaged
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{option} {path}: not a checkpoint of plain values, refused ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != script:
        found = ckpt.get("script") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DataError(f"{option} {path}: written by {found!r}, not by {script}.py")
    return ckpt


def adapter_folder(path):
    """An --adapter value as the adapter folder: a LoRA run's folder stands for the adapter/ it holds."""
    path = Path(path).expanduser()
    return path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path


def checkpoint_arg(value, option="--resume"):
    """A --resume value as the checkpoint file: a run folder stands for the checkpoint it holds. Usable as an
    argparse type."""
    path = Path(value).expanduser()
    if path.is_dir():
        found = [path / n for n in CHECKPOINT_FILES if (path / n).is_file()]
        if not found:
            raise DataError(f"{option} {value}: this folder holds no {' or '.join(CHECKPOINT_FILES)}; pass a run "
                            f"folder or its checkpoint")
        return found[0]
    if not path.is_file():
        raise DataError(f"{option} {value}: no such file or folder")
    return path


def load_weights(model, ckpt, path, expected_config=None):
    """A checkpoint's weights into `model`; a mismatch with `expected_config` names the fields that differ."""
    saved = ckpt.get("model_config", {})
    differ = [f"{k}: saved {saved.get(k)}, now {v}" for k, v in (expected_config or {}).items() if saved.get(k) != v]
    if differ:
        raise DataError(f"{path}: its weights do not fit the model its flags and data describe ({', '.join(differ)})")
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise DataError(f"{path}: its weights do not fit the model its flags describe "
                        f"({str(e).strip().splitlines()[-1].strip()})") from None


def check_same_data(ckpt, data, data_dir):
    """On --resume with a --data-dir of its own: that folder must hold the data the run was trained on."""
    if ckpt.get("data_fingerprint") not in (None, data.fingerprint):
        raise DataError(f"--data-dir {data_dir} holds other data than the run was trained on "
                        f"({ckpt['args'].get('data_dir')}); drop --data-dir to use that folder")


def check_model_folder(name, named, hub_example):
    """A model name that can only be a local path must be a folder: transformers would try it as a hub id and talk
    about repo ids. A hub id is "owner/name": no leading '/', '.' or '~', one '/' at most, no backslash."""
    name = str(name)  # a pathlib.Path from the Python API too
    path = Path(name).expanduser()
    local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or path.exists()
    if local and not path.is_dir():
        raise DataError(f"{named}: {'not a folder' if path.exists() else 'no such folder'} (a local model is a "
                        f"save_pretrained folder; a hub id looks like {hub_example})")


def no_folder_here(name):
    """For a hub-load failure of a name that may be a mistyped local path (models/clip-tny beside a models/ folder:
    it reads as a hub id): what to add to the message."""
    parent = Path(str(name)).expanduser().parent
    return f"; there is no folder {name} here either" if parent != Path(".") and parent.is_dir() else ""


def load_run_cifar10(args, ckpt, image_size=32, log=print):
    """CIFAR-10 for a run: a resumed run reads its own folder unless --data-dir names another, which must hold the
    same data; it never downloads."""
    own_folder = ckpt is not None and args.data_dir == ckpt["args"]["data_dir"]
    data = load_cifar10(args.data_dir, download=not args.no_download and ckpt is None, image_size=image_size,
                        log=log, resumed_from=args.resume if own_folder else None)
    if ckpt:
        check_same_data(ckpt, data, args.data_dir)
    return data


def load_classifier_data(args, ckpt, image_size=32, log=print):
    """A CIFAR-10 classifier run's data (vit_scratch, cnn_baseline): (data, train indices, test indices), as
    load_run_cifar10 reads it; the subsets are class-stratified, and the training set must hold one global batch."""
    data = load_run_cifar10(args, ckpt, image_size, log)
    train_idx = stratified_subset(data.train_y, args.limit_train, seed=args.seed, name="--limit-train",
                                 every_class=True)
    test_idx = stratified_subset(data.test_y, args.limit_test, seed=args.seed, name="--limit-test")
    if len(train_idx) < args.global_batch:
        processes = f" x {args.world_size} processes" if args.world_size > 1 else ""
        raise DataError(f"--batch-size {args.batch_size}{processes} is larger than the {len(train_idx)} "
                        f"training images")
    return data, train_idx, test_idx


def classifier_summary(script, args, model, progress, data, cm, device, out_dir, **extra):
    """A CIFAR-10 classifier run's summary.json (`extra` fields after the dataset's) and its two result lines."""
    summary = {
        "script": script, "dataset": f"CIFAR-10 ({data.source}: {args.data_dir})", **extra,
        "train_images": args.limit_train or len(data.train_y), "test_images": int(cm.sum()),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "epochs": progress.epoch, "steps": progress.step, "world_size": args.world_size,
        "global_batch": args.global_batch,
        "test_acc": accuracy_from(cm), "best_test_acc": progress.best_acc, "train_seconds": progress.train_seconds,
        "images_per_second": progress.images_seen / max(progress.train_seconds, 1e-9),
        "peak_memory_mb": peak_memory_mb(device), "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "args": vars(args), "classes": data.classes,
        "per_class_acc": dict(zip(data.classes, per_class_accuracy(cm))), "confusion_matrix": cm.tolist(),
    }
    summary = write_summary(out_dir / "summary.json", summary)
    print(f"test accuracy {summary['test_acc']:.2%} (best {progress.best_acc:.2%}) | {summary['train_seconds']:.1f}s "
          f"training | {summary['images_per_second']:,.0f} img/s | peak {summary['peak_memory_mb']:,.0f} MB")
    shown = [f"{c} {'-' if a is None else f'{a:.1%}'}" for c, a in summary["per_class_acc"].items()]
    print("per class: " + ", ".join(shown), flush=True)
    return summary


def peak_memory_mb(device):
    """The GPU's peak allocation on CUDA (reset when a run starts: one_line_errors); the run's peak resident memory
    elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return _run_memory.peak() if _run_memory is not None else _max_rss_mb()


def no_cuda_home_warning(record):
    """torch.compile on a machine without CUDA logs 'No CUDA runtime is found, using CUDA_HOME=...' once: it says
    nothing about a CPU run (a logging filter for torch.utils.cpp_extension)."""
    return "No CUDA runtime is found" not in record.getMessage()


def quiet_compile_on_cpu():
    logger = logging.getLogger("torch.utils.cpp_extension")
    if no_cuda_home_warning not in logger.filters:
        logger.addFilter(no_cuda_home_warning)


def progress_bar(total, desc, disable=False):
    """A tqdm bar on a terminal or in a notebook, quiet when stderr is a log (CI, a file) or when asked to. Short
    enough for 80 columns (`!python` in a notebook): the rate goes into the postfix the script sets, loss first."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}{postfix}]",
                disable=disable or not (sys.stderr.isatty() or in_notebook()))


# ----------------------------------------------------------------------------------------------------
# Charts with matplotlib when it is installed, drawn on Figure objects: no pyplot, so a notebook's backend and
# its open figures are left as they were


def check_progress(stats, seen, step, lr, bar):
    """(mean loss, accuracy) from the running [loss sum, correct] of `seen` images (a read of the device), shown on
    the bar; a non-finite loss stops the run here, naming the step and learning rate."""
    loss_sum, correct = stats.tolist() if torch.is_tensor(stats) else stats
    loss, acc = loss_sum / max(seen, 1), correct / max(seen, 1)
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"the training loss became {loss} by step {step} (lr {lr:.2e})")
    if not bar.disable:
        bar.set_postfix_str(f"loss {loss:.3f} acc {acc:.3f}")  # short: 80 columns (img/s: the epoch line)
    return loss, acc


def log_epoch(args, out_dir, rank, row):
    """A CIFAR classifier's epoch: its metrics.jsonl row (main process) and its line."""
    if rank == 0:
        append_jsonl(out_dir / "metrics.jsonl", row)
    print(f"epoch {row['epoch']:>3}/{args.epochs} | train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%} | "
          f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2%} | lr {row['lr']:.2e} | "
          f"{row['images_per_second']:,.0f} img/s | {row['epoch_seconds']:.1f}s", flush=True)

def has_matplotlib():
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


def new_figure(name, log=print, **kwargs):
    """A matplotlib Figure(**kwargs), or None (with one line saying what is skipped) without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log(f"skipped {name}: it needs matplotlib (pip install matplotlib)")
        return None
    return Figure(**kwargs)


CURVES = (("loss", ("train_loss", "test_loss")), ("accuracy", ("train_acc", "test_acc")), ("learning rate", ("lr",)))


def plot_curves(rows, path, x="epoch", panels=CURVES, log=print):
    """One figure, a panel per (title, metric keys), each key plotted against `x`. None without matplotlib."""
    fig = new_figure(Path(path).name, log, figsize=(4.2 * len(panels), 3.3))
    if fig is None:
        return None
    from matplotlib.ticker import MaxNLocator
    for ax, (title, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for key in keys:
            points = [(r[x], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) <= 30 else None, markersize=3,
                        label=key.replace("_", " "))
        ax.set(title=title, xlabel=x)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion(cm, classes, path, log=print):
    """The confusion matrix normalised per true class, values printed in the cells. None without matplotlib."""
    fig = new_figure(Path(path).name, log, figsize=(1.0 + 0.62 * len(classes), 0.8 + 0.55 * len(classes)))
    if fig is None:
        return None
    rates = (cm.float() / cm.sum(1, keepdim=True).clamp(min=1)).numpy()
    ax = fig.subplots()
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (rows sum to 1)")
    fig.tight_layout()
    return save_figure(fig, path)
