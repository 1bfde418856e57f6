"""The contract both CIFAR-10 training scripts keep: clear errors, outputs, learning, resume."""

import json
import subprocess
import sys

import pytest
import torch

import cnn_baseline
import common
import vit_scratch
from conftest import ROOT, one_line_error

TINY = {  # flags for a model small enough to train in seconds on a CPU
    vit_scratch: ["--embed-dim", "32", "--hidden-dim", "64", "--num-heads", "4", "--num-layers", "2", "--batch-size",
                  "32"],
    cnn_baseline: ["--widths", "8", "16", "32", "--batch-size", "32"],
}
SCRIPTS = pytest.mark.parametrize("script", list(TINY), ids=lambda m: m.__name__)
SCHEMA = {"script", "dataset", "device", "device_name", "epochs", "steps", "test_acc", "train_seconds",
          "images_per_second", "peak_memory_mb", "params", "trainable_params", "args"}


@pytest.mark.parametrize(
    "script, flags, message",
    [(vit_scratch, ["--patch-size", "5"], "--image-size 32 is not divisible by --patch-size 5"),
     (vit_scratch, ["--embed-dim", "250"], "--embed-dim 250 is not divisible by --num-heads 8"),
     (vit_scratch, ["--dropout", "1.5"], "--dropout must be in [0, 1)"),
     (cnn_baseline, ["--widths", "32"], "--widths needs a stem width and at least one stage width"),
     (cnn_baseline, ["--widths", "8", "8", "8", "8", "8", "8", "8"], "can only be halved 5 times"),
     (vit_scratch, ["--epochs", "0"], "--epochs must be positive"),
     (cnn_baseline, ["--lr", "-1"], "--lr must be positive"),
     (cnn_baseline, ["--batch-size", "1000"], "--batch-size 1000 is larger than the 300 training images"),
     (vit_scratch, ["--limit-train", "100000"], "subset of 100000 images but the split holds 300")],
    ids=lambda v: v.__name__ if hasattr(v, "__name__") else None,
)
def test_impossible_configs_fail_in_one_line_before_any_work(script, flags, message, tiny_cifar, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--data-dir", str(tiny_cifar), "--out-dir", str(tmp_path / "run"), "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "last.pt").exists()


@SCRIPTS
def test_missing_data_fails_with_both_options(script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main(["--data-dir", str(tmp_path / "empty"), "--no-download", "--out-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert "ImageFolder tree" in err and "cifar-10-batches-py" in err


@SCRIPTS
def test_cli_smoke_run_learns_and_writes_the_summary(script, tiny_cifar, tmp_path):
    out, name = tmp_path / "run", script.__name__
    cmd = [sys.executable, str(ROOT / f"{name}.py"), "--data-dir", str(tiny_cifar), "--out-dir", str(out), "--epochs",
           "8", "--lr", "2e-3", "--device", "cpu", *TINY[script]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "epoch   8/8" in proc.stdout and "test accuracy" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert SCHEMA | {"per_class_acc", "confusion_matrix"} <= summary.keys()
    assert summary["script"] == name and summary["epochs"] == 8 and summary["steps"] == 8 * 9
    assert sum(map(sum, summary["confusion_matrix"])) == 100 and len(summary["per_class_acc"]) == 10
    assert summary["params"] == summary["trainable_params"] > 0 and summary["images_per_second"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.05, "training loss did not go down"
    assert json.loads((out / "config.json").read_text())["epochs"] == 8
    from PIL import Image

    assert Image.open(out / "curves.png").size == (1260, 330) and Image.open(out / "confusion.png").size == (720, 630)
    for ckpt_name in ("last.pt", "best.pt"):
        ckpt = torch.load(out / ckpt_name, weights_only=True)  # plain values only
        assert ckpt["script"] == name and ckpt["model_config"]["num_classes"] == 10


@pytest.mark.parametrize("script, extra", [(vit_scratch, []), (cnn_baseline, []), (vit_scratch, ["--dropout", "0.1"])],
                         ids=["vit_scratch", "cnn_baseline", "vit_scratch-dropout"])
def test_resume_after_interruption_gives_the_same_weights(script, extra, tiny_cifar, tmp_path, monkeypatch, capsys):
    # with dropout, the resumed epochs must draw the masks the uninterrupted run drew (no RNG state is saved)
    flags = ["--data-dir", str(tiny_cifar), "--epochs", "3", "--device", "cpu", "--limit-train", "128", *TINY[script],
             *extra]
    script.main([*flags, "--out-dir", str(tmp_path / "full")])

    real_epoch = common.TensorLoader.set_epoch  # main()'s loop starts each epoch with it

    def dies_in_epoch_three(loader, epoch):
        if epoch == 3:
            raise KeyboardInterrupt  # Ctrl-C in epoch 3: epoch 2's checkpoint is all that survives
        return real_epoch(loader, epoch)

    monkeypatch.setattr(common.TensorLoader, "set_epoch", dies_in_epoch_three)
    with pytest.raises(SystemExit) as stop:
        script.main([*flags, "--out-dir", str(tmp_path / "cut")])
    monkeypatch.setattr(common.TensorLoader, "set_epoch", real_epoch)
    assert stop.value.code == 130
    assert (
        f"resume with: python {script.__name__}.py --resume {tmp_path / 'cut' / 'last.pt'}" in capsys.readouterr().err
    )
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["state"]["epoch"] == 2

    summary = script.main(
        ["--resume", str(tmp_path / "cut" / "last.pt"), "--data-dir", str(tiny_cifar), "--device", "cpu"]
    )
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    assert summary["epochs"] == 3 and summary["steps"] == 3 * 4
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 3


@SCRIPTS
def test_resume_refuses_a_checkpoint_of_another_script(script, tmp_path, capsys):
    torch.save({"script": "lora_caption", "model": {}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit):
        script.main(["--resume", str(tmp_path / "other.pt")])
    assert f"written by 'lora_caption', not by {script.__name__}.py" in capsys.readouterr().err


@SCRIPTS
def test_resume_says_when_max_steps_cut_an_epoch_short(script, tiny_cifar, tmp_path, capsys):
    flags = ["--data-dir", str(tiny_cifar), "--epochs", "2", "--device", "cpu", "--limit-train", "128", "--no-plots",
             *TINY[script]]
    script.main([*flags, "--out-dir", str(tmp_path), "--max-steps", "3"])  # 4 steps an epoch: 1 batch left out
    capsys.readouterr()
    summary = script.main(["--resume", str(tmp_path / "last.pt"), "--max-steps", "6", "--data-dir", str(tiny_cifar)])
    out = capsys.readouterr().out
    assert "after epoch 1 (step 3); --max-steps stopped that epoch 1 of 4 batches short (skipped)" in out, out
    assert summary["steps"] == 6 and summary["epochs"] == 2
    # an extension that the other limit holds back would only evaluate again: refused, naming the flag to raise
    resume = ["--resume", str(tmp_path), "--data-dir", str(tiny_cifar)]
    err = one_line_error(capsys, lambda: script.main([*resume, "--max-steps", "9"]))
    assert "--max-steps 9 trains nothing: the run has done all its --epochs 2" in err and "raise --epochs" in err
    err = one_line_error(capsys, lambda: script.main([*resume, "--epochs", "3"]))
    assert "--epochs 3 trains nothing: --max-steps 6 still stops the run where it is (step 6)" in err
    assert script.main([*resume, "--epochs", "3", "--max-steps", "9"])["steps"] == 9
