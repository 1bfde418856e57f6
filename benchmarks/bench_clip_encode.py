"""Preprocessing + image-encoding throughput of clip_zeroshot.py against the plain per-image processor loop.

plain: the usual loop, CLIPImageProcessor called on one PIL image at a time, the pixel tensors
       batched and sent to the model.
ours:  clip_zeroshot.TensorPreprocess on whole uint8 batches on the device, then the same model.

Random weights (no download): --arch tiny is the test suite's tiny CLIP (48 px input); --arch base is
CLIPConfig() defaults, the ViT-B/32 architecture at 224 px.

    python benchmarks/bench_clip_encode.py --arch tiny --device cpu --images 2000
    python benchmarks/bench_clip_encode.py --arch base --device cuda --images 10000 --batch-size 500
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import clip_zeroshot  # noqa: E402
from common import load_cifar10  # noqa: E402


def build(arch, device):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    if arch == "base":
        config, processor = CLIPConfig(), CLIPImageProcessor()  # ViT-B/32 text + vision towers, 224 px
    else:
        config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4),
                            vision_config=dict(image_size=48, patch_size=16, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4), projection_dim=16)
        processor = CLIPImageProcessor(size={"shortest_edge": 52}, crop_size={"height": 48, "width": 48})
    torch.manual_seed(0)
    return CLIPModel(config).to(device).eval(), processor


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def plain(model, processor, images, batch_size, device):
    pil = [Image.fromarray(x) for x in images.permute(0, 2, 3, 1).numpy()]  # as a PIL dataset would hold them
    sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(pil), batch_size):
        pixels = torch.cat([processor(images=im, return_tensors="pt")["pixel_values"] for im in pil[i:i + batch_size]])
        with clip_zeroshot.autocast(device, clip_zeroshot.amp_dtype_for(device)):
            clip_zeroshot.pooled(model.get_image_features(pixel_values=pixels.to(device)))
    sync(device)
    return len(pil) / (time.perf_counter() - t0)


def ours(model, processor, images, batch_size, device):
    preprocess = clip_zeroshot.TensorPreprocess(processor, device)
    sync(device)
    t0 = time.perf_counter()
    clip_zeroshot.encode_images(model, preprocess, images, batch_size, device, no_progress=True)
    sync(device)
    return len(images) / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["tiny", "base"], default="tiny")
    p.add_argument("--data-dir", default=str(ROOT / "tests" / "data" / "cifar10-tiny"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=2000, help="images per variant (the set is repeated if smaller)")
    p.add_argument("--batch-size", type=int, default=250)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    data = load_cifar10(args.data_dir, download=False)
    images = data.test_x.repeat(-(-args.images // len(data.test_x)), 1, 1, 1)[:args.images]
    model, processor = build(args.arch, device)
    ours(model, processor, images[:args.batch_size], args.batch_size, device)  # warm-up: allocator, kernels
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device {name} | arch {args.arch} | {args.images} images | batch {args.batch_size} | "
          f"{type(processor).__name__} | torch {torch.__version__}")
    a = plain(model, processor, images, args.batch_size, device)
    print(f"plain (per-image processor): {a:10,.0f} img/s")
    b = ours(model, processor, images, args.batch_size, device)
    print(f"ours  (batched on device):   {b:10,.0f} img/s")
    print(f"ratio ours/plain: {b / a:.1f}x")
    return {"plain": a, "ours": b, "ratio": b / a}


if __name__ == "__main__":
    main()
