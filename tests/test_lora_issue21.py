"""lora_caption.py's part of issue 21, one test (or a few) per item: resume on other data (B2), a folder of another
model (B6) or an adapter of another model (B7), transformers' attention-mask warning (B8), table paths relative to
the table (B18), --no-baseline's example lines (B19), --help's defaults (B20), --caption with unreadable files or
a folder (B22), flags that a mode ignores (B24), non-finite numbers (B25), config.json on resume (B13), no Hub
kernels (A2)."""
import argparse
import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import common
import lora_caption
from conftest import TINY_CAPTIONS, one_line_error

CPU = torch.device("cpu")
IMAGES = sorted((TINY_CAPTIONS / "images").iterdir())


def train(model, out, *more, data=TINY_CAPTIONS):
    """A 2-step run: 100 training pairs, 10 a step."""
    return lora_caption.main(["--model", str(model), "--data-dir", str(data), "--device", "cpu", "--out-dir", str(out),
                              "--batch-size", "10", "--max-steps", "2", "--eval-images", "2", "--no-plots", *more])


# B2: --resume with a --data-dir that holds other captions or images --------------------------------------------

def test_issue21_B2_resume_refuses_other_caption_data_and_takes_a_copy_of_the_same(tiny_captioner, tmp_path, capsys):
    train(tiny_captioner, tmp_path / "run", "--no-baseline")
    state = tmp_path / "run" / "training_state.pt"
    assert len(torch.load(state, weights_only=True)["data_fingerprint"]) == 16
    other = tmp_path / "other"
    shutil.copytree(TINY_CAPTIONS, other)
    rows = list(csv.reader((other / "captions.csv").open()))
    rows[1][1] = "a caption nobody wrote"  # one caption changed, every image the same
    with open(other / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    resume = ["--resume", str(state), "--max-steps", "3", "--device", "cpu"]
    err = one_line_error(capsys, lambda: lora_caption.main([*resume, "--data-dir", str(other)]))
    assert f"--data-dir {other} holds other data than the run was trained on ({TINY_CAPTIONS.resolve()})" in err
    assert "drop --data-dir" in err
    assert torch.load(state, weights_only=True)["state"]["step"] == 2  # untouched
    same = tmp_path / "same"
    shutil.copytree(TINY_CAPTIONS, same)
    summary = lora_caption.main([*resume, "--data-dir", str(same)])
    assert summary["steps"] == 3 and summary["dataset"] == f"captions ({same})"
    err = one_line_error(capsys, lambda: lora_caption.main(["--resume", str(state), "--epochs", "4"]))
    assert "--epochs 4 trains nothing: --max-steps 3 still stops the run where it is (step 3)" in err  # not a no-op


def test_more_max_steps_on_a_run_that_did_all_its_epochs_is_one_line(tiny_captioner, tmp_path, capsys):
    """The captioner resumes mid-epoch, so its epoch count cannot tell a finished run before the data is read: a
    review found --max-steps raised on a run that ended with its --epochs accepted, and nothing trained."""
    train(tiny_captioner, tmp_path / "run", "--no-baseline", "--epochs", "1", "--batch-size", "50", "--max-steps",
          "100")  # 100 pairs, 50 a step: --epochs ends it at step 2
    err = one_line_error(capsys, lambda: lora_caption.main(["--resume", str(tmp_path / "run"), "--max-steps", "200"]))
    assert "--max-steps 200 trains nothing: --epochs still ends the run at step 2, where it stopped; raise --epochs" \
        in err


# B6: --model pointing at a folder of another kind of model ------------------------------------------------------

def test_issue21_B6_a_clip_folder_as_model_is_one_line_naming_both_kinds(tiny_clip, tmp_path, capsys):
    for argv in (["--data-dir", str(TINY_CAPTIONS), "--out-dir", str(tmp_path / "run")], ["--caption", str(IMAGES[0])]):
        argv = ["--model", str(tiny_clip), "--device", "cpu", *argv]
        err = one_line_error(capsys, lambda argv=argv: lora_caption.main(argv))
        assert f"--model {tiny_clip} holds a CLIPModel, not a VisionEncoderDecoderModel" in err, err
    assert not (tmp_path / "run").exists()


# B7: an adapter made for another model ---------------------------------------------------------------------------

def clip_adapter(tiny_clip, folder, base_model):
    """An adapter as clip_zeroshot.py --finetune lora saves it (its image tower's q/k/v/out projections + head)."""
    import clip_zeroshot
    model, _, _ = clip_zeroshot.load_clip(str(tiny_clip), "cpu")
    classifier = clip_zeroshot.ImageClassifier(model.vision_model, model.visual_projection,
                                               torch.zeros(10, model.config.projection_dim))
    lora = argparse.Namespace(targets=clip_zeroshot.LORA_TARGETS, rank=4, alpha=8, lora_dropout=0.0)
    common.save_adapter(clip_zeroshot.add_lora(classifier, lora), folder, base_model=base_model)
    return folder / "adapter"


def test_issue21_B7_merge_and_caption_refuse_an_adapter_of_another_model(tiny_clip, tiny_captioner, tmp_path, capsys):
    # recording its CLIP base: refused by what that base is
    adapter = clip_adapter(tiny_clip, tmp_path / "clip-run", base_model=str(tiny_clip))
    merge = ["--merge", "--adapter", str(adapter), "--model", str(tiny_captioner), "--device", "cpu"]
    err = one_line_error(capsys, lambda: lora_caption.main([*merge, "--out-dir", str(tmp_path / "merged")]))
    assert f"--adapter {adapter} was trained on {tiny_clip} (a CLIPModel), not on an image captioner" in err, err
    assert not (tmp_path / "merged").exists()
    # recording no base (or this one): refused because its weights fit no module of the captioner
    config = json.loads((adapter / "adapter_config.json").read_text())
    for recorded in (None, str(tiny_captioner)):
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": recorded}))
        for argv in ([*merge, "--out-dir", str(tmp_path / "merged")],
                     ["--caption", str(IMAGES[0]), "--adapter", str(adapter), "--model", str(tiny_captioner),
                      "--device", "cpu"]):
            err = one_line_error(capsys, lambda argv=argv: lora_caption.main(argv))
            assert f"--adapter {adapter}: its weights do not fit the modules of {tiny_captioner}" in err, err
            assert "base_model.model.tower." in err or "base_model.model.head." in err, err  # a key it holds
    assert not (tmp_path / "merged").exists()


def test_issue21_B7_a_trained_adapter_records_its_base_and_still_merges(tiny_captioner, tmp_path):
    train(tiny_captioner, tmp_path / "run", "--no-baseline")
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_captioner.resolve())
    # no --model: the recorded base is loaded, the adapter fits it
    lora_caption.main(["--merge", "--adapter", str(tmp_path / "run" / "adapter"), "--out-dir", str(tmp_path / "m"),
                       "--device", "cpu"])
    assert (tmp_path / "m" / "config.json").is_file()


