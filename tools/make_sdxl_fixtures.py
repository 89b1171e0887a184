#!/usr/bin/env python3
"""Generate the tiny SDXL parity fixtures in tests/fixtures/ from the Python reference.

How to run (from the repository root; nothing is downloaded from a model hub; the venv is the
one tools/make_fixtures.py documents):

    HF_HUB_OFFLINE=1 ~/.cache/sd-lora-venv/bin/python tools/make_sdxl_fixtures.py

Options: --out DIR (default tests/fixtures), --skip-validate (skip the diffusers
from_single_file / StableDiffusionXLPipeline cross-checks; our own inverse mapping always runs).

What it writes (see tests/fixtures/README.md for every file and tensor):
  sdxl_tiny/                  diffusers folder, SDXL topology (two text encoders, text_time
                              added conditioning, levels without attention, transformer depth 2),
                              tiny random weights, EulerDiscreteScheduler (epsilon)
  sdxl_tiny.safetensors       the same weights as one sgm-layout single file, as SDXL checkpoints
                              are distributed: model.diffusion_model.* (LDM UNet names +
                              label_emb), conditioner.embedders.0.transformer.text_model.* (HF
                              CLIP names), conditioner.embedders.1.model.* (OpenCLIP layout),
                              first_stage_model.* (LDM VAE names)
  reference/sdxl_tiny.safetensors
                              inputs and outputs of both text encoders, encode_prompt's
                              prompt_embeds / pooled_prompt_embeds, UNet (forward, backward,
                              non-square), VAE, scheduler table
  reference/sdxl_tiny.json    configs, parameter counts, input description, tensor table,
                              single-file layout and validation notes

Sizes are deliberately not SDXL's (nor all of its ratios) so that nothing can pass by
hard-coding SDXL's numbers: text encoder 1 is 32 wide (quick_gelu), text encoder 2 is 48 wide
(gelu, head dim 12, projection 40), cross_attention_dim 80 = 32 + 48,
projection_class_embeddings_input_dim 88 = 40 + 6 * 8.

The helpers of tools/make_fixtures.py are reused (reinit_, the diffusers -> LDM UNet and VAE
mappings, the OpenCLIP layout, fixed_input_ids, normalise_json_files, tensor_table); SDXL-only
parts (label_emb, the second text encoder with its projection, the sgm prefixes) are small
wrappers here. make_fixtures.py itself is not changed.

Everything is deterministic: every random tensor comes from a torch.Generator with a fixed
seed, computation is CPU float32 on one thread, the safetensors writer sorts keys and the JSON
files are written with sorted keys. EVERY parameter is re-initialised with make_fixtures.reinit_
(diffusers zero-initialises several output layers, which would make parity trivially true).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)  # same summation order on every machine

REPO = mf.REPO
NAME = "sdxl_tiny"
SEED = 3000  # sd1_tiny uses 1000, sd2_tiny 2000

# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------

# Text encoder 1 (CLIP ViT-L in SDXL): the SD1 tiny text encoder's configuration.
TEXT_1 = dict(mf.TEXT_SD1)
# Text encoder 2 (OpenCLIP ViT-bigG in SDXL): a different width, so the two encoders and the
# halves of prompt_embeds cannot be confused; head dim 12; projection_dim != hidden_size.
TEXT_2 = dict(
    mf.TEXT_COMMON,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    projection_dim=40,
    hidden_act="gelu",
    pad_token_id=0,
)

ADD_TIME_DIM = 8
N_TIME_IDS = 6  # original_size (h, w), crops_coords_top_left (top, left), target_size (h, w)

UNET_XL = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    # SDXL: level 0 has no attention, levels 1 and 2 do; 3 levels, so 2 downsamplers.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(8, 16, 16),  # SDXL: (320, 640, 1280)
    layers_per_block=2,
    # SDXL: (1, 2, 10); the mid block takes the last value (so depth 2 here, 10 in SDXL).
    transformer_layers_per_block=(1, 1, 2),
    # diffusers' historical naming: the NUMBER OF HEADS per level (head dim 4, 4, 4 here;
    # SDXL's (5, 10, 20) gives head dim 64).
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    upcast_attention=False,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=4,
    norm_eps=1e-5,
    cross_attention_dim=TEXT_1["hidden_size"] + TEXT_2["hidden_size"],  # 80 (SDXL: 768 + 1280)
    addition_embed_type="text_time",
    addition_time_embed_dim=ADD_TIME_DIM,  # SDXL: 256
    projection_class_embeddings_input_dim=TEXT_2["projection_dim"] + N_TIME_IDS * ADD_TIME_DIM,  # 88 (SDXL: 2816)
)
assert UNET_XL["cross_attention_dim"] == 80 and UNET_XL["projection_class_embeddings_input_dim"] == 88

VAE_XL = dict(mf.VAE_CFG, scaling_factor=0.13025, force_upcast=True)

# As stabilityai/stable-diffusion-xl-base-1.0 ships its scheduler (the keys Euler uses).
SCHED_XL = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
)

# sgm (generative-models) prefixes of an SDXL base single file.
P_UNET = "model.diffusion_model."
P_VAE = "first_stage_model."
P_TE1 = "conditioner.embedders.0.transformer."
P_TE2 = "conditioner.embedders.1.model."

# diffusers add_embedding (TimestepEmbedding) = sgm label_emb = Sequential(Sequential(Linear, SiLU, Linear)).
ADD_EMBEDDING_LDM = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}

# Per-sample micro-conditioning of the UNet reference (see reference_outputs).
TIME_IDS = [[64, 48, 0, 8, 64, 64], [32, 32, 4, 0, 64, 64]]
TIME_IDS_HW = [[128, 192, 0, 0, 128, 192], [1024, 768, 16, 32, 128, 192]]


# ---------------------------------------------------------------------------------------------
# Model construction
# ---------------------------------------------------------------------------------------------


def build_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    te1 = CLIPTextModel(CLIPTextConfig(**TEXT_1)).eval()
    mf.reinit_(te1, SEED + 1)
    unet = UNet2DConditionModel(**UNET_XL).eval()
    mf.reinit_(unet, SEED + 2)
    vae = AutoencoderKL(**VAE_XL).eval()
    mf.reinit_(vae, SEED + 3)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2)).eval()
    mf.reinit_(te2, SEED + 4)
    return te1, te2, unet, vae


def make_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SCHED_XL)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def te1_state_dict(te1) -> dict[str, torch.Tensor]:
    """`text_model.…` keys as real diffusers folders have them, without position_ids."""
    return mf.text_encoder_state_dict(te1, keep_position_ids=False)


def te2_state_dict(te2) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection's own keys: `text_model.…` plus `text_projection.weight`.

    (mf.text_encoder_state_dict would rename text_projection.weight to text_model.text_projection.weight.)
    """
    sd = {k: v.detach().clone().contiguous() for k, v in te2.state_dict().items() if not k.endswith("position_ids")}
    assert "text_projection.weight" in sd and all(k.startswith("text_model.") or k == "text_projection.weight" for k in sd)
    return sd


