"""What students of the real course need (issue 24): a third augmentation for the ViT template."""

import torch

import common
import vit_scratch


def test_random_erasing_zeroes_one_quarter_side_square_in_the_chosen_images_only():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8)  # no pixel is 0 before
    labels = torch.arange(64) % 10
    plain = common.TensorLoader(images, labels, 32, "cpu", train=True, seed=3)
    erased = common.TensorLoader(images, labels, 32, "cpu", train=True, seed=3, erase=0.5)
    for (x0, y0), (x1, y1) in zip(plain, erased):
        assert torch.equal(y0, y1)  # the same images in the same order: erasing draws from a generator of its own
        differs = (x0 != x1).any(1)  # (B, H, W): where erasing changed a pixel
        hit = differs.flatten(1).any(1)
        assert 4 <= int(hit.sum()) <= 28  # about half of 32 images (p = 0.5)
        for mask in differs[hit]:
            rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
            assert len(rows) <= 8 and len(cols) <= 8 and rows[-1] - rows[0] < 8 and cols[-1] - cols[0] < 8
        assert torch.all(x1.permute(0, 2, 3, 1)[differs] == 0)  # erased to 0: the mean colour after normalising


def test_the_vit_template_trains_with_the_third_augmentation_and_resumes_it(tiny_cifar, tmp_path):
    flags = ["--data-dir", str(tiny_cifar), "--device", "cpu", "--no-plots", "--embed-dim", "32", "--hidden-dim",
             "64", "--num-heads", "8", "--num-layers", "2", "--batch-size", "32", "--erase", "0.25"]
    vit_scratch.main([*flags, "--epochs", "1", "--out-dir", str(tmp_path / "run")])
    summary = vit_scratch.main(["--resume", str(tmp_path / "run"), "--epochs", "2"])
    assert summary["epochs"] == 2 and summary["args"]["erase"] == 0.25