# B8: "We strongly recommend passing in an `attention_mask`" with a decoder config that sets a pad token ----------

@pytest.fixture(scope="module")
def padded_captioner(tiny_captioner, tmp_path_factory):
    """The tiny captioner with pad_token_id in its decoder's config, as the released ViT-GPT2 has (50256)."""
    folder = tmp_path_factory.mktemp("padded") / "captioner"
    shutil.copytree(tiny_captioner, folder)
    config = json.loads((folder / "config.json").read_text())
    config["decoder"]["pad_token_id"] = config["decoder"]["eos_token_id"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_issue21_B8_no_attention_mask_warning_in_training_or_caption(padded_captioner, tmp_path, capfd):
    import transformers  # noqa: F401 (its loggers exist from here on)
    seen = Records()
    logging.getLogger("transformers").addHandler(seen)  # what a child logger's filters let through reaches this
    try:
        for argv in (["--data-dir", str(TINY_CAPTIONS), "--out-dir", str(tmp_path / "run"), "--batch-size", "10",
                      "--max-steps", "2", "--eval-every", "1", "--eval-images", "2", "--no-plots"],
                     ["--caption", *map(str, IMAGES[:3])]):
            logging.Logger.warning_once.cache_clear()  # transformers says each warning once per process
            lora_caption.main(["--model", str(padded_captioner), "--device", "cpu", *argv])
            model = lora_caption.load_captioner(str(padded_captioner), CPU)[0]
            assert model.decoder.config.pad_token_id is not None  # the case this test is about
            assert not [m for m in seen.messages if "attention_mask" in m or "attention mask" in m], seen.messages
    finally:
        logging.getLogger("transformers").removeHandler(seen)
    err = capfd.readouterr().err
    assert "attention_mask" not in err and "attention mask" not in err, err


# B18: a caption table naming its images relative to itself ------------------------------------------------------

def test_issue21_B18_names_relative_to_the_table_find_the_images(tmp_path):
    data = tmp_path / "set"
    shutil.copytree(TINY_CAPTIONS, data)
    rows = list(csv.reader((data / "captions.csv").open()))
    with open(data / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [["images/" + r[0], r[1]] for r in rows[1:]])
    splits = json.loads((data / "splits.json").read_text())
    (data / "splits.json").write_text(json.dumps({k: ["images/" + n for n in v] for k, v in splits.items()}))
    load = lambda root: lora_caption.load_caption_data(root, (32, 32), 2, seed=0, log=lambda *_: None)
    ours, shipped = load(data), load(TINY_CAPTIONS)
    assert sum(len(s.names) for s in ours.values()) == 30
    for k in lora_caption.SPLITS:
        assert ours[k].names == ["images/" + n for n in shipped[k].names]
        assert torch.equal(ours[k].images, shipped[k].images) and ours[k].captions == shipped[k].captions


# B19: --no-baseline's example lines ------------------------------------------------------------------------------

def test_issue21_B19_no_baseline_prints_no_before_part(tiny_captioner, tmp_path, capsys):
    summary = train(tiny_captioner, tmp_path / "run", "--no-baseline")
    out = capsys.readouterr().out
    names = tuple(e["image"] + ": " for e in summary["examples"])
    lines = [line for line in out.splitlines() if line.startswith(names)]
    assert len(lines) == 2 and "before None" not in out, out
    assert all("before" not in line and ": after '" in line and "| reference '" in line for line in lines), lines


# B20: --help shows each default, 0 and 0.0 included ------------------------------------------------------------

def test_issue21_B20_help_shows_every_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    text = lora_caption.build_parser().format_help()
    assert "AdamW decoupled weight decay (default: 0.0)" in text
    assert "LoRA initialisation and dropout (default: 0)" in text
    assert "(default: attn.c_attn attn.c_proj mlp.c_fc mlp.c_proj)" in text
    assert "see the top of this file" not in text and "(default: None)" not in text and "(default: False)" not in text
    assert all(line.count("(default") <= 1 for line in text.splitlines())


# B22: --caption with an unreadable file among others, or a folder ------------------------------------------------

def test_issue21_B22_caption_takes_a_folder_and_names_what_it_cannot_read(tiny_captioner, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for image in IMAGES[:2]:
        shutil.copy(image, folder / image.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not an image")
    (folder / "notes.txt").write_text("not an image, and not named like one")
    caption = lambda *paths: lambda: lora_caption.main(["--caption", *map(str, paths), "--model", str(tiny_captioner),
                                                        "--device", "cpu"])
    captions = caption(folder, tmp_path / "gone.jpg")()
    assert list(captions) == [str(folder / image.name) for image in IMAGES[:2]]
    out = capsys.readouterr().out.splitlines()
    assert f"skipped {tmp_path / 'gone.jpg'} (no such file or folder)" in out
    assert f"skipped {folder / 'broken.jpg'} (cannot read it as an image: UnidentifiedImageError)" in out
    err = one_line_error(capsys, caption(folder / "broken.jpg", tmp_path / "gone.jpg"))
    assert "--caption: none of the 2 file(s) could be read as an image" in err, err
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty'} holds no image" in one_line_error(capsys, caption(tmp_path / "empty"))


# B24: a typed flag that the chosen mode does not read ------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--caption", "x.jpg", "--model", "m", "--rank", "4"], "--rank has no effect with --caption; drop it"),
    (["--caption", "x.jpg", "--model", "m", "--out-dir", "o"], "--out-dir has no effect with --caption; drop it"),
    (["--caption", "x.jpg", "--adapter", "a", "--merge", "--out-dir", "o"],
     "--merge has no effect with --caption; drop it"),
    (["--merge", "--adapter", "a", "--out-dir", "o", "--lr", "0.1"], "--lr has no effect with --merge; drop it"),
    (["--merge", "--adapter", "a", "--out-dir", "o", "--num-beams", "3"],
     "--num-beams has no effect with --merge; drop it"),
    (["--data-dir", "d", "--adapter", "a"], "--adapter has no effect in training (it is for --caption and --merge)"),
])
def test_issue21_B24_flags_a_mode_ignores_are_refused(argv, message, capsys):
    assert message in one_line_error(capsys, lambda: lora_caption.main(argv))


# B25: non-finite numbers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, value, message", [
    ("--lr", "inf", "--lr must be a finite number > 0, got inf"),
    ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("--alpha", "-inf", "--alpha must be a finite number > 0, got -inf"),
    ("--weight-decay", "inf", "--weight-decay must be a finite number >= 0, got inf"),
    ("--weight-decay", "-0.1", "--weight-decay must be a finite number >= 0, got -0.1"),
    ("--grad-clip", "nan", "--grad-clip must be a finite number >= 0, got nan"),
    ("--warmup", "nan", "--warmup must be in [0, 1), got nan"),
    ("--lora-dropout", "inf", "--lora-dropout must be in [0, 1), got inf"),
])
def test_issue21_B25_non_finite_numbers_are_named_as_such(name, value, message, tmp_path, capsys):
    argv = ["--data-dir", str(tmp_path / "none"), f"{name}={value}"]  # "-inf" alone would read as a flag
    assert message in one_line_error(capsys, lambda: lora_caption.main(argv))


