"""`novallm-generate`: text generation from the shell.

novallm-generate --prompt "What is the capital of France?"
novallm-generate --prompts_file prompts.txt --temperature 0.8 --seed 1 --max_new_tokens 64
"""

from __future__ import annotations

import dataclasses

import sys

from absl import app, flags, logging

from novallm_jax.cli_flags import (
    ACTIVATIONS,
    COMPILE_CACHE_DIR,
    DRAFT_MODEL,
    DTYPE,
    KV_CACHE_DTYPE,
    MESH,
    MODEL,
    SPECULATIVE,
    WEIGHTS,
)
from novallm_jax.errors import NovaLLMError

_PROMPT = flags.DEFINE_string("prompt", None, "The prompt.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one prompt per line, run as one batch.")
_CHAT = flags.DEFINE_boolean("chat", None, "Apply the model's chat template (default: on when the model has one).")
_SYSTEM = flags.DEFINE_string("system", None, "A system message for --chat.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy (deterministic).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the sampler.")
_STREAM = flags.DEFINE_boolean("stream", False, "Print text as it is generated.")


def _read_prompts() -> list[str]:
    if _PROMPT.value is not None and _PROMPTS_FILE.value is not None:
        raise NovaLLMError("pass --prompt or --prompts_file, not both")
    if _PROMPTS_FILE.value is not None:
        try:
            with open(_PROMPTS_FILE.value, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise NovaLLMError(f"cannot read --prompts_file: {e}") from None
        if not prompts:
            raise NovaLLMError(f"--prompts_file {_PROMPTS_FILE.value} holds no prompt")
        return prompts
    if _PROMPT.value is None:
        raise NovaLLMError("pass --prompt TEXT or --prompts_file FILE")
    if not _PROMPT.value.strip():
        raise NovaLLMError("the prompt is empty")
    return [_PROMPT.value]


def _summary(results) -> str:
    outs = [o for r in results for o in r.outputs]
    prompt_tokens = sum(len(r.prompt_token_ids) for r in results)
    generated = sum(len(o.token_ids) for o in outs)
    starts = [o.metrics.first_scheduled for o in outs if o.metrics.first_scheduled is not None]
    firsts = [o.metrics.first_token for o in outs if o.metrics.first_token is not None]
    ends = [o.metrics.finished for o in outs if o.metrics.finished is not None]
    prefill_s = max(firsts) - min(starts) if starts and firsts else 0.0
    decode_s = max(ends) - min(firsts) if ends and firsts else 0.0
    rate = lambda n, s: f"{n / s:.1f}" if s > 0 else "n/a"
    return (
        f"prompt tokens: {prompt_tokens}, generated tokens: {generated}, "
        f"prefill: {rate(prompt_tokens, prefill_s)} tok/s, decode: {rate(generated - len(outs), decode_s)} tok/s"
    )


def _engine_config(num_prompts: int):
    """The default engine with a KV pool as large as this run can use: each prompt (their count rounded up to a power
    of two, so that few pool shapes are compiled) reaching the whole context. The server-sized default pool (2048
    pages, 1.5 GB for the default model) takes ~0.4 s to zero at every start; one prompt's 129 pages take ms."""
    from novallm_jax.engine.engine import EngineConfig
    from novallm_jax.engine.executor import ExecutorConfig

    default = ExecutorConfig()
    pages = 1 + default.max_pages_per_seq * (1 << (num_prompts - 1).bit_length())  # + the null page
    return EngineConfig(executor=dataclasses.replace(default, num_pages=min(default.num_pages, pages)))


def generate_main() -> None:
    from novallm_jax.llm import LLM, result_of
    from novallm_jax.sampling_params import SamplingParams

    prompts = _read_prompts()
    params = SamplingParams(
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        seed=_SEED.value,
        max_tokens=_MAX_NEW_TOKENS.value,
        speculative=SPECULATIVE.value,
    )
    with LLM(
        MODEL.value,
        dtype=DTYPE.value,
        weights=WEIGHTS.value,
        activations=ACTIVATIONS.value,
        kv_cache_dtype=KV_CACHE_DTYPE.value,
        compile_cache_dir=COMPILE_CACHE_DIR.value or None,
        mesh=MESH.value,
        speculative=SPECULATIVE.value,
        draft_model=DRAFT_MODEL.value,
        engine_config=_engine_config(len(prompts)),
    ) as llm:
        params = params.with_default_drafts(llm.speculative)  # a draft model's default
        chat = _CHAT.value if _CHAT.value is not None else bool(llm.tokenizer.chat_template)
        system = [{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value else []
        encoded = [
            llm.chat_prompt(system + [{"role": "user", "content": p}]) if chat else llm.encode(p) for p in prompts
        ]
        if _STREAM.value:
            results = []
            for ids in encoded:
                for out in llm.stream_outputs(ids, params):
                    if out.error:
                        raise NovaLLMError(f"generation failed: {out.error}")
                    sys.stdout.write(out.delta_text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                results.append(result_of(out))
            print(_summary(results), file=sys.stderr)
            return
        results = llm.generate(encoded, params)
        for i, r in enumerate(results):
            if len(results) > 1:
                print(f"=== [{i}] {prompts[i]}")
            print(r.text)
        print(_summary(results), file=sys.stderr)


def main(argv) -> None:
    if len(argv) > 1:
        sys.exit(f"novallm-generate: error: unexpected arguments {argv[1:]}; use --prompt")
    logging.set_verbosity(logging.WARNING)
    try:
        generate_main()
    except NovaLLMError as e:
        sys.exit(f"novallm-generate: error: {e}")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
