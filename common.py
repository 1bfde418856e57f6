"""Shared code for the course scripts: CIFAR-10 loading, transforms, image patching, metrics (classification
and captioning), run outputs.

Kept small and dependency-light on purpose: every script imports it, and a script copied into another
repository needs only this file beside it. Training loops, devices and optimisers live in the scripts.
"""
import hashlib
import json
import math
import os
import pickle
import re
import resource
import signal
import sys
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # the study guide's constants
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class DataError(Exception):
    """Input data is missing or unusable; the message says what to do. Scripts print it and exit 2."""


class NonFiniteLoss(ArithmeticError):
    """The training loss became NaN or infinite; the message names the step and learning rate."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, ...); the previous one is intact."""


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


def load_cifar10(data_dir, download=True, image_size=32, log=print):
    """CIFAR-10 from `data_dir`: an ImageFolder tree (train/<class>/*, test/<class>/*) or torchvision's
    `cifar-10-batches-py` folder, downloaded there by torchvision when neither is present."""
    root = Path(data_dir).expanduser()
    if (root / "train").is_dir() and (root / "test").is_dir():
        return _load_imagefolder_cached(root, image_size, log)
    batches = root if root.name == "cifar-10-batches-py" else root / "cifar-10-batches-py"
    if not batches.is_dir() and download:
        _download_cifar10(root)
    if not batches.is_dir():
        raise DataError(_missing_data_message(root))
    data = _load_torchvision_batches(batches)
    if image_size != 32:
        data.train_x, data.test_x = _resize(data.train_x, image_size), _resize(data.test_x, image_size)
    return data


def _missing_data_message(root):
    return (f"no CIFAR-10 found in {root}: pass --data-dir pointing at an ImageFolder tree "
            f"(train/<class>/*, test/<class>/*) or at torchvision's folder holding cifar-10-batches-py "
            f"(downloaded there automatically when online)")


def _download_cifar10(root):
    from torchvision.datasets import CIFAR10
    try:
        CIFAR10(root=str(root), train=True, download=True)
    except Exception as e:  # offline, proxy, disk full...: all mean the same thing to the user
        raise DataError(f"{_missing_data_message(root)}; the download failed: {type(e).__name__}: {e}") from None


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles. Allow only what they hold (dicts, lists, bytes, numpy arrays) so
    that a tampered file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

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


