"""torchrun: 2 processes with gloo on the CPU train exactly what 1 process trains at the same global batch."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, TINY_CAPTIONS, build_tiny_captioner

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# AdamW, not the fast recipe's Muon: Muon orthogonalises each update, which lifts the gradient's float round-off in
# near-null directions to the size of a real step, so two summation orders could not be compared number for number.
VIT = ["--embed-dim", "32", "--hidden-dim", "64", "--num-heads", "4", "--num-layers", "2", "--dropout", "0",
       "--no-plots", "--device", "cpu", "--limit-train", "128", "--limit-test", "99", "--optimizer", "adamw"]
# Stated tolerance: the two runs differ only in the order floating-point gradients are summed.
ATOL, RTOL = 1e-5, 1e-4


def single(script, *flags, **kw):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, flags)], capture_output=True, text=True,
                          env=ENV, timeout=300, **kw)


def started(script, *flags):
    """A one-process reference run, started beside the torchrun run it is compared with (to save the suite's time);
    .communicate() waits for it."""
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, flags)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def torchrun(script, *flags):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / script),
            *map(str, flags)]


def kill_tree(pid):
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions of their own)."""
    children = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                ppid = int(open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(stat))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in reversed(tree):  # workers first, then the launcher
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def assert_close_states(a, b):
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.to_qkv.bias"):
            # The key bias has an exactly zero gradient (softmax ignores a shift shared by all keys), so AdamW
            # turns round-off into steps there and the two runs drift apart by ~1e-5; it never changes an
            # output. Compare the query and value biases only.
            d = len(x) // 3
            x, y = torch.cat([x[:d], x[2 * d :]]), torch.cat([y[:d], y[2 * d :]])
        torch.testing.assert_close(x, y, atol=ATOL, rtol=RTOL, msg=k)


def load(path, key):
    return torch.load(path, map_location="cpu", weights_only=True)[key]


def test_vit_two_processes_equal_one_at_the_same_global_batch(tiny_cifar, tmp_path):
    one = started("vit_scratch.py", "--data-dir", tiny_cifar, *VIT, "--epochs", "2", "--batch-size", "32", "--out-dir",
                  tmp_path / "one")
    two = subprocess.run(
        torchrun("vit_scratch.py", "--data-dir", tiny_cifar, *VIT, "--epochs", "2", "--batch-size", "16", "--out-dir",
                 tmp_path / "two"),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one_err = one.communicate(timeout=300)[1]
    assert one.returncode == 0, one_err
    assert two.stdout.count("epoch   2/2") == 1  # rank 0 alone prints
    assert "batch 32 (2 processes x 16)" in two.stdout
    assert_close_states(load(tmp_path / "one" / "last.pt", "model"), load(tmp_path / "two" / "last.pt", "model"))
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert (s2["world_size"], s2["global_batch"], s1["world_size"], s1["global_batch"]) == (2, 32, 1, 32)
    # sharded evaluation: 99 test images split 49 / 50 across the processes, each counted exactly once
    assert s2["test_images"] == 99 and sum(map(sum, s2["confusion_matrix"])) == 99
    assert s2["confusion_matrix"] == s1["confusion_matrix"] and s2["steps"] == s1["steps"] == 8
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2  # written once, by rank 0


def test_a_two_process_checkpoint_resumes_on_one_process(tiny_cifar, tmp_path):
    flags = ["--data-dir", tiny_cifar, *VIT, "--epochs", "8"]
    one = started("vit_scratch.py", *flags, "--batch-size", "32", "--out-dir", tmp_path / "one")
    victim = subprocess.Popen(torchrun("vit_scratch.py", *flags, "--batch-size", "16", "--out-dir", tmp_path / "two"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while not (tmp_path / "two" / "last.pt").exists():
        assert victim.poll() is None and time.time() < deadline
        time.sleep(0.05)
    kill_tree(victim.pid)  # the launcher and both workers
    victim.wait()
    time.sleep(0.5)
    epoch = load(tmp_path / "two" / "last.pt", "state")["epoch"]
    assert 1 <= epoch < 8
    resumed = single(
        "vit_scratch.py", "--resume", tmp_path / "two" / "last.pt", "--data-dir", tiny_cifar, "--device", "cpu"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {tmp_path / 'two' / 'last.pt'} after epoch {epoch}" in resumed.stdout
    assert "batch 32 |" in resumed.stdout  # the global batch is kept: 1 process x 32
    one_err = one.communicate(timeout=300)[1]
    assert one.returncode == 0, one_err
    assert_close_states(load(tmp_path / "one" / "last.pt", "model"), load(tmp_path / "two" / "last.pt", "model"))


def test_lora_two_processes_equal_one_at_the_same_global_batch(tmp_path):
    # GPT-2's own dropout (active while the adapters train) draws differently per process: switched off
    # here, with the adapters' dropout, so that the two runs can be compared number for number.
    model = build_tiny_captioner(tmp_path / "model", dropout=0.0)
    flags = ["--model", model, "--data-dir", TINY_CAPTIONS, "--device", "cpu", "--epochs", "2", "--lr", "1e-2",
             "--lora-dropout", "0", "--grad-accum", "2", "--no-baseline", "--eval-images", "2", "--no-plots",
             "--eval-every", "100", "--save-every", "100"]
    one = single("lora_caption.py", *flags, "--batch-size", "10", "--out-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(torchrun("lora_caption.py", *flags, "--batch-size", "5", "--out-dir", tmp_path / "two"),
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "batch 10 (2 processes x 5) x 2 accumulated" in two.stdout
    a, b = (load(tmp_path / "one" / "training_state.pt", "trainable"),
            load(tmp_path / "two" / "training_state.pt", "trainable"))
    assert len(a) == 16 and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    assert_close_states(a, b)
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (s2["world_size"], s2["global_batch"], s2["steps"]) == (2, 10, 10)


def test_sync_bn_on_cpu_is_refused_before_any_work(tiny_cifar, tmp_path):
    proc = subprocess.run(
        torchrun("cnn_baseline.py", "--data-dir", tiny_cifar, "--device", "cpu", "--sync-bn", "--out-dir", tmp_path),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert proc.returncode != 0 and "--sync-bn needs CUDA GPUs" in proc.stderr
    assert not (tmp_path / "last.pt").exists()
