"""The OpenAI-compatible server (inference/server.py, inference/serve.py) with the official
`openai` client on localhost: outputs against `inference.generate`, streaming against
non-streaming, stop strings, n, seeds, log-probs, every class of bad request, disconnects, load
from 200 concurrent clients, and SIGTERM draining a real `python -m inference.serve` process."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx2", reason="the openai client's HTTP library")
openai = pytest.importorskip("openai")

from data.tokenizer import special, with_specials  # noqa: E402
from inference import generate  # noqa: E402

MODEL_ID = "tiny_run"
SLOTS = 32


def _wait_healthy(base: str, timeout: float = 300.0, proc=None) -> list[int]:
    """Polls /health until it answers 200; returns the status codes it answered on the way."""
    t, seen = time.time(), []
    while time.time() - t < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            seen.append(httpx.get(f"{base}/health", timeout=2).status_code)
            if seen[-1] == 200:
                return seen
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base}/health did not answer 200 in {timeout}s")


@pytest.fixture(scope="module")
def server(tiny_run):
    """The trained tiny run served in float32 from a thread of this process (uvicorn)."""
    import uvicorn

    from inference.serve import build

    api, engine = build(str(tiny_run), dtype="float32", max_slots=SLOTS, prefix_cache=8, model_id=MODEL_ID)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(api, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    _wait_healthy(base)
    yield base, engine
    srv.should_exit = True
    thread.join(60)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


def _prompt_ids(engine, text):
    return with_specials(engine.tokenizer, engine.tokenizer.encode(text))


def _generate_text(engine, ids, n, **kw):
    tok = engine.tokenizer
    out = generate(engine.model, [ids], max_new_tokens=n, stop_tokens=special(tok.eos_id), **kw)[0]
    finish = "stop" if out and out[-1] == tok.eos_id else "length"
    return tok.decode([t for t in out if t != tok.eos_id]), finish


PROMPTS = ["The history of", "def main(", "In 1905 the", "Once upon a time there was"]


def test_models_and_health(server, client):
    base, engine = server
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


def test_greedy_completions_equal_generate_and_streaming_equals_them(server, client):
    _, engine = server
    for text in PROMPTS:
        r = client.completions.create(model=MODEL_ID, prompt=text, max_tokens=24, temperature=0)
        ref, finish = _generate_text(engine, _prompt_ids(engine, text), 24)
        assert r.choices[0].text == ref and r.choices[0].finish_reason == finish
        assert r.usage.prompt_tokens == len(_prompt_ids(engine, text))
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        chunks = list(client.completions.create(model=MODEL_ID, prompt=text, max_tokens=24, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == ref
        assert chunks[-1].choices[0].finish_reason == finish


def test_chat_streamed_equals_non_streamed_equals_generate(server, client):
    from data.sft import ChatTokenizer

    _, engine = server
    messages = [{"role": "system", "content": "You write code."}, {"role": "user", "content": "Print hello"}]
    r = client.chat.completions.create(model=MODEL_ID, messages=messages, max_completion_tokens=30, temperature=0)
    chat = ChatTokenizer(engine.tokenizer)
    ids = chat.prompt_ids(messages)
    out = generate(engine.model, [ids], max_new_tokens=30, stop_tokens=chat.stop_ids())[0]
    ref = engine.tokenizer.decode([t for t in out if t not in chat.stop_ids()])
    assert r.choices[0].message.content == ref and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(out)
    stream = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(out)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    # without include_usage a stream carries no usage (OpenAI's rule)
    plain = list(client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=5, stream=True))
    assert all(c.usage is None for c in plain)


def test_stop_strings_end_the_text_before_them(server, client):
    _, engine = server
    full, _ = _generate_text(engine, _prompt_ids(engine, PROMPTS[0]), 40)
    words = [w for w in full.split(" ") if len(w) >= 3]
    stop = words[min(2, len(words) - 1)]
    cut = full[:full.index(stop)]
    r = client.completions.create(model=MODEL_ID, prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                  stop=[stop, "\u2603never"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=MODEL_ID, prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == cut


def test_n_choices_differ_and_seeds_reproduce_whatever_the_traffic(server, client):
    _, engine = server
    kw = dict(model=MODEL_ID, prompt=PROMPTS[1], max_tokens=16, temperature=1.0, n=4, seed=1234)
    a = client.completions.create(**kw)
    texts = [c.text for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert len(set(texts)) == 4
    assert a.usage.prompt_tokens == len(_prompt_ids(engine, PROMPTS[1]))  # counted once, whatever n
    # the same request again, while other requests occupy other rows: the same texts
    with_traffic = []

    def other():
        client.completions.create(model=MODEL_ID, prompt=PROMPTS[2], max_tokens=40, temperature=0.7)

    threads = [threading.Thread(target=other) for _ in range(3)]
    for t in threads:
        t.start()
    with_traffic = [c.text for c in client.completions.create(**kw).choices]
    for t in threads:
        t.join()
    assert with_traffic == texts
    # choice i is generate's row i of seed=1234
    ids = _prompt_ids(engine, PROMPTS[1])
    ref = generate(engine.model, [ids] * 4, max_new_tokens=16, temperature=1.0, seed=1234,
                   stop_tokens=special(engine.tokenizer.eos_id))
    assert texts == [engine.tokenizer.decode([t for t in o if t != engine.tokenizer.eos_id]) for o in ref]


def test_logprobs_are_the_models(server, client):
    _, engine = server
    r = client.completions.create(model=MODEL_ID, prompt=PROMPTS[3], max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids = _prompt_ids(engine, PROMPTS[3])
    out, ref_lp = generate(engine.model, [ids], max_new_tokens=6, return_logprobs=True)
    np.testing.assert_allclose(lp.token_logprobs, ref_lp[0], atol=1e-4)
    assert all(len(t) == 3 for t in lp.top_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):  # greedy: the chosen token is the best
        assert max(top.values()) == pytest.approx(chosen, abs=1e-5)
    c = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)


def _raw_post(base, path, body, **kw):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{base}{path}", content=data, headers={"Content-Type": "application/json"}, timeout=60, **kw)


@pytest.mark.parametrize("path,body,status,param,code", [
    ("/v1/completions", '{"model": "tiny_run", "prompt": "x",', 400, None, "invalid_json"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "x"}, 400, "model", "invalid_value"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x " * 300, "max_tokens": 10}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": 300}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "temperature": -0.5}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "top_k": -1}, 400, "top_k", "invalid_value"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "n": 17}, 400, "n", "invalid_value"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "logprobs": 6}, 400, "logprobs", "invalid_value"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": [1, 99999]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop",
     "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": []}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages",
     "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:"}}]}]}, 400, "messages.0.content", "unsupported_content"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 1000}, 400, "max_completion_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 3}, 400, "top_logprobs", "invalid_value"),
])
def test_bad_requests_get_openai_errors_and_disturb_nothing(server, client, path, body, status, param, code):
    base, _ = server
    r = _raw_post(base, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["code"] == code
    ok = client.completions.create(model=MODEL_ID, prompt="x", max_tokens=2)
    assert ok.usage.completion_tokens >= 1


def test_defaults_apply_to_absent_and_null_fields(server):
    base, _ = server
    for body in ({"model": MODEL_ID, "prompt": "x", "temperature": 0}, {"model": MODEL_ID, "prompt": "x",
                                                                        "max_tokens": None, "temperature": None}):
        r = _raw_post(base, "/v1/completions", body)
        assert r.status_code == 200, r.text
        assert 1 <= r.json()["usage"]["completion_tokens"] <= 16  # OpenAI's default max_tokens
    r = _raw_post(base, "/v1/nothing", {})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "y " * 400}])


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    base, engine = server
    body = {"model": MODEL_ID, "prompt": "The", "max_tokens": 200, "temperature": 1.0, "stream": True}
    aborted = engine.stats["aborted"]
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
        lines = 0
        for line in r.iter_lines():
            lines += bool(line.startswith("data: "))
            if lines == 3:
                break
    t = time.time()
    while (engine.running or engine.stats["aborted"] == aborted) and time.time() - t < 30:
        time.sleep(0.05)
    assert engine.running == 0 and engine.stats["aborted"] == aborted + 1
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    assert client.completions.create(model=MODEL_ID, prompt="x", max_tokens=2).choices[0].text is not None


def test_two_hundred_concurrent_clients_all_complete_in_shared_steps(server):
    """200 requests at once through `AsyncOpenAI`: no errors, and the engine decodes many requests
    per step (continuous batching: the mean number of rows per decode step is near the slot count).
    Throughput in tokens/s is measured by benchmarks/serve.py, not asserted here."""
    base, engine = server

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
        try:
            async def one(i):
                if i % 2:
                    r = await client.completions.create(model=MODEL_ID, prompt=PROMPTS[i % 4], max_tokens=12,
                                                        temperature=0.8, seed=i)
                    return r.usage.completion_tokens
                r = await client.chat.completions.create(model=MODEL_ID, max_tokens=12, temperature=0.8, seed=i,
                                                         messages=[{"role": "user", "content": f"Question {i}"}])
                return r.usage.completion_tokens

            return await asyncio.gather(*(one(i) for i in range(200)), return_exceptions=True)
        finally:
            await client.close()

    steps, rows = engine.stats["steps"], engine.stats["step_rows"]
    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(1 <= r <= 12 for r in results)
    mean_rows = (engine.stats["step_rows"] - rows) / (engine.stats["steps"] - steps)
    assert mean_rows > SLOTS / 2, mean_rows


def test_sigterm_drains_in_flight_requests_then_exits(tiny_run):
    """A real `python -m inference.serve`: /health answers 503 while the engine compiles, then 200;
    SIGTERM during a streamed request lets it finish (all its tokens, its finish reason, [DONE]),
    then the process ends and the port closes. uvicorn
    re-raises the signal after its graceful shutdown, so the exit status is "killed by SIGTERM"
    (-15), what a supervisor expects of a process it stopped; a crash would show a traceback."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "inference.serve", f"--checkpoint={tiny_run}", f"--port={port}",
                             "--max_slots=2", "--prefix_cache=0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        seen = _wait_healthy(base, proc=proc)
        assert seen[0] == 503 and seen[-1] == 200, seen
        body = {"model": tiny_run.name, "prompt": "The", "max_tokens": 60, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 2:
                    proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        assert usage["completion_tokens"] == 60
        assert proc.wait(120) == -signal.SIGTERM
        log = proc.stdout.read()
        assert "Traceback" not in log and "Finished server process" in log, log[-2000:]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