# ---------------------------------------------------------------------------------------------
# diffusers folder
# ---------------------------------------------------------------------------------------------


def write_folder(te1, te2, unet, vae, out: Path) -> Path:
    import diffusers

    folder = out / NAME
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    make_scheduler().save_pretrained(folder / "scheduler")

    # Text encoders saved ourselves (as make_fixtures.write_folder does): `text_model.` prefix as
    # real folders have it, no position_ids (files written by transformers >= 4.31 have none).
    for sub, te, sd, arch in (
        ("text_encoder", te1, te1_state_dict(te1), "CLIPTextModel"),
        ("text_encoder_2", te2, te2_state_dict(te2), "CLIPTextModelWithProjection"),
    ):
        (folder / sub).mkdir()
        te.config.architectures = [arch]  # as real SDXL folders (tells the two classes apart)
        te.config.to_json_file(folder / sub / "config.json")
        save_file(sd, folder / sub / "model.safetensors", metadata={"format": "pt"})

    model_index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        # SDXL base ships True: with no negative prompt, CFG's negative embeddings are zeros.
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        # No tokenizer folders on purpose: the tiny vocabulary is not CLIP's; the tool must
        # fall back to its embedded CLIP vocabulary.
        "tokenizer": [None, None],
        "tokenizer_2": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
    mf.normalise_json_files(folder)
    return folder


