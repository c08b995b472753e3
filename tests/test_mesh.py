"""Tensor and data parallelism over a mesh of 8 fake CPU devices (sharding.py), against the unsharded runs.

The device count is fixed when jax starts, so the checks run in one subprocess (tests/mesh_worker.py), which writes
its figures to a JSON file; the tests here assert on them. Mesh shapes: model=2, model=4, model=2,data=2, data=4 and
model=8 (8 query heads over 2 KV heads: each KV head copied to 4 shards).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import mesh_worker as w

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh") / "figures.json"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tests.mesh_worker", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def sizes(spec: str) -> tuple[int, int]:
    axes = dict(part.split("=") for part in spec.split(","))
    return int(axes.get("data", 1)), int(axes.get("model", 1))


CASES = [(name, spec) for name in w.CONFIGS for spec in w.meshes_of(name)]


@pytest.mark.parametrize("name,spec", CASES)
def test_logits_and_greedy_tokens_match_the_unsharded_run(figures, name, spec):
    f = figures[f"{name} {spec}"]
    # float32, every step of a ragged batch: prefill and 32 decode steps. Gemma 4's deeper chain (a norm of V, per-layer
    # inputs, experts beside the MLP) amplifies float32 sums taken in another order: up to 3.4e-5 measured (under
    # data=4 too, where no weight is split and only XLA's CPU dots at another row count differ).
    assert f["max_logit_diff"] <= (5e-5 if name.startswith("gemma4") else 1e-5)
    assert f["tokens_equal"]  # 32 greedy tokens per row
    assert f["logits_spec"] == "None"  # handed to the sampler as one device's array
    assert f["donated_in_place"]  # every device's shard of the pages updated in place


@pytest.mark.parametrize("name,spec", CASES)
def test_each_device_holds_its_shard_of_every_weight_and_page(figures, name, spec):
    cfg = w.CONFIGS[name]
    f = figures[f"{name} {spec}"]
    _, m = sizes(spec)
    kv = max(cfg.num_kv_heads, m)  # KV heads copied up to one per shard when fewer
    assert f["kv_heads"] == kv
    d, hd, ffn, vocab = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    pages = w.EXEC.num_pages, w.EXEC.page_size
    # One shard shape per array: every device holds the same share.
    assert f["kv_shards"] == [[*pages, kv // m, hd]]
    assert f["wqkv_shards"] == [[d, (cfg.num_heads + 2 * kv) * hd // m]]
    assert f["wo_shards"] == [[cfg.num_heads * hd // m, d]]
    if cfg.moe is not None:  # layer 0 is sparse: each expert's FFN split
        e, ffn = cfg.moe.num_experts, cfg.moe.expert_size
        assert f["w_gate_up_shards"] == [[e, d, 2 * ffn // m]] and f["w_down_shards"] == [[e, ffn // m, d]]
    else:
        assert f["w_gate_up_shards"] == [[d, 2 * ffn // m]] and f["w_down_shards"] == [[ffn // m, d]]
    assert f["embed_shards"] == [[vocab // m, d]]
    assert f["lm_head_shards"] == [[d, vocab // m]]


@pytest.mark.parametrize("name,spec", CASES)
def test_decode_step_has_exactly_the_expected_collectives(figures, name, spec):
    """model: one all-reduce after each layer's attention out-projection and one after its FFN down-projection, one
    for the vocab-parallel embedding lookup, one all-gather of the logits. data: each layer gathers the step's new
    K and V and their (page, slot) indices over the replicas (every replica keeps every page), plus the logits."""
    f = figures[f"{name} {spec}"]
    data, model = sizes(spec)
    layers, sparse, kv_layers = f["num_layers"], f["sparse_layers"], f["kv_layers"]
    # A sparse layer's routing of rows split over data adds two all-gathers (the routed tokens) and two all-reduces
    # (their expert outputs summed back), measured. Experts beside a layer's MLP (Gemma 4) add the all-reduce of
    # their down-projection; a layer that reads an earlier layer's K/V (Gemma 4) writes none, so gathers none.
    expected = {
        "all-reduce": (2 * layers + 1 + f["experts_beside_mlp"]) * (model > 1) + 2 * sparse * (data > 1),
        "all-gather": (model > 1) + (data > 1) * (4 * kv_layers + 1 + 2 * sparse),
        "reduce-scatter": 0,
        "all-to-all": 0,
        "collective-permute": 0,
    }
    assert f["decode_collectives"] == expected


@pytest.mark.parametrize("mode,spec", w.ENGINE_RUNS)
def test_engine_with_preemption_and_prefix_caching_matches_the_unsharded_engine(figures, mode, spec):
    alone = figures["engine none"]
    f = figures[f"engine {mode} {spec}"]
    assert alone["native_kernels"] and not f["native_kernels"]  # a mesh runs XLA's float path
    assert f["preemptions"] > 0 and f["cached_prompt_tokens"] == 40
    assert f["outputs"] == alone["outputs"]
    np.testing.assert_allclose(f["embeddings"], alone["embeddings"], atol=1e-5)  # LLM.embed on the sharded weights
    assert f["leaks"] == [] and alone["leaks"] == []
    assert f["storage_spec"] == "P(None, None, 'model', None)"  # pages still split after swaps and copies
    _, m = sizes(spec)
    kv, e = w.ENGINE_CFG.num_kv_heads, w.ENGINE_EXEC
    assert f["kv_shards"] == [[e.num_pages, e.page_size, max(kv, m) // m, w.ENGINE_CFG.head_dim]]
    # The pool reports each device's bytes: 1/model of the pages' heads, down to one (copied) head per device.
    assert f["bytes_per_device"] == alone["bytes_per_device"] * (max(kv, m) // m) // kv


def test_speculative_drafts_verify_in_sharded_padded_steps(figures):
    """Drafts verified in a mesh's padded steps (model=2,data=2), with preemption: greedy outputs equal the plain
    unsharded engine's, drafts accepted and rejected, every page back."""
    f = figures["speculative model=2,data=2"]
    assert f["outputs"] == f["want"]
    assert f["preemptions"] > 0 and 0 < f["accepted_tokens"] < f["draft_tokens"]
    assert f["leaks"] == []


