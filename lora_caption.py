# /// script
# requires-python = ">=3.10"
# dependencies = ["torch>=2.11", "torchvision>=0.26", "transformers>=5.17", "peft>=0.21", "huggingface_hub", "numpy",
#                 "pillow", "tqdm>=4.66", "matplotlib>=3.7"]
# ///
"""LoRA (or full) fine-tuning of the ViT-GPT2 image captioner on a custom image-caption set.

Reproduces the study guide's LoRA exercise: the captioner nlpconnect/vit-gpt2-image-captioning (a ViT encoder, a
GPT-2 decoder with cross-attention) gets rank-16 adapters (alpha 32, dropout 0.05) on the decoder's attn.c_attn,
attn.c_proj, mlp.c_fc and mlp.c_proj through peft; the rest is frozen, so 2,359,296 of 241,555,200 parameters
(0.98%) train. --finetune full trains every weight instead; --encoder + --decoder compose a new captioner from two
checkpoints, as the course does. Captions are scored with corpus BLEU-4 and CIDEr-D against all references of each
image (and the course's one-reference BLEU), before fine-tuning and after.

    python lora_caption.py --data-dir my_captions/                  # images/ + captions.csv (image,caption)
    python lora_caption.py --data-dir flickr8k/ --finetune full     # every weight trains (lr 5e-5)
    python lora_caption.py --data-dir course/ --encoder google/vit-base-patch16-224-in21k --decoder gpt2
    python lora_caption.py --caption photo1.jpg photos/ --adapter runs/lora_caption/<run>/adapter   # files, folders
    python lora_caption.py --merge --adapter runs/lora_caption/<run>/adapter --out-dir merged/
    python lora_caption.py --resume runs/lora_caption/<run>/training_state.pt
    torchrun --standalone --nproc_per_node=4 lora_caption.py --data-dir flickr8k/ --batch-size 4   # 4 GPUs

--data-dir: captions.csv (image,caption, several rows per image) + optional splits.json, the course's train.txt,
val.txt, test.txt (image;caption), or Flickr8k's token file and image lists; images in images/ (or beside). Outputs:
config.json, metrics.jsonl, summary.json, adapter/ (or model/ with --finetune full), training_state.pt, curves.png,
captions.html. In Python: load_trained, caption_images. Needs common.py.

Measured on one H100 (BENCHMARKS.md): 9.8 ms per captured LoRA step at batch 32 against 74.4 ms eager: the frozen
encoder's output is cached, frozen weights are bf16, and the step is a CUDA graph (where not, one line says why).
"""
import argparse
import csv
import hashlib
import io
import json
import logging
import math
import numbers
import random
import re
import sys
import time
import unicodedata
import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import common as plumbing  # part 2 of common.py: errors, flags, resume, run folders, torchrun, charts
from common import IMAGE_SUFFIXES, DataError, derived_seed, open_rgb, positive_int, undo_steps  # part 1

SCRIPT = "lora_caption"
DEFAULT_MODEL = "nlpconnect/vit-gpt2-image-captioning"
DECODER_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]  # the guide's choice
CROSS_ATTENTION_TARGETS = ["crossattention.c_attn", "crossattention.q_attn", "crossattention.c_proj"]
RUNTIME_FLAGS = (*plumbing.RUN_FLAGS, "no_encoder_cache", "host_cache")  # on --resume: from the command line
LOG_EVERY = 20  # optimizer steps between reads of the training loss (each read waits for the device)
CACHE_SHARE = 0.5  # the encoder cache stays on the GPU if it needs at most this share of the free memory


# ----------------------------------------------------------------------------------------------------
# Config: the flags. Add a flag in build_parser (its range in type=), a rule between two flags in check_args (below
# the banner).

PEAK_LR = {"lora": 3e-4, "full": 5e-5}  # --lr left out, by --finetune (full: the course's rate)


def build_parser():
    p = plumbing.make_parser(__doc__, SCRIPT)
    a = p.add_argument
    a("--data-dir", help="images (in images/ or beside) and captions.csv (image,caption) + optional splits.json, "
                         "or train.txt, val.txt, test.txt (image;caption), or Flickr8k.token.txt + its image lists")
    a("--model", help=f"hub id or local folder of a VisionEncoderDecoderModel (default {DEFAULT_MODEL}; "
                      "with --adapter, the adapter's own base; with --caption, a merged model)")
    a("--encoder", help="compose a new captioner instead: an image encoder (e.g. google/vit-base-patch16-224-in21k)")
    a("--decoder", help="... and a GPT-2-like decoder (e.g. gpt2), whose new cross-attention trains in full")
    a("--finetune", choices=["lora", "full"], default="lora", help="lora: adapters (the guide's); full: every weight")
    a("--freeze-encoder", action="store_true", help="with --finetune full: the encoder stays frozen (and cached)")
    # LoRA
    a("--rank", type=positive_int, default=16, help="LoRA rank r")
    a("--alpha", type=positive, default=32, help="LoRA alpha (the update is scaled by alpha / r)")
    a("--lora-dropout", type=fraction, default=0.05, help="dropout on the LoRA branch input, in [0, 1)")
    a("--targets", nargs="+", default=DECODER_TARGETS,
      help=f"module name suffixes that get adapters (default: {' '.join(DECODER_TARGETS)})")
    a("--cross-attention", action="store_true", help=f"also adapt {', '.join(CROSS_ATTENTION_TARGETS)}")
    # optimisation
    a("--epochs", type=positive_int, default=3, help="passes over the training (image, caption) pairs")
    a("--max-steps", type=positive_int, help="stop after this many optimizer steps")
    a("--batch-size", type=positive_int, default=32, help="(image, caption) pairs per forward pass and process")
    a("--grad-accum", type=positive_int, default=1, help="forward passes per step (effective batch = batch x this)")
    a("--lr", type=positive, help=f"peak AdamW learning rate (default, by --finetune: {PEAK_LR})")
    # common.HelpFormatter hides a default equal to False, which 0 and 0.0 are: those defaults are written out
    a("--weight-decay", type=non_negative, default=0.0, help="AdamW decoupled weight decay (default: 0.0)")
    a("--warmup", type=fraction, default=0.1, help="linear warm-up as a fraction of all steps, cosine to 0 after")
    a("--grad-clip", type=non_negative, default=1.0, help="clip the trained weights' gradient norm to this (0 = off)")
    a("--max-length", type=positive_int, default=40, help="caption tokens kept, EOS included (the padded width)")
    # evaluation
    a("--num-beams", type=positive_int, default=1, help="beam search width for generation (1 = greedy)")
    a("--max-new-tokens", type=positive_int, default=30, help="longest generated caption, in tokens")
    a("--eval-images", type=positive_int, help="score captions on the first N test images only (default: all)")
    a("--eval-every", type=positive_int, default=200, help="validation loss and sample captions every N steps")
    a("--save-every", type=positive_int, default=500, help="save the adapter and training state every N steps")
    a("--no-baseline", action="store_true", help="skip scoring the model before fine-tuning")
    # modes
    a("--caption", nargs="+", metavar="IMAGE", help="caption these images with --adapter (or a merged --model)")
    a("--merge", action="store_true", help="merge --adapter into its base and save a standalone model to --out-dir")
    a("--adapter", help="the adapter/ folder of a training run, or the run's folder (for --caption / --merge)")
    # machine and speed (none of these changes the results)
    a("--no-encoder-cache", action="store_true",
      help="run the frozen encoder at every step instead of caching its output once per image (saves that memory)")
    a("--host-cache", action="store_true", help="keep the encoder cache in host memory even where it fits the GPU")
    a("--seed", type=int, default=0, help="seeds the split, shuffling, LoRA initialisation and dropout (default: 0)")
    plumbing.add_run_flags(p, SCRIPT, "curves.png, captions.html", resume="a run folder or its training_state.pt")
    return p


# ----------------------------------------------------------------------------------------------------
# Model: the captioner (transformers), what trains in it (peft adapters, or every weight) and what it reads: the
# images' pixels, or the frozen encoder's cached output. Edit freely; the speed-ups (fast_path, below the banner)
# each fall back to the plain path when they cannot apply.

def make_trainable(model, args, new_modules):
    """LoRA adapters (only they train), or with --finetune full every weight (the encoder's too, unless
    --freeze-encoder). `new_modules`, a composed captioner's random cross-attention, trains in full either way."""
    if args.finetune == "lora":
        return add_lora(model, args, new_modules)
    for name, p in model.named_parameters():  # a ViT's pooler is left out: the decoder never reads it
        p.requires_grad = not (args.freeze_encoder and name.startswith("encoder.") or ".pooler." in f".{name}")
    return model


def add_lora(model, args, new_modules=()):
    """Wrap with peft; only the adapters (and peft's trained copies of new_modules) require grad afterwards."""
    from peft import LoraConfig, get_peft_model
    targets = list(args.targets) + (CROSS_ATTENTION_TARGETS if args.cross_attention else [])
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.lora_dropout, bias="none",
                        target_modules=targets, modules_to_save=list(new_modules) or None,
                        fan_in_fan_out=True)  # GPT-2's Conv1D stores weights as (in, out)
    try:
        with no_peft_deprecation_warning():
            return get_peft_model(model, config)
    except ValueError as e:
        raise DataError(f"--targets {' '.join(targets)}: {str(e).splitlines()[0]}") from None


