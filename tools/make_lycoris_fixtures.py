#!/usr/bin/env python3
"""Regenerate tests/fixtures/lycoris.safetensors: DoRA, LoHa and LoKr forward and gradients
computed by LyCORIS, the library kohya users train these network types with.

How to run (from the repository root; nothing is downloaded):

    ~/.cache/sd-lora-venv/bin/pip install -r tools/requirements.txt
    ~/.cache/sd-lora-venv/bin/python tools/make_lycoris_fixtures.py

Each case puts one LyCORIS module on a small layer (a Linear 12→8 with bias, and a 3×3 Conv2d
8→12, stride 2, padding 1, with bias), gives every parameter random non-zero values (so that every
gradient is non-trivial: at LyCORIS' own initialisation half of them would be zero), runs the
module's forward on a random input and back-propagates a random output gradient. The fixture holds,
per case, the layer's weight and bias, the input, the output gradient, the module's parameters
under the names the files use, and the reference output, input gradient and parameter gradients.
The Rust test crates/model/tests/lycoris_reference.rs builds our adapter from the same parameters
and compares.

Cases (LyCORIS module → our network.type):
  dora_out_{linear,conv}   LoConModule(weight_decompose=True, wd_on_out=True)   → "dora"
  dora_in_{linear,conv}    LoConModule(weight_decompose=True, wd_on_out=False)  → "dora", dora_axis "input"
  loha_{linear,conv}       LohaModule                                            → "loha"
  lokr_{linear,conv}       LokrModule (w1 full, w2 as a rank-2 product)          → "lokr"
  lokr_full_{linear,conv}  LokrModule with full_matrix=True (both factors full, scale 1)
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "lycoris.safetensors"

# Which parameter of the LyCORIS module is which tensor of the file format.
NAMES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "dora_scale": "dora_scale",
}


def layer(kind: str) -> torch.nn.Module:
    if kind == "linear":
        return torch.nn.Linear(12, 8, bias=True)
    return torch.nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=True)


def make(case: str, org: torch.nn.Module, rank: int, alpha: float) -> torch.nn.Module:
    if case == "dora_out":
        return LoConModule("m", org, 1.0, rank, alpha, weight_decompose=True, wd_on_out=True)
    if case == "dora_in":
        return LoConModule("m", org, 1.0, rank, alpha, weight_decompose=True, wd_on_out=False)
    if case == "loha":
        return LohaModule("m", org, 1.0, rank, alpha)
    if case == "lokr":
        return LokrModule("m", org, 1.0, rank, alpha, factor=2)
    if case == "lokr_full":
        return LokrModule("m", org, 1.0, rank, alpha, factor=2, full_matrix=True)
    raise ValueError(case)


def main() -> None:
    torch.manual_seed(20261205)
    tensors: dict[str, torch.Tensor] = {}
    cases = []
    for case in ["dora_out", "dora_in", "loha", "lokr", "lokr_full"]:
        for kind in ["linear", "conv"]:
            name = f"{case}_{kind}"
            org = layer(kind)
            with torch.no_grad():
                org.weight.normal_(0, 0.3)
                org.bias.normal_(0, 0.1)
            rank, alpha = 2, 3.0
            module = make(case, org, rank, alpha)
            module.train()
            params = {k: p for k, p in module.named_parameters() if p.requires_grad}
            with torch.no_grad():
                for k, p in params.items():
                    if k == "dora_scale":
                        # Near the weight's own norm, as after some training.
                        p.mul_(1.0 + 0.2 * torch.rand_like(p))
                    else:
                        p.normal_(0, 0.4)
            shape = (3, 5, 12) if kind == "linear" else (2, 8, 7, 6)
            x = torch.randn(shape, requires_grad=True)
            y = module(x)
            g = torch.randn_like(y)
            y.backward(g)
            tensors[f"{name}.weight"] = org.weight.detach().clone()
            tensors[f"{name}.bias"] = org.bias.detach().clone()
            tensors[f"{name}.x"] = x.detach().clone()
            tensors[f"{name}.g"] = g.clone()
            tensors[f"{name}.y"] = y.detach().clone()
            tensors[f"{name}.dx"] = x.grad.clone()
            stored = []
            for k, p in params.items():
                key = NAMES.get(k, k)
                tensors[f"{name}.param.{key}"] = p.detach().clone()
                tensors[f"{name}.grad.{key}"] = p.grad.clone()
                stored.append(key)
            cases.append(
                {
                    "name": name,
                    "alpha": float(module.alpha),
                    "scale": float(module.scale),
                    "params": stored,
                }
            )
    versions = {p: importlib.metadata.version(p) for p in ["torch", "lycoris-lora"]}
    metadata = {"cases": json.dumps(cases), "versions": json.dumps(versions)}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(OUT), metadata=metadata)
    print(f"wrote {OUT} ({len(cases)} cases) with {versions}", file=sys.stderr)


if __name__ == "__main__":
    main()
