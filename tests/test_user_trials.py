"""What a demanding new user tried (issue 12) on the CIFAR-10 scripts and common.py, one test per class of
defect: lost or mixed runs, resume that ignored flags or data, broken caches, odd folders, odd data files,
tracebacks where one line was promised, help text, empty folders and float noise."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import cnn_baseline
import common
import vit_scratch
from conftest import ROOT, one_line_error

TINY = {
    vit_scratch: ["--embed-dim", "32", "--hidden-dim", "64", "--num-heads", "4", "--num-layers", "2", "--batch-size",
                  "32"],
    cnn_baseline: ["--widths", "8", "16", "32", "--batch-size", "32"],
}
SCRIPTS = pytest.mark.parametrize("script", list(TINY), ids=lambda m: m.__name__)


def train(script, data, out, *flags):
    return script.main(
        ["--data-dir", str(data), "--device", "cpu", "--no-plots", "--out-dir", str(out), "--limit-train", "64",
         "--limit-test", "50", *TINY[script], *flags]
    )


# 2. runs started in the same second -------------------------------------------------------------------


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folders = [common.new_run_dir("vit_scratch") for _ in range(3)]  # well within one second
    assert len(set(folders)) == 3 and all(f.is_dir() and f.parent == folders[0].parent for f in folders)
    assert [f.name.removeprefix(folders[0].name) for f in folders] == ["", "-2", "-3"]


# 3. an --out-dir that holds another run ---------------------------------------------------------------


@SCRIPTS
def test_out_dir_holding_another_run_is_refused_unless_overwrite(script, tiny_cifar, tmp_path, capsys):
    train(script, tiny_cifar, tmp_path, "--epochs", "2")
    err = one_line_error(capsys, lambda: train(script, tiny_cifar, tmp_path, "--epochs", "1"))
    assert f"--out-dir {tmp_path} holds another run's results" in err and f"--resume {tmp_path / 'last.pt'}" in err
    assert "--overwrite" in err and len(common.read_jsonl(tmp_path / "metrics.jsonl")) == 2  # untouched
    (tmp_path / "captions.html").write_text("another script's output")  # as a captioner run leaves it
    (tmp_path / "notes.txt").write_text("the user's own")
    train(script, tiny_cifar, tmp_path, "--epochs", "1", "--overwrite")
    assert [r["epoch"] for r in common.read_jsonl(tmp_path / "metrics.jsonl")] == [1]
    assert not (tmp_path / "captions.html").exists() and (tmp_path / "notes.txt").exists()  # no stale run file
    assert torch.load(tmp_path / "last.pt", weights_only=True)["state"]["epoch"] == 1


# 5. and 6. --resume: the run's own data folder; typed flags honoured or refused ------------------------


@SCRIPTS
def test_resume_finds_its_data_from_anywhere_and_refuses_other_data(script, tiny_cifar, tmp_path, monkeypatch, capsys):
    train(script, tiny_cifar, tmp_path / "run", "--epochs", "1")
    monkeypatch.chdir(tmp_path)  # no ./data here: the checkpoint's own folder must be used
    summary = script.main(["--resume", str(tmp_path / "run" / "last.pt"), "--epochs", "2", "--device", "cpu"])
    assert summary["epochs"] == 2 and str(tiny_cifar.resolve()) in summary["dataset"]
    same = tmp_path / "copy"
    shutil.copytree(tiny_cifar, same, ignore=shutil.ignore_patterns(".decoded-*"))
    summary = script.main(
        ["--resume", str(tmp_path / "run" / "last.pt"), "--epochs", "3", "--device", "cpu", "--data-dir", str(same)]
    )  # the same images elsewhere: accepted
    assert summary["epochs"] == 3
    other = tmp_path / "other"
    shutil.copytree(tiny_cifar, other, ignore=shutil.ignore_patterns(".decoded-*"))
    first = sorted((other / "train" / "cat").iterdir())[0]
    shutil.copy(sorted((other / "train" / "dog").iterdir())[0], first)  # one image changed
    err = one_line_error(
        capsys,
        lambda: script.main(
            ["--resume", str(tmp_path / "run" / "last.pt"), "--epochs", "4", "--device", "cpu", "--data-dir",
             str(other)]
        ),
    )
    assert f"--data-dir {other} holds other data than the run was trained on" in err
    import torchvision.datasets  # a resumed run never downloads, into its own folder or another (a sixth trial)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: pytest.fail("a download was tried"))
    (tmp_path / "empty").mkdir()
    err = one_line_error(capsys, lambda: script.main(["--resume", str(tmp_path / "run"), "--epochs", "4", "--data-dir",
                                                      str(tmp_path / "empty")]))
    assert f"no CIFAR-10 found in {tmp_path / 'empty'}" in err


@SCRIPTS
def test_half_a_tree_or_one_split_is_named_and_nothing_downloads(script, tiny_cifar, tmp_path, monkeypatch, capsys):
    """A sixth trial: train/ without test/, or a split's folder as --data-dir, fell through to a CIFAR-10 download
    into the student's folder (offline: "no CIFAR-10 found", never naming what is missing)."""
    import torchvision.datasets
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: pytest.fail("a download was tried"))
    half = tmp_path / "half"
    shutil.copytree(tiny_cifar / "train", half / "train")
    cases = [(half, f"--data-dir {half}: has train/ but no test/"),
             (half / "train", f"--data-dir {half / 'train'}: holds class folders of images (airplane, automobile, "
                              f"bird, ...), not train/ and test/")]
    for folder, message in cases:
        err = one_line_error(capsys, lambda folder=folder: train(script, tiny_cifar, tmp_path / "run", "--data-dir",
                                                                 str(folder)))
        assert message in err, err
    (half / "test").mkdir()
    err = one_line_error(capsys, lambda: train(script, tiny_cifar, tmp_path / "run", "--data-dir", str(half)))
    assert f"{half / 'test'} has no class folders" in err, err


