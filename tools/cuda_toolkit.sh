#!/usr/bin/env bash
# Assemble a CUDA toolkit from NVIDIA's pip wheels, enough to BUILD sd-lora
# with `--features cuda` on a machine without a GPU, a driver or a system CUDA
# install (CI, containers, this project's build host). See docs/cuda.md.
#
#   tools/cuda_toolkit.sh            # assemble (idempotent), print `export` lines
#   eval "$(tools/cuda_toolkit.sh)"  # ... and use them in this shell
#   tools/cuda_toolkit.sh --build    # assemble, then cargo build --release --features cuda -p sd-lora
#   tools/cuda_toolkit.sh --env      # only print the `export` lines (toolkit must exist)
#
# Settings (environment):
#   CUDA_MAJOR        toolkit major version; only 13 is supported (default 13).
#   CUDA_COMPUTE_CAP  GPU architecture candle's kernels are compiled for
#                     (default 80). candle's kernels are embedded as PTX for
#                     compute_$CUDA_COMPUTE_CAP and JIT-compiled by the driver,
#                     so 80 runs on Ampere, Ada, Hopper and newer; bf16 kernels
#                     need >= 80. Use the GPU's own value (e.g. 90 for H100/H200)
#                     for a binary that only targets that GPU.
#   SD_LORA_CUDA_HOME where to assemble it (default ~/.cache/sd-lora-cuda).
#
# What the build needs, and why it works without a GPU:
# - nvcc (+ cicc from the nvvm wheel, crt/ and cccl headers): candle-kernels
#   compiles its .cu files to PTX at build time.
# - libcudart, libcublas, libcublasLt, libcurand, libnvrtc: cudarc links them
#   (feature `dynamic-linking`), so they must exist at link time with the
#   unversioned `libX.so` names; the binary then records their sonames
#   (libcublas.so.13, ...) and loads the GPU machine's copies at run time.
# - libcuda: belongs to the driver, which is not installed here. We generate a
#   stub with the soname `libcuda.so.1` that exports every `cu*` entry point
#   declared in cuda.h; the binary links against it and uses the real driver
#   library at run time. The stub lives in lib/stubs and must never be on
#   LD_LIBRARY_PATH when running.
# - The nvcc version must not be newer than what the target driver supports:
#   PTX from a newer nvcc is rejected by an older driver's JIT
#   (CUDA_ERROR_UNSUPPORTED_PTX_VERSION). The wheels are pinned to CUDA 13.0,
#   which every CUDA 13 driver (>= 580) accepts.
set -euo pipefail

CUDA_MAJOR="${CUDA_MAJOR:-13}"
CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
HOME_DIR="${SD_LORA_CUDA_HOME:-$HOME/.cache/sd-lora-cuda}"

case "$CUDA_MAJOR" in
13)
	# CUDA 13.0 (driver >= 580). All of these unpack into nvidia/cu13/.
	WHEELS=(
		"nvidia-cuda-nvcc==13.0.88"
		"nvidia-cuda-crt==13.0.88"
		"nvidia-nvvm==13.0.88"
		"nvidia-cuda-cccl==13.0.85"
		"nvidia-cuda-runtime==13.0.96"
		"nvidia-cuda-nvrtc==13.0.88"
		"nvidia-cublas==13.0.2.14"
		"nvidia-curand==10.4.0.35"
	)
	;;
*)
	echo "tools/cuda_toolkit.sh: CUDA_MAJOR=$CUDA_MAJOR is not supported; only 13 is." >&2
	echo "For CUDA 12, install NVIDIA's toolkit and build as docs/cuda.md describes." >&2
	exit 2
	;;
esac

ROOT="$HOME_DIR/cu$CUDA_MAJOR"
STAMP="$ROOT/.sd-lora-toolkit"
WANT_STAMP="$(printf '%s\n' "${WHEELS[@]}")"

print_env() {
	cat <<EOF
export CUDA_ROOT="$ROOT"
export CUDA_PATH="$ROOT"
export CUDA_HOME="$ROOT"
export NVCC="$ROOT/bin/nvcc"
export PATH="$ROOT/bin:\$PATH"
export CUDA_COMPUTE_CAP="$CUDA_COMPUTE_CAP"
export CUDARC_CUDA_VERSION="${CUDA_MAJOR}000"
export LIBRARY_PATH="$ROOT/lib:$ROOT/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
EOF
}

