"""One of the two processes (2 fake CPU devices each) that test_multihost_loading.py starts: loads a safetensors and
an orbax checkpoint for `model=4` over both processes, as `LLM(mesh=...)` does, and writes what it read and what
its devices hold to a JSON file."""

from __future__ import annotations

import json

from absl import logging

from novallm_jax import distributed


def leaf_sums(params) -> dict[str, float]:
    """Each leaf's sum, computed on the mesh (a collective over both processes) and read back replicated."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    mesh = flat[0][1].sharding.mesh
    sums = jax.jit(lambda xs: [jnp.sum(x) for x in xs], out_shardings=NamedSharding(mesh, PartitionSpec()))
    return {jax.tree_util.keystr(path): float(s) for (path, _), s in zip(flat, sums([x for _, x in flat]))}


def main(coordinator: str, process_id: str, hf_dir: str, orbax_dir: str, out: str) -> int:
    distributed.initialize(distributed.cluster_from(coordinator, 2, int(process_id)))
    import jax

    from novallm_jax import sharding
    from novallm_jax.loading.assemble import on_host
    from novallm_jax.loading.checkpoint import load_checkpoint
    from novallm_jax.loading.hf import load_hf
    from novallm_jax.loading.host_slices import bytes_read

    mesh = sharding.parse_mesh("model=4")
    result = {"local_devices": len(jax.local_devices())}
    for kind, load in (("hf", lambda: load_hf(hf_dir, "float32")), ("orbax", lambda: load_checkpoint(orbax_dir))):
        before = bytes_read()
        with on_host(mesh):
            cfg, params = load()
        step_cfg = sharding.sharded_config(cfg, mesh)
        params = sharding.shard_layout(cfg, params, mesh)
        params = sharding.place(params, sharding.param_specs(step_cfg, params, mesh))
        wqkv = params["layers"][0]["wqkv"]
        result[kind] = {
            "bytes_read": bytes_read() - before,
            "local_wqkv_shards": [list(s.data.shape) for s in wqkv.addressable_shards],
            "wqkv_shape": list(wqkv.shape),
            "sums": leaf_sums(params),
        }
    with open(out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    from tests.multihost_worker import run_process

    run_process(main, logging.WARNING)
