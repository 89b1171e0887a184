#!/usr/bin/env python3
"""Regenerate the LoRA parity fixtures in tests/fixtures/lora/ from the Python reference.

How to run (from the repository root, after tools/make_fixtures.py; nothing is downloaded):

    ~/.cache/sd-lora-venv/bin/pip install -r tools/requirements.txt
    HF_HUB_OFFLINE=1 ~/.cache/sd-lora-venv/bin/python tools/make_lora_fixtures.py

What it writes (tests/fixtures/lora/README.md documents every file and tensor):
  sd1_lora_kohya.safetensors      a random rank-4 / alpha-2 LoRA on sd1_tiny, kohya names, f32
  sd1_lora_peft.safetensors       the same LoRA, diffusers/PEFT names, alpha/rank folded into up (B)
  sd1_lora_reference.safetensors  inputs, outputs with the LoRA at multiplier 1 and 0.5, and the
                                  gradient of a denoising loss w.r.t. every LoRA tensor

Why random non-zero weights: a freshly initialised LoRA has up = 0, so "the LoRA does nothing"
would pass every parity test. Here both down and up are random, alpha (2) != rank (4), so a
missing LoRA, a forgotten alpha/rank scale or a wrong multiplier all change the outputs.

What it checks before writing anything:
  * both files load with diffusers' `pipe.load_lora_weights(dir, weight_name=...)` without a
    single warning (unexpected/missing keys are logged as warnings by diffusers/peft), attach
    exactly the modules of the LoRA (192 UNet + 18 text encoder), and every attached layer's
    scaling·B·A equals our multiplier·(alpha/rank)·up·down;
  * UNet and text-encoder outputs of the two loaded pipelines equal each other and a manual
    peft injection (`LoraConfig(r=4, lora_alpha=2)`) with the same tensors (f32, <= 1e-5);
  * the gradient reference (computed in float64) agrees with a float32 computation and no
    gradient tensor is all zero.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lora_reference as lr  # noqa: E402  (sets the offline environment variables first)
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)  # same summation order on every machine

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "tests" / "fixtures" / "sd1_tiny"
BASE_REFERENCE = REPO / "tests" / "fixtures" / "reference" / "sd1_tiny.safetensors"

RANK = 4
ALPHA = 2.0
SEED = 4242
# down ~ N(0, (GAIN/sqrt(fan_in))^2), up ~ N(0, (GAIN/sqrt(rank))^2): the LoRA delta is then
# about GAIN^2 * alpha/rank = 12.5 % of a base layer's output — far above f32 noise, small
# enough that the tiny models stay in their normal range.
GAIN = 0.5
TARGET_SEED = 4343

# Same-model outputs through different loaders must agree to float32 rounding.
SAME_TOL = 1e-5


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    a, b = a.double(), b.double()
    den = b.abs().max().item()
    num = (a - b).abs().max().item()
    return 0.0 if num == 0 else num / max(den, 1e-30)


# ---------------------------------------------------------------------------------------------
# The LoRA
# ---------------------------------------------------------------------------------------------


def make_lora(unet, te) -> dict[tuple[str, str], dict]:
    """(component, path) -> {down, up, alpha, kind}; random down AND up, fixed seed, model order."""
    targets = lr.kohya_default_targets(unet, te)
    g = torch.Generator().manual_seed(SEED)
    lora = {}
    for component, model in (("unet", unet), ("text_encoder", te)):
        for path in targets[component]:
            live = path if component == "unet" else lr.te_live_name(te, path)
            m = model.get_submodule(live)
            if isinstance(m, torch.nn.Conv2d):
                cin, cout, kh, kw = m.in_channels, m.out_channels, *m.kernel_size
                down_shape, up_shape = (RANK, cin, kh, kw), (cout, RANK, 1, 1)
                fan_in = cin * kh * kw
                kind = "conv2d_1x1"
            else:
                down_shape, up_shape = (RANK, m.in_features), (m.out_features, RANK)
                fan_in = m.in_features
                kind = "linear"
            down = torch.randn(down_shape, generator=g) * (GAIN / math.sqrt(fan_in))
            up = torch.randn(up_shape, generator=g) * (GAIN / math.sqrt(RANK))
            lora[(component, path)] = dict(down=down, up=up, alpha=ALPHA, kind=kind)
    return lora


def kohya_state_dict(lora) -> dict[str, torch.Tensor]:
    sd = {}
    for (component, path), mod in lora.items():
        name = lr.kohya_name(component, path)
        sd[f"{name}.lora_down.weight"] = mod["down"].float().contiguous()
        sd[f"{name}.lora_up.weight"] = mod["up"].float().contiguous()
        # kohya stores alpha as a 0-dim tensor.
        sd[f"{name}.alpha"] = torch.tensor(mod["alpha"], dtype=torch.float32)
    return sd


def peft_state_dict(lora) -> dict[str, torch.Tensor]:
    """PEFT has no alpha (diffusers then uses lora_alpha = r): fold alpha/rank into B."""
    sd = {}
    for (component, path), mod in lora.items():
        name = lr.PEFT_PREFIX[component] + path
        sd[f"{name}.lora_A.weight"] = mod["down"].float().contiguous()
        sd[f"{name}.lora_B.weight"] = (mod["up"] * (mod["alpha"] / RANK)).float().contiguous()
    return sd


KOHYA_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": str(RANK),
    "ss_network_alpha": str(ALPHA),
    "ss_base_model_version": "sd_v1",
    "ss_v2": "False",
    "sd_lora_fixture": "random non-zero test LoRA for tests/fixtures/sd1_tiny, see tests/fixtures/lora/README.md",
}


def save_sorted(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors with keys AND metadata sorted: safetensors' own writer keeps metadata in a
    hash map, so a file with several metadata entries would differ from run to run."""
    dtypes = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        data = t.numpy().tobytes()  # little-endian on every machine we run on
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in blobs:
            f.write(b)
    back = load_file(path)
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors), path


