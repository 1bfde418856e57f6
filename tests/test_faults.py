"""When things go wrong: kills, Ctrl-C, crashes while saving, non-finite losses, foreign checkpoints,
bad arguments, bad data, out of memory. Each case of the README's table has its test here (or is named
there with the test that covers it elsewhere)."""

import argparse
import errno
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import clip_zeroshot
import cnn_baseline
import common
import lora_caption
import vit_scratch
from conftest import ROOT, TINY_CAPTIONS, default_sigint

TINY = {
    vit_scratch: ["--embed-dim", "32", "--hidden-dim", "64", "--num-heads", "4", "--num-layers", "2", "--batch-size",
                  "32"],
    cnn_baseline: ["--widths", "8", "16", "32", "--batch-size", "32"],
}
SCRIPTS = pytest.mark.parametrize("script", list(TINY), ids=lambda m: m.__name__)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def cli(script_name, *flags):
    return [sys.executable, str(ROOT / f"{script_name}.py"), *map(str, flags)]


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def weights(path, key="model"):
    return torch.load(path, map_location="cpu", weights_only=True)[key]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# 1. kill -9 at a random moment, then --resume ----------------------------------------------------

def reference_run(command):
    """The uninterrupted run, started beside the one that is killed: the two start-ups overlap (the thread count,
    and so every number, is the same as when run alone)."""
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)


def finish(proc):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


