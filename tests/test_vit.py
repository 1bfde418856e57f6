"""vit_scratch.py: the model's contract, attention parity with the guide, the CLI, resume."""
import json
import subprocess
import sys

import pytest
import torch

import vit_scratch
from conftest import ROOT
from guide_vit import GuideVisionTransformer, guide_state_dict
from vit_scratch import VisionTransformer

TINY_MODEL = ["--embed-dim", "32", "--hidden-dim", "64", "--num-heads", "4", "--num-layers", "2", "--batch-size", "32"]


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


def test_no_weight_decay_on_norms_biases_cls_and_positions():
    model = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=1)
    decay, no_decay = vit_scratch.make_optimizer(model, 1e-3, 0.05, torch.device("cpu")).param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.cls_token) in no_decay_ids and id(model.pos_embedding) in no_decay_ids
    assert id(model.blocks[0].norm1.weight) in no_decay_ids and id(model.to_patch_embedding.bias) in no_decay_ids
    assert {id(p) for p in decay["params"]} == {id(model.to_patch_embedding.weight), id(model.blocks[0].attn.to_qkv.weight),
                                                id(model.blocks[0].attn.to_out.weight), id(model.blocks[0].mlp[0].weight),
                                                id(model.blocks[0].mlp[3].weight), id(model.mlp_head[1].weight)}


def test_schedule_warms_up_linearly_then_decays_to_zero():
    factors = [vit_scratch.lr_factor(s, 10, 100) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.5) and factors[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


@pytest.mark.parametrize("flags, message", [
    (["--patch-size", "5"], "--image-size 32 is not divisible by --patch-size 5"),
    (["--embed-dim", "250"], "--embed-dim 250 is not divisible by --num-heads 8"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--batch-size", "1000"], "--batch-size 1000 is larger than the 300 training images"),
    (["--limit-train", "100000"], "subset of 100000 images but the split holds 300"),
])
def test_impossible_configs_fail_in_one_line_before_any_work(flags, message, tiny_cifar, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        vit_scratch.main(["--data-dir", str(tiny_cifar), "--out-dir", str(tmp_path / "run"), "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "last.pt").exists()


def test_missing_data_fails_with_both_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        vit_scratch.main(["--data-dir", str(tmp_path / "empty"), "--no-download", "--out-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert "ImageFolder tree" in err and "cifar-10-batches-py" in err


def test_cli_smoke_run_learns_and_writes_the_summary(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "vit_scratch.py"), "--data-dir", str(tiny_cifar), "--out-dir", str(out),
           "--epochs", "8", "--lr", "2e-3", "--device", "cpu", *TINY_MODEL]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "epoch   8/8" in proc.stdout and "test accuracy" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    schema = {"script", "dataset", "device", "device_name", "epochs", "steps", "test_acc", "train_seconds",
              "images_per_second", "peak_memory_mb", "params", "trainable_params", "args", "per_class_acc", "confusion_matrix"}
    assert schema <= summary.keys()
    assert summary["script"] == "vit_scratch" and summary["epochs"] == 8 and summary["steps"] == 8 * 9
    assert sum(map(sum, summary["confusion_matrix"])) == 100 and len(summary["per_class_acc"]) == 10
    assert summary["params"] == summary["trainable_params"] > 0 and summary["images_per_second"] > 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.05, "training loss did not go down"
    assert json.loads((out / "config.json").read_text())["epochs"] == 8
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(out / name, weights_only=True)  # plain values only
        assert ckpt["script"] == "vit_scratch" and ckpt["model_config"]["embed_dim"] == 32


def test_resume_after_interruption_gives_the_same_weights(tiny_cifar, tmp_path, monkeypatch):
    common_flags = ["--data-dir", str(tiny_cifar), "--epochs", "3", "--device", "cpu", "--limit-train", "128", *TINY_MODEL]
    vit_scratch.main([*common_flags, "--out-dir", str(tmp_path / "full")])

    real_epoch, calls = vit_scratch.train_one_epoch, []

    def dies_in_epoch_three(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed mid-epoch: epoch 2's checkpoint is all that survives
        return real_epoch(*a, **k)
    monkeypatch.setattr(vit_scratch, "train_one_epoch", dies_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        vit_scratch.main([*common_flags, "--out-dir", str(tmp_path / "cut")])
    monkeypatch.setattr(vit_scratch, "train_one_epoch", real_epoch)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["state"]["epoch"] == 2

    summary = vit_scratch.main(["--resume", str(tmp_path / "cut" / "last.pt"), "--data-dir", str(tiny_cifar), "--device", "cpu"])
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    assert summary["epochs"] == 3 and summary["steps"] == 3 * 4
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 3


def test_resume_refuses_a_checkpoint_of_another_script(tmp_path, capsys):
    torch.save({"script": "cnn_baseline", "model": {}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit):
        vit_scratch.main(["--resume", str(tmp_path / "other.pt")])
    assert "written by 'cnn_baseline', not by vit_scratch.py" in capsys.readouterr().err