def _load_torchvision_batches(batches):
    def split(names):
        parts = [_read_batch(batches / n) for n in names]
        x = np.concatenate([np.asarray(p["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for p in parts])
        y = np.concatenate([np.asarray(p["labels"], dtype=np.int64) for p in parts])
        return torch.from_numpy(x), torch.from_numpy(y)

    train_x, train_y = split([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = split(["test_batch"])
    classes = list(_read_batch(batches / "batches.meta")["label_names"])
    return ImageDataset(train_x, train_y, test_x, test_y, classes, "torchvision")


def _list_imagefolder(root, log):
    """{split: [(relative path, class index)]} and the sorted class names; errors if the splits disagree.
    Files that are not images (by suffix) are reported and ignored."""
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders (expected train/<class>/<image>)")
    test_classes = sorted(d.name for d in (root / "test").iterdir() if d.is_dir())
    if test_classes != classes:
        missing = sorted(set(classes) ^ set(test_classes))
        raise DataError(f"train/ and test/ of {root} have different class folders: {missing}")
    files, others = {}, []
    for split in ("train", "test"):
        paths = [(p, k) for k, c in enumerate(classes) for p in sorted((root / split / c).iterdir())
                 if p.is_file() and not p.name.startswith(".")]
        files[split] = [(f"{split}/{p.parent.name}/{p.name}", k) for p, k in paths if p.suffix.lower() in IMAGE_SUFFIXES]
        others += [f"{split}/{p.parent.name}/{p.name}" for p, _ in paths if p.suffix.lower() not in IMAGE_SUFFIXES]
        if not files[split]:
            raise DataError(f"{root / split} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if others:
        log(f"ignored {len(others)} non-image file(s) in {root}: {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}")
    return files, classes


def _fingerprint(root, files, image_size):
    h = hashlib.sha1(f"v1 {image_size}".encode())
    for split in ("train", "test"):
        for rel, k in files[split]:
            st = os.stat(root / rel)
            h.update(f"{rel} {k} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _cache_paths(root, image_size):
    """Beside the data if that folder is writable, else under ~/.cache (e.g. a read-only shared copy)."""
    name = f".decoded-{image_size}px.npz"
    user = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vit-course"
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / name, user / f"{key}{name}"]


def _load_imagefolder_cached(root, image_size, log):
    files, classes = _list_imagefolder(root, log)
    fingerprint = _fingerprint(root, files, image_size)
    for path in _cache_paths(root, image_size):
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                if str(z["fingerprint"]) == fingerprint:
                    return ImageDataset(*(torch.from_numpy(z[k]) for k in ("train_x", "train_y", "test_x", "test_y")),
                                        classes, "imagefolder")
    arrays = {}
    for split in ("train", "test"):
        arrays[f"{split}_x"], arrays[f"{split}_y"] = _decode_split(root, files[split], image_size, log)
    for path in _cache_paths(root, image_size):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, lambda f: np.savez(f, fingerprint=fingerprint, **arrays))
            break
        except OSError:
            continue  # read-only data folder: try the user cache
    return ImageDataset(*(torch.from_numpy(arrays[k]) for k in ("train_x", "train_y", "test_x", "test_y")),
                        classes, "imagefolder")


def _decode_one(path, image_size):
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _decode_split(root, files, image_size, log):
    """Decode every image (sequentially: tiny images decode faster than threads hand them around);
    unreadable files are reported and skipped."""
    def decode(item):
        try:
            return _decode_one(root / item[0], image_size)
        except Exception as e:
            return f"{item[0]} ({type(e).__name__})"

    decoded = [decode(item) for item in files]
    bad = [d for d in decoded if isinstance(d, str)]
    if bad:
        log(f"skipped {len(bad)} unreadable image(s) in {root}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    keep = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
    if not keep:
        raise DataError(f"no readable images under {root}")
    x = np.stack([decoded[i] for i in keep])
    y = np.array([files[i][1] for i in keep], dtype=np.int64)
    return x, y


def _resize(x, size):
    return F.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True).round().clamp(0, 255).to(torch.uint8)


def stratified_subset(labels, n, seed=0):
    """Indices of a deterministic, class-balanced subset of size n (sorted); n=None keeps everything."""
    if n is None or n == len(labels):
        return torch.arange(len(labels))
    if not 0 < n <= len(labels):
        raise DataError(f"asked for a subset of {n} images but the split holds {len(labels)}")
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per_class = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    picked = []
    for c, k in zip(classes, per_class):
        members = torch.nonzero(labels == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[:k]])
    picked = torch.cat(picked)
    if len(picked) < n:  # some class is too small: top up from the rest, still deterministic
        rest = torch.ones(len(labels), dtype=torch.bool)
        rest[picked] = False
        others = torch.nonzero(rest).flatten()
        picked = torch.cat([picked, others[torch.randperm(len(others), generator=g)[:n - len(picked)]]])
    return picked.sort().values


# ----------------------------------------------------------------------------------------------------
# Transforms: the guide's PIL pipelines, and the same augmentation as batched tensor ops on the device

def train_transform(padding=4):
    """The study guide's training pipeline for a PIL DataLoader."""
    from torchvision import transforms as T
    return T.Compose([T.RandomCrop(32, padding=padding), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(CIFAR_MEAN, CIFAR_STD)])


def test_transform():
    from torchvision import transforms as T
    return T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])


def normalize(x, mean=CIFAR_MEAN, std=CIFAR_STD):
    """uint8 [B,3,H,W] -> float [B,3,H,W], as ToTensor + Normalize."""
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float().div_(255) - mean) / std


def crop_flip_params(batch, padding=4, generator=None, device="cpu"):
    """Random crop offsets and flips for a batch: (dy, dx, flip), each (batch, 1)."""
    dy = torch.randint(0, 2 * padding + 1, (batch, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch, 1), device=device, generator=generator)
    flip = torch.rand(batch, 1, device=device, generator=generator) < 0.5
    return dy, dx, flip


def apply_crop_flip(x, params, padding=4):
    """Crop each zero-padded image at its (dy, dx) and mirror it where flip is set: one gather."""
    B, C, H, W = x.shape
    dy, dx, flip = params
    padded = F.pad(x, (padding,) * 4)  # zeros, like torchvision's default fill
    rows = dy + torch.arange(H, device=x.device)  # (B, H)
    cols = dx + torch.arange(W, device=x.device)  # (B, W)
    cols = torch.where(flip, cols.flip(1), cols)  # a flipped crop reads its columns backwards
    b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    c = torch.arange(C, device=x.device).view(1, C, 1, 1)
    return padded[b, c, rows.view(B, 1, H, 1), cols.view(B, 1, 1, W)]


def random_crop_flip(x, padding=4, generator=None):
    """RandomCrop(size, padding) + RandomHorizontalFlip on a whole batch: an independent crop offset and
    flip per image, zero padding, on x's device with no host synchronisation."""
    return apply_crop_flip(x, crop_flip_params(len(x), padding, generator, x.device), padding)


def shard_bounds(n, rank, world_size):
    """[start, stop) of this process's contiguous share of n items."""
    return n * rank // world_size, n * (rank + 1) // world_size


class TensorLoader:
    """Batches from uint8 images held on the training device; training batches are shuffled and
    augmented there, so the GPU never waits for a CPU pipeline. Shuffling and augmentation depend only
    on (seed, epoch), which makes a resumed run draw exactly the batches the uninterrupted run would have.

    Under torchrun each process takes its slice of every global batch (batch_size per process, the same
    permutation and augmentation draws on all of them), so N processes at batch b see exactly what one
    process at batch N x b sees. Evaluation loaders hold a contiguous shard of the set each."""

    def __init__(self, images, labels, batch_size, device, train, seed=0, rank=0, world_size=1):
        self.total = len(labels)
        if not train:
            lo, hi = shard_bounds(len(labels), rank, world_size)
            images, labels = images[lo:hi], labels[lo:hi]
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.train, self.seed, self.epoch = batch_size, train, seed, 0
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)

    def __len__(self):
        if self.train:
            return self.total // (self.batch_size * self.world_size)  # the ragged tail is dropped
        return -(-len(self.labels) // self.batch_size)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        if not self.train:
            for i in range(0, len(self.labels), self.batch_size):
                yield normalize(self.images[i:i + self.batch_size]), self.labels[i:i + self.batch_size]
            return
        g = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.total, device=self.device, generator=g)
        global_batch = self.batch_size * self.world_size
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for i in range(len(self)):
            idx = order[i * global_batch:(i + 1) * global_batch][mine]
            params = [p[mine] for p in crop_flip_params(global_batch, generator=g, device=self.device)]
            yield normalize(apply_crop_flip(self.images[idx], params)), self.labels[idx]


# ----------------------------------------------------------------------------------------------------
# torchrun: one process per device; without torchrun everything below is a no-op

def init_distributed(device_name):
    """(rank, world_size, local_rank), joining the process group when torchrun started this process
    (NCCL on CUDA, gloo on CPU). Processes other than rank 0 print nothing to stdout."""
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
    """--batch-size is per process; the global batch is batch x processes (args.global_batch). A resumed
    run keeps the global batch it was started with, and so its schedule, whatever the number of
    processes now. DataError if it does not split evenly."""
    if resuming:
        if args.global_batch % world_size:
            raise DataError(f"--resume: the run's global batch {args.global_batch} does not split over {world_size} processes")
        args.batch_size = args.global_batch // world_size
    args.world_size, args.global_batch = world_size, args.batch_size * world_size


def wrap_distributed(model, device, world_size, sync_bn=False):
    """DistributedDataParallel under torchrun (gradients of the parameters that require them averaged
    over processes); the model itself otherwise. sync_bn converts BatchNorm in place (SyncBatchNorm
    keeps BatchNorm's state_dict keys, so checkpoints load either way)."""
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gather_shards(local, total, world_size):
    """Concatenate every process's contiguous shard (shard_bounds order) into the full tensor, on all."""
    if world_size == 1:
        return local
    import torch.distributed as dist
    size = -(-total // world_size)
    padded = torch.zeros(size, *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:hi - lo] for r, p in enumerate(parts) for lo, hi in [shard_bounds(total, r, world_size)]])


