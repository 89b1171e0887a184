#!/usr/bin/env bash
# The prepared check for a machine with an NVIDIA GPU: runs the CUDA build of
# the parity tests and `sd-lora bench` there, and the PyTorch reference if it
# can. It builds nothing: the binaries are built elsewhere (`--prepare`, with
# tools/cuda_toolkit.sh; see docs/cuda.md) and carried in .gpu/bin.tar.xz.
#
#   tools/gpu_check.sh --prepare   # here: build, strip, pack into .gpu/bin.tar.xz
#   tools/gpu_check.sh             # there, from the repository root
#
# Everything it prints goes to $OUT/gpu_check.log as well; bench results (one
# JSON object a line, ours with "impl":"sd-lora", the reference's with
# "impl":"pytorch") to $OUT/gpu_bench.jsonl. Each step has its own timeout and
# the script skips what no longer fits in its overall budget (GPU_CHECK_BUDGET_S,
# default 450 s), so it always ends and always leaves its log.
#
# Settings: GPU_CHECK_RESOLUTION (512), GPU_CHECK_STEPS (10), GPU_CHECK_WARMUP (2),
# GPU_CHECK_TEST_TIMEOUT_S (60), GPU_CHECK_BENCH_TIMEOUT_S (90),
# GPU_CHECK_SKIP_TESTS=1, GPU_CHECK_SKIP_REFERENCE=1, GPU_CHECK_SKIP_BENCH=1,
# GPU_CHECK_TESTS="lora_parity ..." (a subset of the parity tests).
set -uo pipefail

cd "$(dirname "$0")/.."
REPO="$PWD"
BIN="$REPO/.gpu"
TESTS=(unet_parity vae_parity clip_text_encoder lora_parity sampling_trajectories)
# On the GPU machine, GPU_CHECK_TESTS="lora_parity" runs only those tests.
[[ "${1:-}" != "--prepare" && -n "${GPU_CHECK_TESTS:-}" ]] && read -r -a TESTS <<<"$GPU_CHECK_TESTS"

if [[ "${1:-}" == "--prepare" ]]; then
	# Build the CUDA binaries with the pip-wheel toolkit, strip them and pack
	# them into .gpu/bin.tar.xz (ignored by git; carried to the GPU machine).
	# Packed because each binary embeds the same ~11 MB of candle's PTX: xz's
	# large window stores it once, which keeps the six binaries far below the
	# size a copy of the repository may have.
	set -e
	eval "$(tools/cuda_toolkit.sh)"
	export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sd-lora-target-cuda}"
	cargo build --release --features cuda -p sd-lora
	args=()
	for t in "${TESTS[@]}"; do args+=(--test "$t"); done
	cargo test --release --features cuda -p sd-lora-model --no-run "${args[@]}" \
		--message-format=json >"$CARGO_TARGET_DIR/gpu_tests.json"
	stage="$(mktemp -d)"
	strip -o "$stage/sd-lora" "$CARGO_TARGET_DIR/release/sd-lora"
	for t in "${TESTS[@]}"; do
		exe="$(python3 -c '