def base_model(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def tokenize_captions(tokenizer, captions, max_length):
    """Token ids + EOS, right-padded to the longest caption (one shape for every step); labels -100 on padding."""
    ids = tokenizer(captions, add_special_tokens=False, truncation=True, max_length=max_length - 1)["input_ids"]
    ids = [x + [tokenizer.eos_token_id] for x in ids]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
    return input_ids, mask, input_ids.masked_fill(mask == 0, -100)


def pair_tokens(tokenizer, split, max_length):
    """Every (image, caption) pair of a split: its image index, tokens, decoder input (the start token, then the
    caption shifted right, as the model builds from labels=) and the number of tokens the loss counts."""
    pair_image = torch.tensor([i for i, caps in enumerate(split.captions) for _ in caps], dtype=torch.long)
    input_ids, mask, labels = tokenize_captions(tokenizer, [c for caps in split.captions for c in caps], max_length)
    start = torch.full((len(input_ids), 1), tokenizer.bos_token_id, dtype=torch.long)  # the decoder start token
    return {"pair_image": pair_image, "input_ids": input_ids, "mask": mask, "labels": labels,
            "decoder_ids": torch.cat([start, input_ids[:, :-1]], 1), "count": mask.sum(1)}


def on_device(tokens, device):
    """The tensors a step indexes, copied to the training device once (no copy per step)."""
    return {k: tokens[k].to(device) for k in ("pair_image", "decoder_ids", "labels", "count")}


class Pixels:
    """uint8 images -> the model's pixel_values on the device (rescale + the processor's mean/std)."""

    def __init__(self, processor, device):
        self.device = device
        self.mean = torch.tensor(processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, device=device).view(1, 3, 1, 1)

    def __call__(self, images):
        return (images.to(self.device, non_blocking=True).float() / 255 - self.mean) / self.std


def encoder_cache_blocker(model):
    """Why the encoder's output could change from one step to the next (None if it cannot)."""
    encoder = base_model(model).encoder
    if any(p.requires_grad for p in encoder.parameters()):
        return f"the encoder trains: {'--targets adapts it' if hasattr(model, 'peft_config') else '--finetune full'}"
    rates = [getattr(m, "p", 0) for m in encoder.modules() if "dropout" in type(m).__name__.lower()]
    rates += [v for k, v in encoder.config.to_dict().items()
              if ("dropout" in k or "drop_path" in k) and isinstance(v, float)]
    return "the encoder uses dropout in training" if any(r > 0 for r in rates) else None


class EncoderCache:
    """The frozen encoder's output for every image of a split, computed once under the training autocast, fed to
    the decoder through encoder_outputs=. On the device if it takes at most CACHE_SHARE of the free memory."""

    def __init__(self, model, pixels, images, amp_dtype, batch_size=64, on_device=None):
        self.device, self.states, self.on_device = pixels.device, None, on_device
        encoder = base_model(model).encoder
        was_training = encoder.training
        encoder.eval()
        for i in range(0, len(images), batch_size):
            with torch.no_grad(), autocast(self.device, amp_dtype):
                h = encoder(pixel_values=pixels(images[i:i + batch_size])).last_hidden_state  # [B, tokens, width]
            if self.states is None:
                self.states = self._allocate((len(images), *h.shape[1:]), amp_dtype or h.dtype)
            self.states[i:i + len(h)] = h  # rounded to the autocast dtype exactly as the cross-attention would
        encoder.train(was_training)

    def _allocate(self, shape, dtype):
        if self.on_device is None:
            free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else math.inf
            self.on_device = math.prod(shape) * dtype.itemsize <= CACHE_SHARE * free
        return torch.empty(shape, dtype=dtype, device=self.device if self.on_device else "cpu")

    @property
    def nbytes(self):
        return 0 if self.states is None else self.states.numel() * self.states.element_size()

    def inputs(self, image_idx, image_idx_on_device):  # the model's inputs for these images (host, device indices)
        if self.on_device:
            return {"encoder_outputs": (self.states[image_idx_on_device],)}
        rows = torch.empty((len(image_idx), *self.states.shape[1:]), dtype=self.states.dtype,
                           pin_memory=self.device.type == "cuda")
        torch.index_select(self.states, 0, image_idx, out=rows)
        return {"encoder_outputs": (rows.to(self.device, non_blocking=True),)}


class PixelInputs:
    """Without the cache (`why` says why): the encoder runs at every step on the batch's pixels."""

    def __init__(self, pixels, images, why=None):
        self.pixels, self.images, self.why = pixels, images, why

    def inputs(self, image_idx, image_idx_on_device):
        return {"pixel_values": self.pixels(self.images[image_idx])}


# ----------------------------------------------------------------------------------------------------
# Device, precision, optimizer and schedule. A captured step reads the learning rate from a device tensor that
# CapturedStep fills from the optimizer's group at every replay: change the rate through the schedule.

def amp_dtype_for(device):
    """bf16 autocast where the GPU has it (compute capability >= 8.0), else fp16 + GradScaler; fp32 on CPU, MPS."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def autocast(device, dtype):
    # No cast cache: inside a CUDA graph cached casts would be stale; each weight is cast once a step anyway.
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype is not None else nullcontext()


def lr_factor(step, warmup_steps, total_steps):
    """Linear warm-up to 1, then cosine to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(args, params, device, total_steps):
    """AdamW on what trains (fused on CUDA) and its warm-up + cosine schedule, stepped once per optimizer step."""
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    warmup_steps = int(args.warmup * total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps))


# ----------------------------------------------------------------------------------------------------
# The step: edit train_step. The CUDA graph replays it unchanged, so nothing in it may read a value back to the
# host (no .item(), no print, no Python branch on a tensor); the loss sum stays on the device.

def caption_loss(model, inputs, decoder_ids, labels):
    """Summed cross-entropy over the caption tokens (labels -100 on padding), computed once: the model gets no
    labels=, with which it would compute a loss of its own. `inputs`: pixel_values= or encoder_outputs=."""
    logits = model(**inputs, decoder_input_ids=decoder_ids, use_cache=False).logits  # logits[t] predicts labels[t]
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def train_step(model, optimizer, scaler, params, amp_dtype, grad_clip, world_size, inputs, tokens, loss_sum,
               batches, count):
    """One optimizer step on this process's micro-batches [(image indices on the host or None, pair indices on the
    device)]. The loss is the mean over `count`, the step's caption tokens on all processes (a device tensor in
    the graph), so no split into micro-batches or processes changes the gradient; its sum goes to `loss_sum`."""
    optimizer.zero_grad(set_to_none=True)  # in a graph, backward allocates the gradients in its own memory pool
    model.train()
    for i, (images, pairs) in enumerate(batches):
        reduce_now = world_size == 1 or i == len(batches) - 1  # DDP reduces the gradients once per step
        with nullcontext() if reduce_now else model.no_sync():
            with autocast(loss_sum.device, amp_dtype), no_mask_checks():
                loss = caption_loss(model, inputs.inputs(images, tokens["pair_image"][pairs]),
                                    tokens["decoder_ids"][pairs], tokens["labels"][pairs])
            # DDP averages gradients over processes; x world_size makes that the sum over all tokens.
            scaler.scale(loss * world_size / count).backward()
        loss_sum += loss.detach()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()


def eager(step, tokens, args, rank):
    """The step run eagerly on a step's pairs (host and device copies of the same indices): --grad-accum
    micro-batches of the global batch, this process's slice of each."""
    mine = slice(rank * args.batch_size, (rank + 1) * args.batch_size)

    def run(pairs, pairs_on_device):
        batches = [(tokens["pair_image"][idx[mine]], idx_dev[mine])
                   for idx, idx_dev in zip(pairs.split(args.global_batch), pairs_on_device.split(args.global_batch))]
        step(batches, int(tokens["count"][pairs].sum()))  # host tensors: no wait for the device
    return run


def graph_body(step, device_tokens, pairs):
    """What the graph records: the step on one micro-batch of cached encoder output, from device tensors only."""
    step([(None, pairs)], device_tokens["count"][pairs].sum())


class CapturedStep:
    """graph_body recorded once (after warm-up steps whose effects are undone) and replayed: ~3,000 kernels in one
    call, reading the pair indices and the learning rate from static device tensors (and, with the cache in host
    memory, the encoder states from StagedRows' buffer)."""

    staged = None  # StagedRows, where the encoder cache is in host memory

    def __init__(self, step, optimizer, params, loss_sum, device_tokens, batch_size, staged=None, warmup=3):
        device = loss_sum.device
        self.optimizer, self.staged = optimizer, staged
        self.pairs = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=device)
        undo = undo_steps([*params, loss_sum], [optimizer])  # dropout: reseeded at each step
        rates = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:  # AdamW reads the rate from the device: replays see the schedule
            group["lr"], group["capturable"] = self.lr, True
        optimizer._warned_capturable_if_run_uncaptured = True  # the warm-up steps run uncaptured on purpose
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), no_mask_checks():
                for _ in range(warmup):
                    graph_body(step, device_tokens, self.pairs)
            torch.cuda.current_stream(device).wait_stream(side)
            undo()
            optimizer.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with no_mask_checks(), torch.cuda.graph(self.graph):
                graph_body(step, device_tokens, self.pairs)
        except BaseException:
            torch.cuda.synchronize(device)
            undo()
            optimizer.zero_grad(set_to_none=True)
            for group in optimizer.param_groups:
                group["capturable"] = False
            raise
        finally:
            for group, rate in zip(optimizer.param_groups, rates):
                group["lr"] = rate  # the schedule keeps setting numbers; each replay copies the current one

    def __call__(self, pairs, pairs_on_device):
        self.pairs.copy_(pairs_on_device, non_blocking=True)
        if self.staged is not None:  # the host cache: this batch's rows into the buffer the graph reads
            self.staged.stage(pairs)
        self.lr.fill_(self.optimizer.param_groups[0]["lr"])
        self.graph.replay()


def make_step(args, trained, optimizer, scaler, params, amp_dtype, inputs, tokens, device_tokens, loss_sum, rank):
    """What trains on a step's pairs: a graph replay, else train_step run eagerly after one line saying why. The
    graph reads a cache in host memory through StagedRows; the eager step reads the cache itself."""
    step = partial(train_step, trained, optimizer, scaler, params, amp_dtype, args.grad_clip, args.world_size)
    why = eager_because(args, loss_sum.device, amp_dtype, inputs)
    if why:
        print(f"step: eager ({why})", flush=True)
    staged = None if why or inputs.on_device else StagedRows(inputs, tokens["pair_image"], args.batch_size)
    captured = None if why else capture_step(partial(step, staged or inputs, device_tokens, loss_sum), optimizer,
                                             params, loss_sum, device_tokens, args.batch_size, staged)
    return captured or eager(partial(step, inputs, device_tokens, loss_sum), tokens, args, rank)


# ----------------------------------------------------------------------------------------------------
# Evaluation: captions (greedy or beam) scored with BLEU-4 and CIDEr-D (below the banner), the validation loss.
# Edit freely: it runs in eval mode without gradients and changes no weight.

