"""Orbax checkpoints of converted params: the params pytree plus `novallm_config.json`; restore needs nothing else."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from novallm_jax.config import ModelConfig
from novallm_jax.errors import ModelLoadError
from novallm_jax.loading.assemble import loading_mesh, loading_on_host
from novallm_jax.model import param_shapes

CONFIG_FILE = "novallm_config.json"
PARAMS_DIR = "params"


def is_orbax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_checkpoint(directory: str, cfg: ModelConfig, params: dict) -> None:
    """Writes params and config under `directory` (created; must not hold a checkpoint already).

    Weights held in GGUF block codes are written as their float32 values (a checkpoint holds plain arrays)."""
    from novallm_jax.kernels import native

    params = native.dequantize_params(params)
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    import orbax.checkpoint as ocp  # here, not at import: telling a checkpoint directory apart must stay cheap

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, PARAMS_DIR), params)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({"dtype": str(jax.tree.leaves(params)[0].dtype), "config": cfg.to_dict()}, f, indent=2)


def load_checkpoint(directory: str, dtype=None) -> tuple[ModelConfig, dict]:
    """Restores (config, params); the abstract tree comes from the config, so shapes are checked on restore."""
    directory = os.path.abspath(directory)
    try:
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            meta = json.load(f)
        cfg = ModelConfig.from_dict(meta["config"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{directory} holds no valid {CONFIG_FILE}: {e}") from None
    dtype = dtype or meta.get("dtype", "float32")
    abstract = param_shapes(cfg, dtype)
    on_host, mesh = loading_on_host(), loading_mesh()
    if mesh is not None:
        # Restored straight onto the mesh in the checkpoint's layout, each leaf split as `param_specs` splits it:
        # orbax reads only the shards of this process's devices. (The fused q/k/v and gate/up columns are
        # regrouped per shard afterwards, on the devices: `sharding.shard_layout`.)
        from novallm_jax.sharding import param_specs

        def restorable(a, s):  # a leaf whose checkpoint width does not split evenly is restored whole
            even = all(not axis or dim % mesh.shape[axis] == 0 for dim, axis in zip(a.shape, s.spec))
            return s if even else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

        specs = jax.tree.map(restorable, abstract, param_specs(cfg, abstract, mesh))
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, specs)
    elif on_host:  # restored to the host's memory, then to numpy (see `assemble.on_host`)
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), abstract)
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(os.path.join(directory, PARAMS_DIR), abstract)
    except Exception as e:  # orbax raises several types for missing or mismatched arrays
        raise ModelLoadError(f"could not restore params from {directory}: {e}") from None
    if on_host and mesh is None:
        params = jax.tree.map(np.array, params)  # copies: the restored arrays are freed
    return cfg, params
