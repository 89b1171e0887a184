#!/usr/bin/env python3
"""Regenerate the parity fixtures in tests/fixtures/ from the Python reference.

How to run (from the repository root; nothing is downloaded from a model hub):

    python -m venv ~/.cache/sd-lora-venv
    ~/.cache/sd-lora-venv/bin/pip install -r tools/requirements.txt
    HF_HUB_OFFLINE=1 ~/.cache/sd-lora-venv/bin/python tools/make_fixtures.py

Options: --out DIR (default tests/fixtures), --skip-validate (skip the diffusers
from_single_file round trip).

What it writes (see tests/fixtures/README.md for every file and tensor):
  sd1_tiny/                 diffusers folder, SD1 topology, tiny random weights (epsilon)
  sd2_tiny/                 diffusers folder, SD2 topology (linear proj, heads per level, v-pred)
  sd1_tiny.safetensors      the same weights as sd1_tiny/ under original LDM key names
  sd2_tiny.safetensors      the same weights as sd2_tiny/ under LDM + OpenCLIP key names
  reference/sd1_tiny.safetensors, reference/sd2_tiny.safetensors
                            inputs and outputs of text encoder, UNet, VAE (+ scheduler table)
  reference/sd1_tiny.json, reference/sd2_tiny.json
                            configs and a description of the inputs
  reference/tokenizer_ids.json
                            real CLIP tokenizer ids (SD1 and SD2 conventions) for a prompt list

Everything is deterministic: every random tensor comes from a torch.Generator with a
fixed seed, computation is CPU float32, and the safetensors writer sorts keys.

Weights: diffusers initialises several output layers to zero (conv_out, proj_out,
to_out, ...) and transformers uses tiny std; with such weights a parity test can pass
while a whole layer is ignored. So EVERY parameter is re-initialised here: matrices and
conv kernels ~ N(0, (gain/sqrt(fan_in))^2), biases ~ N(0, 0.1^2), norm weights
~ 1 + N(0, 0.1^2), norm biases ~ N(0, 0.1^2), embeddings ~ N(0, 1).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)  # same summation order on every machine

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------

VOCAB_SIZE = 1000
BOS_ID = 998  # "<|startoftext|>" of the tiny vocabulary
EOS_ID = 999  # "<|endoftext|>": the highest id, as 49407 is in the real vocabulary, so the
#              argmax-of-ids pooling of real SD configs and the first-eos pooling agree.

TEXT_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    max_position_embeddings=77,
    layer_norm_eps=1e-5,
    projection_dim=32,
    attention_dropout=0.0,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)
TEXT_SD1 = dict(TEXT_COMMON, num_hidden_layers=3, hidden_act="quick_gelu", pad_token_id=EOS_ID)
# SD2: the diffusers folder holds the layers the pipeline runs (OpenCLIP's penultimate
# output is the HF model's last layer, then final_layer_norm). The single file has one more
# (unused) OpenCLIP layer, as real SD2 files have 24 resblocks for a 23-layer HF encoder.
TEXT_SD2 = dict(TEXT_COMMON, num_hidden_layers=2, hidden_act="gelu", pad_token_id=0)

UNET_COMMON = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    # SD1/2 are (320, 640, 1280, 1280): the same a,2a,4a,4a shape would cost 4x the
    # parameters here, so the last two levels share a width (fixtures must stay small).
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=4,
    norm_eps=1e-5,
    cross_attention_dim=32,
)
# diffusers' historical naming: for SD1/SD2 "attention_head_dim" is the NUMBER OF HEADS
# (num_attention_heads is None and falls back to it); head dim = channels / heads.
UNET_SD1 = dict(UNET_COMMON, attention_head_dim=2, use_linear_projection=False, upcast_attention=False)
UNET_SD2 = dict(UNET_COMMON, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, upcast_attention=True)

VAE_CFG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=0.18215,
)

SCHED_COMMON = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

MODELS = {
    "sd1_tiny": dict(text=TEXT_SD1, unet=UNET_SD1, vae=VAE_CFG, prediction_type="epsilon", seed=1000),
    "sd2_tiny": dict(text=TEXT_SD2, unet=UNET_SD2, vae=VAE_CFG, prediction_type="v_prediction", seed=2000),
}

GAIN = 1.0


# ---------------------------------------------------------------------------------------------
# Model construction
# ---------------------------------------------------------------------------------------------


def reinit_(model: torch.nn.Module, seed: int, gain: float = GAIN) -> None:
    """Overwrite every parameter with non-degenerate random values (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    kinds = {}
    for mname, m in model.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(m, norm_types):
                kinds[full] = "norm_" + pname
            elif isinstance(m, torch.nn.Embedding):
                kinds[full] = "embedding"
            else:
                kinds[full] = pname
    with torch.no_grad():
        for name, p in model.named_parameters():
            kind = kinds[name]
            if kind == "norm_weight":
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif kind in ("norm_bias", "bias"):
                v = 0.1 * torch.randn(p.shape, generator=g)
            elif kind == "embedding":
                v = torch.randn(p.shape, generator=g)
            elif kind == "weight" and p.ndim >= 2:
                fan_in = p[0].numel()
                v = torch.randn(p.shape, generator=g) * (gain / math.sqrt(fan_in))
            else:
                raise RuntimeError(f"don't know how to initialise {name} {tuple(p.shape)} ({kind})")
            p.copy_(v)


def build_models(spec: dict):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    seed = spec["seed"]
    te = CLIPTextModel(CLIPTextConfig(**spec["text"])).eval()
    reinit_(te, seed + 1)
    unet = UNet2DConditionModel(**spec["unet"]).eval()
    reinit_(unet, seed + 2)
    vae = AutoencoderKL(**spec["vae"]).eval()
    reinit_(vae, seed + 3)
    return te, unet, vae


def make_scheduler(spec: dict, kind: str):
    from diffusers import DDIMScheduler, PNDMScheduler

    if kind == "sd1_tiny":
        # As runwayml/stable-diffusion-v1-5 ships it.
        common = {k: v for k, v in SCHED_COMMON.items() if k != "clip_sample"}
        return PNDMScheduler(**common, skip_prk_steps=True, prediction_type=spec["prediction_type"])
    # As stabilityai/stable-diffusion-2-1 ships it.
    return DDIMScheduler(**SCHED_COMMON, prediction_type=spec["prediction_type"])


def text_encoder_state_dict(te, keep_position_ids: bool) -> dict[str, torch.Tensor]:
    """Keys exactly as real SD diffusers folders name them: text_model.encoder.layers.N...."""
    sd = {}
    for k, v in te.state_dict().items():
        if not k.startswith("text_model."):
            k = "text_model." + k
        sd[k] = v.detach().clone().contiguous()
    pos = "text_model.embeddings.position_ids"
    if keep_position_ids:
        # Real SD1.x folders (converted by transformers < 4.31) carry this int64 buffer.
        sd[pos] = torch.arange(77, dtype=torch.int64).unsqueeze(0)
    else:
        sd.pop(pos, None)
    return sd


def write_folder(name: str, spec: dict, te, unet, vae, out: Path) -> Path:
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    make_scheduler(spec, name).save_pretrained(folder / "scheduler")

    (folder / "text_encoder").mkdir()
    te.config.to_json_file(folder / "text_encoder" / "config.json")
    # Save ourselves: transformers 5 drops the "text_model." prefix, real folders have it.
    sd = text_encoder_state_dict(te, keep_position_ids=(name == "sd1_tiny"))
    save_file(sd, folder / "text_encoder" / "model.safetensors", metadata={"format": "pt"})

    sched_cls = "PNDMScheduler" if name == "sd1_tiny" else "DDIMScheduler"
    import diffusers

    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", sched_cls],
        "text_encoder": ["transformers", "CLIPTextModel"],
        # No tokenizer/ folder on purpose: the tool must fall back to its embedded vocabulary.
        "tokenizer": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
    normalise_json_files(folder)
    return folder


def normalise_json_files(folder: Path) -> None:
    """Rewrite configs with sorted keys and a trailing newline (stable diffs)."""
    for p in folder.rglob("*.json"):
        data = json.loads(p.read_text())
        p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# diffusers -> original LDM key names (single-file checkpoints)
# ---------------------------------------------------------------------------------------------

RESNET_UNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
RESNET_VAE = {"conv_shortcut": "nin_shortcut"}  # norm1/conv1/norm2/conv2 keep their names
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_inner(rest: str, table: dict[str, str]) -> str:
    for a, b in table.items():
        if rest == a or rest.startswith(a + "."):
            return b + rest[len(a) :]
    return rest


def unet_diffusers_to_ldm(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, str]:
    """Return {diffusers_key: ldm_key} for a SD1/SD2 UNet (without 'model.diffusion_model.')."""
    n_levels = len(cfg["block_out_channels"])
    lpb = cfg["layers_per_block"]
    m: dict[str, str] = {}
    for k in sd:
        parts = k.split(".")
        if k.startswith("time_embedding.linear_1."):
            new = "time_embed.0." + parts[-1]
        elif k.startswith("time_embedding.linear_2."):
            new = "time_embed.2." + parts[-1]
        elif k.startswith("conv_in."):
            new = "input_blocks.0.0." + parts[-1]
        elif k.startswith("conv_norm_out."):
            new = "out.0." + parts[-1]
        elif k.startswith("conv_out."):
            new = "out.2." + parts[-1]
        elif parts[0] == "down_blocks":
            i = int(parts[1])
            if parts[2] == "resnets":
                j = int(parts[3])
                rest = ".".join(parts[4:])
                new = f"input_blocks.{1 + i * (lpb + 1) + j}.0." + _rename_inner(rest, RESNET_UNET)
            elif parts[2] == "attentions":
                j = int(parts[3])
                new = f"input_blocks.{1 + i * (lpb + 1) + j}.1." + ".".join(parts[4:])
            elif parts[2] == "downsamplers":
                assert parts[3] == "0" and parts[4] == "conv", k
                new = f"input_blocks.{(i + 1) * (lpb + 1)}.0.op." + parts[-1]
            else:
                raise KeyError(k)
        elif parts[0] == "mid_block":
            if parts[1] == "resnets":
                idx = 0 if parts[2] == "0" else 2
                new = f"middle_block.{idx}." + _rename_inner(".".join(parts[3:]), RESNET_UNET)
            elif parts[1] == "attentions":
                new = "middle_block.1." + ".".join(parts[3:])
            else:
                raise KeyError(k)
        elif parts[0] == "up_blocks":
            i = int(parts[1])
            has_attn = cfg["up_block_types"][i].startswith("CrossAttn")
            if parts[2] == "resnets":
                j = int(parts[3])
                new = f"output_blocks.{i * (lpb + 1) + j}.0." + _rename_inner(".".join(parts[4:]), RESNET_UNET)
            elif parts[2] == "attentions":
                j = int(parts[3])
                new = f"output_blocks.{i * (lpb + 1) + j}.1." + ".".join(parts[4:])
            elif parts[2] == "upsamplers":
                assert parts[3] == "0" and parts[4] == "conv", k
                assert i < n_levels - 1
                new = f"output_blocks.{i * (lpb + 1) + lpb}.{2 if has_attn else 1}.conv." + parts[-1]
            else:
                raise KeyError(k)
        else:
            raise KeyError(k)
        m[k] = new
    return m


def vae_diffusers_to_ldm(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, str]:
    """Return {diffusers_key: ldm_key} for AutoencoderKL (without 'first_stage_model.')."""
    n = len(cfg["block_out_channels"])
    m: dict[str, str] = {}
    for k in sd:
        parts = k.split(".")
        coder = parts[0]
        if coder in ("quant_conv", "post_quant_conv"):
            new = k
        elif parts[1] in ("conv_in", "conv_out"):
            new = k
        elif parts[1] == "conv_norm_out":
            new = f"{coder}.norm_out." + parts[-1]
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{coder}.mid.block_{int(parts[3]) + 1}." + _rename_inner(".".join(parts[4:]), RESNET_VAE)
            elif parts[2] == "attentions":
                assert parts[3] == "0"
                new = f"{coder}.mid.attn_1." + _rename_inner(".".join(parts[4:]), VAE_ATTN)
            else:
                raise KeyError(k)
        elif parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2])
            if coder == "encoder":
                level, kind = i, "down"
            else:
                level, kind = n - 1 - i, "up"  # LDM decoder levels are numbered bottom-up
            if parts[3] == "resnets":
                new = f"{coder}.{kind}.{level}.block.{parts[4]}." + _rename_inner(".".join(parts[5:]), RESNET_VAE)
            elif parts[3] in ("downsamplers", "upsamplers"):
                assert parts[4] == "0" and parts[5] == "conv", k
                new = f"{coder}.{kind}.{level}.{'downsample' if kind == 'down' else 'upsample'}.conv." + parts[-1]
            else:
                raise KeyError(k)
        else:
            raise KeyError(k)
        m[k] = new
    return m


