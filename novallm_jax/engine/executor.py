"""The model executor: jitted steps over a paged KV cache, with shapes from a few buckets.

Every step donates the cache, so XLA updates it in place. Shapes come from buckets (rows, prompt-chunk length,
page-table width), so the number of compilations is bounded and `warmup()` compiles them all up front.

Two kinds of step:
- `prefill` (prompt chunks as rows [rows, chunk length]) and `decode` (one token per row), each padded to its
  buckets, and `verify`: decode rows with drafted tokens (speculative decoding), [rows, 1 + max_draft_tokens];
- `ragged_step`, where the tokens of every sequence in the step, prompt chunks and decode rows alike, are the rows
  of one batch [tokens, 1]: only the total is padded, and the weights are read once for all of them. It needs the
  native paged attention, which reads each row's own keys in place; XLA's attention would gather every row's whole
  page table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import os
import tempfile
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh
from tqdm.auto import tqdm

from novallm_jax import sharding
from novallm_jax.config import ModelConfig, rope_inv_freqs
from novallm_jax.errors import InvalidRequestError
from novallm_jax.kernels import native
from novallm_jax.kv_cache import NULL_PAGE, PagedKVCache, group_window
from novallm_jax.model import Params, forward, greedy_head_rows, rope_tables_per_kind
from novallm_jax.sampling_params import MAX_DRAFT_TOKENS


KV_CACHE_DTYPES = (None, "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ExecutorConfig:
    """Shapes the executor compiles for. Every field is static; together they bound the compile count."""

    page_size: int = 16
    num_pages: int = 2048
    max_model_len: int = 2048
    decode_batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    prefill_batch_buckets: tuple[int, ...] = (1, 2, 4)
    prefill_len_buckets: tuple[int, ...] = (16, 64, 128, 256)
    # Page-table widths in pages; attention gathers this many pages per row, so short sequences use narrow tables.
    page_table_buckets: tuple[int, ...] | None = None
    # Matmuls on packed float32 weights and paged attention through the native CPU kernels (kernels/native.py);
    # None: wherever they can run.
    native_kernels: bool | None = None
    # Token counts of a ragged step (see the module docstring); its largest is the most tokens one step computes.
    # None: the decode buckets, then 64, 128, 256 and 512.
    token_buckets: tuple[int, ...] | None = None
    # Whether steps are ragged (`ragged_step`, which the engine then uses); None: wherever the native attention runs.
    ragged_steps: bool | None = None
    # Each decoder layer as one native call (`native.decoder_layer`); None: wherever the native attention runs.
    fused_layers: bool | None = None
    # The K/V pages' dtype: "float32" or "bfloat16" (half the memory per token; keys and values rounded to 8
    # significant bits). None: the model's dtype.
    kv_cache_dtype: str | None = None
    # Speculative decoding: the most drafted tokens a decode row may verify. A ragged step then returns logits for
    # up to max_decode_batch * (1 + this) rows (more lm_head rows in steps of many tokens), and padded steps gain a
    # verifying shape per decode bucket (`Executor.verify`), so it is opt-in.
    max_draft_tokens: int = 0
    # Steps whose rows are all greedy take their tokens from the LM head's int8 copy and the few exact panels its
    # error bounds leave (`native.ArgmaxHead`), where the head has 16 or 32 bits a weight and runs in the native
    # kernels: the same tokens, ~a fifth of a batch-1 F16 step's bytes not read. False: every step computes logits.
    greedy_head: bool = True
    # A step's decode rows draft only while they and their drafts stay within this many tokens, shared out
    # evenly: one row drafts 7, two 3 each, four 1, eight or more none. Verifying is worth it where a step's cost
    # hardly grows with its rows, and on two CPU cores a step of 8 rows costs ~2x one row, of 32 rows ~6x: there 32
    # rows drafting 7 each made 0.65-0.85x plain decoding's tokens/s on the copy task. In padded steps a row with a
    # share drafts all its request allows (a verifying call computes 1 + max_draft_tokens positions a row anyway).
    # Where steps cost about the same for any rows (a GPU's padded steps), raise it.
    draft_step_tokens: int = 8
    # Sliding-window layers of a model that also has global ones (Gemma 2/3/4) keep their K/V in pages of their own,
    # which return to the pool once behind the window (`kv_cache.window_groups`); None: wherever a model mixes them.
    window_kv_group: bool | None = None
    # Pages of that group's pool; None: as many as every batch slot's window and the largest step need, at most
    # num_pages (`Executor.window_num_pages`).
    window_num_pages: int | None = None

    def __post_init__(self):
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, not {self.kv_cache_dtype!r}")
        for name in ("decode_batch_buckets", "prefill_batch_buckets", "prefill_len_buckets"):
            object.__setattr__(self, name, tuple(sorted(getattr(self, name))))
        if self.page_table_buckets is None:
            widths, w = [], max(1, self.prefill_len_buckets[0] // self.page_size)
            while w < self.max_pages_per_seq:
                widths.append(w)
                w *= 4
            object.__setattr__(self, "page_table_buckets", tuple(widths) + (self.max_pages_per_seq,))
        else:
            object.__setattr__(self, "page_table_buckets", tuple(sorted(self.page_table_buckets)))
        if self.page_table_buckets[-1] * self.page_size < self.max_model_len:
            raise ValueError("the widest page-table bucket must cover max_model_len")
        tokens = self.token_buckets
        if tokens is None:
            tokens = self.decode_batch_buckets + tuple(b for b in (64, 128, 256, 512) if b > self.max_decode_batch)
        object.__setattr__(self, "token_buckets", tuple(sorted(tokens)))
        if self.token_buckets[-1] < self.max_decode_batch:
            raise ValueError("the largest token bucket must hold a decode row per batch slot")
        if self.draft_step_tokens < 1:
            raise ValueError(f"draft_step_tokens must be at least 1, not {self.draft_step_tokens}")
        if not 0 <= self.max_draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"max_draft_tokens must be in [0, {MAX_DRAFT_TOKENS}], not {self.max_draft_tokens}")

    @property
    def max_pages_per_seq(self) -> int:
        return math.ceil(self.max_model_len / self.page_size)

    @property
    def max_decode_batch(self) -> int:
        return self.decode_batch_buckets[-1]

    @property
    def max_chunk(self) -> int:
        return self.prefill_len_buckets[-1]


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass
class PrefillChunk:
    """One sequence's next prompt chunk: `tokens` start at position `start`; `pages` is its page table.

    `from_slot` >= 0 marks a decode row whose one token is still on the device: the token the sampler last drew for
    that batch slot (`last_tokens[from_slot]` in the step), so a pipelined engine need not wait for it.

    `prompt_len`: the length of the sequence's prompt, for longrope (Phi-3), which rotates every token of a prompt
    longer than the original context with the long factors, as transformers does when it runs the prompt in one
    call; without it a chunk is judged by its own end, so the early chunks of such a prompt take the short factors.
    """

    tokens: Sequence[int]
    start: int
    pages: Sequence[int]
    from_slot: int = -1
    prompt_len: int = 0
    logits: int = 1  # ragged steps: logits of this many last tokens (a row verifying logits - 1 drafted tokens)
    # The sequence's pages of the window group (sliding layers, `ExecutorConfig.window_kv_group`) from page index
    # `window_first` on: those before it are behind the window of every query left, and back in the pool.
    window_pages: Sequence[int] = ()
    window_first: int = 0

    @property
    def rope_extent(self) -> int:
        """How far the sequence reaches for longrope's choice of factors (`model.rope_tables`)."""
        return max(self.start + len(self.tokens), self.prompt_len)


