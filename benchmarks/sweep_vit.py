"""Recipe sweep: train a list of recipes for 10 epochs each, in one process, through the scripts' own main(argv).

The data is decoded (or read from its cache) once and shared by every run; each run is the real script
with its real flags, so a row of the table is exactly what `python vit_scratch.py <flags>` gives. With
the CUDA-graph step a 10-epoch ViT run takes seconds on one GPU, so one 10-minute call settles a recipe.

    python benchmarks/sweep_vit.py --data-dir /tmp/cifar10                         # the built-in lists below
    python benchmarks/sweep_vit.py --data-dir /tmp/cifar10 --only vit --seeds 0 1 2
    python benchmarks/sweep_vit.py --data-dir /tmp/cifar10 --only issue23 --deadline 300   # issue 23's candidates
    python benchmarks/sweep_vit.py --data-dir /tmp/cifar10 --recipe "my-try=--muon-lr 0.007 --batch-size 512"
    python benchmarks/sweep_vit.py --device cpu --epochs 1 --limit-train 512 --limit-test 200   # smoke run

Prints one Markdown table (script, recipe, seed, test acc, train s, img/s) and, with --out, writes it to
a file too. A run that fails is a row with its error, not the end of the sweep; --deadline stops
starting new runs after that many seconds.
"""

import argparse
import functools
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cnn_baseline  # noqa: E402
import common  # noqa: E402
import vit_scratch  # noqa: E402

# (script, name, flags): the candidates measured on an H100 for issue 13, in the order that matters most.
VIT_RECIPES = [("vit_scratch", "fast (default)", ""), ("vit_scratch", "guide", "--recipe guide"),
               ("vit_scratch", "fast, Muon lr 0.005", "--muon-lr 0.005"),
               ("vit_scratch", "fast, Muon lr 0.0075", "--muon-lr 0.0075"),
               ("vit_scratch", "fast, Muon lr 0.015", "--muon-lr 0.015"),
               ("vit_scratch", "fast with AdamW", "--optimizer adamw"),
               ("vit_scratch", "fast, batch 512", "--batch-size 512 --lr 2e-3 --muon-lr 0.015")]
CNN_RECIPES = [("cnn_baseline", "default", ""), ("cnn_baseline", "label smoothing 0.2", "--label-smoothing 0.2"),
               ("cnn_baseline", "batch 256, lr 5e-3", "--batch-size 256 --lr 5e-3"),
               ("cnn_baseline", "widths 32 128 256 384", "--widths 32 128 256 384")]
# Issue 23: what can move the 10-epoch accuracy of the same architecture, with today's flags. One seed each first
# (--only issue23); every candidate that beats the default by more than one seed std dev (0.35 points) then gets
# seeds 0 1 2 (--recipe ... --seeds 0 1 2), and the default changes only on a 3-seed mean.
ISSUE23_VIT = [("vit_scratch", "fast (default)", ""),
               ("vit_scratch", "Muon lr 0.0075", "--muon-lr 0.0075"),
               ("vit_scratch", "Muon lr 0.0075, AdamW lr 2e-3", "--muon-lr 0.0075 --lr 2e-3"),
               ("vit_scratch", "AdamW lr 2e-3", "--lr 2e-3"),
               ("vit_scratch", "AdamW lr 5e-4", "--lr 5e-4"),
               ("vit_scratch", "warm-up 0.05", "--warmup 0.05"),
               ("vit_scratch", "warm-up 0.2", "--warmup 0.2"),
               ("vit_scratch", "label smoothing 0.05", "--label-smoothing 0.05"),
               ("vit_scratch", "label smoothing 0.2", "--label-smoothing 0.2"),
               ("vit_scratch", "weight decay 0.1", "--weight-decay 0.1"),
               ("vit_scratch", "weight decay 0.02", "--weight-decay 0.02"),
               ("vit_scratch", "batch 128, rates scaled", "--batch-size 128 --lr 7e-4 --muon-lr 0.0075"),
               ("vit_scratch", "init std 0.05", "--init-std 0.05"),
               ("vit_scratch", "Muon momentum 0.9", "--muon-momentum 0.9"),
               ("vit_scratch", "Muon momentum 0.98", "--muon-momentum 0.98"),
               ("vit_scratch", "EMA 0.99", "--ema 0.99"),
               ("vit_scratch", "EMA 0.995", "--ema 0.995"),
               ("vit_scratch", "linear decay", "--lr-shape linear"),
               ("vit_scratch", "trapezoid (flat, then linear over the last 20% after warm-up)",
                "--lr-shape trapezoid"),
               ("vit_scratch", "TTA: flip + shifts by 2", "--tta-shift 2"),
               ("vit_scratch", "TTA: flip + shifts by 4", "--tta-shift 4")]
