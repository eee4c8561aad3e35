"""An OpenAI-compatible HTTP server: `python nanoserve.py serve [ENGINE FLAGS] [--host --port --api-key ...]`.

    python nanoserve.py serve --sched async --port 8000          # the embedded model, on 127.0.0.1
    curl -N localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "shakespeare", "prompt": "ROMEO:", "max_tokens": 32, "stream": true}'

One engine, many clients. The engine loop runs on a thread of its own (`EngineThread`): it steps the engine
whenever there is work and, after every step, hands each request's new tokens to the HTTP handler waiting
for them (an asyncio queue per request, filled with `call_soon_threadsafe`). Handlers only add requests and
read their queues, so concurrent requests are batched into the same steps — no lock around a blocking
`generate` per request, which would serialise them. A client that goes away aborts its request; its pages
go back to the pool at the next step.

Endpoints, shaped as OpenAI's and vLLM's: POST /v1/completions and /v1/chat/completions (streaming as
server-sent events, or not), GET /v1/models, /health, /metrics (Prometheus, vLLM's names with a
`nanoserve:` prefix), POST /tokenize and /detokenize. Errors are OpenAI's error objects: 400 for a bad
request (the engine's own checks, nanoserve_sched/request.py, name the field), 401 without the API key, 404 for an
unknown model, 413 for a body over the limit, 503 when the queue is full or the engine has stopped, 500 for
a failed step. The engine never imports the web framework: this file does.
"""

import argparse
import asyncio
import contextlib
import importlib
import json
import sys
import threading
import time
import uuid
from pathlib import Path

import nanoserve as ns
from nanoserve_entrypoints.cli import add_engine_args, engine_config
from nanoserve_sched import SamplingParams
from nanoserve_sched.request import as_token_ids

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "seed", "n", "stop", "ignore_eos", "min_tokens", "stop_token_ids")
PLAY = "{% for m in messages %}{{ (m.name or speakers[m.role]) | upper }}:\n{{ m.content }}\n\n{% endfor %}"
PLAY_SPEAKERS = {"system": "CHORUS", "user": "ROMEO", "assistant": "JULIET"}