def check_folder(folder: Path, te1, te2, unet, vae) -> None:
    """The folder on disk loads back (component by component) to the in-memory tensors."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pairs = [
        (UNet2DConditionModel.from_pretrained(folder / "unet"), unet),
        (AutoencoderKL.from_pretrained(folder / "vae"), vae),
        (CLIPTextModel.from_pretrained(folder / "text_encoder"), te1),
        (CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"), te2),
    ]
    for loaded, ours in pairs:
        a, b = loaded.state_dict(), ours.state_dict()
        assert set(a) == set(b), (type(ours).__name__, set(a) ^ set(b))
        assert all(torch.equal(a[k], b[k]) for k in a), type(ours).__name__


# ---------------------------------------------------------------------------------------------
# Single file (sgm layout)
# ---------------------------------------------------------------------------------------------


def unet_xl_diffusers_to_ldm(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, str]:
    """{diffusers_key: ldm_key} for an SDXL UNet (without 'model.diffusion_model.').

    mf.unet_diffusers_to_ldm handles everything but the added (text_time) embedding: level
    numbering by (layers_per_block + 1) whether or not a level has attention, attention inner
    names (transformer_blocks.N for any depth) kept, the upsampler at index 2 after a
    resnet + attention, index 1 after a resnet alone.
    """
    add = {k for k in sd if k.startswith("add_embedding.")}
    m = mf.unet_diffusers_to_ldm({k: v for k, v in sd.items() if k not in add}, cfg)
    for k in sorted(add):
        for a, b in ADD_EMBEDDING_LDM.items():
            if k.startswith(a):
                m[k] = b + k[len(a) :]
                break
        else:
            raise KeyError(k)
    assert len(set(m.values())) == len(m), "mapping is not injective"
    ldm = set(m.values())
    # Names as in the real sd_xl_base_1.0.safetensors (there with depth 2/10 instead of 1/2).
    for k in (
        "time_embed.0.weight",
        "label_emb.0.0.weight",
        "label_emb.0.2.bias",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.2.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",
        "input_blocks.4.1.proj_in.weight",
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "input_blocks.6.0.op.weight",
        "input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight",
        "input_blocks.8.1.transformer_blocks.1.ff.net.0.proj.weight",
        "middle_block.0.emb_layers.1.weight",
        "middle_block.1.transformer_blocks.1.norm3.weight",
        "middle_block.2.out_layers.3.weight",
        "output_blocks.0.1.transformer_blocks.1.attn2.to_v.weight",
        "output_blocks.2.2.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.0.skip_connection.weight",
        "out.2.weight",
    ):
        assert k in ldm, k
    # No attention in level 0 (down and up), 9 input blocks and 9 output blocks in all.
    no_attention = ("input_blocks.1.1.", "input_blocks.2.1.", "output_blocks.6.1.", "output_blocks.8.1.")
    for prefix in no_attention + ("input_blocks.9.", "output_blocks.9."):
        assert not any(k.startswith(prefix) for k in ldm), prefix
    return m


def openclip_big_g_state(te2_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text encoder 2 in OpenCLIP layout (conditioner.embedders.1.model.*, without that prefix).

    Wraps mf.openclip_text_state (written for SD2, where the single file has one extra unused
    resblock and a random text_projection): SDXL keeps every layer (the pooled output needs the
    last one), so the extra resblock is dropped, and text_projection is the real projection,
    stored as OpenCLIP uses it (x @ text_projection), i.e. the transposed Linear weight.
    """
    n = TEXT_2["num_hidden_layers"]
    oc = mf.openclip_text_state(te2_sd, n, seed=SEED + 5, width=TEXT_2["hidden_size"])
    extra = f"transformer.resblocks.{n}."
    oc = {k: v for k, v in oc.items() if not k.startswith(extra)}
    oc["text_projection"] = te2_sd["text_projection.weight"].T.contiguous()  # [hidden, projection]
    assert oc["logit_scale"].ndim == 0  # ln(1/0.07), as mf writes it
    return oc