def all_reduce_sum(value, world_size):
    if world_size > 1:
        import torch.distributed as dist
        dist.all_reduce(value)
    return value


# ----------------------------------------------------------------------------------------------------
# Patching

def img_to_patch(x, patch_size, flatten_channels=True):
    """[B, C, H, W] -> [B, num_patches, C*P*P] (or [B, num_patches, C, P, P]), patches in row-major
    order, each flattened channel-major: exactly the study guide's function."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // patch_size, patch_size, W // patch_size, patch_size)
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, H', W', C, P, P]
    x = x.flatten(1, 2)  # [B, H'*W', C, P, P]
    if flatten_channels:
        x = x.flatten(2, 4)  # [B, H'*W', C*P*P]
    return x


# ----------------------------------------------------------------------------------------------------
# Metrics

def accuracy(preds, targets):
    return (preds == targets).float().mean().item()


def confusion_matrix(preds, targets, num_classes):
    """[K, K] counts, rows = true class, columns = predicted class."""
    idx = targets.long().cpu() * num_classes + preds.long().cpu()
    return torch.bincount(idx, minlength=num_classes ** 2).view(num_classes, num_classes)


def per_class_accuracy(cm):
    return (cm.diag().float() / cm.sum(1).clamp(min=1).float()).tolist()


# ----------------------------------------------------------------------------------------------------
# Caption metrics: corpus BLEU-4 and CIDEr-D against every reference of each image

def caption_tokens(text):
    """Lower-case words and numbers, punctuation dropped: the usual preparation for caption metrics."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu4(hypotheses, references):
    """Corpus BLEU-4 in [0, 1] (Papineni et al. 2002) over token lists: clipped n-gram precisions
    summed over the corpus, geometric mean, brevity penalty against the closest reference length (ties:
    the shorter). No smoothing: any empty n-gram order gives 0. Equals sacrebleu's corpus BLEU with
    tokenize='none', smooth_method='none', divided by 100."""
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        for n in range(1, 5):
            counts = _ngrams(hyp, n)
            max_ref = Counter()
            for r in refs:
                max_ref |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if min(matches) == 0 or hyp_len == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def cider_d(hypotheses, references, sigma=6.0):
    """CIDEr-D (Vedantam et al. 2015, the COCO evaluation server's variant) over token lists: TF-IDF
    vectors of 1- to 4-grams (document frequency over the references of the corpus), cosine similarity
    with the hypothesis' weights clipped at the reference's, a Gaussian penalty on the length
    difference, averaged over n and references, times 10. As the reference code, lengths count bigrams."""
    ref_counts = [[_all_ngrams(r) for r in refs] for refs in references]
    doc_freq = Counter(g for refs in ref_counts for g in set().union(*refs))
    log_n = math.log(len(references))

    def vector(counts):
        vec, norm = [{} for _ in range(4)], [0.0] * 4
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, doc_freq[g])))
            norm[len(g) - 1] += vec[len(g) - 1][g] ** 2
        return vec, [math.sqrt(x) for x in norm], sum(tf for g, tf in counts.items() if len(g) == 2)

    scores = []
    for hyp, refs in zip(hypotheses, ref_counts):
        h_vec, h_norm, h_len = vector(_all_ngrams(hyp))
        total = 0.0
        for ref in refs:
            r_vec, r_norm, r_len = vector(ref)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma ** 2))
            for n in range(4):
                dot = sum(min(w, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, w in h_vec[n].items())
                if h_norm[n] and r_norm[n]:
                    dot /= h_norm[n] * r_norm[n]
                total += dot * penalty / 4
        scores.append(10.0 * total / len(refs))
    return sum(scores) / len(scores)


def _all_ngrams(tokens):
    return sum((_ngrams(tokens, n) for n in range(1, 5)), Counter())


# ----------------------------------------------------------------------------------------------------
# Pictures: overlays and grids with PIL alone; charts with matplotlib when it is installed

_INFERNO = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=torch.float32)