class APIError(Exception):
    """An error for the client, as OpenAI shapes it: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


# --- the engine on a thread of its own -------------------------------------------------------------------


class EngineThread:
    """Steps one LLM for every client: whenever there is work, one step, then each open request's news to
    the queue its handler awaits. `steps()` is the loop as a generator (the live viewer drives it with
    `serve --viz`); `start()` runs it on a daemon thread."""

    def __init__(self, llm: ns.LLM, keep_events: bool = False):
        self.llm = llm
        # a server runs for days: its events feed /metrics (and the viewer) and are not kept, unless the
        # viewer, which can rewind, needs them
        llm.recorder.keep_events = keep_events
        self.open: dict[str, tuple] = {}  # request id -> (OutputStream, event loop, queue)
        self.lock = threading.Lock()  # guards `open` between the handlers and the engine thread
        self.stopping = threading.Event()
        self.error: str | None = None  # why the engine stopped for good

    def start(self):
        threading.Thread(target=self._run, name="engine", daemon=True).start()

    def _run(self):
        for _ in self.steps():
            pass

    def steps(self):
        """Step the engine forever (until `stopping`), yielding after each step or idle wait."""
        llm = self.llm
        while not self.stopping.is_set():
            try:
                if llm.has_unfinished():
                    llm.step()
                else:
                    llm.wake.wait(0.05)
            except ns.EngineDead as e:
                self.error = str(e)
            self.deliver()
            yield
            if self.error:
                return

    def submit(self, prompt, params: SamplingParams, request_id: str) -> asyncio.Queue:
        """Queue a request; its RequestOutputs (deltas) arrive on the returned queue, None after the last."""
        if self.error:
            raise APIError(503, f"the engine has stopped: {self.error}", "ServiceUnavailableError")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        stream = self.llm.open_stream(prompt, params, request_id=request_id)
        with self.lock:
            self.open[request_id] = (stream, loop, queue)
        self.llm.wake.set()
        return queue

    def deliver(self):
        """Hand every open request what is new, and a finished one None after its last output: one wake-up
        of each event loop per step, however many requests it serves."""
        with self.lock:
            items = list(self.open.items())
        news: dict = {}  # event loop -> [(queue, output or None)]
        for rid, (stream, loop, queue) in items:
            if (out := stream.take()) is not None:
                news.setdefault(loop, []).append((queue, out))
            if stream.finished:
                news.setdefault(loop, []).append((queue, None))
                with self.lock:
                    self.open.pop(rid, None)
        for loop, puts in news.items():
            loop.call_soon_threadsafe(put_all, puts)

    def abort(self, request_id: str):
        with self.lock:
            item = self.open.get(request_id)
        if item:
            item[0].abort()

    def failed(self, request_id: str) -> str | None:
        """The error of a request that failed as it was added (a bad prompt or parameters), if it did."""
        with self.lock:
            item = self.open.get(request_id)
        group = item[0].group if item else []
        return next((r.error for r in group if r.finished and r.error and r.times[1] is None), None)

    def num_queued(self) -> int:
        s = self.llm.scheduler
        return len(self.llm.pending) + len(s.waiting)


# --- requests: from JSON to the engine's types -------------------------------------------------------------


def sampling_params(body: dict, default_max_tokens: int, chat: bool = False) -> SamplingParams:
    """SamplingParams from an OpenAI body (and vLLM's extras), checked by the engine's own rules."""
    kw = {k: body[k] for k in SAMPLING_KEYS if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    kw["max_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    if chat:
        if body.get("logprobs"):
            kw["logprobs"] = body.get("top_logprobs") or 0
    elif body.get("logprobs") is not None:
        kw["logprobs"] = body["logprobs"]
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split("=")[0].split(" ")[0]) from None


def completion_prompts(prompt) -> list:
    """OpenAI's `prompt`: a string, a list of strings, a list of token ids, or a list of those lists."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        return prompt
    raise APIError(400, "prompt must be a string, a list of strings or a list of token ids", param="prompt")


class ChatTemplate:
    """Messages -> prompt text: the model's own chat template (chat_template.jinja, or `chat_template` in its
    tokenizer_config.json, rendered with Jinja as transformers does), or for a model without one the embedded
    model's: a play, each
    message a speech under its speaker's name (a message's `name`, else ROMEO for the user, JULIET for the
    assistant, CHORUS for the system), the prompt ending with the assistant's name, and a blank line ending
    the reply."""

    def __init__(self, folder: Path | None):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        cfg = {}
        if folder is not None and (folder / "tokenizer_config.json").exists():
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
        source = cfg.get("chat_template")
        if isinstance(source, list):  # several named templates: the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), source[0]["template"])
        if folder is not None and (folder / "chat_template.jinja").exists():  # where transformers now saves it
            source = (folder / "chat_template.jinja").read_text()
        self.own = source is not None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=refuse, strftime_now=lambda fmt: time.strftime(fmt))  # as transformers
        self.template = env.from_string(source or PLAY)
        token = lambda t: t.get("content") if isinstance(t, dict) else t
        self.extra = dict(bos_token=token(cfg.get("bos_token")) or "", eos_token=token(cfg.get("eos_token")) or "")

    def render(self, messages) -> str:
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list of {role, content}", param="messages")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
                raise APIError(400, "each message needs a role: system, user or assistant", param="messages")
            if not isinstance(m.get("content"), str):
                raise APIError(400, "a message's content must be text", param="messages")
        if self.own:
            from jinja2 import TemplateError

            try:
                return self.template.render(messages=messages, add_generation_prompt=True, **self.extra)
            except TemplateError as e:
                msg = f"the model's chat template failed on these messages: {e}"
                raise APIError(400, msg, param="messages") from None
        return self.template.render(messages=messages, speakers=PLAY_SPEAKERS) + "JULIET:\n"


def refuse(message: str):
    """A chat template's `raise_exception(...)`: the messages break the template's rules; the client hears why."""
    raise APIError(400, f"the model's chat template refused the messages: {message}", param="messages")


# --- responses ------------------------------------------------------------------------------------------


