"""Two new-user trials (helpers trying every script, then the Python APIs, notebooks and the README's commands, on
the CPU): one test per defect they reproduced. Captions longer than the decoder's positions, CLIP's local paths
saved as typed, --adapter on a --backbone run, --compare folding a --backbone run into CLIP's row, --show-attention
given a run folder, a file given as --data-dir; load_adapter and caption_images given a Path, a run folder, floats,
batches or arrays (or what they cannot use), an interrupt in a notebook, the guide's model file run alone."""
import json
import os
from pathlib import Path

import pytest
import torch

import clip_zeroshot
import cnn_baseline
import lora_caption
import vit_scratch
from conftest import TINY_CAPTIONS, one_line_error

CPU = torch.device("cpu")


# captions longer than the decoder's positions: one line before any work, not an IndexError from its embedding -----

def test_caption_lengths_beyond_the_decoders_positions_are_one_line(tiny_captioner, tmp_path, capsys):
    model = lora_caption.load_trained(tiny_captioner).model  # (the API: transformers' bars left as they were)
    positions = model.config.decoder.n_positions
    lora_caption.check_positions(model, {"--max-length": positions, "--max-new-tokens": positions})  # the limit fits
    with pytest.raises(lora_caption.DataError, match=f"--max-length {positions + 1} is longer than the decoder's "
                                                     f"{positions} positions"):
        lora_caption.check_positions(model, {"--max-length": positions + 1})
    train = ["--model", str(tiny_captioner), "--data-dir", str(TINY_CAPTIONS), "--device", "cpu", "--max-steps", "2",
             "--no-baseline", "--no-plots"]
    for flag in ("--max-length", "--max-new-tokens"):
        out = tmp_path / flag.strip("-")
        err = one_line_error(capsys, lambda flag=flag, out=out: lora_caption.main(
            [*train, flag, str(positions + 1), "--out-dir", str(out)]))
        assert f"{flag} {positions + 1} is longer than the decoder's {positions} positions" in err
        assert not out.exists()  # refused before the run folder kept anything
    err = one_line_error(capsys, lambda: lora_caption.main([*train, "--max-length", "1", "--out-dir", str(tmp_path)]))
    assert "--max-length 1 keeps only the end-of-caption token" in err
    image = sorted((TINY_CAPTIONS / "images").iterdir())[0]
    captioner = lora_caption.load_trained(tiny_captioner)
    with pytest.raises(lora_caption.DataError, match=f"max_new_tokens {positions + 1} is longer"):
        lora_caption.caption_images(captioner, image, max_new_tokens=positions + 1)
    err = one_line_error(capsys, lambda: lora_caption.main(["--caption", str(image), "--model", str(tiny_captioner),
                                                            "--max-new-tokens", str(positions + 1)]))
    assert f"--max-new-tokens {positions + 1} is longer" in err


# a file where a data folder belongs: said as such (vit tried a download into it; lora said "no such folder") -------

