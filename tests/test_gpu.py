"""The CUDA-graph training step trains exactly what the eager step trains. Needs a CUDA GPU with bf16: CI
(CPU only) skips these; benchmarks/gpu_checks.sh runs them first on a lent GPU."""
import argparse

import pytest
import torch

import cnn_baseline
import vit_scratch

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
                                reason="needs a CUDA GPU with bf16")
CUDA = torch.device("cuda")


def batches(n=6, size=32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 32, 32, generator=g).to(CUDA), torch.randint(0, 10, (size,), generator=g).to(CUDA))
            for _ in range(n)]


def vit_run(capture, data):
    """Weights and statistics after training on `data`, with the step eager or replayed from a graph."""
    torch.manual_seed(0)
    model = vit_scratch.VisionTransformer(embed_dim=64, hidden_dim=128, num_heads=4, num_layers=2, dropout=0.0,
                                          init_std=0.02).to(CUDA)
    args = argparse.Namespace(optimizer="muon", lr=1e-3, muon_lr=0.01, weight_decay=0.05, label_smoothing=0.1,
                              grad_clip=1.0, schedule="step", warmup=0.2, epochs=1)
    optimizers = vit_scratch.make_optimizers(model, args, CUDA, capture)
    stats, scaler = torch.zeros(2, device=CUDA), torch.amp.GradScaler("cuda", enabled=False)
    step = vit_scratch.make_step(model, optimizers, scaler, torch.bfloat16, args, stats, data, capture, [])
    assert isinstance(step, vit_scratch.CapturedStep) == capture
    for i, (x, y) in enumerate(data):
        vit_scratch.set_learning_rates(optimizers, vit_scratch.schedule_factor(args, i, len(data), len(data)))
        step(x, y)
    torch.cuda.synchronize()
    return {k: v.float().cpu() for k, v in model.state_dict().items()}, stats.cpu()


def test_vit_graph_replays_train_what_the_eager_steps_train():
    data = batches()
    (eager_weights, eager_stats), (graph_weights, graph_stats) = vit_run(False, data), vit_run(True, data)
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
        cnn_baseline.set_learning_rate(optimizer, cnn_baseline.lr_factor(i, 1, len(data)))
        step(x.contiguous(memory_format=layout), y)
    torch.cuda.synchronize()
    return {k: v.float().cpu() for k, v in model.state_dict().items()}, stats.cpu()


def test_cnn_graph_replays_train_what_the_eager_steps_train_batchnorm_statistics_included():
    data = batches()
    (eager_weights, eager_stats), (graph_weights, graph_stats) = cnn_run(False, data), cnn_run(True, data)
    for name, value in eager_weights.items():  # running_mean/var and num_batches_tracked too
        torch.testing.assert_close(graph_weights[name], value, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(graph_stats, eager_stats, atol=1e-3, rtol=1e-5)


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