def is_vae_attn_linear_weight(ldm_key: str) -> bool:
    return ".mid.attn_1." in ldm_key and ldm_key.split(".")[-2] in ("q", "k", "v", "proj_out") and ldm_key.endswith(
        ".weight"
    )


def openclip_text_state(te_sd: dict[str, torch.Tensor], n_layers_hf: int, seed: int, width: int):
    """SD2 text encoder in OpenCLIP layout (cond_stage_model.model.*, without that prefix).

    Layers 0..n_layers_hf-1 hold the HF weights; one extra resblock (index n_layers_hf) with
    random weights follows, as real SD2 files carry OpenCLIP's last layer which the
    penultimate-layer pipeline never runs. text_projection [width, width] is random (unused
    by CLIPTextModel); logit_scale is the 0-dim OpenCLIP scalar ln(1/0.07).
    """
    out: dict[str, torch.Tensor] = {}
    out["token_embedding.weight"] = te_sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = te_sd["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = te_sd["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = te_sd["text_model.final_layer_norm.bias"]
    g = torch.Generator().manual_seed(seed)
    for n in range(n_layers_hf + 1):
        p = f"text_model.encoder.layers.{n}."
        q = f"transformer.resblocks.{n}."
        if n < n_layers_hf:
            src = {k[len(p) :]: v for k, v in te_sd.items() if k.startswith(p)}
        else:
            like = {k[len("text_model.encoder.layers.0.") :]: v for k, v in te_sd.items() if k.startswith("text_model.encoder.layers.0.")}
            src = {}
            for k, v in sorted(like.items()):
                if "layer_norm" in k and k.endswith("weight"):
                    src[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
                elif k.endswith("bias"):
                    src[k] = 0.1 * torch.randn(v.shape, generator=g)
                else:
                    src[k] = torch.randn(v.shape, generator=g) / math.sqrt(v.shape[1])
        out[q + "attn.in_proj_weight"] = torch.cat(
            [src["self_attn.q_proj.weight"], src["self_attn.k_proj.weight"], src["self_attn.v_proj.weight"]], 0
        )
        out[q + "attn.in_proj_bias"] = torch.cat(
            [src["self_attn.q_proj.bias"], src["self_attn.k_proj.bias"], src["self_attn.v_proj.bias"]], 0
        )
        out[q + "attn.out_proj.weight"] = src["self_attn.out_proj.weight"]
        out[q + "attn.out_proj.bias"] = src["self_attn.out_proj.bias"]
        out[q + "ln_1.weight"] = src["layer_norm1.weight"]
        out[q + "ln_1.bias"] = src["layer_norm1.bias"]
        out[q + "ln_2.weight"] = src["layer_norm2.weight"]
        out[q + "ln_2.bias"] = src["layer_norm2.bias"]
        out[q + "mlp.c_fc.weight"] = src["mlp.fc1.weight"]
        out[q + "mlp.c_fc.bias"] = src["mlp.fc1.bias"]
        out[q + "mlp.c_proj.weight"] = src["mlp.fc2.weight"]
        out[q + "mlp.c_proj.bias"] = src["mlp.fc2.bias"]
    out["text_projection"] = torch.randn((width, width), generator=g) / math.sqrt(width)
    out["logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=torch.float32)
    return out


def make_single_file(name: str, spec: dict, te, unet, vae, out: Path) -> Path:
    ckpt: dict[str, torch.Tensor] = {}
    usd = {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
    for dk, lk in unet_diffusers_to_ldm(usd, spec["unet"]).items():
        ckpt["model.diffusion_model." + lk] = usd[dk]
    vsd = {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}
    for dk, lk in vae_diffusers_to_ldm(vsd, spec["vae"]).items():
        v = vsd[dk]
        if is_vae_attn_linear_weight(lk):
            v = v.reshape(*v.shape, 1, 1)  # LDM's AttnBlock uses 1x1 convs
        ckpt["first_stage_model." + lk] = v
    tsd = text_encoder_state_dict(te, keep_position_ids=False)
    if name == "sd1_tiny":
        for k, v in tsd.items():
            ckpt["cond_stage_model.transformer." + k] = v
    else:
        oc = openclip_text_state(tsd, spec["text"]["num_hidden_layers"], spec["seed"] + 4, spec["text"]["hidden_size"])
        for k, v in oc.items():
            ckpt["cond_stage_model.model." + k] = v
    assert len(set(ckpt)) == len(ckpt)
    path = out / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt.items()}, path)
    return path


def ldm_back_to_diffusers(path: Path, spec: dict, name: str, te, unet, vae):
    """Invert our own mapping and check every tensor against the in-memory models."""
    ckpt = load_file(path)
    usd, vsd = unet.state_dict(), vae.state_dict()
    tsd = text_encoder_state_dict(te, keep_position_ids=False)
    used = set()
    for dk, lk in unet_diffusers_to_ldm(usd, spec["unet"]).items():
        t = ckpt["model.diffusion_model." + lk]
        assert torch.equal(t, usd[dk]), dk
        used.add("model.diffusion_model." + lk)
    for dk, lk in vae_diffusers_to_ldm(vsd, spec["vae"]).items():
        t = ckpt["first_stage_model." + lk]
        if is_vae_attn_linear_weight(lk):
            assert t.shape[-2:] == (1, 1)
            t = t[:, :, 0, 0]
        assert torch.equal(t, vsd[dk]), dk
        used.add("first_stage_model." + lk)
    if name == "sd1_tiny":
        for k, v in tsd.items():
            assert torch.equal(ckpt["cond_stage_model.transformer." + k], v), k
            used.add("cond_stage_model.transformer." + k)
    else:
        p = "cond_stage_model.model."
        d = spec["text"]["hidden_size"]
        for n in range(spec["text"]["num_hidden_layers"]):
            hf = f"text_model.encoder.layers.{n}."
            oc = f"{p}transformer.resblocks.{n}."
            w, b = ckpt[oc + "attn.in_proj_weight"], ckpt[oc + "attn.in_proj_bias"]
            for i, qkv in enumerate("qkv"):
                assert torch.equal(w[i * d : (i + 1) * d], tsd[hf + f"self_attn.{qkv}_proj.weight"])
                assert torch.equal(b[i * d : (i + 1) * d], tsd[hf + f"self_attn.{qkv}_proj.bias"])
            pairs = {
                "attn.out_proj": "self_attn.out_proj",
                "ln_1": "layer_norm1",
                "ln_2": "layer_norm2",
                "mlp.c_fc": "mlp.fc1",
                "mlp.c_proj": "mlp.fc2",
            }
            for a, bb in pairs.items():
                for s in ("weight", "bias"):
                    assert torch.equal(ckpt[oc + f"{a}.{s}"], tsd[hf + f"{bb}.{s}"])
            used.update(k for k in ckpt if k.startswith(oc))
        assert torch.equal(ckpt[p + "token_embedding.weight"], tsd["text_model.embeddings.token_embedding.weight"])
        assert torch.equal(ckpt[p + "positional_embedding"], tsd["text_model.embeddings.position_embedding.weight"])
        assert torch.equal(ckpt[p + "ln_final.weight"], tsd["text_model.final_layer_norm.weight"])
        assert torch.equal(ckpt[p + "ln_final.bias"], tsd["text_model.final_layer_norm.bias"])
        used.update(p + k for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"))
    extra = sorted(set(ckpt) - used)
    return extra


def validate_with_diffusers(path: Path, folder: Path, name: str, te, unet, vae) -> list[str]:
    """Load the single file with diffusers (config from our folder, offline); compare all tensors."""
    notes = []
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    def compare(a: dict, b: dict, what: str):
        ka, kb = set(a), set(b)
        if ka != kb:
            raise AssertionError(f"{what}: key sets differ: only diffusers {sorted(ka - kb)[:5]}, only ours {sorted(kb - ka)[:5]}")
        bad = [k for k in ka if not torch.equal(a[k], b[k])]
        if bad:
            raise AssertionError(f"{what}: {len(bad)} tensors differ, e.g. {bad[:5]}")

    u = UNet2DConditionModel.from_single_file(str(path), config=str(folder), subfolder="unet", local_files_only=True)
    compare(u.state_dict(), unet.state_dict(), f"{name} unet")
    notes.append("UNet2DConditionModel.from_single_file: all tensors identical")
    v = AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae", local_files_only=True)
    compare(v.state_dict(), vae.state_dict(), f"{name} vae")
    notes.append("AutoencoderKL.from_single_file: all tensors identical")
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, safety_checker=None, tokenizer=None
        )
        tsd = {k: v for k, v in pipe.text_encoder.state_dict().items() if not k.endswith("position_ids")}
        ours = {k: v for k, v in te.state_dict().items() if not k.endswith("position_ids")}
        compare(tsd, ours, f"{name} text_encoder")
        compare(pipe.unet.state_dict(), unet.state_dict(), f"{name} pipeline unet")
        compare(pipe.vae.state_dict(), vae.state_dict(), f"{name} pipeline vae")
        notes.append("StableDiffusionPipeline.from_single_file: text encoder, UNet, VAE tensors identical")
    except Exception as e:  # report, the own inverse mapping still checks everything
        notes.append(f"StableDiffusionPipeline.from_single_file FAILED: {type(e).__name__}: {str(e)[:300]}")
    return notes


# ---------------------------------------------------------------------------------------------
# Reference outputs
# ---------------------------------------------------------------------------------------------


def fixed_input_ids(seed: int, pad_id: int) -> torch.Tensor:
    """Batch 2 x 77: [BOS, tokens..., EOS, pad...]; sample 0 short, sample 1 fills all 77."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((2, 77), pad_id, dtype=torch.int64)
    for b, n in enumerate((9, 75)):
        ids[b, 0] = BOS_ID
        ids[b, 1 : 1 + n] = torch.randint(1, BOS_ID, (n,), generator=g)
        ids[b, 1 + n] = EOS_ID
    return ids


@torch.no_grad()
def reference_outputs(name: str, spec: dict, te, unet, vae) -> dict[str, torch.Tensor]:
    seed = spec["seed"] + 100
    r: dict[str, torch.Tensor] = {}
    pad = EOS_ID if name == "sd1_tiny" else 0
    ids = fixed_input_ids(seed, pad)
    o = te(input_ids=ids, output_hidden_states=True)
    r["text_encoder.input_ids"] = ids
    r["text_encoder.eos_positions"] = (ids == EOS_ID).int().argmax(-1).to(torch.int64)
    assert torch.equal(r["text_encoder.eos_positions"], ids.argmax(-1))
    r["text_encoder.last_hidden_state"] = o.last_hidden_state
    r["text_encoder.pooler_output"] = o.pooler_output
    for i, h in enumerate(o.hidden_states):
        r[f"text_encoder.hidden_states.{i}"] = h
    # hidden_states[-1] is BEFORE final_layer_norm; last_hidden_state is after it.
    assert torch.allclose(te.final_layer_norm(o.hidden_states[-1]), o.last_hidden_state)

    g = torch.Generator().manual_seed(seed + 1)
    sample = torch.randn((2, 4, 8, 8), generator=g)
    timesteps = torch.tensor([10, 700], dtype=torch.int64)
    ehs = torch.randn((2, 77, 32), generator=g)
    cot = torch.randn((2, 4, 8, 8), generator=g)
    r["unet.sample"] = sample
    r["unet.timesteps"] = timesteps
    r["unet.encoder_hidden_states"] = ehs
    r["unet.out"] = unet(sample, timesteps, encoder_hidden_states=ehs).sample
    # Per-sample timesteps really are per-sample: sample 0 alone at t=10 gives row 0.
    alone = unet(sample[:1], timesteps[:1], encoder_hidden_states=ehs[:1]).sample
    assert torch.allclose(alone, r["unet.out"][:1], atol=1e-5)
    # Backward reference: L = sum(out * cotangent); gradients w.r.t. the two float inputs.
    with torch.enable_grad():
        s = sample.clone().requires_grad_(True)
        e = ehs.clone().requires_grad_(True)
        (unet(s, timesteps, encoder_hidden_states=e).sample * cot).sum().backward()
    r["unet.grad.cotangent"] = cot
    r["unet.grad.sample"] = s.grad
    r["unet.grad.encoder_hidden_states"] = e.grad

    # The 8x8 latent reaches the mid block at 1x1, where self-attention over one token makes
    # to_q/to_k irrelevant; a non-square 16x24 latent (as aspect-ratio buckets produce) gets
    # 2x3 there, so every attention is exercised and H/W mix-ups show.
    g2 = torch.Generator().manual_seed(seed + 2)
    sample_hw = torch.randn((2, 4, 16, 24), generator=g2)
    r["unet_hw.sample"] = sample_hw
    r["unet_hw.timesteps"] = torch.tensor([999, 0], dtype=torch.int64)
    r["unet_hw.encoder_hidden_states"] = torch.randn((2, 77, 32), generator=g2)
    r["unet_hw.out"] = unet(sample_hw, r["unet_hw.timesteps"], encoder_hidden_states=r["unet_hw.encoder_hidden_states"]).sample

    image = torch.rand((1, 3, 32, 32), generator=g) * 2 - 1
    dist = vae.encode(image).latent_dist
    r["vae.encode.image"] = image
    r["vae.encode.mean"] = dist.mean
    r["vae.encode.std"] = dist.std
    r["vae.encode.logvar"] = dist.logvar
    latent = torch.randn((1, 4, 4, 4), generator=g)
    r["vae.decode.latent"] = latent
    r["vae.decode.sample"] = vae.decode(latent).sample

    sched = make_scheduler(spec, name)
    r["scheduler.alphas_cumprod"] = sched.alphas_cumprod.to(torch.float32)
    return {k: v.detach().contiguous() for k, v in r.items()}


# ---------------------------------------------------------------------------------------------
# Tokenizer reference
# ---------------------------------------------------------------------------------------------

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "a photo of ohwx dog",
    "",
    "A PHOTO OF A DOG IN NEW YORK, Times Square At Night",
    "Hello!!! What's up?? ... --- ;; :: // \\\\ @#$%^&*()_+={}[]|<>~` 'quoted' \"double\"",
    "it's, don't, we'll, I'M, you've, they'd -- 1girl, 2boys, 1024x768, 3.14159, 50%",
    "café naïve résumé, Zürich façade, Ångström, São Paulo, smørrebrød",
    "一只猫在屋顶上 🐱🔥 ❤️ sushi 寿司, ラーメン, 한국어, Привет мир, ελληνικά",
    "   lots   of\tspaces \n and\nnewlines   ",
    "a (masterpiece:1.2) portrait of ((ohwx)) man, [blurry:0.8], (best quality), <lora:style:0.7>, BREAK sunset",
    "tom &amp; jerry &lt;3",
    "! !! !!! wow!",
    ", ".join(
        [
            "a highly detailed digital painting of a majestic castle on a cliff above a stormy sea",
            "dramatic lighting, volumetric fog, ray tracing, octane render, unreal engine 5",
            "trending on artstation, by greg rutkowski and alphonse mucha, intricate, elegant",
            "sharp focus, illustration, concept art, matte painting, 8k uhd, award winning photograph",
            "golden hour, cinematic composition, wide angle lens, hyperrealistic",
        ]
    ),
    # > 150 tokens: for 75-token chunking (A1111-style long prompts) beyond the first window.
    " ".join(f"word{i} (detail:1.{i % 10})," for i in range(40)),
]


def byte_symbols() -> dict[int, str]:
    """Byte → printable symbol as CLIP's BPE names bytes: printable Latin-1 bytes stand for
    themselves, the other 68 take the code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    # The vocabulary lists the symbols in this order: the kept bytes, then the others.
    for extra, b in enumerate(b for b in range(256) if b not in keep):
        table[b] = chr(256 + extra)
    return table


def clip_vocab_from_gz(gz_path: Path):
    """The standard CLIP vocabulary construction (as OpenAI CLIP / open_clip SimpleTokenizer)."""
    try:
        from open_clip.tokenizer import bytes_to_unicode
    except ImportError:
        bytes_to_unicode = byte_symbols

    merges = gzip.open(gz_path).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    for m in merges:
        vocab.append("".join(m))
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    assert len(vocab) == 49408
    return {t: i for i, t in enumerate(vocab)}, merges


def tokenizer_reference(out: Path) -> dict:
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPTokenizer

    gz = Path(default_bpe())
    gz_sha = hashlib.sha256(gz.read_bytes()).hexdigest()
    asset = REPO / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
    asset_sha = hashlib.sha256(asset.read_bytes()).hexdigest() if asset.exists() else None
    vocab, merges = clip_vocab_from_gz(gz)
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        (td / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (td / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        sd1 = CLIPTokenizer(str(td / "vocab.json"), str(td / "merges.txt"), pad_token="<|endoftext|>")
        # What diffusers does for SD2/SDXL (tokenizer folder with pad_token "!"): "!" becomes a
        # special token and is split out of the text BEFORE BPE, so "!!!" gives [0, 0, 0] instead
        # of the BPE token 995 (diffusers issue #4153). Recorded as ids_sd2_diffusers only.
        sd2_hf = CLIPTokenizer(str(td / "vocab.json"), str(td / "merges.txt"), pad_token="!")
    assert sd1.bos_token_id == 49406 and sd1.eos_token_id == 49407 and sd1.pad_token_id == 49407
    assert sd2_hf.pad_token_id == 0
    oc = SimpleTokenizer()
    entries = []
    disagreements = []
    for p in PROMPTS:
        unpadded = sd1(p, truncation=False)["input_ids"]
        ids1 = sd1(p, padding="max_length", max_length=77, truncation=True)["input_ids"]
        # SD2/SDXL as trained (open_clip): the same BPE ids, padded with 0 after the EOS.
        n = len(sd1(p, truncation=True, max_length=77)["input_ids"])
        ids2 = ids1[:n] + [0] * (77 - n)
        ids2_hf = sd2_hf(p, padding="max_length", max_length=77, truncation=True)["input_ids"]
        oc_ids = open_clip.tokenize([p], context_length=77)[0].tolist()  # SD2 convention, pad 0
        oc_unpadded = [49406] + oc.encode(p) + [49407]
        e = {
            "prompt": p,
            "ids_unpadded": unpadded,
            "ids_sd1": ids1,
            "ids_sd2": ids2,
            "open_clip_agrees": oc_ids == ids2 and oc_unpadded == unpadded,
        }
        if ids2_hf != ids2:
            e["ids_sd2_diffusers"] = ids2_hf
        if not e["open_clip_agrees"]:
            e["open_clip_ids_unpadded"] = oc_unpadded
            disagreements.append(p)
        entries.append(e)
    return {
        "description": (
            "Real CLIP BPE tokenizer (49408 tokens) built from open_clip's bpe_simple_vocab_16e6.txt.gz "
            "(byte alphabet, same with </w>, merges[1:48895], <|startoftext|>, <|endoftext|>) and run "
            "through transformers.CLIPTokenizer. ids_sd1: padding='max_length', max_length=77, "
            "truncation=True, pad token <|endoftext|> (49407), as SD1 tokenizers. ids_sd2: the same ids "
            "with every position after the EOS set to 0 ('!'), as open_clip.tokenize (what SD2/SDXL were "
            "trained with, and what A1111/ComfyUI use). ids_sd2_diffusers (only where it differs): "
            "transformers CLIPTokenizer with pad_token='!' as in diffusers SD2/SDXL tokenizer folders, "
            "which splits every '!' out as the special pad token before BPE (diffusers issue #4153). "
            "ids_unpadded: no padding, no truncation (BOS and EOS included). open_clip_agrees: open_clip's "
            "SimpleTokenizer/tokenize gives ids_unpadded and ids_sd2 exactly."
        ),
        "bos_id": 49406,
        "eos_id": 49407,
        "sd1_pad_id": 49407,
        "sd2_pad_id": 0,
        "max_length": 77,
        "vocab_gz_sha256": gz_sha,
        "assets_gz_sha256": asset_sha,
        "tokenizer_class": type(sd1).__name__,
        "open_clip_disagrees_on": disagreements,
        "prompts": entries,
    }


# ---------------------------------------------------------------------------------------------


def tensor_table(t: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in sorted(t.items())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    ap.add_argument("--skip-validate", action="store_true")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "reference").mkdir(exist_ok=True)

    import diffusers
    import transformers

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    print("versions:", versions)
    for name, spec in MODELS.items():
        te, unet, vae = build_models(spec)
        folder = write_folder(name, spec, te, unet, vae, out)
        single = make_single_file(name, spec, te, unet, vae, out)
        extra = ldm_back_to_diffusers(single, spec, name, te, unet, vae)
        print(f"{name}: own inverse mapping OK; keys in single file not in HF model: {extra}")
        notes = []
        if not args.skip_validate:
            notes = validate_with_diffusers(single, folder, name, te, unet, vae)
            for n in notes:
                print(f"{name}: {n}")
        # The folder written to disk loads back to the same tensors.
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        assert all(
            torch.equal(a, b)
            for a, b in zip(
                UNet2DConditionModel.from_pretrained(folder / "unet").state_dict().values(), unet.state_dict().values()
            )
        )
        assert all(
            torch.equal(a, b)
            for a, b in zip(AutoencoderKL.from_pretrained(folder / "vae").state_dict().values(), vae.state_dict().values())
        )
        te2 = CLIPTextModel.from_pretrained(folder / "text_encoder")
        assert all(torch.equal(te2.state_dict()[k], v) for k, v in te.state_dict().items())

        ref = reference_outputs(name, spec, te, unet, vae)
        save_file(ref, out / "reference" / f"{name}.safetensors")
        for k, v in ref.items():
            if v.is_floating_point():
                assert torch.isfinite(v).all(), k
        scales = {k: round(float(v.float().std()), 4) for k, v in ref.items() if v.is_floating_point() and v.numel() > 1}
        print(f"{name} output std: {json.dumps(scales)}")
        meta = {
            "model": name,
            "versions": versions,
            "prediction_type": spec["prediction_type"],
            "text_encoder_config": {k: v for k, v in spec["text"].items()},
            "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in spec["unet"].items()},
            "vae_config": {k: list(v) if isinstance(v, tuple) else v for k, v in spec["vae"].items()},
            "pooling": "pooler_output = last_hidden_state[b, argmax(input_ids[b])]; EOS (999) is the largest id, "
            "so this equals the first EOS position (transformers' rule when eos_token_id != 2)",
            "text_inputs": "input_ids[0] = BOS, 9 random ids in [1, 997], EOS, pad; input_ids[1] = BOS, 75 random ids, "
            f"EOS (no pad). pad id = {EOS_ID if name == 'sd1_tiny' else 0}",
            "hidden_states": "text_encoder.hidden_states.0 = embeddings output; .i = output of encoder layer i-1, "
            "BEFORE final_layer_norm; last_hidden_state = final_layer_norm(hidden_states.N)",
            "unet_inputs": "sample ~ N(0,1) [2,4,8,8]; timesteps [10, 700] (one per sample); "
            "encoder_hidden_states ~ N(0,1) [2,77,32]. unet_hw.*: the same with a non-square [2,4,16,24] latent "
            "and timesteps [999, 0] (mid block at 2x3, so its self-attention q/k matter)",
            "unet_grad": "gradients of sum(unet.out * unet.grad.cotangent) w.r.t. sample and encoder_hidden_states",
            "vae_inputs": "encode: image ~ U(-1,1) [1,3,32,32]; decode: latent ~ N(0,1) [1,4,4,4] "
            "(no scaling_factor applied in either direction)",
            "single_file_validation": notes,
            "single_file_extra_keys": extra,
            "tensors": tensor_table(ref),
        }
        (out / "reference" / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")

    tok = tokenizer_reference(out)
    print("tokenizer: open_clip disagrees on", tok["open_clip_disagrees_on"])
    (out / "reference" / "tokenizer_ids.json").write_text(json.dumps(tok, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
