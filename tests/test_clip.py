"""clip_zeroshot.py on a tiny random CLIP saved to disk and loaded through the script's own path."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_zeroshot
from common import load_cifar10
from conftest import ROOT, one_line_error


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
    torchvision_backed = any("Torchvision" in c.__name__ or c.__name__.endswith("Fast")
                             for c in type(processor).__mro__)
    tolerance = 1e-5 if torchvision_backed else 2 / 255 / min(processor.image_std)
    assert (ours - reference).abs().max() <= tolerance


@pytest.mark.parametrize("resample", [2, 3], ids=["bilinear", "bicubic"])
def test_tensor_preprocessing_follows_the_processors_resample_issue_21_C1(resample, tiny_cifar):
    """Issue 21 C1: a bilinear processor was resized bicubic (up to 25 levels off on 70% of the values)."""
    from transformers import CLIPImageProcessor
    processor = CLIPImageProcessor(size={"shortest_edge": 52}, crop_size={"height": 48, "width": 48},
                                   resample=resample)
    images = load_cifar10(tiny_cifar, download=False).test_x[:6]
    ours = clip_zeroshot.TensorPreprocess(processor, torch.device("cpu"))(images)
    reference = processor(images=as_pil(images), return_tensors="pt")["pixel_values"]
    assert (ours - reference).abs().max() <= 1e-5
    other = CLIPImageProcessor(size={"shortest_edge": 52}, crop_size={"height": 48, "width": 48},
                               resample=5 - resample)  # bicubic for bilinear and back
    assert (clip_zeroshot.TensorPreprocess(other, torch.device("cpu"))(images) - reference).abs().max() > 0.05


def test_logits_equal_clipmodels_logits_per_image(loaded, tiny_cifar):
    model, tokenizer, processor = loaded
    classes = ["airplane", "cat", "ship"]
    images = load_cifar10(tiny_cifar, download=False).test_x[:8]
    prompts = [f"a photo of a {c}." for c in classes]
    inputs = clip_zeroshot_processor(tokenizer, processor)(text=prompts, images=as_pil(images), return_tensors="pt",
                                                           padding=True)
    with torch.no_grad():
        reference = model(**inputs).logits_per_image
    text = clip_zeroshot.text_classifier(model, tokenizer, classes, ["a photo of a {}."], torch.device("cpu"))
    with torch.no_grad():
        feats = F.normalize(clip_zeroshot.pooled(model.get_image_features(pixel_values=inputs["pixel_values"])),
                            dim=-1)
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
    # normalise first, then average
    torch.testing.assert_close(clip_zeroshot.ensemble(emb), torch.tensor([1.0, 1.0]) / 2 ** 0.5)
    assert clip_zeroshot.ensemble(torch.tensor([[2.0, 0.0]])).tolist() == [1.0, 0.0]
    assert len(clip_zeroshot.CIFAR10_TEMPLATES) == 18
    assert all(t.count("{}") == 1 for t in clip_zeroshot.CIFAR10_TEMPLATES)


def test_the_head_starts_as_the_zero_shot_weights_in_fp32_whatever_it_is_given():
    """The head is trained (and saved with safetensors, which refuses a strided tensor): an fp32, contiguous copy."""
    given = torch.randn(5, 10).to(torch.bfloat16).T  # (K=10, D=5), bf16, not contiguous
    head = clip_zeroshot.ImageClassifier(torch.nn.Identity(), torch.nn.Identity(), given).head
    assert head.weight.dtype == torch.float32 and head.weight.is_contiguous() and head.bias.tolist() == [0.0] * 10
    assert torch.equal(head.weight, given.float()) and head.weight.data_ptr() != given.data_ptr()


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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["script"] == "clip_zeroshot" and summary["test_images"] == 100
    assert summary["templates"] == clip_zeroshot.CIFAR10_TEMPLATES and summary["classes"][0] == "airplane"
    assert 0 <= summary["test_acc"] <= summary["top5_acc"] <= 1 and sum(map(sum, summary["confusion_matrix"])) == 100
    assert summary["params"] > 0 and summary["trainable_params"] == 0 and summary["images_per_second"] > 0
    assert 0 <= summary["linear_probe"]["test_acc"] <= 1
    assert len(summary["linear_probe"]["val_acc_by_weight_decay"]) == 5
    assert all(m["true"] != m["predicted"] for m in summary["most_confused"])
    assert "zero-shot top-1" in proc.stdout and "linear probe" in proc.stdout
    assert proc.stderr == ""  # no transformers progress bars or warnings (issue 12, item 19)
    assert Image.open(out / "confusion.png").size == (720, 630)


def test_offline_without_a_local_copy_is_one_clear_error(tiny_cifar, tmp_path):
    cmd = [sys.executable, str(ROOT / "clip_zeroshot.py"), "--model", "openai/clip-vit-base-patch32",
           "--data-dir", str(tiny_cifar), "--out-dir", str(tmp_path / "r"), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "--model PATH" in last and "HF_HUB_OFFLINE" in last and "Traceback" not in proc.stderr


def test_a_bad_templates_file_is_refused(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("a photo of a {}.\nno placeholder here\n")
    with pytest.raises(SystemExit):
        clip_zeroshot.main(["--prompts", str(tmp_path / "t.txt")])
    assert "line 2: a template has no '{}' where the class name goes" in capsys.readouterr().err


def test_comments_and_blank_lines_in_a_templates_file_are_skipped_issue_21_B17(tmp_path):
    """Issue 21 B17: a '# comment' line was refused as a template with '{{}}' braces it does not have."""
    (tmp_path / "t.txt").write_text("# CIFAR-10 templates\n\na photo of a {}.\n   # an indented note\n"
                                    "a drawing of a {}.\n\n")
    assert clip_zeroshot.load_templates(str(tmp_path / "t.txt")) == ["a photo of a {}.", "a drawing of a {}."]


def test_a_bad_line_after_comments_is_named_with_its_line_number_issue_21_B17(tiny_clip, tiny_cifar, tmp_path,
                                                                              monkeypatch, capsys):
    """Issue 21 B17: the real problem of the real line, numbered as an editor numbers it."""
    (tmp_path / "t.txt").write_text("# my templates\n\na photo of a {}.\nno placeholder here\n")
    never_load_the_weights(monkeypatch)
    err = one_line_error(capsys, lambda: clip_zeroshot.main(
        ["--model", str(tiny_clip), "--data-dir", str(tiny_cifar), "--device", "cpu", "--prompts",
         str(tmp_path / "t.txt"), "--out-dir", str(tmp_path / "run")]))
    assert f"--prompts {tmp_path / 't.txt'}, line 4: a template has no '{{}}' where the class name goes" in err
    assert "'no placeholder here'" in err and "{{}}" not in err and "literal brace" not in err
    (tmp_path / "c.txt").write_text("# only a comment\n\n")
    err = one_line_error(capsys, lambda: clip_zeroshot.main(["--prompts", str(tmp_path / "c.txt")]))
    assert "no templates in it" in err


# Issue 12: what a new user tried -------------------------------------------------------------------

def never_load_the_weights(monkeypatch):
    """Checks that must come before the weights load: loading them fails the test."""
    monkeypatch.setattr(clip_zeroshot, "load_clip_model", lambda *a, **k: pytest.fail("the weights were loaded"))


LONG_TEMPLATE = "a photo of " * 10 + "a {}."  # the tiny tokenizer is per character (spaces dropped)
BAD_TEMPLATES = [
    (b"a photo of a {} :-{\n", "a template is not a valid format string (Single '{' encountered"),
    (b"a {} in {style} style\n", "a template holds {style}; the one field allowed is '{}'"),
    (b"a {{}} photo\n", "a template never inserts the class name ('{{}}' is a literal brace pair)"),
    (b"a {} next to a {}\n", "a template holds 2 fields"),
    ("une photo d'un {} déjà vu\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 19, as in a Latin-1"),
    (f"a photo of a {{}}.\n{LONG_TEMPLATE}\n".encode(), "with the class 'automobile' is 94 tokens, more than the "
                                                        "text tower's 77; shorten the template"),
]


@pytest.mark.parametrize("content, message", BAD_TEMPLATES,
                         ids=["lone-brace", "named-field", "doubled-braces", "two-fields", "latin-1", "too-long"])
def test_bad_templates_are_one_line_before_the_model_loads(content, message, tiny_clip, tiny_cifar, tmp_path,
                                                           monkeypatch, capsys):
    (tmp_path / "templates.txt").write_bytes(content)
    never_load_the_weights(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        clip_zeroshot.main(["--model", str(tiny_clip), "--data-dir", str(tiny_cifar), "--device", "cpu",
                            "--prompts", str(tmp_path / "templates.txt"), "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # the folder this run made is gone again


def test_a_template_too_long_for_the_text_tower_is_one_line_without_the_tokenizers_warning(tiny_clip):
    import logging
    config, tokenizer, _ = clip_zeroshot.load_clip_parts(str(tiny_clip))
    tokenizer.model_max_length = 77  # as the released tokenizers: they warn about longer sequences on stderr
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        with pytest.raises(clip_zeroshot.DataError, match="is 94 tokens, more than the text tower's 77"):
            clip_zeroshot.check_template_lengths([LONG_TEMPLATE], ["automobile"], tokenizer, config, "t.txt")
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert [r.getMessage() for r in logged] == []


def test_a_byte_order_mark_and_windows_line_ends_are_not_part_of_the_templates(tmp_path):
    (tmp_path / "t.txt").write_bytes("\ufeffa photo of a {}.\r\na drawing of a {}.\r\n".encode())
    assert clip_zeroshot.load_templates(str(tmp_path / "t.txt")) == ["a photo of a {}.", "a drawing of a {}."]


def test_every_template_a_class_name_goes_into_works():
    good = ["a photo of a {}.", "a {} with {{braces}}", "{}"]
    assert [clip_zeroshot.template_problem(t) for t in good] == [None] * 3
    assert [t.format("cat") for t in good] == ["a photo of a cat.", "a cat with {braces}", "cat"]


def test_linear_probe_refuses_a_training_set_too_small_to_hold_out(tiny_clip, tiny_cifar, tmp_path, monkeypatch,
                                                                   capsys):
    never_load_the_weights(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        clip_zeroshot.main(["--model", str(tiny_clip), "--data-dir", str(tiny_cifar), "--device", "cpu",
                            "--linear-probe", "--limit-train", "1", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert "--limit-train 1: the linear probe needs at least 50 training images (5 per class)" in err
    with pytest.raises(clip_zeroshot.DataError, match="too few to hold 20% out"):  # the probe itself refuses too
        clip_zeroshot.linear_probe(torch.ones(1, 4), torch.zeros(1, dtype=torch.long), torch.ones(1, 4),
                                   torch.zeros(1, dtype=torch.long), 2, seed=0)


def test_a_model_that_is_not_clip_is_one_line(tiny_captioner, tiny_cifar, tmp_path, monkeypatch, capsys):
    never_load_the_weights(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        clip_zeroshot.main(["--model", str(tiny_captioner), "--data-dir", str(tiny_cifar), "--device", "cpu",
                            "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"--model {tiny_captioner} holds a VisionEncoderDecoderModel, not a CLIPModel" in err


def test_no_transformers_noise_on_stderr(tiny_clip, tiny_cifar, tmp_path, capfd):
    from transformers.utils import logging
    assert logging.is_progress_bar_enabled()  # transformers would draw its "Loading weights" bar
    clip_zeroshot.main(["--model", str(tiny_clip), "--data-dir", str(tiny_cifar), "--device", "cpu", "--no-plots",
                        "--out-dir", str(tmp_path / "run")])
    out, err = capfd.readouterr()
    assert "zero-shot top-1" in out and err == ""
    assert logging.is_progress_bar_enabled()  # switched off while loading only


def test_top5_and_probe_accuracies_are_exact_fractions_issue_21_C3(loaded, tiny_clip, tiny_cifar, tmp_path):
    """Issue 21 C3: top5_acc was a float32 mean (0.5600000023841858 for 28/50); now counted in integers."""
    from common import stratified_subset
    summary = clip_zeroshot.main(["--model", str(tiny_clip), "--data-dir", str(tiny_cifar), "--device", "cpu",
                                  "--limit-test", "50", "--linear-probe", "--limit-train", "100", "--no-plots",
                                  "--no-progress", "--out-dir", str(tmp_path / "run")])
    model, tokenizer, processor = loaded
    data = load_cifar10(tiny_cifar, download=False)
    idx = stratified_subset(data.test_y, 50, seed=0, name="--limit-test")
    cpu = torch.device("cpu")
    text = clip_zeroshot.text_classifier(model, tokenizer, data.classes, ["a photo of a {}."], cpu)
    features = clip_zeroshot.encode_images(model, clip_zeroshot.TensorPreprocess(processor, cpu), data.test_x[idx],
                                           50, cpu, no_progress=True)
    top5 = clip_zeroshot.zero_shot_logits(features, text, 1.0).topk(5, dim=1).indices
    correct = sum(int(y) in row for y, row in zip(data.test_y[idx].tolist(), top5.tolist()))
    assert torch.tensor(correct / 50).item() != correct / 50  # a count whose float32 mean would show the noise
    assert summary["top5_acc"] == correct / 50
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["top5_acc"] == correct / 50 and written["test_acc"] == summary["test_acc"]
    probe = written["linear_probe"]
    assert probe["test_acc"] == round(probe["test_acc"] * 50) / 50
    assert all(v == round(v * 20) / 20 for v in probe["val_acc_by_weight_decay"].values())  # 20 held out of 100


@pytest.mark.parametrize("model", ["/no/such/folder", "./no-such-clip", "~/no-such-clip-folder", "a/b/c",
                                   "models/no-such-clip"])
def test_a_model_path_that_does_not_exist_is_no_such_folder_issue_21_B21(model, tiny_cifar, tmp_path, capsys,
                                                                          monkeypatch):
    """Issue 21 B21: a missing folder showed the Hub's "Repo id must be in the form ..." text. models/no-such-clip
    may be a hub id, but beside a models/ folder it is likely a typo: the hub failure says there is no such folder
    here either (a sixth trial)."""
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    if model.startswith("models/"):
        err = one_line_error(capsys, lambda: clip_zeroshot.main(["--model", model, "--data-dir", str(tiny_cifar),
                                                                 "--device", "cpu"]))
        assert f"cannot load CLIP model '{model}'" in err and f"there is no folder {model} here either" in err
        return
    err = one_line_error(capsys, lambda: clip_zeroshot.main(["--model", model, "--data-dir", str(tiny_cifar),
                                                             "--device", "cpu", "--out-dir", str(tmp_path / "run")]))
    assert f"--model {model}: no such folder" in err and "Repo id" not in err
    assert not (tmp_path / "run").exists()


def test_a_model_that_is_a_file_is_not_a_folder_issue_21_B21(tiny_clip, tiny_cifar, tmp_path, capsys):
    weights = tiny_clip / "model.safetensors"
    err = one_line_error(capsys, lambda: clip_zeroshot.main(["--model", str(weights), "--data-dir", str(tiny_cifar),
                                                             "--device", "cpu", "--out-dir", str(tmp_path / "run")]))
    assert f"--model {weights}: not a folder" in err


def test_clip_loaded_by_the_script_is_never_kernelized_issue_21_A2(tiny_clip, monkeypatch):
    """Issue 21 A2: transformers >= 5 fetches Hub kernels and swaps them in at train()/eval() unless the load says
    use_kernels=False; with USE_HUB_KERNELS unset nothing else stops it."""
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    model = clip_zeroshot.load_clip_model(str(tiny_clip), torch.device("cpu"))
    for switch in (model.train, model.eval):
        switch()
        assert getattr(model, "use_kernels", False) is False
    model, _, _ = clip_zeroshot.load_clip(str(tiny_clip), torch.device("cpu"))
    model.train()
    assert getattr(model, "use_kernels", False) is False
