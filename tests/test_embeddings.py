"""Prefill-only forwards against transformers on a random Llama: LLM.embed (last and mean pooling, normalised or not)
and LLM.hidden_states equal transformers' hidden states within 1e-4, prompt_logprobs its log_softmax; /v1/embeddings
through the openai client; no KV page is left behind."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import openai
import pytest
import torch

from novallm_jax.engine.engine import EngineConfig, LLMEngine
from novallm_jax.engine.executor import ExecutorConfig
from novallm_jax.errors import InvalidRequestError
from novallm_jax.llm import LLM
from novallm_jax.loading import load_model
from novallm_jax.sampling_params import SamplingParams
from novallm_jax.serving.app import ServerConfig
from novallm_jax.serving.runner import BackgroundServer
from tests.hf_models import build_hf_model, save_hf_model
from tests.test_serving_support import is_openai_error, shared_tokenizer

PROMPTS = [[1, 5, 9, 200, 31], [1, 7, 7, 7, 100, 101, 102, 103, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 2]]
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_and_llm(tmp_path_factory):
    model = build_hf_model("llama2", seed=3)
    path = save_hf_model(model, str(tmp_path_factory.mktemp("embed_llama")))
    config = EngineConfig(
        executor=ExecutorConfig(
            page_size=8,
            num_pages=64,
            max_model_len=128,
            decode_batch_buckets=(4,),
            prefill_batch_buckets=(1,),
            prefill_len_buckets=(32,),
        )
    )
    cfg, params = load_model(path)
    llm = LLM.from_engine(LLMEngine(cfg, params, shared_tokenizer(), config), "embed-llama")
    yield model, llm
    llm.close()


def _reference(model, ids: list[int]) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        out = model.model(torch.tensor([ids]), output_hidden_states=True)
    return tuple(h[0].numpy() for h in out.hidden_states)


def test_embed_and_hidden_states_equal_transformers(hf_and_llm):
    model, llm = hf_and_llm
    refs = [_reference(model, ids) for ids in PROMPTS]
    before = llm.engine.counters["prefill_tokens"]
    for pooling in ("last", "mean"):
        for normalize in (True, False):
            got = llm.embed(PROMPTS, pooling=pooling, normalize=normalize)
            want = np.stack([r[-1][-1] if pooling == "last" else r[-1].mean(axis=0) for r in refs])
            if normalize:
                want = want / np.linalg.norm(want, axis=-1, keepdims=True)
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # Embedding requests of the engine: their prompts ran in its steps (the prefix cache spares some pages of the
    # prompts of "last" pooling after the first call).
    assert llm.engine.counters["prefill_tokens"] - before >= 3 * sum(map(len, PROMPTS))
    states = llm.hidden_states(PROMPTS[1])
    ref = refs[1]
    assert states.shape == (len(ref), len(PROMPTS[1]), ref[0].shape[-1])
    for layer in range(len(ref) - 1):  # transformers' last entry is after the final norm
        np.testing.assert_allclose(states[layer], ref[layer], atol=TOL, rtol=0)
    assert llm.engine.check_leaks() == [] and llm.engine.stats()["running"] == 0
    with pytest.raises(Exception, match="pooling"):
        llm.embed(PROMPTS, pooling="max")


def test_embeddings_endpoint_through_the_openai_client(hf_and_llm):
    model, llm = hf_and_llm
    with BackgroundServer(llm, ServerConfig()) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=60.0, max_retries=0)
        r = client.embeddings.create(model="embed-llama", input=PROMPTS)
        want = llm.embed(PROMPTS)
        assert [d.index for d in r.data] == [0, 1, 2]
        np.testing.assert_allclose(np.array([d.embedding for d in r.data]), want, atol=1e-6)
        assert r.usage.prompt_tokens == sum(map(len, PROMPTS)) == r.usage.total_tokens
        # Text (this random model's 256-token vocabulary is the first ids of SmolLM2's tokenizer: "an" is id 276,
        # "at" 261, "on" 258, outside it; "in" 254 and "a" 81 are inside).
        text = client.embeddings.create(model="embed-llama", input=["in", "a"], encoding_format="float")
        np.testing.assert_allclose(np.array([d.embedding for d in text.data]), llm.embed([[254], [81]]), atol=1e-6)
        raw = httpx.post(
            srv.url + "/v1/embeddings", json={"model": "embed-llama", "input": PROMPTS[0], "encoding_format": "base64"}
        ).json()
        vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), np.float32)
        np.testing.assert_allclose(vec, want[0], atol=1e-6)
        for body, param in (
            ({"input": []}, "input"),
            ({"input": [[]]}, "input"),
            ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
            ({"input": [[10**6]]}, "input"),
            ({"input": "\ud800"}, "input"),
        ):
            bad = httpx.post(
                srv.url + "/v1/embeddings",
                headers={"Content-Type": "application/json"},
                content=json.dumps({"model": "embed-llama", **body}),
            )
            assert bad.status_code == 400 and is_openai_error(bad.json()), (body, bad.text)
            assert bad.json()["error"]["param"].startswith(param), bad.json()
    assert llm.engine.check_leaks() == []


def test_prompt_logprobs_equal_transformers_log_softmax(hf_and_llm):
    model, llm = hf_and_llm
    ids = PROMPTS[1]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1).numpy()
    k = 5
    result = llm.generate([ids], SamplingParams(max_tokens=2, prompt_logprobs=k))[0]
    got = result.prompt_logprobs
    assert got[0] is None and len(got) == len(ids)
    for t in range(1, len(ids)):
        entry = got[t]
        assert entry.token_id == ids[t]
        assert abs(entry.logprob - ref[t - 1, ids[t]]) < TOL
        top = np.argsort(-ref[t - 1])[:k]
        assert list(entry.top) == [int(i) for i in top]
        np.testing.assert_allclose(list(entry.top.values()), ref[t - 1, top], atol=TOL, rtol=0)
    assert llm.engine.check_leaks() == []
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(prompt_logprobs=21)
    assert info.value.param == "prompt_logprobs"


def test_large_batches_run_in_groups_with_the_same_results(hf_and_llm, monkeypatch):
    from novallm_jax import embeddings

    _, llm = hf_and_llm
    ex = llm.engine.executor
    whole = embeddings.hidden_states(ex.params, ex.step_cfg, PROMPTS * 3)
    monkeypatch.setattr(embeddings, "MAX_BATCH_TOKENS", 32)  # one or two prompts a batch
    groups = embeddings._groups(PROMPTS * 3)  # lengths 5, 20, 2, ...: [5], [20], [2, 5], [20], [2, 5], [20], [2]
    assert [len(g) for g in groups] == [1, 1, 2, 1, 2, 1, 1] and sum(groups, []) == PROMPTS * 3
    for got, want in zip(embeddings.hidden_states(ex.params, ex.step_cfg, PROMPTS * 3), whole):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "qwen3_moe"])
def test_prompt_logprobs_of_other_families_equal_transformers(family, tmp_path):
    """The model's own forward: Gemma's embedding scale, sliding windows and logit soft cap, experts."""
    from novallm_jax.embeddings import prompt_logprobs

    model = build_hf_model(family, seed=1)
    cfg, params = load_model(save_hf_model(model, str(tmp_path)))
    ids = PROMPTS[1]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1).numpy()
    got = prompt_logprobs(params, cfg, ids, 3)
    assert got[0] is None
    np.testing.assert_allclose([e[1] for e in got[1:]], ref[np.arange(len(ids) - 1), ids[1:]], atol=TOL, rtol=0)
    assert [list(e[2]) for e in got[1:]] == [[int(i) for i in np.argsort(-ref[t])[:3]] for t in range(len(ids) - 1)]


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "gemma4_text", "qwen3_moe"])
def test_hidden_states_of_other_families_equal_transformers(family, tmp_path):
    from novallm_jax.embeddings import hidden_states

    model = build_hf_model(family, seed=2)
    cfg, params = load_model(save_hf_model(model, str(tmp_path)))
    ids = PROMPTS[1]
    ref = _reference(model, ids)
    (final,) = hidden_states(params, cfg, [ids])
    np.testing.assert_allclose(final, ref[-1], atol=TOL, rtol=0)
    (layers,) = hidden_states(params, cfg, [ids], all_layers=True)
    for layer in range(len(ref) - 1):
        np.testing.assert_allclose(layers[layer], ref[layer], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3_moe"])
def test_embedding_requests_of_other_families_equal_transformers(family, tmp_path):
    """Through the engine's steps: Gemma 3's sliding-window layers (their own KV page group) and final norm, and
    experts; mean pooling over prompts longer than a chunk, last-token pooling."""
    model = build_hf_model(family, seed=4)
    cfg, params = load_model(save_hf_model(model, str(tmp_path)))
    exec_cfg = ExecutorConfig(
        page_size=8, num_pages=64, max_model_len=128, decode_batch_buckets=(4,), prefill_len_buckets=(8, 16)
    )
    engine = LLMEngine(cfg, params, shared_tokenizer(), EngineConfig(executor=exec_cfg))
    prompts = PROMPTS + [[(7 * i) % 250 + 3 for i in range(40)]]
    refs = [_reference(model, ids)[-1] for ids in prompts]
    with LLM.from_engine(engine, family) as llm:
        for pooling in ("mean", "last"):
            got = llm.embed(prompts, pooling=pooling, normalize=False)
            want = np.stack([r.mean(axis=0) if pooling == "mean" else r[-1] for r in refs])
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
        assert llm.engine.check_leaks() == []
