#!/usr/bin/env python3
"""Check that LyCORIS reads a DoRA/LoHa/LoKr file written by sd-lora as sd-lora applies it.

    HF_HUB_OFFLINE=1 ~/.cache/sd-lora-venv/bin/python tools/check_lycoris_in_reference.py \\
        --model BASE_FOLDER --lora FILE --merged MERGED_FOLDER [--tol 1e-4]

LyCORIS is the library kohya users train and load these network types with; A1111/Forge and
ComfyUI implement the same formulas. The script loads BASE_FOLDER (an SD1/SD2 diffusers folder)
with diffusers, loads FILE (kohya format) with LyCORIS' own loader
(`lycoris.kohya.create_network_from_weights`) and applies it to the UNet and the text encoder,
then runs the text encoder and the UNet on fixed inputs. MERGED_FOLDER is what
`sd-lora merge --model BASE_FOLDER --lora FILE --output MERGED_FOLDER` wrote (sd-lora's own
reading of the file, folded into the weights); the same inputs through it must give the same
output: the largest difference relative to the largest output value under --tol. Every module
of the file must have been loaded by LyCORIS, and the LoRA must change the output (its effect
is printed). Exit status 1 on any difference.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lora_reference as lr  # noqa: E402  (sets the offline environment variables first)
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402


class Named(torch.nn.Module):
    """Gives a transformers >= 5 CLIP text model the `text_model.` prefix of its module
    names back, which kohya names (and so LyCORIS' loader) expect."""

    def __init__(self, text_model: torch.nn.Module):
        super().__init__()
        self.text_model = text_model


def run(pipe) -> torch.Tensor:
    torch.manual_seed(0)
    ids = torch.tensor([[0, 17, 321, 44, 998, 5, 2, 2]])
    ctx = pipe.text_encoder(ids)[0]
    cfg = pipe.unet.config
    sample = torch.randn(1, cfg.in_channels, 16, 24)
    t = torch.tensor([421.0])
    return pipe.unet(sample, t, encoder_hidden_states=ctx).sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--lora", required=True, type=Path)
    p.add_argument("--merged", required=True, type=Path)
    p.add_argument("--tol", type=float, default=1e-4)
    args = p.parse_args()

    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    # The loader first builds a network over its default targets (kohya's UNet class names),
    # which on diffusers' UNet names a layer twice; the file's modules replace that network's
    # anyway, so start it empty.
    LycorisNetworkKohya.apply_preset(
        {
            "unet_target_module": [],
            "unet_target_name": [],
            "text_encoder_target_module": [],
            "text_encoder_target_name": [],
        }
    )
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    with safe_open(str(args.lora), "pt") as f:
        names = {k.split(".")[0] for k in f.keys()}
        meta = f.metadata() or {}
    pipe = lr.load_pipeline(args.model)
    base_out = run(pipe)
    te = pipe.text_encoder
    named_te = te if any(n.startswith("text_model.") for n, _ in te.named_modules()) else Named(te)
    with torch.no_grad():
        network, weights = create_network_from_weights(
            1.0, str(args.lora), None, named_te, pipe.unet, for_inference=True
        )
        network.apply_to(named_te, pipe.unet, apply_text_encoder=True, apply_unet=True)
        loaded = len(network.unet_loras) + len(network.text_encoder_loras)
        kinds = sorted({type(m).__name__ for m in network.unet_loras + network.text_encoder_loras})
        ref = run(pipe)
        merged = run(lr.load_pipeline(args.merged))
    effect = (ref - base_out).abs().max().item() / base_out.abs().max().item()
    err = (merged - ref).abs().max().item() / ref.abs().max().item()
    print(
        f"{args.lora.name}: {meta.get('ss_network_module')} {meta.get('ss_network_args')}; "
        f"LyCORIS loaded {loaded}/{len(names)} modules as {', '.join(kinds)}; "
        f"the LoRA changes the UNet output by {effect:.3e} (relative); "
        f"sd-lora merge vs LyCORIS: {err:.3e}"
    )
    ok = loaded == len(names) and effect > 10 * args.tol and err < args.tol
    if not ok:
        print("MISMATCH", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
