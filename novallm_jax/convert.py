"""`novallm-convert`: turns a HF directory or a GGUF file into an orbax checkpoint that loads without the source."""

from __future__ import annotations

import os
import shutil
import sys

from absl import app, flags, logging

from novallm_jax.cli_flags import DTYPE, MODEL
from novallm_jax.errors import NovaLLMError

OUTPUT = flags.DEFINE_string("output", None, "Directory to write the orbax checkpoint to (required).")

# Tokenizer files copied along from a HF directory, so the checkpoint directory serves as a model path alone.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def convert(source: str | None, output: str, dtype: str = "auto") -> str:
    """Loads `source`, writes params + config (and the tokenizer) under `output`; returns `output`."""
    from novallm_jax.loading import default_model_path, load_model, model_kind
    from novallm_jax.loading.checkpoint import save_checkpoint

    source = source or default_model_path()
    kind = model_kind(source)
    if kind == "orbax":
        raise NovaLLMError(f"{source} is already an orbax checkpoint")
    if os.path.exists(output) and os.listdir(output):
        raise NovaLLMError(f"output directory {output} exists and is not empty")
    cfg, params = load_model(source, dtype=dtype)
    save_checkpoint(output, cfg, params)
    if kind == "hf":
        for name in _TOKENIZER_FILES:
            if os.path.exists(os.path.join(source, name)):
                shutil.copy(os.path.join(source, name), os.path.join(output, name))
    else:
        _save_gguf_tokenizer(source, output)
    logging.info("wrote %s (%s, %d params)", output, cfg.model_type, cfg.num_params())
    return output


def _save_gguf_tokenizer(gguf_path: str, output: str) -> None:
    """Saves the GGUF's tokenizer in HF form (tokenizer.json + tokenizer_config.json) next to the params."""
    from novallm_jax.tokenizer import load_tokenizer

    load_tokenizer(gguf_path).save_pretrained(output)


def main(argv):
    del argv
    if not OUTPUT.value:
        sys.exit("novallm-convert: error: --output is required")
    try:
        out = convert(MODEL.value, OUTPUT.value, DTYPE.value)
    except NovaLLMError as e:
        sys.exit(f"novallm-convert: error: {e}")
    print(out)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
