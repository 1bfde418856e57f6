"""What a fresh install and a second new-user trial found (issue 21), one test per class of defect: emulated bf16,
two runs in one folder, odd files in an ImageFolder tree, a full disk while drawing, resume after the data moved,
messages that printed internal values, resume rules, --compare, flags that did nothing, CIFAR pickles of protocol 5.
(The captioner's and CLIP's cases are in test_lora_trials.py, test_lora.py and test_clip*.py.)"""

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import clip_zeroshot
import cnn_baseline
import common
import lora_caption
import vit_scratch
from conftest import ROOT, TINY_CAPTIONS, one_line_error

TINY = {
    vit_scratch: ["--embed-dim", "32", "--hidden-dim", "64", "--num-heads", "4", "--num-layers", "2", "--batch-size",
                  "32"],
    cnn_baseline: ["--widths", "8", "16", "32", "--batch-size", "32"],
}
SCRIPTS = pytest.mark.parametrize("script", list(TINY), ids=lambda m: m.__name__)


def train(script, data, out, *flags, plots=False):
    return script.main(
        ["--data-dir", str(data), "--device", "cpu", *([] if plots else ["--no-plots"]), "--out-dir", str(out),
         "--limit-train", "64", "--limit-test", "50", *TINY[script], *flags]
    )


# A5. bf16 only where the GPU has it natively -------------------------------------------------------------


@pytest.mark.parametrize("script", [vit_scratch, cnn_baseline, clip_zeroshot, lora_caption], ids=lambda m: m.__name__)
def test_a_t4_trains_in_fp16_and_an_ampere_gpu_in_bf16(script, monkeypatch):
    """A T4 (compute capability 7.5) reports bf16 as supported (emulated): every script must still pick fp16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 answers
    for capability, expected in [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert script.amp_dtype_for(torch.device("cuda", 0)) == expected, capability
    assert script.amp_dtype_for(torch.device("cpu")) is None


# B1. one process per run folder ---------------------------------------------------------------------------


def hold(folder):
    """Takes the run folder's lock as a running script does (a separate open file: flock refuses it to a second)."""
    report = SimpleNamespace(script="someone", out_dir=None, created_out_dir=False, lock=None)
    common.prepare_out_dir(folder, report, resuming=True)
    return report


@pytest.mark.parametrize("script", [vit_scratch, cnn_baseline, clip_zeroshot, lora_caption], ids=lambda m: m.__name__)
def test_a_second_run_into_a_folder_in_use_is_refused(script, tiny_cifar, tiny_clip, tiny_captioner, tmp_path,
                                                      capsys):
    holder = hold(tmp_path / "run")
    flags = {vit_scratch: ["--data-dir", str(tiny_cifar), *TINY[vit_scratch]],
             cnn_baseline: ["--data-dir", str(tiny_cifar), *TINY[cnn_baseline]],
             clip_zeroshot: ["--data-dir", str(tiny_cifar), "--model", str(tiny_clip)],
             lora_caption: ["--data-dir", str(TINY_CAPTIONS), "--model", str(tiny_captioner)]}[script]
    err = one_line_error(capsys, lambda: script.main([*flags, "--device", "cpu", "--out-dir", str(tmp_path / "run")]))
    assert f"--out-dir {tmp_path / 'run'} is in use by a run still going (process {os.getpid()}" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing written by the refused run
    holder.lock.close()


def test_the_lock_is_released_when_main_returns(tiny_cifar, tmp_path):
    """main() in a notebook: the folder is free again afterwards (a resume in the same process works)."""
    train(vit_scratch, tiny_cifar, tmp_path, "--epochs", "1")
    summary = vit_scratch.main(["--resume", str(tmp_path), "--epochs", "2", "--device", "cpu", "--no-plots"])
    assert summary["epochs"] == 2
    hold(tmp_path).lock.close()  # free: taking it does not raise


def test_a_failed_start_in_a_new_folder_leaves_no_folder(tiny_cifar, tmp_path, capsys):
    one_line_error(capsys, lambda: train(vit_scratch, tiny_cifar, tmp_path / "new", "--limit-train", "100000"))
    assert not (tmp_path / "new").exists()


