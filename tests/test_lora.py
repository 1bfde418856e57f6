"""lora_caption.py on a tiny random ViT-GPT2 captioner saved to disk and loaded through the script."""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import lora_caption
from conftest import ROOT, TINY_CAPTIONS, one_line_error

CPU = torch.device("cpu")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def lora_args(**kw):
    base = dict(rank=16, alpha=32, lora_dropout=0.05, targets=lora_caption.DECODER_TARGETS, cross_attention=False)
    return argparse.Namespace(**{**base, **kw})


def load_data(processor, root=TINY_CAPTIONS, log=print):
    size, resample = lora_caption.processor_geometry(processor)
    return lora_caption.load_caption_data(root, size, resample, seed=0, log=log)


def batch(tokenizer, processor, data, n=10):
    split = data["train"]
    tokens = lora_caption.pair_tokens(tokenizer, split, 40)
    pixels = lora_caption.Pixels(processor, CPU)(split.images[tokens["pair_image"][:n]])
    return pixels, tokens["labels"][:n]


def test_full_size_trainable_count_is_the_guides():
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), GPT2Config(add_cross_attention=True))
    with torch.device("meta"):  # the real architecture's shapes, no memory, no download
        model = lora_caption.add_lora(VisionEncoderDecoderModel(config), lora_args())
    assert lora_caption.count_params(model) == (2_359_296, 241_555_200)


@pytest.mark.parametrize("cross", [False, True])
def test_trainable_count_is_r_times_din_plus_dout_over_matched_modules(tiny_captioner, cross):
    model, _, _ = lora_caption.load_captioner(str(tiny_captioner), CPU)
    targets = lora_caption.DECODER_TARGETS + (lora_caption.CROSS_ATTENTION_TARGETS if cross else [])
    expected = 0
    for name, module in model.named_modules():
        if any(name.endswith("." + t) for t in targets):
            d_in, d_out = module.weight.shape  # GPT-2's Conv1D: (in, out)
            expected += 4 * (d_in + d_out)
    peft_model = lora_caption.add_lora(model, lora_args(rank=4, cross_attention=cross))
    assert lora_caption.count_params(peft_model)[0] == expected > 0
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in names) and all(".decoder." in n for n in names)
    assert any("crossattention" in n for n in names) == cross


def test_training_moves_only_the_adapters_and_lowers_the_loss(tiny_captioner):
    model, tokenizer, processor = lora_caption.load_captioner(str(tiny_captioner), CPU)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = lora_caption.add_lora(model, lora_args(lora_dropout=0.0))
    pixels, labels = batch(tokenizer, processor, load_data(processor))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == ("lora_" in name), name  # no gradient is computed for frozen weights
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    base = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    assert base.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(base[key], value), key  # bit-identical
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_labels_are_minus_100_exactly_on_padding_and_keep_eos(tiny_captioner):
    _, tokenizer, _ = lora_caption.load_captioner(str(tiny_captioner), CPU)
    ids, mask, labels = lora_caption.tokenize_captions(tokenizer, ["a dog", "a cat runs fast", "x" * 100],
                                                       max_length=12)
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    assert mask.sum(1).tolist() == [6, 12, 12] and ids.shape == (3, 12)
    assert torch.equal(labels == -100, mask == 0)
    assert labels[0, 5] == eos and labels[1, -1] == eos and labels[2, -1] == eos  # EOS learned, even when truncated
    assert (ids[0, 6:] == eos).all()


