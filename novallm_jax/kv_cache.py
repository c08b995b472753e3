"""KV caches as pytrees: a contiguous one (one row per sequence) and a paged one (pages shared through page tables).

Both are updated by pure functions; jitted callers donate them so XLA writes the new keys and values in place.
A token whose position is negative is padding: it writes nothing.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from novallm_jax.config import ModelConfig

# Page 0 of a paged cache is never handed out: padding slots and unused page-table entries point at it.
NULL_PAGE = 0
# KV cache groups of a paged cache: every layer's K/V in the FULL group's pages, except (`window_groups`) those of
# sliding-window layers in a model that also has global ones, which live in WINDOW pages of a pool of their own.
FULL_GROUP, WINDOW_GROUP = 0, 1


def window_groups(cfg: ModelConfig) -> tuple[int, ...] | None:
    """Each layer's KV cache group when the model mixes sliding-window and global layers (Gemma 2/3/4), else None.

    A sliding layer's keys behind its window are never read again, so its pages can return to the pool while the
    sequence goes on (`scheduler.Scheduler`); a layer that reads another's K/V (Gemma 4) is in its source's group.
    """
    windows = [cfg.layer_window(cfg.layer_kv_source(i)) for i in range(cfg.num_layers)]
    if None not in windows or len(set(windows)) != 2:  # no global layer, or no sliding one, or two windows
        return None
    return tuple(FULL_GROUP if w is None else WINDOW_GROUP for w in windows)


def group_window(cfg: ModelConfig) -> int | None:
    """The window of the WINDOW group's layers (None when the model has no such group)."""
    groups = window_groups(cfg)
    return None if groups is None else cfg.layer_window(groups.index(WINDOW_GROUP))


@flax.struct.dataclass
class ContiguousKVCache:
    """Per layer K and V of shape [batch, max_len, kv_heads, head_dim]; row b holds sequence b at positions 0.."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "ContiguousKVCache":
        zeros = lambda: tuple(_zeros(cfg, i, (batch, max_len), dtype) for i in range(cfg.num_layers))
        return cls(k=zeros(), v=zeros())

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    def update(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array, page_table=None):
        """Writes k, v [B, T, KV, hd] at `positions` [B, T]; returns (cache, keys, values) with keys [B, S, KV, hd]."""
        del page_table
        b = jnp.arange(k.shape[0])[:, None]
        pos = jnp.where(positions < 0, self.max_len, positions)  # out of range: dropped
        return _scatter(self, layer, (b, pos), k, v)

    def read(self, layer: int, page_table=None):
        """Layer `layer`'s keys and values [B, S, KV, hd], as `update` returns them, without writing."""
        del page_table
        return self.k[layer], self.v[layer]