@torch.no_grad()
def generate_captions(model, tokenizer, pixels, images, args, batch_size=32):
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        with autocast(pixels.device, amp_dtype_for(pixels.device)):
            ids = model.generate(pixel_values=pixels(images[i:i + batch_size]), max_new_tokens=args.max_new_tokens,
                                 num_beams=args.num_beams, do_sample=False)
        out += [c.strip() for c in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return out


def evaluate_captions(model, tokenizer, pixels, split, args, label):
    """(scores, captions) on the first --eval-images test images (scores None without any)."""
    n = min(len(split.names), args.eval_images or len(split.names))
    if n == 0:
        return {"bleu4": None, "cider": None, "bleu_one_ref_per_row": None}, []
    captions = generate_captions(model, tokenizer, pixels, split.images[:n], args)
    scores = score_captions(captions, split.captions[:n])
    print(f"{label}: {score_line(scores)} on {n} test images", flush=True)
    return scores, captions


def evaluate_baseline(args, model, tokenizer, pixels, data):
    """Before fine-tuning: test scores and captions, and the captions of captions.html's images."""
    if not data["test"].names:
        return None
    scores, captions = evaluate_captions(model, tokenizer, pixels, data["test"], args, "before fine-tuning")
    sheet = generate_captions(model, tokenizer, pixels, sheet_split(data).images, args)
    return {"scores": scores, "captions": captions, "sheet": sheet}


@torch.no_grad()
def validation_loss(model, inputs, tokens, device_tokens, amp_dtype, batch_size):
    """Mean cross-entropy per caption token over every validation pair (as the training loss)."""
    model.eval()
    device = device_tokens["labels"].device
    total = torch.zeros((), device=device)
    for idx in torch.arange(len(tokens["pair_image"])).split(batch_size):
        idx_dev = idx.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            total += caption_loss(model, inputs.inputs(tokens["pair_image"][idx], device_tokens["pair_image"][idx_dev]),
                                  device_tokens["decoder_ids"][idx_dev], device_tokens["labels"][idx_dev])
    return total.item() / max(int(tokens["count"].sum()), 1)


def validate(model, tokenizer, pixels, split, inputs, tokens, amp_dtype, args):
    """(validation loss, [(name, caption)] for the first three images); (None, []) without a validation split."""
    if not split.names:
        return None, []
    loss = validation_loss(model, inputs, tokens, on_device(tokens, pixels.device), amp_dtype, args.batch_size)
    return loss, list(zip(split.names, generate_captions(model, tokenizer, pixels, split.images[:3], args)))


# ----------------------------------------------------------------------------------------------------
# The experiment: everything a run does, in order, with the loop written out

def epoch_order(seed, epoch, pairs, per_step):
    """The pair indices of an epoch's optimizer steps, (steps, per_step): a seeded shuffle, the remainder dropped."""
    order = torch.randperm(pairs, generator=torch.Generator().manual_seed(derived_seed(seed, "batches", epoch)))
    return order[:len(order) // per_step * per_step].view(-1, per_step)


def main(argv=None):
    memory_hint = "--batch-size (and a larger --grad-accum to keep the effective batch)"
    with plumbing.one_line_errors(SCRIPT, memory_hint=memory_hint) as report:
        args, ckpt = experiment_args(argv)
        if args.caption:
            return caption_files(args, plumbing.pick_device(args.device))
        if args.merge:
            return merge_adapter(args, plumbing.pick_device(args.device), report)
        rank, world_size, local_rank = plumbing.init_distributed(args.device)
        plumbing.set_global_batch(args, world_size, resuming=ckpt is not None)
        device = plumbing.pick_device(args.device, local_rank)
        out_dir = plumbing.open_run_folder(args, ckpt, report, rank)
        torch.manual_seed(args.seed)
        model, tokenizer, processor, new_modules = load_model(args, out_dir, device, rank, ckpt)
        check_positions(model, {"--max-length": args.max_length, "--max-new-tokens": args.max_new_tokens})
        data, fingerprint, tokens = load_data(args, ckpt, tokenizer, processor)
        per_step = args.global_batch * args.grad_accum  # pairs per optimizer step, all processes together
        total_steps = min(args.epochs * (len(tokens["pair_image"]) // per_step), args.max_steps or math.inf)
        pixels, amp_dtype = Pixels(processor, device), amp_dtype_for(device)
        skip_baseline = args.no_baseline or ckpt or rank  # a resumed run keeps its own
        baseline = None if skip_baseline else evaluate_baseline(args, model, tokenizer, pixels, data)
        model = make_trainable(model, args, new_modules)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, schedule = make_optimizer(args, params, device, total_steps)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        trained = plumbing.wrap_distributed(model, device, world_size)  # DDP reduces only what trains
        progress = Progress(baseline=baseline)
        if ckpt:
            progress = restore_training(ckpt, args, model, optimizer, schedule, scaler, device)
            print(resuming_line(args, ckpt, progress.step, total_steps))
        config = write_config(args, out_dir, rank)
        t0 = time.perf_counter()
        inputs, notes = fast_path(args, model, data, pixels, amp_dtype)
        progress.train_seconds += time.perf_counter() - t0  # encoding the images once is part of training
        start_run(args, report, out_dir, model, data, tokens, device, amp_dtype, notes)
        device_tokens = on_device(tokens, device)
        val_tokens = pair_tokens(tokenizer, data["val"], args.max_length) if data["val"].names else None
        validation = partial(validate, model, tokenizer, pixels, data["val"], inputs["val"], val_tokens, amp_dtype,
                             args)
        save = partial(save_training_state, args, model, tokenizer, processor, optimizer, schedule, scaler,
                       fingerprint, out_dir)
        loss_sum = torch.zeros((), device=device)  # the training loss since the last read, on the device
        tokens_read = torch.zeros((), dtype=torch.long)  # its caption tokens, on the host
        with (plumbing.progress_bar(total_steps, "training", args.no_progress or rank != 0) as bar,
              adapter_inputs_as_given(model, amp_dtype, args.lora_dropout)):
            bar.update(progress.step)
            step = make_step(args, trained, optimizer, scaler, params, amp_dtype, inputs["train"], tokens,
                             device_tokens, loss_sum, rank) if progress.step < total_steps else None
            t0 = time.perf_counter()
            while progress.step < total_steps:
                # shuffled per epoch, seeded by seed and epoch: a resumed run sees the same batches
                order = epoch_order(args.seed, progress.epoch, len(tokens["pair_image"]), per_step)
                order_on_device = order.to(device, non_blocking=True)  # one copy per epoch
                while progress.batch < len(order) and progress.step < total_steps:
                    pairs = order[progress.batch]
                    # dropout draws depend on (seed, step, process) only: resumable at any process count
                    torch.manual_seed(derived_seed(args.seed, "dropout", progress.step, rank))
                    step(pairs, order_on_device[progress.batch])
                    schedule.step()
                    tokens_read += tokens["count"][pairs].sum()  # host tensors: no wait for the device
                    progress.batch += 1
                    progress.step += 1
                    progress.pairs_seen += per_step
                    bar.update(1)
                    loss = None
                    if is_read_step(args, progress.step, total_steps):  # waits for the device
                        loss = read_loss(loss_sum, tokens_read, world_size, progress.step, schedule, bar)
                        progress.train_seconds += time.perf_counter() - t0  # steps only: not validation, saves
                    if rank == 0:
                        after_step(args, progress, loss, schedule, total_steps, out_dir, validation, save)
                    if loss is not None:
                        t0 = time.perf_counter()
                if progress.batch >= len(order):
                    progress.epoch += 1
                    progress.batch = 0
        step = None  # a graph's memory pool (its gradients too) goes back to the evaluation that follows
        optimizer.zero_grad(set_to_none=True)
        summary = None
        if rank == 0:
            after = evaluate_captions(model, tokenizer, pixels, data["test"], args, "after fine-tuning")
            summary = write_summary(args, config, progress, data, after, count_params(model), device, out_dir)
            if not args.no_plots:
                save_pictures(args, model, tokenizer, pixels, progress, data, out_dir)
        if world_size > 1:
            torch.distributed.destroy_process_group()
        return summary


# ===== Run plumbing: nothing below changes what is trained =====

# ----------------------------------------------------------------------------------------------------
# Flags on resume, the run folder, the machine, the start lines

# argparse types for the float flags: finite, in range, with the words this script's users know

def finite_number(words, in_range):
    """An argparse type for a float flag: finite and in_range, else "--flag must be <words>, got <value>"."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not (math.isfinite(value) and in_range(value)):
            raise argparse.ArgumentTypeError(f"must be {words}, got {value}")
        return value
    return parse


positive = finite_number("a finite number > 0", lambda v: v > 0)
non_negative = finite_number("a finite number >= 0", lambda v: v >= 0)
fraction = finite_number("in [0, 1)", lambda v: 0 <= v < 1)


def adapter_inputs_as_given(model, amp_dtype, lora_dropout):
    """Without the adapters' dropout, peft's fp32 cast of their input (undone by autocast) is skipped (peft >= 0.15)."""
    try:
        from peft.helpers import disable_input_dtype_casting
    except ImportError:
        return nullcontext()
    return disable_input_dtype_casting(model, active=amp_dtype is not None and lora_dropout == 0)


@dataclass
class Progress:
    """What training_state.pt records of the run besides weights and flags."""
    step: int = 0
    epoch: int = 0
    batch: int = 0  # optimizer steps done in this epoch
    train_seconds: float = 0.0
    pairs_seen: int = 0
    baseline: dict = None  # scores and captions before fine-tuning (None: not computed)


# The flags each mode reads; any other flag typed with --caption or --merge would be silently ignored.
MODE_FLAGS = {"--caption": {"caption", "adapter", "model", "num_beams", "max_new_tokens", "device", "no_progress"},
              "--merge": {"merge", "adapter", "model", "out_dir", "device", "no_progress"}}  # bars off: harmless
NOT_TRAINING_FLAGS = {"caption", "merge", "adapter"}
LORA_FLAGS = {"rank", "alpha", "lora_dropout", "targets", "cross_attention"}


def check_mode_flags(parser, given, cli):
    """What --caption and --merge need, then: a typed flag the chosen mode does not read is refused."""
    if (cli.merge and not cli.adapter) or (cli.caption and not (cli.adapter or cli.model)):
        raise DataError("--caption and --merge need --adapter DIR (a training run's folder or its adapter/); "
                        "--caption also takes a merged model as --model DIR")
    if cli.merge and not cli.out_dir:
        raise DataError("--merge needs --out-dir for the merged model")
    mode = "--caption" if cli.caption else "--merge" if cli.merge else None
    for action in parser._actions:  # in the parser's order, so that the message names the first one
        name = action.dest
        if name not in given:
            continue
        if mode and name not in MODE_FLAGS[mode]:
            raise DataError(f"{plumbing.flag(name)} has no effect with {mode}; drop it")
        if not mode and name in NOT_TRAINING_FLAGS:
            raise DataError(f"{plumbing.flag(name)} has no effect in training (it is for --caption and --merge); "
                            f"drop it")
        if not (mode or cli.resume) and name in LORA_FLAGS and cli.finetune == "full":
            raise DataError(f"{plumbing.flag(name)} has no effect with --finetune full (no adapters); drop it")
        if not (mode or cli.resume) and name == "freeze_encoder" and cli.finetune == "lora":
            raise DataError("--freeze-encoder goes with --finetune full (with LoRA the encoder is frozen already)")


def check_args(args):
    """The rules that involve two flags (each flag's own range is checked by its type=)."""
    if not (args.caption or args.merge or args.resume) and not args.data_dir:
        raise plumbing.DataError("training needs --data-dir (images + captions.csv, train.txt or Flickr8k.token.txt)")
    if bool(args.encoder) != bool(args.decoder) or (args.encoder and args.model):
        raise DataError("--encoder and --decoder compose a captioner together, in place of --model: give both")
    if args.encoder and args.cross_attention:
        raise DataError("--cross-attention has no effect with --encoder: a composed captioner's new cross-attention "
                        "trains in full")
    if args.host_cache and args.no_encoder_cache:
        raise DataError("--host-cache places the encoder cache, which --no-encoder-cache turns off: drop one")
    if args.max_length < 2:
        raise DataError("--max-length 1 keeps only the end-of-caption token: nothing to learn; pass at least 2")


def experiment_args(argv):
    """(args, checkpoint or None): the command line, or on --resume the run's own flags (a flag that differs is
    refused; more --epochs or --max-steps extend the run)."""
    parser = build_parser()
    cli, given = plumbing.parse(parser, argv)
    check_mode_flags(parser, given, cli)
    for name in ("model", "encoder", "decoder"):  # local folders: a resume finds them from anywhere, and compares
        value = getattr(cli, name)  # them as the run recorded them
        if value and Path(value).expanduser().is_dir():
            setattr(cli, name, str(Path(value).expanduser().resolve()))
    if not cli.resume:
        cli.data_dir = cli.data_dir and str(Path(cli.data_dir).expanduser().resolve())
        cli.lr = cli.lr or PEAK_LR[cli.finetune]
        check_args(cli)
        return cli, None
    ckpt = plumbing.load_checkpoint(cli.resume, SCRIPT)
    args = plumbing.resumed_args(ckpt["args"], cli, given, RUNTIME_FLAGS, extendable=("epochs", "max_steps"),
                                 parser=parser, state=ckpt["state"])
    if "data_dir" in given:
        args.data_dir = str(Path(args.data_dir).expanduser().resolve())
    check_args(args)
    return args, ckpt


def load_data(args, ckpt, tokenizer, processor):
    """The caption set (checked against a resumed run's), its fingerprint and the training pairs' tokens."""
    size, resample = processor_geometry(processor)
    if ckpt and args.data_dir == ckpt["args"]["data_dir"] and not Path(args.data_dir).is_dir():
        raise DataError(f"--resume {args.resume}: the run's data folder {args.data_dir} is gone (moved or deleted?); "
                        f"pass --data-dir with the folder that holds it now")
    data = load_caption_data(args.data_dir, size, resample, args.seed)
    fingerprint = data_fingerprint(data)
    if ckpt:  # a --data-dir typed with --resume must hold the run's data (as in the CIFAR scripts)
        plumbing.check_same_data(ckpt, SimpleNamespace(fingerprint=fingerprint), args.data_dir)
    tokens = pair_tokens(tokenizer, data["train"], args.max_length)
    if len(tokens["pair_image"]) < args.global_batch * args.grad_accum:
        raise DataError(f"--batch-size {args.batch_size} x --grad-accum {args.grad_accum} x {args.world_size} "
                        f"process(es) is more than the {len(tokens['pair_image'])} training pairs")
    return data, fingerprint, tokens


def write_config(args, out_dir, rank):
    """config.json at every start (a resume may have extended --epochs or --max-steps): the flags in force."""
    config = dict(vars(args))
    if rank == 0:
        plumbing.write_json(out_dir / "config.json", config)
    return config


def count_params(model):
    """(trainable, all) parameters; peft's frozen originals of the modules it trains in full are not counted."""
    params = [p for name, p in model.named_parameters() if ".original_module." not in name]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def start_run(args, report, out_dir, model, data, tokens, device, amp_dtype, notes):
    """What Ctrl-C reports, and the start lines."""
    last = out_dir / "training_state.pt"
    report.resume = last
    saved = out_dir / ("adapter" if args.finetune == "lora" else "model")
    report.saved = lambda: (f"the last saved state is {last} (step {load_step(last)}, {saved.name} in {saved})"
                            if last.exists() else
                            f"nothing was saved yet (the first save comes at step {args.save_every})")
    trainable, total = count_params(model)
    sizes = "/".join(str(len(data[k].names)) for k in SPLITS)
    processes = f" ({args.world_size} processes x {args.batch_size})" if args.world_size > 1 else ""
    print(f"{SCRIPT}: trainable {trainable:,} of {total:,} parameters ({trainable / total:.2%}) | {device} "
          f"{amp_dtype or torch.float32} | {sizes} train/val/test images | {len(tokens['pair_image']):,} training "
          f"pairs of {tokens['labels'].shape[1]} tokens | batch {args.global_batch}{processes} x {args.grad_accum} "
          f"accumulated | out {out_dir}")
    print(f"{SCRIPT}: {' | '.join(notes)}", flush=True)


def eager_because(args, device, amp_dtype, inputs):
    """Why the step cannot be captured as a CUDA graph (None where it can)."""
    if not hasattr(inputs, "on_device"):
        return inputs.why  # the encoder runs every step
    if args.grad_accum > 1:
        return "--grad-accum > 1"
    if args.world_size > 1:
        return "torchrun: DDP reduces the gradients"
    if device.type != "cuda":
        return f"not CUDA: {device.type}"
    if amp_dtype != torch.bfloat16:
        return "no bf16 on this GPU"
    return "--eager" if args.eager else None


def capture_step(step, optimizer, params, loss_sum, device_tokens, batch_size, staged=None):
    """A CapturedStep, or None if the capture fails (out of memory included): the run is left as it was, one line
    names the error, and the eager step trains the same model (common.capture_or_none)."""
    return plumbing.capture_or_none(
        lambda: CapturedStep(step, optimizer, params, loss_sum, device_tokens, batch_size, staged), loss_sum.device)


# ----------------------------------------------------------------------------------------------------
# Speed: bf16 frozen weights, the encoder cache and its rows for a graph (each tested to change no result)

def fast_path(args, model, data, pixels, amp_dtype):
    """bf16 frozen weights and the encoder cache: ({split: inputs}, words for the log); each falls back with a word."""
    notes = []
    if amp_dtype == torch.bfloat16:
        try:
            notes.append(f"frozen weights in bf16 (-{cast_frozen_weights(model) / 2 ** 20:,.0f} MiB)")
        except Exception as e:  # modules already cast stay so: identical under autocast either way
            notes.append(f"frozen weights stay fp32 ({plumbing.error_line(e, 100)})")
    blocker = "--no-encoder-cache" if args.no_encoder_cache else encoder_cache_blocker(model)
    if blocker is None:
        t0 = time.perf_counter()
        try:
            on_device = False if args.host_cache else None  # None: where it fits
            inputs = {k: EncoderCache(model, pixels, data[k].images, amp_dtype, on_device=on_device)
                      for k in ("train", "val")}
            where = "on the device" if inputs["train"].on_device else "in host memory"
            notes.append(f"encoder output cached ({sum(len(data[k].names) for k in inputs)} images, "
                         f"{sum(c.nbytes for c in inputs.values()) / 2 ** 20:,.1f} MiB {where}, "
                         f"{time.perf_counter() - t0:.1f}s)")
        except Exception as e:  # out of memory included: the cache is an option
            blocker = f"the cache failed: {plumbing.error_line(e, 100)}"
    if blocker is not None:
        inputs = {k: PixelInputs(pixels, data[k].images, blocker) for k in ("train", "val")}
        notes.append(f"encoder runs every step ({blocker})")
    return inputs, notes


def cast_frozen_weights(model, dtype=torch.bfloat16):
    """Store frozen Linear, Conv1D and Conv2d weights in `dtype`, as autocast casts them anyway: identical results,
    half the memory. LayerNorms, embeddings (the tied lm_head), adapters stay fp32. Returns the bytes saved."""
    from transformers.pytorch_utils import Conv1D
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    saved = 0
    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if (isinstance(m, (torch.nn.Linear, Conv1D, torch.nn.Conv2d)) and params and id(m.weight) not in embeddings
                and not any(p.requires_grad or p.dtype != torch.float32 for p in params)):
            saved += sum(p.numel() for p in params) * (4 - dtype.itemsize)
            m.to(dtype)
    return saved


class StagedRows:
    """The host cache under a CUDA graph: before each replay the batch's rows are gathered into pinned memory and
    copied into one static device buffer, which the graph reads (as vit_scratch copies its batch). Two pinned
    buffers take turns, so that a gather never overwrites rows that are still being copied."""

    def __init__(self, cache, pair_image, batch_size):
        self.cache, self.pair_image, self.turn = cache, pair_image, 0
        shape, cuda = (batch_size, *cache.states.shape[1:]), cache.device.type == "cuda"
        self.rows = torch.zeros(shape, dtype=cache.states.dtype, device=cache.device)
        self.pinned = [torch.empty(shape, dtype=cache.states.dtype, pin_memory=cuda) for _ in range(2)]
        self.copied = [torch.cuda.Event() if cuda else None for _ in range(2)]

    def stage(self, pairs):  # host pair indices -> their images' rows in the device buffer
        buffer, copied = self.pinned[self.turn], self.copied[self.turn]
        if copied is not None:
            copied.synchronize()  # this buffer's previous copy is done
        torch.index_select(self.cache.states, 0, self.pair_image[pairs], out=buffer)
        self.rows.copy_(buffer, non_blocking=True)
        if copied is not None:
            copied.record()
        self.turn = 1 - self.turn

    def inputs(self, image_idx, image_idx_on_device):
        return {"encoder_outputs": (self.rows,)}


# ----------------------------------------------------------------------------------------------------
# Reads, logs, saves: the adapter folder is swapped in whole; the training state is one atomic file

def is_read_step(args, step, total_steps):
    return step % LOG_EVERY == 0 or step % args.eval_every == 0 or step % args.save_every == 0 or step == total_steps


def read_loss(loss_sum, tokens_read, world_size, step, schedule, bar):
    """The mean token loss since the previous read, over all processes: waits for the device. A non-finite loss
    stops the run here, before the state is saved (the last saved state is kept)."""
    loss = plumbing.all_reduce_sum(loss_sum.clone(), world_size).item() / max(int(tokens_read), 1)
    loss_sum.zero_()
    tokens_read.zero_()
    lr = schedule.get_last_lr()[0]
    if not math.isfinite(loss):
        raise plumbing.NonFiniteLoss(f"the training loss became {loss} by step {step} (lr {lr:.2e})")
    bar.set_postfix_str(f"loss {loss:.3f} lr {lr:.1e}")
    return loss


def after_step(args, progress, loss, schedule, total_steps, out_dir, validation, save):
    """Every step, on the main process. At evaluation steps a metrics row (train_loss: the mean since the previous
    read), the validation loss and three sample captions; at save steps save(progress). Both are read steps."""
    step = progress.step
    if step % args.eval_every == 0 or step == total_steps:
        row = {"step": step, "epoch": progress.epoch + 1, "train_loss": loss, "lr": schedule.get_last_lr()[0]}
        val_loss, samples = validation()
        if samples:
            row["val_loss"] = val_loss
            print(f"step {step}/{total_steps} | train loss {loss:.4f} | val loss {val_loss:.4f} | lr {row['lr']:.2e}",
                  flush=True)
            for name, caption in samples:
                print(f"    {name}: {caption}")
        plumbing.append_jsonl(out_dir / "metrics.jsonl", row)
    if step % args.save_every == 0 or step == total_steps:
        save(progress)


def load_step(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state"]["step"]


def base_model_name(args):
    """What the adapter records as its base: --model (a local folder as an absolute path, so that --caption
    and --merge find it from anywhere), a composed captioner's base/ folder, or the default hub id."""
    name = str(Path(args.out_dir) / "base") if args.encoder else args.model or DEFAULT_MODEL
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def save_training_state(args, model, tokenizer, processor, optimizer, schedule, scaler, fingerprint, out_dir,
                        progress):
    """training_state.pt (what trains, the optimizer, where the run is), then the adapter/ folder, or with
    --finetune full the whole model/ folder (a captioner --model loads), each written beside and swapped in whole."""
    plumbing.save_checkpoint({"script": SCRIPT, "trainable": plumbing.trainable_state(model),
                              "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                              "scaler": scaler.state_dict(), "state": asdict(progress), "args": vars(args),
                              "data_fingerprint": fingerprint}, out_dir / "training_state.pt")
    if args.finetune == "lora":
        plumbing.save_adapter(model, out_dir, base_model=base_model_name(args))
        return
    # frozen weights cast to bf16 are saved as fp32 again, so that the folder loads as any fp32 captioner
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    plumbing.save_folder(out_dir / "model", [(model, state), tokenizer, processor])


def resuming_line(args, ckpt, step, total_steps):
    """The resume's first line; raised --epochs or --max-steps that still end the run where it stopped (it would only
    be evaluated again) are refused in one line instead."""
    raised = [name for name in ("epochs", "max_steps") if getattr(args, name) != ckpt["args"].get(name)]
    if raised and step >= total_steps:
        limit = "--max-steps" if args.max_steps is not None and args.max_steps <= step else "--epochs"
        raise DataError(f"{plumbing.flag(raised[0])} {getattr(args, raised[0])} trains nothing: {limit} still ends "
                        f"the run at step {total_steps}, where it stopped; raise {limit} as well")
    return f"resuming {args.resume} at step {step} of {total_steps}"


def restore_training(ckpt, args, model, optimizer, schedule, scaler, device):
    """Adapters, optimizer, schedule and scaler from a training_state.pt; returns its Progress."""
    unexpected = model.load_state_dict(ckpt["trainable"], strict=False).unexpected_keys
    if unexpected or ckpt["trainable"].keys() != plumbing.trainable_state(model).keys():
        raise DataError(f"--resume {args.resume}: its adapter weights do not match this model and --targets/--rank "
                        f"(e.g. {(unexpected or sorted(ckpt['trainable']))[0]})")
    optimizer.load_state_dict(ckpt["optimizer"])
    plumbing.place_adamw_state(optimizer, device, capture=False)  # a capture sets its own (CapturedStep)
    schedule.load_state_dict(ckpt["schedule"])
    scaler.load_state_dict(ckpt["scaler"])
    # rows logged after the last save are logged again by the resumed run
    plumbing.trim_metrics(Path(args.out_dir) / "metrics.jsonl", lambda row: row["step"] <= ckpt["state"]["step"])
    return Progress(**ckpt["state"])


def write_summary(args, config, progress, data, after, counts, device, out_dir):
    """summary.json. pairs_per_second counts (image, caption) pairs; images_per_second, the common field, is
    null here: the encoder sees each image once (cached), so an image rate would say nothing about a step."""
    base = progress.baseline or {"scores": {}, "captions": [None] * len(after[1])}  # scores .get(): None
    examples = [{"image": n, "references": refs, "before": b, "after": a}
                for n, refs, b, a in zip(data["test"].names[:5], data["test"].captions[:5], base["captions"], after[1])]
    summary = {"script": SCRIPT, "dataset": f"captions ({args.data_dir})", "train_images": len(data["train"].names),
               "test_images": len(after[1]), "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
               "epochs": round(progress.pairs_seen / sum(map(len, data["train"].captions)), 3),
               "steps": progress.step, "world_size": args.world_size, "global_batch": args.global_batch,
               "test_acc": None, "train_seconds": progress.train_seconds, "images_per_second": None,
               "pairs_per_second": progress.pairs_seen / max(progress.train_seconds, 1e-9),
               "peak_memory_mb": plumbing.peak_memory_mb(device), "params": counts[1], "trainable_params": counts[0],
               "args": config, "model": None if args.encoder else args.model or DEFAULT_MODEL,
               "bleu4_before": base["scores"].get("bleu4"),
               "cider_before": base["scores"].get("cider"), "bleu4": after[0]["bleu4"], "cider": after[0]["cider"],
               # the course's figure (COURSE_BLEU); a baseline saved before it existed has none
               "bleu_one_ref_per_row_before": base["scores"].get("bleu_one_ref_per_row"),
               "bleu_one_ref_per_row": after[0]["bleu_one_ref_per_row"],
               "finetune": args.finetune, "composed_from": [args.encoder, args.decoder] if args.encoder else None,
               "adapter_bytes": plumbing.folder_bytes(out_dir / "adapter") if args.finetune == "lora" else None,
               "model_bytes": plumbing.folder_bytes(out_dir / "model") if args.finetune == "full" else None,
               "base_bytes": (plumbing.folder_bytes(out_dir / "base") if args.encoder and args.finetune == "lora"
                              else None),
               "examples": examples}
    summary = plumbing.write_summary(out_dir / "summary.json", summary)
    for ex in examples:  # without a baseline (--no-baseline, or a resumed run's) there is no "before"
        before = f"before {ex['before']!r} | " if ex["before"] is not None else ""
        print(f"{ex['image']}: {before}after {ex['after']!r} | reference {ex['references'][0]!r}")
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    saved = "adapter" if args.finetune == "lora" else "model"
    print(f"BLEU-4 {fmt(summary['bleu4_before'])} -> {fmt(summary['bleu4'])} | CIDEr-D {fmt(summary['cider_before'])} "
          f"-> {fmt(summary['cider'])} | {COURSE_BLEU} {fmt(summary['bleu_one_ref_per_row_before'])} -> "
          f"{fmt(summary['bleu_one_ref_per_row'])} | {summary['train_seconds']:.1f}s training | "
          f"{summary['pairs_per_second']:,.1f} pairs/s | {saved} {summary[saved + '_bytes'] / 2 ** 20:.1f} MiB")
    return summary


# ----------------------------------------------------------------------------------------------------
# Pictures: curves.png, captions.html

SHEET_IMAGES = 8  # validation images shown in captions.html, the same ones every run


def sheet_split(data):
    """The images captions.html shows: the first validation images (test images if there is no validation split)."""
    split = data["val"] if data["val"].names else data["test"]
    n = min(SHEET_IMAGES, len(split.names))
    return CaptionSplit(split.names[:n], split.images[:n], split.captions[:n])


def save_pictures(args, model, tokenizer, pixels, progress, data, out_dir):
    plumbing.plot_curves(plumbing.read_jsonl(out_dir / "metrics.jsonl"), out_dir / "curves.png", x="step",
                         panels=(("loss", ("train_loss", "val_loss")), ("learning rate", ("lr",))))
    sheet = sheet_split(data)
    if not sheet.names:
        print(f"pictures in {out_dir}: curves.png (no validation or test image for captions.html)")
        return
    after = generate_captions(model, tokenizer, pixels, sheet.images, args)
    before = (progress.baseline or {}).get("sheet") or [None] * len(after)
    write_caption_sheet(out_dir / "captions.html", sheet, before, after, args.model or DEFAULT_MODEL)
    print(f"pictures in {out_dir}: curves.png, captions.html")


def write_caption_sheet(path, split, before, after, model_name):
    """A self-contained HTML page (images embedded as JPEG data URIs): image, references, caption before
    fine-tuning, caption after."""
    import base64
    import html
    import io

    from PIL import Image
    def shown(caption):
        return "<em>not computed</em>" if caption is None else html.escape(caption) or "<em>(empty caption)</em>"

    rows = []
    for name, image, refs, b, a in zip(split.names, split.images, split.captions, before, after):
        buf = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=85)
        src = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        refs_html = "".join(f"<li>{html.escape(r)}</li>" for r in refs)
        rows.append(f'<tr><td><img src="{src}" alt="{html.escape(name)}" width="224"><br>'
                    f'<code>{html.escape(name)}</code></td><td><ul>{refs_html}</ul></td><td>{shown(b)}</td>'
                    f'<td><strong>{shown(a)}</strong></td></tr>')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Captions before and after LoRA fine-tuning</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:8px;vertical-align:top;max-width:360px}}ul{{margin:0;padding-left:1.2em}}</style>
</head><body><h1>Captions before and after LoRA fine-tuning</h1>
<p>Base model: <code>{html.escape(model_name)}</code></p>
<table><thead><tr><th>image</th><th>references</th><th>before fine-tuning</th><th>after fine-tuning</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""
    plumbing.write_text_atomic(path, page)


# ----------------------------------------------------------------------------------------------------
# Caption metrics (scoring only): corpus BLEU-4 and CIDEr-D against every reference of each image

def score_captions(hypotheses, references):
    hyp = [caption_tokens(h) for h in hypotheses]
    refs = [[caption_tokens(r) for r in rs] for rs in references]
    return {"bleu4": corpus_bleu4(hyp, refs), "cider": cider_d(hyp, refs),
            "bleu_one_ref_per_row": bleu_one_ref_per_row(hypotheses, references)}


COURSE_BLEU = "BLEU (one reference per row, whitespace tokens)"  # the course's figure, named apart from BLEU-4


def score_line(scores):
    return (f"BLEU-4 {scores['bleu4']:.4f} | CIDEr-D {scores['cider']:.4f} | "
            f"{COURSE_BLEU} {scores['bleu_one_ref_per_row']:.4f}")


_IDEOGRAPHS = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")  # CJK ideographs


def caption_tokens(text):
    """Lower-case words and numbers, punctuation dropped: the usual preparation for caption metrics. Words are
    runs of letters, digits and combining marks in any script (after NFKC normalisation, so 'Mädchen' is one
    word however it was typed); each CJK ideograph is a word of its own, as in sacrebleu's Chinese tokenizer.
    ASCII text gives exactly its [a-z0-9]+ runs, the tokens the tests hand to sacrebleu and pycocoevalcap. They
    are not the COCO evaluation's: its PTB tokenizer keeps "well-dressed" whole and "'s" as a token, where this
    gives "well", "dressed" and "s"."""
    if text.isascii():
        return re.findall(r"[a-z0-9]+", text.lower())
    words, word = [], ""
    for ch in unicodedata.normalize("NFKC", text).lower():
        if _IDEOGRAPHS.match(ch):
            words += [word, ch] if word else [ch]
            word = ""
        elif unicodedata.category(ch)[0] in "LNM":
            word += ch
        elif word:
            words.append(word)
            word = ""
    return words + [word] if word else words


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


def bleu_one_ref_per_row(hypotheses, references):
    """The course's BLEU, computed as nltk's corpus_bleu (4-grams, equal weights, no smoothing) does on a table of
    (image, caption) rows: each row's caption is the one reference of the caption generated for its image, both
    split on whitespace as they are (case and punctuation kept). Not BLEU-4 over all references (corpus_bleu4): an
    image counts once per row, an n-gram order's denominator is at least 1 per row (so captions shorter than 4 words
    count), and an order without any match gives the smallest float (nltk warns) instead of 0. `references`: each
    image's rows."""
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for hypothesis, rows in zip(hypotheses, references):
        hyp = hypothesis.split()
        for row in rows:
            ref = row.split()
            hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
            for n in range(1, 5):
                counts, ref_counts = _ngrams(hyp, n), _ngrams(ref, n)
                matches[n - 1] += sum(min(c, ref_counts[g]) for g, c in counts.items())
                totals[n - 1] += max(1, sum(counts.values()))
    if matches[0] == 0:
        return 0.0
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(math.fsum(0.25 * math.log(m / t if m else sys.float_info.min)
                                        for m, t in zip(matches, totals)))


def cider_d(hypotheses, references, sigma=6.0):
    """CIDEr-D (Vedantam et al. 2015, the COCO evaluation server's variant) over token lists: TF-IDF
    vectors of 1- to 4-grams (document frequency over the references of the corpus), cosine similarity
    with the hypothesis' weights clipped at the reference's, a Gaussian penalty on the length
    difference, averaged over n and references, times 10. As the reference code, lengths count bigrams.
    An empty corpus scores 0."""
    if not hypotheses:
        return 0.0
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
# transformers and peft: their bars and warnings quieted, another kind of model refused by name

MASK_WARNINGS = {
    # GPT-2's forward, whenever its config has a pad id (= EOS = the start token) in the first or last column
    "transformers.modeling_utils": ("We strongly recommend passing in an `attention_mask`",),
    # generate() with a batch, when pad = EOS
    "transformers.generation.utils": ("The attention mask is not set", "The attention mask and the pad token id"),
}


def _mask_warning_filter(prefixes):
    return lambda record: not record.getMessage().startswith(prefixes)


def quiet_transformers():
    """Silence what the script handles itself: transformers' own progress bars ('Loading weights', 'Writing
    model shards'; download bars stay) and the warnings that the decoder gets no attention mask."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging
    downloads_shown = not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    if downloads_shown:
        enable_progress_bars()
    for name, prefixes in MASK_WARNINGS.items():
        logger = logging.getLogger(name)
        if not any(getattr(f, "mask_warnings", False) for f in logger.filters):  # once per process
            drop = _mask_warning_filter(prefixes)
            drop.mask_warnings = True
            logger.addFilter(drop)


@contextmanager
def no_peft_deprecation_warning():
    """peft's warnings that are not the user's concern: it calls an API that transformers 5 deprecated
    (is_gradient_checkpointing), and with --targets naming the encoder's nn.Linear layers it sets fan_in_fan_out
    per module (GPT-2's Conv1D needs True, a Linear False), as it should, with a warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to", category=UserWarning)
        yield


def load_captioner(name, device, label=None):
    """(model, tokenizer, image processor); `label` names the model in messages (default: --model NAME)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel
    quiet_transformers()
    plumbing.check_model_folder(name, label or f"--model {name}", DEFAULT_MODEL)  # a path-like name: a folder
    try:
        check_is_captioner(AutoConfig.from_pretrained(name), label or f"--model {name}")
        model = VisionEncoderDecoderModel.from_pretrained(name, **plumbing.NO_HUB_KERNELS)
        tokenizer = AutoTokenizer.from_pretrained(name)
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load the captioner {name!r} ({str(e).strip().splitlines()[0]})"
                        f"{plumbing.no_folder_here(name)}; offline, pass "
                        f"--model PATH to a local copy (a save_pretrained folder with tokenizer and image processor)"
                        ) from None
    return use_decoder_tokens(model, tokenizer).to(device), tokenizer, processor


def use_decoder_tokens(model, tokenizer):
    """GPT-2 has no pad token: pad = EOS = BOS = the decoder's start token (50256 for GPT-2). No token is added (the
    course's solutions add <|pad|> and a start token, and so new embedding rows that must learn from nothing)."""
    tokenizer.pad_token = tokenizer.eos_token
    for config in (model.config, model.generation_config):
        config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        config.decoder_start_token_id = tokenizer.bos_token_id
    return model


def load_model(args, out_dir, device, rank, ckpt):
    """(model, tokenizer, processor, new modules) for training: --model (or the default captioner), or --encoder +
    --decoder composed. A composed captioner trained with LoRA keeps its base in the run's base/ folder (its random
    cross-attention is part of it), written once, so that the adapter, --caption and --merge find it later."""
    if not args.encoder:
        return (*load_captioner(args.model or DEFAULT_MODEL, device), [])
    base = out_dir / "base"
    if ckpt and args.finetune == "lora" and (base / "config.json").is_file():  # resumed: the run's own base
        model, tokenizer, processor = load_captioner(base, device, label=f"the run's base model {base}")
        return model, tokenizer, processor, json.loads((base / "new_modules.json").read_text())
    model, tokenizer, processor, new_modules = compose_captioner(args.encoder, args.decoder)
    if args.finetune == "lora" and rank == 0:
        plumbing.save_folder(base, [model, tokenizer, processor], {"new_modules.json": json.dumps(new_modules)})
    return model.to(device), tokenizer, processor, new_modules


def compose_captioner(encoder_name, decoder_name):
    """A VisionEncoderDecoderModel from an image encoder and a causal LM decoder given cross-attention (as
    from_encoder_decoder_pretrained builds it), and the names of the modules that start random: the decoder's
    cross-attention (the weights its checkpoint lacks) and a projection where the two widths differ."""
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer,
                              VisionEncoderDecoderModel)
    quiet_transformers()
    try:
        encoder = AutoModel.from_pretrained(encoder_name, **plumbing.NO_HUB_KERNELS)
        processor = AutoImageProcessor.from_pretrained(encoder_name)
    except (OSError, ValueError) as e:
        raise DataError(f"--encoder {encoder_name}: cannot load it ({str(e).strip().splitlines()[0]}); offline, pass "
                        f"a local save_pretrained folder with its image processor") from None
    try:
        config = AutoConfig.from_pretrained(decoder_name)
        config.is_decoder = config.add_cross_attention = True
        # transformers' table of the missing (new) weights is said below in one line instead (a filter: a higher
        # level on that logger turns on another warning, of tensor-parallel plans)
        report, drop = logging.getLogger("transformers.modeling_utils"), lambda r: "LOAD REPORT" not in r.getMessage()
        report.addFilter(drop)
        try:
            decoder, info = AutoModelForCausalLM.from_pretrained(decoder_name, config=config, output_loading_info=True,
                                                                 **plumbing.NO_HUB_KERNELS)
        finally:
            report.removeFilter(drop)
        tokenizer = AutoTokenizer.from_pretrained(decoder_name)
    except (OSError, ValueError) as e:
        raise DataError(f"--decoder {decoder_name}: cannot load it ({str(e).strip().splitlines()[0]}); offline, pass "
                        f"a local save_pretrained folder with its tokenizer") from None
    model = use_decoder_tokens(VisionEncoderDecoderModel(encoder=encoder, decoder=decoder), tokenizer)
    params = dict(model.named_parameters())
    new = sorted({f"decoder.{k.rsplit('.', 1)[0]}" for k in info["missing_keys"] if f"decoder.{k}" in params})
    if not any("cross" in name for name, _ in decoder.named_modules()):
        raise DataError(f"--decoder {decoder_name}: it gained no cross-attention (a {type(decoder).__name__}); pass "
                        f"a GPT-2-like decoder that takes add_cross_attention")
    new += ["enc_to_dec_proj"] * hasattr(model, "enc_to_dec_proj")
    count = sum(p.numel() for n, p in params.items() if any(n.startswith(f"{m}.") for m in new))
    print(f"{SCRIPT}: composed {encoder_name} + {decoder_name}; new, trained in full: {len(new)} modules, {count:,} "
          f"weights (cross-attention{', a projection of the encoder width' * ('enc_to_dec_proj' in new)})")
    return model, tokenizer, processor, new


@contextmanager
def no_mask_checks():
    """transformers' data checks (padding, packed sequences) answered instead of asked, as the decoder gets no mask
    and positions 0..T-1: no step waits for the device, and a capture records the eager step's kernels."""
    import transformers
    try:
        from transformers import masking_utils
    except ImportError:
        masking_utils = None
    answers = [(masking_utils, "is_tracing", lambda tensor=None: False),
               (masking_utils, "find_packed_sequence_indices", lambda position_ids: None),
               # GPT-2 looks for a pad id in its first and last columns when its config has one (the padding is
               # meant: labels mask it, and the causal mask keeps it out of the caption's tokens)
               (transformers.PreTrainedModel, "warn_if_padding_and_no_attention_mask", lambda *args: None)]
    answers = [(owner, name, answer) for owner, name, answer in answers if owner and name in vars(owner)]
    saved = [(owner, name, vars(owner)[name]) for owner, name, _ in answers]
    for owner, name, answer in answers:
        setattr(owner, name, answer)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def check_is_captioner(config, label):
    """A folder of another kind of model (a CLIP, a plain GPT-2) would fail deep inside transformers: its
    config.json, read first, says what it holds."""
    if config.model_type != "vision-encoder-decoder":
        kind = ", ".join(config.architectures or []) or f"{config.model_type} model"
        raise DataError(f"{label} holds a {kind}, not a VisionEncoderDecoderModel: pass an image captioner "
                        f"with its tokenizer and image processor (e.g. {DEFAULT_MODEL}), or a --merge output")


def check_positions(model, lengths):
    """`lengths` ({name: tokens}) against the decoder's positions: a longer caption fails deep inside its embedding
    lookup (an IndexError), so it is refused here, before any work. Generating n new tokens reads n positions."""
    config = model.config.decoder
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    for name, value in lengths.items():
        if positions and value > positions:
            raise DataError(f"{name} {value} is longer than the decoder's {positions} positions; pass at most "
                            f"{positions}")


def processor_geometry(processor):
    from torchvision.transforms.v2 import InterpolationMode
    size = processor.size
    hw = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    modes = {0: InterpolationMode.NEAREST, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}
    return hw, modes.get(int(getattr(processor, "resample", 2)), InterpolationMode.BILINEAR)


# ----------------------------------------------------------------------------------------------------
# Input hardening: captions.csv + images, checked and decoded before any training

SPLITS = ("train", "val", "test")


@dataclass
class CaptionSplit:
    names: list  # image file names
    images: torch.Tensor  # uint8 [N, 3, H, W], resized for the model
    captions: list  # [N] lists of reference captions


# The layouts read, in this order: captions.csv (or Kaggle's captions.txt) + optional splits.json; the course's
# split files; Flickr8k as it ships (the image lists decide the splits; the images in Flicker8k_Dataset/, sic).
COURSE_FILES = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}  # image;caption, a header line each
FLICKR8K_TOKENS = "Flickr8k.token.txt"  # image#n<TAB>caption, no header
FLICKR8K_LISTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                  "test": "Flickr_8k.testImages.txt"}  # one image name a line
IMAGE_FOLDERS = ("images", "Flicker8k_Dataset", "Flickr8k_Dataset")  # else the images lie beside the table


@dataclass
class CaptionTable:
    rows: list  # [(image, caption)]
    problems: dict  # {kind: [where]}: bad rows, reported and skipped
    splits: dict = None  # {split: [image names]} where the layout decides them (else splits.json or a seeded split)
    source: str = "splits.json"  # what decides the splits, in messages
    test_file: str = None  # the layout's test list, in the message about an empty test split


def find_caption_table(root):
    for name in ("captions.csv", "captions.txt"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no captions.csv (columns image,caption) or captions.txt found, nor the course's "
                    f"train.txt + val.txt (image;caption), nor Flickr8k's {FLICKR8K_TOKENS} + image lists")


def read_caption_layout(root, log):
    """The caption rows of whichever layout `root` holds (see COURSE_FILES and FLICKR8K_TOKENS)."""
    if any((root / name).is_file() for name in ("captions.csv", "captions.txt")) or not (
            (root / COURSE_FILES["train"]).is_file() or (root / FLICKR8K_TOKENS).is_file()):
        return CaptionTable(*read_caption_rows(find_caption_table(root), log))
    return read_course_files(root, log) if (root / COURSE_FILES["train"]).is_file() else read_flickr8k(root, log)


def required_lists(root, have, files, layout):
    """The layout's train and validation files must both be there (a test file is optional)."""
    missing = [files[k] for k in ("train", "val") if not (root / files[k]).is_file()]
    if missing:
        raise DataError(f"{root}: {have} is there but not {missing[0]}; {layout}")


def split_of_each_image(root, splits, files):
    """An image in two splits' files would be trained on and scored on: one error naming both files."""
    seen = {}
    for k, names in splits.items():
        for name in names:
            if seen.setdefault(name, k) != k:
                raise DataError(f"{root}: {name} is in both {files[seen[name]]} and {files[k]}; an image belongs to "
                                f"one split (else its captions are trained on and scored on)")


def read_course_files(root, log):
    """The course's layout: train.txt, val.txt and optionally test.txt, each a caption table with a header line
    (image;caption; read as captions.csv is); the file an image's rows are in is its split."""
    required_lists(root, COURSE_FILES["train"], COURSE_FILES,
                   "the course's layout: train.txt, val.txt, optional test.txt, each image;caption with a header")
    rows, problems, splits = [], {}, {}
    for k, name in COURSE_FILES.items():
        split_rows, split_problems = read_caption_rows(root / name, log) if (root / name).is_file() else ([], {})
        for kind, where in split_problems.items():
            problems.setdefault(kind, []).extend(f"{name} {w}" for w in where)
        splits[k] = list(dict.fromkeys(image for image, _ in split_rows))  # first appearance order
        rows += split_rows
    split_of_each_image(root, splits, COURSE_FILES)
    return CaptionTable(rows, problems, splits, "the split files", COURSE_FILES["test"])


def read_flickr8k(root, log):
    """Flickr8k as it ships: Flickr8k.token.txt (image#n<TAB>caption, no header) and the image lists
    Flickr_8k.trainImages.txt, .devImages.txt (the validation split) and optionally .testImages.txt."""
    required_lists(root, FLICKR8K_TOKENS, FLICKR8K_LISTS, f"Flickr8k's layout is {FLICKR8K_TOKENS} with "
                   f"{', '.join(FLICKR8K_LISTS.values())} (the last optional)")
    table = root / FLICKR8K_TOKENS
    problems = {"malformed row": [], "empty caption": [], "duplicate row": []}
    rows, seen = [], set()
    lines = read_caption_text(table).replace("\r\n", "\n").split("\n")
    for line, text in enumerate(lines, start=1):
        key, tab, caption = text.partition("\t")
        image, hash_sign, number = key.strip().rpartition("#")
        where = f"{FLICKR8K_TOKENS} line {line}"
        if not text.strip():
            continue
        if not (tab and hash_sign and image and number.isdigit()):
            problems["malformed row"].append(where)
        elif not caption.strip():
            problems["empty caption"].append(where)
        elif (image, caption.strip()) in seen:
            problems["duplicate row"].append(where)
        else:
            seen.add((image, caption.strip()))
            rows.append((image, caption.strip()))
    if not rows:
        raise DataError(f"{table}: no line of the form image#n<TAB>caption (line 1 is {lines[0][:60]!r})")
    return CaptionTable(rows, problems, read_image_lists(root, log), "the Flickr_8k.*Images.txt lists",
                        FLICKR8K_LISTS["test"])


def read_image_lists(root, log):
    """{split: image names} from Flickr8k's lists, one name a line; a line of two words is reported and skipped."""
    splits, bad = {}, {"malformed line": []}
    for k, name in FLICKR8K_LISTS.items():
        listed = read_caption_text(root / name).split("\n") if (root / name).is_file() else []
        splits[k] = []
        for line, text in enumerate(listed, start=1):
            if len(text.split()) > 1:  # two names, or a name and a caption
                bad["malformed line"].append(f"{name} line {line}")
            elif text.strip():
                splits[k].append(text.strip())
        splits[k] = list(dict.fromkeys(splits[k]))
    report(bad, "image list line(s)", log)
    split_of_each_image(root, splits, FLICKR8K_LISTS)
    return splits


def read_caption_text(table):
    """The caption table as text: UTF-8, with or without a BOM. Anything else is one clear error naming the
    encoding, not a UnicodeDecodeError or silently garbled words."""
    raw = Path(table).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{table} is not UTF-8 text (line {line} holds the byte 0x{raw[e.start]:02x}), perhaps "
                        f"Latin-1 / Windows-1252: save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def caption_delimiter(header):
    """The table's separator, guessed from its header line: comma, tab, semicolon or bar (comma if unclear)."""
    try:
        return csv.Sniffer().sniff(header, delimiters=",\t;|").delimiter
    except csv.Error:
        return ","


def read_caption_rows(table, log=print):
    """[(image, caption)] with malformed rows, empty captions and duplicates counted under `problems`. Kaggle's
    Flickr8k captions.txt leaves commas inside captions unquoted: when the caption is the last column, the
    extra fields of a row are joined back into it."""
    text = read_caption_text(table)
    delimiter = caption_delimiter(text.split("\n", 1)[0])
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [h.strip().lower() for h in next(reader, [])]
    if "image" not in header or "caption" not in header:
        raise DataError(f"{table}: needs the columns image,caption; its header is {','.join(header) or '(empty)'}")
    i_img, i_cap = header.index("image"), header.index("caption")
    problems = {"malformed row": [], "empty caption": [], "duplicate row": []}
    rows, seen, joined = [], set(), 0
    for line, row in enumerate(reader, start=2):
        if len(row) > len(header) and i_cap == len(header) - 1:
            row, joined = row[:i_cap] + [delimiter.join(row[i_cap:])], joined + 1
        if len(row) != len(header) or not row[i_img].strip():
            problems["malformed row"].append(f"line {line}")
            continue
        image, caption = row[i_img].strip(), row[i_cap].strip()
        if not caption:
            problems["empty caption"].append(f"line {line}")
        elif (image, caption) in seen:
            problems["duplicate row"].append(f"line {line}")
        else:
            seen.add((image, caption))
            rows.append((image, caption))
    if joined:
        log(f"{table}: {joined} caption(s) hold an unquoted {delimiter!r}; their fields were joined back")
    return rows, problems


def report(problems, what, log):
    for kind, examples in problems.items():
        if examples:
            more = " ..." if len(examples) > 3 else ""
            log(f"skipped {len(examples)} {what} ({kind}): {', '.join(examples[:3])}{more}")


def load_caption_data(data_dir, image_size, resample, seed, log=print):
    """{'train'|'val'|'test': CaptionSplit}, every image decoded and resized; problems reported, skipped. An
    empty test split is said before any work: captions are then not scored."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data-dir {root}: {'a file, not a folder' if root.exists() else 'no such folder'} (pass the "
                        f"folder that holds the images and the captions file)")
    table = read_caption_layout(root, log)
    report(table.problems, "caption row(s)", log)
    by_image = {}
    for image, caption in table.rows:
        by_image.setdefault(image, []).append(caption)
    names = sorted(by_image)
    if table.splits is not None:  # only the images the layout's lists place in a split are read
        listed = {n for v in table.splits.values() for n in v}
        unlisted = [n for n in names if n not in listed]
        if unlisted:
            log(f"{len(unlisted)} captioned image(s) are in none of {table.source}; left out, e.g. {unlisted[0]}")
        names = [n for n in names if n in listed]
    images, bad = decode_images(root, names, image_size, resample)
    report(bad, "image(s)", log)
    if not images:
        raise DataError(f"{root}: no readable image is named in the caption table; nothing to train on")
    splits = split_names(root, sorted(images), seed, log, table)
    if not splits["train"]:
        raise DataError(f"{root}: the training split is empty; nothing to train on")
    if not splits["test"]:
        if table.test_file:
            why = f"{table.test_file} names no readable image" if (root / table.test_file).is_file() else \
                f"there is no {table.test_file}"
        elif (root / "splits.json").is_file():
            why = "splits.json lists no readable test image"
        else:
            why = f"{len(images)} image(s) are too few for a held-out split"
        log(f"{root}: the test split is empty ({why}); captions will not be scored (bleu4 and cider are null)")
    empty = torch.zeros(0, 3, *image_size, dtype=torch.uint8)
    return {k: CaptionSplit(v, torch.stack([images[n] for n in v]) if v else empty, [by_image[n] for n in v])
            for k, v in splits.items()}


def data_fingerprint(data):
    """A hash of what a run reads: each split's image names, captions and decoded pixels. A copy of the folder
    elsewhere gives the same hash; a changed image, caption or split gives another."""
    h = hashlib.blake2b(digest_size=8)
    for k in SPLITS:
        h.update(repr((k, data[k].names, data[k].captions)).encode())
        h.update(data[k].images.contiguous().numpy().data)
    return h.hexdigest()


def decode_images(root, names, image_size, resample):
    from torchvision.transforms.v2 import functional as TF
    folder = next((root / f for f in IMAGE_FOLDERS if (root / f).is_dir()), root)
    images, bad = {}, {"missing": [], "unreadable": []}
    for name in names:
        # a name is relative to images/ (Flickr8k's tables) or to the table's own folder ("images/x.jpg")
        path = next((p for p in (folder / name, root / name) if p.is_file()), folder / name)
        if not path.is_file():
            bad["missing"].append(name)
            continue
        try:
            x = torch.from_numpy(np.array(open_rgb(path))).permute(2, 0, 1)
        except Exception as e:
            bad["unreadable"].append(f"{name} ({type(e).__name__})")
            continue
        images[name] = TF.resize(x, list(image_size), interpolation=resample, antialias=True)
    return images, bad


def read_splits(path):
    """splits.json as {'train'|'val'|'test': [image names]} (a missing list is empty); anything else is one
    clear error."""
    expected = 'expected {"train": [...], "val": [...], "test": [...]} with image file names'
    try:
        listed = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); {expected}") from None
    if not isinstance(listed, dict):
        raise DataError(f"{path} holds a JSON {type(listed).__name__}; {expected}")
    for k in SPLITS:
        if not isinstance(listed.get(k, []), list) or not all(isinstance(n, str) for n in listed.get(k, [])):
            raise DataError(f"{path}: its {k!r} entry is not a list of image names; {expected}")
    return {k: listed.get(k, []) for k in SPLITS}


def split_names(root, names, seed, log, table=None):
    """The layout's splits (table.splits), else splits.json if present (names listed there that were skipped are
    dropped), else a seeded 80/10/10 split."""
    listed = table.splits if table is not None else None
    if listed is not None or (root / "splits.json").is_file():
        listed = listed if listed is not None else read_splits(root / "splits.json")
        present = set(names)
        splits = {k: [n for n in listed[k] if n in present] for k in SPLITS}
        dropped = sum(map(len, listed.values())) - sum(map(len, splits.values()))
        if dropped:
            log(f"{table.source if table else 'splits.json'} names {dropped} image(s) that were skipped or have no "
                f"caption")
        return splits
    order = names[:]
    random.Random(seed).shuffle(order)
    n_held = max(1, len(order) // 10) if len(order) >= 3 else 0
    return {"val": sorted(order[:n_held]), "test": sorted(order[n_held:2 * n_held]),
            "train": sorted(order[2 * n_held:])}


# ----------------------------------------------------------------------------------------------------
# Other modes: --caption (in Python: load_trained, caption_images), --merge

def load_with_adapter(args, device):
    """The base captioner (--model, else the one the adapter records) with --adapter loaded on it. An adapter
    made for another model is refused: peft would load it with none of its weights in place."""
    from peft import PeftConfig, PeftModel
    args.adapter = str(plumbing.adapter_folder(args.adapter))  # a run's folder: its adapter/
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        full = full_run_model(args.adapter) or full_run_model(Path(args.adapter).parent)
        if full:
            raise DataError(f"--adapter {args.adapter}: a --finetune full run has no adapter; its {full} is a whole "
                            f"captioner already (--caption ... --model {full})")
        raise DataError(f"--adapter {args.adapter}: no adapter_config.json there (expected a run's adapter/ folder)")
    recorded = PeftConfig.from_pretrained(args.adapter).base_model_name_or_path
    beside = Path(args.adapter).parent / "base"  # a composed run's base, where the run folder is now (moved?)
    if recorded and Path(recorded).name == "base" and not Path(recorded).exists():
        recorded = str(beside) if (beside / "config.json").is_file() else recorded
    check_recorded_base(args.adapter, recorded)
    base = args.model or recorded or DEFAULT_MODEL
    recorded_as = f"the base model {base} that --adapter {args.adapter} records (--model overrides it)"
    label = f"--model {base}" if args.model else recorded_as
    model, tokenizer, processor = load_captioner(base, device, label)
    try:
        with no_peft_deprecation_warning(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # peft's "missing adapter keys": checked below, in one line
            model = PeftModel.from_pretrained(model, args.adapter)
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # no weights file, no module of that name, other shapes
        # peft versions differ in where a foreign adapter fails; the message names one of its own keys either way
        held = sorted(saved_adapter_keys(args.adapter))
        detail = f"e.g. {held[0]}" if held else plumbing.error_line(e)
        raise adapter_misfit(args.adapter, base, recorded, detail) from None
    for config in model.peft_config.values():  # where the base is now (a moved run's base/): peft reads it
        config.base_model_name_or_path = str(base)
    check_adapter_keys(model, args.adapter, base, recorded)
    return model.to(device).eval(), tokenizer, processor


def check_recorded_base(adapter, recorded):
    """An adapter that records a local base folder of another kind of model (clip_zeroshot.py's adapters
    record their CLIP) is refused by name. A hub id is not looked up: offline it cannot be."""
    config = Path(recorded or "") / "config.json"
    if recorded and config.is_file():
        try:
            held = json.loads(config.read_text())
        except (OSError, ValueError):
            return
        if held.get("model_type") != "vision-encoder-decoder":
            kind = ", ".join(held.get("architectures") or []) or f"{held.get('model_type')} model"
            raise DataError(f"--adapter {adapter} was trained on {recorded} (a {kind}), not on an image captioner: "
                            f"pass the adapter/ folder of a {SCRIPT}.py run")


def check_adapter_keys(model, adapter, base, recorded):
    """Every weight in the adapter's file must have found its module in the model, and every adapter module
    must have its weights: else merging or captioning would use an unchanged (or half-changed) base."""
    from peft import get_peft_model_state_dict
    saved = saved_adapter_keys(adapter)
    expected = set(get_peft_model_state_dict(model))
    if not expected or saved != expected:
        example = sorted(saved - expected) or sorted(expected - saved) or ["no module matched"]
        raise adapter_misfit(adapter, base, recorded, f"e.g. {example[0]}")


def saved_adapter_keys(adapter):
    """The weight names in an adapter's file; an unreadable file has none."""
    from peft.utils import load_peft_weights  # the file peft reads (safetensors, or an older peft's .bin)
    try:
        return set(load_peft_weights(str(adapter), device="cpu"))
    except (OSError, ValueError):
        return set()