def test_a_file_given_as_data_dir_is_called_a_file(tiny_captioner, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    err = one_line_error(capsys, lambda: vit_scratch.main(["--data-dir", str(afile), "--device", "cpu",
                                                           "--out-dir", str(tmp_path / "vit")]))
    assert f"--data-dir {afile}: a file, not a folder" in err and "download failed" not in err
    err = one_line_error(capsys, lambda: lora_caption.main(["--model", str(tiny_captioner), "--data-dir", str(afile),
                                                            "--device", "cpu", "--out-dir", str(tmp_path / "lora")]))
    assert f"--data-dir {afile}: a file, not a folder" in err


# --show-attention given a run folder draws into that folder, as given its best.pt --------------------------------

def test_show_attention_given_a_run_folder_draws_into_it(tiny_cifar, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    vit_scratch.main(["--data-dir", str(tiny_cifar), "--device", "cpu", "--max-steps", "1", "--embed-dim", "16",
                      "--hidden-dim", "16", "--num-heads", "2", "--num-layers", "1", "--batch-size", "64", "--no-plots",
                      "--no-progress", "--out-dir", str(runs / "vit")])
    monkeypatch.chdir(tmp_path)
    path = vit_scratch.main(["--show-attention", "runs/vit", "--data-dir", str(tiny_cifar), "--device", "cpu"])
    assert path is not None and path.resolve() == (runs / "vit" / "attention.png").resolve() and path.exists()
    assert not (runs / "attention.png").exists()


# --compare: a --backbone run (and an --adapter evaluation) is a row of its own, not CLIP's LoRA row -------------

def test_compare_gives_a_backbone_run_a_row_of_its_own(tmp_path, capsys):
    def summary(name, mtime, **fields):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps({"script": "clip_zeroshot", "params": 1000, "test_acc": 0.5,
                                                         "finetune": "lora", **fields}))
        os.utime(folder / "summary.json", (mtime, mtime))
    summary("clip-lora", 1_000, args={"backbone": None})
    summary("vit-lora", 2_000, args={"backbone": "google/vit-base-patch16-224-in21k"})  # newer
    summary("old-summary", 500)  # written before summaries held their args: CLIP's tower, as before
    summary("adapter-eval", 3_000, args={"backbone": None}, adapter="clip-lora/adapter", epochs=0)  # newest
    rows = cnn_baseline.main(["--compare", str(tmp_path)]).splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == ["| clip_zeroshot (lora)", "| clip_zeroshot (lora, adapter)",
                                                     "| clip_zeroshot (lora, backbone)"]
    assert rows[0].endswith(f"{tmp_path / 'clip-lora'} |") and rows[2].endswith(f"{tmp_path / 'vit-lora'} |")


# CLIP's local --model (and --prompts file) saved as absolute paths: a resume and --adapter work from any folder -----

def test_clip_saves_local_paths_whole_so_a_resume_works_from_another_folder(tiny_clip, tiny_cifar, tmp_path,
                                                                            monkeypatch):
    templates = tmp_path / "prompts.txt"
    templates.write_text("a photo of a {}.\n")
    monkeypatch.chdir(tiny_clip.parent)
    flags = ["--data-dir", str(tiny_cifar), "--device", "cpu", "--finetune", "lora", "--rank", "2", "--batch-size",
             "32", "--max-steps", "2", "--no-plots", "--no-progress"]
    clip_zeroshot.main(["--model", f"./{tiny_clip.name}", "--prompts", os.path.relpath(templates), *flags,
                        "--out-dir", str(tmp_path / "run")])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == str(tiny_clip.resolve()) and config["prompts"] == str(templates.resolve())
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_clip.resolve())
    monkeypatch.chdir(tmp_path)
    summary = clip_zeroshot.main(["--resume", "run", "--max-steps", "3", "--no-progress", "--prompts", "prompts.txt"])
    assert summary["steps"] == 3  # the same file typed again, relative to another folder, is the same flag
    summary = clip_zeroshot.main(["--adapter", "run/adapter", "--data-dir", str(tiny_cifar), "--device", "cpu",
                                  "--no-plots", "--no-progress", "--out-dir", str(tmp_path / "evaluated")])
    assert summary["adapter"] == str((tmp_path / "run" / "adapter").resolve())


# A fourth trial (the Python APIs, notebooks, torchrun, the README's commands) ---------------------------------------

