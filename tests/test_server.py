"""The OpenAI-compatible server, driven as its users drive it: the real `openai` client and raw HTTP, on a free
127.0.0.1 port, against a server this test starts (in a thread of this process, so that the engine's state can
be checked too) and stops. Load tests are bounded in count and time."""

import asyncio
import json
import random
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import nanoserve as ns  # noqa: E402
from nanoserve_entrypoints.openai import EngineThread, build_app  # noqa: E402
from nanoserve_sched import SamplingParams  # noqa: E402
from nanoserve_viz.trace import StepScheduled  # noqa: E402
from tests.conftest import save_tiny_gpt2  # noqa: E402


class Server:
    """uvicorn on a free port, on a thread; `stop()` ends it."""

    def __init__(self, llm, name="tiny", api_key=None, max_queued=1024, max_body=1 << 20):
        import uvicorn

        self.llm, self.engine = llm, EngineThread(llm)
        self.app = app = build_app(llm, self.engine, name, api_key, max_queued, max_body)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.engine.start()
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "x", max_retries=0)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stopping.set()

    def settle(self, timeout=10):
        """Wait until the engine has nothing left to do (aborted requests freed)."""
        deadline = time.time() + timeout
        while self.llm.has_unfinished() or self.engine.open:
            assert time.time() < deadline, "the engine did not settle"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("served"), vocab_size=50257, n_positions=256, with_tokenizer=True)


@pytest.fixture(scope="module")
def server(text_model):
    s = Server(ns.LLM(str(text_model), sched="async", block_size=8, num_gpu_blocks_override=600))
    yield s
    s.stop()


PROMPTS = ["The quick brown fox", "Once upon a time", "Hello, my name is", "A paged KV cache"]


def test_completions_through_the_openai_client_equal_generate(server, text_model):
    offline = ns.LLM(str(text_model))
    want = [o.outputs[0].text for o in offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12), False)]
    for prompt, text in zip(PROMPTS, want):
        r = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert r.object == "text_completion" and r.choices[0].text == text
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    batch = server.client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == want
    streamed = server.client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == want[0]


def test_n_stop_logprobs_and_usage(server):
    c = server.client
    r = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=8, n=3, temperature=1.0, seed=3)
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 24
    full = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0).choices[0].text
    stop = full[5:8]
    cut = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    lp = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=2).choices[0]
    assert len(lp.logprobs.tokens) == 4 and len(lp.logprobs.top_logprobs[0]) == 2
    assert all(x <= 0 for x in lp.logprobs.token_logprobs)
    chunks = list(c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, stream=True,
                                       stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].choices == []


def test_chat_streaming_and_not(server):
    c = server.client
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    stream = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert all(ch.object == "chat.completion.chunk" for ch in chunks) and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    lp = c.chat.completions.create(model="tiny", messages=messages, max_tokens=3, logprobs=True, top_logprobs=2)
    assert len(lp.choices[0].logprobs.content) == 3 and len(lp.choices[0].logprobs.content[0].top_logprobs) == 2


def test_raw_http_sse_models_health_metrics_tokenize(server):
    with httpx.Client(base_url=server.url, timeout=30) as h:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "stream": True}
        with h.stream("POST", "/v1/completions", json=body) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.headers["content-type"].startswith("text/event-stream")
        assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
        assert [json.loads(line[6:])["object"] for line in lines[:-1]] == ["text_completion"] * 3
        assert h.get("/v1/models").json()["data"][0]["id"] == "tiny"
        assert h.get("/health").json() == {"status": "ok"}
        ids = h.post("/tokenize", json={"prompt": "Hello world"}).json()
        assert (
            ids["count"] == 2
            and h.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "Hello world"
        )
        text = h.get("/metrics").text
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hits_total",
                     "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total",
                     "time_to_first_token_seconds_bucket", "time_per_output_token_seconds_bucket",
                     "e2e_request_latency_seconds_bucket"):  # fmt: skip
            assert f"nanoserve:{name}" in text, name


def test_64_concurrent_streams_each_get_their_own_tokens_batched_together(server, text_model):
    prompts = [[random.Random(i).randrange(50000) for _ in range(5 + i % 7)] for i in range(64)]
    want = [
        o.outputs[0].token_ids
        for o in ns.LLM(str(text_model)).generate(prompts, SamplingParams(temperature=0, max_tokens=16), False)
    ]
    tok = server.llm.tokenizer
    batch_sizes = []
    watch = lambda e: isinstance(e, StepScheduled) and batch_sizes.append(len(e.request_ids))
    server.llm.recorder.listeners.append(watch)

    async def one(client, i):
        body = {"model": "tiny", "prompt": prompts[i], "max_tokens": 16, "temperature": 0, "stream": True}
        text = ""
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def all_of_them():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    try:
        got = asyncio.run(asyncio.wait_for(all_of_them(), timeout=120))
    finally:
        server.llm.recorder.listeners.remove(watch)
    assert got == [tok.decode(w) for w in want]
    assert max(batch_sizes) >= 32, "concurrent requests must share steps"
    server.settle()


