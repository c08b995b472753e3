"""Each host reads only its shards: two processes on 127.0.0.1 (`jax.distributed`, 2 fake CPU devices each) load a
safetensors Qwen3 and an orbax checkpoint for `model=4`; each process's devices hold their half of every split
weight, each process reads about half of the file's split weights, and every weight sums to the one-process load's
(the q/k/v and gate/up columns regrouped per shard, KV heads copied)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from novallm_jax import sharding
from novallm_jax.loading.checkpoint import save_checkpoint
from novallm_jax.loading.hf import load_hf
from tests.test_multihost import ROOT, _free_port_pair


@pytest.fixture(scope="module")
def loads(tmp_path_factory):
    from tests.hf_models import build_hf_model, save_hf_model

    tmp = tmp_path_factory.mktemp("multihost_loading")
    hf_dir = save_hf_model(build_hf_model("qwen3"), str(tmp / "hf"))
    cfg, params = load_hf(hf_dir, np.float32)
    save_checkpoint(str(tmp / "orbax"), cfg, params)
    coordinator = f"127.0.0.1:{_free_port_pair()}"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    outs = [tmp / f"process{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.multihost_load_worker",
                coordinator,
                str(i),
                hf_dir,
                str(tmp / "orbax"),
                str(outs[i]),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    file_bytes = sum(os.path.getsize(f) for f in glob.glob(f"{hf_dir}/*.safetensors"))
    return [json.loads(o.read_text()) for o in outs], cfg, params, file_bytes


def _expected_sums(cfg, params) -> dict[str, float]:
    """Each leaf's sum in the model=4 layout, from the one-process load."""
    import jax

    mesh = type("Mesh4", (), {"shape": {"data": 1, "model": 4}})()
    laid = sharding.shard_layout(cfg, jax.tree.map(np.asarray, params), mesh)
    flat = jax.tree_util.tree_flatten_with_path(laid)[0]
    return {jax.tree_util.keystr(path): float(np.sum(np.asarray(x, np.float64))) for path, x in flat}


@pytest.mark.parametrize("kind", ["hf", "orbax"])
def test_each_process_holds_its_shards_and_they_equal_the_one_process_load(loads, kind):
    results, cfg, params, _ = loads
    want = _expected_sums(cfg, params)
    for r in results:
        assert r["local_devices"] == 2
        got = r[kind]
        width = got["wqkv_shape"][1]
        assert got["local_wqkv_shards"] == [[cfg.hidden_size, width // 4]] * 2
        assert got["sums"].keys() == want.keys()
        for name, value in want.items():
            assert got["sums"][name] == pytest.approx(value, rel=1e-5, abs=1e-4), name


def test_each_process_reads_about_half_of_the_safetensors_file(loads):
    results, _, _, file_bytes = loads
    read = [r["hf"]["bytes_read"] for r in results]
    # Half of every split weight, all of the small replicated ones (norms), each KV head's columns where they are
    # copied: well under the whole file each, about the whole file together.
    assert all(0.3 * file_bytes < n < 0.7 * file_bytes for n in read), (read, file_bytes)
    assert 0.9 * file_bytes < sum(read) < 1.4 * file_bytes, (read, file_bytes)
