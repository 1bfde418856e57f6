"""Full against LoRA fine-tuning of CLIP's image tower, as clip_zeroshot.py --finetune trains it: images/s,
peak memory, trainable parameters, size of the saved weights.

Random weights, no download: --arch base is CLIPVisionConfig() defaults with a 512-wide projection, the
ViT-B/32 image tower at 224 px (88M parameters), under the script's 10-class head; --arch tiny is the
test suite's tiny tower (48 px). Both variants train with the script's own pieces (ImageClassifier,
add_lora with rank 16, alpha 32 on q/k/v/out_proj, make_optimizer, TensorLoader(raw=True), make_step: crop
and flip at 32 px, resize to the tower's resolution on the device, bf16 autocast on CUDA, AdamW,
clipping; on one bf16 GPU the step captured as a CUDA graph, as the script runs it, --eager for the
eager step) on random uint8 32 px images. Each variant runs in its own process, so peak memory is its
own: the GPU's peak allocation on CUDA, the process's peak resident set on a CPU.

    python benchmarks/bench_clip_finetune.py --arch tiny --device cpu --batch-size 32 --steps 20
    python benchmarks/bench_clip_finetune.py --arch base --device cpu --batch-size 8 --steps 3
    python benchmarks/bench_clip_finetune.py --arch base --device cuda          # batch 128, 20 timed steps
"""
import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(arch, device):
    """(ImageClassifier with random weights, TensorPreprocess) of the chosen size."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    import clip_zeroshot
    if arch == "base":
        config, processor, projection_dim = CLIPVisionConfig(), CLIPImageProcessor(), 512
    else:
        config = CLIPVisionConfig(image_size=48, patch_size=16, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4)
        processor = CLIPImageProcessor(size={"shortest_edge": 52}, crop_size={"height": 48, "width": 48})
        projection_dim = 16
    torch.manual_seed(0)
    tower = CLIPVisionModel(config)  # called with pixel_values, it returns the pooled output, as CLIPModel's tower
    projection = torch.nn.Linear(config.hidden_size, projection_dim, bias=False)
    head = 100 * torch.nn.functional.normalize(torch.randn(10, projection_dim), dim=-1)  # as logit_scale x text
    model = clip_zeroshot.ImageClassifier(tower, projection, head).to(device)
    return model, clip_zeroshot.TensorPreprocess(processor, device)


def measure(mode, args, queue):
    import clip_zeroshot
    import common
    device = torch.device(args.device)
    model, preprocess = build(args.arch, device)
    if mode == "lora":
        model = clip_zeroshot.add_lora(model, argparse.Namespace(rank=16, alpha=32, lora_dropout=0.05,
                                                                 targets=clip_zeroshot.LORA_TARGETS))
    trainable, total = clip_zeroshot.count_params(model)
    saved = common.trainable_state(model) if mode == "lora" else model.state_dict()  # what last.pt holds
    amp_dtype = clip_zeroshot.amp_dtype_for(device)
    capture = device.type == "cuda" and amp_dtype == torch.bfloat16 and not args.eager  # as the script decides
    optimizer = clip_zeroshot.make_optimizer(model, argparse.Namespace(lr=1e-5, weight_decay=0.1), device, capture)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    g = torch.Generator().manual_seed(0)
    n = args.batch_size * (args.steps + args.warmup_steps)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 10, (n,), generator=g).to(device)
    loader = common.TensorLoader(images, labels, args.batch_size, device, train=True, seed=0, raw=True)  # as finetune
    loader.set_epoch(1)
    batches = list(loader)
    stats = torch.zeros(2, device=device)
    model.train()
    step = clip_zeroshot.make_step(model, optimizer, scaler, preprocess, amp_dtype, argparse.Namespace(grad_clip=1.0),
                                   stats, batches[0], capture)  # the script's step: a graph replay, or eager
    for x, y in batches[:args.warmup_steps]:  # allocator, kernels, optimizer state
        step(x, y)
    clip_zeroshot.sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for x, y in batches[args.warmup_steps:]:
        step(x, y)
    clip_zeroshot.sync(device)
    seconds = time.perf_counter() - t0
    queue.put({"mode": mode + (" (captured)" if isinstance(step, clip_zeroshot.CapturedStep) else ""),
               "trainable": trainable, "total": total, "images_per_second": n_timed(args) / seconds,
               "step_ms": 1000 * seconds / args.steps, "peak_mb": peak_mb(device),
               "saved_mib": sum(t.numel() * t.element_size() for t in saved.values()) / 2 ** 20,
               "finite": bool(torch.isfinite(stats).all())})


def n_timed(args):
    return args.batch_size * args.steps


def peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def wait_for_result(proc, queue, mode):
    """The variant's result; if its process died (its traceback is on stderr above), stop instead of waiting."""
    import queue as queues
    while True:
        try:
            return queue.get(timeout=1)
        except queues.Empty:
            if not proc.is_alive():
                raise SystemExit(f"the {mode} variant failed (exit code {proc.exitcode})") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["tiny", "base"], default="base")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (clip_zeroshot.py's default)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before them")
    p.add_argument("--eager", action="store_true", help="CUDA: time the eager step, not the captured CUDA graph")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")  # a fresh process per variant: clean peak-memory readings
    results = {}
    for mode in ("full", "lora"):
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(mode, args, queue))
        proc.start()
        results[mode] = wait_for_result(proc, queue, mode)
        proc.join()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device {name} | arch {args.arch} | batch {args.batch_size} | {args.steps} timed steps after "
          f"{args.warmup_steps} | torch {torch.__version__}")
    print("| mode | trainable params | total params | img/s | ms/step | peak MB | saved weights MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results.values():
        print(f"| {r['mode']} | {r['trainable']:,} ({r['trainable'] / r['total']:.2%}) | {r['total']:,} | "
              f"{r['images_per_second']:,.0f} | {r['step_ms']:,.1f} | {r['peak_mb']:,.0f} | {r['saved_mib']:,.2f} |")
    full, lora = results["full"], results["lora"]
    print(f"LoRA: {lora['images_per_second'] / full['images_per_second']:.2f}x the images/s of full fine-tuning, "
          f"{lora['peak_mb'] / full['peak_mb']:.0%} of its peak memory, "
          f"1/{full['saved_mib'] / lora['saved_mib']:,.0f} of its saved weights")
    return results


if __name__ == "__main__":
    main()
