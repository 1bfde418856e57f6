# /// script
# requires-python = ">=3.10"
# dependencies = ["torch>=2.5", "torchvision>=0.20", "transformers>=4.46", "peft>=0.13", "numpy", "pillow",
#                 "tqdm>=4.66", "matplotlib>=3.7"]
# ///
"""LoRA fine-tuning of the ViT-GPT2 image captioner's decoder on a custom image-caption set.

Reproduces the study guide's LoRA exercise: the captioner nlpconnect/vit-gpt2-image-captioning (a ViT
encoder, a GPT-2 decoder with cross-attention) gets rank-16 adapters (alpha 32, dropout 0.05) on the
decoder's attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj through peft; everything else is frozen, so
2,359,296 of 241,555,200 parameters (0.98%) train. Captions are scored with corpus BLEU-4 and CIDEr-D
against all references of each image, before fine-tuning (the zero-shot baseline) and after.

    python lora_caption.py --data-dir my_captions/                  # images/ + captions.csv (image,caption)
    python lora_caption.py --data-dir flickr8k/ --rank 8 --max-steps 2000
    python lora_caption.py --caption photo1.jpg photo2.jpg --adapter runs/lora_caption/<run>/adapter
    python lora_caption.py --merge --adapter runs/lora_caption/<run>/adapter --out-dir merged/
    python lora_caption.py --resume runs/lora_caption/<run>/training_state.pt
    torchrun --standalone --nproc_per_node=4 lora_caption.py --data-dir flickr8k/ --batch-size 4   # 4 GPUs

--data-dir holds captions.csv (image,caption; several rows per image allowed, the layout of Kaggle's
Flickr8k captions.txt, which is read too) and the images (in images/ or beside the CSV), with an
optional splits.json ({"train": [...], "val": [...], "test": [...]} image names). Bad rows and images
are reported and skipped before training starts. Outputs in --out-dir: config.json, metrics.jsonl,
summary.json, adapter/ (peft adapter only), training_state.pt, curves.png, captions.html. Measured
figures: BENCHMARKS.md.
Needs common.py.
"""
import csv
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import (CheckpointWriteError, DataError, NonFiniteLoss, all_reduce_sum, append_jsonl, derived_seed, flag,
                    given_flags, init_distributed, load_checkpoint, make_parser, one_line_errors, peak_memory_mb,
                    plot_curves, prepare_out_dir, progress_bar, read_jsonl, restore_rng, resumed_args, rng_state,
                    save_checkpoint, set_global_batch, trim_metrics, wrap_distributed, write_json, write_text_atomic)

SCRIPT = "lora_caption"
DEFAULT_MODEL = "nlpconnect/vit-gpt2-image-captioning"
DECODER_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]  # the guide's choice
CROSS_ATTENTION_TARGETS = ["crossattention.c_attn", "crossattention.q_attn", "crossattention.c_proj"]
# Flags that describe the machine, not the experiment: on --resume they come from the command line.
RUNTIME_FLAGS = ("device", "no_progress", "no_plots", "overwrite")
SHEET_IMAGES = 8  # validation images shown in captions.html, the same ones every run


