#!/usr/bin/env bash
# Runs `sd-lora bench` and the PyTorch reference (tools/bench_reference.py) with the same
# settings on this machine, one after the other, and prints both figures and the ratios
# (time ours/ref, peak memory ours/ref). See docs/performance.md.
#
# Usage:
#   tools/bench_compare.sh --train --model SD15_FOLDER --data IMAGES [--resolution N] [--steps N]
#                          [--warmup N] [--rank N] [--alpha X] [--preset kohya|attention|conv]
#                          [--checkpointing] [--seed N]
#       the `train` command with its defaults against diffusers + peft doing the same
#       (tools/bench_train_reference.py): load, latent caching, steady step, peak RSS
#   tools/bench_compare.sh --vae --model SD15_FOLDER [--resolution N] [--repeat N]
#       one VAE encode and decode against diffusers' AutoencoderKL
#   tools/bench_compare.sh [--resolution N] [--steps N] [--warmup N] [--precision f32|f16|bf16]
#                          [--checkpointing] [--device cpu|cuda|cuda:N] [--rank N] [--seed N]
#       the UNet training step alone on random weights built in memory (no files)
#
# Environment:
#   SD_LORA_BIN   the sd-lora binary to use (default: $CARGO_TARGET_DIR/release/sd-lora, else
#                 target/release/sd-lora; built with `cargo build --release -p sd-lora` when
#                 missing — add `--features cuda` yourself for a GPU build)
#   PYTHON        the Python with torch + diffusers + peft (default: ~/.cache/sd-lora-venv if
#                 present, else python3)
#   KEEP_JSON     a folder to keep both JSON reports in (default: a temporary folder, removed)
#
# Always exits 0 when both runs produced a report (the ratios are information, not a test).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

args=()       # both sides
ours_only=()  # sd-lora's spelling of an option the reference takes otherwise
ref_only=()
mode=unet
while [[ $# -gt 0 ]]; do
    case "$1" in
        --resolution|--steps|--warmup|--precision|--device|--rank|--seed|--model|--data|--repeat)
            [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
            args+=("$1" "$2"); shift 2 ;;
        --alpha|--preset)
            [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
            key=network.${1#--}
            [[ $1 == --preset ]] && val="\"$2\"" || val=$2
            ours_only+=(--set "$key=$val"); ref_only+=("$1" "$2"); shift 2 ;;
        --checkpointing)
            args+=("$1"); shift ;;
        --train|--vae)
            mode=${1#--}; args+=("$1"); shift ;;
        -h|--help)
            sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *)
            echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# The binary.
if [[ -z "${SD_LORA_BIN:-}" ]]; then
    target="${CARGO_TARGET_DIR:-$root/target}"
    SD_LORA_BIN="$target/release/sd-lora"
    if [[ ! -x "$SD_LORA_BIN" ]]; then
        echo "building $SD_LORA_BIN (cargo build --release -p sd-lora) …" >&2
        (cd "$root" && cargo build --release -p sd-lora >&2)
    fi
fi
[[ -x "$SD_LORA_BIN" ]] || { echo "error: $SD_LORA_BIN is not an executable; set SD_LORA_BIN" >&2; exit 1; }

# The Python.
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$HOME/.cache/sd-lora-venv/bin/python" ]]; then
        PYTHON="$HOME/.cache/sd-lora-venv/bin/python"
    else
        PYTHON=python3
    fi
fi

if [[ -n "${KEEP_JSON:-}" ]]; then
    out="$KEEP_JSON"; mkdir -p "$out"
else
    out="$(mktemp -d)"; trap 'rm -rf "$out"' EXIT
fi

