"""clip_zeroshot.py on a tiny random CLIP saved to disk and loaded through the script's own path."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_zeroshot
from common import load_cifar10
from conftest import ROOT


@pytest.fixture(scope="module")
def loaded(tiny_clip):
    return clip_zeroshot.load_clip(str(tiny_clip), torch.device("cpu"))


def as_pil(images):
    return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]


def test_tensor_preprocessing_matches_the_models_image_processor(loaded, tiny_cifar):
    _, _, processor = loaded
    images = load_cifar10(tiny_cifar, download=False).test_x[:16]
    ours = clip_zeroshot.TensorPreprocess(processor, torch.device("cpu"))(images)
    reference = processor(images=as_pil(images), return_tensors="pt")["pixel_values"]
    assert ours.shape == reference.shape == (16, 3, 48, 48)
    # transformers 5 processors resize with torchvision, as we do: equal up to float round-off (1e-5).
    # The PIL processors of transformers 4 round their bicubic kernel differently: 2 uint8 levels.
    torchvision_backed = any("Torchvision" in c.__name__ or c.__name__.endswith("Fast") for c in type(processor).__mro__)
    tolerance = 1e-5 if torchvision_backed else 2 / 255 / min(processor.image_std)
    assert (ours - reference).abs().max() <= tolerance


def test_logits_equal_clipmodels_logits_per_image(loaded, tiny_cifar):
    model, tokenizer, processor = loaded
    classes = ["airplane", "cat", "ship"]
    images = load_cifar10(tiny_cifar, download=False).test_x[:8]
    prompts = [f"a photo of a {c}." for c in classes]
    inputs = clip_zeroshot_processor(tokenizer, processor)(text=prompts, images=as_pil(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model(**inputs).logits_per_image
    text = clip_zeroshot.text_classifier(model, tokenizer, classes, ["a photo of a {}."], torch.device("cpu"))
    with torch.no_grad():
        feats = F.normalize(clip_zeroshot.pooled(model.get_image_features(pixel_values=inputs["pixel_values"])), dim=-1)
    ours = clip_zeroshot.zero_shot_logits(feats, text, model.logit_scale.exp().item())
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)  # same pixels: float32 round-off only
    end_to_end = clip_zeroshot.encode_images(model, clip_zeroshot.TensorPreprocess(processor, torch.device("cpu")),
                                             images, 4, torch.device("cpu"), no_progress=True)
    torch.testing.assert_close(clip_zeroshot.zero_shot_logits(end_to_end, text, model.logit_scale.exp().item()),
                               reference, atol=1e-4, rtol=1e-4)  # from uint8 tensors through our preprocessing


def clip_zeroshot_processor(tokenizer, processor):
    from transformers import CLIPProcessor
    return CLIPProcessor(image_processor=processor, tokenizer=tokenizer)


def test_prompt_ensembling_math_on_hand_made_embeddings():
    emb = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # two templates of one class, very different norms
    torch.testing.assert_close(clip_zeroshot.ensemble(emb), torch.tensor([1.0, 1.0]) / 2 ** 0.5)  # normalise first, then average
    assert clip_zeroshot.ensemble(torch.tensor([[2.0, 0.0]])).tolist() == [1.0, 0.0]
    assert len(clip_zeroshot.CIFAR10_TEMPLATES) == 18 and all(t.count("{}") == 1 for t in clip_zeroshot.CIFAR10_TEMPLATES)


def test_linear_probe_recovers_labels_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(4, 16, generator=g), dim=1) * 3
    y = torch.arange(4).repeat(100)
    x = centers[y] + 0.3 * torch.randn(400, 16, generator=g)
    result = clip_zeroshot.linear_probe(x[:300], y[:300], x[300:], y[300:], 4, seed=0)
    assert result["test_acc"] == 1.0 and result["weight_decay"] in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    shuffled = clip_zeroshot.linear_probe(x[:300], y[torch.randperm(300, generator=g)], x[300:], y[300:], 4, seed=0)
    assert shuffled["test_acc"] < 0.5  # no signal, no accuracy: the probe is not reading the labels elsewhere


def test_cli_smoke_run_writes_the_summary(tiny_clip, tiny_cifar, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "clip_zeroshot.py"), "--model", str(tiny_clip), "--data-dir", str(tiny_cifar),
           "--out-dir", str(out), "--prompts", "ensemble", "--linear-probe", "--batch-size", "64", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["script"] == "clip_zeroshot" and summary["test_images"] == 100
    assert summary["templates"] == clip_zeroshot.CIFAR10_TEMPLATES and summary["classes"][0] == "airplane"
    assert 0 <= summary["test_acc"] <= summary["top5_acc"] <= 1 and sum(map(sum, summary["confusion_matrix"])) == 100
    assert summary["params"] > 0 and summary["trainable_params"] == 0 and summary["images_per_second"] > 0
    assert 0 <= summary["linear_probe"]["test_acc"] <= 1 and len(summary["linear_probe"]["val_acc_by_weight_decay"]) == 5
    assert all(m["true"] != m["predicted"] for m in summary["most_confused"])
    assert "zero-shot top-1" in proc.stdout and "linear probe" in proc.stdout
    assert Image.open(out / "confusion.png").size == (720, 630)


def test_offline_without_a_local_copy_is_one_clear_error(tiny_cifar, tmp_path):
    cmd = [sys.executable, str(ROOT / "clip_zeroshot.py"), "--model", "openai/clip-vit-base-patch32",
           "--data-dir", str(tiny_cifar), "--out-dir", str(tmp_path / "r"), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "--model PATH" in last and "HF_HUB_OFFLINE" in last and "Traceback" not in proc.stderr


def test_a_bad_templates_file_is_refused(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("a photo of a {}.\nno placeholder here\n")
    with pytest.raises(SystemExit):
        clip_zeroshot.main(["--prompts", str(tmp_path / "t.txt")])
    assert "first bad line: 'no placeholder here'" in capsys.readouterr().err