def test_clients_that_leave_mid_stream_abort_their_requests(server):
    """200 requests, a third of them dropped at a random point: the server stays healthy and every page
    comes back (KV usage 0 on /metrics, the block manager's invariants hold)."""
    rng = random.Random(0)

    async def one(client, i):
        body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0.8, "stream": True}
        leave = rng.randrange(1, 30) if i % 3 == 0 else None
        seen = 0
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                seen += line.startswith("data: {")
                if leave is not None and seen >= leave:
                    return "left"  # closing the stream drops the connection
        return "done"

    async def all_of_them():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    results = asyncio.run(asyncio.wait_for(all_of_them(), timeout=180))
    assert results.count("left") == 67 and results.count("done") == 133
    server.settle(timeout=30)
    blocks = server.llm.scheduler.blocks
    blocks.check()
    assert blocks.num_free_blocks == server.llm.num_blocks
    assert_nothing_kept(server)
    with httpx.Client(base_url=server.url) as h:
        assert h.get("/health").status_code == 200
        assert "nanoserve:kv_cache_usage_perc 0.0" in h.get("/metrics").text
        assert 'nanoserve:request_success_total{finished_reason="abort"}' in h.get("/metrics").text


def assert_nothing_kept(server):
    """A server runs for days: once its requests are done, nothing of them is left in the engine, the
    server or its metrics (no event history, no per-request entry anywhere)."""
    llm, metrics = server.llm, server.app.state.metrics
    assert [type(e).__name__ for e in llm.recorder.events] == ["RunInfo"]  # the engine's, before serving
    assert not llm.requests and not llm.pending and not server.engine.open
    assert not llm.runner.rows.rows and not metrics.arrived and not metrics.first
    assert not llm.scheduler.running and not llm.scheduler.waiting


BAD = {  # name: (path, body or raw bytes, status, what the error message says)
    "prompt longer than the context": (
        "/v1/completions",
        {"prompt": list(range(300)), "max_tokens": 4},
        400,
        "the model's context is 256",
    ),
    "max_tokens 0": ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, "at least 1 token"),
    "temperature as text": (
        "/v1/completions",
        {"prompt": "Hi", "temperature": "hot"},
        400,
        "temperature must be a number",
    ),
    "top_k not an integer": ("/v1/completions", {"prompt": "Hi", "top_k": 2.5}, 400, "top_k must be an integer"),
    "no prompt": ("/v1/completions", {"max_tokens": 3}, 400, "prompt must be a string"),
    "unknown model": ("/v1/completions", {"model": "gpt-9", "prompt": "Hi"}, 404, "The model `gpt-9` does not exist"),
    "malformed JSON": ("/v1/completions", b'{"prompt": "Hi",', 400, "not valid JSON"),
    "not an object": ("/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    "body over the limit": ("/v1/completions", {"prompt": "x" * 1_100_000}, 413, "over the limit"),
    "chat without messages": ("/v1/chat/completions", {"max_tokens": 3}, 400, "messages must be a non-empty list"),
    "a message without a role": ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "needs a role"),
}


def test_bad_requests_get_their_status_and_error_while_good_ones_complete(server):
    async def good(client):
        r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 24})
        return r.status_code, len(r.json()["choices"][0]["text"]) > 0

    async def bad(client, path, body, status, says):
        kw = (
            {"content": body, "headers": {"content-type": "application/json"}}
            if isinstance(body, bytes)
            else {"json": body}
        )
        r = await client.post(path, **kw)
        err = r.json()["error"]
        return r.status_code == status and says in err["message"] and err["code"] == status, (r.status_code, err)

    async def all_of_them():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            goods = [good(client) for _ in range(8)]
            bads = [bad(client, *case) for case in BAD.values()]
            return await asyncio.gather(*goods, *bads)

    results = asyncio.run(asyncio.wait_for(all_of_them(), timeout=120))
    assert all(r == (200, True) for r in results[:8])
    for name, (ok, detail) in zip(BAD, results[8:]):
        assert ok, (name, detail)
    server.settle()
    assert server.llm.scheduler.blocks.num_free_blocks == server.llm.num_blocks