def test_load_adapter_takes_paths_a_run_folder_and_refuses_what_does_not_fit_in_one_line(tiny_clip, tiny_cifar,
                                                                                         tiny_captioner, tmp_path):
    run = tmp_path / "run"
    clip_zeroshot.main(["--model", str(tiny_clip), "--data-dir", str(tiny_cifar), "--device", "cpu", "--finetune",
                        "lora", "--rank", "2", "--batch-size", "32", "--max-steps", "1", "--no-plots", "--no-progress",
                        "--out-dir", str(run)])
    model = clip_zeroshot.load_adapter(tiny_clip, run, num_classes=10)  # a Path base, the run's folder
    _, _, processor = clip_zeroshot.load_clip_parts(tiny_clip)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = clip_zeroshot.load_adapter(str(tiny_clip), str(run / "adapter"), 10)(
        clip_zeroshot.TensorPreprocess(processor, CPU)(images))
    assert torch.equal(model(clip_zeroshot.TensorPreprocess(processor, CPU)(images)), expected)
    captioner_adapter = tmp_path / "captioner"
    lora_caption.main(["--model", str(tiny_captioner), "--data-dir", str(TINY_CAPTIONS), "--device", "cpu",
                       "--batch-size", "10", "--max-steps", "1", "--eval-images", "2", "--no-baseline", "--no-plots",
                       "--out-dir", str(captioner_adapter)])
    for call, message in [
        (lambda: clip_zeroshot.load_adapter(tiny_clip, run, num_classes=5), "not the 5 x 16 head"),
        (lambda: clip_zeroshot.load_adapter(tiny_clip, captioner_adapter / "adapter", 10), "does not fit CLIP's"),
        (lambda: clip_zeroshot.load_adapter(tiny_clip, run, 10, device="cuda:99"), "device='cuda:99': PyTorch sees"),
        (lambda: clip_zeroshot.load_adapter(tiny_clip, run, 10, device="tpu"), "device='tpu': not a device"),
    ]:
        with pytest.raises(clip_zeroshot.DataError, match=message):
            call()
    # --adapter alone reads the data its run trained on (the README's command has no --data-dir), where it still
    # is, and only a CLIP run's: not the captions of a captioner's run, nor a folder that has moved
    summary = clip_zeroshot.main(["--adapter", str(run / "adapter"), "--device", "cpu", "--no-plots", "--no-progress",
                                  "--out-dir", str(tmp_path / "evaluated")])
    assert str(tiny_cifar.resolve()) in summary["dataset"]
    default = str(Path("./data").resolve())
    assert clip_zeroshot.experiment_args(["--adapter", str(captioner_adapter / "adapter")])[0].data_dir == default
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data_dir": str(tmp_path / "moved")}))
    assert clip_zeroshot.experiment_args(["--adapter", str(run / "adapter")])[0].data_dir == default


def test_caption_images_takes_floats_batches_and_arrays_and_refuses_the_rest_in_one_line(tiny_captioner, tmp_path):
    import numpy as np
    from PIL import Image
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    captioner = lora_caption.load_trained(tiny_captioner, device="auto")
    assert hf_logging.is_progress_bar_enabled() == bars  # a notebook's transformers bars as they were (they went off)
    image = sorted((TINY_CAPTIONS / "images").iterdir())[0]
    x = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1)  # uint8 [3, H, W]
    expected = lora_caption.caption_images(captioner, x, max_new_tokens=5)
    assert lora_caption.caption_images(captioner, x.float() / 255, max_new_tokens=5) == expected
    assert lora_caption.caption_images(captioner, torch.stack([x, x]), max_new_tokens=5) == expected * 2
    assert lora_caption.caption_images(captioner, x.permute(1, 2, 0).numpy(), max_new_tokens=5) == expected
    gray = x[0]
    assert lora_caption.caption_images(captioner, [gray, gray.numpy(), gray.numpy() / 255.0],
                                       max_new_tokens=np.int64(5)) == lora_caption.caption_images(
        captioner, gray[None].expand(3, -1, -1), max_new_tokens=5) * 3  # grayscale, as a float array too
    overshoot = (x.float() / 255 * 1.04 - 0.02)  # a resize's ringing, a little outside [0, 1]
    assert len(lora_caption.caption_images(captioner, overshoot, max_new_tokens=5)) == 1
    (tmp_path / "notes.txt").write_text("not an image")
    for bad, message in [(x.permute(1, 2, 0), r"it looks like \[H, W, C\]"), (torch.cat([x, x[:1]]), "RGBA"),
                         ((x.float() - 128) / 64, r"values in \[0, 1\]"), (x.long(), "torch.int64"),
                         (x[0].numpy().astype(np.int32), "torch.int32"),
                         (tmp_path / "gone.jpg", "no such file"), (tmp_path, "a folder, not an image file"),
                         (tmp_path / "notes.txt", r"cannot read it as an image \(UnidentifiedImageError\)")]:
        with pytest.raises(lora_caption.DataError, match=message):
            lora_caption.caption_images(captioner, bad)
    for name in ("num_beams", "max_new_tokens", "batch_size"):
        with pytest.raises(lora_caption.DataError, match=f"{name}=0; pass a whole number"):
            lora_caption.caption_images(captioner, x, **{name: 0})
    with pytest.raises(lora_caption.DataError, match="device='tpu': not a device"):
        lora_caption.load_trained(tiny_captioner, device="tpu")


