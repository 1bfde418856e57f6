"""Issue 24 item 8: the scripts in a real Jupyter kernel (nbclient + ipykernel, as Jupyter and Colab run them). One
kernel runs each script's main() on tiny data, a user error, --help, %run and --compare, then checks that the
process-wide state a run touches (matplotlib's backend, torch's generator, cuDNN, transformers' bars) is as before."""
import json
import re

import nbformat
from nbclient import NotebookClient

from conftest import ROOT, TINY_CAPTIONS

SETUP = """
import sys, resource, torch, matplotlib, transformers
sys.path.insert(0, {root!r})
import common, vit_scratch, cnn_baseline, clip_zeroshot, lora_caption
torch.manual_seed(1234)
before = dict(backend=matplotlib.get_backend(), rng=torch.get_rng_state(), cudnn=torch.backends.cudnn.benchmark,
              bars=transformers.utils.logging.is_progress_bar_enabled())
"""
CELLS = {
    "vit": "s = vit_scratch.main('--data-dir {cifar} --epochs 2 --embed-dim 16 --hidden-dim 32 --num-heads 2 "
           "--num-layers 1 --batch-size 50 --device cpu --out-dir vit'); s",
    "vit_dict": "print(json.dumps([type(s).__name__, s['script'], isinstance(s, dict), s['epochs']]))",
    "error": "vit_scratch.main(['--epochs', '0'])",
    "help": "vit_scratch.main(['--help'])",
    "no_argv": "print(common.parse(vit_scratch.build_parser(), None)[0].epochs)",
    "run": "%run {root}/vit_scratch.py --epochs 0",
    # a large allocation before a run: the run's peak must not be the process's (this one's) peak
    "big": "big = torch.ones(2 ** 28); del big",
    "cnn": "c = cnn_baseline.main(['--data-dir', '{cifar}', '--epochs', '1', '--batch-size', '50', '--device', 'cpu', "
           "'--out-dir', 'cnn', '--no-plots'])\n"
           "print(json.dumps([c['peak_memory_mb'], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))",
    "clip": "z = clip_zeroshot.main(['--model', '{clip}', '--data-dir', '{cifar}', '--device', 'cpu', '--out-dir', "
            "'clip', '--no-plots']); z",
    "lora": "l = lora_caption.main(['--model', '{captioner}', '--data-dir', '{captions}', '--device', 'cpu', "
            "'--out-dir', 'lora', '--batch-size', '10', '--max-steps', '2', '--eval-images', '2', '--no-plots']); l",
    "compare": "cnn_baseline.main(['--compare', '.'])",
    "state": "print(json.dumps(dict(backend=matplotlib.get_backend() == before['backend'], "
             "rng=torch.equal(torch.get_rng_state(), before['rng']), cudnn=torch.backends.cudnn.benchmark == "
             "before['cudnn'], bars=transformers.utils.logging.is_progress_bar_enabled() == before['bars'])))",
}


def test_issue24_8_each_script_in_a_jupyter_kernel(tiny_cifar, tiny_clip, tiny_captioner, tmp_path):
    values = dict(root=str(ROOT), cifar=str(tiny_cifar), clip=str(tiny_clip), captioner=str(tiny_captioner),
                  captions=str(TINY_CAPTIONS))
    cells = [nbformat.v4.new_code_cell("import json\n" + SETUP.format(**values))]
    cells += [nbformat.v4.new_code_cell(code.format(**values)) for code in CELLS.values()]
    notebook = nbformat.v4.new_notebook(cells=cells)
    NotebookClient(notebook, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = {name: cell.outputs for name, cell in zip(["setup", *CELLS], notebook.cells)}

    def text(name, kind=None):
        return "".join(o.get("text", "") for o in out[name] if o.output_type == "stream" and kind in (None, o.name))

    def shown(name):  # a cell's value as the notebook shows it
        return "".join(o.data["text/plain"] for o in out[name] if o.output_type == "execute_result")

    errors = {name: o for name, outputs in out.items() for o in outputs if o.output_type == "error"}
    assert set(errors) == {"error", "run"}, {k: v.get("traceback") for k, v in errors.items()}
    # a user error, from main() and under %run (which parses the flags after the script's name): one line, neither
    # a traceback nor SystemExit; Run All stops there (an error output)
    for name in ("error", "run"):
        assert errors[name].traceback == ["vit_scratch.py: error: --epochs must be positive, got 0"]
        assert errors[name].ename == "RunFailed"
        assert text(name) == "" and "SystemExit" not in json.dumps(out[name])
    # the progress bars show (on stderr, as a terminal shows them), with the loss first
    assert "epoch 2/2 100%" in text("vit", "stderr")
    assert re.search(r"6/6 \[\d\d:\d\d<00:00, loss \d", text("vit", "stderr"))  # the loss first
    assert "training" in text("lora", "stderr")
    # a result in one line, and still the dict
    assert shown("vit").startswith("<vit_scratch summary: test_acc ") and shown("vit").count("\n") == 0
    assert json.loads(text("vit_dict")) == ["Summary", "vit_scratch", True, 2]
    assert shown("clip").startswith("<clip_zeroshot summary: test_acc ") and shown("lora").startswith(
        "<lora_caption summary: BLEU-4 ")
    # --help prints the script's usage and nothing fails; main() without arguments reads no kernel flags
    assert text("help", "stdout").startswith("usage: vit_scratch.py ") and out["help"][-1].output_type == "stream"
    assert text("no_argv").strip() == "10"
    # the run's own peak, not the kernel's (a 1 GiB tensor came before it)
    peak, kernel_peak = json.loads(text("cnn").strip().splitlines()[-1])
    assert 0 < peak < kernel_peak - 500
    # --compare: printed once, then one short line as the cell's value
    table = text("compare", "stdout")
    assert table.count("| model | data |") == 1 and shown("compare").startswith("<comparison table of 4 runs")
    # nothing global left changed
    assert json.loads(text("state")) == dict(backend=True, rng=True, cudnn=True, bars=True)
