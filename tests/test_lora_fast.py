"""The fast LoRA step (issue 14) on the tiny random captioner: each speed-up leaves the results unchanged (the
encoder cache, frozen weights in bf16, the loss computed once on static shapes, the captured step), and each
falls back to the plain path where it cannot apply."""
import argparse
import contextlib
import copy

import pytest
import torch

import common
import lora_caption
from conftest import TINY_CAPTIONS, build_tiny_captioner, one_line_error

CPU = torch.device("cpu")


def lora_args(**kw):
    base = dict(rank=4, alpha=8, lora_dropout=0.05, targets=lora_caption.DECODER_TARGETS, cross_attention=False)
    return argparse.Namespace(**{**base, **kw})


def captioner_with_adapters(folder, **kw):
    """The tiny captioner with adapters whose B is not zero (so that they matter), its data and training pairs."""
    model, tokenizer, processor = lora_caption.load_captioner(str(folder), CPU)
    torch.manual_seed(0)  # before add_lora, whose A matrices are drawn too: the same adapters in any test order
    model = lora_caption.add_lora(model, lora_args(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    size, resample = lora_caption.processor_geometry(processor)
    data = lora_caption.load_caption_data(TINY_CAPTIONS, size, resample, seed=0, log=lambda *_: None)
    tokens = lora_caption.pair_tokens(tokenizer, data["train"], 40)
    return model, lora_caption.Pixels(processor, CPU), data["train"], tokens


def loss_and_grads(model, inputs, tokens, idx, seed=1):
    """One training forward and backward (dropout active, seeded): the summed loss and every adapter gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = lora_caption.caption_loss(model, inputs, tokens["decoder_ids"][idx], tokens["labels"][idx])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_equal_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cached_encoder_output_gives_the_same_loss_and_gradients_bit_for_bit(tiny_captioner):
    model, pixels, split, tokens = captioner_with_adapters(tiny_captioner)
    idx = torch.arange(12)  # 5 captions per image: images repeat within the batch, as in training
    images = tokens["pair_image"][idx]
    loss, grads = loss_and_grads(model, lora_caption.PixelInputs(pixels, split.images).inputs(images, images),
                                 tokens, idx)
    # The cache encodes this batch's images in one pass, as the step without it does: CPU kernels may round
    # differently for other batch sizes, which is not what is being tested here.
    cache = lora_caption.EncoderCache(model, pixels, split.images[images], None, batch_size=len(idx))
    rows = torch.arange(len(idx))
    cached_loss, cached_grads = loss_and_grads(model, cache.inputs(rows, rows), tokens, idx)
    assert torch.equal(loss, cached_loss) and torch.isfinite(loss)
    assert_equal_bitwise(grads, cached_grads)
    assert all(g.abs().sum() > 0 for g in grads.values())
    # the script's cache of the whole split (encoded 64 images at a time) holds the same states, to rounding
    whole = lora_caption.EncoderCache(model, pixels, split.images, None)
    torch.testing.assert_close(whole.states[images], cache.states, rtol=1e-5, atol=1e-6)
    assert whole.on_device and whole.nbytes == whole.states.numel() * 4


def test_cache_in_host_memory_gathers_the_same_rows(tiny_captioner):
    model, pixels, split, tokens = captioner_with_adapters(tiny_captioner)
    on_device = lora_caption.EncoderCache(model, pixels, split.images, None)
    on_host = lora_caption.EncoderCache(model, pixels, split.images, None, on_device=False)
    images = tokens["pair_image"][torch.tensor([7, 3, 3, 60])]
    a, b = on_device.inputs(images, images)["encoder_outputs"][0], on_host.inputs(images, images)["encoder_outputs"][0]
    assert not on_host.on_device and torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to True")  # peft's note on adapting an nn.Linear
@pytest.mark.parametrize("change", ["adapted encoder", "dropout module", "dropout in config", "nothing"])
def test_encoder_cache_is_used_only_when_the_encoder_cannot_change(tiny_captioner, change):
    model, _, _ = lora_caption.load_captioner(str(tiny_captioner), CPU)
    query = next(n for n, m in model.encoder.named_modules() if isinstance(m, torch.nn.Linear))  # names vary by version
    targets = lora_caption.DECODER_TARGETS + ([query] if change == "adapted encoder" else [])
    model = lora_caption.add_lora(model, lora_args(targets=targets))
    encoder = lora_caption.base_model(model).encoder
    if change == "dropout module":
        next(m for m in encoder.modules() if isinstance(m, torch.nn.Dropout)).p = 0.1
    if change == "dropout in config":
        encoder.config.attention_probs_dropout_prob = 0.1  # ViT's attention applies this rate in the kernel
    reason = lora_caption.encoder_cache_blocker(model)
    expected = {"adapted encoder": "the encoder trains", "nothing": None}.get(change, "the encoder uses dropout")
    assert reason == expected or (reason and expected and reason.startswith(expected)), reason


@pytest.mark.parametrize("lora_dropout", [0.0, 0.05])
def test_frozen_weights_in_bf16_change_nothing_under_autocast(tiny_captioner, lora_dropout):
    model, pixels, split, tokens = captioner_with_adapters(tiny_captioner, lora_dropout=lora_dropout)
    fast = copy.deepcopy(model)
    saved = lora_caption.cast_frozen_weights(fast)
    inner = lora_caption.base_model(fast)
    wte, lm_head = inner.decoder.transformer.wte, inner.decoder.lm_head
    assert lm_head.weight is wte.weight and wte.weight.dtype == torch.float32  # tied: stays fp32
    dtypes = {n: p.dtype for n, p in fast.named_parameters()}
    assert all(dtypes[n] == torch.float32 for n, p in fast.named_parameters() if p.requires_grad or "lora_" in n)
    assert all(dtypes[n] == torch.float32 for n in dtypes if any(k in n for k in ("ln_", "layernorm", "wpe", "wte",
                                                                                  "cls_token", "position_embed")))
    assert inner.decoder.transformer.h[0].attn.c_attn.base_layer.weight.dtype == torch.bfloat16  # Conv1D
    for kind in (torch.nn.Linear, torch.nn.Conv2d):  # the encoder's attention and MLP, its patch embedding
        assert next(m for m in inner.encoder.modules() if isinstance(m, kind)).weight.dtype == torch.bfloat16
    assert saved == 2 * sum(p.numel() for p in fast.parameters() if p.dtype == torch.bfloat16) > 0

    idx = torch.arange(10)
    images = tokens["pair_image"][idx]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, lora_caption.PixelInputs(pixels, split.images).inputs(images, images),
                                     tokens, idx)
        with lora_caption.adapter_inputs_as_given(fast, torch.bfloat16, lora_dropout):  # as the training loop
            casting = {m.cast_input_dtype_enabled for m in fast.modules() if hasattr(m, "cast_input_dtype_enabled")}
            assert casting == {lora_dropout > 0}  # skipped where it changes no value
            fast_loss, fast_grads = loss_and_grads(
                fast, lora_caption.PixelInputs(pixels, split.images).inputs(images, images), tokens, idx)
    assert torch.equal(loss, fast_loss) and torch.isfinite(loss)
    assert_equal_bitwise(grads, fast_grads)
    optimizer = torch.optim.AdamW([p for p in fast.parameters() if p.requires_grad])
    optimizer.step()
    assert {v.dtype for s in optimizer.state.values() for v in s.values() if v.dim()} == {torch.float32}


def test_decoder_input_is_the_shifted_caption_and_the_loss_is_computed_once(tiny_captioner):
    from transformers.models.vision_encoder_decoder.modeling_vision_encoder_decoder import shift_tokens_right
    model, pixels, split, tokens = captioner_with_adapters(tiny_captioner)
    config = lora_caption.base_model(model).config
    assert torch.equal(tokens["decoder_ids"], shift_tokens_right(tokens["labels"], config.pad_token_id,
                                                                 config.decoder_start_token_id))
    assert torch.equal(tokens["count"], (tokens["labels"] != -100).sum(1))
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, **kw):
            calls.append(sorted(kw))
            return model(**kw)

    idx = torch.arange(10)
    model.eval()
    with torch.no_grad():
        images = tokens["pair_image"][idx]
        inputs = lora_caption.PixelInputs(pixels, split.images).inputs(images, images)
        ours = lora_caption.caption_loss(Recorder(), inputs, tokens["decoder_ids"][idx], tokens["labels"][idx])
        theirs = model(pixel_values=pixels(split.images[images]), labels=tokens["labels"][idx]).loss
    assert calls == [["decoder_input_ids", "pixel_values", "use_cache"]]  # no labels=: the model computes no loss
    torch.testing.assert_close(ours / tokens["count"][idx].sum(), theirs, rtol=1e-6, atol=1e-6)


def train(tiny, out, *flags):
    return lora_caption.main(["--model", str(tiny), "--data-dir", str(TINY_CAPTIONS), "--device", "cpu",
                              "--no-plots", "--no-baseline", "--eval-images", "1", "--out-dir", str(out),
                              "--batch-size", "5", "--lr", "1e-2", *flags])


def adapter(out):
    return torch.load(out / "training_state.pt", weights_only=True)["trainable"]


def test_steps_have_one_shape_and_the_loss_is_read_every_20_steps(tiny_captioner, tmp_path, monkeypatch):
    shapes, reads = set(), []
    real_loss, real_read = lora_caption.caption_loss, lora_caption.read_loss

    def recording_loss(model, inputs, decoder_ids, labels):
        if torch.is_grad_enabled():  # training steps (validation runs without gradients)
            shapes.add((tuple(decoder_ids.shape), tuple(labels.shape), *(tuple(v[0].shape) for v in inputs.values())))
        return real_loss(model, inputs, decoder_ids, labels)

    def recording_read(loss_sum, tokens_read, world_size, step, schedule, bar):
        reads.append(step)
        return real_read(loss_sum, tokens_read, world_size, step, schedule, bar)
    monkeypatch.setattr(lora_caption, "caption_loss", recording_loss)
    monkeypatch.setattr(lora_caption, "read_loss", recording_read)
    summary = train(tiny_captioner, tmp_path, "--epochs", "3", "--eval-every", "25", "--save-every", "50")
    assert summary["steps"] == 60 and reads == [20, 25, 40, 50, 60]
    assert shapes == {((5, 40), (5, 40), (5, 17, 32))}  # the cached encoder output: 4x4 patches + CLS, width 32


def test_cached_and_uncached_runs_train_the_same_adapter(tiny_captioner, tmp_path, capsys):
    train(tiny_captioner, tmp_path / "cached", "--max-steps", "12")
    assert "encoder output cached (25 images" in capsys.readouterr().out
    train(tiny_captioner, tmp_path / "plain", "--max-steps", "12", "--no-encoder-cache")
    assert "encoder runs every step (--no-encoder-cache)" in capsys.readouterr().out
    a, b = adapter(tmp_path / "cached"), adapter(tmp_path / "plain")
    assert a.keys() == b.keys()
    # The cache is encoded 64 images at a time, the plain step 5: equal up to float rounding, which AdamW can
    # magnify (it divides a near-zero gradient by its own size; torch 2.11 showed 1.2e-5). A step moves a weight
    # by up to the rate, 1e-2: a cache that fed the wrong images would differ by far more than 1e-4.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_lora_nan_is_caught_within_20_steps_and_the_last_good_state_kept(tiny_captioner, tmp_path, monkeypatch,
                                                                          capsys):
    real, calls = lora_caption.train_step, []

    def poisoned_at_step_12(model, *rest):
        calls.append(1)
        if len(calls) == 12:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))
        return real(model, *rest)
    monkeypatch.setattr(lora_caption, "train_step", poisoned_at_step_12)
    with pytest.raises(SystemExit) as stop:
        train(tiny_captioner, tmp_path, "--epochs", "2", "--save-every", "10")
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "the training loss became nan by step 20 (lr " in err, err
    assert f"the last saved state is {tmp_path / 'training_state.pt'} (step 10" in err
    assert all(torch.isfinite(v).all() for v in adapter(tmp_path).values())


@pytest.fixture(scope="module")
def captioner_without_dropout(tmp_path_factory):
    return build_tiny_captioner(tmp_path_factory.mktemp("no-dropout"), dropout=0.0)


def test_the_compile_path_is_gone_and_help_does_not_offer_it(tiny_captioner, capsys):
    """Issue 22: --compile measured 42.9 ms/step against the captured step's 9.8 ms and turned the capture off."""
    for argv in (["--compile"], ["--compile-mode", "default"]):
        err = one_line_error(capsys, lambda a=argv: lora_caption.main(["--data-dir", str(TINY_CAPTIONS), *a]))
        assert f"unrecognized arguments: {' '.join(argv)}" in err
    assert "--compile" not in lora_caption.build_parser().format_help()


def test_adapting_the_encoder_says_in_one_line_why_the_step_is_eager(tiny_captioner, tmp_path, capsys):
    model, _, _ = lora_caption.load_captioner(str(tiny_captioner), CPU)
    query = next(n for n, m in model.encoder.named_modules() if isinstance(m, torch.nn.Linear))
    train(tiny_captioner, tmp_path, "--max-steps", "2", "--targets", *lora_caption.DECODER_TARGETS, query)
    out = capsys.readouterr().out
    assert out.count("step: eager (") == 1 and "step: eager (the encoder trains: --targets adapts it)\n" in out


@pytest.mark.parametrize("fault", ["the cast", "the cache"])
def test_the_gpu_path_runs_on_a_cpu_and_each_part_falls_back_with_a_word(fault, tiny_captioner, tmp_path,
                                                                         monkeypatch, capsys):
    # bf16 autocast on the CPU takes the path a GPU takes: frozen weights cast, the cache stored in bf16
    monkeypatch.setattr(lora_caption, "amp_dtype_for", lambda device: torch.bfloat16)
    summary = train(tiny_captioner, tmp_path / "fast", "--max-steps", "4", "--lora-dropout", "0")
    out = capsys.readouterr().out
    assert "cpu torch.bfloat16" in out and "frozen weights in bf16 (-0 MiB)" in out
    assert "encoder output cached (25 images, 0.0 MiB on the device" in out and summary["steps"] == 4

    def broken(*a, **k):
        raise RuntimeError("out of luck")
    monkeypatch.setattr(lora_caption, "cast_frozen_weights" if fault == "the cast" else "EncoderCache", broken)
    train(tiny_captioner, tmp_path / "plain", "--max-steps", "4", "--lora-dropout", "0")
    out = capsys.readouterr().out
    word = "frozen weights stay fp32 (RuntimeError: out of luck)" if fault == "the cast" else \
        "encoder runs every step (the cache failed: RuntimeError: out of luck)"
    assert out.count(word) == 1
    a, b = adapter(tmp_path / "fast"), adapter(tmp_path / "plain")
    if fault == "the cast":  # bf16 weights or fp32 weights cast by autocast: the same numbers
        assert_equal_bitwise(a, b)
    else:  # the cache encodes 64 images at a time, the plain step 5
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=1e-4)


def step_run(model, tokens, cache, lr=1e-2):
    """The pieces main() builds for the step, on the CPU: optimizer, schedule, the loss sum, and train_step bound
    to them (as make_step binds it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    run = dict(model=model, optimizer=optimizer, params=params, loss_sum=torch.zeros(()),
               schedule=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.2 * s),
               device_tokens=lora_caption.on_device(tokens, CPU))
    run["step"] = lambda *batch: lora_caption.train_step(
        run["model"], run["optimizer"], torch.amp.GradScaler("cpu", enabled=False), run["params"], None,
        STEP_ARGS.grad_clip, 1, cache, run["device_tokens"], run["loss_sum"], *batch)
    return run


def trained_state(run):
    state = {n: p.detach().clone() for n, p in run["model"].named_parameters() if p.requires_grad}
    for i, s in enumerate(run["optimizer"].state.values()):
        state.update({f"opt{i}.{k}": v.clone() for k, v in s.items()})
    return {**state, "loss_sum": run["loss_sum"].clone()}


STEP_ARGS = argparse.Namespace(global_batch=8, batch_size=8, world_size=1, grad_clip=1.0)


def graph_body(run, pairs):
    """What CapturedStep records, run eagerly."""
    lora_caption.graph_body(run["step"], run["device_tokens"], pairs)


def eager_and_body(model, tokens, inputs, body_inputs=None, steps=3, before_body=lambda pairs: None):
    """`model` trained by the eager step (what main() calls without a graph) and a copy by the graph's body run
    eagerly (fed `body_inputs`, default `inputs`), on the same batches of 8 pairs and dropout seeds: both states."""
    eager, body = step_run(model, tokens, inputs), step_run(copy.deepcopy(model), tokens, body_inputs or inputs)
    eager_step = lora_caption.eager(eager["step"], tokens, STEP_ARGS, rank=0)
    order = torch.randperm(len(tokens["pair_image"]), generator=torch.Generator().manual_seed(0))
    for step, pairs in enumerate(order[:8 * steps].view(steps, 8)):
        torch.manual_seed(step)  # as main() seeds dropout before each step
        eager_step(pairs, pairs)
        eager["schedule"].step()
        before_body(pairs)
        torch.manual_seed(step)
        graph_body(body, pairs)
        body["schedule"].step()
    return trained_state(eager), trained_state(body)


def test_the_step_a_cuda_graph_records_is_the_eager_step_bit_for_bit(tiny_captioner):
    model, pixels, split, tokens = captioner_with_adapters(tiny_captioner)
    cache = lora_caption.EncoderCache(model, pixels, split.images, None)
    a, b = eager_and_body(model, tokens, cache)
    assert_equal_bitwise(a, b)
    assert a["loss_sum"] > 0 and not torch.equal(a["opt0.exp_avg"], torch.zeros_like(a["opt0.exp_avg"]))


def test_undone_warm_up_steps_leave_the_weights_and_a_fresh_optimizer(tiny_captioner):
    model, pixels, split, tokens = captioner_with_adapters(tiny_captioner)
    cache = lora_caption.EncoderCache(model, pixels, split.images, None)
    warmed, fresh = step_run(model, tokens, cache), step_run(copy.deepcopy(model), tokens, cache)
    before = trained_state(warmed)
    undo = lora_caption.undo_steps([*warmed["params"], warmed["loss_sum"]], [warmed["optimizer"]])  # as CapturedStep
    for _ in range(3):  # the capture's warm-up: effects that must not count
        graph_body(warmed, torch.arange(8))
    assert not torch.equal(trained_state(warmed)["loss_sum"], before["loss_sum"])
    undo()
    for run in (warmed, fresh):
        torch.manual_seed(3)
        graph_body(run, torch.arange(8, 16))
    assert_equal_bitwise(trained_state(warmed), trained_state(fresh))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no real step here
def test_a_captured_step_is_replayed_with_the_schedules_rate_and_a_seed_per_step(tiny_captioner):
    model, pixels, split, tokens = captioner_with_adapters(tiny_captioner)
    run, replays = step_run(model, tokens, None), []
    captured = object.__new__(lora_caption.CapturedStep)  # its replay, without a GPU: a graph that records its inputs
    captured.optimizer, captured.lr = run["optimizer"], torch.zeros(())
    captured.pairs = torch.zeros(8, dtype=torch.long)
    captured.graph = argparse.Namespace(replay=lambda: replays.append(
        (captured.pairs.tolist(), captured.lr.item(), torch.randint(1 << 30, ()).item())))
    for step in range(3):
        torch.manual_seed(step % 2)  # as main() seeds dropout before each step
        captured(torch.arange(8) + step, torch.arange(8) + step)
        run["schedule"].step()
    assert [r[:2] for r in replays] == [(list(range(s, s + 8)), pytest.approx(1e-2 * (1 - 0.2 * s))) for s in range(3)]
    assert replays[0][2] == replays[2][2] != replays[1][2]  # dropout draws follow the step's seed


def test_the_captured_body_reads_nothing_back_from_the_device(tiny_captioner):
    """A CUDA graph cannot record a host read (.item(), a tensor in an `if`). On the meta device, which holds no
    values, any such read raises: the step's forward, backward and clipping run through, with transformers told
    what the step tells it (no_mask_checks: no padding, no packed sequences)."""
    model, pixels, split, tokens = captioner_with_adapters(tiny_captioner)
    decoder = lora_caption.base_model(model).decoder
    decoder.config.pad_token_id = decoder.config.eos_token_id  # as a GPT-2 config may say: padding is looked for
    cache = lora_caption.EncoderCache(model, pixels, split.images, None)
    meta = torch.device("meta")
    model.to(meta)
    cache.states = cache.states.to(meta)
    run = step_run(model, tokens, cache)
    run.update(device_tokens=lora_caption.on_device(tokens, meta), loss_sum=torch.zeros((), device=meta),
               optimizer=argparse.Namespace(zero_grad=run["optimizer"].zero_grad, step=lambda: None))
    real_mask_checks = lora_caption.no_mask_checks
    lora_caption.no_mask_checks = contextlib.nullcontext  # the step itself tells transformers; here, untold first
    try:
        with pytest.raises(RuntimeError, match="meta"):  # untold, transformers reads a value back
            graph_body(run, torch.arange(8, device=meta))
    finally:
        lora_caption.no_mask_checks = real_mask_checks
    graph_body(run, torch.arange(8, device=meta))
    assert run["params"] and all(p.grad is not None and p.grad.is_meta for p in run["params"])


def test_no_mask_checks_changes_no_number_and_restores_transformers(tiny_captioner, monkeypatch):
    import transformers.masking_utils as masking_utils
    from transformers import PreTrainedModel

    def checks():
        return (masking_utils.is_tracing, masking_utils.find_packed_sequence_indices,
                vars(PreTrainedModel)["warn_if_padding_and_no_attention_mask"])
    model, pixels, split, tokens = captioner_with_adapters(tiny_captioner)
    cache = lora_caption.EncoderCache(model, pixels, split.images, None)
    losses, before, real_mask_checks = [], checks(), lora_caption.no_mask_checks
    for told in (False, True):  # the step tells transformers itself: untold, it runs with nothing in its place
        monkeypatch.setattr(lora_caption, "no_mask_checks", real_mask_checks if told else contextlib.nullcontext)
        run = step_run(copy.deepcopy(model), tokens, cache)
        torch.manual_seed(0)  # GPT-2's dropout (0.1) and the adapters' draw the same numbers in both
        graph_body(run, torch.arange(8))
        losses.append(trained_state(run))
    monkeypatch.undo()
    assert_equal_bitwise(*losses)
    assert checks() == before


CAPTURABLE = dict(world_size=1, grad_accum=1, eager=False, batch_size=8, grad_clip=1.0)


@pytest.mark.parametrize("change", [{}, {"world_size": 2}, {"grad_accum": 2}, {"eager": True},
                                    {"cache": "host"}, {"amp_dtype": torch.float16}, {"device": CPU}],
                         ids=["applies", "torchrun", "accumulation", "eager", "host cache", "fp16", "cpu"])
def test_the_step_is_captured_only_where_a_graph_can_replay_it(change):
    args = argparse.Namespace(**{**CAPTURABLE, **{k: v for k, v in change.items() if k in CAPTURABLE}})
    device, amp_dtype = change.get("device", torch.device("cuda")), change.get("amp_dtype", torch.bfloat16)
    inputs = argparse.Namespace(on_device=change.get("cache") != "host")
    # a cache in host memory is captured too since issue 23 (StagedRows feeds the graph: test_lora_issue23.py)
    assert (lora_caption.eager_because(args, device, amp_dtype, inputs) is None) == (change in ({}, {"cache": "host"}))


def failing_capture(error):
    def capture(*a, **k):
        try:
            raise ValueError("cannot read a value back while a stream is captured")
        except ValueError:  # what torch.cuda.graph's exit raises after a failure inside the block
            raise error  # noqa: B904 (implicitly chained, as torch does)
    return capture


@pytest.mark.parametrize("error, cause", [
    (RuntimeError("operation failed due to a previous error during capture"),
     "ValueError: cannot read a value back while a stream is captured"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"),
     "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")], ids=["during capture", "out of memory"])
def test_a_failing_capture_trains_eagerly_and_names_its_cause_in_one_line(error, cause, monkeypatch, capsys):
    monkeypatch.setattr(lora_caption, "CapturedStep", failing_capture(error))
    assert lora_caption.capture_step(None, None, [], torch.zeros(()), None, 8) is None
    assert capsys.readouterr().out == f"CUDA graph capture failed ({cause}); training eagerly\n"


def test_a_capture_that_breaks_the_random_generator_stops_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(lora_caption, "CapturedStep", failing_capture(RuntimeError("capture_end failed")))
    monkeypatch.setattr(common, "cuda_generator_works", lambda device: False)
    with pytest.raises(SystemExit) as stop, common.one_line_errors("lora_caption"):  # main()'s error path
        lora_caption.capture_step(None, None, [], torch.zeros(()), None, 8)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1 and "run the same command again with --eager" in err
    assert "(RuntimeError: capture_end failed)" in err  # not a follow-up "during capture": its own words


def test_the_script_reads_in_two_layers_with_the_loop_in_main():
    """Issue 22: the experiment above the plumbing banner, main() holding the loop that calls the step per batch."""
    from conftest import ROOT
    text = (ROOT / "lora_caption.py").read_text()
    banner = "# ===== Run plumbing: nothing below changes what is trained =====\n"
    assert text.count(banner) == 1
    upper = text.split(banner)[0]
    main = upper[upper.index("def main(argv=None):"):]
    assert "step(pairs, order_on_device[progress.batch])" in main and ".backward()" in upper
    assert upper.count("\n") <= 600 and "torch.compile" not in text and "--compile" not in text