def adapter_misfit(adapter, base, recorded, detail):
    made_for = f" (it records {recorded} as its base)" if recorded and recorded != base else ""
    return DataError(f"--adapter {adapter}: its weights do not fit the modules of {base}{made_for}: {detail}; "
                     f"pass the adapter/ folder of a {SCRIPT}.py run on this model")


def full_run_model(path):
    """The model/ folder of a --finetune full run's folder (None for any other folder)."""
    path = Path(path)
    try:
        finetune = json.loads((path / "config.json").read_text()).get("finetune")
    except (OSError, ValueError, AttributeError):
        return None
    return path / "model" if finetune == "full" and (path / "model" / "config.json").is_file() else None


def caption_inputs(given):
    """--caption's arguments as files: a folder stands for the images in it (by suffix, sorted, hidden files
    left out). Paths that are neither a file nor a folder are returned apart, to be named."""
    files, missing = [], []
    for name in given:
        path = Path(name)
        if path.is_dir():
            files += [str(f) for f in sorted(path.iterdir())
                      if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
        elif path.is_file():
            files.append(name)
        else:
            missing.append(name)
    return files, missing


@dataclass
class TrainedCaptioner:
    """What load_trained returns and caption_images reads: a captioner in eval mode, its tokenizer and image
    processor, and the device it is on."""
    model: object
    tokenizer: object
    processor: object
    device: torch.device


def load_trained(run_or_adapter_or_model, device="cpu", model=None):
    """A trained captioner for caption_images, from a training run's folder (its adapter/, or model/ after --finetune
    full), an adapter folder (on
    the base model it records, or on `model`), or a merged model (a --merge folder, or any VisionEncoderDecoderModel
    folder or hub id). `device`: "cpu", "cuda", "mps", "auto", "cuda:1" or a torch.device. Loads as --caption does:
    an adapter of another model is refused with the same one-line DataError. What the loading changes in the process
    (transformers' progress bars, which it silences; random generators) is put back, as after main()."""
    restore = plumbing.save_process_state()
    try:
        return _load_trained(run_or_adapter_or_model, device, model)
    finally:
        restore()


def _load_trained(run_or_adapter_or_model, device, model):
    device = plumbing.api_device(device)
    path = Path(run_or_adapter_or_model).expanduser()
    full = full_run_model(path) if model is None else None
    if full:  # a --finetune full run: its whole captioner
        path = run_or_adapter_or_model = full
    adapter = plumbing.adapter_folder(path)
    if (adapter / "adapter_config.json").is_file():
        loaded = load_with_adapter(SimpleNamespace(adapter=str(adapter), model=model and str(model)), device)
    elif model is not None:
        raise DataError(f"load_trained({str(run_or_adapter_or_model)!r}, model=...): model= is the base of an adapter, "
                        f"and this is no run or adapter folder (no adapter_config.json)")
    else:
        loaded = load_captioner(str(run_or_adapter_or_model), device, label=str(run_or_adapter_or_model))
    loaded[0].eval()
    return TrainedCaptioner(*loaded, device)


def caption_images(captioner, images, num_beams=1, max_new_tokens=30, batch_size=32):
    """Captions (a list of strings, in order) for image files (paths), PIL images, numpy arrays (H, W[, 3]) or
    tensors ([3, H, W] uint8, or float in [0, 1]; a [B, 3, H, W] batch), by a load_trained captioner: greedy by
    default, as --caption; `num_beams` and `max_new_tokens` as the flags. Images are read as in training (EXIF
    rotation applied, any mode to 8-bit RGB) and resized to the model's input size. A bad argument or an image that
    cannot be read is one DataError naming it."""
    batch = torch.is_tensor(images) and images.ndim == 4 or isinstance(images, np.ndarray) and images.ndim == 4
    single = isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "getexif") or torch.is_tensor(images)
    images = list(images) if batch or not single else [images]
    for name, value in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:  # numpy's ints too
            raise DataError(f"caption_images: {name}={value!r}; pass a whole number, at least 1")
    check_positions(captioner.model, {"max_new_tokens": max_new_tokens})
    if not images:
        return []
    size, resample = processor_geometry(captioner.processor)
    pixels = torch.stack([image_tensor(image, size, resample) for image in images])
    settings = SimpleNamespace(num_beams=num_beams, max_new_tokens=max_new_tokens)
    return generate_captions(captioner.model, captioner.tokenizer, Pixels(captioner.processor, captioner.device),
                             pixels, settings, batch_size)


