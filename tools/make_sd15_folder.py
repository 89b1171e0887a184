#!/usr/bin/env python3
"""Writes a full-size SD1.5 diffusers folder with random weights, for benchmarks (no download).

The folder has exactly the layout, configs, key names and tensor shapes of
runwayml/stable-diffusion-v1-5 (UNet 859.5 M, text encoder 123.1 M, VAE 83.7 M parameters,
f32 `.safetensors`, about 4.3 GB) — what `sd-lora bench --train` and
`tools/bench_train_reference.py` load, so both sides read the same files from disk as a user's
model. Weights are drawn as `sd-lora bench` draws its UNet (uniform with the variance of
N(0, 1/fan_in), norm scales 1, biases 0): activations keep unit scale through every layer.
The tokenizer folder is CLIP's 49,408-token BPE vocabulary built from the copy shipped in
assets/clip/.

Usage:
  ~/.cache/sd-lora-venv/bin/python tools/make_sd15_folder.py OUT_DIR [--single-file FILE] [--seed N]

`--single-file FILE` also writes the same weights as one original-layout (LDM) checkpoint, as
model sites distribute them (the key mapping of tools/make_fixtures.py, which its fixtures check
against diffusers' `from_single_file`); `--single-file-dtype f16` stores it in half precision.
Needs torch, diffusers, transformers (tools/requirements.txt).
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
from bench_reference import SD15_UNET_CONFIG, init_weights  # noqa: E402
from make_fixtures import clip_vocab_from_gz  # noqa: E402

REPO = HERE.parent

SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

SD15_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="folder to write (created; must not exist or be empty)")
    p.add_argument("--single-file", type=Path, default=None, help="also write an LDM single file")
    p.add_argument("--single-file-dtype", default="f32", choices=["f32", "f16"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.out.exists() and any(a.out.iterdir()):
        sys.exit(f"error: {a.out} exists and is not empty")

    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(a.seed)
    print("building the UNet, VAE and text encoder with random weights …", file=sys.stderr)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    init_weights(unet, a.seed)
    vae = AutoencoderKL(**SD15_VAE_CONFIG)
    init_weights(vae, a.seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
    init_weights(text_encoder, a.seed + 2)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    vocab, merges = clip_vocab_from_gz(REPO / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz")
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        (td / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (td / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tokenizer = CLIPTokenizer(str(td / "vocab.json"), str(td / "merges.txt"), pad_token="<|endoftext|>")
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        print(f"writing {a.out} …", file=sys.stderr)
        pipe.save_pretrained(a.out, safe_serialization=True)
    if a.single_file is not None:
        write_single_file(a.single_file, a.single_file_dtype, text_encoder, unet, vae)
    total = sum(f.stat().st_size for f in a.out.rglob("*.safetensors"))
    print(f"{a.out}: {total / 1e9:.2f} GB of weights", file=sys.stderr)


def write_single_file(path: Path, dtype: str, text_encoder, unet, vae) -> None:
    """The same weights as one LDM-layout file (SD1: `cond_stage_model.transformer.*`)."""
    from make_fixtures import make_single_file
    from safetensors.torch import load_file, save_file

    spec = {"unet": SD15_UNET_CONFIG, "vae": SD15_VAE_CONFIG}
    with tempfile.TemporaryDirectory(dir=path.parent) as td:
        written = make_single_file("sd1_tiny", spec, text_encoder, unet, vae, Path(td))
        if dtype == "f16":
            tensors = {k: v.half() for k, v in load_file(written).items()}
            save_file(tensors, path)
        else:
            os.replace(written, path)
    print(f"{path}: {path.stat().st_size / 1e9:.2f} GB ({dtype})", file=sys.stderr)


if __name__ == "__main__":
    main()
