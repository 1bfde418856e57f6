"""The CUDA-graph training steps (vit_scratch, cnn_baseline, clip_zeroshot, lora_caption) train what the eager steps
train.
Needs a CUDA GPU with bf16: CI (CPU only) skips these; benchmarks/gpu_checks.sh runs them first on a lent GPU."""
import argparse
import copy
import functools

import pytest
import torch

import clip_zeroshot
import cnn_baseline
import common
import lora_caption
import vit_scratch
from conftest import TINY_CAPTIONS, build_tiny_captioner

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
                                reason="needs a CUDA GPU with bf16")
CUDA = torch.device("cuda")


def batches(n=6, size=32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 32, 32, generator=g).to(CUDA), torch.randint(0, 10, (size,), generator=g).to(CUDA))
            for _ in range(n)]


def vit_run(capture, data, ema_decay=0.0):
    """Weights (and their --ema average) and statistics after training on `data`, with the step eager or replayed
    from a graph."""
    torch.manual_seed(0)
    model = vit_scratch.VisionTransformer(embed_dim=64, hidden_dim=128, num_heads=4, num_layers=2, dropout=0.0,
                                          init_std=0.02).to(CUDA)
    args = argparse.Namespace(optimizer="muon", lr=1e-3, muon_lr=0.01, muon_momentum=0.95, weight_decay=0.05,
                              label_smoothing=0.1, grad_clip=1.0, schedule="step", warmup=0.2, epochs=1,
                              lr_shape="cosine", ema=ema_decay)
    optimizers = vit_scratch.make_optimizers(model, args, CUDA, capture)
    stats, scaler = torch.zeros(2, device=CUDA), torch.amp.GradScaler("cuda", enabled=False)
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
    step = vit_scratch.make_step(model, optimizers, scaler, torch.bfloat16, args, stats, data, capture, [], ema)
    assert isinstance(step, vit_scratch.CapturedStep) == capture
    for i, (x, y) in enumerate(data):
        common.set_learning_rates(optimizers, vit_scratch.schedule_factor(args, i, len(data), len(data)))
        step(x, y)
    torch.cuda.synchronize()
    weights = {k: v.float().cpu() for k, v in model.state_dict().items()}
    if ema is not None:  # the average is trained by the step too (and undone after the warm-up)
        weights.update({f"ema.{k}": v.float().cpu() for k, v in ema.state_dict().items()})
    return weights, stats.cpu()


