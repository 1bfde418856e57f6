"""cnn_baseline.py: the model's contract and the comparison table (CLI contract: test_training_cli.py)."""

import json
import os

import pytest
import torch

import cnn_baseline
from cnn_baseline import ResidualCNN


def expected_params(widths, num_classes=10):
    convs = 9 * 3 * widths[0] + sum(9 * a * b + 9 * b * b for a, b in zip(widths, widths[1:]))
    norms = 2 * widths[0] + sum(4 * b for b in widths[1:])
    return convs + norms + widths[-1] * num_classes


def test_default_model_shape_and_exact_parameter_count():
    model = ResidualCNN()
    assert sum(p.numel() for p in model.parameters()) == expected_params([32, 64, 256, 256]) == 1_978_016
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in ResidualCNN(widths=(8, 16), num_classes=3).parameters()) == expected_params(
        [8, 16], 3)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = ResidualCNN(widths=(8, 16, 32))
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_batchnorm_in_eval_mode_is_deterministic_and_per_image():
    torch.manual_seed(0)
    model = ResidualCNN(widths=(8, 16, 32))
    model(torch.randn(16, 3, 32, 32))  # one training-mode pass moves the running statistics
    model.eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), model(x)
        alone = model(x[:1])
    assert torch.equal(a, b)
    torch.testing.assert_close(alone, a[:1], atol=1e-5, rtol=1e-5)  # no dependence on the rest of the batch
    assert not torch.equal(model.stem[0][1].running_mean, torch.zeros(8))


def _fake_summary(path, script, acc, mtime):
    path.mkdir(parents=True)
    summary = {"script": script, "params": 3_195_146, "epochs": 10, "test_acc": acc, "train_seconds": 20.5,
               "images_per_second": 25000.0, "peak_memory_mb": 1234.0, "device_name": "NVIDIA H100"}
    (path / "summary.json").write_text(json.dumps(summary))
    os.utime(path / "summary.json", (mtime, mtime))


def test_compare_prints_the_newest_run_of_each_script(tmp_path, capsys):
    _fake_summary(tmp_path / "vit_scratch" / "old", "vit_scratch", 0.5, 1_000)
    _fake_summary(tmp_path / "vit_scratch" / "new", "vit_scratch", 0.75, 2_000)
    _fake_summary(tmp_path / "cnn_baseline" / "a", "cnn_baseline", 0.9, 1_500)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{not json")
    _fake_summary(tmp_path / "lora_caption" / "a", "lora_caption", None, 1_700)  # captioning: no accuracy
    printed = cnn_baseline.main(["--compare", str(tmp_path), "--no-progress"])  # harmless in any mode
    assert capsys.readouterr().out.strip() == printed
    table = printed.splitlines()
    header = "| model | data | params | trainable | epochs | test score | train s | img/s | peak MB | device |"
    assert table[0].startswith(header)
    assert len(table) == 5 and table[2].startswith("| cnn_baseline |") and "90.00%" in table[2]
    assert table[3].startswith("| lora_caption | - | 3.20M | - | 10 | - | 20.5 |")
    table = table[:3] + table[4:]
    assert table[3].startswith("| vit_scratch | - | 3.20M | - | 10 | acc 75.00% | 20.5 | 25,000 | 1,234 | "
                               "NVIDIA H100 |")
    assert table[3].endswith(f"{tmp_path / 'vit_scratch' / 'new'} |")


def test_compare_on_a_folder_without_runs_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cnn_baseline.main(["--compare", str(tmp_path)])
    assert "no summary.json found" in capsys.readouterr().err


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    model = ResidualCNN(widths=(8, 16, 32)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(
            model(x.contiguous(memory_format=torch.channels_last)), reference, atol=1e-5, rtol=1e-5
        )
