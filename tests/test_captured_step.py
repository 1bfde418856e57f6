"""common.CapturedStep, which vit_scratch, cnn_baseline and clip_zeroshot replay on one CUDA GPU, run on the CPU with
stand-in graphs (conftest.cpu_graphs): each script's make_step with capture on trains bit for bit as its eager step
(the warm-up undone, every batch copied into the recorded step's inputs), and a capture that fails leaves the run as
it was and trains eagerly. The same on a GPU, with real graphs: tests/test_gpu.py."""
import argparse
import copy

import pytest
import torch

import clip_zeroshot
import cnn_baseline
import common
import vit_scratch

CPU = torch.device("cpu")
SCALER = torch.amp.GradScaler("cpu", enabled=False)


def train(step, batches, set_lr):
    torch.manual_seed(7)  # dropout's draws, the same for both runs
    for i, batch in enumerate(batches):
        set_lr(i)
        step(*batch)


def assert_same(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def train_vit(capture, data):
    torch.manual_seed(0)
    model = vit_scratch.VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=2, dropout=0.1,
                                          init_std=0.02)
    args = argparse.Namespace(optimizer="muon", lr=1e-3, muon_lr=0.01, muon_momentum=0.95, weight_decay=0.05,
                              label_smoothing=0.1, grad_clip=1.0, ema=0.9)
    optimizers = vit_scratch.make_optimizers(model, args, CPU, capture=False)  # capturable AdamW needs a GPU
    ema = copy.deepcopy(model).requires_grad_(False)
    stats = torch.zeros(2)
    loader = common.TensorLoader(data.train_x[:96], data.train_y[:96], 32, CPU, train=True, seed=0)
    step = vit_scratch.make_step(model, optimizers, SCALER, None, args, stats, loader, capture, [], ema)
    train(step, list(loader), lambda i: common.set_learning_rates(optimizers, 1 - i / 4))
    return step, model, ema, stats


def train_cnn(capture, data):
    torch.manual_seed(0)
    model = cnn_baseline.ResidualCNN(widths=(8, 16, 16, 16)).to(memory_format=torch.channels_last)
    args = argparse.Namespace(lr=1e-3, weight_decay=0.05, label_smoothing=0.1, grad_clip=1.0)
    optimizer = cnn_baseline.make_optimizer(model, args, CPU, capture=False)
    stats = torch.zeros(2)
    loader = common.TensorLoader(data.train_x[:96], data.train_y[:96], 32, CPU, train=True, seed=0)
    step = cnn_baseline.make_step(model, optimizer, SCALER, None, args, stats, loader, torch.channels_last, capture)
    batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in loader]
    train(step, batches, lambda i: common.set_learning_rates([optimizer], 1 - i / 4))
    return step, model, None, stats


def train_clip(capture, data, tiny_clip, mode):
    model, tokenizer, processor = clip_zeroshot.load_clip(str(tiny_clip), CPU)
    classifier = clip_zeroshot.zero_shot_classifier(model, tokenizer, data.classes, clip_zeroshot.CIFAR10_TEMPLATES,
                                                    CPU)
    torch.manual_seed(0)
    if mode == "lora":
        classifier = clip_zeroshot.add_lora(classifier, argparse.Namespace(
            rank=4, alpha=8, lora_dropout=0.1, targets=clip_zeroshot.LORA_TARGETS))
    args = argparse.Namespace(lr=1e-2, weight_decay=0.01, grad_clip=1.0)
    optimizer = clip_zeroshot.make_optimizer(classifier, args, CPU)
    stats = torch.zeros(2)
    loader = common.TensorLoader(data.train_x[:64], data.train_y[:64], 16, CPU, train=True, seed=0, raw=True)
    loader.set_epoch(1)
    batches = list(loader)
    step = clip_zeroshot.make_step(classifier, optimizer, SCALER, clip_zeroshot.TensorPreprocess(processor, CPU), None,
                                   args, stats, batches[0], capture)
    train(step, batches, lambda i: common.set_learning_rates([optimizer], 1 - i / 4))
    return step, classifier, None, stats


@pytest.fixture(scope="module")
def data(tiny_cifar):
    return common.load_cifar10(tiny_cifar, download=False)


