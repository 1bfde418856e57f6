"""common.py: loading, subsets, patching, augmentation, metrics."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import common
from common import (CIFAR_MEAN, CIFAR_STD, DataError, TensorLoader, accuracy_from, apply_crop_flip, confusion_matrix,
                    crop_flip_params, img_to_patch, load_cifar10, normalize, per_class_accuracy, stratified_subset)
from guide_vit import test_transform as guide_test_transform


def random_crop_flip(x, padding=4, generator=None):
    return apply_crop_flip(x, crop_flip_params(len(x), padding, generator, x.device), padding)


def test_img_to_patch_matches_naive_loop():
    x = torch.randn(2, 3, 8, 12)
    P = 4
    naive = []
    for b in range(2):
        patches = [
            x[b, :, i : i + P, j : j + P].reshape(-1) for i in range(0, 8, P) for j in range(0, 12, P)
        ]  # row-major
        naive.append(torch.stack(patches))
    assert torch.equal(img_to_patch(x, P), torch.stack(naive))
    assert img_to_patch(x, P, flatten_channels=False).shape == (2, 6, 3, 4, 4)
    assert img_to_patch(torch.zeros(5, 3, 32, 32), 4).shape == (5, 64, 48)


def test_normalize_matches_the_guides_test_transform():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    torch.testing.assert_close(normalize(img[None])[0], guide_test_transform()(pil), atol=1e-6, rtol=0)
    assert CIFAR_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR_STD == (0.2023, 0.1994, 0.2010)


def test_random_crop_flip_takes_a_window_of_the_padded_image():
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)  # no zeros, so padding is recognisable
    out = random_crop_flip(x, padding=4, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips, offsets = 0, set()
    for i in range(len(x)):
        matches = [
            (dy, dx, f)
            for dy in range(9)
            for dx in range(9)
            for f in (0, 1)
            if torch.equal(out[i], (padded[i].flip(2) if f else padded[i])[:, dy : dy + 32, dx : dx + 32])
        ]
        assert matches, f"image {i} is not a crop of its padded image"
        flips += matches[0][2]
        offsets.add(matches[0][:2])
    assert 16 <= flips <= 48  # about half flipped (binomial(64, 0.5): this fails with p < 1e-4)
    assert len(offsets) > 20  # offsets drawn independently per image


def test_random_crop_flip_is_reproducible_and_keeps_dtype():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(3))
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape


def test_tensor_loader_covers_the_set_once_per_epoch_and_reshuffles():
    x = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 3, 8, 8).contiguous()
    y = torch.arange(100)
    loader = TensorLoader(x, y, batch_size=32, device="cpu", train=True, seed=0)
    assert len(loader) == 3  # ragged tail dropped for training
    first = torch.cat([b for _, b in loader])
    loader.set_epoch(1)
    second = torch.cat([b for _, b in loader])
    assert len(first.unique()) == 96 and not torch.equal(first, second)
    test = TensorLoader(x, y, batch_size=32, device="cpu", train=False)
    assert len(test) == 4 and torch.equal(torch.cat([b for _, b in test]), y)


def test_stratified_subset_is_balanced_and_deterministic():
    labels = torch.arange(10).repeat_interleave(50)
    idx = stratified_subset(labels, 95, seed=1)
    counts = torch.bincount(labels[idx], minlength=10)
    assert len(idx) == 95 and len(idx.unique()) == 95 and counts.min() == 9 and counts.max() == 10
    assert torch.equal(idx, stratified_subset(labels, 95, seed=1))
    assert not torch.equal(idx, stratified_subset(labels, 95, seed=2))
    with pytest.raises(DataError, match="holds 500"):
        stratified_subset(labels, 501)


def test_load_imagefolder_tree_and_cache(tiny_cifar):
    data = load_cifar10(tiny_cifar, download=False)
    assert data.source == "imagefolder" and data.classes[0] == "airplane" and len(data.classes) == 10
    assert data.train_x.shape == (300, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (100, 3, 32, 32) and torch.equal(torch.bincount(data.test_y), torch.full((10,), 10))
    first = sorted((tiny_cifar / "train" / "airplane").iterdir())[0]
    assert torch.equal(data.train_x[0], torch.from_numpy(np.array(Image.open(first).convert("RGB"))).permute(2, 0, 1))
    assert list(tiny_cifar.glob(".decoded-*.npz")), "the decoded arrays are cached beside the data"
    again = load_cifar10(tiny_cifar, download=False)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)


def test_imagefolder_reads_any_pil_format_and_skips_unreadable(tmp_path):
    for split in ("train", "test"):
        for c, color in (("b_cls", (0, 0, 255)), ("a_cls", (255, 0, 0))):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("L", (32, 32), 128).save(tmp_path / split / c / "grey.png")
            Image.new("RGBA", (64, 64), color + (255,)).save(tmp_path / split / c / "big.png")
    (tmp_path / "train" / "a_cls" / "broken.jpg").write_bytes(b"not a jpeg")
    logged = []
    data = load_cifar10(tmp_path, download=False, log=logged.append)
    assert data.classes == ["a_cls", "b_cls"] and data.train_x.shape == (4, 3, 32, 32)
    assert "skipped 1 unreadable" in logged[0] and "broken.jpg" in logged[0]
    big_red = data.train_x[data.train_y == 0][0]  # sorted: big.png before grey.png
    assert big_red[0].float().mean() > 250 and big_red[2].float().mean() < 5  # RGBA -> RGB, resized to 32


def _write_torchvision_layout(root, n=20):
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, n)]}
        (batches / name).write_bytes(pickle.dumps(batch))
    (batches / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return batches


def test_load_torchvision_layout(tmp_path):
    batches = _write_torchvision_layout(tmp_path)
    data = load_cifar10(tmp_path, download=False)
    first = pickle.loads((batches / "data_batch_1").read_bytes())
    assert (
        data.source == "torchvision" and data.train_x.shape == (100, 3, 32, 32) and data.test_x.shape == (20, 3, 32, 32)
    )
    assert torch.equal(data.train_x[0], torch.from_numpy(first["data"][0].reshape(3, 32, 32)))
    assert data.train_y[:20].tolist() == [int(v) for v in first["labels"]] and data.classes[3] == "c3"


def test_cifar_batch_that_would_run_code_is_refused(tmp_path):
    batches = _write_torchvision_layout(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (batches / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_cifar10(tmp_path, download=False)


def test_missing_data_error_names_both_layouts(tmp_path):
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path / "nothing", download=False)
    assert "ImageFolder" in str(e.value) and "cifar-10-batches-py" in str(e.value)


def test_confusion_matrix_and_per_class_accuracy():
    preds = torch.tensor([0, 1, 1, 2, 2, 2])
    targets = torch.tensor([0, 1, 2, 2, 2, 0])
    cm = confusion_matrix(preds, targets, 3)
    assert cm.tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 2]]
    assert per_class_accuracy(cm) == pytest.approx([0.5, 1.0, 2 / 3])
    assert accuracy_from(cm) == 4 / 6


class _Payload:
    def __reduce__(self):
        return (print, ("this would run",))


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    torch.save({"script": "vit_scratch", "payload": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="not a checkpoint of plain values, refused"):
        common.load_checkpoint(tmp_path / "evil.pt", "vit_scratch")
    torch.save({"script": "vit_scratch", "w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(common.load_checkpoint(tmp_path / "ok.pt", "vit_scratch")["w"], torch.ones(2))


def test_error_line_is_one_line_even_for_errors_without_a_message():
    assert common.error_line(AssertionError()) == "AssertionError"
    assert common.error_line(RuntimeError("  \n")) == "RuntimeError"
    assert common.error_line(RuntimeError("CUDA error\nat line 3")) == "RuntimeError: CUDA error"
    assert common.error_line(ValueError("x" * 300), 100) == "ValueError: " + "x" * 100


def test_a_shared_data_folder_with_other_datasets_is_no_split_of_a_tree(tmp_path):
    """A review: any image sub-folder made a shared ./data refuse CIFAR-10's download ("holds class folders")."""
    (tmp_path / "mycaps" / "images").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "mycaps" / "a.jpg")
    (tmp_path / "notes.txt").write_text("not a class")
    with pytest.raises(DataError, match="no CIFAR-10 found in") as refused:
        common.load_cifar10(tmp_path, download=False)
    assert "class folders" not in str(refused.value)
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "cats" / "b.png")  # now every entry is a folder of images: a split
    with pytest.raises(DataError, match="holds class folders of images \\(cats, mycaps, ...\\)"):
        common.load_cifar10(tmp_path, download=False)


