"""vit_scratch.py's sweep candidates of issue 23 (item 1), as flags whose default changes nothing: Muon's momentum,
the shape of the learning-rate decay, an exponential moving average of the weights (evaluated, saved, resumed,
trained inside the captured step) and test-time augmentation beyond the flip. Measured on a GPU by
benchmarks/sweep_vit.py --only issue23; here, that each does exactly what it says."""
import argparse
import copy
from functools import partial

import pytest
import torch

import common
import vit_scratch
from conftest import one_line_error


def shape_args(shape):
    return argparse.Namespace(schedule="step", warmup=0.1, epochs=1, lr_shape=shape)


@pytest.mark.parametrize("shape, expected", [
    ("cosine", {4: 0.5, 10: 1.0, 55: 0.5, 100: 0.0}),
    ("linear", {4: 0.5, 10: 1.0, 55: 0.5, 91: 1 - 81 / 90, 100: 0.0}),
    ("trapezoid", {4: 0.5, 10: 1.0, 55: 1.0, 82: 1.0, 91: (1 - 81 / 90) / 0.2, 100: 0.0}),
])
def test_each_lr_shape_after_the_same_warm_up(shape, expected):
    got = {step: vit_scratch.schedule_factor(shape_args(shape), step, 100, 100) for step in expected}
    assert got == pytest.approx(expected, abs=1e-12)


def tiny_vit():
    torch.manual_seed(0)
    return vit_scratch.VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=2, dropout=0.0,
                                         init_std=0.02)


def test_the_ema_follows_each_update_inside_the_step_and_muon_takes_its_momentum():
    model = tiny_vit()
    args = argparse.Namespace(optimizer="muon", lr=1e-3, muon_lr=0.01, muon_momentum=0.8, weight_decay=0.05,
                              label_smoothing=0.1, grad_clip=1.0, ema=0.9)
    optimizers = vit_scratch.make_optimizers(model, args, torch.device("cpu"), capture=False)
    assert optimizers[1].param_groups[0]["momentum"] == 0.8
    ema = copy.deepcopy(model).requires_grad_(False)
    stats = torch.zeros(2)
    step = vit_scratch.make_step(model, optimizers, torch.amp.GradScaler("cpu", enabled=False), None, args, stats,
                                 None, False, [], ema)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        before = [p.detach().clone() for p in ema.parameters()]
        step(x, y)
        for average, old, weight in zip(ema.parameters(), before, model.parameters()):
            assert torch.equal(average, old.lerp(weight.detach(), 0.1))  # bit for bit: the same lerp
    assert not torch.equal(next(ema.parameters()), next(model.parameters()))


def test_undoing_the_warm_up_restores_the_average_too():
    """CapturedStep undoes its warm-up steps on everything they touched, the --ema average included (its GPU run:
    test_gpu.py); here the same undo_steps call on the CPU."""
    model = tiny_vit()
    args = argparse.Namespace(optimizer="adamw", lr=1e-3, muon_lr=None, weight_decay=0.05, ema=0.9)
    optimizers = vit_scratch.make_optimizers(model, args, torch.device("cpu"), capture=False)
    ema, stats = copy.deepcopy(model).requires_grad_(False), torch.zeros(2)
    averaging = (list(ema.parameters()), list(model.parameters()), 0.9)
    step = partial(vit_scratch.train_step, model, optimizers, torch.amp.GradScaler(
        "cpu", enabled=False), None, 0.1, 1.0, stats=stats, ema=averaging)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    undo = common.undo_steps([*model.state_dict().values(), *ema.state_dict().values(), stats], optimizers, torch)
    step(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    assert not all(torch.equal(v, before[k]) for k, v in ema.state_dict().items())
    undo()
    assert all(torch.equal(v, before[k]) for k, v in ema.state_dict().items())


def test_the_shifted_test_views_are_trainings_crops_and_evaluate_averages_them():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    loader = common.TensorLoader(images, torch.arange(6) % 10, 6, "cpu", train=False)
    x, _ = next(iter(loader))
    views = vit_scratch.test_views(x, loader, shift=2)
    assert len(views) == 10 and torch.equal(views[0], x) and torch.equal(views[5], x.flip(3))
    zero = torch.zeros(6, 1, dtype=torch.long)
    for view, (dy, dx) in zip(views[1:5], ((0, 2), (4, 2), (2, 0), (2, 4))):  # a crop of the image padded by 2
        crop = common.apply_crop_flip(images, (zero + dy, zero + dx, zero.bool()), padding=2)
        assert torch.equal(view, common.normalize(crop))
    assert len(vit_scratch.test_views(x, loader)) == 2  # the flip alone, as before
    model = tiny_vit().eval()
    cm, loss = vit_scratch.evaluate(model, loader, None, 10, tta=True, shift=2)
    with torch.no_grad():
        logits = sum(model(v) for v in views) / 10
    assert torch.equal(cm, common.confusion_matrix(logits.argmax(1), torch.arange(6) % 10, 10))
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.arange(6) % 10).item(), rel=1e-5)