def image_tensor(image, size, resample):
    """A path (read by common.open_rgb), a PIL image (converted as open_rgb converts), a numpy array or a tensor
    (see caption_images) as uint8 [3, H, W] at the model's input size; anything else is one DataError."""
    from torchvision.transforms.v2 import functional as TF
    if isinstance(image, np.ndarray):  # (H, W) or (H, W, C): as a tensor [C, H, W], checked as one
        x = torch.from_numpy(np.ascontiguousarray(image))
        image = x.permute(2, 0, 1) if x.ndim == 3 else x
    if torch.is_tensor(image):
        x = image.detach().cpu()
        x = x[None] if x.ndim == 2 else x  # grayscale
        shape = "x".join(map(str, x.shape))
        if x.ndim != 3 or x.shape[0] not in (1, 3):
            hint = ("; it looks like [H, W, C]: pass x.permute(2, 0, 1)" if x.ndim == 3 and x.shape[-1] in (1, 3) else
                    "; for RGBA pass x[:3]" if x.ndim == 3 and x.shape[0] == 4 else "")
            raise DataError(f"caption_images: an image must be [3, H, W] or [H, W] (a numpy array (H, W, 3) or "
                            f"(H, W)), got [{shape}]{hint}")
        if x.is_floating_point():
            # a resize may overshoot [0, 1] a little; normalised pixels (about -2..2.6) would caption as noise
            if x.numel() and not (-0.05 <= x.min() and x.max() <= 1.05):
                raise DataError(f"caption_images: a float image must hold values in [0, 1], got "
                                f"{x.min():.3g}..{x.max():.3g}; pass uint8, or float in [0, 1]")
            x = x.clamp(0, 1).mul(255).round().to(torch.uint8)
        elif x.dtype != torch.uint8:
            raise DataError(f"caption_images: an image must be uint8 or float in [0, 1], got {x.dtype}")
        return TF.resize(x.expand(3, -1, -1), list(size), interpolation=resample, antialias=True)
    if isinstance(image, (str, Path)) and not Path(image).expanduser().is_file():
        missing = "a folder, not an image file" if Path(image).expanduser().is_dir() else "no such file"
        raise DataError(f"caption_images: {image}: {missing}")
    try:
        x = torch.from_numpy(np.array(open_rgb(image))).permute(2, 0, 1)  # a path or an open PIL image
    except Exception as e:  # PIL raises many kinds for a broken or foreign file
        raise DataError(f"caption_images: {image if isinstance(image, (str, Path)) else type(image).__name__}: "
                        f"cannot read it as an image ({type(e).__name__})") from e
    return TF.resize(x, list(size), interpolation=resample, antialias=True)


