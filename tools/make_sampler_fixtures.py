#!/usr/bin/env python3
"""Writes tests/fixtures/sampling/: diffusers' sampler tables and trajectories.

Run from the repository root with the reference venv:
    HF_HUB_OFFLINE=1 $HOME/.cache/sd-lora-venv/bin/python tools/make_sampler_fixtures.py

Outputs (see tests/fixtures/sampling/README.md):
  tables.json            timesteps and sigmas for each sampler x model x step count
  trajectories.safetensors  initial latent, text embeddings and the latent after
                            each of 4 steps for DDIM, Euler, DPM++ 2M (sd1_tiny,
                            sd2_tiny) and DPM++ 2M Karras (sd1_tiny)
"""
import json
import os

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(__file__), "..")
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "sampling")


def make(kind, cfg_dir):
    cfg = os.path.join(FIX, cfg_dir, "scheduler")
    if kind == "ddim":
        return DDIMScheduler.from_pretrained(cfg)
    if kind == "euler":
        return EulerDiscreteScheduler.from_pretrained(cfg)
    if kind == "euler_a":
        return EulerAncestralDiscreteScheduler.from_pretrained(cfg)
    if kind == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_pretrained(
            cfg, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True
        )
    if kind == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_pretrained(
            cfg,
            algorithm_type="dpmsolver++",
            solver_order=2,
            lower_order_final=True,
            use_karras_sigmas=True,
        )
    raise ValueError(kind)


KINDS = ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"]


def main():
    os.makedirs(OUT, exist_ok=True)
    tables = {}
    for model in ["sd1_tiny", "sd2_tiny"]:
        for kind in KINDS:
            for n in [5, 20]:
                s = make(kind, model)
                s.set_timesteps(n)
                entry = {
                    "timesteps": [float(t) for t in s.timesteps],
                    "init_noise_sigma": float(s.init_noise_sigma),
                }
                if hasattr(s, "sigmas"):
                    entry["sigmas"] = [float(x) for x in s.sigmas]
                tables[f"{model}/{kind}/{n}"] = entry
    with open(os.path.join(OUT, "tables.json"), "w") as f:
        json.dump(tables, f, indent=1)

    torch.manual_seed(0)
    latent = torch.randn(1, 4, 8, 8)
    tensors = {"initial_latent": latent}
    steps = 4
    # sd1_tiny (epsilon) and sd2_tiny (v-prediction); DPM++ 2M Karras only on sd1.
    runs = {
        "sd1_tiny": ["ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras"],
        "sd2_tiny": ["ddim", "euler", "dpmpp_2m"],
    }
    for model, kinds in runs.items():
        ref = load_file(os.path.join(FIX, "reference", f"{model}.safetensors"))
        emb = ref["text_encoder.last_hidden_state"][:1].float().contiguous()
        tensors[f"{model}.text_embedding"] = emb
        unet = UNet2DConditionModel.from_pretrained(os.path.join(FIX, model, "unet")).eval()
        for kind in kinds:
            s = make(kind, model)
            s.set_timesteps(steps)
            x = latent * s.init_noise_sigma
            with torch.no_grad():
                for i, t in enumerate(s.timesteps):
                    inp = s.scale_model_input(x, t)
                    out = unet(inp, t, encoder_hidden_states=emb).sample
                    x = s.step(out, t, x).prev_sample
                    tensors[f"{model}.{kind}.step{i}"] = x.contiguous()
    save_file(tensors, os.path.join(OUT, "trajectories.safetensors"))


if __name__ == "__main__":
    main()
