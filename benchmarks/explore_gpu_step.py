"""GPU exploration for issue 13 (prototype, not product code): a CUDA-graph-captured training step for
the ViT and the CNN, its speed against eager, and a recipe sweep (10 epochs per recipe) that fits one call.

    python .gpu/explore.py --data-dir /tmp/cifar10 --deadline 290 --out $OUT
"""
import argparse
import copy
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import CIFAR_MEAN, CIFAR_STD, apply_crop_flip, crop_flip_params, load_cifar10, stratified_subset  # noqa
from vit_scratch import VisionTransformer  # noqa
from cnn_baseline import ResidualCNN  # noqa

T0 = time.perf_counter()


# ---------------------------------------------------------------- data on the device, no host syncs
class Loader:
    def __init__(self, x, y, batch, device, train, seed=0):
        self.x, self.y = x.to(device), y.to(device)
        self.batch, self.train, self.seed, self.device = batch, train, seed, device
        self.mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1) * 255
        self.epoch = 0

    def norm(self, x):
        return (x.float() - self.mean) / self.std

    def __len__(self):
        return len(self.y) // self.batch if self.train else -(-len(self.y) // self.batch)

    def __iter__(self):
        if not self.train:
            for i in range(0, len(self.y), self.batch):
                yield self.norm(self.x[i:i + self.batch]), self.y[i:i + self.batch]
            return
        g = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.y), device=self.device, generator=g)
        for i in range(len(self)):
            idx = order[i * self.batch:(i + 1) * self.batch]
            params = crop_flip_params(self.batch, generator=g, device=self.device)
            yield self.norm(apply_crop_flip(self.x[idx], params)), self.y[idx]


# ---------------------------------------------------------------- Muon that a graph can capture
def newton_schulz(G, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            by_shape = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, ps in by_shape.items():
                bufs = [self.state[p]["momentum_buffer"] for p in ps]
                grads = [p.grad for p in ps]
                torch._foreach_lerp_(bufs, grads, 1 - mom)
                G = torch.stack([g.lerp(b, mom) for g, b in zip(grads, bufs)])  # nesterov
                G = G.reshape(len(ps), shape[0], -1)
                U = newton_schulz(G)
                scale = max(1, G.size(1) / G.size(2)) ** 0.5
                if wd:
                    torch._foreach_mul_(ps, 1 - lr * wd)
                U = (U.float() * (-lr * scale)).reshape(len(ps), *shape)
                torch._foreach_add_(ps, list(U.unbind(0)))


# ---------------------------------------------------------------- the step and its graph
DEVICE_TYPE = "cuda"


def autocast(dtype):
    if DEVICE_TYPE != "cuda":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)


class Trainer:
    """Holds what one step needs; step() is the whole step (no zero_grad: see capture)."""

    def __init__(self, model, optimizers, label_smoothing, grad_clip, amp_dtype, batch, ema_decay=0.0,
                 channels_last=False):
        self.model, self.optimizers = model, optimizers
        self.ls, self.grad_clip, self.amp = label_smoothing, grad_clip, amp_dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
        dev = self.params[0].device
        self.x = torch.zeros(batch, 3, 32, 32, device=dev)
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.zeros(batch, dtype=torch.long, device=dev)
        self.loss_sum = torch.zeros((), device=dev)
        self.correct = torch.zeros((), device=dev, dtype=torch.long)
        self.ema = None
        if ema_decay:
            self.ema_src = [t for t in model.state_dict().values() if t.is_floating_point()]
            self.ema = [t.detach().clone() for t in self.ema_src]
            self.ema_w = torch.zeros((), device=dev)
        self.graph = None

    def step(self):
        with autocast(self.amp):
            logits = self.model(self.x)
        loss = F.cross_entropy(logits.float(), self.y, label_smoothing=self.ls)
        loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        for opt in self.optimizers:
            opt.step()
        self.loss_sum += loss.detach() * len(self.y)
        self.correct += (logits.argmax(1) == self.y).sum()
        if self.ema is not None:
            diff = torch._foreach_sub([t.detach().float() for t in self.ema_src], self.ema)
            torch._foreach_mul_(diff, self.ema_w)
            torch._foreach_add_(self.ema, diff)

    def snapshot(self):
        """Everything a step changes: weights and buffers, optimizer state, statistics, the CUDA RNG."""
        tensors = list(self.model.state_dict().values()) + [self.loss_sum, self.correct] + (self.ema or [])
        opt_state = {id(p): {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                     for opt in self.optimizers for p, st in opt.state.items()}
        return [t.detach().clone() for t in tensors], opt_state, torch.cuda.get_rng_state()

    def restore(self, snap):
        """Undo the warm-up steps in place (a graph records addresses): state that the warm-up created
        starts from zero, as a fresh optimizer's would."""
        saved, opt_state, rng = snap
        tensors = list(self.model.state_dict().values()) + [self.loss_sum, self.correct] + (self.ema or [])
        for t, s in zip(tensors, saved):
            t.detach().copy_(s)
        for opt in self.optimizers:
            for p, st in opt.state.items():
                before = opt_state.get(id(p), {})
                for k, v in st.items():
                    if torch.is_tensor(v):
                        v.copy_(before[k]) if k in before else v.zero_()
        torch.cuda.set_rng_state(rng)

    def capture(self, x0, y0, warmup=3):
        self.x.copy_(x0)
        self.y.copy_(y0)
        snap = self.snapshot()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for i in range(warmup):
                for opt in self.optimizers:
                    opt.zero_grad(set_to_none=True)
                self.step()
        torch.cuda.current_stream().wait_stream(s)
        self.restore(snap)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def run(self, x, y):
        self.x.copy_(x)
        self.y.copy_(y)
        if self.graph is not None:
            self.graph.replay()
        else:
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            self.step()


def sync():
    if DEVICE_TYPE == "cuda":
        torch.cuda.synchronize()


def lr_factor(step, warmup_steps, total_steps):
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model, loader, amp, tta=False, channels_last=False):
    model.eval()
    correct = torch.zeros((), device=loader.device, dtype=torch.long)
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(amp):
            logits = model(x).float()
            if tta:
                logits = logits + model(x.flip(3)).float()
        correct += (logits.argmax(1) == y).sum()
    model.train()
    return correct.item() / len(loader.y)


