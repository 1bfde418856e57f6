"""Each script in two layers (issue 22): the experiment on top, run plumbing below one banner; what a student's
edit of the upper layer may do without breaking the lower one."""

import os
import subprocess
import sys

import pytest
import torch

import cnn_baseline
import common
import vit_scratch
from conftest import ROOT

BANNER = "# ===== Run plumbing: nothing below changes what is trained =====\n"
TINY = {
    vit_scratch: ["--embed-dim", "32", "--hidden-dim", "64", "--num-heads", "4", "--num-layers", "2", "--batch-size",
                  "32"],
    cnn_baseline: ["--widths", "8", "16", "32", "--batch-size", "32"],
}
SCRIPTS = pytest.mark.parametrize("script", list(TINY), ids=lambda m: m.__name__)


@pytest.mark.parametrize("name", ["vit_scratch.py", "cnn_baseline.py", "clip_zeroshot.py", "lora_caption.py",
                                  "common.py"])
def test_the_plumbing_banner_opens_the_lower_layer_once(name):
    text = (ROOT / name).read_text()
    assert text.count(BANNER) == 1
    upper = text.split(BANNER)[0]
    if name in ("vit_scratch.py", "cnn_baseline.py"):  # the loop written out in main(), the step per batch
        main = upper[upper.index("def main(argv=None):"):]
        assert "        for x, y in train_loader:\n" in main and "step(x" in main and ".backward()" in upper


def test_a_vit_without_the_mlps_dropout_layers_still_trains_with_muon(tiny_cifar, tmp_path):
    """A student deletes nn.Dropout from the MLP (the fast recipe's dropout is 0): Muon still finds its weights,
    by shape, and one CPU epoch trains. (Muon used to pick them by index, b.mlp[0] and b.mlp[3].)"""
    source = (ROOT / "vit_scratch.py").read_text()
    original = ("nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),\n"
                "                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))")
    assert original in source
    (tmp_path / "vit_scratch.py").write_text(source.replace(original, "nn.Sequential(nn.Linear(dim, hidden_dim), "
                                                                      "nn.GELU(), nn.Linear(hidden_dim, dim))"))
    (tmp_path / "common.py").write_text((ROOT / "common.py").read_text())
    probe = ("import sys, vit_scratch, torch; m = vit_scratch.VisionTransformer(num_layers=2, embed_dim=32, "
             "hidden_dim=64, num_heads=4); print(len(vit_scratch.hidden_matrices(m)), "
             "sum(isinstance(x, torch.nn.Dropout) for x in m.blocks.modules())); "
             "vit_scratch.main(sys.argv[1:])")
    proc = subprocess.run(
        [sys.executable, "-c", probe, "--data-dir", str(tiny_cifar), "--device", "cpu", "--epochs", "1",
         "--optimizer", "muon", "--no-plots", "--limit-train", "64", "--limit-test", "50", "--out-dir",
         str(tmp_path / "run"), *TINY[vit_scratch]],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "8 0"  # 4 matrices per block for Muon; no Dropout left
    assert "epoch   1/1" in proc.stdout and "test accuracy" in proc.stdout


def test_muon_takes_every_2d_weight_of_the_blocks_and_nothing_else():
    model = vit_scratch.VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=3)
    hidden = {id(p) for p in vit_scratch.hidden_matrices(model)}
    expected = {id(m.weight) for b in model.blocks for m in (b.attn.to_qkv, b.attn.to_out, b.mlp[0], b.mlp[3])}
    assert hidden == expected


def test_the_pictures_read_the_model_through_one_method():
    torch.manual_seed(0)
    model = vit_scratch.VisionTransformer(embed_dim=16, hidden_dim=32, num_heads=2, num_layers=2, dropout=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = model.attention_maps(x)
    assert [m.shape for m in maps] == [(2, 2, 65, 65)] * 2
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 2, 65))  # rows are softmax distributions
    assert all(torch.equal(a, b) for a, b in zip(maps, vit_scratch.attention_maps(model, x)))


@SCRIPTS
def test_a_checkpoint_written_before_a_flag_existed_resumes_with_its_default(script, tiny_cifar, tmp_path):
    script.main(["--data-dir", str(tiny_cifar), "--device", "cpu", "--no-plots", "--out-dir", str(tmp_path),
                 "--limit-train", "64", "--limit-test", "50", "--epochs", "1", *TINY[script]])
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    for name in ("grad_clip", "label_smoothing"):  # as if these flags had been added after the run started
        del ckpt["args"][name]
    common.save_checkpoint(ckpt, tmp_path / "last.pt")
    summary = script.main(["--resume", str(tmp_path), "--epochs", "2"])
    assert summary["epochs"] == 2 and summary["args"]["grad_clip"] == 1.0
    assert summary["args"]["label_smoothing"] == 0.1  # vit: the recipe's value; cnn: the flag's default


@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--epochs", "0"], "--epochs must be positive, got 0"),
    (["--epochs", "2.5"], "argument --epochs: invalid int value: '2.5'"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--weight-decay", "-1"], "--weight-decay must be a number >= 0, got -1.0"),
])
def test_each_flag_checks_its_own_range_where_it_is_declared(argv, message):
    with pytest.raises(common.DataError) as error:
        vit_scratch.build_parser().parse_args(argv)
    assert str(error.value) == message
