"""vit_scratch.py: the model's contract and attention parity with the guide (CLI contract: test_training_cli.py)."""

import argparse
from functools import partial

import pytest
import torch

import common
import vit_scratch
from guide_vit import GuideVisionTransformer, guide_state_dict
from vit_scratch import VisionTransformer


def test_default_model_is_the_guides_size_and_shape():
    model = VisionTransformer()
    assert sum(p.numel() for p in model.parameters()) == 3_195_146
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in GuideVisionTransformer().parameters())
    assert model.pos_embedding.shape == (1, 65, 256)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert model.forward_features(torch.randn(3, 3, 32, 32)).shape == (3, 65, 256)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=2)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fused_attention_equals_the_plain_math():
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=64, hidden_dim=64, num_heads=8, num_layers=2, dropout=0.0).eval()
    x = torch.randn(4, 3, 32, 32)
    fused = model(x)
    for block in model.blocks:
        block.attn.fused = False
    torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-5)


def test_outputs_equal_the_guides_nn_multiheadattention_model():
    torch.manual_seed(0)
    ours, guide = VisionTransformer().eval(), GuideVisionTransformer().eval()
    guide.load_state_dict(guide_state_dict(ours.state_dict()))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(ours(x), guide(x), atol=1e-5, rtol=1e-5)


def optimizer_args(**kw):
    return argparse.Namespace(**{"optimizer": "adamw", "lr": 1e-3, "muon_lr": 0.01, "muon_momentum": 0.95,
                                 "weight_decay": 0.05, **kw})


def test_no_weight_decay_on_norms_biases_cls_and_positions():
    model = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=1)
    [adamw] = vit_scratch.make_optimizers(model, optimizer_args(), torch.device("cpu"), capture=False)
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.cls_token) in no_decay_ids and id(model.pos_embedding) in no_decay_ids
    assert id(model.blocks[0].norm1.weight) in no_decay_ids and id(model.to_patch_embedding.bias) in no_decay_ids
    assert {id(p) for p in decay["params"]} == {id(model.to_patch_embedding.weight),
                                                id(model.blocks[0].attn.to_qkv.weight),
                                                id(model.blocks[0].attn.to_out.weight),
                                                id(model.blocks[0].mlp[0].weight), id(model.blocks[0].mlp[3].weight),
                                                id(model.mlp_head[1].weight)}


def test_schedule_warms_up_linearly_then_decays_to_zero():
    factors = [vit_scratch.lr_factor(s, 10, 100) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.5) and factors[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=2, dropout=0.0).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), atol=1e-5, rtol=1e-5)


# The recipes and the training step (CUDA-graph capture itself needs a GPU: benchmarks/gpu_checks.sh)


def test_recipe_guide_resolves_to_exactly_the_guides_settings():
    args, ckpt = vit_scratch.experiment_args(["--recipe", "guide"])
    guide = {"batch_size": 128, "optimizer": "adamw", "lr": 3e-4, "weight_decay": 0.01, "schedule": "epoch",
             "warmup": 0.0, "label_smoothing": 0.0, "dropout": 0.1, "init_std": 1.0, "tta": False, "grad_clip": 1.0,
             "epochs": 10, "embed_dim": 256, "hidden_dim": 512, "num_heads": 8, "num_layers": 6, "patch_size": 4}
    assert ckpt is None and {k: getattr(args, k) for k in guide} == guide
    fast, _ = vit_scratch.experiment_args([])
    assert (fast.recipe, fast.optimizer, fast.batch_size, fast.dropout, fast.tta) == ("fast", "muon", 256, 0.0, True)
    overridden, _ = vit_scratch.experiment_args(["--recipe", "guide", "--lr", "1e-3", "--tta"])
    assert (overridden.lr, overridden.tta, overridden.batch_size) == (1e-3, True, 128)  # a typed flag wins


