#!/usr/bin/env python3
"""Writes a full-size SDXL base diffusers folder with random weights, for benchmarks (no download).

The folder has exactly the layout, configs, key names and tensor shapes of
stabilityai/stable-diffusion-xl-base-1.0 (UNet 2,567.5 M, text encoder 123.1 M, text encoder 2
694.7 M, VAE 83.7 M parameters; f32 `.safetensors`, about 13.9 GB, or f16 with `--dtype f16`) —
what `sd-lora train` / `sd-lora bench --train` load as a user's SDXL model. Weights are drawn as
tools/make_sd15_folder.py draws them (uniform with the variance of N(0, 1/fan_in), norm scales 1,
biases 0). The tokenizers are CLIP's 49,408-token BPE vocabulary from assets/clip/ (the second
padding with `!`, as SDXL's does).

Usage:
  ~/.cache/sd-lora-venv/bin/python tools/make_sdxl_folder.py OUT_DIR [--dtype f32|f16] [--seed N]

Needs torch, diffusers, transformers (tools/requirements.txt) and about 14 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_reference import init_weights  # noqa: E402
from make_fixtures import clip_vocab_from_gz  # noqa: E402
from make_sd15_folder import SD15_TEXT_CONFIG, SD15_VAE_CONFIG  # noqa: E402

REPO = HERE.parent

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys that shape the model).
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    norm_num_groups=32,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE_CONFIG = dict(SD15_VAE_CONFIG, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_TEXT_2_CONFIG = dict(
    SD15_TEXT_CONFIG,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
    pad_token_id=0,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="folder to write (created; must not exist or be empty)")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.out.exists() and any(a.out.iterdir()):
        sys.exit(f"error: {a.out} exists and is not empty")

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dtype = torch.float16 if a.dtype == "f16" else torch.float32
    torch.manual_seed(a.seed)
    print("building SDXL base's components with random weights …", file=sys.stderr)
    with torch.no_grad():
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        init_weights(unet, a.seed)
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
        init_weights(vae, a.seed + 1)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
        init_weights(text_encoder, a.seed + 2)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2_CONFIG))
        init_weights(text_encoder_2, a.seed + 3)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    vocab, merges = clip_vocab_from_gz(REPO / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz")
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        (td / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (td / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tokenizer = CLIPTokenizer(str(td / "vocab.json"), str(td / "merges.txt"), pad_token="<|endoftext|>")
        tokenizer_2 = CLIPTokenizer(str(td / "vocab.json"), str(td / "merges.txt"), pad_token="!")
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
        ).to(dtype)
        print(f"writing {a.out} …", file=sys.stderr)
        pipe.save_pretrained(a.out, safe_serialization=True)
    total = sum(f.stat().st_size for f in a.out.rglob("*.safetensors"))
    print(f"{a.out}: {total / 1e9:.2f} GB of weights ({a.dtype})", file=sys.stderr)


if __name__ == "__main__":
    main()