SCRIPTS = {"vit_scratch": vit_scratch, "cnn_baseline": cnn_baseline}


def share_the_data():
    """Decode CIFAR-10 once: both scripts load their data through common.load_classifier_data, which looks
    load_cifar10 up in common, so one cached function there serves every run of the sweep."""
    cached = functools.lru_cache(maxsize=4)(common.load_cifar10)
    common.load_cifar10 = lambda data_dir, download=True, image_size=32, log=print, resumed_from=None: cached(
        data_dir, download, image_size)


def run_one(script, flags, seed, args, out_root):
    # --seed first, so that a recipe may fix its own (e.g. "fast s1=--seed 1"); the sweep's flags last
    argv = ["--seed", str(seed), *shlex.split(flags), "--epochs", str(args.epochs), "--data-dir", args.data_dir,
            "--device", args.device, "--no-download", "--no-plots", "--no-progress", "--out-dir",
            str(Path(tempfile.mkdtemp(dir=out_root)))]
    for name in ("limit_train", "limit_test"):
        if getattr(args, name):
            argv += [common.flag(name), str(getattr(args, name))]
    try:
        summary = SCRIPTS[script].main(argv)
        return {"acc": summary["test_acc"], "seconds": summary["train_seconds"], "img_s": summary["images_per_second"]}
    except SystemExit as e:  # a one-line error was printed; keep sweeping
        return {"error": f"exit {e.code}"}
    except Exception as e:
        return {"error": common.error_line(e, 120)}


def table(rows):
    lines = ["| script | recipe | flags | seed | test acc | train s | img/s |", "|---|---|---|---:|---:|---:|---:|"]
    for script, name, flags, seed, r in rows:
        seed = next((w for f, w in zip(flags.split(), flags.split()[1:]) if f == "--seed"), seed)
        if "error" in r:
            lines.append(f"| {script} | {name} | `{flags}` | {seed} | {r['error']} | | |")
        else:
            lines.append(
                f"| {script} | {name} | `{flags}` | {seed} | {r['acc']:.2%} | {r['seconds']:.1f} | {r['img_s']:,.0f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(ROOT / "data"), help="CIFAR-10 folder, as the scripts take it")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="every recipe runs once per seed")
    p.add_argument("--only", choices=["vit", "cnn", "issue23"], help="one built-in list only")
    p.add_argument("--recipe", action="append", metavar="NAME=FLAGS",
                   help="a recipe of your own instead of the built-in lists (repeatable; prefix cnn: for the CNN)")
    p.add_argument("--limit-train", type=int)
    p.add_argument("--limit-test", type=int)
    p.add_argument("--deadline", type=float, default=float("inf"), help="start no new run after this many seconds")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    if args.recipe:
        recipes = []
        for spec in args.recipe:
            name, _, flags = spec.partition("=")
            script = "cnn_baseline" if name.startswith("cnn:") else "vit_scratch"
            recipes.append((script, name.removeprefix("cnn:"), flags))
    elif args.only == "issue23":
        recipes = ISSUE23_VIT
    else:
        recipes = (VIT_RECIPES if args.only != "cnn" else []) + (CNN_RECIPES if args.only != "vit" else [])
    share_the_data()
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as out_root:
        for script, name, flags in recipes:
            for seed in args.seeds:
                if time.perf_counter() - start > args.deadline:
                    rows.append((script, name, flags, seed, {"error": "not run (deadline)"}))
                    continue
                rows.append((script, name, flags, seed, run_one(script, flags, seed, args, out_root)))
                print(f"[sweep {time.perf_counter() - start:.0f}s] {script} {name} seed {seed}: {rows[-1][-1]}",
                      flush=True)
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return rows


if __name__ == "__main__":
    main()
