"""What a demanding new user tried on lora_caption.py (issue 12), one test per class of defect: empty splits,
--merge into a run's folder or a file, Kaggle tables with unquoted commas or other separators, tables that are
not UTF-8 and broken splits.json, transformers' noise on stderr, the summary's rates and epochs, --caption with
a merged model."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import lora_caption
from common import read_jsonl
from conftest import ROOT, TINY_CAPTIONS, one_line_error

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def flags(tiny, data, out, *more):
    return ["--model", str(tiny), "--data-dir", str(data), "--device", "cpu", "--out-dir", str(out),
            "--batch-size", "5", "--max-steps", "2", "--eval-every", "1", *more]


def copy_set(tmp_path):
    shutil.copytree(TINY_CAPTIONS, tmp_path / "set")
    return tmp_path / "set"


@pytest.fixture(scope="module")
def trained(tiny_captioner, tmp_path_factory):
    """A short run across an epoch boundary: 100 training pairs, 50 a step, 3 steps."""
    out = tmp_path_factory.mktemp("trained") / "run"
    lora_caption.main(flags(tiny_captioner, TINY_CAPTIONS, out, "--batch-size", "50", "--max-steps", "3",
                            "--no-plots", "--eval-images", "2"))
    return out


# 1. empty splits ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["splits.json without a test list", "two images, no splits.json"])
def test_an_empty_test_split_is_said_before_training_and_scores_are_null(layout, tiny_captioner, tmp_path, capsys):
    data = copy_set(tmp_path)
    if layout == "splits.json without a test list":
        splits = json.loads((data / "splits.json").read_text())
        (data / "splits.json").write_text(json.dumps({"train": splits["train"], "val": splits["val"]}))
    else:  # a seeded split of two images holds none out
        (data / "splits.json").unlink()
        rows = list(csv.reader((data / "captions.csv").open()))
        keep = sorted({r[0] for r in rows[1:]})[:2]
        with open(data / "captions.csv", "w", newline="") as f:
            csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if r[0] in keep])
    summary = lora_caption.main(flags(tiny_captioner, data, tmp_path / "run"))  # pictures and baseline on
    out = capsys.readouterr().out
    assert "the test split is empty" in out and out.index("the test split is empty") < out.index("trainable")
    assert summary["bleu4"] is summary["cider"] is summary["bleu4_before"] is summary["cider_before"] is None
    assert summary["examples"] == [] and summary["test_images"] == 0
    again = lora_caption.main(["--resume", str(tmp_path / "run" / "training_state.pt"), "--device", "cpu"])
    assert again["steps"] == 2 and again["bleu4"] is None


# 4. and 15. --merge into a folder that holds files, or into a file -------------------------------------

def test_merge_never_writes_into_a_run_folder_or_a_file(trained, tmp_path, capsys):
    config = (trained / "config.json").read_text()
    merge = lambda out: lambda: lora_caption.main(["--merge", "--adapter", str(trained / "adapter"), "--out-dir",
                                                   str(out), "--device", "cpu"])
    err = one_line_error(capsys, merge(trained))
    assert f"--out-dir {trained} already holds files (adapter, config.json" in err and "new or empty folder" in err
    assert (trained / "config.json").read_text() == config
    (tmp_path / "file").write_text("not a folder")
    assert "is a file; --merge writes a model folder" in one_line_error(capsys, merge(tmp_path / "file"))
    assert "cannot write there" in one_line_error(capsys, merge(tmp_path / "file" / "sub"))
    assert (tmp_path / "file").read_text() == "not a folder"


# 20. --caption with a merged model, no --adapter -------------------------------------------------------

def test_caption_takes_a_merged_model_without_an_adapter(trained, tiny_captioner, tmp_path):
    images = [str(p) for p in sorted((TINY_CAPTIONS / "images").iterdir())[:2]]
    (tmp_path / "merged").mkdir()  # an empty folder is fine
    lora_caption.main(["--merge", "--adapter", str(trained / "adapter"), "--out-dir", str(tmp_path / "merged"),
                       "--device", "cpu"])
    with_adapter = lora_caption.main(["--caption", *images, "--adapter", str(trained / "adapter"), "--device", "cpu"])
    merged = lora_caption.main(["--caption", *images, "--model", str(tmp_path / "merged"), "--device", "cpu"])
    assert merged == with_adapter and len(merged) == 2
    from transformers import VisionEncoderDecoderModel
    merged_weights = dict(VisionEncoderDecoderModel.from_pretrained(tmp_path / "merged").named_parameters())
    base_weights = dict(VisionEncoderDecoderModel.from_pretrained(tiny_captioner).named_parameters())
    assert merged_weights.keys() == base_weights.keys()  # plain GPT-2 layers, no lora_A/lora_B left
    changed = {n for n in base_weights if not torch.equal(merged_weights[n], base_weights[n])}
    assert changed and all(n.split(".")[-2] in ("c_attn", "c_proj", "c_fc") for n in changed), changed


# 20. the summary's rates and epochs ---------------------------------------------------------------------

def test_summary_counts_pairs_and_epochs_start_at_one(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["images_per_second"] is None and summary["pairs_per_second"] > 0
    assert summary["epochs"] == 1.5 and summary["steps"] == 3
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in rows] == [(1, 1), (2, 1), (3, 2)]


# 14. Kaggle's captions.txt: unquoted commas, other separators -------------------------------------------

@pytest.mark.parametrize("sep", [",", "\t", ";"], ids=["comma", "tab", "semicolon"])
def test_unquoted_separators_in_captions_are_joined_back(sep, tmp_path):
    (tmp_path / "captions.txt").write_text(f"image{sep}caption\na.jpg{sep}A dog{sep} a ball{sep} and a stick .\n"
                                           f"b.jpg{sep}A cat .\n")
    logged = []
    rows, problems = lora_caption.read_caption_rows(tmp_path / "captions.txt", log=logged.append)
    assert rows == [("a.jpg", f"A dog{sep} a ball{sep} and a stick ."), ("b.jpg", "A cat .")]
    assert not any(problems.values()) and "1 caption(s) hold an unquoted" in logged[0]


@pytest.mark.parametrize("sep", ["\t", ";"], ids=["tab", "semicolon"])
def test_tab_and_semicolon_tables_read_like_the_comma_one(sep, tmp_path):
    data = copy_set(tmp_path)
    rows = list(csv.reader((data / "captions.csv").open()))
    with open(data / "captions.csv", "w", newline="") as f:
        csv.writer(f, delimiter=sep).writerows(rows)
    load = lambda root: lora_caption.load_caption_data(root, (32, 32), 2, seed=0, log=lambda *_: None)
    assert {k: s.captions for k, s in load(data).items()} == {k: s.captions for k, s in load(TINY_CAPTIONS).items()}


# 15. a table that is not UTF-8, a splits.json that is not the expected object ---------------------------

@pytest.mark.parametrize("case, message", [
    ("latin-1 table", "captions.csv is not UTF-8 text (line 3 holds the byte 0xe9), perhaps Latin-1"),
    ("splits: broken JSON", "splits.json is not valid JSON (Expecting value: line 1 column 12"),
    ("splits: a list", "splits.json holds a JSON list; expected {\"train\": [...]"),
    ("splits: a name, not a list", "splits.json: its 'test' entry is not a list of image names"),
])
def test_bad_tables_and_splits_are_one_line(case, message, tiny_captioner, tmp_path, capsys):
    data = copy_set(tmp_path)
    if case == "latin-1 table":
        lines = (data / "captions.csv").read_text().splitlines()
        lines[2] += " in a caf\u00e9"
        (data / "captions.csv").write_bytes("\n".join(lines).encode("latin-1"))
    contents = {"splits: broken JSON": '{"train": [', "splits: a list": '["a.jpg"]',
                "splits: a name, not a list": '{"train": ["a.jpg"], "test": "b.jpg"}'}
    if case in contents:
        (data / "splits.json").write_text(contents[case])
    err = one_line_error(capsys, lambda: lora_caption.main(flags(tiny_captioner, data, tmp_path / "run")))
    assert message in err, err
    assert not (tmp_path / "run").exists()  # nothing was trained, and no empty folder is left


# 19. no transformers noise on stderr in --caption and --merge -------------------------------------------

def test_caption_and_merge_print_nothing_on_stderr(trained, tmp_path):
    images = [str(p) for p in sorted((TINY_CAPTIONS / "images").iterdir())[:2]]  # a batch: the mask warning's case
    script = ("import sys, lora_caption\n"
              "adapter, merged, *images = sys.argv[1:]\n"
              "lora_caption.main(['--caption', *images, '--adapter', adapter, '--device', 'cpu'])\n"
              "lora_caption.main(['--merge', '--adapter', adapter, '--out-dir', merged, '--device', 'cpu'])\n")
    proc = subprocess.run([sys.executable, "-c", script, str(trained / "adapter"), str(tmp_path / "merged"), *images],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.count(": ") >= 2 and "merged" in proc.stdout


def test_resume_logs_each_step_once(tiny_captioner, tmp_path, monkeypatch):
    """Rows logged after the last save are dropped on --resume and logged again: no step twice (issue 12.13)."""
    flags = ["--model", str(tiny_captioner), "--data-dir", str(TINY_CAPTIONS), "--device", "cpu", "--epochs", "1",
             "--batch-size", "10", "--eval-every", "1", "--save-every", "3", "--no-baseline", "--eval-images", "1",
             "--no-plots", "--out-dir", str(tmp_path)]
    real = lora_caption.after_step

    def interrupted_after_step_5(args, progress, *rest):
        real(args, progress, *rest)
        if progress.step == 5:
            raise KeyboardInterrupt  # rows 4 and 5 are logged, the last save is at step 3
    monkeypatch.setattr(lora_caption, "after_step", interrupted_after_step_5)
    with pytest.raises(SystemExit):
        lora_caption.main(flags)
    monkeypatch.setattr(lora_caption, "after_step", real)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    summary = lora_caption.main(["--resume", str(tmp_path / "training_state.pt"), "--device", "cpu"])
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, summary["steps"] + 1))


def test_a_reused_out_dir_and_changed_resume_flags_are_refused_extra_steps_extend(tiny_captioner, tmp_path, capsys):
    """Issue 12.3 and 12.6 for the captioner: its runs share the CIFAR scripts' rules."""
    flags = ["--model", str(tiny_captioner), "--data-dir", str(TINY_CAPTIONS), "--device", "cpu", "--max-steps", "2",
             "--batch-size", "10", "--no-baseline", "--eval-images", "1", "--no-plots", "--out-dir", str(tmp_path)]
    lora_caption.main(flags)
    for argv, message in [(flags, "holds another run's results"),
                          (["--resume", str(tmp_path / "training_state.pt"), "--lr", "0.5"], "--lr 0.5 differs from"),
                          (["--resume", str(tmp_path / "training_state.pt"), "--out-dir", str(tmp_path / "x")],
                           "a resumed run continues in its own folder")]:
        with pytest.raises(SystemExit) as stop:
            lora_caption.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and err.count("\n") == 1, err
    state = str(tmp_path / "training_state.pt")
    summary = lora_caption.main(["--resume", state, "--max-steps", "4", "--device", "cpu"])
    assert summary["steps"] == 4  # a finished run, extended