def build_parser():
    p = make_parser(__doc__)
    a = p.add_argument
    a("--data-dir", default=None, help="captions.csv (image,caption) + images; see the top of this file")
    a("--model", default=None, help=f"hub id or local folder of a VisionEncoderDecoderModel (default {DEFAULT_MODEL}; "
                                    "with --adapter, the adapter's own base)")
    # LoRA
    a("--rank", type=int, default=16, help="LoRA rank r")
    a("--alpha", type=float, default=32, help="LoRA alpha (the update is scaled by alpha / r)")
    a("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA branch input, in [0, 1)")
    a("--targets", nargs="+", default=DECODER_TARGETS, help="module name suffixes that get adapters")
    a("--cross-attention", action="store_true", help="also adapt the decoder's cross-attention (" + ", ".join(CROSS_ATTENTION_TARGETS) + ")")
    # optimisation
    a("--epochs", type=int, default=3, help="passes over the training (image, caption) pairs")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    a("--batch-size", type=int, default=16, help="(image, caption) pairs per forward pass and process")
    a("--grad-accum", type=int, default=1, help="forward passes per optimizer step (effective batch = batch x this)")
    a("--lr", type=float, default=2e-4, help="peak AdamW learning rate of the adapters")
    a("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    a("--warmup", type=float, default=0.1, help="linear warm-up as a fraction of all steps, cosine to 0 after")
    a("--grad-clip", type=float, default=1.0, help="clip the adapters' gradient norm to this (0 = off)")
    a("--max-length", type=int, default=40, help="caption tokens kept for training, EOS included")
    # evaluation
    a("--num-beams", type=int, default=1, help="beam search width for generation (1 = greedy)")
    a("--max-new-tokens", type=int, default=30, help="longest generated caption, in tokens")
    a("--eval-images", type=int, default=None, help="score captions on the first N test images only")
    a("--eval-every", type=int, default=200, help="validation loss and sample captions every N steps")
    a("--save-every", type=int, default=500, help="save the adapter and training state every N steps")
    a("--no-baseline", action="store_true", help="skip scoring the model before fine-tuning")
    # modes
    a("--caption", nargs="+", metavar="IMAGE", default=None, help="caption these image files with --adapter, then exit")
    a("--merge", action="store_true", help="merge --adapter into its base and save a standalone model to --out-dir")
    a("--adapter", default=None, help="an adapter folder written by a training run (for --caption / --merge)")
    # machine
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto picks cuda, then mps, then cpu")
    a("--seed", type=int, default=0, help="seeds the split, shuffling, LoRA initialisation and dropout")
    a("--out-dir", default=None, help="where results go (default: a new folder runs/lora_caption/<date-time>)")
    a("--overwrite", action="store_true", help="replace the results of another run in --out-dir")
    a("--resume", default=None, help="continue from a training_state.pt; its flags are kept (--epochs and --max-steps may grow)")
    a("--no-progress", action="store_true", help="no tqdm bars (they are off anyway when stderr is not a terminal)")
    a("--no-plots", action="store_true", help="no pictures (curves.png, captions.html)")
    return p


def check_args(args):
    for name in ("rank", "epochs", "batch_size", "grad_accum", "max_length", "num_beams", "max_new_tokens", "eval_every", "save_every"):
        if getattr(args, name) <= 0:
            raise DataError(f"{flag(name)} must be positive, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0 and math.isfinite(args.alpha) and args.alpha > 0):
        raise DataError("--lr and --alpha must be positive")
    for name in ("lora_dropout", "warmup"):
        if not 0 <= getattr(args, name) < 1:
            raise DataError(f"{flag(name)} must be in [0, 1), got {getattr(args, name)}")
    for name in ("max_steps", "eval_images"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise DataError(f"{flag(name)} must be positive")
    if (args.caption or args.merge) and not args.adapter:
        raise DataError("--caption and --merge need --adapter DIR (the adapter/ folder of a training run)")
    if args.merge and not args.out_dir:
        raise DataError("--merge needs --out-dir for the merged model")
    if not (args.caption or args.merge or args.resume) and not args.data_dir:
        raise DataError("training needs --data-dir (a folder with captions.csv and the images)")


def pick_device(name, local_rank=0):
    """The device to train on; under torchrun, this process's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda, but PyTorch sees no CUDA GPU (use --device cpu or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DataError("--device mps, but this PyTorch has no MPS backend (use --device cpu or auto)")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def amp_dtype_for(device):
    """bf16 autocast where the GPU supports it, else fp16 (with a GradScaler); fp32 on CPU and MPS.
    Weights, the adapters included, stay in fp32: autocast only lowers the matmuls."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ----------------------------------------------------------------------------------------------------
# Data: captions.csv + images, checked and decoded before any training

@dataclass
class CaptionSplit:
    names: list  # image file names
    images: torch.Tensor  # uint8 [N, 3, H, W], resized for the model
    captions: list  # [N] lists of reference captions


def open_rgb(path):
    """Any image PIL reads as 8-bit RGB: EXIF rotation applied; grey, palette, RGBA (alpha dropped), CMYK
    and 16-bit images converted."""
    from PIL import Image, ImageOps
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale to 8 bits, not clip
            im = Image.fromarray((np.asarray(im, dtype=np.float32) / 257).clip(0, 255).astype(np.uint8))
        return im.convert("RGB")


def find_caption_table(root):
    for name in ("captions.csv", "captions.txt"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no captions.csv (columns image,caption) or captions.txt found")


def read_caption_rows(table):
    """[(image, caption)] with malformed rows, empty captions and duplicates counted under `problems`."""
    problems = {"malformed row": [], "empty caption": [], "duplicate row": []}
    rows, seen = [], set()
    with open(table, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        if "image" not in header or "caption" not in header:
            raise DataError(f"{table}: needs the columns image,caption; its header is {','.join(header) or '(empty)'}")
        i_img, i_cap = header.index("image"), header.index("caption")
        for line, row in enumerate(reader, start=2):
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
    return rows, problems


def report(problems, what, log):
    for kind, examples in problems.items():
        if examples:
            more = " ..." if len(examples) > 3 else ""
            log(f"skipped {len(examples)} {what} ({kind}): {', '.join(examples[:3])}{more}")


def load_caption_data(data_dir, image_size, resample, seed, log=print):
    """{'train'|'val'|'test': CaptionSplit}, every image decoded and resized; problems reported, skipped."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data-dir {root}: no such folder")
    rows, problems = read_caption_rows(find_caption_table(root))
    report(problems, "caption row(s)", log)
    by_image = {}
    for image, caption in rows:
        by_image.setdefault(image, []).append(caption)
    images, bad = decode_images(root, sorted(by_image), image_size, resample)
    report(bad, "image(s)", log)
    if not images:
        raise DataError(f"{root}: no readable image is named in the caption table; nothing to train on")
    splits = split_names(root, sorted(images), seed, log)
    if not splits["train"]:
        raise DataError(f"{root}: the training split is empty; nothing to train on")
    return {k: CaptionSplit(v, torch.stack([images[n] for n in v]) if v else torch.zeros(0, 3, *image_size, dtype=torch.uint8),
                            [by_image[n] for n in v]) for k, v in splits.items()}


def decode_images(root, names, image_size, resample):
    from torchvision.transforms.v2 import functional as TF
    folder = root / "images" if (root / "images").is_dir() else root
    images, bad = {}, {"missing": [], "unreadable": []}
    for name in names:
        path = folder / name
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


def split_names(root, names, seed, log):
    """splits.json if present (names it lists that were skipped are dropped), else a seeded 80/10/10 split."""
    if (root / "splits.json").is_file():
        listed = json.loads((root / "splits.json").read_text())
        present = set(names)
        splits = {k: [n for n in listed.get(k, []) if n in present] for k in ("train", "val", "test")}
        dropped = sum(len(listed.get(k, [])) for k in splits) - sum(map(len, splits.values()))
        if dropped:
            log(f"splits.json names {dropped} image(s) that were skipped or have no caption")
        return splits
    order = names[:]
    random.Random(seed).shuffle(order)
    n_held = max(1, len(order) // 10) if len(order) >= 3 else 0
    return {"val": sorted(order[:n_held]), "test": sorted(order[n_held:2 * n_held]), "train": sorted(order[2 * n_held:])}


def tokenize_captions(tokenizer, captions, max_length):
    """Token ids + EOS, right-padded with the pad (= EOS) id; labels are the ids with -100 wherever the
    attention mask is 0, so the caption's own EOS is learned and padding is not."""
    ids = tokenizer(captions, add_special_tokens=False, truncation=True, max_length=max_length - 1)["input_ids"]
    ids = [x + [tokenizer.eos_token_id] for x in ids]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
    return input_ids, mask, input_ids.masked_fill(mask == 0, -100)


class Pixels:
    """uint8 images -> the model's pixel_values on the device (rescale + the processor's mean/std)."""

    def __init__(self, processor, device):
        self.device = device
        self.mean = torch.tensor(processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, device=device).view(1, 3, 1, 1)

    def __call__(self, images):
        return (images.to(self.device, non_blocking=True).float() / 255 - self.mean) / self.std


# ----------------------------------------------------------------------------------------------------
# Model: the captioner through transformers, adapters through peft

def load_captioner(name, device):
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel
    try:
        model = VisionEncoderDecoderModel.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
        processor = AutoImageProcessor.from_pretrained(name)
    except OSError as e:
        raise DataError(f"cannot load the captioner {name!r} ({str(e).strip().splitlines()[0]}); offline, pass --model PATH "
             f"to a local copy (a save_pretrained folder with tokenizer and image processor)")
    # GPT-2 has no pad token: pad = EOS = BOS = the decoder's start token (50256 for GPT-2).
    tokenizer.pad_token = tokenizer.eos_token
    for config in (model.config, model.generation_config):
        config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        config.decoder_start_token_id = tokenizer.bos_token_id
    return model.to(device), tokenizer, processor


def processor_geometry(processor):
    from torchvision.transforms.v2 import InterpolationMode
    size = processor.size
    hw = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    modes = {0: InterpolationMode.NEAREST, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}
    return hw, modes.get(int(getattr(processor, "resample", 2)), InterpolationMode.BILINEAR)


def add_lora(model, args):
    """Wrap with peft; only the adapters require grad afterwards."""
    from peft import LoraConfig, get_peft_model
    targets = list(args.targets) + (CROSS_ATTENTION_TARGETS if args.cross_attention else [])
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.lora_dropout, bias="none",
                        target_modules=targets, fan_in_fan_out=True)  # GPT-2's Conv1D stores weights as (in, out)
    try:
        with warnings.catch_warnings():  # peft calls a transformers 5 deprecated API; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as e:
        raise DataError(f"--targets {' '.join(targets)}: {str(e).splitlines()[0]}")


def count_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def lr_factor(step, warmup_steps, total_steps):
    """Linear warm-up to 1, then cosine to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------------
# Evaluation: greedy/beam captions, BLEU-4 and CIDEr-D, validation loss

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


def score_captions(hypotheses, references):
    hyp = [caption_tokens(h) for h in hypotheses]
    refs = [[caption_tokens(r) for r in rs] for rs in references]
    return {"bleu4": corpus_bleu4(hyp, refs), "cider": cider_d(hyp, refs)}


def evaluate_captions(model, tokenizer, pixels, split, args, label):
    n = min(len(split.names), args.eval_images or len(split.names))
    captions = generate_captions(model, tokenizer, pixels, split.images[:n], args)
    scores = score_captions(captions, split.captions[:n])
    print(f"{label}: BLEU-4 {scores['bleu4']:.4f} | CIDEr-D {scores['cider']:.4f} on {n} test images", flush=True)
    return scores, captions


def caption_token_loss(model, pixels, images, labels):
    """Summed cross-entropy over the caption tokens (labels -100 on padding) and the number of tokens."""
    logits = model(pixel_values=pixels(images), labels=labels).logits  # logits[t] predicts labels[t]
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


@torch.no_grad()
def validation_loss(model, pixels, split, tokens, amp_dtype, batch_size):
    """Mean cross-entropy per caption token over every validation pair (as the training loss)."""
    model.eval()
    total, count = 0.0, 0
    for idx in torch.arange(len(tokens["pair_image"])).split(batch_size):
        width = int(tokens["mask"][idx].sum(1).max())
        with autocast(pixels.device, amp_dtype):
            loss, n = caption_token_loss(model, pixels, split.images[tokens["pair_image"][idx]],
                                         tokens["labels"][idx, :width].to(pixels.device))
        total, count = total + loss.item(), count + n
    return total / max(count, 1)


def pair_tokens(tokenizer, split, max_length):
    """Every (image, caption) pair of a split: the image index per pair and the caption's tokens."""
    pair_image = torch.tensor([i for i, caps in enumerate(split.captions) for _ in caps], dtype=torch.long)
    input_ids, mask, labels = tokenize_captions(tokenizer, [c for caps in split.captions for c in caps], max_length)
    return {"pair_image": pair_image, "input_ids": input_ids, "mask": mask, "labels": labels}


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
# Saving: the adapter folder is swapped in whole; the training state is one atomic file

def load_step(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state"]["step"]


def save_adapter(model, out_dir):
    final, tmp, old = out_dir / "adapter", out_dir / "adapter.tmp", out_dir / "adapter.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write the adapter ({e.strerror or e}); the previous {final} is intact") from None
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)  # until here the previous adapter is intact under adapter/ or adapter.old/
    shutil.rmtree(old, ignore_errors=True)


def trainable_state(model):
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_training_state(run, state, args):
    save_checkpoint({"script": SCRIPT, "trainable": trainable_state(run["model"]), "optimizer": run["optimizer"].state_dict(),
                     "schedule": run["schedule"].state_dict(), "scaler": run["scaler"].state_dict(),
                     "rng": rng_state(run["pixels"].device), "state": dict(state), "args": vars(args)},
                    run["out_dir"] / "training_state.pt")
    save_adapter(run["model"], run["out_dir"])


# ----------------------------------------------------------------------------------------------------
# Training

def train(args, run, state, data, tokens):
    """Optimizer steps until total_steps: shuffled pairs per epoch (seeded by seed and epoch, so a
    resumed run sees the same batches), gradient accumulation, clipping, periodic validation and saves.
    Under torchrun each process takes its slice of every global micro-batch."""
    schedule = run["schedule"]
    per_step = args.global_batch * args.grad_accum  # pairs per optimizer step, all processes together
    with progress_bar(run["total_steps"], "training", args.no_progress or not run["main_process"]) as bar:
        bar.update(state["step"])
        while state["step"] < run["total_steps"]:
            shuffle = torch.Generator().manual_seed(derived_seed(args.seed, "batches", state["epoch"]))
            order = torch.randperm(len(tokens["pair_image"]), generator=shuffle)
            steps = order[:len(order) // per_step * per_step].split(per_step)
            while state["batch"] < len(steps) and state["step"] < run["total_steps"]:
                t0 = time.perf_counter()
                # LoRA dropout draws depend on (seed, step, process) only: resumable at any process count.
                torch.manual_seed(derived_seed(args.seed, "dropout", state["step"], run["rank"]))
                loss = optimizer_step(args, run, data["train"], tokens, steps[state["batch"]])
                state["batch"] += 1
                state["step"] += 1
                state["train_seconds"] += time.perf_counter() - t0
                state["pairs_seen"] += per_step
                if not math.isfinite(loss):
                    raise NonFiniteLoss(f"the training loss became {loss} at step {state['step']} "
                                        f"(lr {schedule.get_last_lr()[0]:.2e})")
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
                if run["main_process"]:
                    after_step(args, run, state, data, loss)
            if state["batch"] >= len(steps):
                state["epoch"], state["batch"] = state["epoch"] + 1, 0


def optimizer_step(args, run, split, tokens, pairs):
    """One optimizer step over `pairs` (all processes' pairs of this step, grad_accum micro-batches).
    The loss is the mean over every caption token of the step, so neither the split into micro-batches
    nor into processes changes the gradient. Returns that loss."""
    model, device = run["trained"], run["pixels"].device
    total_tokens = int(tokens["mask"][pairs].sum())
    micro_batches = pairs.split(args.global_batch)
    mine = slice(run["rank"] * args.batch_size, (run["rank"] + 1) * args.batch_size)
    model.train()
    loss_sum = torch.zeros((), device=device)
    for i, idx in enumerate(micro_batches):
        idx = idx[mine]
        width = int(tokens["mask"][idx].sum(1).max())
        labels = tokens["labels"][idx, :width].to(device)
        last = i == len(micro_batches) - 1
        with (nullcontext() if last or args.world_size == 1 else model.no_sync()):  # reduce gradients once per step
            with autocast(device, run["amp_dtype"]):
                token_loss, _ = caption_token_loss(model, run["pixels"], split.images[tokens["pair_image"][idx]], labels)
            # DDP averages gradients over processes; scaling by world_size makes that the sum over all tokens.
            run["scaler"].scale(token_loss * args.world_size / total_tokens).backward()
        loss_sum += token_loss.detach()
    optimizer = run["optimizer"]
    if args.grad_clip:
        run["scaler"].unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(run["params"], args.grad_clip)
    run["scaler"].step(optimizer)
    run["scaler"].update()
    optimizer.zero_grad(set_to_none=True)
    run["schedule"].step()
    return all_reduce_sum(loss_sum, args.world_size).item() / total_tokens


def after_step(args, run, state, data, loss):
    step = state["step"]
    row = {"step": step, "epoch": state["epoch"], "train_loss": loss, "lr": run["schedule"].get_last_lr()[0]}
    if step % args.eval_every == 0 or step == run["total_steps"]:
        if len(data["val"].names):
            row["val_loss"] = validation_loss(run["model"], run["pixels"], data["val"], run["val_tokens"], run["amp_dtype"],
                                              args.batch_size)
            samples = generate_captions(run["model"], run["tokenizer"], run["pixels"], data["val"].images[:3], args)
            print(f"step {step}/{run['total_steps']} | train loss {loss:.4f} | val loss {row['val_loss']:.4f} | "
                  f"lr {row['lr']:.2e}", flush=True)
            for name, caption in zip(data["val"].names, samples):
                print(f"    {name}: {caption}")
        append_jsonl(run["out_dir"] / "metrics.jsonl", row)
    if step % args.save_every == 0 or step == run["total_steps"]:
        save_training_state(run, state, args)


# ----------------------------------------------------------------------------------------------------
# Modes: train (default), --caption, --merge

def experiment_args(argv):
    """(args, checkpoint or None): the command line, or on --resume the run's own flags (a flag that
    differs is refused; more --epochs or --max-steps extend the run)."""
    parser = build_parser()
    cli, given = parser.parse_args(argv), given_flags(parser, argv)
    if not cli.resume:
        if cli.data_dir:
            cli.data_dir = str(Path(cli.data_dir).expanduser().resolve())  # so that a resume finds it from anywhere
        return cli, None
    ckpt = load_checkpoint(cli.resume, SCRIPT)
    return resumed_args(ckpt["args"], cli, given, RUNTIME_FLAGS, extendable=("epochs", "max_steps")), ckpt


def main(argv=None):
    with one_line_errors(SCRIPT, memory_hint="--batch-size (and a larger --grad-accum to keep the effective batch)") as report:
        args, ckpt = experiment_args(argv)
        check_args(args)
        if args.caption or args.merge:
            device = pick_device(args.device)
            return caption_files(args, device) if args.caption else merge_adapter(args, device)
        rank, world_size, local_rank = init_distributed(args.device)
        set_global_batch(args, world_size, resuming=ckpt is not None)
        return train_main(args, ckpt, pick_device(args.device, local_rank), rank, report)


def train_main(args, ckpt, device, rank, report):
    out_dir = Path(args.out_dir or ".")
    if rank == 0:  # the other processes write nothing
        out_dir = prepare_out_dir(args.out_dir, report, args.overwrite, resuming=ckpt is not None)
        args.out_dir = str(out_dir)
    torch.manual_seed(args.seed)
    model, tokenizer, processor = load_captioner(args.model or DEFAULT_MODEL, device)
    size, resample = processor_geometry(processor)
    data = load_caption_data(args.data_dir, size, resample, args.seed)
    tokens = pair_tokens(tokenizer, data["train"], args.max_length)
    steps_per_epoch = len(tokens["pair_image"]) // (args.global_batch * args.grad_accum)
    if steps_per_epoch == 0:
        raise DataError(f"--batch-size {args.batch_size} x --grad-accum {args.grad_accum} x {args.world_size} process(es) is more "
             f"than the {len(tokens['pair_image'])} training pairs")
    pixels, amp_dtype = Pixels(processor, device), amp_dtype_for(device)
    baseline, sheet = None, sheet_split(data)
    if not args.no_baseline and not ckpt and rank == 0:
        baseline = evaluate_captions(model, tokenizer, pixels, data["test"], args, "before fine-tuning")
        baseline += (generate_captions(model, tokenizer, pixels, sheet.images, args),)
    model = add_lora(model, args)
    trainable, total = count_params(model)
    print(f"{SCRIPT}: trainable {trainable:,} of {total:,} parameters ({trainable / total:.2%}) | {device} "
          f"{amp_dtype or torch.float32} | {len(data['train'].names)}/{len(data['val'].names)}/{len(data['test'].names)} "
          f"train/val/test images | {len(tokens['pair_image']):,} training pairs | batch {args.global_batch}"
          f"{f' ({args.world_size} processes x {args.batch_size})' if args.world_size > 1 else ''} x {args.grad_accum} "
          f"accumulated | out {out_dir}")
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, int(args.warmup * total_steps), total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = {"step": 0, "epoch": 0, "batch": 0, "train_seconds": 0.0, "pairs_seen": 0, "baseline": None}
    if ckpt:
        state = restore_training(ckpt, args, model, optimizer, schedule, scaler, device)
        print(f"resuming {args.resume} at step {state['step']} of {total_steps}")
    else:
        state["baseline"] = {"scores": baseline[0], "captions": baseline[1], "sheet": baseline[2]} if baseline else None
        if rank == 0:
            write_json(out_dir / "config.json", vars(args))
    # DDP over the peft model: only the adapters require grad, so only their gradients are reduced.
    run = dict(model=model, trained=wrap_distributed(model, device, args.world_size), tokenizer=tokenizer,
               optimizer=optimizer, schedule=schedule, scaler=scaler, pixels=pixels, amp_dtype=amp_dtype,
               total_steps=total_steps, out_dir=out_dir, params=[p for p in model.parameters() if p.requires_grad],
               rank=rank, main_process=rank == 0,
               val_tokens=pair_tokens(tokenizer, data["val"], args.max_length) if data["val"].names else None)
    last = out_dir / "training_state.pt"
    report.resume = last
    report.saved = lambda: (f"the last saved state is {last} (step {load_step(last)}, adapter in {out_dir / 'adapter'})"
                            if last.exists() else f"nothing was saved yet (the first save comes at step {args.save_every})")
    train(args, run, state, data, tokens)
    summary = None
    if rank == 0:
        after = evaluate_captions(model, tokenizer, pixels, data["test"], args, "after fine-tuning")
        summary = write_summary(args, run, state, data, after, (trainable, total))
        if not args.no_plots:
            save_pictures(args, run, state, sheet)
    if args.world_size > 1:
        torch.distributed.destroy_process_group()
    return summary


def restore_training(ckpt, args, model, optimizer, schedule, scaler, device):
    """Adapters, optimizer, schedule, scaler and RNG from a training_state.pt; returns its counters."""
    unexpected = model.load_state_dict(ckpt["trainable"], strict=False).unexpected_keys
    if unexpected or ckpt["trainable"].keys() != trainable_state(model).keys():
        raise DataError(f"--resume {args.resume}: its adapter weights do not match this model and --targets/--rank "
             f"(e.g. {(unexpected or sorted(ckpt['trainable']))[0]})")
    optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["schedule"])
    scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"], device)
    # rows logged after the last save are logged again by the resumed run
    trim_metrics(Path(args.out_dir) / "metrics.jsonl", lambda row: row["step"] <= ckpt["state"]["step"])
    return ckpt["state"]


def write_summary(args, run, state, data, after, counts):
    device, out_dir = run["pixels"].device, run["out_dir"]
    base = state["baseline"] or {"scores": {"bleu4": None, "cider": None}, "captions": [None] * len(after[1])}
    examples = [{"image": n, "references": refs, "before": b, "after": a}
                for n, refs, b, a in zip(data["test"].names[:5], data["test"].captions[:5], base["captions"], after[1])]
    summary = {
        "script": SCRIPT, "dataset": f"captions ({args.data_dir})", "train_images": len(data["train"].names),
        "test_images": len(after[1]), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "epochs": round(state["pairs_seen"] / sum(map(len, data["train"].captions)), 3), "steps": state["step"],
        "world_size": args.world_size, "global_batch": args.global_batch, "test_acc": None,
        "train_seconds": state["train_seconds"],
        "images_per_second": state["pairs_seen"] / max(state["train_seconds"], 1e-9),
        "peak_memory_mb": peak_memory_mb(device), "params": counts[1], "trainable_params": counts[0], "args": vars(args),
        "model": args.model or DEFAULT_MODEL, "bleu4_before": base["scores"]["bleu4"], "cider_before": base["scores"]["cider"],
        "bleu4": after[0]["bleu4"], "cider": after[0]["cider"],
        "adapter_bytes": sum(f.stat().st_size for f in (out_dir / "adapter").rglob("*") if f.is_file()),
        "examples": examples,
    }
    write_json(out_dir / "summary.json", summary)
    for ex in examples:
        print(f"{ex['image']}: before {ex['before']!r} | after {ex['after']!r} | reference {ex['references'][0]!r}")
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    print(f"BLEU-4 {fmt(summary['bleu4_before'])} -> {fmt(summary['bleu4'])} | CIDEr-D {fmt(summary['cider_before'])} -> "
          f"{fmt(summary['cider'])} | {summary['train_seconds']:.1f}s training | {summary['images_per_second']:,.1f} pairs/s "
          f"| adapter {summary['adapter_bytes'] / 2 ** 20:.1f} MiB")
    return summary


def sheet_split(data):
    """The images captions.html shows: the first validation images (test images if there is no validation split)."""
    split = data["val"] if data["val"].names else data["test"]
    n = min(SHEET_IMAGES, len(split.names))
    return CaptionSplit(split.names[:n], split.images[:n], split.captions[:n])


def save_pictures(args, run, state, sheet):
    out_dir = run["out_dir"]
    plot_curves(read_jsonl(out_dir / "metrics.jsonl"), out_dir / "curves.png", x="step",
                panels=(("loss", ("train_loss", "val_loss")), ("learning rate", ("lr",))))
    after = generate_captions(run["model"], run["tokenizer"], run["pixels"], sheet.images, args)
    before = (state["baseline"] or {}).get("sheet") or [None] * len(after)
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
        rows.append(f'<tr><td><img src="{src}" alt="{html.escape(name)}" width="224"><br><code>{html.escape(name)}</code></td>'
                    f'<td><ul>{refs_html}</ul></td><td>{shown(b)}</td><td><strong>{shown(a)}</strong></td></tr>')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Captions before and after LoRA fine-tuning</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:8px;vertical-align:top;max-width:360px}}ul{{margin:0;padding-left:1.2em}}</style>
</head><body><h1>Captions before and after LoRA fine-tuning</h1><p>Base model: <code>{html.escape(model_name)}</code></p>
<table><thead><tr><th>image</th><th>references</th><th>before fine-tuning</th><th>after fine-tuning</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""
    write_text_atomic(path, page)


def load_with_adapter(args, device):
    from peft import PeftConfig, PeftModel
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        raise DataError(f"--adapter {args.adapter}: no adapter_config.json there (expected a run's adapter/ folder)")
    base = args.model or PeftConfig.from_pretrained(args.adapter).base_model_name_or_path or DEFAULT_MODEL
    model, tokenizer, processor = load_captioner(base, device)
    return PeftModel.from_pretrained(model, args.adapter).to(device).eval(), tokenizer, processor


def caption_files(args, device):
    from torchvision.transforms.v2 import functional as TF
    model, tokenizer, processor = load_with_adapter(args, device)
    size, resample = processor_geometry(processor)
    images = []
    for path in args.caption:
        try:
            images.append(TF.resize(torch.from_numpy(np.array(open_rgb(path))).permute(2, 0, 1), list(size),
                                    interpolation=resample, antialias=True))
        except Exception as e:
            raise DataError(f"--caption {path}: cannot read it as an image ({type(e).__name__})")
    captions = generate_captions(model, tokenizer, Pixels(processor, device), torch.stack(images), args)
    for path, caption in zip(args.caption, captions):
        print(f"{path}: {caption}")
    return dict(zip(args.caption, captions))


def merge_adapter(args, device):
    model, tokenizer, processor = load_with_adapter(args, device)
    merged = model.merge_and_unload()
    out = Path(args.out_dir)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"merged {args.adapter} into its base: a standalone model in {out} (load it with --model {out})")
    return out


if __name__ == "__main__":
    main()