class Executor:
    """Runs prefill and decode steps for one model; owns the jitted functions and counts their compiles.

    `mesh` ("model=2,data=2" or a Mesh; see sharding.py): the params and the KV pages are split over it, and the
    steps are jitted with the layout's in/out shardings. The native CPU kernels are not used on a mesh of several
    devices (XLA cannot partition a foreign call); quantized weights are dequantised.
    """

    def __init__(
        self, cfg: ModelConfig, params: Params, exec_cfg: ExecutorConfig | None = None, mesh: str | Mesh | None = None
    ):
        self.cfg = cfg
        mesh = sharding.parse_mesh(mesh)
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        exec_cfg = exec_cfg or ExecutorConfig()
        if self.mesh is not None:
            sharding.check_model(cfg, self.mesh)
            exec_cfg = _rows_per_replica(exec_cfg, sharding.axis_size(self.mesh, "data"))
        self.exec_cfg = exec_cfg
        # The config the steps trace with (on a mesh: fused columns per shard, KV heads copied up to the shards).
        self.step_cfg = cfg if self.mesh is None else sharding.sharded_config(cfg, self.mesh)
        self.dtype = params["embed"].dtype
        self.kv_dtype = jnp.dtype(self.exec_cfg.kv_cache_dtype or self.dtype)
        self.native_kernels = self._use_native_kernels()
        # Block-quantised weights (a GGUF loaded with keep_quantized) only run in the native kernels.
        self.params = native.pack_params(params) if self.native_kernels else native.dequantize_params(params)
        if self.native_kernels and exec_cfg.greedy_head and self.mesh is None:
            self.params = native.with_argmax_head(self.params)
        # The most logits rows a step may return as their argmax without computing them (0: none).
        self.argmax_rows = greedy_head_rows(self.params["lm_head"])
        self._lock = threading.Lock()
        self.compile_count = 0
        self._inv_freqs = rope_inv_freqs(cfg)
        self.no_tokens = jnp.zeros(self.exec_cfg.max_decode_batch, jnp.int32)  # `last_tokens` when none is fed back
        self._ragged = jax.jit(self._traced_ragged, donate_argnames=("cache",), static_argnames=("hidden", "argmax"))
        wanted = self.exec_cfg.ragged_steps
        if wanted and not self.native_attention:
            raise ValueError("ragged_steps=True needs the native paged attention (float32 on CPU)")
        self.ragged = self.native_attention if wanted is None else wanted
        wanted = self.exec_cfg.fused_layers
        # The fused layer implements Llama's layer only (no experts).
        fusable = self.native_attention and cfg.gemma is None and cfg.moe is None and native.fusable(self.params)
        if wanted and not fusable:
            raise ValueError("fused_layers=True needs the native kernels and attention (float32 on CPU)")
        self.fused_layers = fusable if wanted is None else wanted
        # The window group's window (None: one group, as for models without sliding layers).
        self.window = group_window(cfg) if self.exec_cfg.window_kv_group in (None, True) else None
        if self.exec_cfg.window_kv_group and self.window is None:
            raise ValueError("window_kv_group=True needs a model with both sliding-window and global layers")
        # The steps by (hidden, flat) (see `_step_fn`), jitted on first use.
        self._steps: dict[tuple[bool, bool], object] = {}
        if self.mesh is not None:
            self._place_on_mesh()

    def _use_native_kernels(self) -> bool:
        wanted = self.exec_cfg.native_kernels
        possible = jax.default_backend() == "cpu" and self.dtype == jnp.float32 and self.mesh is None
        if wanted and not (possible and native.available()):
            raise ValueError(
                "native_kernels=True needs float32 weights on CPU, a C++ compiler (see the log) and no "
                "mesh of several devices"
            )
        return (possible and native.available()) if wanted is None else wanted

    def _step_fn(self, hidden: bool = False, flat: bool = False, argmax: bool = False):
        """The padded step (with `hidden`, the one that also returns every position's final hidden state; with
        `flat`, the one whose logits index is flat positions, `forward`'s `logits_rows`; with `argmax`, the one that
        returns the logits' argmax)."""
        key = hidden, flat, argmax
        if key not in self._steps:
            fn = functools.partial(self._traced_step, hidden=hidden, flat=flat, argmax=argmax)
            if self.mesh is None:
                self._steps[key] = jax.jit(fn, donate_argnames=("cache",))
            else:
                self._steps[key] = self._sharded_step(fn, hidden)
        return self._steps[key]

    def _place_on_mesh(self) -> None:
        """Lays the params out over the mesh (once) and records the shardings the steps take and return."""
        mesh = self.mesh
        params = sharding.shard_layout(self.cfg, self.params, mesh)
        self.param_shardings = sharding.param_specs(self.step_cfg, params, mesh)
        self.params = sharding.place(params, self.param_shardings)
        self.cache_shardings = sharding.cache_shardings(jax.eval_shape(self._new_cache), mesh)
        self._replicated, self._row_sharding = sharding.replicated(mesh), sharding.rows_sharding(mesh)

    def _sharded_step(self, fn, hidden: bool):
        """`fn` jitted with the mesh's layout: params and pages as sharding.py splits them, a step's rows over `data`,
        the fed-back tokens replicated; the logits (and hidden states) come back gathered (replicated)."""
        rows, rep = self._row_sharding, self._replicated
        # params, tokens, positions, cache, page_table, logits_index, rope_cs, src, last_tokens
        ins = (self.param_shardings, rows, rows, self.cache_shardings, rows, rows, rows, rows, rep)
        outs = (rep, self.cache_shardings) + ((rep,) if hidden else ())
        return jax.jit(fn, donate_argnames=("cache",), in_shardings=ins, out_shardings=outs)

    def _traced_step(
        self,
        params,
        tokens,
        positions,
        cache,
        page_table,
        logits_index,
        rope_cs,
        src,
        last_tokens,
        hidden=False,
        flat=False,
        argmax=False,
    ):
        self.compile_count += 1  # runs only while tracing, i.e. once per new shape
        logging.info("compiling step for tokens %s, page table %s", tokens.shape, jax.tree.leaves(page_table)[0].shape)
        tokens = _fed_back(tokens, src, last_tokens)
        index = {"logits_rows" if flat else "logits_index": logits_index}
        return forward(
            params,
            tokens,
            positions,
            cache,
            self.step_cfg,
            page_table,
            rope_cs=rope_cs,
            hidden=hidden,
            argmax=argmax,
            **index,
        )

    def _traced_ragged(
        self,
        params,
        tokens,
        positions,
        cache,
        page_table,
        logits_rows,
        rope_cs,
        src,
        last_tokens,
        hidden=False,
        argmax=False,
    ):
        self.compile_count += 1
        logging.info(
            "compiling ragged step for %d tokens, page table %s", tokens.shape[0], jax.tree.leaves(page_table)[0].shape
        )
        tokens = _fed_back(tokens, src, last_tokens)
        return forward(
            params,
            tokens,
            positions,
            cache,
            self.cfg,
            page_table,
            logits_rows=logits_rows,
            rope_cs=rope_cs,
            hidden=hidden,
            argmax=argmax,
        )

    @property
    def native_attention(self) -> bool:
        c = self.cfg
        # The native kernel has no soft-capping of the scores (Gemma 2).
        return (
            self.native_kernels
            and c.attn_softcap is None
            and all(
                native.supports_attention(c.layer_head_dim(i), c.num_heads, c.layer_kv_heads(i))
                for i in range(c.num_layers)
            )
        )

    @property
    def window_num_pages(self) -> int | None:
        """Pages of the window group's pool (null page included); None without a window group.

        By default enough that no step waits for them: each batch slot's window and partial pages, plus the pages of
        the most tokens one step computes; never more than num_pages, since a sequence holds no more window pages
        than pages of the full group.
        """
        if self.window is None:
            return None
        e, ps = self.exec_cfg, self.exec_cfg.page_size
        step = max(e.token_buckets[-1], e.prefill_batch_buckets[-1] * e.max_chunk + e.max_decode_batch)
        per_slot = math.ceil((self.window - 1) / ps) + 3  # the window, a partial page, a copy-on-write page
        least = per_slot + math.ceil(step / ps) + 1
        if e.window_num_pages is not None:
            if e.window_num_pages < least:
                raise ValueError(
                    f"window_num_pages={e.window_num_pages} is below the {least} pages one sequence's "
                    f"largest step may need; raise it"
                )
            return e.window_num_pages
        return min(e.num_pages, e.max_decode_batch * per_slot + least)

    def new_cache(self) -> PagedKVCache:
        """Zeroed KV pages (on a mesh, created in place on every device, each with its heads)."""
        if self.mesh is None and jax.default_backend() == "cpu":
            # Copies of host zeros (calloc'd: the OS maps zero pages, nothing is written): 0.2 s for the default
            # 1.5 GB pool, where XLA's fill of new buffers took 0.45-0.5 s on these 2-core machines.
            return jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype)), jax.eval_shape(self._new_cache))
        # One program, not one dispatch per array (~7 ms each for a 30-layer model's 60 arrays).
        if self.mesh is None:
            return jax.jit(self._new_cache)()
        return jax.jit(self._new_cache, out_shardings=self.cache_shardings)()

    def _new_cache(self) -> PagedKVCache:
        e = self.exec_cfg
        return PagedKVCache.create(
            self.step_cfg,
            e.num_pages,
            e.page_size,
            self.kv_dtype,
            native_attention=self.native_attention,
            fused_layers=self.fused_layers,
            window_pages=self.window_num_pages,
        )

    def split_cache(self, cache: PagedKVCache) -> tuple:
        """The storage of each KV cache group's memory pool: the cache itself when there is one group."""
        if cache.groups is None:
            return (cache,)
        return tuple(cache.group_storage(g) for g in range(2))

    def join_cache(self, storages: Sequence) -> PagedKVCache:
        """The cache whose groups' storages are `storages` (as `split_cache` gives them)."""
        if len(storages) == 1:
            return storages[0]
        return self._shell.with_group_storages(storages)

    @functools.cached_property
    def _shell(self) -> PagedKVCache:
        """A cache of this executor's layout without memory (its arrays are replaced by `join_cache`)."""
        e = self.exec_cfg
        return jax.eval_shape(
            lambda: PagedKVCache.create(
                self.step_cfg,
                1,
                e.page_size,
                self.kv_dtype,
                native_attention=self.native_attention,
                fused_layers=self.fused_layers,
                window_pages=1,
            )
        )

    @property
    def window_table_width(self) -> int | None:
        """Pages of a row's window-group table: what the window before a row's first query and the most tokens of
        one row reach (a page-table bucket's width when narrower)."""
        if self.window is None:
            return None
        e = self.exec_cfg
        row = max(e.token_buckets[-1] if self.ragged else 0, e.max_chunk)
        return math.ceil((self.window - 1 + row) / e.page_size) + 1

    def _tables(self, rows: int, width: int) -> list[np.ndarray]:
        """Empty page tables [rows, width]; with a window group also its table and each row's window_start (see
        `PagedKVCache`)."""
        full = np.full((rows, width), NULL_PAGE, np.int32)
        if self.window is None:
            return [full]
        window = np.full((rows, min(width, self.window_table_width)), NULL_PAGE, np.int32)
        return [full, window, np.zeros(rows, np.int32)]

    def _fill_tables(self, tables: list[np.ndarray], rows, chunk: PrefillChunk, needed: int) -> None:
        """Writes `chunk`'s pages into `rows` of the tables; the window group's from the first page its first query
        can see."""
        tables[0][rows, :needed] = chunk.pages[:needed]
        if self.window is None:
            return
        ps = self.exec_cfg.page_size
        lo = max(0, chunk.start - self.window + 1) // ps
        first, live = chunk.window_first, chunk.window_pages
        if first > lo or len(live) < needed - first:
            raise ValueError(
                f"sequence at {chunk.start}+{len(chunk.tokens)} needs its window pages from index {lo} "
                f"to {needed}; has {len(live)} from index {first}"
            )
        if needed - lo > tables[1].shape[1]:
            raise ValueError(
                f"a row of {len(chunk.tokens)} tokens reaches {needed - lo} window pages; the window "
                f"table has {tables[1].shape[1]}"
            )
        tables[1][rows, : needed - lo] = live[lo - first : needed - first]
        tables[2][rows] = lo * ps

    @staticmethod
    def _table_arg(tables: list[np.ndarray]):
        return tables[0] if len(tables) == 1 else tuple(tables)

    def step_hlo(self, rows: int, t: int, width: int) -> str:
        """The optimised HLO of the step for (rows, tokens, page-table width), as compiled (e.g. to count its
        collectives); compiles without running or counting."""
        tokens = np.zeros((rows, t), np.int32)
        positions = np.full((rows, t), -1, np.int32)
        rope_cs = rope_tables_per_kind(positions, self._inv_freqs, xp=np)
        src, last = self._feedback(tokens, None, None)
        cache = jax.eval_shape(self._new_cache)
        count = self.compile_count
        text = (
            self._step_fn()
            .lower(
                self.params,
                tokens,
                positions,
                cache,
                self._table_arg(self._tables(rows, width)),
                np.zeros(rows, np.int32),
                rope_cs,
                src,
                last,
            )
            .compile()
            .as_text()
        )
        self.compile_count = count
        return text

    def _run(
        self,
        cache,
        tokens,
        positions,
        page_table,
        logits_index,
        src=None,
        last_tokens=None,
        extents=None,
        hidden=False,
        flat=False,
        argmax=False,
    ):
        rope_cs = rope_tables_per_kind(positions, self._inv_freqs, xp=np, extents=extents)
        src, last_tokens = self._feedback(tokens, src, last_tokens)
        step = self._step_fn(hidden, flat, argmax)
        with self._lock:
            if self.mesh is None:
                return step(self.params, tokens, positions, cache, page_table, logits_index, rope_cs, src, last_tokens)
            # The sampler's state lives on one device: the fed-back tokens are broadcast to the mesh (device to
            # device), and the gathered logits are handed over as the first device's copy (no transfer). Sampling
            # on all devices at once crashes XLA:CPU's TopkDecomposer (jax 0.10.2).
            last_tokens = self._to_mesh(last_tokens)
            rows = self._global_rows((tokens, positions, page_table, logits_index, rope_cs, src))
            out = step(self.params, *rows[:2], cache, *rows[2:], last_tokens)
            local = lambda a: a.addressable_shards[0].data
            return (local(out[0]), out[1]) + ((local(out[2]),) if hidden else ())

    def _to_mesh(self, x: jax.Array) -> jax.Array:
        """`x`, on one device of this process, replicated over the mesh. With several processes (`jax.distributed`)
        each one gives its own copy (every process samples the same tokens), as the shards of one global array."""
        if self._replicated.is_fully_addressable:
            return jax.device_put(x, self._replicated)
        local = sorted(self._replicated.addressable_devices, key=lambda d: d.id)
        return jax.make_array_from_single_device_arrays(
            x.shape, self._replicated, [jax.device_put(x, d) for d in local]
        )

    def _global_rows(self, args):
        """A step's host inputs as global arrays split over `data`, when the mesh spans several processes (each
        holds the whole of every input, from the same plan); as they are otherwise."""
        if self._row_sharding.is_fully_addressable:
            return args
        sharding = self._row_sharding
        return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda i: x[i]), args)

    def _run_ragged(
        self,
        cache,
        tokens,
        positions,
        page_table,
        logits_rows,
        src=None,
        last_tokens=None,
        extents=None,
        hidden=False,
        argmax=False,
    ):
        rope_cs = rope_tables_per_kind(positions, self._inv_freqs, xp=np, extents=extents)
        src, last_tokens = self._feedback(tokens, src, last_tokens)
        args = (self.params, tokens, positions, cache, page_table, logits_rows, rope_cs, src, last_tokens)
        with self._lock:
            return self._ragged(*args, hidden=hidden, argmax=argmax)

    def _feedback(self, tokens, src, last_tokens):
        """The `src` and `last_tokens` step arguments: where each token comes from (see PrefillChunk.from_slot)."""
        if src is None:
            src = np.full(tokens.shape, -1, np.int32)
        if last_tokens is None:
            last_tokens = self.no_tokens
        elif last_tokens.shape != self.no_tokens.shape:  # another shape would compile every step again
            raise ValueError(f"last_tokens has shape {last_tokens.shape}; steps take {self.no_tokens.shape}")
        return src, last_tokens

    def prefill(
        self, cache: PagedKVCache, chunks: Sequence[PrefillChunk], padded: bool = False, hidden: bool = False
    ) -> tuple[jax.Array, PagedKVCache]:
        """Writes each chunk's K/V and returns the logits at each chunk's last token ([len(chunks), V]).

        `padded=True` returns every row of the bucket (those past len(chunks) are padding): no slice to dispatch, and
        a shape that depends only on the bucket. `hidden=True` also returns the final hidden states after the final
        norm, [rows, chunk bucket, D] (row i's tokens first), as a third result.
        """
        e = self.exec_cfg
        if not chunks:
            raise ValueError("prefill needs at least one chunk")
        rows = bucket(len(chunks), e.prefill_batch_buckets)
        longest = max(len(c.tokens) for c in chunks)
        if longest == 0:
            raise InvalidRequestError("a prefill chunk is empty", param="prompt")
        t = bucket(longest, e.prefill_len_buckets)
        # At least as wide as the chunk bucket, so that every shape used here is one `step_shapes` warms up.
        end = max(max(c.start + len(c.tokens) for c in chunks), min(t, e.page_table_buckets[-1] * e.page_size))
        tokens, positions, tables, _, extents = self._padded_rows(chunks, rows, t, self._table_width(end))
        last = np.zeros(rows, np.int32)
        last[: len(chunks)] = [len(c.tokens) - 1 for c in chunks]
        logits, cache, *states = self._run(
            cache, tokens, positions, self._table_arg(tables), last, extents=extents, hidden=hidden
        )
        return ((logits if padded else _rows(logits, len(chunks))), cache, *states)

    def decode(
        self,
        cache: PagedKVCache,
        tokens: Sequence[int],
        positions: Sequence[int],
        page_tables: Sequence[Sequence[int]],
        padded: bool = False,
        from_slots: Sequence[int] | None = None,
        last_tokens: jax.Array | None = None,
        window_tables: Sequence[tuple[int, Sequence[int]]] | None = None,
        argmax: bool = False,
    ) -> tuple[jax.Array, PagedKVCache]:
        """One decode step for each sequence: token i at positions[i]; returns logits [len(tokens), V] (every row
        of the bucket with `padded=True`, as in `prefill`), or with `argmax` their argmax [rows] (int32). Where
        from_slots[i] >= 0, token i is last_tokens[from_slots[i]] instead (a device array [max_decode_batch], e.g.
        `SamplingBatch.last_token`). `window_tables[i]`: (window_first, window_pages) of sequence i, as in
        PrefillChunk (a window group only)."""
        e = self.exec_cfg
        n = len(tokens)
        rows = bucket(n, e.decode_batch_buckets)
        width = self._table_width(max(p + 1 for p in positions))
        tok = np.zeros((rows, 1), np.int32)
        pos = np.full((rows, 1), -1, np.int32)
        tables = self._tables(rows, width)
        src = np.full((rows, 1), -1, np.int32)
        tok[:n, 0] = tokens
        pos[:n, 0] = positions
        if from_slots is not None:
            src[:n, 0] = from_slots
        for i, pages in enumerate(page_tables):
            first, live = window_tables[i] if window_tables is not None else (0, ())
            chunk = PrefillChunk((0,), positions[i], pages, window_pages=live, window_first=first)
            self._fill_tables(tables, i, chunk, self._pages_needed(chunk))
        index = np.zeros(rows, np.int32)
        logits, cache = self._run(cache, tok, pos, self._table_arg(tables), index, src, last_tokens, argmax=argmax)
        return (logits if padded else _rows(logits, n)), cache

    def verify(
        self, cache: PagedKVCache, rows: Sequence[PrefillChunk], last_tokens: jax.Array | None = None
    ) -> tuple[jax.Array, PagedKVCache]:
        """A padded decode step whose rows may verify drafted tokens: row i's tokens (its last token, then its
        drafts) at positions start..; returns the logits of each row's last `logits` tokens, row after row, padded to
        [decode bucket * (1 + max_draft_tokens), V]: the layout of a ragged step's. A row's first token may come from
        `last_tokens` (`PrefillChunk.from_slot`)."""
        e = self.exec_cfg
        t = 1 + e.max_draft_tokens
        if e.max_draft_tokens == 0 or not rows or any(not 0 < len(r.tokens) <= t for r in rows):
            raise ValueError(f"verify takes rows of 1 to {t} tokens (ExecutorConfig.max_draft_tokens)")
        n = bucket(len(rows), e.decode_batch_buckets)
        width = self._table_width(max(r.start + len(r.tokens) for r in rows))
        tokens, positions, tables, src, extents = self._padded_rows(rows, n, t, width)
        flat = np.zeros(n * t, np.int32)
        out = 0
        for i, r in enumerate(rows):
            flat[out : out + r.logits] = i * t + np.arange(len(r.tokens) - r.logits, len(r.tokens))
            out += r.logits
        return self._run(
            cache, tokens, positions, self._table_arg(tables), flat, src, last_tokens, extents=extents, flat=True
        )

    def _padded_rows(self, chunks: Sequence[PrefillChunk], rows: int, t: int, width: int):
        """`chunks` as the first rows of a padded step [rows, t]: tokens, positions (-1: padding), page tables of
        `width` pages, where each row's first token comes from (`PrefillChunk.from_slot`), and rope extents."""
        tokens = np.zeros((rows, t), np.int32)
        positions = np.full((rows, t), -1, np.int32)
        tables = self._tables(rows, width)
        src = np.full((rows, t), -1, np.int32)
        extents = np.zeros(rows, np.int32)
        for i, c in enumerate(chunks):
            n = len(c.tokens)
            needed = self._pages_needed(c)
            tokens[i, :n] = c.tokens
            positions[i, :n] = np.arange(c.start, c.start + n)
            src[i, 0] = c.from_slot
            extents[i] = c.rope_extent
            self._fill_tables(tables, i, c, needed)
        return tokens, positions, tables, src, extents

    def verify_shapes(self) -> list[tuple[int, int, int]]:
        """The (rows, tokens, page-table width) of `verify` steps: none unless padded steps verify drafts."""
        e = self.exec_cfg
        if self.ragged or not e.max_draft_tokens:
            return []
        return [
            (b, 1 + e.max_draft_tokens, w) for b, w in itertools.product(e.decode_batch_buckets, e.page_table_buckets)
        ]

    def ragged_step(
        self,
        cache: PagedKVCache,
        seqs: Sequence[PrefillChunk],
        last_tokens: jax.Array | None = None,
        hidden: bool = False,
        argmax: bool = False,
    ) -> tuple[jax.Array, PagedKVCache]:
        """One ragged step: the tokens of every sequence (a prompt chunk, or a decode row's one token) as the rows
        of one batch. Returns logits [R, V], row i at the last token of seqs[i] (R >= len(seqs): the rest pad), or
        with `PrefillChunk.logits` > 1 the logits of each sequence's last `logits` tokens, in order; with `argmax`,
        their argmax [R] (int32).
        `last_tokens` feeds the rows marked `from_slot` (see PrefillChunk). `hidden=True` also returns the final
        hidden states after the final norm, [tokens bucket, 1, D] (the sequences' tokens in order), as a third
        result."""
        e = self.exec_cfg
        if not self.ragged:
            raise ValueError("this executor runs prefill and decode steps (see ExecutorConfig.ragged_steps)")
        if not seqs or any(len(s.tokens) == 0 for s in seqs):
            raise InvalidRequestError("a ragged step needs at least one sequence, each with a token", param="prompt")
        if len(seqs) > e.max_decode_batch:
            raise ValueError(f"{len(seqs)} sequences in one step; at most {e.max_decode_batch} (a batch slot each)")
        n = sum(len(s.tokens) for s in seqs)
        rows = bucket(n, e.token_buckets)
        width = self._table_width(max(s.start + len(s.tokens) for s in seqs))
        tokens = np.zeros((rows, 1), np.int32)
        positions = np.full((rows, 1), -1, np.int32)
        tables = self._tables(rows, width)
        src = np.full((rows, 1), -1, np.int32)
        last = np.zeros(self._logits_rows(rows), np.int32)
        if sum(s.logits for s in seqs) > len(last):
            raise ValueError(
                f"{sum(s.logits for s in seqs)} logits rows in a step of {rows} tokens; at most "
                f"{len(last)} (ExecutorConfig.max_draft_tokens, draft_step_tokens)"
            )
        extents = np.zeros(rows, np.int32)  # each token's sequence's end in this step (longrope's choice)
        at = out = 0
        for s in seqs:
            k = len(s.tokens)
            needed = self._pages_needed(s)
            extents[at : at + k] = s.rope_extent
            tokens[at : at + k, 0] = s.tokens
            if s.from_slot >= 0:
                src[at, 0] = s.from_slot
            positions[at : at + k, 0] = np.arange(s.start, s.start + k)
            self._fill_tables(tables, slice(at, at + k), s, needed)
            at += k
            last[out : out + s.logits] = np.arange(at - s.logits, at)
            out += s.logits
        return self._run_ragged(
            cache, tokens, positions, self._table_arg(tables), last, src, last_tokens, extents, hidden, argmax
        )

    def argmax_fits(self, seqs: Sequence[PrefillChunk]) -> bool:
        """Whether this executor's step over `seqs` (a ragged step, or a decode step where steps are not ragged) has at
        most `argmax_rows` logits rows: its argmax then comes from the greedy head without the logits."""
        if not self.argmax_rows or not seqs:
            return False
        e = self.exec_cfg
        if self.ragged:
            rows = bucket(sum(len(s.tokens) for s in seqs), e.token_buckets)
        else:
            rows = bucket(len(seqs), e.decode_batch_buckets)
        return self._out_rows(rows, 1, verify=False) <= self.argmax_rows

    def _table_width(self, end: int) -> int:
        """Page-table width (a bucket, in pages) of a step whose sequences end before position `end`."""
        e = self.exec_cfg
        return bucket(end, [w * e.page_size for w in e.page_table_buckets]) // e.page_size

    def _pages_needed(self, chunk: PrefillChunk) -> int:
        """Pages that hold `chunk`'s sequence up to its last token; a ValueError if its table is shorter."""
        end = chunk.start + len(chunk.tokens)
        needed = math.ceil(end / self.exec_cfg.page_size)
        if len(chunk.pages) < needed:
            raise ValueError(
                f"sequence at {chunk.start}+{len(chunk.tokens)} needs {needed} pages, has {len(chunk.pages)}"
            )
        return needed

    def _logits_rows(self, tokens: int) -> int:
        # One count per token bucket (not per sequence count) keeps one compile per shape. A step needs a logits row
        # per sequence (at most a batch slot's worth) and one per drafted token, which its decode rows share out
        # (at most draft_step_tokens, `Scheduler._drafting`): more rows would run the lm_head on prompt tokens.
        e = self.exec_cfg
        return min(tokens, e.max_decode_batch + min(e.max_decode_batch * e.max_draft_tokens, e.draft_step_tokens))

    def logits_row_counts(self) -> tuple[int, ...]:
        """Every row count of the logits a step returns (with `padded=True`): what the sampler is compiled for."""
        e = self.exec_cfg
        if self.ragged:
            return tuple(sorted({self._logits_rows(n) for n in e.token_buckets}))
        verify = {rows * tokens for rows, tokens, _ in self.verify_shapes()}
        return tuple(sorted(set(e.decode_batch_buckets) | set(e.prefill_batch_buckets) | verify))

    def step_shapes(self) -> list[tuple[int, int, int]]:
        """Every (rows, tokens, page-table width) the executor can run: the warm-up set (ragged steps: tokens 1)."""
        e = self.exec_cfg
        if self.ragged:
            return [(n, 1, w) for n, w in itertools.product(e.token_buckets, e.page_table_buckets)]
        shapes = [(b, 1, w) for b, w in itertools.product(e.decode_batch_buckets, e.page_table_buckets)]
        for b, t, w in itertools.product(e.prefill_batch_buckets, e.prefill_len_buckets, e.page_table_buckets):
            if w * e.page_size >= t and (b, t, w) not in shapes:
                shapes.append((b, t, w))
        return shapes

    def warmup_shapes(self) -> list[tuple[tuple[int, int, int], bool, bool]]:
        """(shape, verify, argmax) of every step program: `step_shapes`, `verify_shapes` (verify), and the greedy
        head's variants (argmax) of the step shapes of one token a row and at most `argmax_rows` logits rows."""
        shapes = [(shape, False) for shape in self.step_shapes()] + [(shape, True) for shape in self.verify_shapes()]
        return [
            (shape, verify, argmax)
            for shape, verify in shapes
            for argmax in (False, True)
            if not argmax or (not verify and shape[1] == 1 and self._out_rows(*shape[:2], verify) <= self.argmax_rows)
        ]

    def _out_rows(self, rows: int, t: int, verify: bool) -> int:
        """Logits rows of a step program of `rows` x `t` tokens."""
        return self._logits_rows(rows) if self.ragged else rows * t if verify else rows

    def warmup(self, cache: PagedKVCache) -> PagedKVCache:
        """Compiles every program of `warmup_shapes` (writing only to the null page); returns the cache."""
        for (rows, t, width), verify, argmax in tqdm(self.warmup_shapes(), desc="compiling", unit="shape", leave=False):
            tokens = np.zeros((rows, t), np.int32)
            positions = np.full((rows, t), -1, np.int32)
            table = self._table_arg(self._tables(rows, width))
            index = np.zeros(self._out_rows(rows, t, verify), np.int32)
            if self.ragged:
                _, cache = self._run_ragged(cache, tokens, positions, table, index, argmax=argmax)
            else:
                _, cache = self._run(cache, tokens, positions, table, index, flat=verify, argmax=argmax)
        jax.block_until_ready(cache)
        logging.info("warm-up compiled %d step shapes", self.compile_count)
        return cache


