"""Pictures: attention maps and rollout against hand computations, overlays, charts, caption sheets."""

import html.parser
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import vit_scratch
from conftest import ROOT
from vit_scratch import VisionTransformer, attention_maps, attention_rollout


def test_attention_maps_equal_a_hand_computed_softmax():
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=16, hidden_dim=32, num_heads=2, num_layers=2, dropout=0.0).eval()
    x = torch.randn(3, 3, 32, 32)
    maps = attention_maps(model, x)
    assert len(maps) == 2 and maps[0].shape == (3, 2, 65, 65)
    tokens = model.embed(x)
    for layer, block in enumerate(model.blocks):
        h = torch.nn.functional.layer_norm(tokens, (16,), block.norm1.weight, block.norm1.bias)
        W, b = block.attn.to_qkv.weight, block.attn.to_qkv.bias
        for head in range(2):
            rows = slice(head * 8, head * 8 + 8)
            q = h @ W[:16][rows].T + b[:16][rows]  # q, k: the first and second thirds of the stacked projection
            k = h @ W[16:32][rows].T + b[16:32][rows]
            scores = torch.exp(q @ k.transpose(1, 2) / math.sqrt(8))
            torch.testing.assert_close(
                maps[layer][:, head], scores / scores.sum(-1, keepdim=True), atol=1e-5, rtol=1e-5
            )
        tokens = block(tokens)


def test_attention_rollout_on_two_layers_by_hand():
    a1 = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    a2 = torch.tensor([[0.5, 0.5], [0.1, 0.9]])
    heads = lambda a: torch.stack(
        [a + 0.1 * torch.tensor([[1, -1], [-1, 1]]), a - 0.1 * torch.tensor([[1, -1], [-1, 1]])]
    )[None]
    rollout = attention_rollout([heads(a1), heads(a2)])  # each layer: two heads whose mean is a1 / a2
    # 0.5 A + 0.5 I: [[.9, .1], [.2, .8]] and [[.75, .25], [.05, .95]]; rollout = second @ first
    torch.testing.assert_close(rollout[0], torch.tensor([[0.725, 0.275], [0.235, 0.765]]))


def test_the_attention_figure_puts_the_hot_patch_where_it_is():
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    image = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    heat = torch.zeros(1, 2, 8, 8)  # one layer + rollout
    heat[0, 0, 1, 6] = 1.0  # patch in row 1, column 6 (row-major like img_to_patch)
    fig = vit_scratch.attention_figure(image, heat, ["grey"])
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = torch.from_numpy(np.asarray(canvas.buffer_rgba())[..., :3].copy()).float().sum(-1)  # (H, W)
    x0, y0, x1, y1 = fig.axes[1].get_window_extent().extents  # the layer-1 cell, y from the bottom
    top, left = pixels.shape[0] - y1, x0
    cell = pixels[int(top) + 1:int(top + y1 - y0) - 1, int(left) + 1:int(x1) - 1]
    r, c = divmod(int(cell.argmax()), cell.shape[1])
    assert int(r * 8 / cell.shape[0]) == 1 and int(c * 8 / cell.shape[1]) == 6  # that patch's square


def test_cls_heatmaps_follow_patch_order():
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=16, hidden_dim=32, num_heads=2, num_layers=2, dropout=0.0)
    x = torch.randn(2, 3, 32, 32)
    heat = vit_scratch.cls_heatmaps(model, x, 4)  # layers 1, 2, rollout
    assert heat.shape == (2, 3, 8, 8) and torch.allclose(heat.amax((-1, -2)), torch.ones(2, 3))
    cls_to_patches = attention_maps(model, x)[1].mean(1)[:, 0, 1:]  # (B, 64), patch index = row * 8 + column
    expected = cls_to_patches / cls_to_patches.amax(1, keepdim=True)
    for r, c in [(0, 0), (1, 6), (7, 3)]:
        torch.testing.assert_close(heat[:, 1, r, c], expected[:, r * 8 + c])


def test_charts_skip_cleanly_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what the charts import
    logged = []
    assert common.plot_curves([{"epoch": 1, "train_loss": 1.0}], tmp_path / "curves.png", log=logged.append) is None
    assert (
        common.plot_confusion(torch.eye(3, dtype=torch.long), ["a", "b", "c"], tmp_path / "c.png", log=logged.append)
        is None
    )
    assert logged == ["skipped curves.png: it needs matplotlib (pip install matplotlib)",
                      "skipped c.png: it needs matplotlib (pip install matplotlib)"]
    assert not list(tmp_path.iterdir())


