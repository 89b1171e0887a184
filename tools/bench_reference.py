#!/usr/bin/env python3
"""The PyTorch reference of `sd-lora bench`: the same LoRA training step on an SD1.5 UNet.

Workload (identical to crates/train/src/bench.rs, so the two can be compared on one machine):
- diffusers `UNet2DConditionModel` with SD1.5's config, random weights (no download): every
  matrix/kernel uniform with the variance of N(0, 1/fan_in), norm scales 1, biases 0 — the
  same distributions `sd-lora bench` draws (not the same numbers);
- frozen (`requires_grad_(False)`), weights stored in `--precision`; LoRA via peft
  (`r = alpha = --rank`, gaussian init, targets to_q/to_k/to_v/to_out.0), LoRA parameters in f32;
- `torch.optim.AdamW` (lr 1e-4, weight decay 1e-2) on the LoRA parameters;
- batch 1: random latents [1, 4, res/8, res/8], text embeddings [1, 77, 768], a random timestep,
  MSE against random noise; `--warmup` untimed steps, then `--steps` timed ones (forward, loss,
  backward, optimizer step; CUDA synchronised before the clock stops);
- `--checkpointing`: `unet.enable_gradient_checkpointing()` (diffusers' per-block recompute).

Attention is diffusers' default processor (`F.scaled_dot_product_attention`, which on the CPU runs
a flash-style kernel that never holds the full score matrix); `--attention-chunk` is accepted for
symmetry with `sd-lora bench` and reported, but has no equivalent here.

Prints one JSON object with `--json` (the keys of `sd-lora bench --json`, "impl": "pytorch"),
otherwise a short table; progress goes to stderr. FLOPs: the forward is counted once with
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention), and the step's
nominal FLOPs are `2·(linear + conv) + 3·attention`, the formula of `sd-lora bench`
(see docs/performance.md). tools/bench_compare.sh uses sd-lora's count for both GFLOP/s figures.

Usage:
  HF_HUB_OFFLINE=1 ~/.cache/sd-lora-venv/bin/python tools/bench_reference.py --resolution 256 --json
  python3 tools/bench_reference.py --device cuda --resolution 512 --precision f16 --checkpointing
Needs torch, diffusers and peft (tools/requirements.txt); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
    use_linear_projection=False,
    upcast_attention=False,
)
TEXT_TOKENS = 77
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=256, help="image side in px (multiple of 8, >= 64)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--precision", default="f32", help="storage dtype of the frozen weights: f32, f16, bf16")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--attention-chunk", type=int, default=None, help="accepted for symmetry; not applied")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-flop-count", action="store_true", help="skip the FLOP-counting forward")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    a = p.parse_args()
    if a.resolution < 64 or a.resolution % 8:
        fail(f"resolution {a.resolution} is not usable: it must be a multiple of 8 and at least 64")
    if a.steps < 1:
        fail("steps must be at least 1")
    if a.rank < 1:
        fail("rank must be at least 1")
    if a.precision.lower() not in DTYPES:
        fail(f"unknown precision {a.precision!r}: use f32, f16 or bf16")
    a.precision = a.precision.lower()
    if not (a.device == "cpu" or a.device == "cuda" or a.device.startswith("cuda:")):
        fail(f"--device {a.device!r}: use cpu, cuda or cuda:N")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {a.device}: this torch has no usable CUDA")
    if a.device == "cuda":
        a.device = "cuda:0"
    return a


@torch.no_grad()
def init_weights(unet: torch.nn.Module, seed: int) -> None:
    """The distributions of sd-lora bench: uniform with variance 1/fan_in, norm scales 1, biases 0."""
    g = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel()
            bound = (3.0 / max(fan_in, 1)) ** 0.5
            p.copy_(torch.rand(p.shape, generator=g) * (2 * bound) - bound)
        elif name.endswith(".weight"):
            p.fill_(1.0)
        else:
            p.zero_()


def count_forward_flops(unet, latents, t, ctx) -> dict[str, int]:
    """Forward FLOPs by kind (linear / conv / attention), as sd-lora's ops::flops counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(latents, t, ctx)
    counts = {"linear": 0, "conv": 0, "attention": 0}
    for op, n in fc.get_flop_counts().get("Global", {}).items():
        name = str(op)
        if "convolution" in name:
            counts["conv"] += int(n)
        elif "scaled_dot_product" in name or "bmm" in name:
            counts["attention"] += int(n)
        else:  # mm, addmm (linear layers, 1×1 projections, LoRA)
            counts["linear"] += int(n)
    return counts


