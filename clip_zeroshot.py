# /// script
# requires-python = ">=3.10"
# dependencies = ["torch>=2.11", "torchvision>=0.26", "transformers>=5.17", "peft>=0.21", "ftfy>=6.1",
#                 "regex>=2025.10.22", "numpy", "pillow", "tqdm>=4.66", "matplotlib>=3.7", "safetensors>=0.4"]
# ///
"""CLIP on CIFAR-10: zero-shot from class-name prompts, a linear probe, and its ViT fine-tuned (full or LoRA).

The study guide's transfer-learning lesson in three steps. Zero-shot: each class name goes into prompt templates
("a photo of a {}."; --prompts ensemble: OpenAI's 18), and an image takes the class whose text embedding is closest
(cosine x logit_scale). --linear-probe: logistic regression on frozen image features. --finetune: CLIP's image tower
(the guide's "pre-trained ViT, fine-tuned" row), all weights or LoRA adapters, under a zero-shot-initialised head.

    python clip_zeroshot.py                                    # openai/clip-vit-base-patch32, 10,000 test images
    python clip_zeroshot.py --model openai/clip-vit-large-patch14 --prompts ensemble
    python clip_zeroshot.py --model /path/to/local/clip --data-dir /tmp/cifar10 --linear-probe
    python clip_zeroshot.py --prompts my_templates.txt         # UTF-8, a template a line, "{}" = class, # comments
    python clip_zeroshot.py --finetune full --epochs 2         # ViT-B/32 image tower, all weights
    python clip_zeroshot.py --finetune lora --epochs 2 --rank 16 --wise 0.5   # LoRA; WiSE-FT mix reported too
    python clip_zeroshot.py --resume runs/clip_zeroshot/<run>/last.pt --epochs 4     # continue, or extend
    python clip_zeroshot.py --adapter runs/clip_zeroshot/<run>/adapter   # evaluate a LoRA run's adapter, no training
    python clip_zeroshot.py --finetune full --limit-train 2000 --limit-test 500 --max-steps 20 --device cpu

Images are preprocessed on the device as the model's CLIPImageProcessor says. Figures: README (published), BENCHMARKS.md
(measured). Outputs in --out-dir: config.json, summary.json, confusion.png; fine-tuning adds metrics.jsonl, curves.png,
last.pt, best.pt and for LoRA adapter/ (--adapter or load_adapter() puts it on a fresh base). Needs common.py.
"""
import argparse
import json
import math
import re
import string
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as plumbing  # part 2 of common.py: errors, flags, resume, run folders, charts
from common import (CapturedStep, DataError, TensorLoader, accuracy_from, confusion_matrix, derived_seed,  # part 1
                    per_class_accuracy, stratified_subset)
from common import positive_int  # argparse type: a flag's range (the float ranges below keep this script's words)

SCRIPT = "clip_zeroshot"
LOG_EVERY = 20  # steps between reads of the running loss (each read waits for the device)


# ----------------------------------------------------------------------------------------------------
# Config: templates, mode defaults, flags. Add a flag in build_parser (its range in type=), a rule between two flags
# in check_args (below the banner). A mode's default (MODE_DEFAULTS) fills a flag left untyped; a typed flag wins.

SINGLE_TEMPLATE = ["a photo of a {}."]
# The 18 CIFAR-10 templates OpenAI published with CLIP (prompt engineering notebook / data/prompts.md).
CIFAR10_TEMPLATES = [
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.", "a low contrast photo of a {}.",
    "a high contrast photo of a {}.", "a bad photo of a {}.", "a good photo of a {}.", "a photo of a small {}.",
    "a photo of a big {}.", "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
]
# Fine-tuning: lr as WiSE-FT / FLYP for a tower, larger for fresh LoRA; the head starts from the better ensemble.
MODE_DEFAULTS = {None: dict(batch_size=500, prompts="single"),
                 "full": dict(batch_size=128, prompts="ensemble", lr=1e-5, weight_decay=0.1),
                 "lora": dict(batch_size=128, prompts="ensemble", lr=1e-3, weight_decay=0.01)}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # the image tower's attention projections
# The same four in a ViTModel (--backbone), as transformers >= 5.2x names them and as earlier releases did
VIT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "attention.output.dense"]


def build_parser():
    p = plumbing.make_parser(__doc__, SCRIPT)
    a = p.add_argument
    a("--model", default="openai/clip-vit-base-patch32",
      help="hub id or local folder (save_pretrained) of a CLIPModel with its tokenizer and image processor")
    a("--data-dir", default="./data", help="ImageFolder tree (train/<class>/*, test/<class>/*) or torchvision's folder")
    a("--no-download", action="store_true", help="never try to download CIFAR-10")
    a("--prompts", help="'single' (a photo of a {}.), 'ensemble' (OpenAI's 18 templates) or a UTF-8 file of "
                        "templates (default: single; ensemble with --finetune)")
    a("--limit-test", type=positive_int, default=None, help="classify a class-stratified subset of N test images")
    a("--linear-probe", action="store_true", help="also fit logistic regression on frozen features of the training set")
    a("--limit-train", type=positive_int, help="linear probe and fine-tuning: a class-stratified subset of N images")
    a("--batch-size", type=positive_int, help="images per encoder batch; with --finetune, per step (default 500 / 128)")
    # fine-tuning
    a("--finetune", choices=["full", "lora"], help="train the image tower: all its weights, or LoRA adapters")
    a("--epochs", type=positive_int, default=2, help="fine-tuning: passes over the training set")
    a("--lr", type=finite_positive, help="fine-tuning: peak AdamW learning rate (default 1e-5 full, 1e-3 lora)")
    a("--weight-decay", type=finite_non_negative,
      help="fine-tuning: AdamW decoupled weight decay, not on biases and norms (default 0.1 full, 0.01 lora)")
    a("--warmup", type=fraction, default=0.1, help="fine-tuning: linear warm-up, a fraction of all steps; then cosine")
    a("--grad-clip", type=finite_non_negative, default=1.0, help="fine-tuning: clip the gradient norm (0 = off)")
    a("--max-steps", type=positive_int, help="fine-tuning: stop after this many optimizer steps (smoke runs)")
    a("--wise", type=mix, help="fine-tuning: also report WiSE-FT, the weights (1 - a) x zero-shot + a x fine-tuned")
    a("--rank", type=positive_int, default=16, help="--finetune lora: LoRA rank r")
    a("--alpha", type=finite_positive, default=32, help="--finetune lora: LoRA alpha (updates scaled by alpha / r)")
    a("--lora-dropout", type=fraction, default=0.05, help="--finetune lora: dropout on the LoRA branch input")
    a("--targets", nargs="+", default=LORA_TARGETS, help="--finetune lora: module names in the image tower to adapt")
    a("--backbone", metavar="VIT", help="--finetune an ImageNet ViT (a ViTModel: hub id or folder, e.g. "
      "google/vit-base-patch16-224-in21k) instead of CLIP's tower, under a linear head trained from a random start")
    a("--adapter", help="evaluate the adapter/ of a --finetune lora run (or the run's folder) on the test set, no "
                        "training; its base model is the one the folder records unless --model is given")
    a("--seed", type=generator_seed, default=0, help="seeds subsets, the probe's split, shuffling, augmentation, LoRA")
    plumbing.add_run_flags(p, SCRIPT, "confusion.png, curves.png", resume="a fine-tuning run's folder or last.pt",
                           eager_when="--finetune on CUDA")
    return p