def make_single_file(te1, te2, unet, vae, out: Path) -> Path:
    ckpt: dict[str, torch.Tensor] = {}

    def put(k: str, v: torch.Tensor):
        assert k not in ckpt, k
        ckpt[k] = v.contiguous()

    usd = {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
    for dk, lk in unet_xl_diffusers_to_ldm(usd, UNET_XL).items():
        put(P_UNET + lk, usd[dk])
    vsd = {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}
    for dk, lk in mf.vae_diffusers_to_ldm(vsd, VAE_XL).items():
        v = vsd[dk]
        if mf.is_vae_attn_linear_weight(lk):
            v = v.reshape(*v.shape, 1, 1)  # LDM/sgm AttnBlock uses 1x1 convs
        put(P_VAE + lk, v)
    for k, v in te1_state_dict(te1).items():
        put(P_TE1 + k, v)
    # Real SDXL files carry this int64 buffer for the first text encoder.
    put(P_TE1 + "text_model.embeddings.position_ids", torch.arange(77, dtype=torch.int64).unsqueeze(0))
    for k, v in openclip_big_g_state(te2_state_dict(te2)).items():
        put(P_TE2 + k, v)
    path = out / f"{NAME}.safetensors"
    save_file(ckpt, path)
    return path


def single_file_to_diffusers(ckpt: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Our own inverse: the four diffusers state dicts from the sgm single file.

    Every key of the file must be consumed exactly once; returns the keys that have no
    diffusers counterpart (position_ids, logit_scale) besides.
    """
    used: dict[str, str] = {}

    def take(k: str, what: str) -> torch.Tensor:
        assert k not in used, f"{k} used twice ({used.get(k)}, {what})"
        used[k] = what
        return ckpt[k]

    from diffusers import AutoencoderKL, UNet2DConditionModel

    # UNet and VAE: invert the forward mapping tables (key sets come from fresh models, not ours).
    unet_keys = UNet2DConditionModel(**UNET_XL).state_dict()
    vae_keys = AutoencoderKL(**VAE_XL).state_dict()
    unet = {dk: take(P_UNET + lk, dk) for dk, lk in unet_xl_diffusers_to_ldm(unet_keys, UNET_XL).items()}
    vae = {}
    for dk, lk in mf.vae_diffusers_to_ldm(vae_keys, VAE_XL).items():
        t = take(P_VAE + lk, dk)
        if mf.is_vae_attn_linear_weight(lk):
            assert t.shape[-2:] == (1, 1), lk
            t = t[:, :, 0, 0]
        vae[dk] = t

    # Text encoder 1: HF names under the prefix; position_ids is a buffer, not a weight.
    te1 = {}
    for k in ckpt:
        if k.startswith(P_TE1):
            rest = k[len(P_TE1) :]
            if rest == "text_model.embeddings.position_ids":
                assert torch.equal(take(k, "buffer"), torch.arange(77).unsqueeze(0))
            else:
                te1[rest] = take(k, rest)

    # Text encoder 2: OpenCLIP -> HF, written independently of openclip_big_g_state.
    p, d = P_TE2, TEXT_2["hidden_size"]
    te2 = {
        "text_model.embeddings.token_embedding.weight": take(p + "token_embedding.weight", "tok"),
        "text_model.embeddings.position_embedding.weight": take(p + "positional_embedding", "pos"),
        "text_model.final_layer_norm.weight": take(p + "ln_final.weight", "ln_final"),
        "text_model.final_layer_norm.bias": take(p + "ln_final.bias", "ln_final"),
    }
    proj = take(p + "text_projection", "text_projection")
    assert proj.shape == (TEXT_2["hidden_size"], TEXT_2["projection_dim"]), proj.shape
    te2["text_projection.weight"] = proj.T.contiguous()
    assert take(p + "logit_scale", "buffer").ndim == 0
    rb = p + "transformer.resblocks."
    n_blocks = len({k[len(rb) :].split(".")[0] for k in ckpt if k.startswith(rb)})
    assert n_blocks == TEXT_2["num_hidden_layers"], n_blocks
    for n in range(n_blocks):
        oc, hf = f"{p}transformer.resblocks.{n}.", f"text_model.encoder.layers.{n}."
        w, b = take(oc + "attn.in_proj_weight", "qkv"), take(oc + "attn.in_proj_bias", "qkv")
        assert w.shape == (3 * d, d) and b.shape == (3 * d,)
        for i, qkv in enumerate("qkv"):
            te2[hf + f"self_attn.{qkv}_proj.weight"] = w[i * d : (i + 1) * d]
            te2[hf + f"self_attn.{qkv}_proj.bias"] = b[i * d : (i + 1) * d]
        for a, bb in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            for s in ("weight", "bias"):
                te2[hf + f"{bb}.{s}"] = take(oc + f"{a}.{s}", hf + bb)
    left = sorted(set(ckpt) - set(used))
    assert not left, f"keys of the single file not consumed: {left[:10]}"
    extra = sorted(k for k, w in used.items() if w == "buffer")
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2}, extra


def check_single_file(path: Path, te1, te2, unet, vae) -> list[str]:
    ckpt = load_file(path)
    back, extra = single_file_to_diffusers(ckpt)
    models = {
        "unet": unet.state_dict(),
        "vae": vae.state_dict(),
        "text_encoder": te1_state_dict(te1),
        "text_encoder_2": te2_state_dict(te2),
    }
    total = 0
    for name, sd in models.items():
        assert set(back[name]) == set(sd), (name, sorted(set(back[name]) ^ set(sd))[:10])
        bad = [k for k in sd if not torch.equal(back[name][k], sd[k])]
        assert not bad, (name, bad[:10])
        total += len(sd)
    # Every diffusers tensor exactly once (take() refuses reuse, nothing is left over), nothing
    # else: OpenCLIP stores q, k, v of a layer as one in_proj weight and one in_proj bias.
    fused = 4 * TEXT_2["num_hidden_layers"]
    assert len(ckpt) == total - fused + len(extra), (len(ckpt), total, extra)
    return extra


def validate_with_diffusers(path: Path, folder: Path, te1, te2, unet, vae) -> list[str]:
    """Load the single file with diffusers (config from our folder, offline); compare all tensors."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    notes = []

    def compare(a: dict, b: dict, what: str):
        a = {k: v for k, v in a.items() if not k.endswith("position_ids")}
        b = {k: v for k, v in b.items() if not k.endswith("position_ids")}
        if set(a) != set(b):
            only_a, only_b = sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5]
            raise AssertionError(f"{what}: key sets differ: only diffusers {only_a}, only ours {only_b}")
        bad = [k for k in a if not torch.equal(a[k], b[k])]
        if bad:
            raise AssertionError(f"{what}: {len(bad)} tensors differ, e.g. {bad[:5]}")

    u = UNet2DConditionModel.from_single_file(str(path), config=str(folder), subfolder="unet", local_files_only=True)
    compare(u.state_dict(), unet.state_dict(), "unet")
    notes.append("UNet2DConditionModel.from_single_file: all tensors identical")
    v = AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae", local_files_only=True)
    compare(v.state_dict(), vae.state_dict(), "vae")
    notes.append("AutoencoderKL.from_single_file: all tensors identical")
    try:
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, tokenizer=None, tokenizer_2=None
        )
        compare(pipe.text_encoder.state_dict(), te1.state_dict(), "text_encoder")
        compare(pipe.text_encoder_2.state_dict(), te2.state_dict(), "text_encoder_2")
        compare(pipe.unet.state_dict(), unet.state_dict(), "pipeline unet")
        compare(pipe.vae.state_dict(), vae.state_dict(), "pipeline vae")
        notes.append(
            "StableDiffusionXLPipeline.from_single_file: text_encoder, text_encoder_2 (incl. text_projection), "
            "UNet, VAE tensors identical"
        )
    except Exception as e:  # report; our own inverse mapping still checks everything
        notes.append(f"StableDiffusionXLPipeline.from_single_file FAILED: {type(e).__name__}: {str(e)[:300]}")
    return notes


