"""The layout of every parameter and KV cache array on a mesh with axes ("data", "model"), in one place.

Tensor parallelism over `model` (Megatron's layout): q/k/v heads and the FFN's hidden units are split over the
shards, whose matmul inputs (hidden states) are replicated; `wo` and `w_down` take their shard's rows, so each
layer ends its attention and its FFN with one all-reduce. The embedding and `lm_head` are split over the vocabulary,
and the logits are gathered. When there are fewer KV heads than shards, each KV head is copied to the shards whose
query heads read it (as GQA serving does elsewhere): every device still holds one head of every page.

The paged KV cache is split by KV heads over `model` and replicated over `data`: a page id means the same slot on
every device, so the memory pool, prefix cache, preemption and leak accounting do not know about the mesh.

Data parallelism over `data`: a step's rows (tokens, positions, page tables) are split over the replicas, each
computing its own rows with a whole copy of the weights' `model` shards; the new keys and values of a step are
gathered over `data` before they are written, so every replica's pages stay the same.

A mixture of experts splits every expert's FFN hidden units the same way (the router is replicated).

The fused q/k/v and gate/up matmuls keep one weight each: `shard_layout` reorders their columns so that a contiguous
split gives each shard its own heads (see `ModelConfig.model_shards` and `model.split_columns`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from novallm_jax.config import ModelConfig
from novallm_jax.errors import InvalidRequestError
from novallm_jax.loading.host_slices import HostSlices, take_columns

AXES = ("data", "model")

# Per layer leaf: its PartitionSpec under tensor parallelism (columns of [in, out] weights over `model` for the
# matmuls that open a block, rows for those that close one). Leaves not named here are replicated.
_LAYER_SPECS = {
    "wqkv": P(None, "model"),
    "bqkv": P("model"),
    "wo": P("model", None),
    "w_gate_up": P(None, "model"),
    "w_down": P("model", None),
    # Mixture of experts: every expert's FFN hidden units over `model` (the router is replicated).
    "experts_gate_up": P(None, None, "model"),
    "experts_down": P(None, "model", None),
}
# KV pages [num_pages, page_size, kv_heads, head_dim]: heads over `model`, replicated over `data`.
KV_PAGES = P(None, None, "model", None)
ROWS = P("data")  # a step's row-indexed inputs (tokens, positions, page tables, RoPE tables)
REPLICATED = P()
_AUTO = (jax.sharding.AxisType.Auto,) * 2  # shardings are given at each jit boundary; XLA propagates them inside


def _mesh_error(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="mesh")


def parse_mesh(mesh: str | Mapping[str, int] | Mesh | None) -> Mesh | None:
    """A Mesh with axes ("data", "model") from "model=4,data=2" (a missing axis is 1), a {axis: size} mapping or a
    `jax.sharding.Mesh` (axes among "data" and "model"); None or "" for none. The first data * model devices."""
    if mesh is None or (isinstance(mesh, str) and not mesh.strip()):
        return None
    if isinstance(mesh, Mesh):
        names, devices = list(mesh.axis_names), np.asarray(mesh.devices)
        unknown = [a for a in names if a not in AXES]
        if unknown:
            raise _mesh_error(f"mesh axis {unknown[0]!r} is not one of {AXES}; name the axes 'data' and 'model'")
        for a in AXES:  # a missing axis has size 1
            if a not in names:
                devices, names = devices[..., None], names + [a]
        return Mesh(devices.transpose([names.index(a) for a in AXES]), AXES, axis_types=_AUTO)
    if isinstance(mesh, str):
        sizes = {}
        for part in mesh.split(","):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or not value.strip().lstrip("-").isdigit():
                raise _mesh_error(f"mesh entry {part.strip()!r} is not axis=size; write e.g. 'model=4,data=2'")
            if name in sizes:
                raise _mesh_error(f"mesh axis {name!r} is given twice in {mesh!r}")
            sizes[name] = int(value)
    else:
        sizes = dict(mesh)
    for name, size in sizes.items():
        if name not in AXES:
            raise _mesh_error(f"mesh axis {name!r} is not one of {AXES}; write e.g. 'model=4,data=2'")
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise _mesh_error(f"mesh axis {name!r} has size {size!r}; sizes are positive integers")
    shape = (sizes.get("data", 1), sizes.get("model", 1))
    available = jax.devices()
    if math.prod(shape) > len(available):
        raise _mesh_error(
            f"mesh data={shape[0]},model={shape[1]} needs {math.prod(shape)} devices; {len(available)} "
            f"{available[0].platform} device(s) are available (on CPU, XLA_FLAGS="
            f"--xla_force_host_platform_device_count=N fakes N, set before jax starts)"
        )
    return jax.make_mesh(shape, AXES, axis_types=_AUTO, devices=available[: math.prod(shape)])


def axis_size(mesh: Mesh | None, axis: str) -> int:
    return 1 if mesh is None else dict(mesh.shape).get(axis, 1)


def check_model(cfg: ModelConfig, mesh: Mesh) -> None:
    """Refuses a model whose heads or FFN do not split over the mesh's `model` axis, naming the field."""
    m = axis_size(mesh, "model")
    if m == 1:
        return
    expert_size = cfg.moe.expert_size if cfg.moe is not None else (cfg.gemma.moe_size if cfg.gemma else 0)
    if expert_size % m:
        raise _mesh_error(f"the experts' FFN size ({expert_size}) is not divisible by the mesh's model axis ({m})")
    if cfg.num_heads % m:
        raise _mesh_error(f"num_heads ({cfg.num_heads}) is not divisible by the mesh's model axis ({m})")
    # Gemma's full-attention layers may have K/V heads of their own count.
    full_kv = cfg.gemma.full_kv_heads if cfg.gemma is not None else None
    for name, kv in (("num_kv_heads", cfg.num_kv_heads), ("the full layers' KV heads", full_kv)):
        if kv and kv % m and m % kv:
            raise _mesh_error(
                f"{name} ({kv}) and the mesh's model axis ({m}) must divide one another, so that "
                f"each shard holds whole KV heads or one copy of a KV head"
            )
    if cfg.intermediate_size % m:
        raise _mesh_error(
            f"intermediate_size ({cfg.intermediate_size}) is not divisible by the mesh's model axis ({m})"
        )