def test_per_epoch_schedule_equals_cosine_annealing_lr_stepped_per_epoch():
    args = argparse.Namespace(schedule="epoch", epochs=5, warmup=0.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    for epoch in range(5):
        for step in range(epoch * 7, epoch * 7 + 7):  # 7 steps per epoch
            assert 3e-4 * vit_scratch.schedule_factor(args, step, 7, 35) == pytest.approx(
                opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        reference.step()


def test_device_tensor_learning_rate_follows_lr_factor_exactly():
    model = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=2)
    optimizers = vit_scratch.make_optimizers(model, optimizer_args(optimizer="muon"), torch.device("cpu"), capture=True)
    args = argparse.Namespace(schedule="step", warmup=0.1, epochs=3, lr_shape="cosine")
    tensors = [g["lr"] for opt in optimizers for g in opt.param_groups]
    assert all(torch.is_tensor(t) for t in tensors) and len(tensors) == 3
    for step in range(0, 120, 7):
        common.set_learning_rates(optimizers, vit_scratch.schedule_factor(args, step, 40, 120))
        factor = vit_scratch.lr_factor(step, 12, 120)
        assert [float(g["lr"]) for opt in optimizers for g in opt.param_groups] == [
            torch.tensor(peak * factor, dtype=torch.float32).item() for peak in (1e-3, 1e-3, 0.01)]
        assert all(
            g["lr"] is t for g, t in zip((g for opt in optimizers for g in opt.param_groups), tensors)
        )  # in place


def test_train_step_gives_the_previous_loops_weights_on_cpu():
    """The step the CUDA graph records is this function; run eagerly it must train exactly as the loop
    it replaced did (zero_grad, loss, backward, clip, AdamW, LambdaLR stepped after each update)."""
    torch.manual_seed(0)
    make = lambda: VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=2, dropout=0.0)
    ours, reference = make(), make()
    reference.load_state_dict(ours.state_dict())
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(6)]
    args = argparse.Namespace(schedule="step", warmup=0.2, epochs=1, label_smoothing=0.1, grad_clip=1.0,
                              lr_shape="cosine")
    optimizers = vit_scratch.make_optimizers(ours, optimizer_args(), torch.device("cpu"), capture=False)
    scaler, stats = torch.amp.GradScaler("cpu", enabled=False), torch.zeros(2)
    step = partial(vit_scratch.train_step, ours, optimizers, scaler, None, 0.1, 1.0, stats=stats)
    for i, (x, y) in enumerate(batches):
        common.set_learning_rates(optimizers, vit_scratch.schedule_factor(args, i, 6, 6))
        step(x, y)

    decay = [p for n, p in reference.named_parameters() if p.ndim >= 2 and n not in ("cls_token", "pos_embedding")]
    rest = [p for n, p in reference.named_parameters() if not (p.ndim >= 2 and n not in ("cls_token", "pos_embedding"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: vit_scratch.lr_factor(s, 1, 6))
    criterion, loss_sum = torch.nn.CrossEntropyLoss(label_smoothing=0.1), 0.0
    for x, y in batches:
        loss = criterion(reference(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        opt.step()
        schedule.step()
        loss_sum += loss.item() * len(y)
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert stats[0].item() == pytest.approx(loss_sum, rel=1e-6)


def test_undoing_the_warm_up_restores_weights_and_a_fresh_optimizer():
    """What CapturedStep does after its warm-up steps (on the GPU), checked here on the CPU."""
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=2, dropout=0.1)
    optimizers = vit_scratch.make_optimizers(
        model, optimizer_args(optimizer="muon"), torch.device("cpu"), capture=False
    )
    stats, x, y = torch.zeros(2), torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    step = partial(vit_scratch.train_step, model, optimizers, torch.amp.GradScaler("cpu", enabled=False), None, 0.1,
                   1.0, stats=stats)
    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    undo = common.undo_steps([*model.state_dict().values(), stats], optimizers, torch)  # CapturedStep's call
    for _ in range(3):
        step(x, y)
    assert not torch.equal(model.blocks[0].mlp[0].weight, before["blocks.0.mlp.0.weight"]) and stats[0] > 0
    undo()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and stats.abs().sum() == 0
    assert torch.equal(torch.get_rng_state(), rng)
    for opt in optimizers:
        assert opt.state and all(
            v.abs().sum() == 0 for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
        )
    # ...so that the next step is the first step of a fresh run
    fresh = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=2, dropout=0.1)
    fresh.load_state_dict(before)
    fresh_opts = vit_scratch.make_optimizers(
        fresh, optimizer_args(optimizer="muon"), torch.device("cpu"), capture=False
    )
    fresh_step = partial(vit_scratch.train_step, fresh, fresh_opts, torch.amp.GradScaler("cpu", enabled=False), None,
                         0.1, 1.0, stats=torch.zeros(2))
    torch.manual_seed(5)
    step(x, y)
    torch.manual_seed(5)
    fresh_step(x, y)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_muon_trains_only_the_hidden_matrices_with_orthogonalised_updates():
    model = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=2)
    adamw, muon = vit_scratch.make_optimizers(
        model, optimizer_args(optimizer="muon"), torch.device("cpu"), capture=False
    )
    hidden = {id(p) for p in vit_scratch.hidden_matrices(model)}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == hidden and len(hidden) == 8
    assert not hidden & {id(p) for g in adamw.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for opt in (adamw, muon) for g in opt.param_groups) == len(list(model.parameters()))
    G = torch.randn(3, 96, 32)  # tall and wide matrices both come out near-orthogonal
    for M in (G, G.mT):
        singular = torch.linalg.svdvals(vit_scratch.newton_schulz(M).float())
        assert singular.min() > 0.5 and singular.max() < 1.5
    torch.testing.assert_close(vit_scratch.newton_schulz(G).float().mT @ vit_scratch.newton_schulz(G).float(),
                               torch.eye(32).expand(3, 32, 32), atol=0.5, rtol=0)


def test_regional_compilation_gives_the_eager_outputs_and_gradients():
    """--compile compiles each block's forward (one compiled code, reused by every block)."""
    torch.manual_seed(0)
    eager_model = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=2, dropout=0.0)
    compiled = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=2, dropout=0.0)
    compiled.load_state_dict(eager_model.state_dict())
    for block in compiled.blocks:
        block.forward = torch.compile(block.forward)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for model in (eager_model, compiled):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(compiled(x), eager_model(x), atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(compiled.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert compiled.state_dict().keys() == eager_model.state_dict().keys()  # checkpoints stay interchangeable