def test_adapter_reload_on_a_fresh_base_reproduces_logits_and_merge_matches(tiny_captioner, tmp_path):
    from peft import PeftModel
    model, tokenizer, processor = lora_caption.load_captioner(str(tiny_captioner), CPU)
    model = lora_caption.add_lora(model, lora_args())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # B starts at zero; make the adapter matter
    model.eval()
    pixels, labels = batch(tokenizer, processor, load_data(processor), n=4)
    with torch.no_grad():
        logits = model(pixel_values=pixels, labels=labels).logits
    common.save_adapter(model, tmp_path)
    fresh, _, _ = lora_caption.load_captioner(str(tiny_captioner), CPU)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels, labels=labels).logits, logits, atol=1e-6, rtol=1e-6)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(pixel_values=pixels, labels=labels).logits, logits, atol=1e-4, rtol=1e-4)
        base, _, _ = lora_caption.load_captioner(str(tiny_captioner), CPU)
        assert not torch.allclose(base.eval()(pixel_values=pixels, labels=labels).logits, logits, atol=1e-3)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                        "adapter_model.safetensors"]


def make_messy_set(root):
    """The shipped set plus every kind of bad row and unusual image the loader must cope with."""
    shutil.copytree(TINY_CAPTIONS, root)
    (root / "splits.json").unlink()
    images = root / "images"
    rgb = np.array(Image.open(next(images.iterdir())).convert("RGB"))
    Image.fromarray(rgb).convert("L").save(images / "grey.png")
    Image.fromarray(rgb).convert("RGBA").save(images / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(images / "cmyk.jpg")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(images / "deep16.png")  # 16-bit grey
    tall = Image.fromarray(np.zeros((40, 20, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when shown
    tall.save(images / "rotated.jpg", exif=exif)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with open(root / "captions.csv", "a", newline="") as f:
        w = csv.writer(f)
        for name in ("grey.png", "rgba.png", "cmyk.jpg", "deep16.png", "rotated.jpg"):
            w.writerow([name, f"an unusual image called {name}"])
        w.writerows([["missing.jpg", "a picture that is not there"], ["corrupt.jpg", "a broken file"],
                     ["grey.png", "   "], ["grey.png", "an unusual image called grey.png"], ["only-one-field"]])
    return root


def test_bad_rows_and_images_are_reported_and_skipped(tmp_path, tiny_captioner):
    _, _, processor = lora_caption.load_captioner(str(tiny_captioner), CPU)
    logged = []
    data = load_data(processor, make_messy_set(tmp_path / "set"), log=logged.append)
    text = "\n".join(logged)
    for expected in ("skipped 1 caption row(s) (malformed row)", "skipped 1 caption row(s) (empty caption)",
                     "skipped 1 caption row(s) (duplicate row)", "skipped 1 image(s) (missing): missing.jpg",
                     "skipped 1 image(s) (unreadable): corrupt.jpg"):
        assert expected in text, text
    names = sum((s.names for s in data.values()), [])
    assert len(names) == 35 and len(set(names)) == 35 and "corrupt.jpg" not in names
    every = {n: img for s in data.values() for n, img in zip(s.names, s.images)}
    for name in ("grey.png", "rgba.png", "cmyk.jpg", "deep16.png", "rotated.jpg"):
        assert every[name].shape == (3, 32, 32) and every[name].dtype == torch.uint8
    assert torch.equal(every["grey.png"][0], every["grey.png"][2])
    deep = every["deep16.png"].float()
    assert 20 < deep.mean() < 235  # scaled to 8 bits, not clipped to white
    assert sum(len(s.names) for s in data.values()) == 35 and len(data["val"].names) == len(data["test"].names) == 3


def test_exif_rotation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((40, 20, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "r.jpg", exif=exif)
    assert lora_caption.open_rgb(tmp_path / "r.jpg").size == (40, 20)  # (width, height) after the rotation


@pytest.mark.parametrize("content, message", [("picture,text\na.jpg,a dog\n", "needs the columns image,caption"),
                                              ("image,caption\nmissing.jpg,a dog\n", "no readable image")])
def test_unusable_caption_tables_are_one_clear_error(tmp_path, content, message, tiny_captioner, capsys):
    (tmp_path / "captions.csv").write_text(content)
    err = one_line_error(capsys, lambda: lora_caption.main(["--model", str(tiny_captioner), "--data-dir", str(tmp_path),
                                                            "--device", "cpu", "--out-dir", str(tmp_path / "run")]))
    assert message in err, err
    assert not (tmp_path / "run" / "adapter").exists()


def run_cli(*flags, timeout=300):
    proc = subprocess.run([sys.executable, str(ROOT / "lora_caption.py"), *map(str, flags)],
                          capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_train_caption_merge(tiny_captioner, tmp_path, capsys):
    out = tmp_path / "run"
    proc = run_cli("--model", tiny_captioner, "--data-dir", TINY_CAPTIONS, "--out-dir", out, "--device", "cpu",
                   "--epochs", "4", "--batch-size", "10", "--lr", "1e-2", "--eval-every", "10", "--save-every", "10")
    assert "before fine-tuning: BLEU-4" in proc.stdout and "trainable 16,384 of 85,664" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    for key in ("script", "dataset", "device", "device_name", "epochs", "steps", "test_acc", "train_seconds",
                "images_per_second", "peak_memory_mb", "params", "trainable_params", "args", "bleu4", "cider",
                "bleu4_before", "cider_before", "adapter_bytes", "examples"):
        assert key in summary, key
    assert summary["steps"] == 40 and summary["epochs"] == 4.0 and summary["trainable_params"] == 16_384
    assert 0 <= summary["bleu4"] <= 1 and summary["cider"] >= 0 and len(summary["examples"]) == 5
    assert summary["adapter_bytes"] < 200_000
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40] and rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert Image.open(out / "curves.png").size == (840, 330)
    sheet = (out / "captions.html").read_text()
    val_names = json.loads((TINY_CAPTIONS / "splits.json").read_text())["val"]
    assert sheet.count("<img ") == 5 and all(n in sheet for n in val_names)

    image = next((TINY_CAPTIONS / "images").iterdir())
    # --caption in this process (in a subprocess: test_lora_trials.py)
    lora_caption.main(["--caption", str(image), str(image), "--adapter", str(out / "adapter"), "--device", "cpu"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(image))]
    assert len(lines) == 2 and lines[0] == lines[1]  # greedy decoding is deterministic
    lora_caption.main(["--caption", str(image), "--adapter", str(out), "--device", "cpu",  # the run's folder too
                       "--no-progress"])  # harmless in any mode (it was refused)
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(image))] == lines[:1]
    # --merge and captions by the merged model: test_lora_trials.py (in process, and on stderr in a subprocess)


def test_resume_at_step_level_gives_the_same_adapter(tiny_captioner, tmp_path, monkeypatch):
    flags = ["--model", str(tiny_captioner), "--data-dir", str(TINY_CAPTIONS), "--device", "cpu", "--epochs", "2",
             "--batch-size", "10", "--lr", "1e-2", "--eval-every", "100", "--save-every", "3", "--no-baseline",
             "--eval-images", "2"]
    lora_caption.main([*flags, "--out-dir", str(tmp_path / "full")])

    real = lora_caption.after_step

    def interrupted_after_step_7(args, progress, *rest):
        real(args, progress, *rest)
        if progress.step == 7:
            raise KeyboardInterrupt  # Ctrl-C: the state saved at step 6 is what survives
    monkeypatch.setattr(lora_caption, "after_step", interrupted_after_step_7)
    with pytest.raises(SystemExit) as stop:
        lora_caption.main([*flags, "--out-dir", str(tmp_path / "cut")])
    monkeypatch.setattr(lora_caption, "after_step", real)
    assert stop.value.code == 130
    assert torch.load(tmp_path / "cut" / "training_state.pt", weights_only=True)["state"]["step"] == 6

    summary = lora_caption.main(["--resume", str(tmp_path / "cut" / "training_state.pt"), "--device", "cpu"])
    full = torch.load(tmp_path / "full" / "training_state.pt", weights_only=True)["trainable"]
    resumed = torch.load(tmp_path / "cut" / "training_state.pt", weights_only=True)["trainable"]
    assert full.keys() == resumed.keys() and len(full) == 16
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    assert summary["steps"] == 20