def caption_files(args, device):
    """Captions for image files (or every image in a folder), by the base model + --adapter, or by a --model
    alone (a merged one), through caption_images. A file that cannot be read is named in a line of its own and
    the others are captioned; if none can be, that is one error."""
    files, missing = caption_inputs(args.caption)
    skipped = [f"{name} (no such file or folder)" for name in missing]
    if not files:
        empty = [n for n in args.caption if Path(n).is_dir()]
        why = f"{empty[0]} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})" if empty else skipped[0]
        raise DataError(f"--caption: nothing to caption: {why}")
    model = full_run_model(args.model) if args.model and not args.adapter else None  # a --finetune full run
    loaded = load_with_adapter(args, device) if args.adapter else load_captioner(model or args.model, device)
    check_positions(loaded[0], {"--max-new-tokens": args.max_new_tokens})
    size, resample = processor_geometry(loaded[2])
    read, images = [], []  # a file named twice is captioned twice; each is kept at the model's size only
    for path in files:
        try:
            images.append(image_tensor(path, size, resample))
            read.append(path)
        except DataError as e:  # PIL's own error (many kinds for a broken or foreign file) is its cause
            skipped.append(f"{path} (cannot read it as an image: {type(e.__cause__ or e).__name__})")
    if not images:
        raise DataError(f"--caption: none of the {len(files) + len(missing)} file(s) could be read as an image, "
                        f"e.g. {skipped[0]}")
    for line in skipped:
        print(f"skipped {line}")
    captions = caption_images(TrainedCaptioner(*loaded, device), images, args.num_beams, args.max_new_tokens)
    for path, caption in zip(read, captions):
        print(f"{path}: {caption}")
    return dict(zip(read, captions))


