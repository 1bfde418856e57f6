"""lora_caption.py's part of issue 24: a captioner composed from an image encoder and a decoder (item 1), and full
fine-tuning in the script's own loop (item 2). Tiny random checkpoints, built offline, loaded through the script."""
import argparse
import json

import pytest
import torch
from transformers import GPT2LMHeadModel, VisionEncoderDecoderModel, ViTModel

import cnn_baseline
import lora_caption
from conftest import TINY_CAPTIONS, build_tiny_parts, one_line_error


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_tiny_parts(tmp_path_factory.mktemp("parts"))


def train(*flags, out):
    return lora_caption.main(["--data-dir", str(TINY_CAPTIONS), "--device", "cpu", "--batch-size", "10",
                              "--eval-images", "3", "--no-plots", "--out-dir", str(out), *map(str, flags)])


def composed_flags(parts):
    return ["--encoder", parts / "encoder", "--decoder", parts / "decoder", "--lr", "3e-3", "--save-every", "3",
            "--eval-every", "3", "--epochs", "2", "--no-baseline"]


@pytest.fixture(scope="module")
def composed(parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("composed") / "run"
    return out, train(*composed_flags(parts), out=out)


def test_issue24_1_composed_loss_falls_cross_attention_trains_in_full_encoder_and_decoder_stay(composed, parts):
    out, summary = composed
    losses = [row["train_loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert len(losses) == 7 and losses[-1] < losses[0]  # steps 3, 6, ..., 18 and the last, 20
    assert summary["composed_from"] == [str(parts / "encoder"), str(parts / "decoder")]
    new = json.loads((out / "base" / "new_modules.json").read_text())
    assert new == sorted(new) and "enc_to_dec_proj" in new and sum("crossattention.c_attn" in n for n in new) == 2

    base = VisionEncoderDecoderModel.from_pretrained(out / "base").state_dict()
    trained = lora_caption.load_trained(out).model.merge_and_unload().state_dict()
    assert trained.keys() == base.keys()
    encoder = ViTModel.from_pretrained(parts / "encoder").state_dict()
    decoder = GPT2LMHeadModel.from_pretrained(parts / "decoder").state_dict()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    for name in changed:  # the new modules train in full; the decoder's own layers through their adapters
        assert any(name.startswith(m + ".") for m in new) or any(f".{t}." in name for t in lora_caption.DECODER_TARGETS)
    assert {f"{m}.weight" for m in new} <= changed  # every new module's weight moved
    for name, value in encoder.items():  # the encoder is the checkpoint's, unchanged (the cache relies on it)
        assert torch.equal(trained[f"encoder.{name}"], value), name
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight"):
        assert torch.equal(trained[f"decoder.{name}"], decoder[name]), name  # no adapter there: as loaded
    assert summary["trainable_params"] < summary["params"] and summary["finetune"] == "lora"


def test_issue24_1_a_composed_run_loads_back_equal_by_load_trained_caption_and_merge(composed, tmp_path, capsys):
    out, summary = composed
    names = [e["image"] for e in summary["examples"]]
    images = [TINY_CAPTIONS / "images" / n for n in names]
    captioner = lora_caption.load_trained(out)
    assert lora_caption.caption_images(captioner, images) == [e["after"] for e in summary["examples"]]
    lora_caption.main(["--merge", "--adapter", str(out / "adapter"), "--out-dir", str(tmp_path / "merged"),
                       "--device", "cpu"])
    merged = lora_caption.load_trained(tmp_path / "merged")
    assert lora_caption.caption_images(merged, images) == [e["after"] for e in summary["examples"]]
    capsys.readouterr()
    printed = lora_caption.main(["--caption", str(images[0]), "--adapter", str(out / "adapter"), "--device", "cpu"])
    assert printed == {str(images[0]): summary["examples"][0]["after"]}


def test_issue24_1_a_composed_run_resumed_equals_the_uninterrupted_one(composed, parts, tmp_path, monkeypatch):
    out, _ = composed
    real = lora_caption.after_step

    def interrupted_after_step_4(args, progress, *rest):
        real(args, progress, *rest)
        if progress.step == 4:
            raise KeyboardInterrupt  # the state saved at step 3 survives
    monkeypatch.setattr(lora_caption, "after_step", interrupted_after_step_4)
    with pytest.raises(SystemExit):
        train(*composed_flags(parts), out=tmp_path / "cut")
    monkeypatch.setattr(lora_caption, "after_step", real)
    lora_caption.main(["--resume", str(tmp_path / "cut"), "--device", "cpu"])
    full = torch.load(out / "training_state.pt", weights_only=True)["trainable"]
    resumed = torch.load(tmp_path / "cut" / "training_state.pt", weights_only=True)["trainable"]
    assert full.keys() == resumed.keys() and any("modules_to_save" in k for k in full)
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_issue24_2_full_fine_tuning_changes_every_weight_and_compares_with_lora(tiny_captioner, composed, tmp_path,
                                                                                capsys):
    summary = train("--model", tiny_captioner, "--finetune", "full", "--max-steps", "4", "--lr", "1e-3",
                    out=tmp_path / "full")
    before = VisionEncoderDecoderModel.from_pretrained(tiny_captioner).state_dict()
    after = VisionEncoderDecoderModel.from_pretrained(tmp_path / "full" / "model").state_dict()
    same = sorted(k for k in before if torch.equal(before[k], after[k]))
    assert same == ["encoder.pooler.dense.bias", "encoder.pooler.dense.weight"]  # the decoder never reads the pooler
    pooler = sum(before[k].numel() for k in same)
    assert summary["trainable_params"] == summary["params"] - pooler and summary["finetune"] == "full"
    assert summary["model_bytes"] > 0 and summary["adapter_bytes"] is None
    assert "step: eager (the encoder trains: --finetune full)" in capsys.readouterr().out
    # what was saved captions as the run did
    images = [TINY_CAPTIONS / "images" / e["image"] for e in summary["examples"]]
    captions = lora_caption.caption_images(lora_caption.load_trained(tmp_path / "full"), images)
    assert captions == [e["after"] for e in summary["examples"]]
    # side by side with a LoRA run in --compare
    (tmp_path / "runs").mkdir()
    for run in (tmp_path / "full", composed[0]):
        (tmp_path / "runs" / run.name).mkdir()
        (tmp_path / "runs" / run.name / "summary.json").write_text((run / "summary.json").read_text())
    table = cnn_baseline.main(["--compare", str(tmp_path / "runs")]).splitlines()
    full_row = next(r for r in table if r.startswith("| lora_caption (full)"))
    lora_row = next(r for r in table if r.startswith("| lora_caption (lora, composed)"))
    assert f"| {summary['trainable_params'] / 1e6:.2f}M |" in full_row
    assert f"| {composed[1]['trainable_params'] / 1e6:.2f}M |" in lora_row


def test_issue24_2_freeze_encoder_keeps_it_and_caches_it(tiny_captioner, tmp_path, capsys):
    summary = train("--model", tiny_captioner, "--finetune", "full", "--freeze-encoder", "--max-steps", "2",
                    out=tmp_path / "run")
    before = VisionEncoderDecoderModel.from_pretrained(tiny_captioner).state_dict()
    after = VisionEncoderDecoderModel.from_pretrained(tmp_path / "run" / "model").state_dict()
    for name in before:
        assert torch.equal(before[name], after[name]) == name.startswith("encoder."), name
    assert "encoder output cached" in capsys.readouterr().out and summary["args"]["lr"] == 5e-5


@pytest.mark.parametrize("flags, words", [
    (["--finetune", "full", "--rank", "8"], "--rank has no effect with --finetune full"),
    (["--freeze-encoder"], "--freeze-encoder goes with --finetune full"),
    (["--encoder", "x"], "--encoder and --decoder compose a captioner together"),
    (["--encoder", "x", "--decoder", "y", "--model", "z"], "--encoder and --decoder compose a captioner together"),
    (["--encoder", "x", "--decoder", "y", "--cross-attention"], "--cross-attention has no effect with --encoder"),
])
def test_issue24_1_2_flags_that_cannot_apply_are_refused_in_one_line(flags, words, tmp_path, capsys):
    assert words in one_line_error(capsys, lambda: train(*flags, out=tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_issue24_1_a_decoder_that_cannot_cross_attend_is_named(parts, tmp_path, capsys):
    err = one_line_error(capsys, lambda: train("--encoder", parts / "encoder", "--decoder", parts / "encoder",
                                               out=tmp_path / "run"))
    assert f"--decoder {parts / 'encoder'}: " in err


def test_issue24_2_full_fine_tuning_with_a_frozen_encoder_the_graphs_body_is_the_eager_step_bit_for_bit(
        tiny_captioner):
    """--finetune full --freeze-encoder is captured on a GPU (test_gpu.py): the body the graph records, run
    eagerly on the CPU, trains exactly what the eager step trains, every decoder weight and AdamW's state."""
    from test_lora_fast import assert_equal_bitwise, eager_and_body
    model, tokenizer, processor = lora_caption.load_captioner(str(tiny_captioner), torch.device("cpu"))
    model = lora_caption.make_trainable(model, argparse.Namespace(finetune="full", freeze_encoder=True), [])
    size, resample = lora_caption.processor_geometry(processor)
    split = lora_caption.load_caption_data(TINY_CAPTIONS, size, resample, seed=0, log=lambda *_: None)["train"]
    tokens = lora_caption.pair_tokens(tokenizer, split, 40)
    cache = lora_caption.EncoderCache(model, lora_caption.Pixels(processor, torch.device("cpu")), split.images, None)
    assert lora_caption.encoder_cache_blocker(model) is None
    a, b = eager_and_body(model, tokens, cache)
    assert_equal_bitwise(a, b)
    assert sum(k.startswith("decoder.") for k in a) == sum(1 for n, _ in model.named_parameters()
                                                           if n.startswith("decoder."))


def test_overwriting_a_composed_run_with_a_full_one_leaves_nothing_of_the_first(parts, tiny_captioner, tmp_path):
    out = tmp_path / "run"
    train("--encoder", parts / "encoder", "--decoder", parts / "decoder", "--max-steps", "2", out=out)
    assert (out / "base").is_dir() and (out / "adapter").is_dir()
    summary = train("--model", tiny_captioner, "--finetune", "full", "--max-steps", "2", "--overwrite", out=out)
    assert not (out / "base").exists() and not (out / "adapter").exists() and summary["composed_from"] is None
    captioner = lora_caption.load_trained(out)  # the full run's model/, not a stale adapter
    assert type(captioner.model).__name__ == "VisionEncoderDecoderModel"
    images = [TINY_CAPTIONS / "images" / e["image"] for e in summary["examples"]]
    assert lora_caption.caption_images(captioner, images) == [e["after"] for e in summary["examples"]]
    # and a composed run over it composes anew (no base/ of an earlier run is taken for its own)
    train("--encoder", parts / "encoder", "--decoder", parts / "decoder", "--max-steps", "2", "--overwrite", out=out)
    assert not (out / "model").exists() and (out / "base" / "new_modules.json").is_file()


def test_a_moved_composed_run_still_captions_and_a_resume_finds_its_parts_from_anywhere(parts, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.chdir(parts)  # parts typed as relative folders: the run records them resolved
    summary = train("--encoder", "encoder", "--decoder", "decoder", "--max-steps", "2", out=tmp_path / "run")
    assert summary["args"]["encoder"] == str(parts / "encoder")
    (tmp_path / "run").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    images = [TINY_CAPTIONS / "images" / e["image"] for e in summary["examples"]]
    captions = lora_caption.caption_images(lora_caption.load_trained(tmp_path / "moved"), images)
    assert captions == [e["after"] for e in summary["examples"]]
    printed = lora_caption.main(["--caption", str(images[0]), "--adapter", "moved/adapter", "--device", "cpu"])
    assert printed == {str(images[0]): captions[0]}
    # a composed full run resumed from another folder finds its encoder and decoder
    monkeypatch.chdir(parts)
    real = lora_caption.after_step

    def stop_after_step_2(args, progress, *rest):
        real(args, progress, *rest)
        if progress.step == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(lora_caption, "after_step", stop_after_step_2)
    with pytest.raises(SystemExit):
        train("--encoder", "encoder", "--decoder", "decoder", "--finetune", "full", "--max-steps", "4",
              "--save-every", "2", out=tmp_path / "full")
    monkeypatch.setattr(lora_caption, "after_step", real)
    monkeypatch.chdir(tmp_path)
    assert lora_caption.main(["--resume", str(tmp_path / "full"), "--device", "cpu"])["steps"] == 4


def test_the_kernels_command_line_is_told_from_run_s(monkeypatch):
    import common
    for argv, kernel in ((["/x/ipykernel_launcher.py", "-f", "/r/kernel-1.json"], True),
                         (["/usr/local/bin/colab_kernel_launcher.py", "-f", "/r/k.json"], True),
                         (["vit_scratch (1).py", "--epochs", "3"], False), (["vit_scratch.py"], False)):
        monkeypatch.setattr("sys.argv", argv)
        assert common.kernel_command_line() == kernel, argv


def test_model_and_base_folders_mark_a_captioner_run_only(tiny_cifar, tmp_path):
    """A CIFAR script's --out-dir may hold a model/ or base/ folder of the user's: not a run of its own kind."""
    import vit_scratch
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "base").mkdir()
    vit_scratch.main(["--data-dir", str(tiny_cifar), "--device", "cpu", "--epochs", "1", "--embed-dim", "16",
                      "--hidden-dim", "32", "--num-heads", "2", "--num-layers", "1", "--batch-size", "50",
                      "--no-plots", "--out-dir", str(out)])
    assert (out / "model").is_dir() and (out / "base").is_dir() and (out / "last.pt").is_file()