@SCRIPTS
def test_resume_extends_epochs_and_refuses_changed_flags(script, tiny_cifar, tmp_path, capsys):
    train(script, tiny_cifar, tmp_path, "--epochs", "2")
    last = str(tmp_path / "last.pt")
    err = one_line_error(capsys, lambda: script.main(["--resume", last, "--lr", "0.5", "--device", "cpu"]))
    assert "--lr 0.5 differs from the checkpoint's" in err and "start a new run" in err
    err = one_line_error(capsys, lambda: script.main(["--resume", last, "--out-dir", str(tmp_path / "elsewhere")]))
    assert "a resumed run continues in its own folder" in err and not (tmp_path / "elsewhere").exists()
    err = one_line_error(capsys, lambda: script.main(["--resume", last, "--epochs", "1", "--device", "cpu"]))
    assert "--epochs 1 is below the run's --epochs 2: a resumed run can be extended, not shortened" in err  # B12
    err = one_line_error(capsys, lambda: script.main(["--resume", last, "--max-steps", "3"]))
    assert "--max-steps 3 would cap a run started without --max-steps (it runs all its --epochs)" in err  # it read
    # "is below the run's (no --max-steps)" (a sixth trial)
    summary = script.main(
        ["--resume", last, "--epochs", "4", "--device", "cpu", "--no-plots"]
    )  # a finished run, extended
    assert summary["epochs"] == 4 and summary["steps"] == 4 * 2
    assert [r["epoch"] for r in common.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    same = script.main(["--resume", last, "--epochs", "4", "--device", "cpu", "--no-plots"])  # nothing left: evaluates
    assert same["test_acc"] == summary["test_acc"]


def test_vit_resume_with_more_epochs_continues_the_schedule_to_the_new_end(tiny_cifar, tmp_path):
    train(vit_scratch, tiny_cifar, tmp_path, "--epochs", "2", "--optimizer", "adamw")
    vit_scratch.main(["--resume", str(tmp_path / "last.pt"), "--epochs", "4", "--device", "cpu"])
    lrs = [r["lr"] for r in common.read_jsonl(tmp_path / "metrics.jsonl")]  # the rate of each epoch's last step
    planned = [1e-3 * vit_scratch.lr_factor(step, 0, total) for step, total in ((1, 4), (3, 4), (5, 8), (7, 8))]
    assert lrs == pytest.approx(planned, rel=1e-12)  # epochs 3-4 follow the cosine re-planned to end at epoch 4


# 7. a corrupt decode cache ------------------------------------------------------------------------------


def test_a_corrupt_decode_cache_is_rebuilt_with_a_word(tiny_cifar, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(tiny_cifar, tree, ignore=shutil.ignore_patterns(".decoded-*"))
    first = common.load_cifar10(tree, download=False)
    cache = tree / ".decoded-32px.npz"
    cache.write_bytes(cache.read_bytes()[:1000])  # cut short, as by a full disk or a kill in an older version
    logged = []
    again = common.load_cifar10(tree, download=False, log=logged.append)
    assert torch.equal(again.train_x, first.train_x)
    assert logged == [f"the decode cache {cache} could not be read (BadZipFile); decoding the images again"]
    assert np.load(cache)["train_x"].shape == (300, 3, 32, 32)  # rewritten whole


# 10. hidden folders and files -------------------------------------------------------------------------


def test_hidden_folders_are_not_classes(tiny_cifar, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(tiny_cifar, tree, ignore=shutil.ignore_patterns(".decoded-*"))
    for split in ("train", "test"):
        (tree / split / ".ipynb_checkpoints").mkdir()
        shutil.copy(next((tree / split / "cat").iterdir()), tree / split / ".ipynb_checkpoints" / "x.jpg")
        shutil.copy(next((tree / split / "cat").iterdir()), tree / split / "cat" / ".hidden.jpg")
    data = common.load_cifar10(tree, download=False)
    assert len(data.classes) == 10 and ".ipynb_checkpoints" not in data.classes
    assert len(data.train_y) == 300 and len(data.test_y) == 100


# 11. per-class accuracy of a class with no test image ---------------------------------------------------


def test_per_class_accuracy_is_null_for_classes_without_test_images(tiny_cifar, tmp_path):
    summary = vit_scratch.main(
        ["--data-dir", str(tiny_cifar), "--device", "cpu", "--no-plots", "--epochs", "1", "--limit-test", "3",
         "--out-dir", str(tmp_path), *TINY[vit_scratch]]
    )
    values = list(summary["per_class_acc"].values())
    assert sum(v is None for v in values) == 7 and all(v in (0.0, 1.0) for v in values if v is not None)
    saved = json.loads((tmp_path / "summary.json").read_text())["per_class_acc"]
    assert list(saved.values()).count(None) == 7


# 15. tracebacks where one line and exit 2 (or 130) were promised -----------------------------------------


@SCRIPTS
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_learning_rate_is_one_line(script, value, tiny_cifar, tmp_path, capsys):
    err = one_line_error(capsys, lambda: train(script, tiny_cifar, tmp_path, "--lr", value))
    assert f"--lr must be a finite number, got {value}" in err  # issue 21 B25: not "must be positive"


def test_show_attention_into_a_file_is_one_line(tiny_cifar, tmp_path, capsys):
    train(vit_scratch, tiny_cifar, tmp_path / "run", "--epochs", "1")
    (tmp_path / "file").write_text("")
    err = one_line_error(
        capsys,
        lambda: vit_scratch.main(
            ["--show-attention", str(tmp_path / "run" / "last.pt"), "--out-dir", str(tmp_path / "file"), "--device",
             "cpu"]
        ),
    )
    assert f"--out-dir {tmp_path / 'file'}: cannot write there" in err


def test_compare_skips_a_foreign_summary_with_a_word(tiny_cifar, tmp_path, capsys):
    train(cnn_baseline, tiny_cifar, tmp_path / "cnn", "--epochs", "1")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "summary.json").write_text(json.dumps({"accuracy": 0.5}))  # some other tool's
    capsys.readouterr()
    table = cnn_baseline.main(["--compare", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "| cnn_baseline |" in table and len(table.splitlines()) == 3
    assert f"skipped 1 file(s) that are not a run's summary: {tmp_path / 'other' / 'summary.json'}" in err


@pytest.mark.parametrize("where", ["decoding", "pictures"])
def test_ctrl_c_anywhere_ends_with_130_and_no_traceback(where, tiny_cifar, tmp_path, monkeypatch, capsys):
    tree = tmp_path / "tree"
    shutil.copytree(tiny_cifar, tree, ignore=shutil.ignore_patterns(".decoded-*"))

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(
        *((common, "_decode_one") if where == "decoding" else (vit_scratch, "save_pictures")), interrupted
    )
    with pytest.raises(SystemExit) as stop:
        vit_scratch.main(
            ["--data-dir", str(tree), "--device", "cpu", "--epochs", "1", "--out-dir", str(tmp_path / "run"),
             *TINY[vit_scratch]]
        )
    err = capsys.readouterr().err
    assert stop.value.code == 130 and "interrupted; " in err and "Traceback" not in err
    assert ("resume with" in err) == (where == "pictures")  # a checkpoint exists only once an epoch ended


# 16. CIFAR batches pickled by Python 3 with protocol 2 ----------------------------------------------------


def test_protocol_2_batches_written_by_python_3_load(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (batches / name).write_bytes(pickle.dumps(batch, protocol=2))  # numpy bytes become _codecs.encode calls
    (batches / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b", b"c", b"d"]}, protocol=2))
    data = common.load_cifar10(tmp_path, download=False)
    assert data.train_x.shape == (20, 3, 32, 32) and data.classes == ["a", "b", "c", "d"]
    assert pickle.loads(pickle.dumps(b"x", protocol=2)) == b"x"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    (batches / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": []}, protocol=2))
    with pytest.raises(common.DataError, match="refusing to load"):
        common.load_cifar10(tmp_path, download=False)


# 17. wording ------------------------------------------------------------------------------------------


def test_messages_name_the_flag_the_user_typed(tiny_cifar, tmp_path, capsys):
    err = one_line_error(capsys, lambda: vit_scratch.main(["--show-attention", str(tmp_path / "none.pt")]))
    assert f"--show-attention {tmp_path / 'none.pt'}: no such file" in err
    (tmp_path / "notes.txt").write_text("my notes about run 3\n")
    err = one_line_error(capsys, lambda: vit_scratch.main(["--resume", str(tmp_path / "notes.txt")]))
    assert f"--resume {tmp_path / 'notes.txt'}: not a PyTorch checkpoint" in err and "KeyError" not in err
    err = one_line_error(capsys, lambda: train(cnn_baseline, tiny_cifar, tmp_path / "r", "--limit-test", "100000"))
    assert "--limit-test 100000: asked for a subset of 100000 images but the split holds 100" in err


# 18. --help ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit_scratch", "cnn_baseline"])
def test_help_shows_each_default_once_and_the_example_commands(name):
    out = subprocess.run([sys.executable, str(ROOT / f"{name}.py"), "--help"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "COLUMNS": "200"}).stdout
    assert "(default: None)" not in out and "(default: False)" not in out
    assert not re.search(r"\(default[^)]*\)[^\n]*\(default", out)  # never two defaults on one flag
    assert "(default: 10)" in out and "examples:" in out and f"python {name}.py --epochs 1 --limit-train 5000" in out


def test_help_shows_the_value_each_recipe_gives_a_flag():
    parser = vit_scratch.build_parser()
    formatter = parser._get_formatter()
    words = {"-": None, "on": True, "off": False}
    for name in vit_scratch.RECIPES["fast"]:
        action = next(a for a in parser._actions if a.dest == name)
        shown = re.search(r"\(recipe fast: (\S+), guide: (\S+)\)$", formatter._get_help_string(action)).groups()
        for recipe, text in zip(("fast", "guide"), shown):
            value = vit_scratch.RECIPES[recipe][name]
            assert (words[text] if text in words else type(value)(text)) == value, (name, recipe, text)
    assert "(default" not in formatter._get_help_string(parser._option_string_actions["--lr"])
    assert "(recipe fast: 256, guide: 128)" in " ".join(parser.format_help().split())


# 20. failed runs leave no empty folder; summaries hold exact fractions -------------------------------------


@SCRIPTS
def test_a_run_that_fails_before_any_result_leaves_no_empty_folder(script, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    one_line_error(
        capsys,
        lambda: script.main(
            ["--data-dir", str(tmp_path / "nothing"), "--no-download", "--out-dir", str(out), "--device", "cpu"]
        ),
    )
    assert not out.exists()


@SCRIPTS
def test_accuracies_in_the_summary_are_exact_fractions(script, tiny_cifar, tmp_path):
    summary = train(script, tiny_cifar, tmp_path, "--epochs", "2", "--limit-test", "30")
    for key in ("test_acc", "best_test_acc"):
        assert summary[key] == round(summary[key] * 30) / 30  # k / 30 exactly as Python divides, no float32 noise
    assert summary["test_acc"] * 30 == sum(summary["confusion_matrix"][k][k] for k in range(10))


@SCRIPTS
def test_a_working_folder_where_runs_cannot_be_made_is_one_line(script, tiny_cifar, tmp_path, monkeypatch, capsys):
    (tmp_path / "runs").write_text("")  # a file where the default output folder would go
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, lambda: script.main(["--data-dir", str(tiny_cifar), "--epochs", "1", "--device", "cpu",
                                                      *TINY[script]]))
    assert f"the default output folder runs/{script.__name__}: cannot write there" in err and "pass --out-dir" in err