def merge_out_dir(path, report):
    """--merge writes a whole model folder (config.json, weights, tokenizer, image processor): into a new or
    empty folder only, so that it can never overwrite a run's config.json or another model."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out-dir {out} is a file; --merge writes a model folder: pick a new folder")
    held = sorted(p.name for p in out.iterdir() if p.name != plumbing.LOCK_FILE) if out.is_dir() else []  # a lock
    if held:
        raise DataError(f"--out-dir {out} already holds files ({', '.join(held[:3])}{' ...' * (len(held) > 3)}); "
                        f"--merge writes a whole model folder: pick a new or empty folder")
    report.created_out_dir, report.out_dir = not out.exists(), out
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / plumbing.LOCK_FILE, "a+")
    except OSError as e:
        raise DataError(f"--out-dir {out}: cannot write there ({e.strerror or e})") from None
    plumbing.hold_lock(lock, out, report)  # a second --merge into the same folder is refused while this one lives
    return out


def merge_adapter(args, device, report):
    """The merged model is written into a folder beside --out-dir and moved in whole: a full disk or a kill leaves
    --out-dir as it was (empty), never a half-written model."""
    import os
    import shutil
    out = merge_out_dir(args.out_dir, report)
    model, tokenizer, processor = load_with_adapter(args, device)
    merged = model.merge_and_unload()
    tmp = out.with_name(f".{out.name}.merging")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for part in (merged, tokenizer, processor):
            part.save_pretrained(tmp)
        for item in tmp.iterdir():
            os.replace(item, out / item.name)
    except OSError as e:
        for item in out.iterdir():  # what was moved in before the failure
            if item.is_dir():
                shutil.rmtree(item)
            elif item.name != plumbing.LOCK_FILE:
                item.unlink()
        raise plumbing.OutputWriteError(e.errno, f"could not write the merged model into {out} "
                                                 f"({e.strerror or e}); {out} holds nothing of it") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (out / plumbing.LOCK_FILE).unlink(missing_ok=True)  # a model folder, not a run's: no lock file left in it
    print(f"merged {args.adapter} into its base: a standalone model in {out} (load it with --model {out})")
    return out



if __name__ == "__main__":
    main()