# Both sides read the model files from the page cache: a cold first read would
# time the disk, and only for whichever side runs first.
for ((i = 0; i < ${#args[@]}; i++)); do
    if [[ ${args[i]} == --model && -e ${args[i + 1]} ]]; then
        echo "== reading ${args[i + 1]} once so that both sides load from the page cache" >&2
        find "${args[i + 1]}" -type f -name '*.safetensors' -exec cat {} + > /dev/null
    fi
done

reference="$here/bench_reference.py"
[[ $mode == unet ]] || reference="$here/bench_train_reference.py"
echo "== sd-lora: $SD_LORA_BIN bench ${args[*]:-} ${ours_only[*]:-} --json" >&2
"$SD_LORA_BIN" bench "${args[@]}" "${ours_only[@]}" --json > "$out/ours.json"
echo "== pytorch: $PYTHON $reference ${args[*]:-} ${ref_only[*]:-} --json" >&2
HF_HUB_OFFLINE=1 "$PYTHON" "$reference" "${args[@]}" "${ref_only[@]}" --json > "$out/ref.json"

if [[ $mode != unet ]]; then
    "$PYTHON" "$here/bench_table.py" "$out/ours.json" "$out/ref.json"
    exit 0
fi

"$PYTHON" - "$out/ours.json" "$out/ref.json" <<'EOF'
import json, statistics, sys

ours = json.load(open(sys.argv[1]))
ref = json.load(open(sys.argv[2]))

# Both GFLOP/s figures use sd-lora's nominal FLOP count, so they differ only by time.
flop = ours["flop_per_step"]


def mem(r):
    # Peak device memory on a GPU, peak RSS on the CPU.
    return r["peak_device_bytes"] if r.get("peak_device_bytes") is not None else r["peak_rss_bytes"]


mem_kind = "device" if ours.get("peak_device_bytes") is not None else "RSS"


def gb(b):
    return "-" if b is None else f"{b / 1e9:.2f} GB"


def medf(xs):
    return statistics.median(xs) if xs else None


def med(xs):
    return "-" if not xs else f"{statistics.median(xs):.3f}"


def ratio(a, b):
    return "-" if not a or not b else f"{a / b:.2f}"


print(
    f"sd15-unet {ours['resolution']} px (latent {ours['latent']}), {ours['precision']} storage, "
    f"checkpointing {'on' if ours['checkpointing'] else 'off'}, rank {ours['rank']}, {ours['device']}, "
    f"{ours['warmup']} warm-up + {ours['steps']} timed steps"
)
rows = [
    ("", "sd-lora", "pytorch", "ours/ref"),
    ("median step (s)", f"{ours['median_step_s']:.3f}", f"{ref['median_step_s']:.3f}",
     ratio(ours["median_step_s"], ref["median_step_s"])),
    ("fastest step (s)", f"{min(ours['step_s']):.3f}", f"{min(ref['step_s']):.3f}",
     ratio(min(ours["step_s"]), min(ref["step_s"]))),
    ("median CPU s/step", med(ours.get("step_cpu_s")), med(ref.get("step_cpu_s")),
     ratio(medf(ours.get("step_cpu_s")), medf(ref.get("step_cpu_s")))),
    (f"peak {mem_kind}", gb(mem(ours)), gb(mem(ref)), ratio(mem(ours), mem(ref))),
    ("GFLOP/s (nominal)", f"{flop / ours['median_step_s'] / 1e9:.1f}",
     f"{flop / ref['median_step_s'] / 1e9:.1f}", ""),
    ("FLOP/step counted (G)", f"{ours['flop_per_step'] / 1e9:.1f}",
     "-" if ref.get("flop_per_step") is None else f"{ref['flop_per_step'] / 1e9:.1f}", ""),
    *[(f"  {k.removesuffix('_s')} (s)", f"{ours['phases'][k]:.3f}", f"{ref['phases'][k]:.3f}",
       ratio(ours["phases"][k], ref["phases"][k])) for k in ("forward_s", "backward_s", "optimizer_s")],
    ("threads", str(ours["threads"]), str(ref["threads"]), ""),
    ("LoRA params", str(ours["lora_params"]), str(ref["lora_params"]), ""),
    ("frozen params", str(ours["frozen_params"]), str(ref["frozen_params"]), ""),
    ("build (s)", f"{ours['build_s']:.1f}", f"{ref['build_s']:.1f}", ""),
]
if ours.get("peak_device_bytes") is not None:
    rows.append(("pytorch allocated", "", gb(ref.get("peak_device_allocated_bytes")), ""))
    rows.append(("peak RSS", gb(ours["peak_rss_bytes"]), gb(ref["peak_rss_bytes"]),
                 ratio(ours["peak_rss_bytes"], ref["peak_rss_bytes"])))
w = [max(len(r[i]) for r in rows) for i in range(4)]
for r in rows:
    print("  " + "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))
print(f"  step times (s): sd-lora {[round(s, 3) for s in ours['step_s']]}, "
      f"pytorch {[round(s, 3) for s in ref['step_s']]}")
EOF