# ---------------------------------------------------------------------------------------------
# Reference outputs
# ---------------------------------------------------------------------------------------------


def pad_after_eos(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The same token rows with every position after the first EOS set to pad_id."""
    eos = (ids == mf.EOS_ID).int().argmax(-1)
    out = ids.clone()
    out[torch.arange(ids.shape[1])[None, :] > eos[:, None]] = pad_id
    return out


@torch.no_grad()
def reference_outputs(te1, te2, unet, vae) -> dict[str, torch.Tensor]:
    seed = SEED + 100
    r: dict[str, torch.Tensor] = {}

    # --- text encoders -------------------------------------------------------------------
    ids1 = mf.fixed_input_ids(seed, mf.EOS_ID)  # CLIP-L tokenizer: pad with <|endoftext|>
    ids2 = pad_after_eos(ids1, 0)  # bigG tokenizer: pad with "!" (id 0)
    eos = (ids1 == mf.EOS_ID).int().argmax(-1).to(torch.int64)
    assert torch.equal(eos, (ids2 == mf.EOS_ID).int().argmax(-1).to(torch.int64))
    assert torch.equal(eos, ids1.argmax(-1)) and torch.equal(eos, ids2.argmax(-1))
    assert eos.tolist() == [10, 76] and not torch.equal(ids1, ids2)
    o1 = te1(input_ids=ids1, output_hidden_states=True)
    o2 = te2(input_ids=ids2, output_hidden_states=True)
    assert len(o1.hidden_states) == TEXT_1["num_hidden_layers"] + 1 == len(o2.hidden_states)
    r["text_encoder.input_ids"] = ids1
    r["text_encoder.eos_positions"] = eos
    for i, h in enumerate(o1.hidden_states):
        r[f"text_encoder.hidden_states.{i}"] = h
    r["text_encoder.last_hidden_state"] = o1.last_hidden_state
    r["text_encoder_2.input_ids"] = ids2
    for i, h in enumerate(o2.hidden_states):
        r[f"text_encoder_2.hidden_states.{i}"] = h
    r["text_encoder_2.last_hidden_state"] = o2.last_hidden_state
    pooled = o2.last_hidden_state[torch.arange(2), eos]
    r["text_encoder_2.pooler_output"] = pooled  # before the projection (extra, for debugging)
    r["text_encoder_2.text_embeds"] = o2.text_embeds
    # hidden_states[-1] is BEFORE final_layer_norm; last_hidden_state is after it.
    assert torch.allclose(te1.final_layer_norm(o1.hidden_states[-1]), o1.last_hidden_state)  # flat since transformers 5.6
    assert torch.allclose(te2.text_model.final_layer_norm(o2.hidden_states[-1]), o2.last_hidden_state)
    # text_embeds = text_projection(last_hidden_state at the first EOS) = pooled @ text_projection.weight.T
    assert torch.allclose(o2.text_embeds, pooled @ te2.text_projection.weight.T, atol=1e-6)
    # StableDiffusionXLPipeline.encode_prompt with clip_skip=None: hidden_states[-2] of each
    # encoder (penultimate layer output, no final_layer_norm), concatenated on the feature axis;
    # the pooled output is text_encoder_2's projected text_embeds (its output[0], ndim 2).
    r["prompt_embeds"] = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    r["pooled_prompt_embeds"] = o2.text_embeds

    # --- UNet ----------------------------------------------------------------------------
    g = torch.Generator().manual_seed(seed + 1)
    cad = UNET_XL["cross_attention_dim"]
    sample = torch.randn((2, 4, 8, 8), generator=g)
    timesteps = torch.tensor([10, 700], dtype=torch.int64)
    ehs = torch.randn((2, 77, cad), generator=g)
    text_embeds = torch.randn((2, TEXT_2["projection_dim"]), generator=g)
    time_ids = torch.tensor(TIME_IDS, dtype=torch.float32)
    cot = torch.randn((2, 4, 8, 8), generator=g)
    r["unet.sample"] = sample
    r["unet.timesteps"] = timesteps
    r["unet.encoder_hidden_states"] = ehs
    r["unet.text_embeds"] = text_embeds
    r["unet.time_ids"] = time_ids

    def run(s, t, e, te, ti):
        return unet(s, t, encoder_hidden_states=e, added_cond_kwargs={"text_embeds": te, "time_ids": ti}).sample

    r["unet.out"] = run(sample, timesteps, ehs, text_embeds, time_ids)
    # Per-sample timesteps and added conditioning really are per-sample.
    alone = run(sample[1:], timesteps[1:], ehs[1:], text_embeds[1:], time_ids[1:])
    assert torch.allclose(alone, r["unet.out"][1:], atol=1e-5)
    # The added conditioning matters (text_embeds and every time id).
    assert not torch.allclose(run(sample, timesteps, ehs, text_embeds, time_ids.flip(-1)), r["unet.out"], atol=1e-4)
    with torch.enable_grad():
        s = sample.clone().requires_grad_(True)
        e = ehs.clone().requires_grad_(True)
        te_ = text_embeds.clone().requires_grad_(True)
        (run(s, timesteps, e, te_, time_ids) * cot).sum().backward()
    r["unet.grad.cotangent"] = cot
    r["unet.grad.sample"] = s.grad
    r["unet.grad.encoder_hidden_states"] = e.grad
    r["unet.grad.text_embeds"] = te_.grad

    # Non-square latent (as aspect-ratio buckets give): H/W mix-ups show, mid block at 4x6.
    g2 = torch.Generator().manual_seed(seed + 2)
    r["unet_hw.sample"] = torch.randn((2, 4, 16, 24), generator=g2)
    r["unet_hw.timesteps"] = torch.tensor([999, 0], dtype=torch.int64)
    r["unet_hw.encoder_hidden_states"] = torch.randn((2, 77, cad), generator=g2)
    r["unet_hw.text_embeds"] = torch.randn((2, TEXT_2["projection_dim"]), generator=g2)
    r["unet_hw.time_ids"] = torch.tensor(TIME_IDS_HW, dtype=torch.float32)
    r["unet_hw.out"] = run(*(r[f"unet_hw.{k}"] for k in ("sample", "timesteps", "encoder_hidden_states", "text_embeds", "time_ids")))

    # --- VAE -----------------------------------------------------------------------------
    image = torch.rand((1, 3, 32, 32), generator=g) * 2 - 1
    dist = vae.encode(image).latent_dist
    r["vae.encode.image"] = image
    r["vae.encode.mean"] = dist.mean
    r["vae.encode.std"] = dist.std
    r["vae.encode.logvar"] = dist.logvar
    latent = torch.randn((1, 4, 4, 4), generator=g)
    r["vae.decode.latent"] = latent
    r["vae.decode.sample"] = vae.decode(latent).sample

    r["scheduler.alphas_cumprod"] = make_scheduler().alphas_cumprod.to(torch.float32)
    # clone: pooled_prompt_embeds is text_encoder_2.text_embeds (safetensors refuses shared storage)
    return {k: v.detach().clone().contiguous() for k, v in r.items()}


def check_encode_prompt(folder: Path, ref: dict[str, torch.Tensor]) -> str:
    """Run diffusers' own StableDiffusionXLPipeline.encode_prompt on the folder written to disk,
    with stand-in tokenizers that return the reference ids, and compare with the reference."""
    from diffusers import StableDiffusionXLPipeline

    class IdsTokenizer:
        """Just enough of a tokenizer for encode_prompt: prompt "p{b}" -> row b of the ids."""

        model_max_length = 77
        added_tokens_encoder: dict = {}

        def __init__(self, ids):
            self.ids = ids

        def tokenize(self, prompt):
            return [prompt]

        def __call__(self, prompt, **kwargs):
            prompts = [prompt] if isinstance(prompt, str) else prompt
            from types import SimpleNamespace

            return SimpleNamespace(input_ids=torch.stack([self.ids[int(p[1:])] for p in prompts]))

        def batch_decode(self, *a, **k):
            return []

    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.tokenizer = IdsTokenizer(ref["text_encoder.input_ids"])
    pipe.tokenizer_2 = IdsTokenizer(ref["text_encoder_2.input_ids"])
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt=["p0", "p1"], device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True
        )
    assert torch.equal(pe, ref["prompt_embeds"]), (pe - ref["prompt_embeds"]).abs().max()
    assert torch.equal(pooled, ref["pooled_prompt_embeds"]), (pooled - ref["pooled_prompt_embeds"]).abs().max()
    # force_zeros_for_empty_prompt: no negative prompt -> zero negative embeddings.
    assert not npe.any() and not npooled.any()
    return (
        "StableDiffusionXLPipeline.from_pretrained(sdxl_tiny/).encode_prompt(['p0','p1'], clip_skip=None) with "
        "stand-in tokenizers returning text_encoder.input_ids / text_encoder_2.input_ids gives prompt_embeds and "
        "pooled_prompt_embeds bit-identical to the reference; negative embeddings are zeros "
        "(force_zeros_for_empty_prompt, no negative prompt)"
    )


def parameter_coverage(te1, te2, unet, vae, ref: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Parameters whose gradient of a random projection of the reference outputs is (up to
    rounding) zero, i.e. that the reference tensors cannot detect. Expected: attention key
    biases only (softmax is invariant to them)."""
    g = torch.Generator().manual_seed(SEED + 200)

    def proj(t: torch.Tensor) -> torch.Tensor:
        return (t * torch.randn(t.shape, generator=g)).sum()

    def text_loss(te, prefix: str, pooled: str):
        o = te(input_ids=ref[f"{prefix}.input_ids"], output_hidden_states=True)
        return sum(proj(h) for h in o.hidden_states) + proj(getattr(o, pooled))

    def unet_loss():
        keys = ("sample", "timesteps", "encoder_hidden_states")
        return sum(
            proj(
                unet(
                    *(ref[f"{p}.{k}"] for k in keys),
                    added_cond_kwargs={"text_embeds": ref[f"{p}.text_embeds"], "time_ids": ref[f"{p}.time_ids"]},
                ).sample
            )
            for p in ("unet", "unet_hw")
        )

    def vae_loss():
        dist = vae.encode(ref["vae.encode.image"]).latent_dist
        return proj(dist.mean) + proj(dist.std) + proj(vae.decode(ref["vae.decode.latent"]).sample)

    out = {}
    with torch.enable_grad():
        for name, model, loss_fn in (
            ("text_encoder", te1, lambda: text_loss(te1, "text_encoder", "last_hidden_state")),
            ("text_encoder_2", te2, lambda: text_loss(te2, "text_encoder_2", "text_embeds")),
            ("unet", unet, unet_loss),
            ("vae", vae, vae_loss),
        ):
            model.zero_grad(set_to_none=True)
            loss_fn().backward()
            grads = {n: (0.0 if p.grad is None else float(p.grad.abs().max())) for n, p in model.named_parameters()}
            # Key biases get rounding noise (~1e-6) instead of an exact zero; every other
            # parameter's largest gradient is >= 0.09 here. Relative threshold on the median.
            limit = 1e-4 * sorted(grads.values())[len(grads) // 2]
            out[name] = sorted(n for n, v in grads.items() if v < limit)
            model.zero_grad(set_to_none=True)
    return out


# ---------------------------------------------------------------------------------------------


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

    te1, te2, unet, vae = build_models()
    counts = {"unet": n_params(unet), "text_encoder": n_params(te1), "text_encoder_2": n_params(te2), "vae": n_params(vae)}
    counts["total"] = sum(counts.values())
    print("parameter counts:", json.dumps(counts))

    folder = write_folder(te1, te2, unet, vae, out)
    check_folder(folder, te1, te2, unet, vae)
    single = make_single_file(te1, te2, unet, vae, out)
    extra = check_single_file(single, te1, te2, unet, vae)
    print(f"{NAME}: own inverse mapping OK, every diffusers tensor exactly once; extra single-file keys: {extra}")
    notes = []
    if not args.skip_validate:
        notes = validate_with_diffusers(single, folder, te1, te2, unet, vae)
        for n in notes:
            print(f"{NAME}: {n}")

    ref = reference_outputs(te1, te2, unet, vae)
    for k, v in ref.items():
        s = v.double().sum()
        assert torch.isfinite(s) and v.double().abs().sum() > 0, k
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k
            assert v.numel() == 1 or v.std() > 0, k
    if not args.skip_validate:
        notes.append(check_encode_prompt(folder, ref))
        print(f"{NAME}: {notes[-1]}")
    coverage = parameter_coverage(te1, te2, unet, vae, ref)
    for name, undetected in coverage.items():
        assert all(n.endswith(("k_proj.bias", "to_k.bias")) for n in undetected), (name, undetected)
    print(f"{NAME}: parameters the reference cannot detect: {json.dumps(coverage)}")
    save_file(ref, out / "reference" / f"{NAME}.safetensors")
    scales = {k: round(float(v.float().std()), 4) for k, v in ref.items() if v.is_floating_point() and v.numel() > 1}
    print(f"{NAME} output std: {json.dumps(scales)}")

    def plain(cfg: dict) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}

    meta = {
        "model": NAME,
        "versions": versions,
        "prediction_type": SCHED_XL["prediction_type"],
        "parameter_counts": counts,
        "text_encoder_config": plain(TEXT_1),
        "text_encoder_2_config": plain(TEXT_2),
        "unet_config": plain(UNET_XL),
        "vae_config": plain(VAE_XL),
        "scheduler_config": dict(SCHED_XL, _class_name="EulerDiscreteScheduler"),
        "seeds": {"text_encoder": SEED + 1, "unet": SEED + 2, "vae": SEED + 3, "text_encoder_2": SEED + 4, "inputs": SEED + 100},
        "text_inputs": "text_encoder.input_ids: row 0 = BOS (998), 9 random ids in [1, 997], EOS (999), then pad 999 "
        "(CLIP-L tokenizer pads with <|endoftext|>); row 1 = BOS, 75 random ids, EOS (no pad). "
        "text_encoder_2.input_ids: the same rows with every position after the first EOS set to 0 (SDXL's second "
        "tokenizer pads with '!' = id 0, as open_clip.tokenize). text_encoder.eos_positions = [10, 76] for both.",
        "pooling": "text_encoder_2: pooler_output = last_hidden_state[b, first EOS] (after final_layer_norm; "
        "transformers' rule when eos_token_id != 2, equal to argmax(input_ids) since EOS 999 is the largest id); "
        "text_embeds = text_projection(pooler_output) (Linear without bias, weight [40, 48]). "
        "text_encoder_2.pooler_output is an extra tensor for debugging.",
        "hidden_states": "X.hidden_states.0 = embeddings output (token + position); .i = output of encoder layer i-1, "
        "BEFORE final_layer_norm; last_hidden_state = final_layer_norm(hidden_states.3)",
        "prompt_embeds": "cat(text_encoder.hidden_states[-2], text_encoder_2.hidden_states[-2], dim=-1) = "
        "cat(hidden_states.2, hidden_states.2) [2,77,32+48]: penultimate layer outputs WITHOUT final_layer_norm, "
        "text_encoder first. pooled_prompt_embeds = text_encoder_2.text_embeds (projected, from the LAST layer "
        "after final_layer_norm). This is diffusers 0.42.1 StableDiffusionXLPipeline.encode_prompt with "
        "clip_skip=None (clip_skip=k uses hidden_states[-(k+2)] for the positive prompt only; the negative "
        "prompt always uses [-2]); checked by running encode_prompt on the folder (single_file_validation).",
        "unet_inputs": "sample ~ N(0,1) [2,4,8,8]; timesteps [10, 700] (one per sample); encoder_hidden_states "
        "~ N(0,1) [2,77,80]; added_cond_kwargs text_embeds ~ N(0,1) [2,40], time_ids (float32) "
        f"{TIME_IDS} = (original_h, original_w, crop_top, crop_left, target_h, target_w) per sample. "
        "Each time id gets its own 8-dim sinusoidal embedding (flip_sin_to_cos: cos first, freq_shift 0), "
        "flattened to [2,48] and appended AFTER text_embeds: add_embedding(cat(text_embeds, time_embeds)) [2,88] "
        "is added to the timestep embedding. unet_hw.*: the same with a non-square [2,4,16,24] latent, "
        f"timesteps [999, 0], time_ids {TIME_IDS_HW}.",
        "unet_grad": "gradients of sum(unet.out * unet.grad.cotangent) w.r.t. sample, encoder_hidden_states and "
        "text_embeds (time_ids and timesteps are constants)",
        "vae_inputs": "encode: image ~ U(-1,1) [1,3,32,32]; decode: latent ~ N(0,1) [1,4,4,4] (no scaling_factor "
        "applied in either direction; force_upcast has no effect in float32)",
        "single_file_layout": {
            "unet": f"{P_UNET}* = make_fixtures.unet_diffusers_to_ldm names + add_embedding.linear_1/2 -> label_emb.0.0/0.2",
            "vae": f"{P_VAE}* = make_fixtures.vae_diffusers_to_ldm names, mid attention q/k/v/proj_out as [c,c,1,1]",
            "text_encoder": f"{P_TE1}text_model.* (transformers names) + text_model.embeddings.position_ids I64 [1,77]",
            "text_encoder_2": f"{P_TE2}* OpenCLIP: token_embedding.weight, positional_embedding [77,48], "
            "transformer.resblocks.N.{ln_1,ln_2,attn.out_proj,mlp.c_fc,mlp.c_proj}.{weight,bias}, "
            "transformer.resblocks.N.attn.in_proj_weight [144,48] / in_proj_bias [144] (q;k;v on dim 0), "
            "ln_final.{weight,bias}, text_projection [48,40] = text_projection.weight.T (used as x @ P), "
            "logit_scale (0-dim, ln(1/0.07), unused). All 3 layers (no extra layer, unlike sd2_tiny).",
        },
        "single_file_validation": ["own inverse mapping: every tensor bit-identical, every diffusers tensor exactly once"]
        + notes,
        "single_file_extra_keys": extra,
        "parameters_not_detected_by_reference": coverage,
        "tensors": mf.tensor_table(ref),
    }
    (out / "reference" / f"{NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")

    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    files += [single, out / "reference" / f"{NAME}.safetensors", out / "reference" / f"{NAME}.json"]
    total = 0
    for p in files:
        total += p.stat().st_size
        print(f"{p.stat().st_size:>10,}  {p.relative_to(out)}")
    print(f"{total:>10,}  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