# ----------------------------------------------------------------------------------------------------
# Model: CLIP's preprocessing as tensor ops, the zero-shot classifier, the classifier that fine-tuning trains. Edit
# freely: LoRA finds its --targets by module name, the summaries read only logits and predictions.

class TensorPreprocess:
    """The model's CLIPImageProcessor as batched tensor ops on the device: resize the shortest edge (with the
    processor's filter, antialiased, on uint8 like the processor), center crop, rescale to [0, 1], normalise."""

    def __init__(self, processor, device):
        size = processor.size
        self.resize = size.get("shortest_edge") or [size["height"], size["width"]]  # an int keeps the aspect ratio
        self.mode = interpolation(processor)
        crop = processor.crop_size if getattr(processor, "do_center_crop", False) else None  # a ViT's has none
        self.crop = [crop["height"], crop["width"]] if crop else None
        self.mean = torch.tensor(processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, device=device).view(1, 3, 1, 1)

    def __call__(self, x):  # uint8 (B, 3, H, W) -> float (B, 3, crop_h, crop_w)
        from torchvision.transforms.v2 import functional as TF
        x = TF.resize(x, self.resize, interpolation=self.mode, antialias=True)
        if self.crop:
            x = TF.center_crop(x, self.crop)
        return (x.float() / 255 - self.mean) / self.std


@torch.no_grad()
def text_classifier(model, tokenizer, classes, templates, device):
    """[K, D]: for each class, each template's normalised embedding, averaged, renormalised."""
    weights = []
    for name in classes:
        tokens = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt").to(device)
        with autocast(device, amp_dtype_for(device)):
            emb = pooled(model.get_text_features(**tokens)).float()
        weights.append(ensemble(emb))
    return torch.stack(weights)


def ensemble(embeddings):
    """[T, D] template embeddings of one class -> [D] unit vector."""
    return F.normalize(F.normalize(embeddings, dim=-1).mean(0), dim=-1)


