#!/usr/bin/env python3
"""Prints sd-lora's and the reference's `--train` or `--vae` reports side by side with ratios.

Usage: tools/bench_table.py OURS.json REF.json   (tools/bench_compare.sh calls it)
"""

import json
import sys


def gb(b):
    return "-" if b is None else f"{b / 1e9:.2f} GB"


def sec(s):
    return "-" if s is None else f"{s:.3f} s"


def ratio(a, b):
    return "-" if not a or not b else f"{a / b:.2f}"


def row(name, ours, ref, key, fmt):
    a, b = ours.get(key), ref.get(key)
    return (name, fmt(a), fmt(b), ratio(a, b))


def main() -> None:
    ours = json.load(open(sys.argv[1]))
    ref = json.load(open(sys.argv[2]))
    if ours["mode"] == "vae":
        print(f"VAE at {ours['resolution']} px, one image, median of {len(ours['encode_s'])} "
              f"({ours['threads']} threads)")
        rows = [
            row("encode", ours, ref, "median_encode_s", sec),
            row("decode", ours, ref, "median_decode_s", sec),
            row("load", ours, ref, "load_s", sec),
            row("peak RSS", ours, ref, "peak_rss_bytes", gb),
        ]
    else:
        print(
            f"train: {ours['model']} at {ours['resolution']} px, {ours['preset']} LoRA rank {ours['rank']} "
            f"alpha {ours['alpha']}, checkpointing {'on' if ours['checkpointing'] else 'off'}, "
            f"{ours['images']} images, {ours['warmup']} warm-up + {ours['steps']} timed steps "
            f"({ours['threads']} threads)"
        )
        rows = [
            row("load", ours, ref, "load_s", sec),
            row("load peak RSS", ours, ref, "load_peak_rss_bytes", gb),
            row("cache latents", ours, ref, "cache_latents_s", sec),
            row("  per image", ours, ref, "encode_per_image_s", sec),
            row("cache captions", ours, ref, "cache_text_s", sec),
            row("median steady step", ours, ref, "median_step_s", sec),
            ("fastest step", sec(min(ours["step_s"])), sec(min(ref["step_s"])),
             ratio(min(ours["step_s"]), min(ref["step_s"]))),
            row("peak RSS (whole run)", ours, ref, "peak_rss_bytes", gb),
            ("ops per step", str(ours["ops_per_step"][-1]) if ours.get("ops_per_step") else "-", "-", ""),
            ("LoRA parameters", str(ours.get("lora_params", "-")), str(ref.get("lora_params", "-")), ""),
        ]
    rows.insert(0, ("", "sd-lora", "pytorch", "ours/ref"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  " + "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))
    if ours["mode"] == "train":
        print(f"  step times (s): sd-lora {[round(s, 3) for s in ours['step_s']]}, "
              f"pytorch {[round(s, 3) for s in ref['step_s']]}")


if __name__ == "__main__":
    main()
