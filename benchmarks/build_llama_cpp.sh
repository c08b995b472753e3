#!/usr/bin/env bash
# Builds llama.cpp's tools (llama-bench, llama-server, llama-quantize, llama-cli) for the benchmarks, from the
# llama.cpp that the llama-cpp-python 0.3.36 sdist vendors, without llama-cpp-python's pip build.
#
#   bash benchmarks/build_llama_cpp.sh            # prints the directory of the tools on its last line
#   python benchmarks/bench_decode.py --llama_cpp_bin="$(bash benchmarks/build_llama_cpp.sh | tail -1)"
#
# About 15 minutes on 2 cores, under `nice`: start it early, in the background. The sdist and the build live under
# ${NOVALLM_CACHE_DIR:-~/.cache/novallm-jax}/llama.cpp (the tokenizer tests read the same sdist there); a finished
# build is reused.
set -euo pipefail
VERSION=0.3.36
CACHE="${NOVALLM_CACHE_DIR:-$HOME/.cache/novallm-jax}/llama.cpp"
SRC="$CACHE/llama_cpp_python-$VERSION"
BUILD="$CACHE/build-$VERSION"
TARGETS=(llama-bench llama-server llama-quantize llama-cli)

mkdir -p "$CACHE"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
  tmp="$(mktemp -d "$CACHE/.fetch.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp" >&2
  tar xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$tmp"
  # A rename is atomic: a concurrent reader sees no tree or a whole one.
  mv "$tmp/llama_cpp_python-$VERSION" "$SRC" 2>/dev/null || test -d "$SRC/vendor/llama.cpp"
fi

done_all=1
for t in "${TARGETS[@]}"; do [ -x "$BUILD/bin/$t" ] || done_all=0; done
if [ "$done_all" = 0 ]; then
  nice cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
  nice cmake --build "$BUILD" -j "$(nproc)" --target "${TARGETS[@]}" >&2
fi
echo "$BUILD/bin"