# B3. links in an ImageFolder tree that lead nowhere --------------------------------------------------------


def test_link_loops_and_dangling_links_are_reported_and_skipped(tiny_cifar, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(tiny_cifar, tree, ignore=shutil.ignore_patterns(".decoded-*"))
    os.symlink("self.jpg", tree / "train" / "cat" / "self.jpg")  # points to itself
    os.symlink("gone.jpg", tree / "train" / "dog" / "dangling.jpg")
    lines = []
    data = common.load_cifar10(tree, download=False, log=lines.append)
    assert len(data.train_y) == 300 and len(data.test_y) == 100  # every real image, none of the links
    assert lines == [f"skipped 2 broken link(s) in {tree}: train/cat/self.jpg (link loop), "
                     f"train/dog/dangling.jpg (dangling link)"]


# B4. a full disk while the pictures are drawn ----------------------------------------------------------


@SCRIPTS
def test_a_full_disk_while_drawing_keeps_the_results_and_says_so_in_one_line(script, tiny_cifar, tmp_path,
                                                                              monkeypatch, capsys):
    mkstemp = common.tempfile.mkstemp

    def full_for_pictures(*a, **k):
        if k.get("prefix", "").endswith(".png."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return mkstemp(*a, **k)

    monkeypatch.setattr(common.tempfile, "mkstemp", full_for_pictures)
    with pytest.raises(SystemExit) as stop:
        train(script, tiny_cifar, tmp_path, "--epochs", "1", plots=True)
    out, err = capsys.readouterr()
    assert stop.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "could not write" in err and ".png (No space left on device)" in err and "free some space" in err
    assert "test accuracy" in out and "per class:" in out  # the results were printed before the pictures
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 1
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*.tmp"))


def test_every_output_write_reports_a_full_disk_as_an_output_error(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    common.write_json(tmp_path / "summary.json", {"old": 1})
    monkeypatch.setattr(common.os, "fsync", full)
    with pytest.raises(common.OutputWriteError, match="could not write .*summary.json .*the previous summary.json"):
        common.write_json(tmp_path / "summary.json", {"new": 2})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"old": 1}
    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(common.OutputWriteError, match="could not add a line to"):
        common.append_jsonl(tmp_path / "metrics.jsonl", {"epoch": 1})


def test_a_metrics_line_cut_short_is_left_out(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    assert common.read_jsonl(tmp_path / "metrics.jsonl") == [{"epoch": 1}, {"epoch": 2}]


# B5. one decoder: 16-bit PNGs and EXIF orientation in an ImageFolder tree ------------------------------------


def test_the_imagefolder_decoder_scales_16_bit_images_and_applies_exif_rotation(tmp_path):
    from PIL import Image
    deep = np.full((32, 32), 32896, dtype=np.uint16)  # 50% grey in 16 bits = 128 in 8 bits
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert np.unique(common._decode_one(tmp_path / "deep.png", 32)).tolist() == [128]  # convert("RGB") gave 255
    tall = np.zeros((32, 16, 3), dtype=np.uint8)
    tall[:, :8] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(tall).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    shown = common._decode_one(tmp_path / "rotated.jpg", 32)  # (3, 32, 32) after rotation + resize
    assert shown[:, :8].mean() > 200 and shown[:, -8:].mean() < 50  # upright: white on top, dark below


# B9. --resume after the run's data folder moved ------------------------------------------------------------


@SCRIPTS
def test_resume_after_the_data_moved_says_so_and_downloads_nothing(script, tiny_cifar, tmp_path, capsys):
    tree = tmp_path / "data" / "cifar"
    shutil.copytree(tiny_cifar, tree, ignore=shutil.ignore_patterns(".decoded-*"))
    train(script, tree, tmp_path / "run", "--epochs", "1")
    shutil.move(tmp_path / "data", tmp_path / "moved")
    err = one_line_error(capsys, lambda: script.main(["--resume", str(tmp_path / "run"), "--epochs", "2"]))
    assert f"the run's data folder {tree} no longer holds CIFAR-10" in err and "pass --data-dir" in err
    assert not (tmp_path / "data").exists()  # no download started into the old place
    summary = script.main(["--resume", str(tmp_path / "run"), "--epochs", "2", "--data-dir",
                           str(tmp_path / "moved" / "cifar")])
    assert summary["epochs"] == 2


def test_a_failed_download_leaves_no_folder_behind(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(root, **k):
        os.makedirs(os.path.join(root, "cifar-10-batches-py.partial"))
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(common.DataError, match="the download failed"):
        common.load_cifar10(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []


# B11-B14. resume: flags as typed, one extension rule, config.json in force, folders and damaged files ----------


def test_resume_messages_show_flags_as_typed(tiny_cifar, tmp_path, capsys):
    vit_scratch.main(["--data-dir", str(tiny_cifar), "--device", "cpu", "--no-plots", "--out-dir", str(tmp_path),
                      "--epochs", "1", *TINY[vit_scratch]])  # no --limit-train, the recipe's --tta
    err = one_line_error(capsys, lambda: vit_scratch.main(["--resume", str(tmp_path), "--no-tta"]))
    assert "--no-tta differs from the checkpoint's --tta: a resumed run keeps its settings" in err
    err = one_line_error(capsys, lambda: vit_scratch.main(["--resume", str(tmp_path), "--limit-train", "64"]))
    assert "--limit-train 64 differs from the checkpoint's (no --limit-train)" in err
    err = one_line_error(capsys, lambda: vit_scratch.main(["--resume", str(tmp_path), "--eager", "--lr", "1"]))
    assert "--lr 1.0 differs from the checkpoint's --lr 0.001" in err


@SCRIPTS
def test_a_resumed_run_can_grow_but_not_shrink(script, tiny_cifar, tmp_path, capsys):
    train(script, tiny_cifar, tmp_path, "--epochs", "3", "--max-steps", "2")
    err = one_line_error(capsys, lambda: script.main(["--resume", str(tmp_path), "--max-steps", "1"]))
    assert "--max-steps 1 is below the run's --max-steps 2: a resumed run can be extended, not shortened" in err
    err = one_line_error(capsys, lambda: script.main(["--resume", str(tmp_path), "--epochs", "2"]))
    assert "--epochs 2 is below the run's --epochs 3" in err
    summary = script.main(["--resume", str(tmp_path), "--max-steps", "4", "--epochs", "4"])
    assert summary["steps"] == 4
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["epochs"] == 4 and config["max_steps"] == 4  # B13: the flags in force, not the first start's
    assert config == json.loads((tmp_path / "summary.json").read_text())["args"]


def test_resume_takes_a_run_folder_and_names_a_damaged_checkpoint(tiny_cifar, tmp_path, capsys):
    train(cnn_baseline, tiny_cifar, tmp_path / "run", "--epochs", "1")
    err = one_line_error(capsys, lambda: cnn_baseline.main(["--resume", str(tmp_path)]))
    assert f"--resume {tmp_path}: this folder holds no last.pt or training_state.pt" in err
    summary = cnn_baseline.main(["--resume", str(tmp_path / "run"), "--epochs", "2"])  # the folder: its last.pt
    assert summary["epochs"] == 2
    whole = (tmp_path / "run" / "last.pt").read_bytes()
    assert zipfile.is_zipfile(tmp_path / "run" / "last.pt")
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    err = one_line_error(capsys, lambda: cnn_baseline.main(["--resume", str(tmp_path / "cut.pt")]))
    assert f"--resume {tmp_path / 'cut.pt'}: truncated or damaged" in err and "not a PyTorch" not in err


# B15. an --out-dir holding another script's run --------------------------------------------------------------


def test_an_out_dir_holding_another_scripts_run_suggests_no_resume(tiny_cifar, tmp_path, capsys):
    train(cnn_baseline, tiny_cifar, tmp_path, "--epochs", "1")
    err = one_line_error(capsys, lambda: train(vit_scratch, tiny_cifar, tmp_path, "--epochs", "1"))
    assert f"--out-dir {tmp_path} holds a cnn_baseline.py run" in err and "--resume" not in err


# B16. --compare -------------------------------------------------------------------------------------------


def test_compare_shows_the_data_a_captioner_row_and_no_impossible_numbers(tmp_path, capsys):
    runs = {"vit": {"script": "vit_scratch", "params": 3_195_146, "epochs": 10, "test_acc": 0.79,
                    "train_seconds": float("nan"), "images_per_second": -5.0, "peak_memory_mb": 1234.0,
                    "device_name": "cpu", "dataset": "CIFAR-10 (imagefolder: /data/a)"},
            "cap": {"script": "lora_caption", "params": 241_555_200, "epochs": 2.667, "test_acc": None,
                    "bleu4": 0.12345, "train_seconds": 30.0, "images_per_second": None, "pairs_per_second": 40.0,
                    "peak_memory_mb": 900.0, "device_name": "cpu", "dataset": "captions (/data/flickr)"}}
    for name, summary in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    rows = cnn_baseline.main(["--compare", str(tmp_path)]).splitlines()
    assert rows[2] == (f"| lora_caption | captions (/data/flickr) | 241.56M | - | 2.667 | BLEU-4 0.1235 | 30.0 | "
                       f"40 pairs | 900 | cpu | {tmp_path / 'cap'} |")
    assert rows[3] == (f"| vit_scratch | CIFAR-10 (imagefolder: /data/a) | 3.20M | - | 10 | acc 79.00% | - | - | "
                       f"1,234 | cpu | {tmp_path / 'vit'} |")
    clip = {"script": "clip_zeroshot", "params": 151_277_313, "test_acc": 0.1, "device_name": "cpu", "dataset": "d"}
    for name, summary in {"zs": clip, "probe": {**clip, "linear_probe": {"test_acc": 0.3}}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    table = cnn_baseline.main(["--compare", str(tmp_path)])  # a sixth trial: the probe's run showed its zero-shot
    assert "| clip_zeroshot (linear probe) | d | 151.28M | - | - | acc 30.00% (zero-shot 10.00%) |" in table
    assert "| clip_zeroshot | d | 151.28M | - | - | acc 10.00% |" in table  # the zero-shot run keeps its row
    one = cnn_baseline.main(["--compare", str(tmp_path / "vit" / "summary.json")]).splitlines()
    assert len(one) == 3 and one[2] == rows[3]  # a summary.json itself is taken too
    err = one_line_error(capsys, lambda: cnn_baseline.main(["--compare", str(tmp_path / "nothing")]))
    assert "no such folder or summary.json" in err


# B24, B25. flags that would do nothing; numbers that cannot be right --------------------------------------------


def test_the_guide_recipe_with_muon_takes_the_fast_recipes_muon_rate(tiny_cifar, tmp_path):
    args, _ = vit_scratch.experiment_args(["--recipe", "guide", "--optimizer", "muon"])
    assert args.muon_lr == vit_scratch.RECIPES["fast"]["muon_lr"] and args.lr == 3e-4


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "adamw", "--muon-lr", "0.05"], "--muon-lr has no effect with --optimizer adamw"),
    (["--recipe", "guide", "--muon-lr", "0.05"], "--muon-lr has no effect with --optimizer adamw (recipe guide)"),
    (["--recipe", "guide", "--warmup", "0.1"], "--warmup has no effect with --schedule epoch"),
    (["--show-attention", "x.pt", "--epochs", "3"], "--epochs has no effect with --show-attention"),
])
def test_vit_refuses_a_flag_that_has_no_effect(argv, message, capsys):
    assert message in one_line_error(capsys, lambda: vit_scratch.main(argv))


@SCRIPTS
def test_compile_mode_is_gone_and_cnn_has_no_compile(script, capsys):
    """Issue 22: --compile-mode (both scripts) and the CNN's --compile were never measured to pay: removed."""
    err = one_line_error(capsys, lambda: script.main(["--compile-mode", "default"]))
    assert "unrecognized arguments: --compile-mode default" in err
    err = one_line_error(capsys, lambda: cnn_baseline.main(["--compile"]))
    assert "unrecognized arguments: --compile" in err


def test_compare_refuses_a_training_flag_beside_it(tmp_path, capsys):
    err = one_line_error(capsys, lambda: cnn_baseline.main(["--compare", str(tmp_path), "--epochs", "5"]))
    assert "--epochs has no effect with --compare (it only prints the table); drop it" in err


@SCRIPTS
def test_fewer_training_images_than_classes_is_refused(script, tiny_cifar, tmp_path, capsys):
    err = one_line_error(capsys, lambda: train(script, tiny_cifar, tmp_path, "--limit-train", "5"))
    assert "--limit-train 5: fewer images than the 10 classes, so some class would have none; use at least 10" in err


# B26. torch.compile on a CPU ---------------------------------------------------------------------------------


def test_compile_on_a_cpu_prints_no_cuda_home_warning():
    probe = ("import common, torch; common.quiet_compile_on_cpu(); "
             "print(torch.compile(lambda x: x + 1)(torch.ones(2)).tolist())")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0 and proc.stdout.strip() == "[2.0, 2.0]", proc.stderr
    assert "CUDA_HOME" not in proc.stderr and "No CUDA runtime" not in proc.stderr, proc.stderr
    record = common.logging.LogRecord("torch.utils.cpp_extension", 30, "", 0,
                                      "No CUDA runtime is found, using CUDA_HOME='/usr/local'", None, None)
    assert not common.no_cuda_home_warning(record)  # the filter drops exactly this message
    record.msg = "something else"
    assert common.no_cuda_home_warning(record)


# C2. CIFAR batches pickled with protocol 5 -------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [4, 5])
def test_cifar_batches_of_newer_pickle_protocols_load(protocol, tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    rng = np.random.default_rng(0)
    data = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data[name] = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        (batches / name).write_bytes(pickle.dumps({"data": data[name], "labels": [0, 1, 2, 3]}, protocol=protocol))
    (batches / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b", "c", "d"]}, protocol=protocol))
    loaded = common.load_cifar10(tmp_path, download=False)
    assert torch.equal(loaded.test_x, torch.from_numpy(data["test_batch"].reshape(4, 3, 32, 32)))
    assert loaded.classes == ["a", "b", "c", "d"] and loaded.train_x.shape == (20, 3, 32, 32)


# Review gaps of issue 21 closed ------------------------------------------------------------------------------


def test_sync_bn_in_one_process_is_refused(tiny_cifar, tmp_path, capsys):
    err = one_line_error(capsys, lambda: train(cnn_baseline, tiny_cifar, tmp_path, "--sync-bn"))
    assert "--sync-bn has no effect in one process" in err


def test_muon_orthogonalises_in_fp16_where_bf16_is_not_native(monkeypatch):
    """A5 for the optimizer too: on a T4 Muon's Newton-Schulz steps run in fp16, on Ampere and later in bf16."""
    seen = []
    real_to = torch.Tensor.to

    def recording_to(self, *a, **k):
        seen.extend(x for x in a if isinstance(x, torch.dtype))
        return real_to(self, *a, **k)

    G = torch.randn(2, 8, 16)
    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    monkeypatch.setattr(vit_scratch, "amp_dtype_for", lambda device: torch.float16)  # what a T4 gets
    assert vit_scratch.newton_schulz(G).dtype == torch.float16 and seen == [torch.float16]
    monkeypatch.setattr(vit_scratch, "amp_dtype_for", lambda device: torch.bfloat16)
    assert vit_scratch.newton_schulz(G).dtype == torch.bfloat16
    monkeypatch.setattr(vit_scratch, "amp_dtype_for", lambda device: None)  # CPU: bf16 as before
    assert vit_scratch.newton_schulz(G).dtype == torch.bfloat16


def test_the_one_decoder_takes_an_open_image_too(tmp_path):
    """B5: lora_caption's API passes open PIL images to common.open_rgb; it converts them as it converts files."""
    from PIL import Image
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert np.unique(np.asarray(common.open_rgb(im))).tolist() == [128]
    assert np.unique(np.asarray(common.open_rgb(tmp_path / "deep.png"))).tolist() == [128]