def completion_logprobs(c: ns.CompletionOutput, tokenizer, offset: int) -> dict | None:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    if c.logprobs is None:
        return None
    word = (lambda t: tokenizer.decode([t])) if tokenizer else str
    tokens = [word(t) for t in c.token_ids]
    offsets = [offset + sum(len(w) for w in tokens[:i]) for i in range(len(tokens))]
    return dict(
        tokens=tokens,
        token_logprobs=[d[t].logprob for t, d in zip(c.token_ids, c.logprobs)],
        top_logprobs=[{v.decoded_token or str(k): v.logprob for k, v in d.items() if v.rank} for d in c.logprobs],
        text_offset=offsets,
    )


def chat_logprobs(c: ns.CompletionOutput, tokenizer) -> dict | None:
    if c.logprobs is None:
        return None
    word = (lambda t: tokenizer.decode([t])) if tokenizer else str
    entry = lambda t, v: dict(token=word(t), logprob=v.logprob, bytes=list(word(t).encode()))
    content = [
        {**entry(t, d[t]), "top_logprobs": [entry(k, v) for k, v in d.items() if v.rank]}
        for t, d in zip(c.token_ids, c.logprobs)
    ]
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total)


def sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


# --- the app ------------------------------------------------------------------------------------------------


class Kind:
    """What differs between /v1/completions and /v1/chat/completions: the shape of a choice and a chunk."""

    def __init__(self, chat: bool, model: str, tokenizer):
        self.chat, self.model, self.tok = chat, model, tokenizer
        self.object = "chat.completion" if chat else "text_completion"

    def head(self, base: str, chunk: bool = False, **kw) -> dict:
        obj = self.object + (".chunk" if self.chat and chunk else "")  # a completions chunk keeps its name
        return dict(id=base, object=obj, created=int(time.time()), model=self.model, **kw)

    def choice(self, index: int, c: ns.CompletionOutput, delta: bool) -> dict:
        if not self.chat:
            lp = completion_logprobs(c, self.tok, 0)
            return dict(index=index, text=c.text, logprobs=lp, finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        body = dict(content=c.text) if delta else dict(role="assistant", content=c.text)
        out = dict(index=index, logprobs=chat_logprobs(c, self.tok), finish_reason=c.finish_reason)
        return {**out, ("delta" if delta else "message"): body, "stop_reason": c.stop_reason}

    def whole(self, base: str, finals: list[ns.RequestOutput]) -> dict:
        choices = [self.choice(i * len(o.outputs) + c.index, c, False) for i, o in enumerate(finals) for c in o.outputs]
        n_prompt = sum(len(o.prompt_token_ids) for o in finals)
        n_out = sum(len(c.token_ids) for o in finals for c in o.outputs)
        return self.head(base, choices=choices, usage=usage(n_prompt, n_out))

    async def events(self, base: str, outputs, include_usage: bool):
        """Server-sent events from (prompt index, n, RequestOutput delta): a chunk for each delta that carries
        text or an end (a chat choice opens with its role, as OpenAI streams it), the usage, [DONE]."""
        prompts, n_out, opened = {}, 0, set()
        async for i, n, out in outputs:
            prompts[i] = len(out.prompt_token_ids)
            for c in out.outputs:
                index = i * n + c.index
                n_out += len(c.token_ids)
                if self.chat and index not in opened:
                    opened.add(index)
                    role = dict(
                        index=index, delta=dict(role="assistant", content=""), logprobs=None, finish_reason=None
                    )
                    yield sse(self.head(base, chunk=True, choices=[role]))
                held = c.token_ids and not c.text and self.tok is not None  # a possible stop string waits
                if not held:
                    yield sse(self.head(base, chunk=True, choices=[self.choice(index, c, True)]))
        if include_usage:
            yield sse(self.head(base, chunk=True, choices=[], usage=usage(sum(prompts.values()), n_out)))
        yield sse("[DONE]")


def build_app(llm: ns.LLM, engine: EngineThread, served_name: str, api_key: str | None, max_queued: int,
              max_body_bytes: int):  # fmt: skip
    """The FastAPI app serving `llm` through `engine` (started by the caller)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="nanoserve", description="OpenAI-compatible API of the nanoserve engine")
    app.state.metrics = metrics = Metrics(llm)
    template = ChatTemplate(llm.model.folder)
    tok = llm.tokenizer

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    async def read_json(request: Request) -> dict:
        raw = b""
        async for piece in request.stream():  # a body without a Content-Length is counted as it comes
            raw += piece
            if len(raw) > max_body_bytes:
                raise too_large(max_body_bytes)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if body.get("model") not in (None, served_name):
            msg = f"The model `{body['model']}` does not exist; this server serves `{served_name}`"
            raise APIError(404, msg, "NotFoundError", "model")
        return body

    async def serve(request: Request, kind: Kind, body: dict, prompts: list, params: SamplingParams):
        """Submit the prompts; stream their deltas as events, or wait for them all and answer once."""
        if engine.error:
            raise APIError(503, f"the engine has stopped: {engine.error}", "ServiceUnavailableError")
        if (queued := engine.num_queued()) + len(prompts) * params.n > max_queued:
            msg = f"the server is busy: {queued} requests are waiting (--max-queued-requests {max_queued}); retry"
            raise APIError(503, msg, "ServiceUnavailableError")
        base = f"{'chatcmpl' if kind.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        rids = [f"{base}-{i}" for i in range(len(prompts))]
        queues = [engine.submit(p, params, rid) for rid, p in zip(rids, prompts)]
        failed = [engine.failed(rid) for rid in rids]  # a bad prompt fails at once: 400, before any event
        if err := next((e for e in failed if e), None):
            for rid in rids:
                engine.abort(rid)
            raise APIError(400, err)
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                aborting(kind.events(base, deltas(queues, params.n), include), engine, rids),
                media_type="text/event-stream",
            )
        try:
            finals = [await collect(request, q) for q in queues]
        finally:
            for rid in rids:
                engine.abort(rid)  # nothing if it finished; frees the pages of a request whose client left
        if err := next((o.error for o in finals if o.error), None):
            raise APIError(500, err, "InternalServerError")
        return kind.whole(base, finals)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        prompts = completion_prompts(body.get("prompt"))
        return await serve(request, Kind(False, served_name, tok), body, prompts, sampling_params(body, 16))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        prompt = template.render(body.get("messages"))
        if not template.own and body.get("stop") is None:
            body = {**body, "stop": ["\n\n"]}  # the play's speech ends at a blank line
        params = sampling_params(body, 16, chat=True)
        return await serve(request, Kind(True, served_name, tok), body, [prompt], params)

    @app.get("/v1/models")
    async def models():
        card = dict(id=served_name, object="model", created=int(time.time()), owned_by="nanoserve",
                    root=llm.model_name, max_model_len=llm.max_model_len)  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        if engine.error:
            return JSONResponse({"status": "error", "error": engine.error}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_json(request)
        text = template.render(body["messages"]) if "messages" in body else body.get("prompt")
        try:
            _, ids = llm.tokenize(text)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        return dict(tokens=ids, count=len(ids), max_model_len=llm.max_model_len)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_json(request)
        try:
            ids = as_token_ids(body.get("tokens"), "tokens")
        except ValueError as e:
            raise APIError(400, str(e), param="tokens") from None
        if tok is None:
            raise APIError(400, f"model {served_name} has no tokenizer", param="tokens")
        return dict(prompt=tok.decode(ids))

    return app


class Guard:
    """The API key and the size of the body, checked before any handler reads a request: a plain ASGI
    middleware (Starlette's BaseHTTPMiddleware would relay every chunk of a stream through a task of its own)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            error, key = None, f"Bearer {self.api_key}".encode()
            if self.api_key and scope["path"].startswith("/v1") and headers.get(b"authorization") != key:
                error = APIError(401, "invalid or missing API key", "AuthenticationError")
            size = headers.get(b"content-length", b"")
            if error is None and size.isdigit() and int(size) > self.max_body_bytes:
                error = too_large(self.max_body_bytes, size.decode())
            if error is not None:
                from fastapi.responses import JSONResponse

                return await JSONResponse(error.body(), error.status)(scope, receive, send)
        await self.app(scope, receive, send)


def put_all(puts: list):
    for queue, item in puts:
        queue.put_nowait(item)


def too_large(limit: int, size=None) -> APIError:
    got = f" is {size} bytes," if size else ""
    msg = f"the request body{got} is over the limit of {limit} bytes (--max-request-bytes)"
    return APIError(413, msg, "RequestTooLarge")


async def deltas(queues: list[asyncio.Queue], n: int):
    """(prompt index, n, delta) from each request's queue in turn, until its None."""
    for i, q in enumerate(queues):
        while (out := await q.get()) is not None:
            yield i, n, out


async def aborting(events, engine: EngineThread, rids: list[str]):
    """The events; when the client goes away (the response is cancelled) the requests are aborted."""
    try:
        async for e in events:
            yield e
    finally:
        for rid in rids:
            engine.abort(rid)


async def collect(request, queue: asyncio.Queue) -> ns.RequestOutput:
    """Wait for a request's outputs and join them into one; a client that left stops the wait."""
    parts = []
    while True:
        try:
            out = await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise asyncio.CancelledError from None
            continue
        if out is None:
            return merge(parts)
        parts.append(out)


def out_n(out: ns.RequestOutput) -> int:
    return max(c.index for c in out.outputs) + 1 if out.outputs else 1


def merge(parts: list[ns.RequestOutput]) -> ns.RequestOutput:
    """The deltas of one request, joined back into one RequestOutput."""
    last = parts[-1]
    samples: dict[int, ns.CompletionOutput] = {}
    for part in parts:
        for c in part.outputs:
            s = samples.setdefault(c.index, ns.CompletionOutput(c.index, "", [], logprobs=None))
            s.text += c.text
            s.token_ids = s.token_ids + c.token_ids
            if c.logprobs is not None:
                s.logprobs = (s.logprobs or []) + c.logprobs
            s.finish_reason, s.stop_reason, s.cumulative_logprob = c.finish_reason, c.stop_reason, c.cumulative_logprob
    outputs = [samples[i] for i in sorted(samples)]
    return ns.RequestOutput(last.request_id, last.prompt, last.prompt_token_ids, outputs, last.finished,
                            last.num_cached_tokens, last.error, last.metrics)  # fmt: skip


# --- metrics ---------------------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics, from the engine's events as they are recorded (the one source of truth), with
    vLLM's names under a `nanoserve:` prefix."""

    def __init__(self, llm: ns.LLM):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        from nanoserve_viz.trace import FirstToken, Preempted, RequestArrived, RequestFinished, StepScheduled

        disable_created_metrics()  # no *_created samples beside every counter
        self.llm, self.registry = llm, CollectorRegistry()
        r, p = self.registry, "nanoserve:"
        self.running = Gauge(p + "num_requests_running", "Requests holding KV pages", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv = Gauge(p + "kv_cache_usage_perc", "KV-cache usage: 1 means every page is in use", registry=r)
        self.queries = Counter(p + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r)
        self.hits = Counter(p + "prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r)
        self.preemptions = Counter(p + "num_preemptions", "Requests preempted", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.success = Counter(p + "request_success", "Requests finished", ["finished_reason"], registry=r)
        buckets = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token", buckets=buckets, registry=r)
        self.tpot = Histogram(p + "time_per_output_token_seconds", "Time per output token", buckets=buckets, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "End-to-end latency", buckets=buckets, registry=r)
        self.arrived, self.first = {}, {}
        kinds = dict(RequestArrived=RequestArrived, FirstToken=FirstToken, Preempted=Preempted,
                     RequestFinished=RequestFinished, StepScheduled=StepScheduled)  # fmt: skip
        self.kinds = kinds
        llm.recorder.listeners.append(self.on_event)

    def on_event(self, e):
        k = self.kinds
        if isinstance(e, k["RequestArrived"]):
            self.arrived[e.request_id] = e.t
        elif isinstance(e, k["FirstToken"]):
            self.first[e.request_id] = e.t
            if e.request_id in self.arrived:
                self.ttft.observe(e.t - self.arrived[e.request_id])
        elif isinstance(e, k["Preempted"]):
            self.preemptions.inc()
        elif isinstance(e, k["RequestFinished"]):
            self.success.labels(e.reason).inc()
            self.prompt_tokens.inc(e.num_prompt_tokens)
            self.generation_tokens.inc(e.num_output_tokens)
            arrived, first = self.arrived.pop(e.request_id, None), self.first.pop(e.request_id, None)
            if arrived is not None:
                self.e2e.observe(e.t - arrived)
            if first is not None and e.num_output_tokens > 1:
                self.tpot.observe((e.t - first) / (e.num_output_tokens - 1))
            req = self.llm.requests.get(e.request_id)
            if req is not None and req.num_cached_tokens >= 0:
                self.queries.inc(req.num_prompt_tokens)
                self.hits.inc(req.num_cached_tokens)

    def render(self) -> str:
        from prometheus_client import generate_latest

        s = self.llm.scheduler
        self.running.set(len(s.running))
        self.waiting.set(len(s.waiting) + len(self.llm.pending))
        self.kv.set(1 - s.blocks.num_free_blocks / self.llm.num_blocks)
        return generate_latest(self.registry).decode()


# --- the command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoserve.py serve", description="An OpenAI-compatible server")
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, help="requests to /v1 must send Authorization: Bearer KEY")
    g.add_argument("--served-model-name", default=None, help="the model's name in the API (default: its folder's)")
    g.add_argument("--max-queued-requests", type=int, default=1024, help="beyond this many waiting: 503")
    g.add_argument("--max-request-bytes", type=int, default=1 << 20, help="a bigger body gets 413")
    g.add_argument("--viz", action="store_true", help="watch the live traffic in the terminal visualizer")
    g.add_argument("--access-log", default=None, help="write the HTTP access log to this file (default: none)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for extra in ("fastapi", "jinja2", "prometheus_client", "uvicorn"):
            importlib.import_module(extra)
    except ImportError as e:
        print(f"error: the server needs {e.name}: pip install -e '.[serve]'", file=sys.stderr)
        return 2
    import uvicorn

    try:
        llm = ns.LLM(**vars_of(engine_config(args, args.sched)))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or Path(llm.model_name).name
    engine = EngineThread(llm, keep_events=args.viz)
    app = build_app(llm, engine, name, args.api_key, args.max_queued_requests, args.max_request_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=None, access_log=bool(args.access_log),
                            log_config=logging_config(args.access_log, args.viz))  # fmt: skip
    server = uvicorn.Server(config)
    print(f"nanoserve: {name} ({llm.model_name}) on http://{args.host}:{args.port}/v1, scheduler {args.sched}")
    if not args.viz:
        engine.start()
        # until Ctrl-C (or SIGTERM): uvicorn finishes the open responses, then re-raises KeyboardInterrupt,
        # the normal end of a server
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
        engine.stopping.set()
        print("nanoserve: stopped")
        return 0
    from nanoserve_viz.app import run_live  # the viewer drives the engine; the HTTP server runs beside it

    threading.Thread(target=server.run, name="http", daemon=True).start()
    run_live(llm, speed=float("inf"), steps=engine.steps())
    server.should_exit = True
    engine.stopping.set()
    return 0


def logging_config(access_log: str | None, viz: bool) -> dict:
    """uvicorn's logs: the access log to its file when asked; the server's own messages to stderr, or, under
    the viewer, which owns the terminal, to the access log's file or nowhere."""
    to_file = lambda formatter: {"class": "logging.FileHandler", "filename": access_log, "formatter": formatter}
    quiet = {"class": "logging.NullHandler"}
    if not viz:
        server = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "default"}
    else:
        server = to_file("default") if access_log else quiet
    access_fmt = '%(asctime)s %(client_addr)s "%(request_line)s" %(status_code)s'
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "default": {
                "()": "uvicorn.logging.DefaultFormatter",
                "fmt": "%(levelprefix)s %(message)s",
                "use_colors": False,
            },
            "access": {"()": "uvicorn.logging.AccessFormatter", "fmt": access_fmt, "use_colors": False},
        },
        "handlers": {"server": server, "access": to_file("access") if access_log else quiet},
        "loggers": {
            "uvicorn": {"handlers": ["server"], "level": "WARNING", "propagate": False},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }


def vars_of(config) -> dict:
    from dataclasses import asdict

    return asdict(config)


if __name__ == "__main__":
    sys.exit(main())