@torch.no_grad()
def encode_images(model, preprocess, images, batch_size, device, desc="encoding", no_progress=False):
    """uint8 [N, 3, H, W] (any device) -> L2-normalised image features [N, D] on the device."""
    feats = []
    with plumbing.progress_bar(-(-len(images) // batch_size), desc, no_progress) as bar:
        for i in range(0, len(images), batch_size):
            pixels = preprocess(images[i:i + batch_size].to(device, non_blocking=True))
            with autocast(device, amp_dtype_for(device)):
                feats.append(F.normalize(pooled(model.get_image_features(pixel_values=pixels)).float(), dim=-1))
            bar.update(1)
    return torch.cat(feats)


def zero_shot_logits(image_features, text_weights, logit_scale):
    """As CLIPModel's logits_per_image: scale x cosine similarity."""
    return logit_scale * image_features @ text_weights.T


class ImageClassifier(nn.Module):
    """CLIP's image tower and projection, then a linear head on the normalised image embedding that starts as the
    zero-shot classifier (logit_scale x the text embeddings, bias 0: the zero-shot start of WiSE-FT and FLYP)."""

    def __init__(self, tower, projection, head_weight):
        super().__init__()
        self.tower, self.projection = tower, projection
        self.head = nn.Linear(head_weight.shape[1], head_weight.shape[0], device=head_weight.device)
        self.head.weight = nn.Parameter(head_weight.to(torch.float32, memory_format=torch.contiguous_format, copy=True))
        nn.init.zeros_(self.head.bias)

    def forward(self, pixels):  # (B, 3, H, W) -> (B, K)
        features = self.projection(self.tower(pixel_values=pixels).pooler_output)  # (B, D)
        return self.head(F.normalize(features, dim=-1))


class BackboneClassifier(nn.Module):
    """--backbone: an ImageNet ViT (ViTModel) and a linear head on its CLS token's final hidden state."""

    def __init__(self, tower, num_classes):
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(tower.config.hidden_size, num_classes, device=tower.device)

    def forward(self, pixels):  # (B, 3, H, W) -> (B, K)
        return self.head(self.tower(pixel_values=pixels).last_hidden_state[:, 0])


def zero_shot_classifier(model, tokenizer, classes, templates, device):
    """The image side of a loaded CLIPModel with the zero-shot head; its text tower is not kept."""
    head = model.logit_scale.exp().item() * text_classifier(model, tokenizer, classes, templates, device)  # (K, D)
    return ImageClassifier(model.vision_model, model.visual_projection, head).float()


def add_lora(classifier, args):
    """peft LoRA on the tower's --targets; the head trains whole and is saved with the adapters; the rest is frozen."""
    from peft import LoraConfig, get_peft_model
    check_targets(classifier.tower, args.targets)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.lora_dropout, bias="none",
                        target_modules=list(args.targets), modules_to_save=["head"])
    try:
        return get_peft_model(classifier, config)
    except ValueError as e:
        raise DataError(f"--targets {' '.join(args.targets)}: {str(e).splitlines()[0]}") from None


def classifier_to_train(args, classes, tokenizer, templates, device):
    """What --finetune trains: CLIP's zero-shot classifier, or with --backbone an ImageNet ViT under a fresh head (its
    epoch-0 row is chance, not zero-shot); with --finetune lora, LoRA adapters on its --targets."""
    if args.backbone:
        model = BackboneClassifier(load_backbone(args.backbone, device), len(classes))
        if args.targets == VIT_LORA_TARGETS:  # the default: the names this transformers gives the projections
            args.targets = [t for t in VIT_LORA_TARGETS if any(n.endswith("." + t) for n, _ in model.named_modules())]
    else:
        model = zero_shot_classifier(load_clip_model(args.model, device), tokenizer, classes, templates, device)
    return add_lora(model, args) if args.finetune == "lora" else model


# ----------------------------------------------------------------------------------------------------
# Precision, optimizer and schedule: edit make_optimizer and lr_factor. Weights stay fp32 (autocast computes in
# bf16/fp16); the schedule is a factor of the peak --lr that the loop sets before each step.

def amp_dtype_for(device):
    """bf16 autocast where the GPU has it natively (compute capability >= 8.0: a T4 emulates bf16, slowly), else fp16
    with a GradScaler (the released CLIP weights were trained in fp16); fp32 on CPU and MPS. Weights stay fp32."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def autocast(device, dtype):
    # No cast cache: inside a CUDA graph cached casts would be stale; each weight is cast once a step anyway.
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype is not None else nullcontext()


def make_optimizer(model, args, device, capture=False):
    """AdamW on what trains, without weight decay on biases, norms and the class embedding (1-D). Under `capture`
    the learning rate is a device tensor that the loop fills in place before every replay, AdamW capturable."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
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
# The step: edit train_step. On one CUDA GPU with bf16 common.CapturedStep records it once as a CUDA graph and replays
# it unchanged, so nothing in it may read a value back to the host (no .item(), no print, no Python branch on a
# tensor); the statistics stay on the device.

def train_step(model, optimizer, scaler, preprocess, amp_dtype, grad_clip, x, y, stats):
    """Forward, loss, backward, clipping, update; adds [loss sum, correct] to `stats` on the device. Gradients are
    set to None first: in a graph, backward then writes them in the graph's own memory."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(x.device, amp_dtype):
        logits = model(preprocess(x))
    loss = F.cross_entropy(logits.float(), y)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    stats += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum().float()])


# ----------------------------------------------------------------------------------------------------
# Evaluation: edit freely. evaluate returns predictions in test-set order and accuracies are counted in integers
# (28 of 50 is 0.56 exactly): the summaries rely on both.

@torch.no_grad()
def evaluate(model, preprocess, images, labels, batch_size, amp_dtype):
    """(predictions, mean cross-entropy) over the whole test set, in order."""
    model.eval()
    preds, loss_sum = [], torch.zeros((), device=labels.device)
    for i in range(0, len(labels), batch_size):
        with autocast(labels.device, amp_dtype):
            logits = model(preprocess(images[i:i + batch_size])).float()
        loss_sum += F.cross_entropy(logits, labels[i:i + batch_size], reduction="sum")
        preds.append(logits.argmax(1))
    return torch.cat(preds), loss_sum.item() / len(labels)


def fraction_right(logits, targets, k=1):
    """How many targets are among the top-k logits, over how many (a float32 mean would write 0.5600000023841858)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return int((top == targets[:, None]).any(1).sum()) / max(len(targets), 1)


def fit_logistic(x, y, num_classes, weight_decay, steps=100):
    W = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + weight_decay * W.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return W.detach(), b.detach()


def linear_probe(train_x, train_y, test_x, test_y, num_classes, seed, grid=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2)):
    """--linear-probe: the L2 strength chosen on a held-out 20% of the training features, refit on all, tested once."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_y), generator=g).to(train_x.device)
    n_val = max(1, len(order) // 5)
    val, fit = order[:n_val], order[n_val:]
    if not len(fit):
        raise DataError(f"the linear probe got {len(order)} training image(s): too few to hold 20% out")
    scores = {}
    for wd in grid:
        W, b = fit_logistic(train_x[fit], train_y[fit], num_classes, wd)
        scores[wd] = fraction_right(train_x[val] @ W + b, train_y[val])
    best = max(grid, key=lambda wd: (scores[wd], wd))  # ties: the stronger regularisation
    W, b = fit_logistic(train_x, train_y, num_classes, best)
    return {"test_acc": fraction_right(test_x @ W + b, test_y), "weight_decay": best,
            "val_acc_by_weight_decay": {str(k): v for k, v in scores.items()}}


def wise_weights(initial, final, alpha):
    """WiSE-FT (Wortsman et al., 2022): (1 - alpha) x zero-shot + alpha x fine-tuned, tensor by tensor; LoRA's A
    is kept as trained (B starts at zero, so mixing B mixes the whole update B A)."""
    return {n: final[n] if "lora_A" in n else torch.lerp(initial[n], final[n], alpha) for n in final}


# ----------------------------------------------------------------------------------------------------
# The experiment: one function per mode, then main. Edit finetune's loop freely: the checkpoint (save_run) and the
# log (log_epoch) read only `progress` and the row they are given.

def zero_shot(args, data, train_idx, test_idx, tokenizer, processor, templates, device, report):
    """Zero-shot on the test images (timed: preprocessing + encoding), then with --linear-probe the probe."""
    model = load_clip_model(args.model, device)
    start_zero_shot(args, data, templates, test_idx, device, report)
    preprocess = TensorPreprocess(processor, device)
    text_weights = text_classifier(model, tokenizer, data.classes, templates, device)
    sync(device)
    t0 = time.perf_counter()
    test_features = encode_images(model, preprocess, data.test_x[test_idx], args.batch_size, device, "test images",
                                  args.no_progress)
    seconds = time.perf_counter() - t0  # torch.cat above waited for the device
    logits = zero_shot_logits(test_features, text_weights, model.logit_scale.exp().item())
    targets = data.test_y[test_idx].to(device)
    probe = None
    if args.linear_probe:
        train_features = encode_images(model, preprocess, data.train_x[train_idx], args.batch_size, device,
                                       "train images", args.no_progress)
        probe = linear_probe(train_features, data.train_y[train_idx].to(device), test_features, targets,
                             len(data.classes), args.seed)
    top5 = fraction_right(logits, targets, k=5)
    return write_summary(args, model, device, data, templates, logits, targets, top5, seconds, probe)


def finetune(args, ckpt, data, train_idx, test_idx, tokenizer, processor, templates, device, report):
    """--finetune full|lora: the zero-shot classifier trained on CIFAR-10, evaluated and saved after every epoch."""
    torch.manual_seed(args.seed)
    model = classifier_to_train(args, data.classes, tokenizer, templates, device)
    initial = plumbing.trainable_state(model) if args.wise is not None else None  # zero-shot weights, for WiSE-FT
    preprocess, amp_dtype = TensorPreprocess(processor, device), amp_dtype_for(device)
    loader = TensorLoader(data.train_x[train_idx], data.train_y[train_idx], args.batch_size, device, train=True,
                          seed=args.seed, raw=True)  # uint8 crops and flips: the model's preprocess normalises
    test_x, test_y = data.test_x[test_idx].to(device), data.test_y[test_idx].to(device)
    evaluate_test = partial(evaluate, model, preprocess, test_x, test_y, args.batch_size, amp_dtype)
    steps_per_epoch = len(loader)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    capture = device.type == "cuda" and amp_dtype == torch.bfloat16 and not args.eager
    optimizer = make_optimizer(model, args, device, capture)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    progress = start_run(args, ckpt, report, data, templates, model, optimizer, scaler, evaluate_test, test_y,
                         len(train_idx), steps_per_epoch, total_steps, capture)  # resumed, or the zero-shot start
    stats = torch.zeros(2, device=device)  # the epoch's [loss sum, correct], kept on the device
    step = make_step(model, optimizer, scaler, preprocess, amp_dtype, args, stats, next(iter(loader)), capture)
    progress.train_seconds += getattr(step, "seconds", 0.0)  # a capture counts as training time
    preds = None
    for epoch in range(progress.epoch + 1, args.epochs + 1):
        if progress.step >= total_steps:
            break
        loader.set_epoch(epoch)
        model.train()
        torch.manual_seed(derived_seed(args.seed, "dropout", epoch))  # LoRA dropout draws: resumable
        stats.zero_()
        seen = 0
        sync(device)
        t0 = time.perf_counter()
        with plumbing.progress_bar(min(steps_per_epoch, total_steps - progress.step), f"epoch {epoch}/{args.epochs}",
                                   args.no_progress) as bar:
            for x, y in loader:
                factor = lr_factor(progress.step, int(args.warmup * total_steps), total_steps)
                lr = plumbing.set_learning_rates([optimizer], factor)
                step(x, y)
                progress.step += 1
                seen += len(y)
                bar.update(1)
                if progress.step % LOG_EVERY == 0:  # a host read: the bar and the non-finite check
                    check_progress(stats, seen, progress.step, lr, bar)
                if progress.step >= total_steps:
                    break
            loss, acc = check_progress(stats, seen, progress.step, lr, bar)
        seconds = time.perf_counter() - t0  # the read-back above waited for the device
        preds, test_loss = evaluate_test()
        test_acc = accuracy_from(confusion_matrix(preds, test_y, len(data.classes)))
        progress.epoch = epoch
        progress.train_seconds += seconds
        progress.images_seen += seen
        log_epoch(args, dict(epoch=epoch, step=progress.step, train_loss=loss, train_acc=acc, test_loss=test_loss,
                             test_acc=test_acc, lr=lr, epoch_seconds=seconds, images_per_second=seen / seconds))
        save_run(args, model, optimizer, scaler, progress, test_acc, data)
    if preds is None:  # resumed a finished run: evaluate what it left
        preds, _ = evaluate_test()
    wise = wise_accuracy(model, initial, args.wise, evaluate_test, test_y, len(data.classes))  # None without --wise
    return write_finetune_summary(args, model, device, progress, data, preds, test_y, len(train_idx), templates, wise)


def main(argv=None):
    with plumbing.one_line_errors(SCRIPT) as report:
        args, ckpt = experiment_args(argv)  # every flag checked; the mode's defaults, or a resumed run's own flags
        templates = load_templates(args.prompts)
        device = plumbing.pick_device(args.device)
        plumbing.open_run_folder(args, ckpt, report, rank=0)  # locked; the inputs it reads left intact
        config, tokenizer, processor = load_model_files(args)  # small files, checked before the data and weights
        data, train_idx, test_idx = load_data(args, ckpt)
        if args.backbone:  # no CLIP: an ImageNet ViT's processor, no text tower, no templates
            return finetune(args, ckpt, data, train_idx, test_idx, None, processor, [], device, report)
        check_template_lengths(templates, data.classes, tokenizer, config, args.prompts)
        if args.adapter:
            return evaluate_adapter(args, data, test_idx, processor, device, report)
        if args.finetune:
            return finetune(args, ckpt, data, train_idx, test_idx, tokenizer, processor, templates, device, report)
        return zero_shot(args, data, train_idx, test_idx, tokenizer, processor, templates, device, report)


# ===== Run plumbing: nothing below changes what is trained =====

FINETUNE_FLAGS = ("epochs", "lr", "weight_decay", "warmup", "grad_clip", "max_steps", "wise")
LORA_FLAGS = ("rank", "alpha", "lora_dropout", "targets")
PROBE_MIN_PER_CLASS = 5  # the probe's held-out 20% then holds about one image per class

# ----------------------------------------------------------------------------------------------------
# How the step runs: replayed as a CUDA graph where capture applies, else eagerly

def make_step(model, optimizer, scaler, preprocess, amp_dtype, args, stats, first_batch, capture):
    """The function that trains on one batch: a graph replay where capture applies (one CUDA GPU, bf16, no --eager),
    else train_step run eagerly; a capture that fails falls back to eager with one line."""
    step = partial(train_step, model, optimizer, scaler, preprocess, amp_dtype, args.grad_clip, stats=stats)
    if capture:
        model.train()
        state = [*model.state_dict().values(), stats]  # (and CUDA's generator: LoRA's dropout draws from it)
        captured = plumbing.capture_or_none(lambda: CapturedStep(step, first_batch, state, [optimizer]), stats.device)
        if captured is not None:
            return captured
    return step


# ----------------------------------------------------------------------------------------------------
# Flags on resume, the machine, the data, checkpoints and the per-epoch log

CHECKPOINT_VERSION = 1
RUNTIME_FLAGS = (*plumbing.RUN_FLAGS, "no_download")  # on --resume: from the command line


@dataclass
class Progress(plumbing.Progress):
    """common's Progress, and the zero-shot accuracy the run started from (its epoch-0 row)."""
    zero_shot_acc: float = 0.0


