"""lora_caption.py's part of issue 23 (item 5): with the encoder cache in host memory (a caption set too large for
the GPU, or --host-cache) the step stays captured: the batch's rows are staged into a static device buffer before
each replay (StagedRows). On the CPU: the body the graph records, fed by StagedRows, is the eager step bit for bit;
the GPU parity test is in test_gpu.py."""
import copy

import torch

import lora_caption
from conftest import TINY_CAPTIONS, one_line_error
from test_lora_fast import STEP_ARGS, assert_equal_bitwise, captioner_with_adapters, graph_body, step_run, \
    trained_state


def test_issue23_5_the_staged_host_cache_feeds_the_graphs_body_what_the_eager_step_reads(tiny_captioner):
    model, pixels, split, tokens = captioner_with_adapters(tiny_captioner)
    cache = lora_caption.EncoderCache(model, pixels, split.images, None, on_device=False)
    assert cache.states.device.type == "cpu" and not cache.on_device
    staged = lora_caption.StagedRows(cache, tokens["pair_image"], batch_size=8)
    eager, body = step_run(model, tokens, cache), step_run(copy.deepcopy(model), tokens, staged)
    eager_step = lora_caption.eager(eager["step"], tokens, STEP_ARGS, rank=0)  # reads the host cache itself
    order = torch.randperm(len(tokens["pair_image"]), generator=torch.Generator().manual_seed(0))
    for step, pairs in enumerate(order[:32].view(4, 8)):
        torch.manual_seed(step)
        eager_step(pairs, pairs)
        eager["schedule"].step()
        staged.stage(pairs)  # what CapturedStep does before each replay
        torch.manual_seed(step)
        graph_body(body, pairs)
        body["schedule"].step()
        assert torch.equal(staged.rows, cache.states[tokens["pair_image"][pairs]])
    a, b = trained_state(eager), trained_state(body)
    assert_equal_bitwise(a, b)
    assert a["loss_sum"] > 0 and staged.turn == 0  # the two pinned buffers took turns


def test_issue23_5_host_cache_is_said_and_conflicts_with_no_cache(tiny_captioner, tmp_path, capsys):
    flags = ["--model", str(tiny_captioner), "--data-dir", str(TINY_CAPTIONS), "--device", "cpu", "--batch-size",
             "10", "--max-steps", "2", "--eval-images", "2", "--no-plots", "--no-baseline"]
    lora_caption.main([*flags, "--host-cache", "--out-dir", str(tmp_path / "host")])
    assert "MiB in host memory" in capsys.readouterr().out
    err = one_line_error(capsys, lambda: lora_caption.main([*flags, "--host-cache", "--no-encoder-cache",
                                                            "--out-dir", str(tmp_path / "both")]))
    assert "--host-cache places the encoder cache, which --no-encoder-cache turns off" in err