# ---------------------------------------------------------------- one run
VIT_BASE = dict(batch=256, lr=1e-3, wd=0.05, ls=0.1, warmup=0.1, dropout=0.0, init_std=1.0, betas=(0.9, 0.999),
                ema=0.0, tta=False, muon_lr=0.0, muon_wd=0.0, muon_mom=0.95, epochs=10, clip=1.0, seed=0,
                per_epoch_cos=False)
CNN_BASE = dict(batch=128, lr=3e-3, wd=0.05, ls=0.1, warmup=0.1, widths=(32, 64, 256, 256), betas=(0.9, 0.999),
                ema=0.0, tta=False, muon_lr=0.0, muon_wd=0.0, muon_mom=0.95, epochs=10, clip=1.0, seed=0,
                per_epoch_cos=False)


def build_vit(r, device):
    torch.manual_seed(r["seed"])
    model = VisionTransformer(dropout=r["dropout"]).to(device)
    if r["init_std"] != 1.0:
        with torch.no_grad():
            model.cls_token.normal_(0, r["init_std"])
            model.pos_embedding.normal_(0, r["init_std"])
    hidden = [m.weight for b in model.blocks for m in (b.attn.to_qkv, b.attn.to_out, b.mlp[0], b.mlp[3])]
    return model, hidden, {"cls_token", "pos_embedding"}


def build_cnn(r, device):
    torch.manual_seed(r["seed"])
    model = ResidualCNN(widths=tuple(r["widths"])).to(device).to(memory_format=torch.channels_last)
    hidden = [p for n, p in model.named_parameters() if p.ndim == 4 and not n.startswith("stem")]
    return model, hidden, set()