def test_an_interrupt_in_a_notebook_is_one_line_with_the_cells_way_to_resume(tmp_path, monkeypatch):
    import common
    last = tmp_path / "last.pt"
    last.write_bytes(b"saved")
    monkeypatch.setattr(common, "in_notebook", lambda: True)
    with pytest.raises(common.RunFailed) as stop:
        with common.one_line_errors("vit_scratch") as report:
            report.resume = last
            report.saved = lambda: f"the last checkpoint is {last} (epoch 2)"
            raise KeyboardInterrupt
    assert stop.value.code == 130 and "\n" not in str(stop.value)
    assert str(stop.value).endswith(f'resume with vit_scratch.main(["--resume", {str(last)!r}])')


def test_the_guides_model_file_run_alone_says_what_it_is_in_one_line():
    import subprocess
    import sys
    from conftest import ROOT
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "guide_vit.py"), "--help"], capture_output=True,
                          text=True, timeout=120, cwd="/")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "bench_vit_step.py --help" in done.stderr


# One capture fallback for every script (common.capture_or_none, the captioner's): it names the cause hidden behind
# torch's follow-up "during capture" error, and stops in one line where the capture broke CUDA's random generator --

class FailingCapture:
    def __init__(self, *args, **kwargs):
        try:
            raise ValueError("cannot read a value back while a stream is captured")
        except ValueError:
            raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904 (as torch)


def vit_setup():
    import argparse
    torch.manual_seed(0)
    model = vit_scratch.VisionTransformer(embed_dim=16, hidden_dim=16, num_heads=2, num_layers=1, dropout=0.0)
    args = argparse.Namespace(optimizer="muon", lr=1e-3, muon_lr=0.01, muon_momentum=0.95, weight_decay=0.05,
                              label_smoothing=0.1, grad_clip=1.0, ema=0.0)
    optimizers = vit_scratch.make_optimizers(model, args, CPU, capture=False)
    stats = torch.zeros(2)
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    make = lambda capture: vit_scratch.make_step(model, optimizers, torch.amp.GradScaler("cpu", enabled=False), None,
                                                 args, stats, [batch], capture, [], None)
    return model, make, batch


def cnn_setup():
    import argparse
    torch.manual_seed(0)
    model = cnn_baseline.ResidualCNN(widths=[4, 8], num_classes=10)
    args = argparse.Namespace(lr=1e-3, weight_decay=0.05, label_smoothing=0.1, grad_clip=1.0)
    optimizer = cnn_baseline.make_optimizer(model, args, CPU, capture=False)
    stats = torch.zeros(2)
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    make = lambda capture: cnn_baseline.make_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), None,
                                                  args, stats, [batch], torch.contiguous_format, capture)
    return model, make, batch