@pytest.mark.parametrize("ema_decay", [0.0, 0.9], ids=["plain", "--ema 0.9"])
def test_vit_graph_replays_train_what_the_eager_steps_train(ema_decay):
    data = batches()
    (eager_weights, eager_stats), (graph_weights, graph_stats) = (vit_run(False, data, ema_decay),
                                                                  vit_run(True, data, ema_decay))
    assert any(k.startswith("ema.") for k in eager_weights) == bool(ema_decay)
    for name, value in eager_weights.items():
        torch.testing.assert_close(graph_weights[name], value, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(graph_stats, eager_stats, atol=1e-3, rtol=1e-5)  # the warm-up left no trace


def cnn_run(capture, data):
    torch.manual_seed(0)
    layout = torch.channels_last
    model = cnn_baseline.ResidualCNN(widths=(16, 32, 64)).to(CUDA, memory_format=layout)
    args = argparse.Namespace(lr=3e-3, weight_decay=0.05, label_smoothing=0.1, grad_clip=1.0)
    optimizer = cnn_baseline.make_optimizer(model, args, CUDA, capture)
    stats, scaler = torch.zeros(2, device=CUDA), torch.amp.GradScaler("cuda", enabled=False)
    step = cnn_baseline.make_step(model, optimizer, scaler, torch.bfloat16, args, stats, data, layout, capture)
    assert isinstance(step, cnn_baseline.CapturedStep) == capture
    for i, (x, y) in enumerate(data):
        common.set_learning_rates([optimizer], cnn_baseline.lr_factor(i, 1, len(data)))
        step(x.contiguous(memory_format=layout), y)
    torch.cuda.synchronize()
    return {k: v.float().cpu() for k, v in model.state_dict().items()}, stats.cpu()


def test_cnn_graph_replays_train_what_the_eager_steps_train_batchnorm_statistics_included():
    data = batches()
    (eager_weights, eager_stats), (graph_weights, graph_stats) = cnn_run(False, data), cnn_run(True, data)
    for name, value in eager_weights.items():  # running_mean/var and num_batches_tracked too
        torch.testing.assert_close(graph_weights[name], value, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(graph_stats, eager_stats, atol=1e-3, rtol=1e-5)


def clip_run(capture, data, tiny_clip, mode):
    """CLIP's fine-tuning classifier after training on uint8 `data`, the step eager or replayed from a graph."""
    model, tokenizer, processor = clip_zeroshot.load_clip(str(tiny_clip), CUDA)
    classifier = clip_zeroshot.zero_shot_classifier(model, tokenizer, [f"class {i}" for i in range(10)],
                                                    ["a photo of a {}."], CUDA)
    torch.manual_seed(0)
    if mode == "lora":
        classifier = clip_zeroshot.add_lora(classifier, argparse.Namespace(rank=4, alpha=8, lora_dropout=0.0,
                                                                           targets=clip_zeroshot.LORA_TARGETS))
    args = argparse.Namespace(lr=1e-3, weight_decay=0.01, grad_clip=1.0)
    optimizer = clip_zeroshot.make_optimizer(classifier, args, CUDA, capture)
    stats, scaler = torch.zeros(2, device=CUDA), torch.amp.GradScaler("cuda", enabled=False)
    preprocess = clip_zeroshot.TensorPreprocess(processor, CUDA)
    step = clip_zeroshot.make_step(classifier, optimizer, scaler, preprocess, torch.bfloat16, args, stats, data[0],
                                   capture)
    assert isinstance(step, clip_zeroshot.CapturedStep) == capture
    for i, (x, y) in enumerate(data):
        common.set_learning_rates([optimizer], clip_zeroshot.lr_factor(i, 1, len(data)))
        step(x, y)
    torch.cuda.synchronize()
    return {k: v.float().cpu() for k, v in classifier.state_dict().items()}, stats.cpu()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_clip_graph_replays_train_what_the_eager_steps_train(mode, tiny_clip):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8).to(CUDA),
             torch.randint(0, 10, (16,), generator=g).to(CUDA)) for _ in range(5)]
    (eager_weights, eager_stats), (graph_weights, graph_stats) = (clip_run(c, data, tiny_clip, mode)
                                                                  for c in (False, True))
    for name, value in eager_weights.items():
        torch.testing.assert_close(graph_weights[name], value, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(graph_stats, eager_stats, atol=1e-3, rtol=1e-5)  # the warm-up left no trace


def test_a_failing_capture_falls_back_to_the_eager_step_with_one_line(capsys, monkeypatch):
    data = batches(2)
    monkeypatch.setattr(vit_scratch.torch.cuda, "graph", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    model = vit_scratch.VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=1).to(CUDA)
    args = argparse.Namespace(optimizer="adamw", lr=1e-3, muon_lr=None, weight_decay=0.0, label_smoothing=0.0,
                              grad_clip=1.0)
    optimizers = vit_scratch.make_optimizers(model, args, CUDA, capture=True)
    stats = torch.zeros(2, device=CUDA)
    step = vit_scratch.make_step(model, optimizers, torch.amp.GradScaler("cuda", enabled=False), torch.bfloat16, args,
                                 stats, data, True, [])
    assert not isinstance(step, vit_scratch.CapturedStep)
    assert capsys.readouterr().out.count("CUDA graph capture failed (RuntimeError: boom); training eagerly") == 1
    step(*data[0])
    assert torch.isfinite(stats).all() and stats[0] > 0


def lora_run(folder, capture, lr=1e-2, lora_dropout=0.0, finetune="lora", host=False):
    """The tiny captioner's LoRA run (or --finetune full --freeze-encoder) as lora_caption.main sets it up on a GPU
    (bf16 frozen weights, the encoder cache on the device, fused AdamW), the step captured or eager; its pairs."""
    model, tokenizer, processor = lora_caption.load_captioner(str(folder), CUDA)
    torch.manual_seed(0)
    model = lora_caption.make_trainable(model, argparse.Namespace(rank=4, alpha=8, lora_dropout=lora_dropout,
                                                                  targets=lora_caption.DECODER_TARGETS,
                                                                  cross_attention=False, finetune=finetune,
                                                                  freeze_encoder=True), [])
    lora_caption.cast_frozen_weights(model)
    size, resample = lora_caption.processor_geometry(processor)
    split = lora_caption.load_caption_data(TINY_CAPTIONS, size, resample, seed=0, log=lambda *_: None)["train"]
    tokens = lora_caption.pair_tokens(tokenizer, split, 40)
    cache = lora_caption.EncoderCache(model, lora_caption.Pixels(processor, CUDA), split.images, torch.bfloat16,
                                      on_device=False if host else None)  # host: the graph reads StagedRows
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, fused=True)
    run = dict(model=model, optimizer=optimizer, params=params, loss_sum=torch.zeros((), device=CUDA),
               schedule=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.1 * s),
               device_tokens=lora_caption.on_device(tokens, CUDA))
    args = argparse.Namespace(world_size=1, grad_accum=1, eager=not capture, batch_size=8, global_batch=8,
                              grad_clip=1.0)
    # train_step bound as make_step binds it; run["step"] is what main() calls per step (a replay, or eager)
    run["train_step"] = functools.partial(lora_caption.train_step, model, optimizer,
                                          torch.amp.GradScaler("cuda", enabled=False), params, torch.bfloat16,
                                          args.grad_clip, 1, cache, run["device_tokens"], run["loss_sum"])
    run["step"] = lora_caption.make_step(args, model, optimizer, torch.amp.GradScaler("cuda", enabled=False), params,
                                         torch.bfloat16, cache, tokens, run["device_tokens"], run["loss_sum"], 0)
    assert isinstance(run["step"], lora_caption.CapturedStep) == capture
    return run, cache, tokens, args


