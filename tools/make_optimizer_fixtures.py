#!/usr/bin/env python3
"""Regenerate tests/fixtures/optimizers.safetensors: the optimizers' reference trajectories.

How to run (from the repository root; nothing is downloaded):

    ~/.cache/sd-lora-venv/bin/pip install -r tools/requirements.txt
    ~/.cache/sd-lora-venv/bin/python tools/make_optimizer_fixtures.py

Each case runs the reference implementation users know from kohya sd-scripts for six steps on
the same four parameters (LoRA-like shapes: a matrix under and one over bitsandbytes' 4,096-value
limit for 8-bit state, a conv `down`, and an all-zero conv `up`) in two parameter groups, with a
learning-rate factor that changes every step and some parameters getting no gradient on some
steps. The gradients are fixed in advance (a constant pull towards a target plus noise, so that
Prodigy's step-size estimate grows) and shared by all cases. The Rust test
crates/train/tests/optim_reference.rs feeds them to our optimizers and compares the parameters
after every step.

Cases (reference → our optimizer):
  adamw8bit       bitsandbytes.optim.AdamW8bit (its CPU kernels)  → train.optimizer = "adamw8bit"
  prodigy         prodigyopt.Prodigy, defaults + weight decay       → "prodigy"
  prodigy_tuned   Prodigy with safeguard warm-up, d_coef 2, growth rate 1.5 (it binds),
                  slice_p 3, d0 1e-3
  prodigy_bc      Prodigy with bias correction and d_coef 2
  adafactor       transformers' Adafactor, fixed lr, no relative step or scaling (kohya's advice)
  adafactor_rel   Adafactor with relative step, parameter scaling, warm-up init and beta1 0.9
  lion            lion_pytorch.Lion                                  → "lion"

Also written: bitsandbytes' two dynamic maps and one block-wise quantisation of a test vector
(to check our map and rounding bit for bit), bitsandbytes' 8-bit state after the last step,
and Prodigy's d after every step.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "optimizers.safetensors"

SHAPES = [(16, 40), (16, 260), (8, 4, 3, 3), (32, 8, 1, 1)]
# Parameter 3 starts at zero, like a LoRA `up`.
ZERO = {3}
GROUPS = [("unet", [0, 1, 3]), ("te", [2])]
STEPS = 6
FACTORS = [1.0, 0.5, 0.8, 1.0, 0.3, 1.0]
# (step, parameter) pairs without a gradient.
MISSING = {(0, 2), (2, 2), (3, 1)}


def initial_values(gen):
    out = []
    for k, s in enumerate(SHAPES):
        if k in ZERO:
            out.append(torch.zeros(s))
        else:
            out.append(torch.randn(s, generator=gen) * 0.1)
    return out


def gradients(gen, init):
    targets = [torch.randn(s, generator=gen) * 0.1 for s in SHAPES]
    grads = []
    for step in range(STEPS):
        row = []
        for k, s in enumerate(SHAPES):
            if (step, k) in MISSING:
                row.append(None)
            else:
                pull = 0.5 * (init[k] - targets[k])
                if k in ZERO:
                    pull = -0.5 * targets[k]
                row.append(pull + 0.1 * torch.randn(s, generator=gen))
        grads.append(row)
    return grads


def run(case, init, grads):
    params = [torch.nn.Parameter(p.clone()) for p in init]
    lrs = case["lrs"]
    groups = []
    for (name, idx), lr, wd in zip(GROUPS, lrs, case["wds"]):
        g = {"params": [params[i] for i in idx], "weight_decay": wd}
        if lr is not None:
            g["lr"] = lr
        groups.append(g)
    opt = case["make"](groups)
    traj, ds = [], []
    for step in range(STEPS):
        for g, lr in zip(opt.param_groups, lrs):
            if lr is not None:
                g["lr"] = lr * FACTORS[step]
        for k, p in enumerate(params):
            p.grad = None if grads[step][k] is None else grads[step][k].clone()
        opt.step()
        traj.append([p.detach().clone() for p in params])
        if "d" in opt.param_groups[0]:
            ds.append(float(opt.param_groups[0]["d"]))
    return traj, ds, opt, params


def main():
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import lion_pytorch
    import prodigyopt
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    init = initial_values(gen)
    grads = gradients(gen, init)

    cases = {
        "adamw8bit": {
            "lrs": [1e-2, 5e-3],
            "wds": [0.1, 0.0],
            "make": lambda g: bnb.optim.AdamW8bit(g, betas=(0.9, 0.999), eps=1e-8),
        },
        "prodigy": {
            "lrs": [1.0, 1.0],
            "wds": [0.01, 0.0],
            "make": lambda g: prodigyopt.Prodigy(g),
        },
        "prodigy_tuned": {
            "lrs": [1.0, 1.0],
            "wds": [0.0, 0.0],
            "make": lambda g: prodigyopt.Prodigy(
                g,
                safeguard_warmup=True,
                d_coef=2.0,
                growth_rate=1.5,
                slice_p=3,
                d0=1e-3,
            ),
        },
        "prodigy_bc": {
            "lrs": [1.0, 1.0],
            "wds": [0.0, 0.0],
            "make": lambda g: prodigyopt.Prodigy(g, use_bias_correction=True, d_coef=2.0),
        },
        "adafactor": {
            "lrs": [1e-2, 5e-3],
            "wds": [0.1, 0.0],
            "make": lambda g: Adafactor(
                g, lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False
            ),
        },
        "adafactor_rel": {
            "lrs": [None, None],
            "wds": [0.1, 0.0],
            "make": lambda g: Adafactor(
                g, lr=None, relative_step=True, scale_parameter=True, warmup_init=True, beta1=0.9
            ),
        },
        "lion": {
            "lrs": [1e-3, 5e-4],
            "wds": [0.1, 0.0],
            "make": lambda g: lion_pytorch.Lion(g, betas=(0.9, 0.99)),
        },
    }

    tensors = {}
    for k, p in enumerate(init):
        tensors[f"init.{k}"] = p
    for step, row in enumerate(grads):
        for k, g in enumerate(row):
            if g is not None:
                tensors[f"grad.{step}.{k}"] = g
    for name, case in cases.items():
        traj, ds, opt, params = run(case, init, grads)
        for step, ps in enumerate(traj):
            for k, p in enumerate(ps):
                tensors[f"param.{name}.{step}.{k}"] = p
        if ds:
            tensors[f"d.{name}"] = torch.tensor(ds, dtype=torch.float64)
        # Every parameter moved, and none became non-finite.
        for k, p in enumerate(params):
            assert torch.isfinite(p).all(), (name, k)
            assert not torch.equal(p.detach(), init[k]), (name, k)
        if name == "adamw8bit":
            for k, p in enumerate(params):
                st = opt.state[p]
                if st["state1"].dtype == torch.uint8:
                    for key in ("state1", "state2", "absmax1", "absmax2"):
                        tensors[f"bnb_state.{k}.{key}"] = st[key].detach().clone().contiguous()
        print(f"{name}: ok" + (f", d = {ds[-1]:.4g}" if ds else ""))

    assert any(k.startswith("bnb_state.1.") for k in tensors), "the large tensor must be 8-bit"
    tensors["qmap.signed"] = bnbf.create_dynamic_map(signed=True)
    tensors["qmap.unsigned"] = bnbf.create_dynamic_map(signed=False)
    x = torch.randn(1000, generator=gen) * torch.logspace(-4, 0, 1000)
    codes, qstate = bnbf.quantize_blockwise(x, code=tensors["qmap.signed"], blocksize=256)
    tensors["quant.x"] = x
    tensors["quant.codes"] = codes.contiguous()
    tensors["quant.absmax"] = qstate.absmax.contiguous()

    meta = {
        "description": "optimizer reference trajectories; see tools/make_optimizer_fixtures.py",
        "shapes": json.dumps(SHAPES),
        "groups": json.dumps(GROUPS),
        "factors": json.dumps(FACTORS),
        "missing": json.dumps(sorted(MISSING)),
        "cases": json.dumps({n: {"lrs": c["lrs"], "wds": c["wds"]} for n, c in cases.items()}),
        "versions": json.dumps(
            {
                pkg: importlib.metadata.version(pkg)
                for pkg in ("torch", "bitsandbytes", "prodigyopt", "transformers", "lion-pytorch")
            }
        ),
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(OUT), metadata=meta)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(tensors)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