def main() -> None:
    a = parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(a.device)
    dtype = DTYPES[a.precision]
    if device.type == "cpu" and dtype != torch.float32:
        log(f"warning: {a.precision} weights on the CPU: PyTorch computes in {a.precision} there "
            "(slow or unsupported kernels); only f32 is a meaningful CPU reference")
    if a.attention_chunk is not None:
        log("note: --attention-chunk has no PyTorch equivalent here (SDPA is already memory-efficient); ignored")

    import diffusers
    import peft
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    warnings.filterwarnings("ignore")
    torch.manual_seed(a.seed)
    log(f"bench_reference: building the SD1.5 UNet ({a.precision} storage) with random weights on {a.device} …")
    t_build = time.perf_counter()
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    init_weights(unet, a.seed)
    unet.requires_grad_(False)
    unet.to(device=device, dtype=dtype)
    unet.add_adapter(
        LoraConfig(
            r=a.rank,
            lora_alpha=a.rank,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    for p in lora_params:  # diffusers' cast_training_params: trained parameters in f32
        p.data = p.data.float()
    if a.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(lora_params, lr=1e-4, weight_decay=1e-2)
    n_lora = sum(p.numel() for p in lora_params)
    n_frozen = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_s = time.perf_counter() - t_build

    side = a.resolution // 8
    latent = [1, 4, side, side]
    gen = torch.Generator().manual_seed(a.seed + 1)

    def inputs():
        lat = torch.randn(latent, generator=gen).to(device, dtype)
        ctx = torch.randn((1, TEXT_TOKENS, 768), generator=gen).to(device, dtype)
        noise = torch.randn(latent, generator=gen).to(device)
        t = torch.randint(0, 1000, (1,), generator=gen).to(device)
        return lat, ctx, noise, t

    forward_flops = None
    if not a.no_flop_count:
        lat, ctx, _, t = inputs()
        forward_flops = count_forward_flops(unet, lat, t, ctx)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    total = a.warmup + a.steps
    step_s = []
    step_cpu_s = []
    phase_s = ([], [], [])
    loss_value = float("nan")
    for i in range(total):
        lat, ctx, noise, t = inputs()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        c0 = time.process_time()
        t0 = time.perf_counter()
        pred = unet(lat, t, ctx).sample
        loss = F.mse_loss(pred.float(), noise)
        sync()
        t_fwd = time.perf_counter() - t0
        loss.backward()
        sync()
        t_bwd = time.perf_counter() - t0
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        sec = time.perf_counter() - t0
        cpu = time.process_time() - c0
        loss_value = float(loss.detach())
        del pred, loss
        warm = i < a.warmup
        if not warm:
            step_s.append(sec)
            step_cpu_s.append(cpu)
            for acc, v in zip(phase_s, (t_fwd, t_bwd - t_fwd, sec - t_bwd)):
                acc.append(v)
        log(f"  {'warm-up' if warm else 'step'} {i + 1}/{total}: {sec:.3f} s (loss {loss_value:.4f})")

    median = statistics.median(step_s)
    flop = None
    if forward_flops is not None:
        flop = 2 * (forward_flops["linear"] + forward_flops["conv"]) + 3 * forward_flops["attention"]
    report = {
        "impl": "pytorch",
        "model": "sd15-unet",
        "resolution": a.resolution,
        "latent": latent,
        "steps": a.steps,
        "warmup": a.warmup,
        "precision": a.precision,
        "checkpointing": a.checkpointing,
        "attention_chunk": None,
        "rank": a.rank,
        "device": a.device,
        "threads": torch.get_num_threads(),
        "lora_params": n_lora,
        "frozen_params": n_frozen,
        "build_s": build_s,
        "step_s": step_s,
        "median_step_s": median,
        "step_cpu_s": step_cpu_s,
        # ru_maxrss is in KiB on Linux.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_device_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
        "peak_device_allocated_bytes": (
            torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        ),
        "flop_per_step": flop,
        "gflops": flop / median / 1e9 if flop is not None else None,
        "forward_flops": forward_flops,
        "phases": {
            "forward_s": statistics.median(phase_s[0]),
            "backward_s": statistics.median(phase_s[1]),
            "optimizer_s": statistics.median(phase_s[2]),
        },
        "final_loss": loss_value,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
    }
    if a.json:
        print(json.dumps(report))
        return

    def gb(b):
        return "-" if b is None else f"{b / 1e9:.2f} GB"

    print(
        f"pytorch sd15-unet at {a.resolution}×{a.resolution} px (latent {latent}), {a.precision} storage, "
        f"checkpointing {'on' if a.checkpointing else 'off'}, rank {a.rank}, {a.device} "
        f"({torch.get_num_threads()} threads), {a.warmup} warm-up + {a.steps} timed steps"
    )
    rows = [
        ("median step", f"{median:.3f} s   (steps: {', '.join(f'{s:.3f}' for s in step_s)} s)"),
        ("phases (median)", "forward {forward_s:.3f} s, backward {backward_s:.3f} s, optimizer {optimizer_s:.3f} s"
         .format(**report["phases"])),
        ("peak RSS", gb(report["peak_rss_bytes"])),
        ("peak device reserved", gb(report["peak_device_bytes"])),
        ("peak device allocated", gb(report["peak_device_allocated_bytes"])),
        ("throughput", "-" if flop is None else f"{report['gflops']:.1f} GFLOP/s (nominal)"),
        ("FLOP / step", "-" if flop is None else f"{flop / 1e9:.1f} GFLOP"),
        ("build", f"{build_s:.1f} s"),
        ("parameters", f"{n_lora} LoRA, {n_frozen} frozen"),
    ]
    for k, v in rows:
        print(f"  {k:<22} {v}")


if __name__ == "__main__":
    main()