def lora_losses(run, cache, tokens, args, batches, seeds):
    losses = []
    for pairs, seed in zip(batches, seeds):
        # from zero at each step: a difference of a growing fp32 sum would round each step's loss differently
        run["loss_sum"].zero_()  # in place: the graph adds to this very tensor
        torch.manual_seed(seed)  # as main() seeds dropout before each step
        run["step"](pairs, pairs.to(CUDA))
        run["schedule"].step()
        losses.append(run["loss_sum"].item())
    return losses


@pytest.mark.parametrize("dropout, finetune, host", [(0.0, "lora", False), (0.1, "lora", False),
                                                     (0.1, "full", False), (0.1, "lora", True)],
                         ids=["no dropout", "dropout", "full fine-tuning, frozen encoder", "cache in host memory"])
def test_lora_graph_replays_train_what_the_eager_steps_train(tmp_path, dropout, finetune, host):
    # with dropout: GPT-2's (attention included) and the adapters', drawn from each step's seed in both
    folder = build_tiny_captioner(tmp_path, dropout=dropout)
    results = []
    for capture in (False, True):
        run, cache, tokens, args = lora_run(folder, capture, lora_dropout=dropout / 2, finetune=finetune, host=host)
        pairs = len(tokens["count"])  # 100: 20 training images x 5 captions
        order = torch.randperm(pairs, generator=torch.Generator().manual_seed(0))[:48].view(6, 8)
        losses = lora_losses(run, cache, tokens, args, order, range(6))
        torch.cuda.synchronize()
        adapters = {n: p.detach().float().cpu() for n, p in run["model"].named_parameters() if p.requires_grad}
        results.append((losses, adapters))
    (eager_losses, eager), (graph_losses, graph) = results
    # the same kernels (no_mask_checks); rounding: AdamW reads the rate as fp32 from the device, and the loss
    # is divided by a device count where the eager step multiplies by a host reciprocal
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-3, atol=1e-4)
    for name, value in eager.items():
        torch.testing.assert_close(graph[name], value, atol=1e-4, rtol=1e-2, msg=name)


def test_lora_graph_draws_the_dropout_of_each_steps_seed(tmp_path):
    folder = build_tiny_captioner(tmp_path, dropout=0.1)
    run, cache, tokens, args = lora_run(folder, True, lr=0.0, lora_dropout=0.5)  # lr 0: the weights stay
    same = torch.arange(8)
    losses = lora_losses(run, cache, tokens, args, [same] * 3, [1, 2, 1])
    assert losses[0] == losses[2] != losses[1]


def test_a_failing_lora_capture_falls_back_to_the_eager_step_with_one_line(tmp_path, capsys, monkeypatch):
    folder = build_tiny_captioner(tmp_path)
    expected = lora_losses(*lora_run(folder, False), [torch.arange(8)] * 2, [0, 1])
    monkeypatch.setattr(lora_caption.torch.cuda, "graph", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    run, cache, tokens, args = lora_run(folder, False)
    assert lora_caption.capture_step(run["train_step"], run["optimizer"], run["params"], run["loss_sum"],
                                     run["device_tokens"], args.batch_size) is None
    run["step"] = lora_caption.eager(run["train_step"], tokens, args, 0)
    assert capsys.readouterr().out.count("CUDA graph capture failed (RuntimeError: boom); training eagerly") == 1
    assert not any(g["capturable"] for g in run["optimizer"].param_groups)
    losses = lora_losses(run, cache, tokens, args, [torch.arange(8)] * 2, [0, 1])
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)  # the warm-up steps were undone