def make_opts(model, hidden, no_decay_names, r, device):
    hidden_ids = {id(p) for p in hidden} if r["muon_lr"] else set()
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if id(p) in hidden_ids:
            continue
        (decay if p.ndim >= 2 and n not in no_decay_names else no_decay).append(p)
    lr_t = torch.tensor(r["lr"], device=device)
    opts = [torch.optim.AdamW([{"params": decay, "weight_decay": r["wd"]}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=lr_t, betas=r["betas"], fused=device.type == "cuda", capturable=device.type == "cuda")]
    lrs = [(lr_t, r["lr"])]
    if r["muon_lr"]:
        m_t = torch.tensor(r["muon_lr"], device=device)
        opts.append(Muon(hidden, lr=m_t, momentum=r["muon_mom"], weight_decay=r["muon_wd"]))
        lrs.append((m_t, r["muon_lr"]))
    return opts, lrs


def train(kind, r, data, device, graph=True, max_steps=None, log=None):
    build = build_vit if kind == "vit" else build_cnn
    cl = kind == "cnn"
    model, hidden, nd = build(r, device)
    opts, lrs = make_opts(model, hidden, nd, r, device)
    train_loader = Loader(data["train_x"], data["train_y"], r["batch"], device, True, seed=r["seed"])
    test_loader = Loader(data["test_x"], data["test_y"], 2500, device, False)
    trainer = Trainer(model, opts, r["ls"], r["clip"], torch.bfloat16, r["batch"], r["ema"], channels_last=cl)
    eval_model = copy.deepcopy(model) if r["ema"] else model
    steps_per_epoch = len(train_loader)
    total = steps_per_epoch * r["epochs"]
    warm = int(r["warmup"] * total)
    sync()
    t0 = time.perf_counter()
    step, accs = 0, []
    for epoch in range(1, r["epochs"] + 1):
        train_loader.epoch = epoch
        torch.manual_seed(r["seed"] * 1_000_003 + epoch)
        for x, y in train_loader:
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            if graph and trainer.graph is None:
                trainer.capture(x, y)
            f = (0.5 * (1 + math.cos(math.pi * (epoch - 1) / r["epochs"]))) if r["per_epoch_cos"] else lr_factor(step, warm, total)
            for t, base in lrs:
                t.fill_(base * f)
            if trainer.ema is not None:
                trainer.ema_w.fill_(1 - min(r["ema"], (1 + step) / (10 + step)))
            trainer.run(x, y)
            step += 1
            if max_steps and step >= max_steps:
                break
        if max_steps and step >= max_steps:
            break
        if trainer.ema is not None:
            for t, e in zip([t for t in eval_model.state_dict().values() if t.is_floating_point()], trainer.ema):
                t.copy_(e)
        accs.append(evaluate(eval_model, test_loader, torch.bfloat16, r["tta"], cl))
    sync()
    secs = time.perf_counter() - t0
    loss = trainer.loss_sum.item() / max(1, step * r["batch"])
    return dict(acc=accs[-1] if accs else None, accs=accs, secs=secs, steps=step, loss=loss)


def time_steps(kind, r, data, device, graph, n=100):
    """ms per training step (data included) after warm-up."""
    build = build_vit if kind == "vit" else build_cnn
    cl = kind == "cnn"
    model, hidden, nd = build(r, device)
    opts, lrs = make_opts(model, hidden, nd, r, device)
    loader = Loader(data["train_x"], data["train_y"], r["batch"], device, True)
    trainer = Trainer(model, opts, r["ls"], r["clip"], torch.bfloat16, r["batch"], r["ema"], channels_last=cl)
    batches = iter(loader)
    def one():
        x, y = next(batches)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        if graph and trainer.graph is None:
            trainer.capture(x, y)
        for t, base in lrs:
            t.fill_(base)
        trainer.run(x, y)
    for _ in range(10):
        one()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        one()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default="/tmp/cifar10")
    p.add_argument("--deadline", type=float, default=290)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="CPU-free smoke: few steps")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    global DEVICE_TYPE
    device = torch.device(a.device)
    DEVICE_TYPE = device.type
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    d = load_cifar10(a.data_dir, download=False)
    data = dict(train_x=d.train_x, train_y=d.train_y, test_x=d.test_x, test_y=d.test_y)
    print(f"data loaded at {time.perf_counter() - T0:.1f}s: {len(d.train_y)} train, {len(d.test_y)} test", flush=True)
    results = []
    log = open(out / "explore.jsonl", "a")

    def record(row):
        results.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(json.dumps(row), flush=True)

    # 1. step timing: eager vs graph (ViT batch 256, CNN batch 128/512, ViT muon)
    timing = [("vit", VIT_BASE, "vit b256"), ("vit", {**VIT_BASE, "dropout": 0.1}, "vit b256 drop0.1"),
              ("vit", {**VIT_BASE, "muon_lr": 0.02}, "vit b256 muon"), ("vit", {**VIT_BASE, "batch": 128}, "vit b128"),
              ("cnn", CNN_BASE, "cnn b128"), ("cnn", {**CNN_BASE, "batch": 512}, "cnn b512")]
    for kind, r, name in (timing if device.type == "cuda" else []):
        for graph in (False, True):
            try:
                ms = time_steps(kind, r, data, device, graph, n=60 if graph else 30)
                record({"what": "step_ms", "name": name, "graph": graph, "ms": round(ms, 3),
                        "img_s": round(r["batch"] / ms * 1e3)})
            except Exception as e:
                record({"what": "step_ms", "name": name, "graph": graph, "error": f"{type(e).__name__}: {e}"[:300]})
                traceback.print_exc()
    # 2. the sweep
    V = VIT_BASE
    vit_recipes = [
        ("guide", {**V, "batch": 128, "lr": 3e-4, "wd": 0.01, "ls": 0.0, "warmup": 0.0, "dropout": 0.1, "per_epoch_cos": True}),
        ("main-default (drop0.1)", {**V, "dropout": 0.1}),
        ("base drop0", V),
        ("init0.02", {**V, "init_std": 0.02}),
        ("init0.02 b128", {**V, "init_std": 0.02, "batch": 128}),
        ("init0.02 lr2e-3", {**V, "init_std": 0.02, "lr": 2e-3}),
        ("init0.02 betas.95", {**V, "init_std": 0.02, "betas": (0.9, 0.95)}),
        ("init0.02 muon.02", {**V, "init_std": 0.02, "muon_lr": 0.02}),
        ("init0.02 muon.05", {**V, "init_std": 0.02, "muon_lr": 0.05}),
        ("init0.02 muon.01", {**V, "init_std": 0.02, "muon_lr": 0.01}),
        ("init0.02 ema.999", {**V, "init_std": 0.02, "ema": 0.999}),
        ("init0.02 tta", {**V, "init_std": 0.02, "tta": True}),
        ("init0.02 ls0.2", {**V, "init_std": 0.02, "ls": 0.2}),
        ("init0.02 wd0.1", {**V, "init_std": 0.02, "wd": 0.1}),
        ("init0.02 b128 lr5e-4", {**V, "init_std": 0.02, "batch": 128, "lr": 5e-4}),
        ("init0.02 muon.02 b128", {**V, "init_std": 0.02, "muon_lr": 0.02, "batch": 128}),
        ("init0.02 muon.02 lr2e-3", {**V, "init_std": 0.02, "muon_lr": 0.02, "lr": 2e-3}),
        ("init0.02 b512 lr2e-3", {**V, "init_std": 0.02, "batch": 512, "lr": 2e-3}),
        ("init0.02 warm0.05", {**V, "init_std": 0.02, "warmup": 0.05}),
        ("init0.02 muon.02 wd0.1", {**V, "init_std": 0.02, "muon_lr": 0.02, "muon_wd": 0.1}),
        ("init0.02 muon.02 ema.999 tta", {**V, "init_std": 0.02, "muon_lr": 0.02, "ema": 0.999, "tta": True}),
        ("init0.02 b128 muon.02 ema.999 tta", {**V, "init_std": 0.02, "batch": 128, "muon_lr": 0.02, "ema": 0.999, "tta": True}),
        ("init0.02 betas.95 ema.999 tta", {**V, "init_std": 0.02, "betas": (0.9, 0.95), "ema": 0.999, "tta": True}),
    ]
    C = CNN_BASE
    cnn_recipes = [
        ("cnn main-default", C),
        ("cnn tta", {**C, "tta": True}),
        ("cnn ls0.2 tta", {**C, "ls": 0.2, "tta": True}),
        ("cnn b256 lr4e-3 tta", {**C, "batch": 256, "lr": 4e-3, "tta": True}),
        ("cnn muon.05 tta", {**C, "muon_lr": 0.05, "tta": True}),
        ("cnn muon.2 ls0.2 tta", {**C, "muon_lr": 0.2, "ls": 0.2, "tta": True}),
        ("cnn ema.99 tta", {**C, "ema": 0.99, "tta": True}),
        ("cnn w64-256-384 tta", {**C, "widths": (64, 128, 256, 384), "tta": True}),
    ]
    order = vit_recipes[:4] + cnn_recipes[:3] + vit_recipes[4:12] + cnn_recipes[3:] + vit_recipes[12:]
    if a.quick:
        order = order[:2] + [vit_recipes[7], vit_recipes[10]] + cnn_recipes[:1] + [cnn_recipes[4], cnn_recipes[6]]
    for name, r in order:
        if time.perf_counter() - T0 > a.deadline:
            record({"what": "skipped", "name": name, "why": "deadline"})
            continue
        kind = "cnn" if name.startswith("cnn") else "vit"
        try:
            if a.quick:
                r = {**r, "batch": 64}
            res = train(kind, r, data, device, graph=device.type == "cuda", max_steps=20 if a.quick else None)
            record({"what": "run", "name": name, **res})
        except Exception as e:
            record({"what": "run", "name": name, "error": f"{type(e).__name__}: {e}"[:300]})
            traceback.print_exc()
    print("\n| recipe | test acc | train s | per-epoch acc |\n|---|---:|---:|---|")
    for row in results:
        if row["what"] == "run" and "acc" in row:
            print(f"| {row['name']} | {row['acc']:.2%} | {row['secs']:.1f} | {' '.join(f'{x:.3f}' for x in row['accs'])} |")
        elif row["what"] == "step_ms":
            print(f"| step {row['name']} graph={row['graph']} | {row.get('ms', row.get('error'))} ms | {row.get('img_s', '')} img/s | |")
    print(f"total {time.perf_counter() - T0:.0f}s")


if __name__ == "__main__":
    main()
