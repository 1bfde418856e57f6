"""LoRA against full fine-tuning of the ViT-GPT2 captioner: ms/step, pairs/s, peak memory, first-step loss,
saved size, with lora_caption.py's speed-ups added one at a time.

The full-size architecture (ViTConfig() + GPT2Config(add_cross_attention=True) defaults: 239M parameters) with
random weights, no download. Every variant starts from the same weights and trains on the same batch of random
images and 20-token captions through lora_caption.py's own step (train_step: AdamW, autocast on CUDA,
clipping at 1.0, the loss computed once and left on the device), eager or replayed as the script replays it:

    full                      every weight trains, eager
    lora                      the guide's adapters (r=16, alpha=32, dropout 0.05); the encoder runs at every step
    lora+cache                + the frozen encoder's output cached (encoded once; its cost is amortised below)
    lora+cache+bf16           + frozen weights stored in bf16 (CUDA)
    lora+cache+bf16+graph     + the whole step captured as a CUDA graph and replayed (CUDA; the script's default)
    lora+host+bf16+graph      the same with the cache in host memory (a caption set too large for the GPU, or
                              --host-cache): each replay's rows staged into the graph's buffer (issue 23, item 5)

Every variant's first step draws the same dropout seed: the first-step losses of lora, +cache and +bf16 are equal
bit for bit (full fine-tuning's differ: the adapters' dropout draws random numbers,
which moves GPT-2's own dropout masks).
A variant may end in @BATCH (another batch size: pairs/s against batch). lora_caption.py's --compile is gone
(issue 22: 42.9 ms/step against the captured step's 9.8 ms), and with it the +compile variants.
On CUDA the variants run one after the other in this process (peak memory reset for each, the capture counted
as setup, not in ms/step); on a CPU each runs in a process of its own, so that its peak resident memory is its
own. The cache's encoding time is amortised over --uses-per-image (captions per image x epochs: 5 is one epoch
of Flickr8k). --deadline skips the variants that would start too late and still prints the table.

    python benchmarks/bench_lora_vs_full.py --device cpu --batch-size 2
    python benchmarks/bench_lora_vs_full.py --device cuda --batch-size 32 --steps 20 --deadline 115

Targets (issue 14; one H100, batch 32): the fastest LoRA step at least 3x faster than eager full fine-tuning
(and 1.5x faster than compiled full fine-tuning, measured before --compile went: BENCHMARKS.md); amortised
encoding at most 10% of that step; LoRA peak memory at most 40% of full; adapter under 1/20 of the checkpoint;
the same first-step loss with and without the cache. On a CPU, LoRA ahead of full fine-tuning.
"""
import argparse
import copy
import functools
import gc
import multiprocessing as mp
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import error_line, folder_bytes  # noqa: E402

CPU_VARIANTS = ["full", "lora", "lora+cache"]
CUDA_VARIANTS = ["full", "lora", "lora+cache", "lora+cache+bf16", "lora+cache+bf16+graph"]
CAPTION_TOKENS = 20
START = 50256  # GPT-2's EOS = BOS = pad = decoder start


def build():
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), GPT2Config(add_cross_attention=True))
    config.decoder_start_token_id = config.pad_token_id = START
    torch.manual_seed(0)
    return VisionEncoderDecoderModel(config)