def experiment_args(argv):
    """(args, checkpoint or None): the flags with the mode's defaults, or on --resume the run's own (a flag that
    differs is refused, more --epochs or --max-steps extend the run); all checked before any work."""
    parser = build_parser()
    cli, given = plumbing.parse(parser, argv)
    args, ckpt = cli, None
    for name in ("model", "backbone", "adapter", "prompts"):  # local paths resolved (hub ids and keywords stay): a
        value = getattr(cli, name)  # resume finds them from anywhere, and compares them as the run recorded them
        if value and value not in ("single", "ensemble") and Path(value).expanduser().exists():
            setattr(cli, name, str(Path(value).expanduser().resolve()))
    if not cli.resume:
        for name, value in MODE_DEFAULTS[cli.finetune].items():
            if getattr(cli, name) is None:
                setattr(cli, name, value)
        cli.adapter = cli.adapter and str(plumbing.adapter_folder(cli.adapter))  # a run's folder: its adapter/
        adapter_run = adapter_run_config(cli.adapter) if cli.adapter else {}
        recorded = adapter_run.get("data_dir")
        if recorded and "data_dir" not in given and Path(recorded).is_dir():  # the data its run trained on
            cli.data_dir = recorded
        cli.data_dir = str(Path(cli.data_dir).expanduser().resolve())  # so that a resume finds it from anywhere
        if cli.adapter:
            check_adapter_run(cli.adapter, adapter_run)
        if cli.backbone and "targets" not in given:  # a ViTModel names its attention projections otherwise
            cli.targets = VIT_LORA_TARGETS
    else:
        ckpt = plumbing.load_checkpoint(cli.resume, SCRIPT)
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise DataError(f"--resume {cli.resume}: written by another version of {SCRIPT}.py and cannot be resumed")
        args = plumbing.resumed_args(ckpt["args"], cli, given, RUNTIME_FLAGS, extendable=("epochs", "max_steps"),
                                     parser=parser, state=ckpt["state"])  # a flag newer than the run: its default
    check_args(args)
    check_no_effect(args, given)
    if args.adapter and "model" not in given:  # the base model the adapter records
        args.model = adapter_base_model(args.adapter)
    check_model_path(args.model, model_named(args))
    return args, ckpt


def check_args(args):
    """The rules that involve two flags (each flag's own range is checked by its type=; see also check_no_effect)."""
    if args.finetune and args.linear_probe:
        raise DataError("--linear-probe fits a classifier on frozen features; run it without --finetune")


