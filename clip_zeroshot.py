# /// script
# requires-python = ">=3.10"
# dependencies = ["torch>=2.5", "torchvision>=0.20", "transformers>=4.46", "ftfy>=6.1", "regex>=2023.10.3", "numpy",
#                 "pillow", "tqdm>=4.66", "matplotlib>=3.7"]
# ///
"""CLIP zero-shot classification of CIFAR-10 from class-name prompts, and a linear probe beyond it.

The study guide's transfer-learning lesson: a model pre-trained on 400M image-text pairs classifies
CIFAR-10 without seeing one labelled CIFAR image. Each class name goes into prompt templates
("a photo of a {}."), the text encoder embeds them, and each image is assigned the class whose
embedding is closest (cosine similarity x logit_scale). --prompts ensemble averages OpenAI's 18
CIFAR-10 templates per class; --linear-probe fits logistic regression on frozen image features of the
training set, the "beyond zero-shot" number.

    python clip_zeroshot.py                                    # openai/clip-vit-base-patch32, 10,000 test images
    python clip_zeroshot.py --model openai/clip-vit-large-patch14 --prompts ensemble
    python clip_zeroshot.py --model /path/to/local/clip --data-dir /tmp/cifar10 --linear-probe
    python clip_zeroshot.py --prompts my_templates.txt         # one template per line, "{}" = class name

Images are preprocessed as batched tensor ops on the device (bicubic resize, center crop, CLIP
mean/std, with the model's own CLIPImageProcessor settings), so 10,000 images go through in large batches
without a PIL round-trip per image. Published figures for the released weights are in the README;
figures measured here are in BENCHMARKS.md. Outputs: --out-dir/config.json, summary.json. Needs common.py.
"""
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (DataError, accuracy_from, confusion_matrix, load_cifar10, make_parser, one_line_errors, peak_memory_mb,
                    per_class_accuracy, plot_confusion, prepare_out_dir, progress_bar, stratified_subset, write_json)

SCRIPT = "clip_zeroshot"
SINGLE_TEMPLATE = ["a photo of a {}."]
# The 18 CIFAR-10 templates OpenAI published with CLIP (prompt engineering notebook / data/prompts.md).
CIFAR10_TEMPLATES = [
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.", "a low contrast photo of a {}.",
    "a high contrast photo of a {}.", "a bad photo of a {}.", "a good photo of a {}.", "a photo of a small {}.",
    "a photo of a big {}.", "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
]


def parse_args(argv=None):
    p = make_parser(__doc__)
    a = p.add_argument
    a("--model", default="openai/clip-vit-base-patch32", help="hub id or local folder (save_pretrained) of a CLIPModel with its tokenizer and image processor")
    a("--data-dir", default="./data", help="ImageFolder tree (train/<class>/*, test/<class>/*) or torchvision's CIFAR-10 folder")
    a("--no-download", action="store_true", help="never try to download CIFAR-10")
    a("--prompts", default="single", help="'single' (a photo of a {}.), 'ensemble' (OpenAI's 18 templates) or a text file of templates")
    a("--limit-test", type=int, default=None, help="classify a class-stratified subset of N test images")
    a("--linear-probe", action="store_true", help="also fit logistic regression on frozen features of the training set")
    a("--limit-train", type=int, default=None, help="linear probe: use a class-stratified subset of N training images")
    a("--batch-size", type=int, default=500, help="images per encoder batch")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto picks cuda, then mps, then cpu")
    a("--seed", type=int, default=0, help="seeds subsets and the probe's held-out split")
    a("--out-dir", default=None, help="where results go (default: a new folder runs/clip_zeroshot/<date-time>)")
    a("--overwrite", action="store_true", help="replace the results of another run in --out-dir")
    a("--no-progress", action="store_true", help="no tqdm bars (they are off anyway when stderr is not a terminal)")
    a("--no-plots", action="store_true", help="no confusion.png")
    return p.parse_args(argv)


