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


def load_pipeline(model: Path, dtype=torch.float32):
    from diffusers import StableDiffusionPipeline

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