def check_no_effect(args, given):
    """A flag typed where its mode ignores it is refused, naming the mode: it would make the user believe it did
    something (an --epochs 10 zero-shot run, a --rank 8 full fine-tuning)."""
    useless = {}
    if args.adapter:
        useless = dict.fromkeys(FINETUNE_FLAGS + LORA_FLAGS + ("finetune", "resume", "prompts", "linear_probe",
                                                              "limit_train"),
                                "with --adapter (it evaluates a trained adapter with its own head, no training)")
    elif args.finetune == "full":
        useless = dict.fromkeys(LORA_FLAGS, "with --finetune full (LoRA flags; add --finetune lora to use them)")
    elif not args.finetune:
        useless = dict.fromkeys(FINETUNE_FLAGS + LORA_FLAGS + ("resume", "eager", "backbone"),
                                "without --finetune (add --finetune full or --finetune lora to use it)")
        if not args.linear_probe:
            useless["limit_train"] = "without --linear-probe or --finetune (zero-shot reads no training image)"
    if args.backbone and args.finetune:
        useless.update(dict.fromkeys(("model", "prompts", "wise"), "with --backbone (no CLIP, no text tower: a "
                                     "random head on the ViT's CLS output)"))
    if args.limit_test is None and not args.linear_probe and (args.adapter or not args.finetune):
        useless["seed"] = "when the whole test set is evaluated without training (nothing is drawn at random)"
    typed = sorted(given & useless.keys())
    if typed:
        raise DataError(f"{plumbing.flag(typed[0])} has no effect {useless[typed[0]]}; drop it")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_data(args, ckpt):
    """CIFAR-10 and the class-stratified subsets this run reads, checked against what the mode needs."""
    data = plumbing.load_run_cifar10(args, ckpt)
    test_idx = stratified_subset(data.test_y, args.limit_test, seed=args.seed, name="--limit-test")
    train_idx = stratified_subset(data.train_y, args.limit_train, seed=args.seed, name="--limit-train",
                                  every_class=not args.linear_probe) if args.linear_probe or args.finetune else None
    needed = PROBE_MIN_PER_CLASS * len(data.classes)
    if args.linear_probe and len(train_idx) < needed:
        raise DataError(f"--limit-train {len(train_idx)}: the linear probe needs at least {needed} training images "
                        f"({PROBE_MIN_PER_CLASS} per class) to choose its L2 strength on a held-out 20%")
    if args.finetune and len(train_idx) < args.batch_size:
        raise DataError(f"--batch-size {args.batch_size} is larger than the {len(train_idx)} training images")
    return data, train_idx, test_idx


def start_run(args, ckpt, report, data, templates, model, optimizer, scaler, evaluate_test, test_y, train_images,
              steps_per_epoch, total_steps, capture=False):
    """Start line, config.json (on a resume too), the checkpoint restored or the zero-shot start logged as epoch 0,
    what Ctrl-C reports; returns the run's Progress."""
    out_dir, device = Path(args.out_dir), next(model.parameters()).device
    trainable, total = count_params(model)
    print(f"{SCRIPT}: fine-tuning {args.backbone or args.model} ({args.finetune}) | trainable {trainable:,} of "
          f"{total:,} parameters "
          f"({trainable / total:.2%}) | {device} {amp_dtype_for(device) or torch.float32}{' graph' if capture else ''} "
          f"| train {train_images:,} "
          f"test {len(test_y):,} images | {steps_per_epoch} steps/epoch x {args.epochs} epochs, batch "
          f"{args.batch_size}, lr {args.lr:g} | out {out_dir}", flush=True)
    plumbing.write_json(out_dir / "config.json", run_config(args, templates, data.classes))
    if ckpt:
        progress = restore_run(ckpt, args, model, optimizer, scaler, capture)
        print(plumbing.resuming_line(args.resume, progress, steps_per_epoch, total_steps))
    else:
        preds, test_loss = evaluate_test()
        progress = Progress(zero_shot_acc=accuracy_from(confusion_matrix(preds, test_y, len(data.classes))))
        log_epoch(args, dict(epoch=0, step=0, test_loss=test_loss, test_acc=progress.zero_shot_acc))
    last = report.resume = out_dir / "last.pt"
    report.saved = lambda: (f"the last checkpoint is {last} (epoch {progress.epoch})" if last.exists() else
                            "nothing was saved yet (the first checkpoint is written at the end of epoch 1)")
    return progress


def restore_run(ckpt, args, model, optimizer, scaler, capture=False):
    """Weights (LoRA: adapters + head), optimizer and scaler from a checkpoint; returns its Progress."""
    try:
        if args.finetune == "lora":
            missing = plumbing.trainable_state(model).keys() ^ ckpt["model"].keys()
            if missing:
                raise RuntimeError(f"unexpected or missing {sorted(missing)[0]}")
            model.load_state_dict(ckpt["model"], strict=False)
        else:
            model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise DataError(f"--resume {args.resume}: its weights do not fit --model {args.model} "
                        f"({str(e).strip().splitlines()[-1].strip()})") from None
    device = next(model.parameters()).device
    plumbing.place_learning_rate(optimizer, args.lr, device, capture)  # a CPU checkpoint may resume under a CUDA graph
    plumbing.place_adamw_state(optimizer, device, capture)
    scaler.load_state_dict(ckpt["scaler"])
    plumbing.trim_metrics(Path(args.out_dir) / "metrics.jsonl", lambda row: row["epoch"] <= ckpt["state"]["epoch"])
    return Progress(**ckpt["state"])


def save_run(args, model, optimizer, scaler, progress, test_acc, data):
    """last.pt every epoch (best.pt is the same file, linked, when the test accuracy is the best yet): the whole
    classifier for full fine-tuning, only what trains (adapters + head) for LoRA, which also refreshes adapter/."""
    is_best = test_acc > progress.best_acc
    progress.best_acc = max(progress.best_acc, test_acc)
    out_dir = Path(args.out_dir)
    weights = plumbing.trainable_state(model) if args.finetune == "lora" else model.state_dict()
    ckpt = {"script": SCRIPT, "version": CHECKPOINT_VERSION, "finetune": args.finetune, "model": weights,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "state": asdict(progress),
            "args": vars(args), "data_fingerprint": data.fingerprint}
    plumbing.save_checkpoint(ckpt, out_dir / "last.pt", also=out_dir / "best.pt" if is_best else None)
    if args.finetune == "lora":
        plumbing.save_adapter(model, out_dir, base_model=args.backbone or args.model)  # --adapter finds its base


def check_progress(stats, seen, step, lr, bar):
    loss_sum, correct = stats.tolist()
    loss, acc = loss_sum / max(seen, 1), correct / max(seen, 1)
    if not math.isfinite(loss):
        raise plumbing.NonFiniteLoss(f"the training loss became {loss} by step {step} (lr {lr:.2e})")
    if not bar.disable:
        bar.set_postfix_str(f"loss {loss:.3f} acc {acc:.3f} lr {lr:.1e}")
    return loss, acc


def log_epoch(args, row):
    plumbing.append_jsonl(Path(args.out_dir) / "metrics.jsonl", row)
    if row["epoch"] == 0:
        start = "random-head" if args.backbone else "zero-shot"
        print(f"epoch   0/{args.epochs} | {start} start | test loss {row['test_loss']:.4f} acc {row['test_acc']:.2%}",
              flush=True)
        return
    print(f"epoch {row['epoch']:>3}/{args.epochs} | train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%} | "
          f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2%} | lr {row['lr']:.2e} | "
          f"{row['images_per_second']:,.0f} img/s | {row['epoch_seconds']:.1f}s", flush=True)


# ----------------------------------------------------------------------------------------------------
# Summaries and start banners: config.json, summary.json and what is printed

def run_config(args, templates, classes):
    """What config.json holds and summary.json repeats as its `args`: the effective flags, templates, classes."""
    return {**vars(args), "templates": templates, "classes": classes}


def count_params(model):
    """(trainable, total); peft's saved copy of the head's initial weights (original_module) is not counted."""
    params = [(n, p) for n, p in model.named_parameters() if "original_module" not in n]
    return sum(p.numel() for _, p in params if p.requires_grad), sum(p.numel() for _, p in params)


