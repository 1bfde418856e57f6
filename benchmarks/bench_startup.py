"""Where the whole `python vit_scratch.py` command spends its time: the real main(argv), its phases timed.

The script is run through its own main() in this process; the functions main() calls for each phase
(common's load_classifier_data, make_step, evaluate, save_run, write_summary's pictures) are wrapped
with timers that wait for the GPU before and after, so each phase's time is its own. Imports are timed
before main() starts. Training is the summary's train_seconds less the capture; "other" is whatever
main() did outside the named phases (model and optimizer set-up, CUDA start, the start line, the epoch lines).

    python benchmarks/bench_startup.py --data-dir /tmp/cifar10 --epochs 10                  # one GPU
    python benchmarks/bench_startup.py --device cpu --epochs 1 --limit-train 2000 --limit-test 500

Prints a Markdown table (phase, calls, seconds, share of the whole) and the flags it ran with.
"""
import time

T_START = time.perf_counter()
import argparse  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

T_TORCH = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import vit_scratch  # noqa: E402

T_SCRIPT = time.perf_counter()
PHASES = {"plumbing.load_classifier_data": "data (decode cache, subsets)",
          "make_step": "step set-up (CUDA-graph capture)",
          "evaluate": "evaluation (flip TTA)", "save_run": "checkpoints (last.pt, best.pt)",
          "save_pictures": "pictures"}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, name, spent):
    def wrapper(*a, **k):
        sync()
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            sync()
            spent[name][0] += 1
            spent[name][1] += time.perf_counter() - t0
    return wrapper


def breakdown(argv):
    """{phase: [calls, seconds]} of one main(argv) run, its summary, and the whole time since start."""
    spent = {name: [0, 0.0] for name in PHASES}
    for name in PHASES:  # a name in vit_scratch, or in common.py through vit_scratch.plumbing
        owner, attr = (vit_scratch.plumbing, name.split(".")[1]) if "." in name else (vit_scratch, name)
        setattr(owner, attr, timed(getattr(owner, attr), name, spent))
    t0 = time.perf_counter()
    summary = vit_scratch.main(argv)
    sync()
    main_seconds = time.perf_counter() - t0
    capture = spent["make_step"][1]
    rows = {"imports (torch)": [1, T_TORCH - T_START], "imports (the script, common.py)": [1, T_SCRIPT - T_TORCH]}
    rows.update({PHASES[k]: v for k, v in spent.items()})
    rows["training steps"] = [summary["epochs"], summary["train_seconds"] - capture]
    rows["other (model, optimizers, CUDA start, logs)"] = [1, main_seconds - sum(v[1] for v in spent.values())
                                                           - rows["training steps"][1]]
    return rows, summary, time.perf_counter() - T_START


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(ROOT / "tests" / "data" / "cifar10-tiny"))
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--limit-train", type=int)
    p.add_argument("--limit-test", type=int)
    p.add_argument("--extra", default="", help="more vit_scratch.py flags, one string")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        flags = ["--data-dir", args.data_dir, "--device", args.device, "--epochs", str(args.epochs), "--no-progress",
                 "--out-dir", str(Path(out) / "run"), *shlex.split(args.extra)]
        flags += ["--limit-train", str(args.limit_train)] if args.limit_train else []
        flags += ["--limit-test", str(args.limit_test)] if args.limit_test else []
        rows, summary, whole = breakdown(flags)
    at = flags.index("--out-dir")
    shown = flags[:at] + flags[at + 2:]  # the temporary folder is gone: the flags that shaped the run
    print(f"\nvit_scratch.py {shlex.join(shown)} | test acc {summary['test_acc']:.2%} | {summary['device_name']}")
    print("| phase | calls | seconds | share |")
    print("|---|---:|---:|---:|")
    for name, (calls, seconds) in rows.items():
        print(f"| {name} | {calls} | {seconds:.2f} | {seconds / whole:.1%} |")
    print(f"| **whole process** | | **{whole:.2f}** | 100% |")
    return rows, whole


if __name__ == "__main__":
    main()
