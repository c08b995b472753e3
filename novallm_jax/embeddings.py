"""Hidden states of prompts and the logprobs of prompt tokens, for research: a prefill-only forward over the engine's
weights, beside its steps (embeddings are requests of the engine: `LLMEngine.add_request(pooling=...)`); on a
cluster of processes every process runs it, in order with the steps (`LLMEngine.forward`).

The prompts of one call run as one padded batch (lengths rounded up to 16, batch to a power of two, so compiles stay
few) with a contiguous K/V scratch cache made for the call and dropped after it: nothing is taken from the KV page
pool. Returns the final hidden states after the final norm (what the LM head reads), or every layer's output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from novallm_jax.config import ModelConfig
from novallm_jax.errors import InvalidRequestError
from novallm_jax.kv_cache import ContiguousKVCache
from novallm_jax.model import decoder_layer, forward, rms_norm, rope_inv_freqs, rope_tables_per_kind
from novallm_jax.sampling_params import MAX_LOGPROBS


def _forward(params, tokens, positions, cfg: ModelConfig, all_layers: bool):
    """`model.forward`'s layers (`gemma_forward`'s for Gemma) up to the final norm, keeping each layer's output."""
    cache = ContiguousKVCache.create(cfg, tokens.shape[0], tokens.shape[1], params["embed"].dtype)
    rope_cs = rope_tables_per_kind(positions, rope_inv_freqs(cfg))
    if cfg.gemma is None:
        x, layer = params["embed"][tokens], decoder_layer
        norm = lambda h: rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    else:
        from novallm_jax.model_gemma import _scaled, gemma_layer, gemma_norm, per_layer_inputs

        x = _scaled(params["embed"][tokens], cfg.hidden_size**0.5)
        pli = per_layer_inputs(params, tokens, x, cfg) if cfg.gemma.per_layer_input_size else None
        layer = lambda p, h, pos, c, i, *rest: gemma_layer(
            p, h, pos, c, i, *rest, None if pli is None else pli[:, :, i]
        )
        norm = lambda h: gemma_norm(h, params["final_norm"], cfg.rms_norm_eps, cfg.gemma.norm_offset)
    layers = [x]
    for i, p in enumerate(params["layers"]):
        x, cache = layer(p, x, positions, cache, i, cfg, rope_cs, None)
        layers.append(x)
    return jnp.stack(layers) if all_layers else norm(x)


_hidden = jax.jit(_forward, static_argnames=("cfg", "all_layers"))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prompt_logprobs(params, tokens, positions, cfg: ModelConfig):
    """For each position t < T - 1 of row 0: log p(tokens[t + 1]) and the top MAX_LOGPROBS (logprob, id). The
    model's own `forward`, so every family's logits (Gemma's scaling and soft cap too)."""
    cache = ContiguousKVCache.create(cfg, tokens.shape[0], tokens.shape[1], params["embed"].dtype)
    logits, _ = forward(params, tokens, positions, cache, cfg)
    logprobs = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)[:-1]
    chosen = jnp.take_along_axis(logprobs, tokens[0, 1:, None], axis=-1)[:, 0]
    top, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    return chosen, top, top_ids


def _bucket(n: int, step: int) -> int:
    return -(-n // step) * step


@functools.lru_cache(maxsize=None)
def _on_mesh(fn, mesh, static: tuple[str, ...]):
    """`fn` jitted with its outputs replicated on `mesh`, so that every process (with `jax.distributed`) holds them
    whole and can read them."""
    return jax.jit(fn, static_argnames=static, out_shardings=NamedSharding(mesh, PartitionSpec()))


def _inputs(mesh, *arrays: np.ndarray) -> list:
    """Host arrays as the forward's inputs: replicated over `mesh` (every process gives the same values)."""
    if mesh is None:
        return [jnp.asarray(a) for a in arrays]
    return [jax.device_put(a, NamedSharding(mesh, PartitionSpec())) for a in arrays]


def run_forward(executor, kind: str, ids: list[int], arg: int):
    """A forward over the executor's params (on its mesh, if any): "hidden_states" (every layer's, `arg` unused) or
    "prompt_logprobs" (top `arg`). On a cluster every process runs it, in the order of the steps (see
    `LLMEngine.forward`)."""
    ex = executor
    if kind == "hidden_states":
        return hidden_states(ex.params, ex.step_cfg, [ids], all_layers=True, mesh=ex.mesh)[0]
    if kind == "prompt_logprobs":
        return prompt_logprobs(ex.params, ex.step_cfg, ids, arg, mesh=ex.mesh)
    raise ValueError(f"unknown forward {kind!r}")


def hidden_states(
    params, cfg: ModelConfig, prompts: list[list[int]], all_layers: bool = False, mesh=None
) -> list[np.ndarray]:
    """Per prompt: its final hidden states [T, D] after the final norm, or with `all_layers` the embeddings and
    every layer's output (before the final norm) [L + 1, T, D], as transformers' `output_hidden_states` lists them
    but for the last entry, which transformers gives after the norm. Prompts run in batches of at most
    `MAX_BATCH_TOKENS` padded tokens (one longer prompt alone), which bounds the scratch cache. `mesh`: the
    params' mesh (the states come back replicated)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InvalidRequestError("every input needs at least one token", param="input")
    forward_fn = _hidden if mesh is None else _on_mesh(_forward, mesh, ("cfg", "all_layers"))
    out: list[np.ndarray] = []
    for group in _groups(prompts):
        states = np.asarray(forward_fn(params, *_inputs(mesh, *_padded(group)), cfg, all_layers))
        out += [states[:, i, : len(p)] if all_layers else states[i, : len(p)] for i, p in enumerate(group)]
    return out


MAX_BATCH_TOKENS = 8192


def _groups(prompts: list[list[int]]) -> list[list[list[int]]]:
    """Consecutive prompts whose padded batch (`_padded`'s shape) holds at most MAX_BATCH_TOKENS tokens."""
    groups: list[list[list[int]]] = []
    for p in prompts:
        if groups:
            candidate = groups[-1] + [p]
            rows = 1 << (len(candidate) - 1).bit_length()
            if rows * _bucket(max(map(len, candidate)), 16) <= MAX_BATCH_TOKENS:
                groups[-1] = candidate
                continue
        groups.append([p])
    return groups


def _padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and positions (-1 past each prompt) of a batch padded to a power of two and to 16-token lengths."""
    batch = 1 << (len(prompts) - 1).bit_length()
    length = _bucket(max(map(len, prompts)), 16)
    tokens = np.zeros((batch, length), np.int32)
    positions = np.full((batch, length), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        positions[i, : len(p)] = np.arange(len(p))
    return tokens, positions


def prompt_logprobs(
    params, cfg: ModelConfig, prompt: list[int], k: int, mesh=None
) -> list[tuple[int, float, dict[int, float]] | None]:
    """vLLM's prompt_logprobs: None for the first token, then per token (id, its logprob given the tokens before,
    the top k {id: logprob})."""
    tokens, positions = _padded([prompt])
    fn = _prompt_logprobs if mesh is None else _on_mesh(_prompt_logprobs.__wrapped__, mesh, ("cfg",))
    chosen, top, top_ids = (np.asarray(a) for a in fn(params, *_inputs(mesh, tokens[:1], positions[:1]), cfg))
    out = [None]
    for t in range(len(prompt) - 1):
        out.append((prompt[t + 1], float(chosen[t]), {int(i): float(v) for i, v in zip(top_ids[t, :k], top[t, :k])}))
    return out