def _rows_per_replica(e: ExecutorConfig, replicas: int) -> ExecutorConfig:
    """`e` with every row bucket a multiple of `replicas`, so a step's rows split evenly over the `data` axis."""
    if replicas == 1:
        return e
    up = lambda buckets: tuple(sorted({-(-b // replicas) * replicas for b in buckets}))
    return dataclasses.replace(
        e,
        decode_batch_buckets=up(e.decode_batch_buckets),
        prefill_batch_buckets=up(e.prefill_batch_buckets),
        token_buckets=up(e.token_buckets),
    )


def _fed_back(tokens: jax.Array, src: jax.Array, last_tokens: jax.Array) -> jax.Array:
    """`tokens`, with last_tokens[src] wherever src >= 0."""
    return jnp.where(src >= 0, last_tokens[jnp.maximum(src, 0)], tokens)


def _rows(logits: jax.Array, n: int) -> jax.Array:
    """The first n rows (a no-op slice would still cost a dispatch)."""
    return logits if logits.shape[0] == n else logits[:n]


def default_compilation_cache_dir() -> str:
    """$XDG_CACHE_HOME (or ~/.cache)/novallm-jax/xla/jax-V-jaxlib-V: an upgrade of jax or jaxlib starts a cache of its
    own instead of loading entries another version wrote."""
    import jaxlib

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "novallm-jax", "xla", f"jax-{jax.__version__}-jaxlib-{jaxlib.__version__}")


def enable_compilation_cache(directory: str) -> None:
    """Turns on JAX's persistent compilation cache, so a second start loads compiled steps instead of compiling."""
    _drop_unreadable_entries(directory)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


_CHECKED = ".novallm-checked"  # the entries found readable before: "name size mtime_ns" per line


@functools.cache
def _drop_unreadable_entries(directory: str) -> None:
    """Removes cache entries that do not decompress (a truncated write, a full disk), once per process.

    JAX skips such an entry with a warning but never replaces it (it writes only new keys), so every later start
    would compile that step again; removed, it is compiled once more and written anew. Only entries not found
    readable before (by name, size and mtime, listed in `_CHECKED`) are read: a start reads what the last one wrote.
    """
    try:
        from jax._src.compilation_cache import decompress_executable
    except ImportError:  # a jax without it: entries are not checked
        return
    if not os.path.isdir(directory):
        return
    listed = os.path.join(directory, _CHECKED)
    try:
        with open(listed) as f:
            known = set(f.read().splitlines())
    except OSError:
        known = set()
    readable = []
    for entry in os.scandir(directory):
        if not entry.name.endswith("-cache"):
            continue
        with contextlib.suppress(OSError):
            st = entry.stat()
            key = f"{entry.name} {st.st_size} {st.st_mtime_ns}"
            if key not in known:
                try:
                    with open(entry.path, "rb") as f:
                        decompress_executable(f.read())
                except Exception as e:  # zstd and zlib raise their own error types
                    logging.warning(
                        "compilation cache entry %s is unreadable (%s: %s): removed, to be compiled again",
                        entry.path,
                        type(e).__name__,
                        e,
                    )
                    os.remove(entry.path)
                    continue
            readable.append(key)
    if set(readable) != known:
        with contextlib.suppress(OSError):
            with tempfile.NamedTemporaryFile("w", dir=directory, prefix=_CHECKED, delete=False) as f:
                f.write("\n".join(readable))
            os.replace(f.name, listed)
