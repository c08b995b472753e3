"""A decoding loop of your own on the pure functions: your sampler, your stopping rule, the cache donated.

    python examples/custom_sampling_loop.py --prompt "The three laws of robotics are" --max_tokens 48

The sampler here is "typical" sampling (Meister et al., 2022), which the library's sampler does not have: keep the
tokens whose surprisal is closest to the distribution's entropy, up to a mass of --typical_p, then draw.
"""

import argparse
import functools

import jax
import jax.numpy as jnp

from novallm_jax.kv_cache import ContiguousKVCache
from novallm_jax.loading import default_model_path, load_model
from novallm_jax.model import forward
from novallm_jax.tokenizer import load_tokenizer


def typical_filter(logits: jax.Array, typical_p: float) -> jax.Array:
    """Logits [V] with every token outside the typical set at -inf."""
    logp = jax.nn.log_softmax(logits)
    entropy = -jnp.sum(jnp.exp(logp) * logp)
    order = jnp.argsort(jnp.abs(-logp - entropy))  # most typical first
    mass = jnp.cumsum(jnp.exp(logp[order]))
    keep_sorted = jnp.concatenate([jnp.array([True]), mass[:-1] < typical_p])  # at least one token
    keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("cfg", "typical_p", "temperature"), donate_argnames="cache")
def step(params, tokens, positions, cache, key, *, cfg, typical_p, temperature):
    """Runs the model over tokens [1, T] and draws the next token from the last position's logits."""
    logits, cache = forward(params, tokens, positions, cache, cfg, logits_index=jnp.array([tokens.shape[1] - 1]))
    filtered = typical_filter(logits[0] / temperature, typical_p)
    return jax.random.categorical(key, filtered).astype(jnp.int32), cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory, GGUF file or orbax checkpoint (default model)")
    parser.add_argument("--prompt", default="The three laws of robotics are")
    parser.add_argument("--max_tokens", type=int, default=48)
    parser.add_argument("--typical_p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg, params = load_model(args.model)  # float arrays; the pure functions take any params pytree
    tokenizer = load_tokenizer(args.model or default_model_path())
    ids = tokenizer.encode(args.prompt)
    cache = ContiguousKVCache.create(cfg, 1, len(ids) + args.max_tokens)
    sample = functools.partial(step, cfg=cfg, typical_p=args.typical_p, temperature=args.temperature)
    key = jax.random.key(args.seed)

    key, sub = jax.random.split(key)
    token, cache = sample(params, jnp.array([ids]), jnp.arange(len(ids))[None], cache, sub)  # the prompt at once
    generated = []
    print(args.prompt, end="", flush=True)
    for position in range(len(ids), len(ids) + args.max_tokens):
        if int(token) in cfg.eos_token_ids:
            break
        generated.append(int(token))
        # Decoding the whole suffix keeps multi-byte characters whole; fine for a short example.
        text = tokenizer.decode(generated)
        print(text[len(tokenizer.decode(generated[:-1])) :], end="", flush=True)
        if position == len(ids) + args.max_tokens - 1:
            break
        key, sub = jax.random.split(key)
        token, cache = sample(params, token.reshape(1, 1), jnp.array([[position]]), cache, sub)
    print()


if __name__ == "__main__":
    main()