import json, sys
name = sys.argv[1]
for line in open(sys.argv[2]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name and m["target"]["kind"] == ["test"]:
        print(m["executable"])
' "$t" "$CARGO_TARGET_DIR/gpu_tests.json" | tail -1)"
		[[ -n "$exe" ]] || {
			echo "no executable for test $t" >&2
			exit 1
		}
		strip -o "$stage/$t" "$exe"
	done
	ls -la "$stage"
	rm -rf "$BIN" && mkdir -p "$BIN"
	tar -C "$stage" -cf - . | xz -9e --lzma2=dict=192MiB -T1 >"$BIN/bin.tar.xz"
	rm -rf "$stage"
	# The test binaries find their fixtures under this checkout's path.
	echo "$REPO" >"$BIN/source_path"
	ls -la "$BIN"
	exit 0
fi

OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
JSONL="$OUT/gpu_bench.jsonl"
: >"$JSONL"
exec > >(tee -a "$LOG") 2>&1

BUDGET="${GPU_CHECK_BUDGET_S:-450}"
RES="${GPU_CHECK_RESOLUTION:-512}"
STEPS="${GPU_CHECK_STEPS:-10}"
WARMUP="${GPU_CHECK_WARMUP:-2}"
T0=$(date +%s)
elapsed() { echo $(($(date +%s) - T0)); }
step() { echo; echo "=== [$(elapsed)s] $*"; }
# fits SECONDS: true when a step of at most SECONDS still fits in the budget.
fits() {
	if (($(elapsed) + $1 > BUDGET)); then
		echo "--- skipped: needs up to $1 s, $((BUDGET - $(elapsed))) s of the budget left"
		return 1
	fi
}

step "machine"
date -u
nvidia-smi || echo "nvidia-smi failed"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>/dev/null
if [[ -f "$BIN/bin.tar.xz" ]]; then
	# Unpack the carried binaries (python3's lzma in case xz is missing).
	mkdir -p /tmp/sd-lora-gpu-bin
	python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
		"$BIN/bin.tar.xz" /tmp/sd-lora-gpu-bin || tar -C /tmp/sd-lora-gpu-bin -xJf "$BIN/bin.tar.xz"
	BIN=/tmp/sd-lora-gpu-bin
fi
ls -la "$BIN" 2>/dev/null && [[ -x "$BIN/sd-lora" ]] || {
	echo "no binaries in $BIN: run tools/gpu_check.sh --prepare on the build machine and carry .gpu"
	exit 1
}

step "CUDA libraries"
# The binaries need libcuda.so.1 (the driver's), and libcudart/libcublas/
# libcublasLt/libcurand/libnvrtc of CUDA 13. Find whatever ldd cannot, in the
# driver's folders, python3's nvidia-* wheels (PyTorch's) and /usr/local/cuda*.
roots=(/usr/local/nvidia /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda /usr/local/cuda-13*)
if command -v python3 >/dev/null; then
	while IFS= read -r d; do roots+=("$d"); done < <(python3 -c '
import site, sys
for p in site.getsitepackages() + [site.getusersitepackages()]:
    print(p + "/nvidia")
' 2>/dev/null)
fi
libdirs=()
for lib in $(ldd "$BIN/sd-lora" | awk '/not found/ {print $1}'); do
	found=""
	while IFS= read -r f; do
		# 64-bit ELF only (driver folders also hold 32-bit copies).
		if [[ "$(od -An -tx1 -j4 -N1 "$f" 2>/dev/null | tr -d ' ')" == 02 ]]; then
			found="$f"
			break
		fi
	done < <(find -L "${roots[@]}" -name "$lib" -type f 2>/dev/null | grep -v /stubs/)
	if [[ -n "$found" ]]; then
		echo "$lib -> $found"
		libdirs+=("$(dirname "$found")")
	else
		echo "$lib: NOT FOUND under ${roots[*]}"
	fi
done
if ((${#libdirs[@]})); then
	extra="$(printf '%s\n' "${libdirs[@]}" | awk '!seen[$0]++' | paste -sd:)"
	export LD_LIBRARY_PATH="$extra${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
ldd "$BIN/sd-lora"
# PTX is JIT-compiled for this GPU on first use; keep the cache in /tmp.
export CUDA_CACHE_PATH=/tmp/sd-lora-cuda-cache
export CUDA_CACHE_MAXSIZE=1073741824
export RUST_BACKTRACE=1

step "fixtures path"
# The test binaries look for their fixtures under the path the build machine's
# checkout had (CARGO_MANIFEST_DIR, baked in); make that path point here.
SRC="$(cat "$REPO/.gpu/source_path" 2>/dev/null || echo /work/main)"
if [[ ! -e "$SRC/tests/fixtures" ]]; then
	mkdir -p "$(dirname "$SRC")" && ln -sfn "$REPO" "$SRC" && echo "$SRC -> $REPO"
fi
ls -d "$SRC/tests/fixtures"

# bench_json IMPL FILE: append the JSON object printed in FILE to gpu_bench.jsonl
# with "impl" set, or a failure record.
bench_json() {
	python3 - "$1" "$2" "$JSONL" "$3" <<'EOF'
import json, sys
impl, path, out, label = sys.argv[1:5]
text = open(path).read()
obj = None
try:
    obj = json.loads(text)
except ValueError:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
                break
            except ValueError:
                pass
if not isinstance(obj, dict):
    obj = {"error": "no JSON output", "stdout_tail": text[-500:]}
obj.setdefault("impl", impl)
obj["label"] = label
with open(out, "a") as f:
    f.write(json.dumps(obj) + "\n")
print(json.dumps(obj))
EOF
}

# Order: one quick parity test (is the CUDA path right at all?), then each
# benchmark setting for us and for the reference back to back (so a cut-off run
# still leaves complete pairs), then the other parity tests.
run_test() {
	step "test $1 (SD_LORA_TEST_DEVICE=cuda)"
	fits "$TEST_TIMEOUT" || return 0
	SD_LORA_TEST_DEVICE=cuda timeout -k 5 "$TEST_TIMEOUT" "$BIN/$1"
	echo "--- $1: exit $?"
}
TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT_S:-60}"
BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT_S:-90}"
SKIP_TESTS="${GPU_CHECK_SKIP_TESTS:-0}"
[[ "$SKIP_TESTS" == 1 || " ${TESTS[*]} " != *" unet_parity "* ]] || run_test unet_parity

REFERENCE=0
if [[ "${GPU_CHECK_SKIP_REFERENCE:-0}" != 1 && -f tools/bench_reference.py ]]; then
	step "PyTorch reference environment"
	if ! python3 -c 'import diffusers' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
		python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
			--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
	fi
	if python3 -c 'import torch, diffusers, peft; print("torch", torch.__version__, "diffusers", diffusers.__version__, "peft", peft.__version__, "cuda", torch.cuda.is_available())'; then
		REFERENCE=1
	else
		echo "reference unavailable: skipped"
	fi
fi

CONFIGS=("f32" "f16 --checkpointing" "bf16 --checkpointing" "f16")
[[ "${GPU_CHECK_SKIP_BENCH:-0}" == 1 ]] && CONFIGS=()
for c in "${CONFIGS[@]}"; do
	step "sd-lora bench --precision $c (resolution $RES, $STEPS steps, $WARMUP warm-up)"
	if fits "$BENCH_TIMEOUT"; then
		# shellcheck disable=SC2086
		timeout -k 5 "$BENCH_TIMEOUT" "$BIN/sd-lora" bench --device cuda --resolution "$RES" \
			--steps "$STEPS" --warmup "$WARMUP" --json --precision $c >/tmp/bench.out
		echo "--- exit $?"
		bench_json sd-lora /tmp/bench.out "$c"
	fi
	[[ "$REFERENCE" == 1 ]] || continue
	step "bench_reference.py --precision $c"
	if fits "$BENCH_TIMEOUT"; then
		# shellcheck disable=SC2086
		PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 timeout -k 5 "$BENCH_TIMEOUT" python3 tools/bench_reference.py \
			--device cuda --resolution "$RES" --steps "$STEPS" --warmup "$WARMUP" --json \
			--precision $c >/tmp/bench.out
		echo "--- exit $?"
		bench_json pytorch /tmp/bench.out "$c"
	fi
done

if [[ "$SKIP_TESTS" != 1 ]]; then
	for t in "${TESTS[@]}"; do
		[[ "$t" == unet_parity ]] || run_test "$t"
	done
fi

# The product end to end on the GPU: the quickstart training run (with its
# previews) and generation with the LoRA it wrote.
step "sd-lora train (quickstart) and generate on cuda"
if fits 120; then
	rm -rf /tmp/qs-cuda /tmp/gen-cuda
	timeout -k 5 90 "$BIN/sd-lora" train --config configs/quickstart.toml --device cuda \
		--output /tmp/qs-cuda 2>&1 | grep -v '^step [0-9]*/' | tail -15
	echo "--- train: exit ${PIPESTATUS[0]}"
	cat /tmp/qs-cuda/train_summary.json 2>/dev/null
	ls /tmp/qs-cuda/samples 2>/dev/null
	timeout -k 5 30 "$BIN/sd-lora" generate --model builtin:tiny --device cuda \
		--lora /tmp/qs-cuda/quickstart.safetensors:0.8 --prompt "ohwx robot" --steps 8 \
		--width 64 --height 64 --seed 3 --output /tmp/gen-cuda
	echo "--- generate: exit $?"
	cp /tmp/qs-cuda/samples/quickstart-step000200-grid.png "$OUT/" 2>/dev/null
fi

step "done"
nvidia-smi --query-gpu=memory.used,memory.total --format=csv 2>/dev/null
echo "log: $LOG, bench results: $JSONL"
# Let tee write the last lines before the caller collects the log.
sleep 1
