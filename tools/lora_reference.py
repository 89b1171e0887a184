"""Shared helpers of the LoRA reference scripts (make_lora_fixtures.py, check_lora_in_diffusers.py).

Module paths are diffusers/transformers paths as they appear in weight keys: UNet
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, text encoder
`text_model.encoder.layers.0.self_attn.q_proj`. transformers >= 5 flattened `CLIPTextModel`
(its modules are `encoder.layers...`, no `text_model.`), so the live module name of a text
encoder path is found with `te_live_name`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import torch  # noqa: E402

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
PEFT_PREFIX = {"unet": "unet.", "text_encoder": "text_encoder."}


def te_live_name(text_encoder, path: str) -> str:
    """The module name of `path` (`text_model.…`) inside this transformers version's model."""
    if hasattr(text_encoder, "text_model"):
        return path
    return path.removeprefix("text_model.")


def te_canonical_name(text_encoder, live: str) -> str:
    """Inverse of te_live_name: the `text_model.…` path of a live module name."""
    if hasattr(text_encoder, "text_model"):
        return live
    return "text_model." + live


def kohya_name(component: str, path: str) -> str:
    return KOHYA_PREFIX[component] + path.replace(".", "_")


def kohya_default_targets(unet, text_encoder) -> dict[str, list[str]]:
    """kohya's default "LoRA" targets: every Linear / 1x1 Conv2d inside a Transformer2DModel
    (proj_in, proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2) and every
    Linear of a CLIP encoder layer (self_attn q/k/v/out_proj, mlp.fc1/fc2). In model order."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    unet_paths = []
    for name, m in unet.named_modules():
        if isinstance(m, Transformer2DModel):
            for sub, mm in m.named_modules():
                if isinstance(mm, torch.nn.Linear) or (
                    isinstance(mm, torch.nn.Conv2d) and tuple(mm.kernel_size) == (1, 1)
                ):
                    unet_paths.append(f"{name}.{sub}")
    te_paths = []
    for name, m in text_encoder.named_modules():
        if isinstance(m, torch.nn.Linear) and re.search(r"encoder\.layers\.\d+\.(self_attn|mlp)\.", name):
            te_paths.append(te_canonical_name(text_encoder, name))
    return {"unet": unet_paths, "text_encoder": te_paths}


@contextlib.contextmanager
def capture_warnings():
    """Collect every WARNING+ log record of diffusers/peft/transformers and every Python warning."""
    records: list[str] = []

    class _H(logging.Handler):
        def emit(self, record):
            records.append(f"[{record.name}] {record.getMessage()}")

    handler = _H(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers", "accelerate")]
    for lg in loggers:
        lg.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield records
        finally:
            for lg in loggers:
                lg.removeHandler(handler)
            for w in caught:
                records.append(f"[warning {w.category.__name__}] {w.message}")


# `builtin:tiny-sdxl`'s diffusers configs, as crates/model/src/builtin/sdxl.rs defines them (a
# LoRA trained on it loads into a pipeline of the same layout; random weights are enough to check
# that every key is taken and the outputs change).
TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64), layers_per_block=2, transformer_layers_per_block=(1, 1, 2),
    norm_num_groups=8, norm_eps=1e-5, cross_attention_dim=160, attention_head_dim=(2, 4, 4),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=112,
)
TINY_SDXL_TE = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
    pad_token_id=49407, bos_token_id=49406, eos_token_id=49407,
)
TINY_SDXL_TE2 = dict(TINY_SDXL_TE, hidden_size=96, intermediate_size=384, hidden_act="gelu", pad_token_id=0)
TINY_SDXL_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
    sample_size=64, scaling_factor=0.13025, force_upcast=True,
)


def tiny_sdxl_pipeline(dtype=torch.float32):
    """A StableDiffusionXLPipeline with builtin:tiny-sdxl's layout and seeded random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**TINY_SDXL_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TE)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TE2)),
        tokenizer=None,
        tokenizer_2=None,
        unet=UNet2DConditionModel(**TINY_SDXL_UNET),
        scheduler=EulerDiscreteScheduler(),
    ).to(dtype)


def sgm_unet_name(path: str, layers_per_block: int, up_attention: list[bool]) -> str | None:
    """The original (sgm/LDM) address of a diffusers UNet module path, written independently of
    the Rust converter so the two check each other (`down_blocks.1.attentions.0.proj_in` ->
    `input_blocks.4.1.proj_in`)."""
    per = layers_per_block + 1
    fixed = {
        "conv_in": "input_blocks.0.0", "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    }
    if path in fixed:
        return fixed[path]
    resnet = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
              "conv_shortcut": "skip_connection"}
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path)
    if m:
        b = int(m[1])
        return f"output_blocks.{b * per + layers_per_block}.{2 if up_attention[b] else 1}.conv"
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        b, l, rest = int(m[2]), int(m[4]), m[5]
        index = 1 + b * per + l if m[1] == "down" else b * per + l
        blocks = "input_blocks" if m[1] == "down" else "output_blocks"
        if m[3] == "attentions":
            return f"{blocks}.{index}.1.{rest}"
        return f"{blocks}.{index}.0.{resnet[rest]}" if rest in resnet else None
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        if m[1] == "attentions":
            return f"middle_block.1.{m[3]}"
        return f"middle_block.{2 * int(m[2])}.{resnet[m[3]]}" if m[3] in resnet else None
    return None


def load_pipeline(model, dtype=torch.float32):
    """The pipeline of a diffusers folder (SD or, with text_encoder_2/, SDXL), or of
    `builtin:tiny-sdxl` (its layout, random weights)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if str(model) == "builtin:tiny-sdxl":
        return tiny_sdxl_pipeline(dtype)
    if (Path(model) / "text_encoder_2").is_dir():
        return StableDiffusionXLPipeline.from_pretrained(
            str(model), tokenizer=None, tokenizer_2=None, torch_dtype=dtype
        )
    # The fixture folders have no tokenizer/ (on purpose) and no safety checker.
    return StableDiffusionPipeline.from_pretrained(
        str(model),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        tokenizer=None,
        torch_dtype=dtype,
    )


def attached_lora_layers(model) -> dict[str, object]:
    """Live module name -> peft LoRA layer, for every module diffusers/peft wrapped."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def effective_delta(layer, adapter: str) -> torch.Tensor:
    """scaling · (B @ A) of one peft LoRA layer, flattened to [out, in·kh·kw], float64."""
    a = layer.lora_A[adapter].weight.detach().double()
    b = layer.lora_B[adapter].weight.detach().double()
    return layer.scaling[adapter] * (b.flatten(1) @ a.flatten(1))
