"""Two processes on 127.0.0.1 serving one model with `jax.distributed` (gloo CPU collectives), 2 fake devices each,
`model=4` over all four: the openai client against process 0 streams the text a one-process engine gives, under
concurrency and preemption, and gets its embeddings; when the worker process is killed, the front answers 503 with an OpenAI-shaped error and
process 0 exits, without hanging.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import openai
import pytest

from novallm_jax.engine.engine import EngineConfig, LLMEngine
from novallm_jax.llm import LLM
from novallm_jax.sampling_params import SamplingParams
from tests.engine_fixtures import EXEC, TINY, tiny_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [f"Question {i}: what comes after {i * 7}? Answer:" for i in range(6)]
MAX_TOKENS = 24
REGEX = "[a-z]{3}-[0-9]{4}"  # a structured-output row: its token bitmasks go to the worker with the plan
# A worker whose sampler state parted from process 0's would feed its own draws back and change the text from the
# second token on, so a few tokens test it. The seeded prompt is one no other request has sent: its K/V is computed
# in its own steps, not read from prefix-cache pages whose values (to float rounding) depend on which requests the
# concurrent streams happened to share steps with. This random model's large logits make sampled draws sensitive to
# rounding (40 seeds x 12 tokens: one text differs between the native kernels and XLA, one between one device and
# model=4), and with cached pages from the concurrent streams the seeded text did part from the one-device text in
# two of some thirty runs; a fresh prompt is computed the same way every run.
SEEDED_PROMPT = "A draw with a seed:"
SEEDED = SamplingParams(temperature=0.9, seed=7, max_tokens=6, ignore_eos=True)
START_TIMEOUT_S = 600


def _free_port_pair() -> int:
    """A port p with p + 1 free too (the coordinator and the plan channel)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65534:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no pair of free ports")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    coordinator = f"127.0.0.1:{_free_port_pair()}"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    ready = tmp / "ready"
    procs, logs = [], []
    for pid in range(2):
        log = open(tmp / f"process{pid}.log", "w+")
        cmd = [sys.executable, "-m", "tests.multihost_worker", coordinator, "2", str(pid), "0", str(ready)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (ready.exists() and ready.read_text()):
            dead = [p.returncode for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                pytest.fail(f"the cluster did not start (exit codes {dead}):\n{_tail(logs)}")
            time.sleep(0.2)
        yield procs, logs, int(ready.read_text())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def _tail(logs, n: int = 4000) -> str:
    out = []
    for i, log in enumerate(logs):
        log.flush()
        log.seek(0)
        out.append(f"--- process {i}\n{log.read()[-n:]}")
    return "\n".join(out)


@pytest.fixture(scope="module")
def reference(default_gguf):
    """The same model, engine settings and prompts in this process, on one device."""
    from novallm_jax.tokenizer import load_tokenizer

    config = EngineConfig(executor=dataclasses.replace(EXEC, num_pages=24))
    with LLM.from_engine(LLMEngine(TINY, tiny_params(), load_tokenizer(default_gguf), config)) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        greedy = [r.text for r in llm.generate(PROMPTS, params)]
        seeded = llm.generate(SEEDED_PROMPT, SEEDED)[0].text
        constrained = llm.generate(
            PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, structured={"regex": REGEX})
        )[0].text
        scored = [llm.prompt_logprobs(p, 2) for p in PROMPTS[:2]]
        return greedy, seeded, constrained, llm.embed(PROMPTS[:3], pooling="mean"), scored


def _client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", timeout=120, max_retries=0)


def _stream(client: openai.OpenAI, prompt: str) -> str:
    chunks = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    return "".join(c.choices[0].text for c in chunks)


def test_process_0_streams_the_one_process_text_and_a_lost_worker_gives_503(cluster, reference):
    procs, logs, port = cluster
    reference, seeded, constrained, embedded, scored = reference
    client = _client(port)
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: batched steps, preemption
        streamed = list(pool.map(lambda p: _stream(client, p), PROMPTS))
    assert streamed == reference, _tail(logs)
    # Sampled: every process draws the same token from its copy of the logits, so the seeded text is the one-process
    # text; constrained: the masks process 0 computes reach the worker's sampler.
    extra = {"ignore_eos": True, "seed": SEEDED.seed}
    got = client.completions.create(
        model="tiny",
        prompt=SEEDED_PROMPT,
        max_tokens=SEEDED.max_tokens,
        temperature=SEEDED.temperature,
        extra_body=extra,
    )
    assert got.choices[0].text == seeded
    got = client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0.0, extra_body={"guided_regex": REGEX}
    )
    assert got.choices[0].text == constrained and re.fullmatch(REGEX, constrained)
    batch = client.completions.create(
        model="tiny", prompt=PROMPTS[:3], max_tokens=MAX_TOKENS, temperature=0.0, extra_body={"ignore_eos": True}
    )
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == reference[:3]
    # Embedding requests: their rows ask every process for the hidden states in the plan.
    vectors = client.embeddings.create(model="tiny", input=PROMPTS[:3], extra_body={"pooling": "mean"})
    np.testing.assert_allclose([d.embedding for d in vectors.data], embedded, atol=1e-5)
    # Prompt logprobs: a forward process 0 sends to the worker between two plans (here beside running streams).
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        beside = pool.submit(_stream, client, PROMPTS[2])
        echoed = client.completions.create(
            model="tiny", prompt=PROMPTS[:2], max_tokens=1, temperature=0.0, echo=True, logprobs=2
        )
        assert beside.result() == reference[2]
    for choice in echoed.choices:
        want = scored[choice.index]
        lp = choice.logprobs
        got = lp.token_logprobs[: len(want)]
        assert got[0] is None and np.allclose(got[1:], [w.logprob for w in want[1:]], atol=1e-4), _tail(logs)
        assert all(1 <= len(t) <= 2 for t in lp.top_logprobs[1 : len(want)])  # top 2, keyed by their text
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    preemptions = next(float(x.split()[1]) for x in metrics.splitlines() if x.startswith("novallm_preemptions_total"))
    assert preemptions > 0  # the 6 concurrent requests outgrew the 23 pages

    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS)
    assert e.value.status_code == 503, _tail(logs)
    error = e.value.body
    assert set(error) == {"message", "type", "param", "code"}  # the client unwraps {"error": {...}}
    assert error["type"] == "service_unavailable" and error["code"] == "engine_unavailable"
    assert error["message"].startswith("the engine is unavailable: process 1 of the engine exited")
    try:
        assert procs[0].wait(timeout=60) == 1
    except subprocess.TimeoutExpired:
        pytest.fail(f"process 0 did not exit after losing its worker:\n{_tail(logs)}")
    assert "process 1 of the engine exited" in _tail(logs)