@SCRIPTS
def test_kill_9_then_resume_ends_with_the_uninterrupted_weights(script, tiny_cifar, tmp_path):
    name = script.__name__
    flags = ["--data-dir", tiny_cifar, "--epochs", "4", "--device", "cpu", "--no-plots", *TINY[script]]
    full = reference_run(cli(name, *flags, "--out-dir", tmp_path / "full"))
    victim = subprocess.Popen(
        cli(name, *flags, "--out-dir", tmp_path / "cut"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
    )
    wait_for(tmp_path / "cut" / "last.pt", victim)
    time.sleep(random.Random(os.getpid()).uniform(0, 1.5))  # somewhere in a later epoch, or while saving
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = subprocess.run(
        cli(name, "--resume", tmp_path / "cut" / "last.pt", "--data-dir", tiny_cifar, "--device", "cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    finish(full)
    assert_same(weights(tmp_path / "full" / "last.pt"), weights(tmp_path / "cut" / "last.pt"))
    assert not list((tmp_path / "cut").glob(".*.tmp"))  # a save cut short leaves nothing behind after resume


def test_kill_9_then_resume_lora_at_step_level(tiny_captioner, tmp_path):
    flags = ["--model", tiny_captioner, "--data-dir", TINY_CAPTIONS, "--device", "cpu", "--epochs", "6", "--batch-size",
             "10", "--lr", "1e-2", "--save-every", "2", "--eval-every", "100", "--no-baseline", "--eval-images", "1",
             "--no-plots"]
    full = reference_run(cli("lora_caption", *flags, "--out-dir", tmp_path / "full"))
    victim = subprocess.Popen(cli("lora_caption", *flags, "--out-dir", tmp_path / "cut"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=ENV)
    wait_for(tmp_path / "cut" / "training_state.pt", victim)
    time.sleep(random.Random(os.getpid()).uniform(0, 0.5))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = subprocess.run(cli("lora_caption", "--resume", tmp_path / "cut" / "training_state.pt", "--device", "cpu"),
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    finish(full)
    assert_same(weights(tmp_path / "full" / "training_state.pt", "trainable"),
                weights(tmp_path / "cut" / "training_state.pt", "trainable"))


# 2. Ctrl-C ----------------------------------------------------------------------------------------


def test_ctrl_c_stops_cleanly_and_prints_the_resume_command(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        cli("vit_scratch", "--data-dir", tiny_cifar, "--epochs", "50", "--device", "cpu", "--no-plots", "--out-dir",
            out, *TINY[vit_scratch]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        preexec_fn=default_sigint,
    )
    wait_for(out / "last.pt", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    # the script as it was run (its full path here), so that the line works pasted from any folder
    assert f"resume with: python {ROOT / 'vit_scratch.py'} --resume {out / 'last.pt'}" in err and "Traceback" not in err
    assert weights(out / "last.pt")  # the last checkpoint is kept and loads


def test_ctrl_c_during_a_save_finishes_the_file_first(tmp_path, terminal_sigint):
    def interrupted_write(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives in the middle of the write
        time.sleep(0.1)
        torch.save(obj, f)

    with pytest.raises(KeyboardInterrupt):
        common._atomic_write(tmp_path / "last.pt", lambda f: interrupted_write({"epoch": 3}, f))
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"epoch": 3}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # what it was before the write


def test_a_save_in_a_process_that_ignores_ctrl_c_keeps_ignoring_it(tmp_path):
    """Issue 21 A4: started with SIGINT ignored (nohup, a background job), a save neither turns Ctrl-C on nor
    raises KeyboardInterrupt for it, and leaves the disposition as it found it."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        def interrupted_write(f):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            torch.save({"epoch": 4}, f)

        common._atomic_write(tmp_path / "last.pt", interrupted_write)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"epoch": 4}


# 3. A crash while a checkpoint is written ---------------------------------------------------------


def test_crash_between_write_and_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    common.save_checkpoint({"epoch": 1}, path)
    monkeypatch.setattr(common.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "power cut")))
    with pytest.raises(common.CheckpointWriteError, match="the previous last.pt, if any, is intact"):
        common.save_checkpoint({"epoch": 2}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_full_disk_during_a_save_stops_the_run_and_keeps_the_previous_checkpoint(
    tiny_cifar, tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def disk_fills_on_the_second_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) >= 2:  # epoch 1 wrote last.pt (best.pt is a link to it); epoch 2 runs out of space half-way
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(common.torch, "save", disk_fills_on_the_second_save)
    with pytest.raises(SystemExit) as stop:
        vit_scratch.main(
            ["--data-dir", str(tiny_cifar), "--epochs", "3", "--device", "cpu", "--no-plots", "--out-dir",
             str(tmp_path), *TINY[vit_scratch]]
        )
    monkeypatch.setattr(common.torch, "save", real_save)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "No space left on device" in err and "is intact" in err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["state"]["epoch"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_failed_adapter_save_keeps_the_previous_adapter(tiny_captioner, tmp_path, monkeypatch):
    model, _, _ = lora_caption.load_captioner(str(tiny_captioner), torch.device("cpu"))
    model = lora_caption.add_lora(
        model,
        __import__("argparse").Namespace(
            rank=4, alpha=8, lora_dropout=0.0, targets=lora_caption.DECODER_TARGETS, cross_attention=False
        ),
    )
    common.save_adapter(model, tmp_path)
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(
        type(model), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "disk full"))
    )
    with pytest.raises(common.CheckpointWriteError, match="disk full"):
        common.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# 4. A non-finite loss -------------------------------------------------------------------------------


@SCRIPTS
def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(
    script, tiny_cifar, tmp_path, monkeypatch, capsys):
    real, calls = script.make_step, []

    def poisoned_in_epoch_two(model, *a, **k):  # the step of main()'s loop, NaN weights from epoch 2's first batch
        step = real(model, *a, **k)

        def run(x, y):
            calls.append(1)
            if len(calls) == 10:  # 9 steps an epoch (300 images, batch 32)
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))
            step(x, y)
        return run

    monkeypatch.setattr(script, "make_step", poisoned_in_epoch_two)
    with pytest.raises(SystemExit) as stop:
        script.main(
            ["--data-dir", str(tiny_cifar), "--epochs", "3", "--device", "cpu", "--no-plots", "--out-dir",
             str(tmp_path), *TINY[script]]
        )
    err = capsys.readouterr().err
    assert stop.value.code == 1
    assert "the training loss became nan by step 18 (lr " in err and "try a lower --lr" in err
    assert f"the last checkpoint is {tmp_path / 'last.pt'} (epoch 1)" in err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["state"]["epoch"] == 1


# 5. Foreign checkpoints -----------------------------------------------------------------------------


@SCRIPTS
def test_checkpoint_of_another_configuration_is_a_clear_error(script, tiny_cifar, tmp_path, capsys):
    script.main(
        ["--data-dir", str(tiny_cifar), "--epochs", "1", "--device", "cpu", "--no-plots", "--out-dir", str(tmp_path),
         *TINY[script]]
    )
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    ckpt["args"]["batch_size"] = 32
    if script is vit_scratch:
        ckpt["args"]["embed_dim"] = 64  # flags that no longer describe the saved weights
    else:
        ckpt["args"]["widths"] = [8, 16, 64]
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(SystemExit) as stop:
        script.main(["--resume", str(tmp_path / "edited.pt"), "--data-dir", str(tiny_cifar), "--device", "cpu"])
    err = capsys.readouterr().err
    field = "embed_dim: saved 32, now 64" if script is vit_scratch else "widths: saved [8, 16, 32], now [8, 16, 64]"
    assert (
        stop.value.code == 2 and "its weights do not fit the model its flags and data describe" in err and field in err
    )
    assert err.count("\n") == 1


@SCRIPTS
def test_checkpoint_holding_pickled_objects_is_refused(script, tmp_path, capsys):
    import argparse

    torch.save(
        {"script": script.__name__, "args": argparse.Namespace(epochs=1)}, tmp_path / "evil.pt"
    )  # an object, not plain values
    with pytest.raises(SystemExit):
        script.main(["--resume", str(tmp_path / "evil.pt")])
    assert "not a checkpoint of plain values, refused" in capsys.readouterr().err


def test_lora_refuses_a_vit_checkpoint(tmp_path, capsys):
    torch.save({"script": "vit_scratch"}, tmp_path / "last.pt")
    with pytest.raises(SystemExit):
        lora_caption.main(["--resume", str(tmp_path / "last.pt")])
    assert "written by 'vit_scratch', not by lora_caption.py" in capsys.readouterr().err


# 6. Bad arguments: one line, before any work ----------------------------------------------------------

BAD_ARGS = [(vit_scratch, ["--epochs", "-1"], "--epochs must be positive"),
            (cnn_baseline, ["--batch-size", "0"], "--batch-size must be positive"),
            (vit_scratch, ["--lr", "0"], "--lr must be positive"),
            (cnn_baseline, ["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
            (vit_scratch, ["--device", "mps"], "--device mps, but this PyTorch has no MPS backend"),
            (cnn_baseline, ["--limit-train", "301"], "asked for a subset of 301 images but the split holds 300"),
            (vit_scratch, ["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
            (lora_caption, ["--grad-accum", "0", "--data-dir", "."], "--grad-accum must be positive"),
            (lora_caption, ["--caption", "x.jpg"], "--caption and --merge need --adapter DIR"),
            (clip_zeroshot, ["--batch-size", "0"], "--batch-size must be positive, got 0"),
            (clip_zeroshot, ["--prompts", "nowhere.txt"], "--prompts nowhere.txt: not 'single', 'ensemble' or a file")]
if not torch.cuda.is_available():
    BAD_ARGS.append((vit_scratch, ["--device", "cuda"], "--device cuda, but PyTorch sees no CUDA GPU"))


@pytest.mark.parametrize(
    "script, flags, message", BAD_ARGS, ids=lambda v: v.__name__ if hasattr(v, "__name__") else None
)
def test_bad_arguments_are_one_line(script, flags, message, tiny_cifar, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        script.main(["--data-dir", str(tiny_cifar), "--out-dir", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_lora_training_without_data_dir(capsys):
    with pytest.raises(SystemExit):
        lora_caption.main([])
    assert "training needs --data-dir" in capsys.readouterr().err


@pytest.mark.parametrize("script", [vit_scratch, cnn_baseline, lora_caption], ids=lambda m: m.__name__)
def test_out_dir_that_is_a_file_or_under_a_file(script, tiny_cifar, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(SystemExit) as stop:
            script.main(["--data-dir", str(tiny_cifar), "--out-dir", str(out), "--device", "cpu"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"--out-dir {out}: cannot write there" in err and err.count("\n") == 1
        assert ("(it is a file, not a folder)" if out.name == "file" else f"({tmp_path / 'file'} is a file") in err


def test_out_dir_that_is_not_writable(tiny_cifar, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes (the probe still runs)")
        with pytest.raises(SystemExit):
            vit_scratch.main(["--data-dir", str(tiny_cifar), "--out-dir", str(locked / "run")])
        assert "cannot write there" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


# 7. Bad data --------------------------------------------------------------------------------------


def test_empty_or_partial_imagefolder_trees(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir()
    with pytest.raises(common.DataError, match="has no class folders"):
        common.load_cifar10(tmp_path / "empty", download=False)
    for split, classes in (("train", ["cat", "dog"]), ("test", ["cat"])):
        for c in classes:
            (tmp_path / "partial" / split / c).mkdir(parents=True)
    with pytest.raises(common.DataError, match=r"different class folders: \['dog'\]"):
        common.load_cifar10(tmp_path / "partial", download=False)


def test_non_image_files_are_reported_and_ignored(tiny_cifar, tmp_path):
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(tiny_cifar, tree, ignore=shutil.ignore_patterns(".decoded-*"))
    (tree / "train" / "cat" / "notes.txt").write_text("hello")
    (tree / "test" / "dog" / "Thumbs.db").write_bytes(b"\0")
    logged = []
    data = common.load_cifar10(tree, download=False, log=logged.append)
    assert data.train_x.shape[0] == 300 and data.test_x.shape[0] == 100
    assert logged == [f"ignored 2 non-image file(s) in {tree}: train/cat/notes.txt, test/dog/Thumbs.db"]


def test_truncated_cifar_batch_is_a_clear_error(tmp_path):
    import numpy as np

    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (batches / name).write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}))
    (batches / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b"]}))
    (batches / "data_batch_3").write_bytes((batches / "data_batch_3").read_bytes()[:100])
    with pytest.raises(common.DataError, match="data_batch_3 is unreadable .*delete the folder to re-download"):
        common.load_cifar10(tmp_path, download=False)


# 8. Out of GPU memory (simulated) -------------------------------------------------------------------


@SCRIPTS
def test_out_of_memory_suggests_a_smaller_batch_and_keeps_the_checkpoint(
    script, tiny_cifar, tmp_path, monkeypatch, capsys):
    real = common.TensorLoader.set_epoch  # main()'s loop starts each epoch with it

    def oom_in_epoch_two(loader, epoch):
        if epoch == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(loader, epoch)

    monkeypatch.setattr(common.TensorLoader, "set_epoch", oom_in_epoch_two)
    with pytest.raises(SystemExit) as stop:
        script.main(
            ["--data-dir", str(tiny_cifar), "--epochs", "3", "--device", "cpu", "--no-plots", "--out-dir",
             str(tmp_path), *TINY[script]]
        )
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "out of GPU memory; try a smaller --batch-size" in err and "(epoch 1)" in err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["state"]["epoch"] == 1


def test_clip_out_of_memory_and_ctrl_c(tiny_clip, tiny_cifar, tmp_path, monkeypatch, capsys):
    flags = ["--model", str(tiny_clip), "--data-dir", str(tiny_cifar), "--device", "cpu", "--out-dir", str(tmp_path)]
    for error, code, message in [
        (torch.OutOfMemoryError("CUDA out of memory"), 1, "out of GPU memory; try a smaller --batch-size"),
        (KeyboardInterrupt(), 130, "interrupted; nothing to resume"),
    ]:
        monkeypatch.setattr(clip_zeroshot, "encode_images", lambda *a, e=error, **k: (_ for _ in ()).throw(e))
        with pytest.raises(SystemExit) as stop:
            clip_zeroshot.main(flags)
        err = capsys.readouterr().err
        assert stop.value.code == code and message in err and "resume with" not in err


def test_lora_out_of_memory_suggests_grad_accum(tiny_captioner, tmp_path, monkeypatch, capsys):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(lora_caption, "make_step", oom)  # the first thing training does on the GPU
    with pytest.raises(SystemExit) as stop:
        lora_caption.main(
            ["--model", str(tiny_captioner), "--data-dir", str(TINY_CAPTIONS), "--device", "cpu", "--no-baseline",
             "--out-dir", str(tmp_path)]
        )
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "--batch-size (and a larger --grad-accum" in err and "nothing was saved yet" in err


# 9. A CUDA graph capture that fails: the eager step trains, after one line --------------------------

@pytest.mark.parametrize("error, words", [(AssertionError(), "AssertionError"),  # some torch asserts say nothing
                                          (RuntimeError("boom\nmore"), "RuntimeError: boom")])
@SCRIPTS
def test_a_failing_capture_trains_eagerly_whatever_the_error_says(script, error, words, monkeypatch, capsys):
    cpu = torch.device("cpu")
    args = argparse.Namespace(optimizer="adamw", lr=1e-3, muon_lr=None, weight_decay=0.0, label_smoothing=0.0,
                              grad_clip=1.0)
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    stats, scaler = torch.zeros(2), torch.amp.GradScaler("cpu", enabled=False)
    monkeypatch.setattr(script, "CapturedStep", lambda *a: (_ for _ in ()).throw(error))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # the fallback waits for the GPU: none here
    if script is vit_scratch:
        model = vit_scratch.VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=1)
        step = vit_scratch.make_step(model, vit_scratch.make_optimizers(model, args, cpu, False), scaler, None, args,
                                     stats, data, True, [])
    else:
        model = cnn_baseline.ResidualCNN(widths=(8, 16))
        step = cnn_baseline.make_step(model, cnn_baseline.make_optimizer(model, args, cpu, False), scaler, None, args,
                                      stats, data, torch.contiguous_format, True)
    assert capsys.readouterr().out == f"CUDA graph capture failed ({words}); training eagerly\n"
    step(*data[0])
    assert torch.isfinite(stats).all() and stats[0] > 0