def most_confused(cm, classes, k=5):
    off = cm.clone().fill_diagonal_(0).flatten()
    top = torch.topk(off, min(k, off.numel())).indices
    return [{"true": classes[i // len(classes)], "predicted": classes[i % len(classes)], "count": off[i].item()}
            for i in top.tolist() if off[i] > 0]


def summarise(args, data, device, cm, prompts, **fields):
    """summary.json: what every mode reports, around the mode's own `fields`; returns it."""
    summary = {"script": SCRIPT, **fields, "dataset": f"CIFAR-10 ({data.source}: {args.data_dir})",
               "test_images": int(cm.sum()), "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
               "test_acc": accuracy_from(cm), "peak_memory_mb": plumbing.peak_memory_mb(device),
               "args": run_config(args, prompts, data.classes), "model": args.backbone or args.model,
               "classes": data.classes,
               "per_class_acc": dict(zip(data.classes, per_class_accuracy(cm))), "confusion_matrix": cm.tolist(),
               "most_confused": most_confused(cm, data.classes)}
    summary = plumbing.write_summary(Path(args.out_dir) / "summary.json", summary)
    return summary


def wise_accuracy(model, initial, alpha, evaluate_test, test_y, num_classes):
    """--wise: test accuracy of the WiSE-FT mix (None without --wise); the fine-tuned weights are put back after."""
    if initial is None:
        return None
    final = plumbing.trainable_state(model)
    model.load_state_dict(wise_weights(initial, final, alpha), strict=False)
    preds, _ = evaluate_test()
    model.load_state_dict(final, strict=False)
    return {"alpha": alpha, "test_acc": accuracy_from(confusion_matrix(preds, test_y, num_classes))}


def print_per_class(accuracies):
    """'-' for a class with no test image."""
    print("per class: " + ", ".join(f"{c} {'-' if a is None else f'{a:.1%}'}" for c, a in accuracies.items()))


def start_zero_shot(args, data, templates, test_idx, device, report):
    plumbing.write_json(Path(args.out_dir) / "config.json", run_config(args, templates, data.classes))
    print(f"{SCRIPT}: {args.model} | {device} | {len(test_idx):,} test images | {len(templates)} template(s) | "
          f"out {args.out_dir}")
    report.saved = lambda: "nothing to resume: zero-shot evaluation keeps no state; run it again"


def write_summary(args, model, device, data, templates, logits, targets, top5, seconds, probe):
    cm = confusion_matrix(logits.argmax(1), targets, len(data.classes))
    summary = summarise(args, data, device, cm, templates, epochs=0, steps=0, top5_acc=top5, train_seconds=0.0,
                         encode_seconds=seconds, images_per_second=len(targets) / seconds,
                         params=sum(p.numel() for p in model.parameters()), trainable_params=0, templates=templates,
                         logit_scale=model.logit_scale.exp().item(), linear_probe=probe)
    print(f"zero-shot top-1 {summary['test_acc']:.2%} | top-5 {top5:.2%} | {summary['images_per_second']:,.0f} img/s "
          f"(preprocess + encode) | peak {summary['peak_memory_mb']:,.0f} MB")
    print_per_class(summary["per_class_acc"])
    print("most confused: " + ", ".join(f"{m['true']}->{m['predicted']} ({m['count']})"
                                        for m in summary["most_confused"]))
    if probe:
        print(f"linear probe: test accuracy {probe['test_acc']:.2%} (L2 {probe['weight_decay']:g}, chosen on a "
              f"held-out 20%)")
    save_pictures(args, cm, data.classes)
    return summary


def write_finetune_summary(args, model, device, progress, data, preds, test_y, train_images, templates, wise):
    cm = confusion_matrix(preds, test_y, len(data.classes))
    adapter = Path(args.out_dir) / "adapter"
    trainable, total = count_params(model)
    summary = summarise(
        args, data, device, cm, templates, finetune=args.finetune, train_images=train_images, epochs=progress.epoch,
        steps=progress.step, best_test_acc=progress.best_acc, zero_shot_acc=progress.zero_shot_acc,
        train_seconds=progress.train_seconds, params=total, trainable_params=trainable, templates=templates, wise=wise,
        images_per_second=progress.images_seen / max(progress.train_seconds, 1e-9),
        adapter_bytes=plumbing.folder_bytes(adapter) if adapter.is_dir() else None)
    start = "random-head start" if args.backbone else "zero-shot start"
    print(f"test accuracy {summary['test_acc']:.2%} ({start} {progress.zero_shot_acc:.2%}, best "
          f"{progress.best_acc:.2%}) | {summary['train_seconds']:.1f}s training | "
          f"{summary['images_per_second']:,.0f} img/s | peak {summary['peak_memory_mb']:,.0f} MB"
          + (f" | adapter {summary['adapter_bytes'] / 2 ** 20:.2f} MiB" if summary["adapter_bytes"] else ""))
    if wise:
        print(f"WiSE-FT ({1 - wise['alpha']:g} x zero-shot + {wise['alpha']:g} x fine-tuned): test accuracy "
              f"{wise['test_acc']:.2%}")
    print_per_class(summary["per_class_acc"])
    save_pictures(args, cm, data.classes, curves=True)
    return summary


# ----------------------------------------------------------------------------------------------------
# --adapter DIR: a saved LoRA classifier evaluated on the test set, no training

def read_adapter_config(adapter_dir):
    folder = Path(adapter_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"--adapter {adapter_dir}: {'not a folder' if folder.exists() else 'no such folder'}")
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        raise DataError(f"--adapter {adapter_dir}: no readable adapter_config.json; pass a --finetune lora run's "
                        f"folder or its adapter/")
    return config


def check_adapter_run(adapter_dir, adapter_run):
    """--adapter evaluates LoRA on CLIP's tower; the adapter of a --backbone run (its run's config.json says so)
    sits on an ImageNet ViT with a head trained from scratch, which its run's last.pt holds whole."""
    run = Path(adapter_dir).expanduser().parent
    backbone = adapter_run.get("backbone")  # none for an adapter folder on its own
    if backbone:
        raise DataError(f"--adapter {adapter_dir}: the adapter of a --backbone run (LoRA on {backbone}), and --adapter "
                        f"takes LoRA runs of CLIP's tower; --resume {run} evaluates that run's classifier")


def adapter_run_config(adapter_dir):
    """The config.json of the run an adapter/ folder sits in ({} for a folder on its own)."""
    try:
        config = json.loads((Path(adapter_dir).expanduser().parent / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    ours = isinstance(config, dict) and {"prompts", "linear_probe", "finetune"} <= config.keys()  # not another script's
    return config if ours else {}


def adapter_base_model(adapter_dir):
    """The --model an adapter was trained on, as its adapter_config.json records it (since issue 21)."""
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise DataError(f"--adapter {adapter_dir}: its adapter_config.json does not record the base model; pass "
                        f"--model, the CLIP it was trained on")
    return str(base)


def check_adapter_fits(adapter_dir, config, num_classes=None):
    """Before any weights load: a LoRA adapter whose targets all exist in CLIP's image tower, with a head of
    num_classes x projection_dim (of some size, where num_classes is not known yet). (An adapter of lora_caption.py
    targets GPT-2's c_attn/c_proj and has no head: peft would fail deep inside, or adapt nothing.)"""
    from safetensors import safe_open
    from transformers import CLIPModel
    saved = read_adapter_config(adapter_dir)
    with torch.device("meta"):  # module names and shapes without memory or weights
        modules = {"tower." + n: m for n, m in CLIPModel(config).vision_model.named_modules() if n}
    names = list(modules)
    targets = saved.get("target_modules") or []
    if isinstance(targets, str):  # peft: a regular expression over full module names
        missing = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if saved.get("peft_type") != "LORA":
        raise DataError(f"--adapter {adapter_dir}: a {saved.get('peft_type')} adapter, not LoRA; pass the adapter/ "
                        f"of a clip_zeroshot.py --finetune lora run")
    if missing or not targets:
        raise DataError(f"--adapter {adapter_dir}: does not fit CLIP's image tower (its target modules "
                        f"{', '.join(missing or targets) or 'none'} match nothing there); pass the adapter/ of a "
                        f"clip_zeroshot.py --finetune lora run")
    weights = Path(adapter_dir).expanduser() / "adapter_model.safetensors"
    try:
        with safe_open(str(weights), "pt") as f:
            shape = [f.get_slice(k).get_shape() for k in f.keys() if k.endswith("head.weight")]
            lora = {k: f.get_slice(k).get_shape() for k in f.keys() if ".lora_" in k}
    except Exception as e:  # missing or damaged
        raise DataError(f"--adapter {adapter_dir}: {weights.name} unreadable ({type(e).__name__})") from None
    for key, size in lora.items():  # lora_A (r, in_features), lora_B (out_features, r) of the layer it adapts
        match = re.search(r"tower\.(.+)\.lora_([AB])\.", key)
        layer = modules.get("tower." + match[1]) if match else None
        if not isinstance(layer, nn.Linear):
            continue
        saved, width = (size[1], layer.in_features) if match[2] == "A" else (size[0], layer.out_features)
        if saved != width:
            raise DataError(f"--adapter {adapter_dir}: trained on a CLIP whose {match[1]} is {saved} wide, and this "
                            f"one's is {width}; pass --model, the CLIP it was trained on")
    rows = num_classes or (shape[0][0] if shape else "classes")  # any number of classes until they are known
    if shape != [[rows, config.projection_dim]]:
        found = f"a {shape[0][0]} x {shape[0][1]} head" if shape else "no classification head"
        wanted = f" for these {num_classes} classes" if num_classes else ""
        raise DataError(f"--adapter {adapter_dir}: holds {found}, not the {rows} x {config.projection_dim} head of a "
                        f"CLIP classifier{wanted}")


def load_adapter(model_name, adapter_dir, num_classes, device="cpu"):
    """A fine-tuned LoRA classifier from a run's adapter/ folder on a fresh copy of its base CLIP; the head comes
    from the folder, so no text is needed:
        model = load_adapter("openai/clip-vit-base-patch32", "runs/clip_zeroshot/<run>/adapter", 10)
        _, _, processor = load_clip_parts("openai/clip-vit-base-patch32")
        logits = model(TensorPreprocess(processor, "cpu")(uint8_images))  # (B, 3, H, W) -> (B, 10)"""
    from peft import PeftModel
    device = plumbing.api_device(device)
    adapter_dir = plumbing.adapter_folder(adapter_dir)
    config, _, _ = load_clip_parts(model_name)
    check_adapter_fits(adapter_dir, config, num_classes)  # another model's adapter, another head: one line
    model = load_clip_model(model_name, device)
    base = ImageClassifier(model.vision_model, model.visual_projection,
                           torch.zeros(num_classes, config.projection_dim, device=device))
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir)).to(device).eval()
    except (RuntimeError, ValueError, KeyError) as e:  # what check_adapter_fits cannot see
        raise DataError(f"--adapter {adapter_dir}: does not fit {model_name} "
                        f"({str(e).strip().splitlines()[-1].strip()})") from None


def evaluate_adapter(args, data, test_idx, processor, device, report):
    """The zero-shot-head classifier with the adapter (as load_adapter builds it) on the test images."""
    report.saved = lambda: "nothing to resume: evaluating an adapter keeps no state; run it again"
    # load_adapter checks the adapter against CLIP's tower and the classes before any weights load
    model = load_adapter(args.model, Path(args.adapter).expanduser(), len(data.classes), device)
    plumbing.write_json(Path(args.out_dir) / "config.json", run_config(args, [], data.classes))
    print(f"{SCRIPT}: adapter {args.adapter} on {args.model} | {device} | {len(test_idx):,} test images | "
          f"out {args.out_dir}")
    test_x, test_y = data.test_x[test_idx].to(device), data.test_y[test_idx].to(device)
    preds, test_loss = evaluate(model, TensorPreprocess(processor, device), test_x, test_y, args.batch_size,
                                amp_dtype_for(device))
    cm = confusion_matrix(preds, test_y, len(data.classes))
    trainable, total = count_params(model)
    summary = summarise(args, data, device, cm, [], finetune="lora", adapter=args.adapter, epochs=0, steps=0,
                         test_loss=test_loss, train_seconds=0.0, params=total, trainable_params=0,
                         adapter_params=trainable)
    print(f"adapter test accuracy {summary['test_acc']:.2%} | test loss {test_loss:.4f}")
    print_per_class(summary["per_class_acc"])
    save_pictures(args, cm, data.classes)
    return summary


# ----------------------------------------------------------------------------------------------------
# Input hardening: prompt templates and --model, checked in full before any weights load

def load_templates(spec):
    if spec in ("single", "ensemble"):
        return SINGLE_TEMPLATE if spec == "single" else CIFAR10_TEMPLATES
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"--prompts {spec}: not 'single', 'ensemble' or a file of templates")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not part of a template
    except UnicodeDecodeError as e:
        raise DataError(f"--prompts {spec}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}, as in a "
                        f"Latin-1 or Windows-1252 file); save it as UTF-8") from None
    # Blank lines and '#' comments are notes to the reader, not templates; numbered as an editor shows them.
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.strip().startswith("#")]
    if not lines:
        raise DataError(f"--prompts {spec}: no templates in it (one per line, '{{}}' where the class name goes; "
                        f"lines starting with # are comments)")
    for n, template in lines:
        problem = template_problem(template)
        if problem:
            raise DataError(f"--prompts {spec}, line {n}: {problem} (the line: {template!r})")
    return [template for _, template in lines]