def colormap(values):
    """[...] values in [0, 1] -> [..., 3] uint8 colours on a dark-to-bright (inferno-like) scale."""
    pos = values.clamp(0, 1) * (len(_INFERNO) - 1)
    lo = pos.floor().long().clamp(max=len(_INFERNO) - 2)
    frac = (pos - lo).unsqueeze(-1)
    return (_INFERNO[lo] * (1 - frac) + _INFERNO[lo + 1] * frac).round().to(torch.uint8)


def heat_overlay(image, heat, size, alpha=0.55):
    """uint8 image (3, H, W) and a heat map (h, w) in [0, 1] -> uint8 (3, size, size): both upsampled
    bilinearly to the same square, the coloured map blended over the image."""
    img = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
    heat = F.interpolate(heat[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    colour = colormap(heat).permute(2, 0, 1).float()
    return ((1 - alpha) * img + alpha * colour).round().clamp(0, 255).to(torch.uint8)


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap font
        return ImageFont.load_default()


def draw_grid(cells, header, row_labels, cell, pad=4):
    """A PIL image: rows of uint8 (3, h, w) tensors (each resized to cell x cell), column titles on
    top and a label under the first cell of each row."""
    from PIL import Image, ImageDraw
    font, text_h = _font(13), 18
    cols = max(map(len, cells))
    width, row_h = pad + cols * (cell + pad), cell + text_h + pad
    sheet = Image.new("RGB", (width, text_h + pad + len(cells) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    for j, title in enumerate(header):
        draw.text((pad + j * (cell + pad) + cell // 2, pad), title, fill="black", font=font, anchor="ma")
    for i, row in enumerate(cells):
        y = text_h + pad + i * row_h
        for j, img in enumerate(row):
            tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((cell, cell), Image.BILINEAR)
            sheet.paste(tile, (pad + j * (cell + pad), y))
        draw.text((pad + cell // 2, y + cell + 1), row_labels[i], fill="black", font=font, anchor="ma")
    return sheet


def _pyplot(name, log):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        log(f"skipped {name}: it needs matplotlib (pip install matplotlib)")
        return None


def plot_curves(rows, path, x="epoch", panels=(("loss", ("train_loss", "test_loss")), ("accuracy", ("train_acc", "test_acc")),
                                               ("learning rate", ("lr",))), log=print):
    """One figure, a panel per (title, metric keys), each key plotted against `x`. None without matplotlib."""
    plt = _pyplot(Path(path).name, log)
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = [(r[x], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) <= 30 else None, markersize=3, label=key.replace("_", " "))
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(cm, classes, path, log=print):
    """The confusion matrix normalised per true class, values printed in the cells. None without matplotlib."""
    plt = _pyplot(Path(path).name, log)
    if plt is None:
        return None
    rates = (cm.float() / cm.sum(1, keepdim=True).clamp(min=1)).numpy()
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(classes), 0.8 + 0.55 * len(classes)))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (rows sum to 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# Run outputs: written atomically, so an interrupted run never leaves a half-written file behind

@contextmanager
def _ctrl_c_deferred():
    """Hold Ctrl-C (SIGINT) until the block ends, so that a file being written is finished first (an
    interrupt inside torch.save's zip writer would otherwise surface as an unrelated RuntimeError)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            raise KeyboardInterrupt


def _atomic_write(path, write):
    with _ctrl_c_deferred():
        _write_then_rename(path, write)


def _write_then_rename(path, write):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(obj, path):
    """torch.save to a temporary file, then rename: a crash or a full disk leaves the previous file intact."""
    try:
        _atomic_write(path, lambda f: torch.save(obj, f))
    except OSError as e:
        raise CheckpointWriteError(f"could not write {path} ({e.strerror or e}); the previous {Path(path).name}, "
                                   f"if any, is intact") from None


@contextmanager
def stops_cleanly(script, checkpoint, saved, memory_hint="--batch-size"):
    """Ctrl-C, running out of GPU memory, a non-finite loss or a failed checkpoint write end the run with
    a message saying what is saved and what to do, not a traceback. `saved()` describes the last
    checkpoint at that moment; `checkpoint` is the file --resume takes (None: the script has none)."""
    try:
        yield
    except KeyboardInterrupt:
        resume = f"\nresume with: python {script}.py --resume {checkpoint}" if checkpoint and Path(checkpoint).exists() else ""
        print(f"\n{script}.py: interrupted; {saved()}{resume}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except torch.OutOfMemoryError:
        _stop(script, f"out of GPU memory; try a smaller {memory_hint}; {saved()}")
    except NonFiniteLoss as e:
        _stop(script, f"{e}; try a lower --lr (or a smaller --grad-clip); {saved()}")
    except CheckpointWriteError as e:
        _stop(script, f"{e}; free some space or pick another --out-dir")


def _stop(script, message):
    print(f"{script}.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def write_json(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_text_atomic(path, text):
    _atomic_write(path, lambda f: f.write(text.encode()))


def prepare_out_dir(path):
    """Create the output folder and prove it is writable, before any work; DataError otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise DataError(f"--out-dir {path}: cannot write there ({e.strerror or e})") from None
    for stale in path.glob(".*.tmp"):  # left by a run killed while writing; the real files are intact
        stale.unlink(missing_ok=True)
    return path


def read_jsonl(path):
    path = Path(path)
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def append_jsonl(path, obj):
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def load_checkpoint(path, script):
    """A checkpoint of plain values (weights_only=True: nothing in it can run code), checked to come from
    `script`. Raises DataError with a message meant for the user."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"--resume {path}: no such file") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"--resume {path}: not a checkpoint of plain values, refused ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != script:
        found = ckpt.get("script") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DataError(f"--resume {path}: written by {found!r}, not by {script}.py")
    return ckpt


def load_weights(model, ckpt, path, expected_config=None):
    """A checkpoint's weights into `model`, which its flags and the data describe (`expected_config`).
    A mismatch is a DataError naming the fields (or the first tensor) that differ, not a traceback."""
    saved = ckpt.get("model_config", {})
    differ = [k for k in (expected_config or {}) if saved.get(k) != expected_config[k]]
    if differ:
        raise DataError(f"{path}: its weights do not fit the model its flags and data describe ("
                        + ", ".join(f"{k}: saved {saved.get(k)}, now {expected_config[k]}" for k in differ) + ")")
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise DataError(f"{path}: its weights do not fit the model its flags describe "
                        f"({str(e).strip().splitlines()[-1].strip()})") from None


def trim_metrics(path, epochs_done):
    """Drop metric lines of epochs a checkpoint does not contain (the run died after logging them)."""
    path = Path(path)
    if path.exists():
        rows = [r for r in read_jsonl(path) if r["epoch"] <= epochs_done]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def rng_state(device):
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}


def restore_rng(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device):
    """The GPU's peak allocation on CUDA; the process's peak resident memory elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def progress_bar(total, desc, disable=False):
    """A tqdm bar that stays quiet when stderr is not a terminal (logs, CI) or when asked to."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                disable=disable or not sys.stderr.isatty())
