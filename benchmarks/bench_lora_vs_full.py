"""LoRA against full fine-tuning of the ViT-GPT2 captioner: step time, peak memory, saved size.

The full-size architecture (ViTConfig() + GPT2Config(add_cross_attention=True) defaults: 239M
parameters) with random weights, no download. Both variants train on the same random batch of images
and 20-token captions with AdamW, autocast on CUDA, gradient clipping, the way lora_caption.py does:
"lora" adapts the decoder with the guide's defaults (r=16, alpha=32), "full" trains every weight.
Each variant runs in its own process, so on a CPU peak memory is that process's peak resident set; on
CUDA it is the GPU's peak allocation.

    python benchmarks/bench_lora_vs_full.py --device cpu --batch-size 2 --steps 3
    python benchmarks/bench_lora_vs_full.py --device cuda --batch-size 32 --steps 20

Targets (issue): LoRA steps at least 1.5x faster, peak memory at most 60% of full fine-tuning, adapter
under 1/20 of the full checkpoint.
"""
import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(device):
    from transformers import GPT2Config, ViTConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), GPT2Config(add_cross_attention=True))
    config.decoder_start_token_id = config.pad_token_id = 50256
    torch.manual_seed(0)
    return VisionEncoderDecoderModel(config).to(device)


def folder_bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def measure(variant, args, queue):
    import lora_caption
    device = torch.device(args.device)
    model = build(device)
    if variant == "lora":
        model = lora_caption.add_lora(model, argparse.Namespace(rank=16, alpha=32, lora_dropout=0.05,
                                                                 targets=lora_caption.DECODER_TARGETS, cross_attention=False))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    amp_dtype = lora_caption.amp_dtype_for(device)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch_size, 3, 224, 224, generator=g).to(device)
    labels = torch.randint(0, 50257, (args.batch_size, 20), generator=g).to(device)

    def step():
        with lora_caption.autocast(device, amp_dtype):
            loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state, allocator, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # LoRA: the adapter only; full: the whole model (safetensors)
        size = folder_bytes(tmp)
    queue.put({"variant": variant, "step_seconds": seconds, "peak_mb": peak, "saved_bytes": size,
               "trainable": sum(p.numel() for p in params)})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps after one warm-up step")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")  # a fresh process per variant: clean peak-memory readings
    results = {}
    for variant in ("full", "lora"):
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(variant, args, queue))
        proc.start()
        results[variant] = queue.get()
        proc.join()
    full, lora = results["full"], results["lora"]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device {name} | batch {args.batch_size} x 224 px, 20-token captions | {args.steps} timed steps | torch {torch.__version__}")
    for r in (full, lora):
        print(f"{r['variant']:>4}: {r['trainable']:>11,} trainable | {r['step_seconds'] * 1000:8.1f} ms/step | "
              f"peak {r['peak_mb']:8,.0f} MB | saved {r['saved_bytes'] / 2 ** 20:8.1f} MiB")
    print(f"LoRA speed-up {full['step_seconds'] / lora['step_seconds']:.2f}x (target >= 1.5) | peak memory "
          f"{lora['peak_mb'] / full['peak_mb']:.0%} of full (target <= 60%) | adapter "
          f"1/{full['saved_bytes'] / lora['saved_bytes']:.0f} of the full checkpoint (target < 1/20)")
    return results


if __name__ == "__main__":
    main()
