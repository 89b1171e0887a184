#!/usr/bin/env python3
"""Check a checkpoint written by `sd-lora merge` against diffusers' own merge of the same LoRAs.

    HF_HUB_OFFLINE=1 ~/.cache/sd-lora-venv/bin/python tools/check_merge_in_diffusers.py \\
        MERGED --model BASE_FOLDER --lora FILE[:WEIGHT] [--lora ...] [--tol 1e-5]

BASE_FOLDER is the diffusers folder the LoRAs were merged into (for a single-file merge, the
folder holding the same weights, e.g. tests/fixtures/sd1_tiny for sd1_tiny.safetensors). The
script loads the base with diffusers, and for each LoRA calls what users call —
`load_lora_weights`, `fuse_lora(lora_scale=WEIGHT)`, `unload_lora_weights` — then loads MERGED
(a folder with `from_pretrained`; a `.safetensors` file with diffusers' single-file converters)
and compares every UNet and text-encoder tensor: the largest difference relative to the
largest entry of that tensor's update must be under --tol, and the two must change the same
tensors. Exit status 1 on any difference.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lora_reference as lr  # noqa: E402  (sets the offline environment variables first)
import torch  # noqa: E402


def parse_lora(arg: str) -> tuple[Path, float]:
    file, sep, weight = arg.rpartition(":")
    if sep and file and "/" not in weight:
        return Path(file), float(weight)
    return Path(arg), 1.0


def components(pipe) -> dict[str, torch.nn.Module]:
    out = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out["text_encoder_2"] = pipe.text_encoder_2
    return out


def load_text_encoder(template, state: dict) -> dict:
    """`template`'s state dict with the converted single-file tensors loaded into a copy of it
    (transformers >= 5 dropped the `text_model.` prefix of CLIPTextModel's keys)."""
    model = copy.deepcopy(template)
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    # Keys the model does not have are fine (SD2's checkpoint holds the OpenCLIP layer that the
    # diffusers text encoder drops; buffers); keys it has must all come from the file.
    own = model.state_dict()
    result = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing:
        raise SystemExit(f"text encoder: not in the file: {missing[:5]}")
    return model.state_dict()


def single_file_state_dicts(path: Path, folder: Path, base) -> dict[str, dict]:
    """The UNet and text encoders of a single-file checkpoint, converted by diffusers' own
    single-file code (`from_single_file` of the pipelines fails in this diffusers version when
    given a local config, so the components are loaded one by one)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as u
    from safetensors.torch import load_file

    out = {"unet": UNet2DConditionModel.from_single_file(str(path), config=str(folder), subfolder="unet").state_dict()}
    checkpoint = load_file(str(path))
    if any(k.startswith("conditioner.embedders.1.model.") for k in checkpoint):
        te1 = u.convert_ldm_clip_checkpoint(checkpoint, remove_prefix="conditioner.embedders.0.transformer.")
        out["text_encoder"] = load_text_encoder(base.text_encoder, te1)
        te2 = u.convert_open_clip_checkpoint(base.text_encoder_2, checkpoint, prefix="conditioner.embedders.1.model.")
        out["text_encoder_2"] = load_text_encoder(base.text_encoder_2, te2)
    elif any(k.startswith("cond_stage_model.model.") for k in checkpoint):
        te = u.convert_open_clip_checkpoint(base.text_encoder, checkpoint)
        out["text_encoder"] = load_text_encoder(base.text_encoder, te)
    else:
        out["text_encoder"] = load_text_encoder(base.text_encoder, u.convert_ldm_clip_checkpoint(checkpoint))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("merged")
    ap.add_argument("--model", required=True)
    ap.add_argument("--lora", action="append", required=True)
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()

    base = lr.load_pipeline(args.model)
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in components(base).items()}
    for i, arg in enumerate(args.lora):
        path, weight = parse_lora(arg)
        with lr.capture_warnings() as warnings:
            base.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"l{i}")
            base.fuse_lora(lora_scale=weight, adapter_names=[f"l{i}"])
            base.unload_lora_weights()
        for w in warnings:
            print(f"warning while merging {path}: {w}")
    reference = {c: m.state_dict() for c, m in components(base).items()}

    merged_path = Path(args.merged)
    if merged_path.is_dir():
        mine = {c: m.state_dict() for c, m in components(lr.load_pipeline(merged_path)).items()}
    else:
        mine = single_file_state_dicts(merged_path, Path(args.model), base)

    bad = 0
    changed = 0
    worst = 0.0
    for c, ref in reference.items():
        for key, want in ref.items():
            got = mine[c].get(key)
            if got is None:
                print(f"{c}.{key}: missing from {merged_path}")
                bad += 1
                continue
            base_t = before[c][key].double()
            delta_ref = want.double() - base_t
            delta_ours = got.double() - base_t
            scale = delta_ref.abs().max().item()
            if scale == 0.0:
                if delta_ours.abs().max().item() != 0.0:
                    print(f"{c}.{key}: changed by sd-lora, not by diffusers")
                    bad += 1
                continue
            changed += 1
            rel = (delta_ours - delta_ref).abs().max().item() / scale
            worst = max(worst, rel)
            if rel > args.tol:
                print(f"{c}.{key}: merged update differs from diffusers' by {rel:.3e} of its size")
                bad += 1
    print(f"{changed} tensors changed by the merge; worst relative difference {worst:.3e}; {bad} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