# ---------------------------------------------------------------------------------------------
# Models with the LoRA
# ---------------------------------------------------------------------------------------------


def load_base(dtype=torch.float32):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(MODEL / "unet").eval().to(dtype)
    te = CLIPTextModel.from_pretrained(MODEL / "text_encoder").eval().to(dtype)
    return unet, te


def manual_injection(lora, dtype=torch.float32, multiplier: float = 1.0):
    """Base models + peft LoraConfig(r=4, lora_alpha=2) injected by hand with our tensors
    (lora_A = down, lora_B = multiplier · up), independent of diffusers' LoRA loader."""
    from peft import LoraConfig, inject_adapter_in_model

    unet, te = load_base(dtype)
    for component, model in (("unet", unet), ("text_encoder", te)):
        paths = {p: m for (c, p), m in lora.items() if c == component}
        live = {(p if component == "unet" else lr.te_live_name(te, p)): m for p, m in paths.items()}
        # Exact names, so nothing but our modules matches (peft matches `name == key` or suffix).
        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(live), lora_dropout=0.0, init_lora_weights=False)
        inject_adapter_in_model(cfg, model, adapter_name="default")
        layers = lr.attached_lora_layers(model)
        assert sorted(layers) == sorted(live), (component, sorted(set(layers) ^ set(live))[:5])
        with torch.no_grad():
            for name, mod in live.items():
                layer = layers[name]
                assert abs(layer.scaling["default"] - ALPHA / RANK) < 1e-12
                layer.lora_A["default"].weight.copy_(mod["down"].to(dtype))
                layer.lora_B["default"].weight.copy_((multiplier * mod["up"]).to(dtype))
    for p in list(unet.parameters()) + list(te.parameters()):
        p.requires_grad_(False)
    return unet, te, layers_by_kohya(unet, te, lora)


def layers_by_kohya(unet, te, lora) -> dict[str, object]:
    out = {}
    ul, tl = lr.attached_lora_layers(unet), lr.attached_lora_layers(te)
    for component, path in lora:
        if component == "unet":
            out[lr.kohya_name(component, path)] = ul[path]
        else:
            out[lr.kohya_name(component, path)] = tl[lr.te_live_name(te, path)]
    return out


@torch.no_grad()
def forward_all(unet, te, inp, dtype=torch.float32) -> dict[str, torch.Tensor]:
    r = {}
    r["text_encoder.last_hidden_state"] = te(input_ids=inp["text_encoder.input_ids"]).last_hidden_state
    for key in ("unet", "unet_hw"):
        r[f"{key}.out"] = unet(
            inp[f"{key}.sample"].to(dtype),
            inp[f"{key}.timesteps"],
            encoder_hidden_states=inp[f"{key}.encoder_hidden_states"].to(dtype),
        ).sample
    return {k: v.float() for k, v in r.items()}