def test_api_key_queue_bound_and_a_failed_step(text_model):
    s = Server(ns.LLM(str(text_model), step_timeout_s=2.0), api_key="sekret", max_queued=2)
    try:
        with httpx.Client(base_url=s.url, timeout=30) as h:
            body = {"prompt": "Hello", "max_tokens": 2}
            r = h.post("/v1/completions", json=body)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
            auth = {"Authorization": "Bearer sekret"}
            assert h.post("/v1/completions", json=body, headers=auth).status_code == 200
            assert h.get("/health").status_code == 200  # not under /v1: no key needed
            assert h.post("/v1/completions", json={**body, "n": 5}, headers=auth).status_code == 503
            sample = s.llm.runner.sample
            s.llm.runner.sample = lambda *a: (_ for _ in ()).throw(RuntimeError("injected device failure"))
            r = h.post("/v1/completions", json=body, headers=auth)
            assert r.status_code == 500 and "injected device failure" in r.json()["error"]["message"]
            s.llm.runner.sample = sample
            assert h.post("/v1/completions", json=body, headers=auth).status_code == 200, "the engine goes on"
            s.llm.runner.sample = lambda *a: time.sleep(5)  # a step that hangs: the watchdog stops the engine
            r = h.post("/v1/completions", json=body, headers=auth)
            assert r.status_code == 500 and "did not finish within step_timeout_s" in r.json()["error"]["message"]
            health = h.get("/health")
            assert health.status_code == 503 and "cannot go on" in health.json()["error"]
            assert h.post("/v1/completions", json=body, headers=auth).status_code == 503
    finally:
        s.stop()


def test_the_viewer_watches_live_http_traffic(text_model):
    """serve --viz: the viewer drives the server's engine loop and shows the requests that come over HTTP."""
    pytest.importorskip("textual")
    from nanoserve_viz.app import VizApp

    llm = ns.LLM(str(text_model))
    engine = EngineThread(llm, keep_events=True)  # the viewer reads (and can rewind) the events
    import uvicorn

    app = build_app(llm, engine, "tiny", None, 64, 1 << 20)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    viz = VizApp(llm, speed=float("inf"), steps=engine.steps())
    replies = []

    def clients():
        while not server.started:
            time.sleep(0.02)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as h:
            for p in PROMPTS:
                replies.append(h.post("/v1/completions", json={"prompt": p, "max_tokens": 6}).status_code)

    async def go():
        async with viz.run_test(size=(120, 36)) as pilot:
            t = threading.Thread(target=clients)
            t.start()
            deadline = time.monotonic() + 60
            while len(replies) < len(PROMPTS) or len(viz.state.requests) < len(PROMPTS):
                assert time.monotonic() < deadline, "the viewer did not see the requests"
                await pilot.pause(0.05)
            t.join()
            await pilot.press("q")

    try:
        asyncio.run(go())
    finally:
        engine.stopping.set()
        server.should_exit = True
    assert replies == [200] * len(PROMPTS) and len(viz.state.requests) == len(PROMPTS)


CHATML = (  # the shape of Qwen's template: each message between <|im_start|>role and <|im_end|>
    "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('no role ' + m.role) }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_a_qwen3_folder_chats_through_its_own_template(tmp_path, where):
    """serve --model a Qwen3 folder: chat messages are rendered by the model's own template (either place
    transformers keeps it), and the reply is the engine's greedy completion of exactly that text."""
    import shutil

    from tests.test_llama import save_tiny

    folder = save_tiny(tmp_path / "qwen3", "qwen3_sharded", vocab_size=3072, bos_token_id=0, eos_token_id=1)
    shutil.copy(ns.DEFAULT_MODEL / "tokenizer.json", folder / "tokenizer.json")
    if where == "chat_template.jinja":
        (folder / where).write_text(CHATML)
    else:
        (folder / where).write_text(json.dumps({"chat_template": CHATML}))
    messages = [{"role": "system", "content": "Speak plainly."}, {"role": "user", "content": "Who goes there?"}]
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    rendered += "<|im_start|>assistant\n"
    llm = ns.LLM(str(folder), block_size=4)
    (want,) = llm.generate([rendered], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    s = Server(llm, name="qwen3")
    try:
        with httpx.Client(base_url=s.url, timeout=60) as h:
            ids = h.post("/tokenize", json={"messages": messages}).json()["tokens"]
            assert ids == llm.tokenizer.encode(rendered)
            body = {"model": "qwen3", "messages": messages, "max_tokens": 12, "temperature": 0}
            reply = h.post("/v1/chat/completions", json=body).json()
            assert reply["choices"][0]["message"]["content"] == want.outputs[0].text
            assert reply["usage"]["prompt_tokens"] == len(ids)
            r = h.post("/v1/chat/completions", json={**body, "messages": [{"role": "tool", "content": "x"}]})
            assert r.status_code == 400 and "refused the messages: no role tool" in r.json()["error"]["message"]
    finally:
        s.stop()


def test_the_serve_command_logs_access_to_its_file_and_stops_on_sigint(tmp_path):
    """`python nanoserve.py serve` as a user starts it: the embedded model on 127.0.0.1, the access log in
    its file (never on the terminal), a clean exit on Ctrl-C."""
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "access.log"
    cmd = [sys.executable, str(ROOT / "nanoserve.py"), "serve", "--port", str(port), "--access-log", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert c.completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=8).choices[0].text
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert '"POST /v1/completions HTTP/1.1" 200' in log.read_text()
    assert "/v1/completions" not in out + err and f"http://127.0.0.1:{port}/v1" in out