# B13: config.json at every start, summary.json's args equal to it -------------------------------------------------

def test_issue21_B13_resume_rewrites_config_and_the_summary_holds_the_same_args(tiny_captioner, tmp_path):
    train(tiny_captioner, tmp_path / "run", "--no-baseline")
    lora_caption.main(["--resume", str(tmp_path / "run" / "training_state.pt"), "--max-steps", "3", "--device", "cpu"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert config["max_steps"] == 3 and summary["steps"] == 3
    assert summary["args"] == config


# A2: no Hub kernels through the script's own loading path ----------------------------------------------------------

def test_issue21_A2_the_loaded_captioner_never_kernelizes(tiny_captioner, monkeypatch):
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    model, _, _ = lora_caption.load_captioner(str(tiny_captioner), CPU)
    model.train()
    assert getattr(model, "use_kernels", False) is False
    model.eval()
    assert getattr(model, "use_kernels", False) is False


# Review gaps of issue 21 closed: --merge locked and atomic (B1, B4), --model paths (B21), resume after the data
# moved (B9) -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_adapter(tiny_captioner, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "run"
    train(tiny_captioner, out, "--no-baseline")
    return out / "adapter"


def test_a_merge_into_a_folder_in_use_is_refused_and_a_full_disk_leaves_it_empty(trained_adapter, tmp_path,
                                                                                  monkeypatch, capsys):
    holder = argparse.Namespace(script="someone", out_dir=None, created_out_dir=False, lock=None)
    common.prepare_out_dir(tmp_path / "merged", holder)
    merge = ["--merge", "--adapter", str(trained_adapter), "--out-dir", str(tmp_path / "merged"), "--device", "cpu"]
    err = one_line_error(capsys, lambda: lora_caption.main(merge))
    assert f"--out-dir {tmp_path / 'merged'} is in use by a run still going" in err
    holder.lock.close()
    from transformers import PreTrainedModel

    def full_disk(self, folder, *a, **k):
        (Path(folder)).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")  # a write cut short
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(SystemExit) as stop:
        lora_caption.main(merge)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1 and "No space left on device" in err
    assert [p.name for p in (tmp_path / "merged").iterdir() if p.name != ".lock"] == []  # no half-written model
    monkeypatch.undo()
    lora_caption.main(merge)
    assert (tmp_path / "merged" / "config.json").is_file() and not (tmp_path / "merged" / ".lock").exists()


def test_a_model_path_that_does_not_exist_is_no_such_folder(tmp_path, capsys, monkeypatch):
    for argv in (["--data-dir", str(TINY_CAPTIONS), "--out-dir", str(tmp_path / "run")], ["--caption", str(IMAGES[0])]):
        err = one_line_error(capsys, lambda argv=argv: lora_caption.main(["--model", str(tmp_path / "none"),
                                                                         "--device", "cpu", *argv]))
        assert f"--model {tmp_path / 'none'}: no such folder" in err and "Repo id" not in err
    monkeypatch.chdir(tmp_path)  # models/nope beside a models/ folder: likely a typo of a local path
    (tmp_path / "models").mkdir()
    err = one_line_error(capsys, lambda: lora_caption.main(["--model", "models/nope", "--caption", str(IMAGES[0])]))
    assert "cannot load the captioner 'models/nope'" in err and "there is no folder models/nope here either" in err


def test_resume_after_the_caption_folder_moved_says_so(tiny_captioner, tmp_path, capsys):
    shutil.copytree(TINY_CAPTIONS, tmp_path / "data")
    train(tiny_captioner, tmp_path / "run", "--no-baseline", data=tmp_path / "data")
    shutil.move(tmp_path / "data", tmp_path / "moved")
    err = one_line_error(capsys, lambda: lora_caption.main(["--resume", str(tmp_path / "run"), "--max-steps", "3"]))
    assert f"the run's data folder {tmp_path / 'data'} is gone" in err and "pass --data-dir" in err