@pytest.fixture(params=["vit", "cnn", "clip full", "clip lora"])
def script(request, data, tiny_clip):
    name, _, mode = request.param.partition(" ")
    module = {"vit": vit_scratch, "cnn": cnn_baseline, "clip": clip_zeroshot}[name]
    run = {"vit": train_vit, "cnn": train_cnn}.get(name) or (lambda c, d: train_clip(c, d, tiny_clip, mode))
    return module, lambda capture: run(capture, data)


def test_the_captured_step_trains_as_the_eager_one_bit_for_bit(script, cpu_graphs, monkeypatch, capsys):
    module, run = script
    eager_step, eager_model, eager_ema, eager_stats = run(capture=False)
    recorded = cpu_graphs(module.train_step)
    monkeypatch.setattr(module, "train_step", recorded)  # what make_step binds is recorded
    real_make_step, rng = module.make_step, []

    def make_step(*args, **kwargs):  # the generator dropout draws from: as it was before the warm-up
        rng.append(torch.get_rng_state())
        made = real_make_step(*args, **kwargs)
        rng.append(torch.get_rng_state())
        return made
    monkeypatch.setattr(module, "make_step", make_step)
    step, model, ema, stats = run(capture=True)
    assert isinstance(step, common.CapturedStep) and len(step.graph.calls) == 1
    assert recorded.eager_calls == 3 and torch.equal(rng[0], rng[1])  # three warm-up steps, their draws undone
    if module is cnn_baseline:  # the graph's input buffer keeps the layout its kernels were recorded for
        assert step.batch[0].is_contiguous(memory_format=torch.channels_last)
    assert not isinstance(eager_step, common.CapturedStep)
    assert "captured the training step as a CUDA graph" in capsys.readouterr().out
    assert_same(model, eager_model)  # three warm-up steps ran and were undone; then the same batches
    if ema is not None:
        assert_same(ema, eager_ema)
    assert torch.equal(stats, eager_stats) and stats[0] > 0


@pytest.mark.parametrize("where", ["warm-up", "capture"])
def test_a_failed_capture_leaves_the_run_as_it_was_and_trains_eagerly(where, script, cpu_graphs, monkeypatch, capsys):
    module, run = script
    _, eager_model, _, eager_stats = run(capture=False)
    error = RuntimeError("operation not permitted when stream is capturing")
    if where == "capture":
        monkeypatch.setattr(torch.cuda, "graph", lambda g: (_ for _ in ()).throw(error))
    else:  # the second warm-up step fails, after the first has changed the weights
        calls, real = [], module.train_step

        def fails_second(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise error
            return real(*args, **kwargs)
        monkeypatch.setattr(module, "train_step", fails_second)
    step, model, _, stats = run(capture=True)
    assert not isinstance(step, common.CapturedStep)
    assert "CUDA graph capture failed (RuntimeError: operation not permitted" in capsys.readouterr().out
    assert_same(model, eager_model)
    assert torch.equal(stats, eager_stats)


def test_under_capture_every_learning_rate_is_a_tensor_the_schedule_fills_in_place():
    """A graph reads the rate from the tensor it was recorded with: set_learning_rates must fill that tensor, never
    put a float (which the replays would not see) in its place."""
    model = vit_scratch.VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=1)
    args = argparse.Namespace(optimizer="muon", lr=1e-3, muon_lr=0.01, muon_momentum=0.95, weight_decay=0.05)
    cases = [vit_scratch.make_optimizers(model, args, CPU, capture=True),
             [cnn_baseline.make_optimizer(cnn_baseline.ResidualCNN(widths=(8, 16)), args, CPU, capture=True)],
             [clip_zeroshot.make_optimizer(model, args, CPU, capture=True)]]
    for optimizers in cases:
        groups = [g for opt in optimizers for g in opt.param_groups]
        tensors = [g["lr"] for g in groups]
        assert all(torch.is_tensor(t) for t in tensors)
        common.set_learning_rates(optimizers, 0.25)
        assert all(g["lr"] is t for g, t in zip(groups, tensors))
        assert [t.item() for t in tensors] == [torch.tensor(g["peak_lr"] * 0.25).item() for g in groups]