def parse_variant(name, args):
    """'lora+cache+bf16+graph@64' -> its switches and batch size."""
    rest, _, batch = name.partition("@")
    kind, *extras = rest.split("+")
    unknown = set(extras) - {"cache", "host", "bf16", "graph"}
    cache = "cache" in extras or "host" in extras  # host: the cache in host memory
    if kind not in ("full", "lora") or unknown or (kind == "full" and extras) or ("graph" in extras and not cache):
        raise SystemExit(f"unknown variant {name!r}: full or lora[+cache|+host][+bf16][+graph] (+graph needs a "
                         f"cache), then @BATCH if wanted")
    return {"name": name, "lora": kind == "lora", "cache": cache, "host": "host" in extras, "bf16": "bf16" in extras,
            "graph": "graph" in extras, "batch": int(batch) if batch else args.batch_size}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_of(size, device):
    """Random uint8 images and 20-token captions (every token counted), as lora_caption.pair_tokens lays them out."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size, 3, 224, 224), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, START, (size, CAPTION_TOKENS), generator=g)
    decoder_ids = torch.cat([torch.full((size, 1), START), labels[:, :-1]], 1)
    tokens = {"pair_image": torch.arange(size), "labels": labels, "decoder_ids": decoder_ids,
              "count": torch.full((size,), CAPTION_TOKENS)}
    return images, tokens


def prepare(v, base, device, amp_dtype):
    """The model of a variant, with its inputs (cached or not); also the encoding time.
    On CUDA each variant trains a copy of `base`; on a CPU (a process per variant) `base` itself."""
    import lora_caption as lc
    model = copy.deepcopy(base).to(device) if device.type == "cuda" else base
    if v["lora"]:
        torch.manual_seed(0)  # the same adapters in every LoRA variant
        model = lc.add_lora(model, argparse.Namespace(rank=16, alpha=32, lora_dropout=0.05,
                                                      targets=lc.DECODER_TARGETS, cross_attention=False))
    if v["bf16"]:
        lc.cast_frozen_weights(model)
    images, tokens = batch_of(v["batch"], device)
    pixels = lc.Pixels(SimpleNamespace(image_mean=[0.5] * 3, image_std=[0.5] * 3), device)
    encode_seconds = None
    if v["cache"]:
        for _ in range(2):  # the second pass is timed: a real cache encodes thousands of images, warm
            sync(device)
            t0 = time.perf_counter()
            inputs = lc.EncoderCache(model, pixels, images, amp_dtype, batch_size=v["batch"],  # one pass, as a step's
                                     on_device=False if v["host"] else None)
            sync(device)
        encode_seconds = time.perf_counter() - t0
    else:
        inputs = lc.PixelInputs(pixels, images)
    return model, inputs, tokens, encode_seconds


def measure(v, base, args):
    """One variant: setup (model, cache, capture and warm-up steps), then --steps timed steps."""
    import lora_caption as lc
    device = torch.device(args.device)
    amp_dtype = lc.amp_dtype_for(device)
    before = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)  # anything an earlier variant left (nothing, normally)
    t0 = time.perf_counter()
    model, inputs, tokens, encode_seconds = prepare(v, base, device, amp_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_sum, device_tokens = torch.zeros((), device=device), lc.on_device(tokens, device)
    # train_step bound as lora_caption.make_step binds it
    staged = lc.StagedRows(inputs, tokens["pair_image"], v["batch"]) if v["host"] and v["graph"] else None
    train_step = functools.partial(lc.train_step, model, optimizer, scaler, params, amp_dtype, 1.0, 1,
                                   staged or inputs, device_tokens, loss_sum)
    step_args = argparse.Namespace(global_batch=v["batch"], batch_size=v["batch"], world_size=1, grad_clip=1.0)
    pairs = torch.arange(v["batch"])
    pairs_on_device = pairs.to(device)
    warmup = 2
    with lc.adapter_inputs_as_given(model, amp_dtype, lora_dropout=0.05):  # the guide's dropout: casts stay
        if v["graph"]:  # captured as the script captures it (no fallback here: a failure is the variant's row)
            step = lc.CapturedStep(train_step, optimizer, params, loss_sum, device_tokens, v["batch"], staged)
        else:
            step = lc.eager(train_step, tokens, step_args, rank=0)
        for i in range(warmup + args.steps):
            if i == 1:
                first_loss = loss_sum.item() / int(tokens["count"].sum())  # the same weights and data everywhere
            if i == warmup:
                sync(device)
                setup, t0 = time.perf_counter() - t0, time.perf_counter()
            torch.manual_seed(i)  # dropout draws follow the step, as in lora_caption.main
            step(pairs, pairs_on_device)
        sync(device)
    seconds = (time.perf_counter() - t0) / args.steps
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    saved = None
    if v["name"] in ("full", "lora"):  # LoRA: the adapter alone; full: the whole model (safetensors)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            saved = folder_bytes(tmp)
    return {**v, "step_seconds": seconds, "peak_mb": peak, "saved_bytes": saved, "first_loss": first_loss,
            "trainable": sum(p.numel() for p in params), "setup_seconds": setup, "encode_seconds": encode_seconds}


def measure_in_child(v, args, queue):
    import lora_caption
    lora_caption.quiet_transformers()
    queue.put(measure(v, build(), args))


def run_isolated(variants, args):
    """On a CPU: a process per variant, so that peak resident memory is only ever the variant's own."""
    ctx, results = mp.get_context("spawn"), []
    for v in variants:
        queue = ctx.Queue()
        proc = ctx.Process(target=measure_in_child, args=(v, args, queue))
        proc.start()
        results.append(queue.get())
        proc.join()
    return results


class Stopped(BaseException):
    """SIGTERM, e.g. from `timeout`: stop measuring and print the table of what was measured."""


def stop(signum, frame):
    raise Stopped


