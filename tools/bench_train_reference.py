#!/usr/bin/env python3
"""The PyTorch reference of `sd-lora bench --train` and `sd-lora bench --vae`.

`--train` (default) runs what `sd-lora train` runs with its defaults, in diffusers + peft, on
the same model files and images:

1. load the UNet, VAE and text encoder(s) from a diffusers folder (`from_pretrained`, f32; SDXL:
   both text encoders, captions encoded as StableDiffusionXLPipeline.encode_prompt does, the
   UNet given the pooled embedding and `add_time_ids`);
2. scan the images as sd-lora does (a kohya root `N_caption/` with `.txt` captions, or a plain
   folder), resize each to cover `--resolution` (Lanczos) and centre-crop it;
3. encode every image with the VAE (the mean of the latent distribution × scaling factor, as
   sd-lora caches it), then free the VAE; encode every caption (last hidden state, 77 tokens),
   then free the text encoder — kohya's `cache_latents` and cached text-encoder outputs;
4. LoRA via peft on the layers of sd-lora's preset (`kohya`: every Linear / 1×1 conv inside the
   transformer blocks — proj_in, proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj,
   ff.net.2; `attention`: to_q/to_k/to_v/to_out.0; `conv`: kohya plus the ResNets' conv1, conv2,
   time_emb_proj, conv_shortcut and the samplers' convs), rank `--rank`, alpha `--alpha`
   (kohya's default init: A kaiming-uniform, B zero), parameters in f32;
5. AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 1e-2), batch 1, DDPM noise with a
   uniform timestep, ε target, MSE, gradient norm clipped to 1.0 — sd-lora's defaults;
   `--warmup` untimed steps, then `--steps` timed ones.

Reported (JSON with `--json`, the keys of `sd-lora bench --train --json`): load time and the
peak RSS after loading, caching time (latents and captions), per-image encode time, step times
and their median, peak RSS of the whole process.

`--vae` loads only the VAE and times encoding one image and decoding one latent at
`--resolution` (`--repeat` times each, median), as `AutoencoderKL.encode` / `.decode` do it.

Usage:
  tools/bench_compare.sh --train --model /path/to/sd15 --data assets/example_dataset
  HF_HUB_OFFLINE=1 ~/.cache/sd-lora-venv/bin/python tools/bench_train_reference.py \
      --model /path/to/sd15 --data assets/example_dataset --resolution 256 --json
Needs torch, diffusers, transformers, peft and pillow (tools/requirements.txt); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
KOHYA_DIR = re.compile(r"^(\d+)_(.*)$")
PRESETS = {
    "kohya": r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.((attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))",
    "attention": r".*attentions\.\d+\.transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)",
    # kohya's LoCon: the kohya layers plus every ResNet and sampler layer.
    "conv": r"(.*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.((attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))"
    r"|.*resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)|.*(downsamplers|upsamplers)\.0\.conv)",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def peak_rss() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a diffusers SD1.x/SD2.x/SDXL folder")
    p.add_argument("--data", type=Path, help="image folder or kohya root (--train)")
    p.add_argument("--vae", action="store_true", help="time VAE encode/decode of one image instead")
    p.add_argument("--train", action="store_true", help="the training run (the default)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--repeat", type=int, default=3, help="--vae: encodes and decodes timed")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--preset", default="kohya", choices=sorted(PRESETS))
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    a = p.parse_args()
    if a.resolution < 64 or a.resolution % 8:
        fail(f"--resolution {a.resolution}: must be a multiple of 8 and at least 64")
    if not (a.model / "model_index.json").is_file():
        fail(f"--model {a.model}: not a diffusers folder (no model_index.json)")
    if not a.vae and (a.data is None or not a.data.is_dir()):
        fail("--data DIR is needed for the training run")
    if a.steps < 1:
        fail("--steps must be at least 1")
    return a


def scan(root: Path) -> list[tuple[Path, str, int]]:
    """(image, caption, repeats) as sd-lora scans a kohya root or a plain folder."""
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir() and KOHYA_DIR.match(d.name)]
    sets = [(d, KOHYA_DIR.match(d.name)) for d in subdirs] if subdirs else [(root, KOHYA_DIR.match(root.name))]
    out = []
    for folder, m in sets:
        repeats, fallback = (int(m.group(1)), m.group(2)) if m else (1, "")
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            cap = f.with_suffix(".txt")
            caption = cap.read_text(encoding="utf-8").strip() if cap.is_file() else fallback
            out.append((f, caption, repeats))
    if not out:
        fail(f"--data {root}: no images")
    return out


def load_pixels(path: Path, res: int) -> torch.Tensor:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = max(res / w, res / h)
    rw, rh = max(res, round(w * scale)), max(res, round(h * scale))
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.LANCZOS)
    left, top = (rw - res) // 2, (rh - res) // 2
    img = img.crop((left, top, left + res, top + res))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(res, res, 3)
    return (x.permute(2, 0, 1).float() / 127.5 - 1.0).unsqueeze(0)


def vae_bench(a: argparse.Namespace) -> dict:
    from diffusers import AutoencoderKL

    t0 = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae", torch_dtype=torch.float32)
    vae.requires_grad_(False)
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(a.seed)
    x = torch.rand((1, 3, a.resolution, a.resolution), generator=g) * 2 - 1
    enc, dec = [], []
    with torch.no_grad():
        for i in range(a.repeat):
            t0 = time.perf_counter()
            z = vae.encode(x).latent_dist.mode()
            enc.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            vae.decode(z).sample
            dec.append(time.perf_counter() - t0)
            log(f"  {i + 1}/{a.repeat}: encode {enc[-1]:.3f} s, decode {dec[-1]:.3f} s")
    return {
        "impl": "pytorch",
        "mode": "vae",
        "resolution": a.resolution,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "encode_s": enc,
        "decode_s": dec,
        "median_encode_s": statistics.median(enc),
        "median_decode_s": statistics.median(dec),
        "peak_rss_bytes": peak_rss(),
    }


def train_bench(a: argparse.Namespace) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    sdxl = (Path(a.model) / "text_encoder_2").is_dir()
    t_start = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(a.model, subfolder="text_encoder", torch_dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(a.model, subfolder="tokenizer")
    # SDXL: the second encoder (OpenCLIP-bigG with its projection) and tokenizer.
    text_encoder_2 = tokenizer_2 = None
    if sdxl:
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            a.model, subfolder="text_encoder_2", torch_dtype=torch.float32
        )
        tokenizer_2 = CLIPTokenizer.from_pretrained(a.model, subfolder="tokenizer_2")
    scheduler = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
    for m in (unet, vae, text_encoder, text_encoder_2):
        if m is not None:
            m.requires_grad_(False)
    load_s = time.perf_counter() - t_start
    load_peak = peak_rss()
    log(f"loaded in {load_s:.1f} s, peak RSS {load_peak / 1e9:.2f} GB")

    images = scan(a.data)
    t0 = time.perf_counter()
    latents = {}
    with torch.no_grad():
        for path, _, _ in images:
            z = vae.encode(load_pixels(path, a.resolution)).latent_dist.mode()
            latents[path] = z * vae.config.scaling_factor
    latent_s = time.perf_counter() - t0
    del vae
    gc.collect()
    t0 = time.perf_counter()
    embeddings = {}
    pooled = {}
    with torch.no_grad():
        for caption in sorted({c for _, c, _ in images}):
            ids = tokenizer(caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            if not sdxl:
                embeddings[caption] = text_encoder(ids.input_ids)[0]
                continue
            # As StableDiffusionXLPipeline.encode_prompt: both encoders' penultimate hidden
            # states side by side; the pooled embedding is the second's projected output.
            ids_2 = tokenizer_2(caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            h1 = text_encoder(ids.input_ids, output_hidden_states=True).hidden_states[-2]
            out_2 = text_encoder_2(ids_2.input_ids, output_hidden_states=True)
            embeddings[caption] = torch.cat([h1, out_2.hidden_states[-2]], dim=-1)
            pooled[caption] = out_2.text_embeds
    text_s = time.perf_counter() - t0
    del text_encoder, text_encoder_2
    gc.collect()
    log(f"cached {len(latents)} latents in {latent_s:.1f} s, {len(embeddings)} captions in {text_s:.1f} s")

    unet.add_adapter(
        LoraConfig(r=a.rank, lora_alpha=a.alpha, init_lora_weights=True, target_modules=PRESETS[a.preset])
    )
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    for p in lora_params:
        p.data = p.data.float()
    if a.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(lora_params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    order = [(p, c) for p, c, r in images for _ in range(r)]
    rng = random.Random(a.seed)
    rng.shuffle(order)
    g = torch.Generator().manual_seed(a.seed)
    total = a.warmup + a.steps
    step_s = []
    loss_value = float("nan")
    for i in range(total):
        path, caption = order[i % len(order)]
        t0 = time.perf_counter()
        lat = latents[path]
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g)
        noisy = scheduler.add_noise(lat, noise, t)
        extra = {}
        if sdxl:
            # add_time_ids: original size, crop top-left, target size (a centre-cropped square).
            side = float(a.resolution)
            extra["added_cond_kwargs"] = {
                "text_embeds": pooled[caption],
                "time_ids": torch.tensor([[side, side, 0.0, 0.0, side, side]]),
            }
        pred = unet(noisy, t, embeddings[caption], **extra).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sec = time.perf_counter() - t0
        loss_value = float(loss.detach())
        del pred, loss
        warm = i < a.warmup
        if not warm:
            step_s.append(sec)
        log(f"  {'warm-up' if warm else 'step'} {i + 1}/{total}: {sec:.3f} s (loss {loss_value:.4f})")

    import diffusers
    import peft

    return {
        "impl": "pytorch",
        "mode": "train",
        "resolution": a.resolution,
        "preset": a.preset,
        "rank": a.rank,
        "alpha": a.alpha,
        "checkpointing": a.checkpointing,
        "threads": torch.get_num_threads(),
        "images": len(images),
        "lora_params": sum(p.numel() for p in lora_params),
        "load_s": load_s,
        "load_peak_rss_bytes": load_peak,
        "cache_latents_s": latent_s,
        "encode_per_image_s": latent_s / len(images),
        "cache_text_s": text_s,
        "steps": a.steps,
        "warmup": a.warmup,
        "step_s": step_s,
        "median_step_s": statistics.median(step_s),
        "peak_rss_bytes": peak_rss(),
        "final_loss": loss_value,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
    }


def main() -> None:
    a = parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(os.cpu_count() or 1)
    # sd-lora flushes denormals to zero on the CPU; so does the reference.
    torch.set_flush_denormal(True)
    torch.manual_seed(a.seed)
    report = vae_bench(a) if a.vae else train_bench(a)
    if a.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            print(f"  {k:<22} {v}")


if __name__ == "__main__":
    main()