def sharded_config(cfg: ModelConfig, mesh: Mesh) -> ModelConfig:
    """The config the steps run under: fused columns laid out per shard and, with fewer KV heads than shards, each
    KV head copied to every shard that reads it (`num_kv_heads` = shards)."""
    m = axis_size(mesh, "model")
    if m == 1:
        return cfg
    g = cfg.gemma
    if g is not None and g.full_kv_heads:
        g = dataclasses.replace(g, full_kv_heads=max(g.full_kv_heads, m))
    return dataclasses.replace(cfg, num_kv_heads=max(cfg.num_kv_heads, m), model_shards=m, gemma=g)


def shard_layout(cfg: ModelConfig, params: dict, mesh: Mesh) -> dict:
    """`params` (float leaves, the checkpoint's layout) in the layout of `sharded_config(cfg, mesh)`: q/k/v and
    gate/up columns grouped per shard, KV heads copied when fewer than shards. The identity for model=1."""
    m = axis_size(mesh, "model")
    if m == 1:
        return params

    def qkv_columns(width: int, i: int) -> np.ndarray:  # [q + k + v] -> per shard [its q, its k, its v heads]
        from novallm_jax.model_gemma import layer_widths

        # Gemma's layers differ: head size and K/V heads by kind, no K/V where a layer reads another's, no V where
        # the keys are the values.
        q_w, k_w, _, _ = layer_widths(cfg, i) if cfg.gemma is not None else (cfg.q_size, cfg.kv_size, 0, 0)
        hd, copies = cfg.layer_head_dim(i), max(1, m // cfg.layer_kv_heads(i))
        q, k, v = np.split(np.arange(width), [q_w, q_w + k_w])
        heads = lambda a: np.repeat(a.reshape(-1, hd), copies, axis=0).reshape(-1)
        return _interleave([a for a in (q, heads(k), heads(v)) if a.size], m)

    def gate_up_columns(width: int) -> np.ndarray:
        return _interleave(np.split(np.arange(width), 2), m)

    # Each regrouping is a gather of columns, computed once on their indices: lazy for host weights
    # (`loading.host_slices`), so that a device's shard reads only its columns of the file.
    regroup = lambda w, columns: take_columns(w, columns(w.shape[-1]))
    layers = []
    for i, p in enumerate(params["layers"]):
        p = dict(p)
        p["wqkv"] = regroup(p["wqkv"], lambda n: qkv_columns(n, i))
        if "bqkv" in p:
            p["bqkv"] = regroup(p["bqkv"], lambda n: qkv_columns(n, i))
        for name in ("w_gate_up", "experts_gate_up"):  # a sparse layer has experts instead of the dense MLP
            if name in p:
                p[name] = regroup(p[name], gate_up_columns)
        layers.append(p)
    return {**params, "layers": layers}


def _interleave(parts: list[np.ndarray], m: int) -> np.ndarray:
    """Concatenates index vectors (each split into m contiguous groups) as group 0 of each, group 1 of each, ..."""
    return np.concatenate([a.reshape(m, -1) for a in parts], axis=-1).reshape(-1)


def place(params: dict, shardings: dict) -> dict:
    """Each leaf of `params` on its sharding. A host (numpy) leaf gives each of this process's devices only its own
    slice; with several processes (`jax.distributed`), each places only its devices' shards."""

    def put(x, s):
        if isinstance(x, (np.ndarray, HostSlices)):
            # A copy of each slice: a device on the host may alias the memory it is given, and a view would keep
            # the whole weight alive. A `HostSlices` leaf reads only this slice from its file, once for all the
            # devices that hold the same slice (replicas).
            read: dict = {}

            def shard(index):
                key = tuple((part.start, part.stop) for part in index)
                if key not in read:
                    read[key] = np.asarray(x[index])
                return np.array(read[key])

            return jax.make_array_from_callback(x.shape, s, shard)
        return jax.device_put(x, s)

    leaves, treedef = jax.tree.flatten(params)
    # Host leaves are read (from their files, for `HostSlices`) as they are placed: the long part of a mesh's load.
    progress = tqdm(total=len(leaves), desc="weights onto the mesh", unit="tensor", leave=False)
    placed = []
    for x, s in zip(leaves, treedef.flatten_up_to(shardings)):
        placed.append(put(x, s))
        progress.update()
    progress.close()
    return jax.tree.unflatten(treedef, placed)


def param_specs(cfg: ModelConfig, params: dict, mesh: Mesh) -> dict:
    """A NamedSharding for each leaf of `params` (as laid out by `shard_layout`)."""
    m = axis_size(mesh, "model")
    named = lambda spec: NamedSharding(mesh, spec if m > 1 else REPLICATED)
    vocab_split = m > 1 and cfg.vocab_size % m == 0
    if m > 1 and not vocab_split:
        logging.warning(
            "vocab_size %d is not divisible by model=%d: the embedding and lm_head are replicated", cfg.vocab_size, m
        )

    def spec(path, leaf) -> NamedSharding:
        name = getattr(path[-1], "key", None)
        if len(path) >= 3 and getattr(path[0], "key", None) == "layers":
            return named(_LAYER_SPECS.get(name, REPLICATED))
        if name == "embed" and vocab_split:
            return named(P("model", None))
        if name == "lm_head" and vocab_split:
            return named(P(None, "model"))
        return named(REPLICATED)

    return jax.tree_util.tree_map_with_path(spec, params)


def kv_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, KV_PAGES)


def rows_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, ROWS)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, REPLICATED)


def cache_shardings(cache: Any, mesh: Mesh) -> Any:
    """The NamedSharding of every leaf of a KV cache pytree (pages split by heads)."""
    return jax.tree.map(lambda _: kv_sharding(mesh), cache)


def bytes_per_device(tree: Any) -> int:
    """The bytes of `tree`'s arrays that each device holds (its largest share)."""
    per: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        if not hasattr(leaf, "sharding"):
            continue
        shard = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for d in leaf.sharding.device_set:
            per[d] = per.get(d, 0) + shard
    return max(per.values(), default=0)