def run(tiny_cifar, out, *flags):
    return vit_scratch.main(["--data-dir", str(tiny_cifar), "--device", "cpu", "--embed-dim", "16", "--hidden-dim",
                             "32", "--num-heads", "2", "--num-layers", "1", "--batch-size", "50", "--no-plots",
                             "--out-dir", str(out), *flags])


def test_an_ema_run_evaluates_saves_and_resumes_its_average(tiny_cifar, tmp_path, monkeypatch):
    summary = run(tiny_cifar, tmp_path / "full", "--epochs", "2", "--ema", "0.8", "--tta-shift", "2")
    assert summary["trainable_params"] == summary["params"] > 0  # the model's count, not the frozen average's
    last = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    assert last["ema"].keys() == last["model"].keys()
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in last["model"])
    data = common.load_cifar10(str(tiny_cifar), download=False)
    averaged = vit_scratch.VisionTransformer(**last["model_config"])
    averaged.load_state_dict(last["ema"])
    loader = common.TensorLoader(data.test_x, data.test_y, 2000, "cpu", train=False)
    cm, _ = vit_scratch.evaluate(averaged, loader, None, 10, tta=True, shift=2)
    assert summary["test_acc"] == common.accuracy_from(cm)  # what is reported is the average's accuracy
    real = vit_scratch.save_run

    def stop_after_epoch_1(args, model, optimizers, scaler, progress, *rest):
        real(args, model, optimizers, scaler, progress, *rest)
        raise KeyboardInterrupt  # Ctrl-C after the first checkpoint
    monkeypatch.setattr(vit_scratch, "save_run", stop_after_epoch_1)
    with pytest.raises(SystemExit):
        run(tiny_cifar, tmp_path / "cut", "--epochs", "2", "--ema", "0.8", "--tta-shift", "2")
    monkeypatch.setattr(vit_scratch, "save_run", real)
    vit_scratch.main(["--resume", str(tmp_path / "cut"), "--device", "cpu"])
    resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for name in ("model", "ema"):
        for key, value in last[name].items():
            assert torch.equal(resumed[name][key], value), (name, key)


@pytest.mark.parametrize("flags, words", [
    (["--optimizer", "adamw", "--muon-momentum", "0.9"], "--muon-momentum has no effect with --optimizer adamw"),
    (["--schedule", "epoch", "--lr-shape", "linear"], "--lr-shape has no effect with --schedule epoch"),
    (["--no-tta", "--tta-shift", "2"], "--tta-shift has no effect without --tta"),
    (["--recipe", "guide", "--tta-shift", "2"], "--tta-shift has no effect without --tta (recipe guide)"),
    (["--ema", "1"], "--ema must be in [0, 1), got 1.0"),
    (["--tta-shift", "9"], "--tta-shift 9 is more than a quarter of --image-size 32"),
])
def test_the_new_flags_refuse_what_would_change_nothing(flags, words, tmp_path, capsys):
    assert words in one_line_error(capsys, lambda: vit_scratch.main([*flags, "--out-dir", str(tmp_path / "r")]))


def test_a_checkpoint_from_before_these_flags_resumes_with_them_typed_at_their_defaults(tiny_cifar, tmp_path):
    run(tiny_cifar, tmp_path / "old", "--epochs", "1")
    path = tmp_path / "old" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    for name in ("muon_momentum", "lr_shape", "ema", "tta_shift"):  # as written before they existed
        del ckpt["args"][name]
    torch.save(ckpt, path)
    summary = vit_scratch.main(["--resume", str(tmp_path / "old"), "--epochs", "2", "--device", "cpu", "--lr-shape",
                                "cosine", "--ema", "0", "--muon-momentum", "0.95"])
    assert summary["epochs"] == 2 and summary["args"]["lr_shape"] == "cosine"


def test_a_string_of_flags_is_split_as_a_shell_splits_it(tmp_path):
    args, given = common.parse(vit_scratch.build_parser(), f'--epochs 3 --out-dir "{tmp_path}/a b" --seed=4')
    assert (args.epochs, args.out_dir, args.seed) == (3, f"{tmp_path}/a b", 4) and given == {"epochs", "out_dir",
                                                                                             "seed"}


def test_the_sweep_decodes_the_data_once_for_all_its_runs(tiny_cifar, monkeypatch):
    """benchmarks/sweep_vit.py shares one decode among its runs by caching common.load_cifar10, which both
    scripts reach through common.load_classifier_data."""
    import sweep_vit
    monkeypatch.setattr(common, "load_cifar10", common.load_cifar10)  # put back after the test
    sweep_vit.share_the_data()
    args = argparse.Namespace(data_dir=str(tiny_cifar), no_download=True, resume=None, limit_train=None,
                              limit_test=None, seed=0, batch_size=32, global_batch=32, world_size=1)
    first, train_idx, _ = common.load_classifier_data(args, None)
    second, _, _ = common.load_classifier_data(args, None)
    assert first is second and len(train_idx) == 300
