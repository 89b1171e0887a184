#!/usr/bin/env python3
"""Check that diffusers loads a LoRA file completely: every module in the file attached, no
warning, and the attached weights equal the file's.

    HF_HUB_OFFLINE=1 ~/.cache/sd-lora-venv/bin/python tools/check_lora_in_diffusers.py \\
        FILE.safetensors --model tests/fixtures/sd1_tiny
    ... check_lora_in_diffusers.py FILE.safetensors --model builtin:tiny-sdxl

Loads the model folder as a StableDiffusionPipeline (StableDiffusionXLPipeline when it has a
text_encoder_2/; `builtin:tiny-sdxl` builds that model's layout with random weights), calls
`pipe.load_lora_weights(dir, weight_name=file)` (the same call users make) and reports:
  * every warning diffusers / peft / transformers log while loading (unexpected or missing
    keys are reported that way, and otherwise silently ignored);
  * the number of LoRA modules attached to the UNet and the text encoder, against the number
    of modules in the file;
  * modules in the file that were not attached (leftover keys);
  * whether the LoRA changes the outputs of the UNet and of each text encoder it adapts;
  * for kohya (`lora_unet_…`/`lora_te_…`, SDXL's sgm `lora_unet_input_blocks_…` and
    `lora_te1_`/`lora_te2_`; `.lora_down/.lora_up/.alpha`), PEFT
    (`unet.…lora_A/lora_B`) and old diffusers (`….lora.down/.lora.up`,
    `….lora_linear_layer.down/.up`) files: whether each attached layer's scaling·B·A equals the
    file's (alpha/rank)·up·down (in f64, relative to the largest entry; tolerance --tol).
Exit status 1 if anything is wrong (including loading errors), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lora_reference as lr  # noqa: E402  (sets the offline environment variables first)
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

# (regex on the key, which tensor it is). Group 1: component prefix, group 2: module part.
PATTERNS = [
    (re.compile(r"^(lora_unet|lora_te|lora_te1|lora_te2)_(.+)\.lora_down\.weight$"), "down"),
    (re.compile(r"^(lora_unet|lora_te|lora_te1|lora_te2)_(.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(lora_unet|lora_te|lora_te1|lora_te2)_(.+)\.alpha$"), "alpha"),
    (re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora_A(?:\.default)?\.weight$"), "down"),
    (re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora_B(?:\.default)?\.weight$"), "up"),
    (re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora\.down\.weight$"), "down"),
    (re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora\.up\.weight$"), "up"),
    (re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora_linear_layer\.down\.weight$"), "down"),
    (re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora_linear_layer\.up\.weight$"), "up"),
    (re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.alpha$"), "alpha"),
]
COMPONENT = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "unet": "unet",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
}


def read_file(path: Path):
    tensors, metadata = {}, {}
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, metadata


def group_modules(tensors, live_names: dict[str, dict[str, str]]):
    """(component, live module name) -> {down, up, alpha?}; plus keys that fit no pattern or no module.

    live_names[component] maps both the dotted live module name and its kohya-style underscore
    form (with and without `text_model_`) to the live name."""
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unmatched = []
    for key, t in tensors.items():
        for rx, what in PATTERNS:
            m = rx.match(key)
            if m:
                break
        else:
            unmatched.append(f"{key} (not a LoRA key this checker knows)")
            continue
        component = COMPONENT[m.group(1)]
        names = live_names.get(component)
        if names is None:
            unmatched.append(f"{key} (the pipeline has no {component})")
            continue
        mod = m.group(2)
        live = names.get(mod) or names.get(mod.removeprefix("text_model.")) or names.get(mod.removeprefix("text_model_"))
        if live is None:
            unmatched.append(f"{key} (no module {mod!r} in the {component})")
            continue
        modules.setdefault((component, live), {})[what] = t
    return modules, unmatched


def name_table(model, component: str) -> dict[str, str]:
    table = {}
    sgm = None
    if component == "unet" and getattr(model.config, "addition_embed_type", None) == "text_time":
        # SDXL kohya files name the UNet's modules by their sgm address.
        up_attention = [hasattr(b, "attentions") for b in model.up_blocks]
        sgm = lambda name: lr.sgm_unet_name(name, model.config.layers_per_block, up_attention)  # noqa: E731
    for name, m in model.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        table[name] = name
        table[name.replace(".", "_")] = name
        if sgm is not None and (address := sgm(name)) is not None:
            table[address.replace(".", "_")] = name
        if component != "unet":
            canon = lr.te_canonical_name(model, name)
            table[canon] = name
            table[canon.replace(".", "_")] = name
    return table


@torch.no_grad()
def outputs(pipe, components) -> dict[str, torch.Tensor]:
    """Each component's output on fixed inputs (UNet: noise + text context, with SDXL's pooled
    embedding and time ids; text encoders: a fixed id row)."""
    g = torch.Generator().manual_seed(0)
    unet = pipe.unet
    out = {}
    for c in ("text_encoder", "text_encoder_2"):
        if c in components:
            cfg = components[c].config
            words = [(17 * i + 5) % (cfg.vocab_size - 2) for i in range(10)]
            ids = torch.tensor([[cfg.bos_token_id] + words + [cfg.eos_token_id] * 66])
            out[c] = components[c](ids, output_hidden_states=True).hidden_states[-2].double()
    side = unet.config.sample_size if isinstance(unet.config.sample_size, int) else 8
    sample = torch.randn(1, unet.config.in_channels, side, side, generator=g)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    out["unet"] = unet(sample, torch.tensor([500]), context, **kwargs).sample.double()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", type=Path, help="LoRA .safetensors file")
    ap.add_argument(
        "--model", default="tests/fixtures/sd1_tiny", help="diffusers model folder, or builtin:tiny-sdxl"
    )
    ap.add_argument("--tol", type=float, default=1e-6, help="max relative error of scaling·B·A (f64)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args()

    report: dict[str, object] = {"file": str(args.file), "model": str(args.model), "problems": []}
    problems: list[str] = report["problems"]  # type: ignore[assignment]
    try:
        tensors, metadata = read_file(args.file)
        report["tensors"] = len(tensors)
        report["dtypes"] = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
        pipe = lr.load_pipeline(args.model)
        components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
        if getattr(pipe, "text_encoder_2", None) is not None:
            components["text_encoder_2"] = pipe.text_encoder_2
        live_names = {c: name_table(m, c) for c, m in components.items()}
        file_modules, unmatched = group_modules(tensors, live_names)
        problems += [f"unmatched key: {u}" for u in unmatched]
        for (c, name), parts in sorted(file_modules.items()):
            if "down" not in parts or "up" not in parts:
                problems.append(f"{c} {name}: has {sorted(parts)}, needs both down and up")

        before = outputs(pipe, components)
        with lr.capture_warnings() as records:
            pipe.load_lora_weights(str(args.file.parent), weight_name=args.file.name, adapter_name="check")
        after = outputs(pipe, components)
        changed = {}
        for c in components:
            if any(fc == c for (fc, _) in file_modules):
                diff = (after[c] - before[c]).abs().max().item()
                changed[c] = diff
                if not diff > 0:
                    problems.append(f"{c}: the LoRA does not change its output")
        report["output_change"] = changed
        report["warnings"] = list(records)
        problems += [f"warning while loading: {r}" for r in records]

        counts, worst = {}, {}
        for c, model in components.items():
            layers = lr.attached_lora_layers(model)
            counts[c] = {"attached": len(layers), "in_file": sum(1 for (fc, _) in file_modules if fc == c)}
            want = {name: parts for (fc, name), parts in file_modules.items() if fc == c}
            for name in sorted(set(want) - set(layers)):
                problems.append(f"{c} {name}: in the file but not attached by diffusers (leftover)")
            for name in sorted(set(layers) - set(want)):
                problems.append(f"{c} {name}: attached by diffusers but not in the file")
            w = 0.0
            for name in sorted(set(want) & set(layers)):
                parts = want[name]
                if "down" not in parts or "up" not in parts:
                    continue
                down, up = parts["down"].double(), parts["up"].double()
                rank = down.shape[0]
                scale = parts["alpha"].double().item() / rank if "alpha" in parts else 1.0
                ours = scale * (up.flatten(1) @ down.flatten(1))
                theirs = lr.effective_delta(layers[name], "check")
                if theirs.shape != ours.shape:
                    problems.append(f"{c} {name}: attached delta {tuple(theirs.shape)} vs file {tuple(ours.shape)}")
                    continue
                den = max(ours.abs().max().item(), 1e-30)
                err = (theirs - ours).abs().max().item() / den
                w = max(w, err)
                if err > args.tol:
                    problems.append(f"{c} {name}: scaling·B·A differs from the file's (alpha/rank)·up·down by {err:.2e}")
            worst[c] = w
        report["modules"] = counts
        report["max_rel_err_delta"] = worst
        report["metadata_keys"] = len(metadata)
    except Exception as e:  # noqa: BLE001 — report any failure as a failed check
        problems.append(f"error: {type(e).__name__}: {e}")
        report["traceback"] = traceback.format_exc()

    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"file: {args.file} ({report.get('tensors', '?')} tensors, dtypes {report.get('dtypes', '?')})")
        for c, n in (report.get("modules") or {}).items():
            change = (report.get("output_change") or {}).get(c)
            print(
                f"{c}: {n['attached']} LoRA modules attached by diffusers, {n['in_file']} in the file; "
                f"max rel err of scaling·B·A {report['max_rel_err_delta'][c]:.1e}"
                + (f"; output changed by up to {change:.2e}" if change is not None else "")
            )
        if problems:
            print(f"PROBLEMS ({len(problems)}):")
            for p in problems:
                print(f"  {p}")
            if "traceback" in report:
                print(report["traceback"])
        else:
            print("OK: no warnings, no leftover keys, every module attached with the file's weights")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