def load_templates(spec):
    if spec == "single":
        return SINGLE_TEMPLATE
    if spec == "ensemble":
        return CIFAR10_TEMPLATES
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"--prompts {spec}: not 'single', 'ensemble' or a file of templates")
    templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise DataError(f"--prompts {spec}: each line must hold one template with exactly one '{{}}' for the class name"
             f"{f' (first bad line: {bad[0]!r})' if bad else ''}")
    return templates


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda, but PyTorch sees no CUDA GPU (use --device cpu or auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DataError("--device mps, but this PyTorch has no MPS backend (use --device cpu or auto)")
    return torch.device(name)


def autocast(device):
    """fp16/bf16 autocast on CUDA (the released CLIP weights were trained in fp16); fp32 elsewhere."""
    if device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


# ----------------------------------------------------------------------------------------------------
# Model, tokenizer and image processor through transformers

def load_clip(name, device):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
    try:
        model = CLIPModel.from_pretrained(name).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(name)
        processor = AutoImageProcessor.from_pretrained(name)
    except OSError as e:
        raise DataError(f"cannot load CLIP model {name!r} ({str(e).strip().splitlines()[0]}); offline, pass --model PATH "
             f"to a local copy (a save_pretrained folder), or unset HF_HUB_OFFLINE with internet access")
    return model, tokenizer, processor


def pooled(out):
    """transformers 5 returns an output object (the projection is its pooler_output); 4.x a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


class TensorPreprocess:
    """The model's CLIPImageProcessor as batched tensor ops on the device: resize the shortest edge
    (bicubic, antialiased, on uint8 like the processor), center crop, rescale to [0, 1], normalise with
    CLIP's mean and std."""

    def __init__(self, processor, device):
        size = processor.size
        self.resize = size.get("shortest_edge") or [size["height"], size["width"]]  # an int keeps the aspect ratio
        crop = processor.crop_size if processor.do_center_crop else None
        self.crop = [crop["height"], crop["width"]] if crop else None
        self.mean = torch.tensor(processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, device=device).view(1, 3, 1, 1)

    def __call__(self, x):  # uint8 (B, 3, H, W) -> float (B, 3, crop_h, crop_w)
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF
        x = TF.resize(x, self.resize, interpolation=InterpolationMode.BICUBIC, antialias=True)
        if self.crop:
            x = TF.center_crop(x, self.crop)
        return (x.float() / 255 - self.mean) / self.std


@torch.no_grad()
def text_classifier(model, tokenizer, classes, templates, device):
    """[K, D]: for each class, each template's normalised embedding, averaged, renormalised."""
    weights = []
    for name in classes:
        tokens = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt").to(device)
        with autocast(device):
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
    with progress_bar(-(-len(images) // batch_size), desc, no_progress) as bar:
        for i in range(0, len(images), batch_size):
            pixels = preprocess(images[i:i + batch_size].to(device, non_blocking=True))
            with autocast(device):
                feats.append(F.normalize(pooled(model.get_image_features(pixel_values=pixels)).float(), dim=-1))
            bar.update(1)
    return torch.cat(feats)


def zero_shot_logits(image_features, text_weights, logit_scale):
    """As CLIPModel's logits_per_image: scale x cosine similarity."""
    return logit_scale * image_features @ text_weights.T


# ----------------------------------------------------------------------------------------------------
# Linear probe: multinomial logistic regression on frozen features, full-batch L-BFGS

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
    """Choose the L2 strength on a held-out 20% of the training features, refit on all, test once."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_y), generator=g).to(train_x.device)
    n_val = max(1, len(order) // 5)
    val, fit = order[:n_val], order[n_val:]
    scores = {}
    for wd in grid:
        W, b = fit_logistic(train_x[fit], train_y[fit], num_classes, wd)
        scores[wd] = ((train_x[val] @ W + b).argmax(1) == train_y[val]).float().mean().item()
    best = max(grid, key=lambda wd: (scores[wd], wd))  # ties: the stronger regularisation
    W, b = fit_logistic(train_x, train_y, num_classes, best)
    test_acc = ((test_x @ W + b).argmax(1) == test_y).float().mean().item()
    return {"test_acc": test_acc, "weight_decay": best, "val_acc_by_weight_decay": {str(k): v for k, v in scores.items()}}


# ----------------------------------------------------------------------------------------------------
# The experiment

def most_confused(cm, classes, k=5):
    off = cm.clone().fill_diagonal_(0)
    top = torch.topk(off.flatten(), min(k, off.numel())).indices
    return [{"true": classes[i // len(classes)], "predicted": classes[i % len(classes)], "count": off.flatten()[i].item()}
            for i in top.tolist() if off.flatten()[i] > 0]


def main(argv=None):
    with one_line_errors(SCRIPT) as report:
        args = parse_args(argv)
        if args.batch_size <= 0 or any(v is not None and v <= 0 for v in (args.limit_test, args.limit_train)):
            raise DataError("--batch-size, --limit-test and --limit-train must be positive")
        templates = load_templates(args.prompts)
        device = pick_device(args.device)
        out_dir = prepare_out_dir(args.out_dir, report, args.overwrite)
        data = load_cifar10(args.data_dir, download=not args.no_download)
        test_idx = stratified_subset(data.test_y, args.limit_test, seed=args.seed, name="--limit-test")
        train_idx = stratified_subset(data.train_y, args.limit_train, seed=args.seed, name="--limit-train") \
            if args.linear_probe else None
        model, tokenizer, processor = load_clip(args.model, device)
        write_json(out_dir / "config.json", {**vars(args), "templates": templates, "classes": data.classes})
        print(f"{SCRIPT}: {args.model} | {device} | {len(test_idx):,} test images | {len(templates)} template(s) | out {out_dir}")
        report.saved = lambda: "nothing to resume: zero-shot evaluation keeps no state; run it again"
        return classify(args, out_dir, model, tokenizer, processor, device, data, templates, test_idx, train_idx)


def classify(args, out_dir, model, tokenizer, processor, device, data, templates, test_idx, train_idx):
    """Zero-shot on the test images (timed: preprocessing + encoding), then the optional linear probe."""
    preprocess = TensorPreprocess(processor, device)
    text_weights = text_classifier(model, tokenizer, data.classes, templates, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
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
    return write_summary(args, out_dir, model, device, data, templates, logits, targets, seconds, probe)


def write_summary(args, out_dir, model, device, data, templates, logits, targets, seconds, probe):
    cm = confusion_matrix(logits.argmax(1), targets, len(data.classes))
    top5 = (logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]).any(1).float().mean().item()
    summary = {
        "script": SCRIPT, "dataset": f"CIFAR-10 ({data.source}: {args.data_dir})", "test_images": len(targets),
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "epochs": 0, "steps": 0, "test_acc": accuracy_from(cm), "top5_acc": top5,
        "train_seconds": 0.0, "encode_seconds": seconds, "images_per_second": len(targets) / seconds,
        "peak_memory_mb": peak_memory_mb(device), "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": 0, "args": vars(args), "model": args.model, "templates": templates,
        "classes": data.classes, "logit_scale": model.logit_scale.exp().item(),
        "per_class_acc": dict(zip(data.classes, per_class_accuracy(cm))), "confusion_matrix": cm.tolist(),
        "most_confused": most_confused(cm, data.classes), "linear_probe": probe,
    }
    write_json(out_dir / "summary.json", summary)
    if not args.no_plots:
        plot_confusion(cm, data.classes, out_dir / "confusion.png")
    print(f"zero-shot top-1 {summary['test_acc']:.2%} | top-5 {top5:.2%} | {summary['images_per_second']:,.0f} img/s "
          f"(preprocess + encode) | peak {summary['peak_memory_mb']:,.0f} MB")
    print("per class: " + ", ".join(f"{c} {a:.1%}" for c, a in summary["per_class_acc"].items()))
    print("most confused: " + ", ".join(f"{m['true']}->{m['predicted']} ({m['count']})" for m in summary["most_confused"]))
    if probe:
        print(f"linear probe: test accuracy {probe['test_acc']:.2%} (L2 {probe['weight_decay']:g}, chosen on a held-out 20%)")
    return summary


if __name__ == "__main__":
    main()