def check_diffusers_load(out_dir: Path, weight_name: str, lora) -> tuple[dict, dict, dict]:
    """Load one of our files with diffusers; assert no warning, exactly our modules, same deltas.
    Returns (outputs at multiplier 1, outputs at multiplier 0.5, module counts)."""
    pipe = lr.load_pipeline(MODEL)
    with lr.capture_warnings() as records:
        pipe.load_lora_weights(str(out_dir), weight_name=weight_name, adapter_name="fixture")
    assert not records, f"{weight_name}: diffusers warned while loading:\n" + "\n".join(records)

    counts = {}
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        layers = lr.attached_lora_layers(model)
        want = {
            (p if component == "unet" else lr.te_live_name(model, p)): m for (c, p), m in lora.items() if c == component
        }
        missing, extra = sorted(set(want) - set(layers)), sorted(set(layers) - set(want))
        assert not missing and not extra, f"{weight_name} {component}: not attached {missing[:5]}, extra {extra[:5]}"
        worst = 0.0
        for name, mod in want.items():
            ours = (mod["alpha"] / RANK) * (mod["up"].double().flatten(1) @ mod["down"].double().flatten(1))
            worst = max(worst, max_rel(lr.effective_delta(layers[name], "fixture"), ours))
        assert worst < 1e-6, f"{weight_name} {component}: scaling*B*A differs from ours by {worst:.2e}"
        counts[component] = len(layers)
        print(f"  {weight_name}: {component}: {len(layers)} LoRA modules attached, scaling·B·A max rel err {worst:.1e}")

    inp = load_inputs()
    out1 = forward_all(pipe.unet, pipe.text_encoder, inp)
    with lr.capture_warnings() as records:
        pipe.set_adapters(["fixture"], adapter_weights=[0.5])
    assert not records, records
    out05 = forward_all(pipe.unet, pipe.text_encoder, inp)
    return out1, out05, counts


def load_inputs() -> dict[str, torch.Tensor]:
    base = load_file(BASE_REFERENCE)
    keys = ["text_encoder.input_ids"] + [
        f"{k}.{t}" for k in ("unet", "unet_hw") for t in ("sample", "timesteps", "encoder_hidden_states")
    ]
    return {k: base[k] for k in keys}


# ---------------------------------------------------------------------------------------------
# Gradient reference
# ---------------------------------------------------------------------------------------------


