"""MkDocs hook: pages that cannot drift from the code.

`<!-- flags: MODULE -->` becomes a table of the absl flags MODULE defines (name, type, default, help), read from the
flag objects themselves after importing it; `<!-- metrics -->` becomes the list of the server's Prometheus metrics,
read from a `ServerMetrics` registry; `<!-- model-types -->` lists the `model_type`s and GGUF architectures that load; `<!-- block-codes -->` the GGUF
types whose matmul weights stay in their block codes, `<!-- gguf-export-types -->` those the GGUF writer writes.
"""

from __future__ import annotations

import importlib
import re

_FLAGS = re.compile(r"<!-- flags: ([\w.]+) -->")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _flag_type(flag) -> str:
    values = getattr(flag.parser, "enum_values", None)
    if values:
        return "one of " + ", ".join(f"`{v}`" for v in values)
    return flag.flag_type()


def _default(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else str(value)


def flags_table(module: str) -> str:
    from absl import flags

    importlib.import_module(module)
    defined = flags.FLAGS.flags_by_module_dict().get(module)
    if not defined:
        raise ValueError(f"{module} defines no absl flags")
    rows = ["| flag | type | default | what it does |", "|---|---|---|---|"]
    for flag in sorted(defined, key=lambda f: f.name):
        default = "(none)" if flag.default is None else f"`{_default(flag.default)}`"
        rows.append(f"| `--{flag.name}` | {_flag_type(flag)} | {_cell(default)} | {_cell(flag.help)} |")
    return "\n".join(rows)


def metrics_list() -> str:
    from novallm_jax.serving.metrics import ServerMetrics

    class _IdleEngine:
        def stats(self):
            return {}

    rows = ["| metric | type | what it counts |", "|---|---|---|"]
    for family in ServerMetrics(_IdleEngine()).registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        rows.append(f"| `{name}` | {family.type} | {_cell(family.documentation)} |")
    return "\n".join(rows)


def model_types() -> str:
    from novallm_jax.config import SUPPORTED_GGUF_ARCHS, SUPPORTED_MODEL_TYPES

    return (
        f"- HF `config.json` `model_type`: {', '.join(f'`{t}`' for t in SUPPORTED_MODEL_TYPES)}\n"
        f"- GGUF `general.architecture`: {', '.join(f'`{a}`' for a in SUPPORTED_GGUF_ARCHS)}"
    )


def _code_list(values) -> str:
    return ", ".join(f"`{v}`" for v in values if v)


def _block_codes() -> str:
    from novallm_jax.loading.gguf_quant import SUPPORTED

    return _code_list(SUPPORTED)


def _export_types() -> str:
    from novallm_jax.loading.gguf_export import QUANTS

    return _code_list(QUANTS)


_SIMPLE = {"<!-- block-codes -->": _block_codes, "<!-- gguf-export-types -->": _export_types}


def on_page_markdown(markdown, page, config, files):
    for marker, render in _SIMPLE.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    if "<!-- model-types -->" in markdown:
        markdown = markdown.replace("<!-- model-types -->", model_types())
    markdown = _FLAGS.sub(lambda m: flags_table(m.group(1)), markdown)
    if "<!-- metrics -->" in markdown:
        markdown = markdown.replace("<!-- metrics -->", metrics_list())
    return markdown