@flax.struct.dataclass
class PagedKVCache:
    """Per layer K and V pages of shape [num_pages, page_size, kv_heads, head_dim].

    A sequence's tokens live in the pages its page table lists: position p is slot p % page_size of page
    `page_table[p // page_size]`. Attention reads a row's pages back in page-table order.

    With `groups` (see `window_groups`), the layers of the WINDOW group have pages of their own (a second pool, with
    its own page count) and their own page table, which lists only the pages a row's window can reach: the page-table
    argument is then (full [B, W], window [B, W'], window_start [B]), window[b, j] holding row b's positions from
    window_start[b] + j * page_size on (`view`).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    # Attention through the native CPU kernel, which reads the pages in place (kernels/native.py).
    native_attention: bool = flax.struct.field(pytree_node=False, default=False)
    # Each decoder layer one native call that writes its pages in place (`native.decoder_layer`).
    fused_layers: bool = flax.struct.field(pytree_node=False, default=False)
    # Per layer its KV cache group (FULL_GROUP or WINDOW_GROUP); None: one group, one page table.
    groups: tuple[int, ...] | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(
        cls,
        cfg: ModelConfig,
        num_pages: int,
        page_size: int,
        dtype=jnp.float32,
        native_attention: bool = False,
        fused_layers: bool = False,
        window_pages: int | None = None,
    ) -> "PagedKVCache":
        """`window_pages`: pages of the WINDOW group, for a model that has one (`window_groups`); None: one group."""
        groups = window_groups(cfg) if window_pages is not None else None
        pages = [
            window_pages if groups is not None and groups[i] == WINDOW_GROUP else num_pages
            for i in range(cfg.num_layers)
        ]
        zeros = lambda: tuple(_zeros(cfg, i, (n, page_size), dtype) for i, n in enumerate(pages))
        return cls(k=zeros(), v=zeros(), native_attention=native_attention, fused_layers=fused_layers, groups=groups)

    @property
    def num_pages(self) -> int:
        """Pages of the FULL group."""
        return self.k[self.groups.index(FULL_GROUP) if self.groups else 0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    def write(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array, page_table: jax.Array):
        """Scatters k, v [B, T, KV, hd] into their pages through page_table [B, W]; returns (cache, layer K, V)."""
        ps, num_pages = self.page_size, self.k[layer].shape[0]
        width = page_table.shape[1]
        page = jnp.take_along_axis(page_table, jnp.clip(positions // ps, 0, width - 1), axis=1)
        page = jnp.where((positions < 0) | (positions >= width * ps), num_pages, page)  # dropped
        offset = positions % ps
        # Scatter by (page, offset) into the 4-D pages: through a flattened view, XLA:CPU copies the whole pool
        # (measured: 1.3 s vs 40 ms per SmolLM2 decode step with 2048 pages).
        return _scatter(self, layer, (page, offset), k, v)

    def update(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array, page_table: jax.Array):
        """Scatters k, v [B, T, KV, hd] into their pages; returns (cache, keys, values) gathered per row.

        `page_table` is [B, W] int32; the gathered keys are [B, W * page_size, KV, hd], key j at position j.
        Here and in `write` and `read`, page tables and positions are layer `layer`'s (see `view`).
        """
        new, k_l, v_l = self.write(layer, k, v, positions, page_table)
        return new, *_gathered(k_l, v_l, page_table)

    def read(self, layer: int, page_table: jax.Array):
        """Layer `layer`'s keys and values gathered per row, as `update` returns them, without writing."""
        return _gathered(self.k[layer], self.v[layer], page_table)

    def view(self, layer: int, page_table, positions: jax.Array):
        """Layer `layer`'s page table and positions [B, T]: as given with one group; in the WINDOW group, the window
        table and the positions counted from each row's window_start (padding stays negative). Attention sees the
        same distances between queries and keys, so causal and window masks are unchanged, and reads only pages the
        window can reach."""
        if self.groups is None:
            return page_table, positions
        full, window, start = page_table
        if self.groups[layer] == FULL_GROUP:
            return full, positions
        return window, jnp.where(positions < 0, positions, positions - start[:, None])

    def group_storage(self, group: int) -> dict[str, tuple[jax.Array, ...]]:
        """The K/V arrays of `group`'s layers: the storage of that group's memory pool (one page count)."""
        mine = [i for i, g in enumerate(self.groups) if g == group]
        return {"k": tuple(self.k[i] for i in mine), "v": tuple(self.v[i] for i in mine)}

    def with_group_storages(self, storages) -> "PagedKVCache":
        """This cache with each group's arrays replaced by `storages[group]` (as `group_storage` gives them)."""
        k, v = list(self.k), list(self.v)
        for group, storage in enumerate(storages):
            for i, kk, vv in zip([i for i, g in enumerate(self.groups) if g == group], storage["k"], storage["v"]):
                k[i], v[i] = kk, vv
        return self.replace(k=tuple(k), v=tuple(v))


def _gathered(k_pages, v_pages, page_table):
    b, width = page_table.shape
    gathered = lambda pages: pages[page_table].reshape(b, width * pages.shape[1], *pages.shape[2:])
    return gathered(k_pages), gathered(v_pages)


def with_layer(cache, layer: int, k_l: jax.Array, v_l: jax.Array):
    """`cache` with layer `layer`'s K and V replaced."""
    put = lambda arrays, a: arrays[:layer] + (a,) + arrays[layer + 1 :]
    return cache.replace(k=put(cache.k, k_l), v=put(cache.v, v_l))


def _zeros(cfg: ModelConfig, i: int, lead: tuple[int, int], dtype) -> jax.Array:
    """Layer i's K (or V) pages; a layer that reads another's K/V (Gemma 4) holds none: 0 heads."""
    return jnp.zeros(lead + (cfg.layer_kv_heads(i) if cfg.layer_kv_source(i) == i else 0, cfg.layer_head_dim(i)), dtype)


def _scatter(cache, layer: int, index: tuple, k: jax.Array, v: jax.Array):
    """Writes k, v at `index` of layer `layer` (out-of-range entries dropped); returns (cache, layer K, layer V)."""
    k_l = cache.k[layer].at[index].set(k.astype(cache.k[layer].dtype), mode="drop")
    v_l = cache.v[layer].at[index].set(v.astype(cache.v[layer].dtype), mode="drop")
    return with_layer(cache, layer, k_l, v_l), k_l, v_l