def denoising_grads(lora, dtype, inp, target, sample_key: str = "unet_hw"):
    """loss = mse(unet(sample, t, te(ids).last_hidden_state), target) (mean over all elements);
    returns (loss, {kohya name.lora_down.weight|lora_up.weight: grad}, te output, unet output)."""
    unet, te, layers = manual_injection(lora, dtype)
    params = {}
    for kname, layer in layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a.requires_grad_(True)
        b.requires_grad_(True)
        params[f"{kname}.lora_down.weight"] = a
        params[f"{kname}.lora_up.weight"] = b
    hidden = te(input_ids=inp["text_encoder.input_ids"]).last_hidden_state
    out = unet(
        inp[f"{sample_key}.sample"].to(dtype), inp[f"{sample_key}.timesteps"], encoder_hidden_states=hidden
    ).sample
    loss = torch.nn.functional.mse_loss(out, target.to(dtype))
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in params.items()}
    return loss.detach(), grads, hidden.detach(), out.detach()


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "lora")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    import diffusers
    import peft
    import transformers

    versions = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    print("versions:", versions)

    unet, te = load_base()
    lora = make_lora(unet, te)
    n_unet = sum(1 for c, _ in lora if c == "unet")
    n_te = sum(1 for c, _ in lora if c == "text_encoder")
    print(f"LoRA: {n_unet} UNet modules, {n_te} text-encoder modules, rank {RANK}, alpha {ALPHA}")

    kohya = kohya_state_dict(lora)
    peft_sd = peft_state_dict(lora)
    save_sorted(kohya, out / "sd1_lora_kohya.safetensors", KOHYA_METADATA)
    save_sorted(peft_sd, out / "sd1_lora_peft.safetensors", {"format": "pt"})

    # ---- diffusers loads both files identically, with no leftover key -------------------
    inp = load_inputs()
    res = {}
    for fname in ("sd1_lora_kohya.safetensors", "sd1_lora_peft.safetensors"):
        res[fname] = check_diffusers_load(out, fname, lora)
    k1, k05, counts = res["sd1_lora_kohya.safetensors"]
    p1, p05, pcounts = res["sd1_lora_peft.safetensors"]
    assert counts == pcounts == {"unet": n_unet, "text_encoder": n_te}, (counts, pcounts)

    m_unet, m_te, _ = manual_injection(lora)
    man1 = forward_all(m_unet, m_te, inp)
    m_unet, m_te, _ = manual_injection(lora, multiplier=0.5)
    man05 = forward_all(m_unet, m_te, inp)
    base = load_file(BASE_REFERENCE)
    errors = {}
    for key in man1:
        errors[f"kohya vs peft file, mult 1, {key}"] = max_rel(k1[key], p1[key])
        errors[f"kohya vs peft file, mult 0.5, {key}"] = max_rel(k05[key], p05[key])
        errors[f"kohya file vs manual, mult 1, {key}"] = max_rel(k1[key], man1[key])
        errors[f"kohya file vs manual, mult 0.5, {key}"] = max_rel(k05[key], man05[key])
    for name, e in errors.items():
        print(f"  {name}: max rel err {e:.1e}")
        assert e <= SAME_TOL, name
    # The LoRA really changes the outputs (relative to the output's max abs value).
    effect = {}
    for key in man1:
        effect[f"{key} (mult 1 vs no LoRA)"] = max_rel(k1[key], base[key])
        effect[f"{key} (mult 0.5 vs no LoRA)"] = max_rel(k05[key], base[key])
    for name, e in effect.items():
        print(f"  LoRA effect {name}: {e:.3f}")
        assert e > 1e-2, name

    ref: dict[str, torch.Tensor] = {}
    for k, v in inp.items():
        ref[f"inputs.{k}"] = v
    for k, v in k1.items():
        ref[f"mult_1.{k}"] = v
    for k, v in k05.items():
        ref[f"mult_0_5.{k}"] = v

    # ---- gradient reference (float64), cross-checked in float32 ---------------------------
    g = torch.Generator().manual_seed(TARGET_SEED)
    target = torch.randn(inp["unet_hw.sample"].shape, generator=g)
    loss64, grads64, hidden64, out64 = denoising_grads(lora, torch.float64, inp, target)
    loss32, grads32, _, _ = denoising_grads(lora, torch.float32, inp, target)
    assert len(grads64) == 2 * len(lora)
    norms = {k: v.norm().item() for k, v in grads64.items()}
    # "Zero" = below 1e-9 of the largest norm: a cut path leaves f64 rounding noise (~1e-20),
    # not an exact 0 (see the 8x8 check below).
    zero = [k for k, n in norms.items() if n < 1e-9 * max(norms.values())]
    assert not zero, f"(almost) all-zero gradients: {zero}"
    f32_err = {k: max_rel(grads32[k], grads64[k]) for k in grads64}
    worst_f32 = max(f32_err, key=f32_err.get)
    kmin, kmax = min(norms, key=norms.get), max(norms, key=norms.get)
    print(f"  loss f64 {loss64.item():.12f}, f32 {loss32.item():.9f}")
    print(f"  grad norms: min {norms[kmin]:.3e} ({kmin}), max {norms[kmax]:.3e} ({kmax})")
    print(f"  f32 vs f64 gradients: worst max rel err {f32_err[worst_f32]:.2e} ({worst_f32})")
    # With the 8x8 latent the mid block sees 1x1: self-attention over ONE token, whose softmax
    # is 1 whatever q and k are, so those gradients are zero up to rounding. Show it (hence the
    # 16x24 unet_hw latent for the gradient reference).
    _, grads_sq, _, _ = denoising_grads(
        lora, torch.float64, inp, torch.randn(inp["unet.sample"].shape, generator=g), sample_key="unet"
    )
    norms_sq = {k: v.norm().item() for k, v in grads_sq.items()}
    zero_sq = sorted(k for k, n in norms_sq.items() if n < 1e-9 * max(norms_sq.values()))
    print(f"  with the 8x8 latent, (almost) zero gradients: {[(k, norms_sq[k]) for k in zero_sq]}")
    assert len(zero_sq) == 4 and all("mid_block" in k and ("to_q" in k or "to_k" in k) for k in zero_sq)

    ref["grad.target"] = target
    ref["grad.loss"] = loss64.float()
    ref["grad.text_encoder.last_hidden_state"] = hidden64.float()
    ref["grad.unet.out"] = out64.float()
    for k, v in grads64.items():
        ref[f"grad.{k}"] = v.float()
    ref = {k: v.detach().contiguous() for k, v in ref.items()}
    save_sorted(ref, out / "sd1_lora_reference.safetensors", {"grad.loss.f64": repr(loss64.item())})

    summary = {
        "versions": versions,
        "rank": RANK,
        "alpha": ALPHA,
        "modules": {"unet": n_unet, "text_encoder": n_te},
        "diffusers_attached": counts,
        "same_model_errors": errors,
        "lora_effect": effect,
        "loss_f64": loss64.item(),
        "grad_norm_min": [kmin, norms[kmin]],
        "grad_norm_max": [kmax, norms[kmax]],
        "grad_f32_vs_f64_worst": [worst_f32, f32_err[worst_f32]],
        "zero_grads_with_8x8_latent": zero_sq,
        "sizes": {p.name: p.stat().st_size for p in sorted(out.glob("*.safetensors"))},
    }
    print(json.dumps(summary["sizes"]))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