def template_problem(template):
    """None for a good template: a str.format string whose only field is one '{}', for the class name."""
    try:
        fields = [(name, fmt, conv) for _, name, fmt, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:  # a lone brace: "a photo of a {} :-{"
        return f"a template is not a valid format string ({e}); write a literal brace as '{{{{' or '}}}}'"
    if not fields and "{{" in template:  # "a {{}} photo" is the literal text "a {} photo"
        return "a template never inserts the class name ('{{}}' is a literal brace pair); put one '{}' where it goes"
    if not fields:
        return "a template has no '{}' where the class name goes; add one (or start the line with # for a comment)"
    other = [f"{{{name}{'!' + conv if conv else ''}{':' + fmt if fmt else ''}}}" for name, fmt, conv in fields
             if (name, fmt, conv) != ("", "", None)]
    if other or len(fields) > 1:
        return f"a template holds {other[0] if other else f'{len(fields)} fields'}; the one field allowed is '{{}}', " \
               f"for the class name"
    return None


def check_template_lengths(templates, classes, tokenizer, config, spec):
    """CLIP's text tower has a fixed context (77 tokens for the released models): a longer prompt would fail inside
    transformers after the weights load."""
    context = min(config.text_config.max_position_embeddings, tokenizer.model_max_length)
    for template in templates:
        prompts = [template.format(c) for c in classes]
        lengths = [len(ids) for ids in tokenizer(prompts, verbose=False)["input_ids"]]  # verbose: its own warning
        longest = max(range(len(classes)), key=lengths.__getitem__)
        if lengths[longest] > context:
            shown = template if len(template) <= 60 else template[:57] + "..."
            raise DataError(f"--prompts {spec}: {shown!r} with the class {classes[longest]!r} is {lengths[longest]} "
                            f"tokens, more than the text tower's {context}; shorten the template")


def in_range(wanted, ok, kind=float):
    """An argparse type=: a number for which ok(value), else "must be {wanted}, got {value}" (nan is in no range)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value
    return parse


finite_positive = in_range("a finite number > 0", lambda v: math.isfinite(v) and v > 0)
finite_non_negative = in_range("a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
fraction = in_range("in [0, 1)", lambda v: 0 <= v < 1)
mix = in_range("in [0, 1] (0 = zero-shot, 1 = fine-tuned)", lambda v: 0 <= v <= 1)
generator_seed = in_range("in [0, 2**63)", lambda v: 0 <= v < 2 ** 63, kind=int)  # what torch.Generator accepts


def check_targets(tower, targets):
    names = [name for name, _ in tower.named_modules()]
    for target in targets:  # peft's own message for this is about its internals
        if not any(name == target or name.endswith("." + target) for name in names):
            raise DataError(f"--targets {target}: no module of the image tower has that name (its attention "
                            f"projections are {', '.join(LORA_TARGETS)})")


@contextmanager
def loading(name, option="--model", kind="CLIP"):
    """transformers without its "Loading weights" bars (the script says what it loads), and what it raises about
    `name` as one line naming --model PATH (or --backbone PATH) and HF_HUB_OFFLINE."""
    from transformers.utils import logging
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load {kind} model {name!r} ({(str(e).strip() or type(e).__name__).splitlines()[0]})"
                        f"{plumbing.no_folder_here(name)}; offline, pass {option} PATH to a local copy (a "
                        f"save_pretrained folder), or unset HF_HUB_OFFLINE with internet access") from None
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def check_model_path(name, named=None):
    """A --model that can only be a local path must be a folder (common.check_model_folder). `named`: how the error
    names it (default "--model NAME")."""
    plumbing.check_model_folder(name, named or f"--model {name}", "openai/clip-vit-base-patch32")


def model_named(args):
    """How errors name the CLIP a run loads: "--model NAME", or, where --model was left to an --adapter's record,
    that record (the user never typed the name)."""
    if args.adapter and str(args.model) == read_adapter_config(args.adapter).get("base_model_name_or_path"):
        return f"the base model {args.model} that --adapter {args.adapter} records (--model overrides it)"
    return f"--model {args.model}"


def load_clip_model(name, device):
    from transformers import CLIPModel
    with loading(name):
        model = CLIPModel.from_pretrained(name, **plumbing.NO_HUB_KERNELS)
    return model.to(device).eval()


def pooled(out):
    """transformers 5 returns an output object (the projection is its pooler_output); 4.x a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


def load_backbone_processor(name):
    """--backbone's image processor, after its config says it is a ViT: read before the weights."""
    from transformers import AutoConfig, AutoImageProcessor
    check_model_path(name, f"--backbone {name}")
    with loading(name, "--backbone", "ViT"):
        config = AutoConfig.from_pretrained(name)
        if config.model_type != "vit":
            kind = ", ".join(config.architectures or []) or f"{config.model_type} model"
            raise DataError(f"--backbone {name} holds a {kind}, not a ViTModel: pass an ImageNet ViT checkpoint "
                            f"with its image processor (e.g. google/vit-base-patch16-224-in21k)")
        processor = AutoImageProcessor.from_pretrained(name)
    interpolation(processor)
    return processor


def load_backbone(name, device):
    from transformers import ViTModel
    with loading(name, "--backbone", "ViT"):
        model = ViTModel.from_pretrained(name, add_pooling_layer=False, **plumbing.NO_HUB_KERNELS)
    return model.to(device)


def load_clip(name, device):
    """(model, tokenizer, image processor) of a CLIP checkpoint."""
    _, tokenizer, processor = load_clip_parts(name)
    return load_clip_model(name, device), tokenizer, processor


def load_model_files(args):
    """(config, tokenizer, image processor) of --model, or (None, None, processor) of --backbone: read and checked
    before the data and any weights load. A resize filter we cannot reproduce stops the run here, and so does an
    --adapter whose target modules are not in CLIP's image tower (its head's size is checked once the classes are
    known, by load_adapter)."""
    if args.backbone:
        return None, None, load_backbone_processor(args.backbone)
    config, tokenizer, processor = load_clip_parts(args.model, model_named(args))
    interpolation(processor)
    if args.adapter:
        check_adapter_fits(args.adapter, config)
    return config, tokenizer, processor


def load_clip_parts(name, named=None):
    """Config, tokenizer and image processor: small files, read before the weights, so that a model that is not
    CLIP, or a template too long for its text tower, stops the run before the weights load. `named`: how errors
    name it (default "--model NAME")."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    check_model_path(name, named)
    with loading(name):
        config = AutoConfig.from_pretrained(name)
        if config.model_type != "clip":
            kind = ", ".join(config.architectures or []) or f"{config.model_type} model"
            raise DataError(f"{named or '--model ' + str(name)} holds a {kind}, not a CLIPModel: pass --model, a CLIP "
                            f"checkpoint with its tokenizer and image processor (e.g. openai/clip-vit-base-patch32)")
        return config, AutoTokenizer.from_pretrained(name), AutoImageProcessor.from_pretrained(name)


def interpolation(processor):
    """The processor's `resample` as torchvision's mode: PIL's codes (0 nearest, 2 bilinear, 3 bicubic), or already
    a mode. Released CLIP processors say bicubic, others bilinear: the wrong filter is up to 25 uint8 levels off."""
    from torchvision.transforms.v2 import InterpolationMode
    resample = getattr(processor, "resample", None)
    if resample is None:  # a processor that does not say: CLIP's own choice
        return InterpolationMode.BICUBIC
    if isinstance(resample, InterpolationMode):
        return resample
    modes = {0: InterpolationMode.NEAREST, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}
    if int(resample) not in modes:
        raise DataError(f"the image processor's resample={int(resample)} is not nearest (0), bilinear (2) or "
                        f"bicubic (3), the filters this script reproduces on tensors")
    return modes[int(resample)]


# ----------------------------------------------------------------------------------------------------
# Pictures: drawn after the results, so that a picture that cannot be written loses nothing printed

def save_pictures(args, cm, classes, curves=False):
    if args.no_plots:
        return
    out_dir = Path(args.out_dir)
    if curves:
        plumbing.plot_curves(plumbing.read_jsonl(out_dir / "metrics.jsonl"), out_dir / "curves.png")
    plumbing.plot_confusion(cm, classes, out_dir / "confusion.png")
    print(f"pictures in {out_dir}: {'curves.png, ' if curves else ''}confusion.png")


if __name__ == "__main__":
    main()