assemble() {
	if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" && -x "$ROOT/bin/nvcc" ]]; then
		return 0
	fi
	local py
	py="$(command -v python3 || command -v python)" || {
		echo "tools/cuda_toolkit.sh: python3 with pip is needed to download the wheels" >&2
		exit 1
	}
	mkdir -p "$HOME_DIR/wheels"
	echo "Downloading CUDA $CUDA_MAJOR wheels into $HOME_DIR/wheels (about 700 MB) ..." >&2
	"$py" -m pip download --quiet --no-deps --only-binary=:all: \
		-d "$HOME_DIR/wheels" "${WHEELS[@]}" >&2

	local tmp
	tmp="$(mktemp -d "$HOME_DIR/unpack.XXXXXX")"
	trap 'rm -rf "$tmp"' RETURN
	local spec name version file
	for spec in "${WHEELS[@]}"; do
		name="${spec%%==*}"
		version="${spec##*==}"
		file="$(ls "$HOME_DIR/wheels/${name//-/_}-${version}-"*.whl 2>/dev/null | head -1)"
		if [[ -z "$file" ]]; then
			echo "tools/cuda_toolkit.sh: wheel for $spec not found in $HOME_DIR/wheels" >&2
			exit 1
		fi
		"$py" -m zipfile -e "$file" "$tmp" >&2
	done
	rm -rf "$ROOT"
	mkdir -p "$(dirname "$ROOT")"
	mv "$tmp/nvidia/cu$CUDA_MAJOR" "$ROOT"
	# zipfile does not keep the executable bit.
	chmod +x "$ROOT"/bin/* "$ROOT"/nvvm/bin/* 2>/dev/null || true

	# Unversioned names for the linker (the wheels ship only libX.so.N).
	local lib base
	for lib in "$ROOT"/lib/lib*.so.*; do
		base="$(basename "$lib")"
		base="${base%%.so.*}.so"
		[[ -e "$ROOT/lib/$base" ]] || ln -s "$(basename "$lib")" "$ROOT/lib/$base"
	done
	# Some tools look for lib64.
	[[ -e "$ROOT/lib64" ]] || ln -s lib "$ROOT/lib64"

	make_libcuda_stub
	printf '%s\n' "${WHEELS[@]}" >"$STAMP"
	echo "CUDA $CUDA_MAJOR toolkit assembled in $ROOT" >&2
}

# A stub libcuda.so (soname libcuda.so.1) exporting every driver entry point
# declared in cuda.h, before and after its `#define cuX cuX_v2` renames.
make_libcuda_stub() {
	local stubs="$ROOT/lib/stubs" work
	mkdir -p "$stubs"
	work="$(mktemp -d)"
	{
		grep -oE '\bCUDAAPI[[:space:]]+cu[A-Za-z0-9_]+[[:space:]]*\(' "$ROOT/include/cuda.h" || true
		cc -E -I"$ROOT/include" -x c "$ROOT/include/cuda.h" |
			grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' || true
	} | sed -E 's/^CUDAAPI[[:space:]]+//; s/[[:space:]]*\($//' | sort -u |
		awk '{ print "void " $1 "(void) {}" }' >"$work/libcuda_stub.c"
	if [[ ! -s "$work/libcuda_stub.c" ]]; then
		echo "tools/cuda_toolkit.sh: found no cu* functions in $ROOT/include/cuda.h" >&2
		exit 1
	fi
	cc -shared -fPIC -w -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$work/libcuda_stub.c"
	ln -sf libcuda.so "$stubs/libcuda.so.1"
	echo "libcuda stub: $(wc -l <"$work/libcuda_stub.c") entry points" >&2
	rm -rf "$work"
}

mode="${1:-}"
case "$mode" in
--env)
	[[ -x "$ROOT/bin/nvcc" ]] || {
		echo "tools/cuda_toolkit.sh: no toolkit in $ROOT yet; run it without --env first" >&2
		exit 1
	}
	print_env
	;;
"")
	assemble
	print_env
	;;
--build)
	assemble
	eval "$(print_env)"
	cd "$(dirname "$0")/.."
	echo "CUDA_ROOT=$CUDA_ROOT CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP" >&2
	shift
	exec cargo build --release --features cuda -p sd-lora "$@"
	;;
-h | --help)
	sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
	;;
*)
	echo "tools/cuda_toolkit.sh: unknown option $mode (try --help)" >&2
	exit 2
	;;
esac