def run_in_process(variants, args):
    """On CUDA: one variant after the other on copies of one model (None where --deadline or SIGTERM skipped a
    variant, a row with 'error' where one failed: the others still count)."""
    import lora_caption
    lora_caption.quiet_transformers()
    started, results = time.perf_counter(), []
    signal.signal(signal.SIGTERM, stop)
    try:
        base = build()
        for v in variants:
            estimate = 8  # seconds, the capture included (one H100)
            if args.deadline and time.perf_counter() - started + estimate > args.deadline:
                results.append(None)
                continue
            try:
                results.append(measure(v, base, args))
            except Exception as e:  # one broken variant must not cost the others' figures
                results.append({**v, "error": error_line(e, 80)})
            r = results[-1]
            done = r.get("error") or f"{r['step_seconds'] * 1000:,.1f} ms/step, setup {r['setup_seconds']:.1f}s"
            print(f"{v['name']}: {done} ({time.perf_counter() - started:.0f}s in)", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    except Stopped:
        print(f"stopped by SIGTERM after {time.perf_counter() - started:.0f}s", flush=True)
    return results + [None] * (len(variants) - len(results))


def measured(results):
    return [r for r in results if r and "error" not in r]


def table(results, args):
    """The Markdown table, each step compared with the full variants at the reference batch."""
    ref = {r["name"]: r for r in measured(results)}
    full = ref.get("full")
    lines = ["| variant | batch | trainable | ms/step | pairs/s | peak MB | first-step loss | encoding ms "
             "(amortised, % of step) | setup s | vs full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v, r in zip(args.variant_specs, results):
        if r is None or "error" in r:
            why = f"failed: {r['error']}" if r else "skipped (--deadline or SIGTERM)"
            lines.append(f"| {v['name']} | {v['batch']} | {why} | | | | | | | |")
            continue
        ms = r["step_seconds"] * 1000
        encoding = "-" if r["encode_seconds"] is None else \
            f"{r['encode_seconds'] * 1000:,.1f} ({amortised_ms(r, args):.2f}, {amortised_ms(r, args) / ms:.1%})"
        versus = f"{full['step_seconds'] / r['step_seconds']:.2f}x" if full and r["batch"] == full["batch"] else "-"
        lines.append(f"| {r['name']} | {r['batch']} | {r['trainable']:,} | {ms:,.1f} | "
                     f"{r['batch'] / r['step_seconds']:,.1f} | {r['peak_mb']:,.0f} | {r['first_loss']:.6f} | "
                     f"{encoding} | {r['setup_seconds']:.1f} | {versus} |")
    return "\n".join(lines)


def amortised_ms(r, args):
    return r["encode_seconds"] * 1000 / args.uses_per_image


def verdict(results, args):
    """The issue's targets, from the reference-batch rows."""
    ref = {r["name"]: r for r in measured(results) if r["batch"] == args.batch_size}
    full, out = ref.get("full"), []
    lora = [r for r in ref.values() if r["lora"]]
    if full and lora:
        best = min(lora, key=lambda r: r["step_seconds"])
        line = f"fastest LoRA: {best['name']} {best['step_seconds'] * 1000:,.1f} ms/step, " \
               f"{full['step_seconds'] / best['step_seconds']:.2f}x full (target >= 3 on a GPU; LoRA ahead on a CPU)"
        out.append(line)
        if best["encode_seconds"] is not None:
            out.append(f"amortised encoding {amortised_ms(best, args):.2f} ms = "
                       f"{amortised_ms(best, args) / (best['step_seconds'] * 1000):.1%} of that step (target <= 10%)")
        out.append(f"peak memory {best['peak_mb']:,.0f} MB = {best['peak_mb'] / full['peak_mb']:.0%} of full "
                   f"({full['peak_mb']:,.0f} MB; target <= 40%)")
    if full and ref.get("lora") and full["saved_bytes"] and ref["lora"]["saved_bytes"]:
        out.append(f"adapter {ref['lora']['saved_bytes'] / 2 ** 20:.1f} MiB = 1/"
                   f"{full['saved_bytes'] / ref['lora']['saved_bytes']:.0f} of the full checkpoint "
                   f"({full['saved_bytes'] / 2 ** 20:.1f} MiB; target < 1/20)")
    on_gpu, host = ref.get("lora+cache+bf16+graph"), ref.get("lora+host+bf16+graph")
    if on_gpu and host:
        out.append(f"cache in host memory: {host['step_seconds'] * 1000:,.1f} ms/step = "
                   f"{host['step_seconds'] / on_gpu['step_seconds']:.2f}x the on-device cache's "
                   f"{on_gpu['step_seconds'] * 1000:,.1f} ms (target <= 1.3x)")
    if ref.get("lora") and ref.get("lora+cache"):
        a, b = ref["lora"]["first_loss"], ref["lora+cache"]["first_loss"]
        same = "identical" if a == b else "DIFFERENT"
        out.append(f"first-step loss without / with the cache: {a!r} / {b!r} ({same})")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step (variants may name their own: @BATCH)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps after the warm-up (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--variants", nargs="+", default=None, help="default: all that apply to the device (see above)")
    p.add_argument("--uses-per-image", type=float, default=5, help="training pairs per image (captions x epochs)")
    p.add_argument("--deadline", type=float, default=None, help="seconds: skip variants that would start too late")
    args = p.parse_args(argv)
    args.steps = args.steps or (20 if args.device == "cuda" else 3)
    names = args.variants or (CUDA_VARIANTS if args.device == "cuda" else CPU_VARIANTS)
    args.variant_specs = [parse_variant(n, args) for n in names]
    if args.device == "cpu" and any(v["bf16"] or v["graph"] for v in args.variant_specs):
        raise SystemExit("+bf16 and +graph are CUDA paths of lora_caption.py; on a CPU run full, lora, lora+cache")
    results = (run_isolated if args.device == "cpu" else run_in_process)(args.variant_specs, args)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device {name} | {args.steps} timed steps | 224 px, {CAPTION_TOKENS}-token captions | torch "
          f"{torch.__version__}")
    print(table(results, args))
    print(verdict(results, args))
    return results


if __name__ == "__main__":
    main()