def clip_setup():
    import argparse
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 10)
    args = argparse.Namespace(lr=1e-3, weight_decay=0.1, grad_clip=1.0)
    optimizer = clip_zeroshot.make_optimizer(model, args, CPU, capture=False)
    stats = torch.zeros(2)
    batch = (torch.randn(4, 12), torch.randint(0, 10, (4,)))
    make = lambda capture: clip_zeroshot.make_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                                   lambda x: x, None, args, stats, batch, capture)
    return model, make, batch


@pytest.mark.parametrize("script, setup", [(vit_scratch, vit_setup), (cnn_baseline, cnn_setup),
                                           (clip_zeroshot, clip_setup)], ids=["vit", "cnn", "clip"])
def test_a_failed_capture_names_its_cause_and_trains_exactly_as_the_eager_step(script, setup, monkeypatch, capsys):
    model, make, batch = setup()
    expected_model, expected_make, _ = setup()
    expected_make(False)(*batch)  # the plain eager step, from the same start
    monkeypatch.setattr(script, "CapturedStep", FailingCapture)
    step = make(True)
    assert capsys.readouterr().out == ("CUDA graph capture failed (ValueError: cannot read a value back while a "
                                       "stream is captured); training eagerly\n")
    step(*batch)
    for got, expected in zip(model.state_dict().values(), expected_model.state_dict().values()):
        assert torch.equal(got, expected)
    import common
    monkeypatch.setattr(common, "cuda_generator_works", lambda device: False)
    with pytest.raises(SystemExit) as stop, common.one_line_errors(script.__name__):
        make(True)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1 and "run the same command again with --eager" in err


def test_a_captioner_resumes_with_its_local_model_typed_again_from_another_folder(tiny_captioner, tmp_path,
                                                                               monkeypatch):
    monkeypatch.chdir(tiny_captioner.parent)
    flags = ["--data-dir", str(TINY_CAPTIONS), "--device", "cpu", "--batch-size", "10", "--eval-images", "2",
             "--no-baseline", "--no-plots"]
    lora_caption.main(["--model", f"./{tiny_captioner.name}", *flags, "--max-steps", "2", "--out-dir",
                       str(tmp_path / "run")])
    monkeypatch.chdir(tiny_captioner.parent.parent)
    typed = f"{tiny_captioner.parent.name}/{tiny_captioner.name}"  # the same folder, typed from elsewhere
    summary = lora_caption.main(["--resume", str(tmp_path / "run"), "--model", typed, "--max-steps", "3"])
    assert summary["steps"] == 3


# A fifth trial (this session's changes, tried as a new user) -----------------------------------------------------

def test_a_run_that_fails_leaves_no_empty_runs_folder_behind(tmp_path, monkeypatch, capsys):
    """The default folder runs/<script>/<time> and a nested --out-dir a/b/c: a run refused at its data leaves none of
    the folders it made (runs/ and runs/vit_scratch/ were left, empty); a folder that was there stays."""
    monkeypatch.chdir(tmp_path)
    flags = ["--device", "cpu", "--data-dir", str(tmp_path / "none"), "--no-download"]
    one_line_error(capsys, lambda: vit_scratch.main(flags))
    one_line_error(capsys, lambda: cnn_baseline.main([*flags, "--out-dir", "a/b/c"]))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "runs" / "vit_scratch" / "earlier").mkdir(parents=True)
    one_line_error(capsys, lambda: vit_scratch.main(flags))
    assert [p.name for p in (tmp_path / "runs" / "vit_scratch").iterdir()] == ["earlier"]


def test_the_resume_line_names_the_script_as_it_was_run(monkeypatch):
    import common
    monkeypatch.setattr("sys.argv", ["../course dir/vit_scratch.py", "--epochs", "3"])
    assert common.script_path("vit_scratch") == "'../course dir/vit_scratch.py'"  # pasted from the same folder
    monkeypatch.setattr("sys.argv", ["/usr/lib/python3/site-packages/ipykernel_launcher.py", "-f", "k.json"])
    assert common.script_path("vit_scratch") == "vit_scratch.py"