def test_charts_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {"epoch": e, "train_loss": 2 / e, "test_loss": 2.2 / e, "train_acc": 0.1 * e, "test_acc": 0.09 * e,
         "lr": 1e-3 / e}
        for e in range(1, 6)
    ]
    assert Image.open(common.plot_curves(rows, tmp_path / "curves.png")).size == (1260, 330)
    classes = [f"class {i}" for i in range(10)]
    cm = torch.randint(0, 50, (10, 10))
    assert Image.open(common.plot_confusion(cm, classes, tmp_path / "confusion.png")).size == (720, 630)


def attention_png_size(layers, rows=20):
    return 110 * (layers + 2), 125 * rows  # figsize 1.1 x 1.25 inches a cell, 100 dpi


def test_vit_run_draws_its_pictures_and_show_attention_redraws(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    flags = ["--data-dir", str(tiny_cifar), "--device", "cpu", "--epochs", "2", "--embed-dim", "32", "--hidden-dim",
             "64", "--num-heads", "4", "--num-layers", "3", "--batch-size", "64"]
    vit_scratch.main([*flags, "--out-dir", str(out)])
    assert Image.open(out / "attention.png").size == attention_png_size(3)
    assert Image.open(out / "curves.png").size == (1260, 330) and Image.open(out / "confusion.png").size == (720, 630)
    (out / "attention.png").unlink()
    vit_scratch.main(
        ["--show-attention", str(out / "best.pt"), "--data-dir", str(tiny_cifar), "--device", "cpu", "--out-dir",
         str(tmp_path / "shown")]
    )
    assert Image.open(tmp_path / "shown" / "attention.png").size == attention_png_size(3)
    assert not (out / "attention.png").exists()
    vit_scratch.main(["--show-attention", str(out / "best.pt"), "--data-dir", str(tiny_cifar), "--device", "cpu",
                      "--no-progress"])  # harmless in any mode (it was refused)
    assert (out / "attention.png").exists()  # beside the checkpoint by default


def test_vit_without_matplotlib_skips_all_three_pictures_with_one_line(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    code = (
        "import sys, runpy; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "vit_scratch.py"), "--data-dir", str(tiny_cifar), "--out-dir", str(out),
         "--device", "cpu", "--epochs", "1", "--embed-dim", "32", "--hidden-dim", "64", "--num-heads", "4",
         "--num-layers", "1", "--batch-size", "64"],
        cwd=ROOT,  # python -c finds common.py in its working folder, whatever folder the suite was started from
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("skipped")]
    assert skipped == ["skipped the pictures (attention.png, curves.png, confusion.png): they need matplotlib "
                       "(pip install matplotlib)"]
    assert not list(out.glob("*.png"))


def test_no_plots_means_no_pictures(tiny_cifar, tmp_path):
    vit_scratch.main(
        ["--data-dir", str(tiny_cifar), "--device", "cpu", "--epochs", "1", "--embed-dim", "16", "--hidden-dim", "16",
         "--num-heads", "2", "--num-layers", "1", "--batch-size", "64", "--no-plots", "--out-dir", str(tmp_path)]
    )
    assert not list(tmp_path.glob("*.png"))


class _Checker(html.parser.HTMLParser):
    VOID = {"meta", "img", "br", "link", "input", "hr"}

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data):
        self.text.append(data)


def test_caption_sheet_is_valid_html_with_every_image_and_caption(tmp_path):
    import lora_caption

    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    split = lora_caption.CaptionSplit(
        ["a.jpg", "b&c.jpg", "d.jpg"], images, [["a dog <runs>", "a pet"], ["two cats"], ["a 'quoted' \"caption\""]]
    )
    lora_caption.write_caption_sheet(tmp_path / "captions.html", split, ["before a", None, "before d"],
                                     ["after a", "after b & c", "after <d>"], "tiny/model")
    page = (tmp_path / "captions.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.stack == []
    assert [i["alt"] for i in checker.images] == ["a.jpg", "b&c.jpg", "d.jpg"]
    for img in checker.images:
        assert img["src"].startswith("data:image/jpeg;base64,")
        import base64
        import io

        assert Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).size == (32, 32)
    text = "".join(checker.text)
    for caption in ("a dog <runs>", "a pet", "two cats", "a 'quoted' \"caption\"", "before a", "before d", "after a",
                    "after b & c", "after <d>", "not computed"):
        assert caption in text
