import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CIFAR = ROOT / "tests" / "data" / "cifar10-tiny"  # 30 train + 10 test JPEGs per class, from the JPEG copy
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    # peft calls an API that transformers 5 deprecated; nothing this project can change.
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def default_sigint():
    """preexec_fn for a child that a test sends Ctrl-C: the default SIGINT, whatever this process inherited (a
    background job, nohup and some CI runners start with SIGINT ignored, and children inherit that)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def process_state_put_back():
    """What a test changes process-wide by calling a script's internals (transformers' progress bars, which a load
    switches off and only main() puts back; random generators) is put back after it, so that no test depends on
    the order the suite runs in."""
    import common
    restore = common.save_process_state()
    yield
    restore()


@pytest.fixture
def terminal_sigint():
    """Ctrl-C raises KeyboardInterrupt in this process for the test's duration, as in a terminal; the disposition
    the suite started with is put back afterwards."""
    import signal
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def one_line_error(capsys, call):
    """Runs call(), which must end as a bad input does: exit 2, one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as stop:
        call()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory):
    """A private copy of the shipped tiny CIFAR-10 tree, so decode caches never land in the repo."""
    dst = tmp_path_factory.mktemp("data") / "cifar10-tiny"
    shutil.copytree(TINY_CIFAR, dst, ignore=shutil.ignore_patterns(".decoded-*"))
    return dst


def byte_level_alphabet():
    """The 256 printable stand-ins GPT-2 and CLIP BPE use for bytes (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def clip_tokenizer(folder):
    """A character-level CLIP tokenizer (no merges), written as vocab.json + merges.txt, built offline."""
    import json

    from transformers import CLIPTokenizer

    chars = byte_level_alphabet()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A random tiny CLIPModel + tokenizer + image processor saved like a hub checkpoint. The processor
    resizes 32 -> 52 and center-crops 48, so both steps are exercised."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    tok = clip_tokenizer(folder / "tok")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=48, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 52}, crop_size={"height": 48, "width": 48}).save_pretrained(folder)
    return folder


def gpt2_tokenizer(folder):
    """A byte-level GPT-2 tokenizer with no merges (one token per byte) + <|endoftext|>, built offline."""
    import json

    from transformers import GPT2Tokenizer

    vocab = {c: i for i, c in enumerate(byte_level_alphabet())}
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def build_tiny_captioner(folder, seed=0, dropout=0.1):
    """A random tiny ViT + GPT-2 (with cross-attention) VisionEncoderDecoderModel, tokenizer and image
    processor, saved like a hub checkpoint. `dropout` is GPT-2's (0.1 as released)."""
    import torch
    from transformers import (GPT2Config, GPT2LMHeadModel, VisionEncoderDecoderModel, ViTConfig, ViTImageProcessor,
                              ViTModel)

    tok = gpt2_tokenizer(folder / "tok")
    torch.manual_seed(seed)
    encoder = ViTModel(
        ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64)
    )
    decoder = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, add_cross_attention=True,
                   bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, resid_pdrop=dropout,
                   embd_pdrop=dropout, attn_pdrop=dropout)
    )
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    model.config.decoder_start_token_id = model.config.pad_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_tiny_parts(root):
    """A tiny ViT encoder (width 48, root/encoder) and a tiny GPT-2 without cross-attention (width 32, root/decoder),
    saved apart as the hub's google/vit-base-patch16-224-in21k and gpt2 are: the widths differ, so a projection
    joins them when lora_caption.py composes them."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64)).save_pretrained(root / "encoder")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "encoder")
    tok = gpt2_tokenizer(root / "decoder" / "tok")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
                    ).save_pretrained(root / "decoder")
    tok.save_pretrained(root / "decoder")
    return root


@pytest.fixture(scope="session")
def tiny_captioner(tmp_path_factory):
    return build_tiny_captioner(tmp_path_factory.mktemp("tiny-captioner"))


TINY_CAPTIONS = ROOT / "tests" / "data" / "captions-tiny"  # 30 Flickr8k images at 64 px, 5 captions each


@pytest.fixture
def cpu_graphs(monkeypatch):
    """common.CapturedStep on the CPU: torch.cuda's streams, synchronize and graphs replaced by stand-ins. A function
    wrapped by the returned `recorded` is, inside `torch.cuda.graph`, recorded instead of run, and `replay()` runs it
    again on the same (static) tensors, as a CUDA graph replays its kernels. What this cannot show (the kernels
    captured, CUDA's random offsets) is tests/test_gpu.py's."""
    from contextlib import contextmanager, nullcontext

    import torch

    capturing = []

    class Graph:
        def __init__(self):
            self.calls = []

        def replay(self):
            for fn, args, kwargs in self.calls:
                fn(*args, **kwargs)

    @contextmanager
    def graph(g):
        capturing.append(g)
        try:
            yield
        finally:
            capturing.pop()

    class Stream:
        def __init__(self, *args):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)

    def recorded(fn):
        def run(*args, **kwargs):
            if capturing:
                capturing[-1].calls.append((fn, args, kwargs))
                return None
            run.eager_calls += 1
            return fn(*args, **kwargs)
        run.eager_calls = 0  # calls run, not recorded: the warm-up's, then the eager ones
        return run
    return recorded