def test_only_a_local_model_folder_that_is_gone_may_be_given_anew_on_resume(tmp_path):
    """A review: a hub id (never a local path) counted as "gone", so any local folder replaced it on resume."""
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    (tmp_path / "new").mkdir()
    cli = argparse.Namespace(model=str(tmp_path / "new"), resume=str(tmp_path / "last.pt"), out_dir=None)
    torch.save({}, tmp_path / "last.pt")
    for recorded in ("openai/clip-vit-base-patch32", str(tmp_path / "old-but-here")):
        (tmp_path / "old-but-here").mkdir(exist_ok=True)
        with pytest.raises(DataError, match="differs from the checkpoint's --model"):
            common.resumed_args({"model": recorded}, cli, {"model"}, (), parser=parser)
    args = common.resumed_args({"model": str(tmp_path / "gone")}, cli, {"model"}, (), parser=parser)
    assert args.model == str(tmp_path / "new")


def test_overwrite_spares_a_users_model_folder_beside_a_run_and_refuses_to_delete_an_input(tmp_path):
    """A review: every run's --overwrite counted a user's model/ as removed (only a captioner run's is)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "summary.json").write_text('{"script": "clip_zeroshot"}')
    inputs = [("--model", (tmp_path / "model").resolve())]
    # a clip run beside the user's model: kept
    common.check_inputs_kept(tmp_path, inputs, common.replaced_files(tmp_path))
    assert common.replaced_files(tmp_path) == ["summary.json"]
    (tmp_path / "training_state.pt").write_text("")  # a captioner run: its model/ goes with it
    with pytest.raises(DataError, match="--overwrite would delete model, which holds the --model this run reads"):
        common.check_inputs_kept(tmp_path, inputs, common.replaced_files(tmp_path))
