"""lora_caption.py's part of issue 23 (item 5): with the encoder cache in host memory (a caption set too large for
the GPU, or --host-cache) the step stays captured: the batch's rows are staged into a static device buffer before
each replay (StagedRows). On the CPU: the body the graph records, fed by StagedRows, is the eager step bit for bit;
the GPU parity test is in test_gpu.py."""
import torch

import lora_caption
from conftest import TINY_CAPTIONS, one_line_error
from test_lora_fast import assert_equal_bitwise, captioner_with_adapters, eager_and_body


def test_issue23_5_the_staged_host_cache_feeds_the_graphs_body_what_the_eager_step_reads(tiny_captioner):
    model, pixels, split, tokens = captioner_with_adapters(tiny_captioner)
    cache = lora_caption.EncoderCache(model, pixels, split.images, None, on_device=False)
    assert cache.states.device.type == "cpu" and not cache.on_device
    staged = lora_caption.StagedRows(cache, tokens["pair_image"], batch_size=8)

    def stage(pairs):  # what CapturedStep does before each replay
        staged.stage(pairs)
        assert torch.equal(staged.rows, cache.states[tokens["pair_image"][pairs]])
    a, b = eager_and_body(model, tokens, cache, staged, steps=4, before_body=stage)  # eager: reads the cache itself
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