@pytest.mark.parametrize("mesh,mode", w.GEMMA4_ENGINE_RUNS[1:])
def test_gemma4_through_the_engine_matches_the_unsharded_engine(figures, mesh, mode):
    """Gemma 4 split over `model` (and `data`): its window KV group recycles pages, its K/V-sharing layers keep no
    pages (their empty arrays keep their sharding through swaps), and the outputs equal one device's."""
    alone, f = figures["engine gemma4 None"], figures[f"engine gemma4 {mesh}"]
    assert f["outputs"] == alone["outputs"]
    assert f["preemptions"] > 0 and f["window_pages_recycled"] > 0
    assert f["leaks"] == [] and alone["leaks"] == []


def test_a_bad_mesh_is_refused_naming_the_field():
    from novallm_jax.errors import InvalidRequestError
    from novallm_jax.sharding import parse_mesh

    for bad, words in [
        ("model=2,foo=2", "'foo'"),
        ("model", "axis=size"),
        ("model=0", "positive"),
        ("model=64", "needs 64 devices"),
        ("model=2,model=2", "twice"),
    ]:
        with pytest.raises(InvalidRequestError, match=words) as e:
            parse_mesh(bad)
        assert e.value.param == "mesh"
    assert parse_mesh(None) is None and parse_mesh("") is None


def test_a_model_that_does_not_split_is_refused_naming_the_field():
    import dataclasses

    import jax

    from novallm_jax.errors import InvalidRequestError
    from novallm_jax.sharding import check_model

    mesh = lambda m: jax.sharding.AbstractMesh((1, m), ("data", "model"))
    cfg = w.CONFIGS["llama"]  # 8 heads, 2 KV heads, FFN 128
    check_model(cfg, mesh(8))
    moe = w.CONFIGS["qwen3_moe"]
    check_model(moe, mesh(8))
    g4, g4moe = w.CONFIGS["gemma4"], w.CONFIGS["gemma4_moe"]
    check_model(g4, mesh(8))
    check_model(g4moe, mesh(8))
    # Gemma 4 with 6 KV heads on its sliding layers and `full` on its full layers, 12 heads, FFN 96.
    gemma4_full_kv = lambda full: dataclasses.replace(
        g4, num_heads=12, num_kv_heads=6, intermediate_size=96, gemma=dataclasses.replace(g4.gemma, full_kv_heads=full)
    )
    check_model(gemma4_full_kv(6), mesh(6))
    for bad_cfg, m, words in [
        (cfg, 3, "num_heads"),
        (dataclasses.replace(cfg, num_kv_heads=4, num_heads=12), 6, "num_kv_heads"),
        (dataclasses.replace(cfg, intermediate_size=100), 8, "intermediate_size"),
        (dataclasses.replace(moe, moe=dataclasses.replace(moe.moe, expert_size=30)), 4, "experts' FFN size"),
        (gemma4_full_kv(4), 6, "the full layers' KV heads"),
        (dataclasses.replace(g4moe, gemma=dataclasses.replace(g4moe.gemma, moe_size=30)), 4, "experts' FFN size"),
    ]:
        with pytest.raises(InvalidRequestError, match=words) as e:
            check_model(bad_cfg, mesh(m))
        assert e.value.param == "mesh"


@pytest.mark.parametrize("kind", ["hf", "orbax"])
def test_a_checkpoint_loads_onto_the_mesh_one_shard_per_device(figures, kind):
    """Loading for a mesh keeps the weights in host memory until each device takes its shard: no device ever holds
    a whole split weight (so a model larger than one device loads), and the greedy tokens equal one device's."""
    sharded, single = figures[f"load {kind} model=4"], figures[f"load {kind} None"]
    assert sharded["whole_on_one_device"] == []
    assert single["whole_on_one_device"] != []  # the check sees whole weights where they are
    assert sharded["tokens"] == single["tokens"] and all(len(t) == 16 for t in sharded["tokens"])
    if kind == "hf":
        # Read slice by slice as each device took its shard (`loading.host_slices`): every byte of the file about
        # once (the replicated leaves once for all devices; the two KV heads' columns once for each of the four
        # shards that copy them), where reading whole tensors for each device would read each replicated one 4x.
        assert 0 < sharded["bytes_read_in_slices"] <= 1.3 * figures["hf file tensor bytes"]
        assert single["bytes_read_in_slices"] == 0  # one device: tensors are read whole, onto it


def test_an_orbax_checkpoint_is_restored_shard_by_shard(figures):
    """On a mesh, orbax restores each leaf already split over `model` (it reads only the shards of the process's
    devices); the fused q/k/v and gate/up columns are regrouped per shard on the devices afterwards."""
    cfg = w.ENGINE_CFG
    shards = figures["orbax restored shards"]
    assert shards["wqkv"] == [[cfg.hidden_size, (cfg.q_size + 2 * cfg.kv_size) // 4]] * 4
    assert shards["wo"] == [[cfg.q_size // 4, cfg.hidden_size]] * 4
    assert shards["w_gate_up"] == [[cfg.hidden_size, 2 * cfg.intermediate_size // 4]] * 4
    assert shards["w_down"] == [[cfg.intermediate_size // 4, cfg.hidden_size]] * 4