@pytest.mark.parametrize(
    "flags, env, param",
    [
        ((None, 2, 0), {}, "coordinator_address"),
        (("127.0.0.1", 2, 0), {}, "coordinator_address"),
        (("127.0.0.1:99999", 2, 0), {}, "coordinator_address"),
        (("127.0.0.1:9876", 1, 0), {}, "num_processes"),
        (("127.0.0.1:9876", 2, 2), {}, "process_id"),
        (("127.0.0.1:9876", 2, None), {}, "process_id"),
        ((None, None, None), {"NOVALLM_NUM_PROCESSES": "two"}, "num_processes"),
    ],
)
def test_cluster_settings_are_refused_naming_the_flag(monkeypatch, flags, env, param):
    from novallm_jax import distributed
    from novallm_jax.errors import InvalidRequestError

    for var in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(InvalidRequestError) as e:
        distributed.cluster_from(*flags)
    assert e.value.param == param


def test_cluster_settings_come_from_flags_or_the_environment(monkeypatch):
    from novallm_jax import distributed

    for var in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    assert distributed.cluster_from() is None
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "10.0.0.1:9876")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
    cluster = distributed.cluster_from()
    assert cluster == distributed.Cluster("10.0.0.1:9876", 4, 3) and not cluster.is_leader
    assert cluster.plan_address == ("10.0.0.1", 9877)
    assert distributed.cluster_from(process_id=0).is_leader  # a flag wins over the environment


def test_a_cluster_refuses_a_draft_model_naming_the_flag(default_gguf):
    """A draft model's drafts and their logits exist on process 0 only, and every process samples: refused."""
    from novallm_jax import distributed
    from novallm_jax.errors import InvalidRequestError
    from novallm_jax.tokenizer import load_tokenizer
    from tests.engine_fixtures import skip_without_ragged_steps

    skip_without_ragged_steps()
    config = EngineConfig(executor=dataclasses.replace(EXEC, max_draft_tokens=2))
    tokenizer = load_tokenizer(default_gguf)
    engine = LLMEngine(TINY, tiny_params(), tokenizer, config, draft=(TINY, tiny_params()))
    with pytest.raises(InvalidRequestError, match="draft model drafts on process 0 alone") as e:
        distributed.check_engine(engine)
    assert e.value.param == "draft_model"
