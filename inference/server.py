"""An OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI + uvicorn).

    app = create_app(engine, tokenizer, model_id="tiny")      # `python -m inference.serve` runs it

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (the model's chat template, or Loom's
default for models without one: data/sft.py), `GET /v1/models`, `GET /health` (200 once the
engine has compiled; 503 before). `stream: true` answers with server-sent events (`data: {...}`
chunks, then `data: [DONE]`), with usage in a last chunk when `stream_options.include_usage`.

Sampling parameters keep OpenAI's names and defaults (temperature 1, top_p 1, completions'
max_tokens 16; chat's max_tokens / max_completion_tokens default to the context left), plus
top_k and min_p. `n` choices run as n requests of the engine, choice i seeded with
`fold_in(key(seed), i)`. Errors are 4xx with OpenAI's body {"error": {"message", "type", "param",
"code"}}: invalid JSON or fields (400, not FastAPI's 422), an unknown model (404), a prompt plus
max_tokens beyond the context (400, code "context_length_exceeded"; no silent truncation), `n`
above the stated maximum (400). A client that disconnects cancels its requests (their cache rows
are freed before the next step).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from inference.batching import TOP_LOGPROBS, Engine, Request, SamplingParams

MAX_N = 16  # the most choices one request may ask for


class ApiError(Exception):
    """An error answered with OpenAI's body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code}})


# ---- request bodies ------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields we do not use (user, metadata, ...) are ignored

    model: str
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, lt=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


# ---- the app -------------------------------------------------------------------------------------

def create_app(engine: Engine, tokenizer, *, model_id: str, chat_template: str | None = None,
               max_n: int = MAX_N, start_engine: bool = True) -> FastAPI:
    """The FastAPI app. With `start_engine`, the engine compiles and starts in the background when
    the app starts (so `/health` answers 503 meanwhile) and drains when it stops."""
    from data.sft import ChatTokenizer
    from data.tokenizer import special, with_specials

    chat = ChatTokenizer(tokenizer, chat_template) if hasattr(tokenizer, "encode_with_offsets") else None
    chat_stops = tuple(chat.stop_ids()) if chat is not None else tuple(special(tokenizer.eos_id))
    eos = tuple(special(tokenizer.eos_id))
    created = int(time.time())

    async def lifespan(app):
        task = None
        if start_engine:
            task = asyncio.get_running_loop().run_in_executor(None, engine.start)
        yield
        if task is not None:
            await task
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="Loom", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json").response()
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        value = first.get("input")
        shown = "" if isinstance(value, dict) else f" (got {json.dumps(value)[:80]})"
        return ApiError(400, f"{where}: {first.get('msg', 'invalid')}{shown}", param=param,
                        code="invalid_value").response()

    @app.exception_handler(404)
    async def _not_found(request, _):
        return ApiError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def _bad_method(request, _):
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                        code="method_not_allowed").response()

    @app.get("/health")
    async def health():
        if not engine.ready.is_set():
            return JSONResponse(status_code=503, content={"status": "loading"})
        return {"status": "ok", "running": engine.running}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "loom", "max_model_len": engine.max_len}]}

    def check_common(body: _Sampling):
        if not engine.ready.is_set():
            raise ApiError(503, "the model is still loading; retry when /health answers 200", code="loading",
                           type="server_error")
        if body.model != model_id:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found")
        if body.n > max_n:
            raise ApiError(400, f"n={body.n} is more than this server's maximum of {max_n} choices", param="n",
                           code="invalid_value")
        if body.logit_bias:
            raise ApiError(400, "logit_bias is not supported by this server", param="logit_bias",
                           code="unsupported_parameter")
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options",
                           code="invalid_value")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise ApiError(400, f"stop has {len(stops)} sequences; at most 4 are allowed", param="stop",
                           code="invalid_value")
        return tuple(stops)

    def params_of(body: _Sampling, stops, max_tokens: int, stop_ids, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, min_p=body.min_p or 0.0,
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            stop=stops, stop_token_ids=tuple(stop_ids), logprobs=logprobs)

    def check_fits(prompt_len: int, max_tokens: int, params: SamplingParams, param: str):
        if prompt_len + max_tokens > engine.max_len:
            raise ApiError(400, f"this model's context is {engine.max_len} tokens; the prompt has {prompt_len} and "
                           f"max_tokens asks for {max_tokens} more ({prompt_len + max_tokens} in all): shorten the "
                           "prompt or lower max_tokens", param=param, code="context_length_exceeded")
        try:
            engine.check(prompt_len, params)
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_value") from None

    async def run(prompts: list[list[int]], params: list[SamplingParams], n: int, seed):
        """Starts n requests per prompt; returns (their requests, one queue of (choice, Output))."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        requests = []
        for pi, (ids, p) in enumerate(zip(prompts, params)):
            for j in range(n):
                index = pi * n + j
                on_output = lambda o, index=index: loop.call_soon_threadsafe(outputs.put_nowait, (index, o))  # noqa: E731
                if seed is None:
                    req = Request(ids, p, on_output)
                else:
                    req = Request(ids, p, on_output, seed=seed, choice=j if n > 1 else None)
                requests.append(req)
        try:
            for req in requests:
                engine.submit(req)
        except (ValueError, RuntimeError) as e:
            for req in requests:
                req.cancel()
            raise ApiError(503 if isinstance(e, RuntimeError) else 400, str(e),
                           type="server_error" if isinstance(e, RuntimeError) else "invalid_request_error") from None
        return requests, outputs

    async def collect(http: HttpRequest, requests, outputs):
        """Every choice's (text, tokens, finish reason, prompt tokens, completion tokens)."""
        results: dict[int, list] = {i: ["", [], None, 0, 0] for i in range(len(requests))}
        pending = len(requests)
        try:
            while pending:
                try:
                    index, out = await asyncio.wait_for(outputs.get(), 0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                r = results[index]
                r[0] += out.text
                r[1].extend(out.tokens)
                if out.finish_reason:
                    if out.finish_reason == "error":
                        raise ApiError(500, f"generation failed: {out.error}", type="server_error")
                    r[2:] = [out.finish_reason, out.prompt_tokens, out.completion_tokens]
                    pending -= 1
        finally:
            for req in requests:
                if results[requests.index(req)][2] is None:
                    req.cancel()
        return [results[i] for i in range(len(requests))]

    def usage(results, n: int) -> dict:
        """OpenAI's counts: each prompt's tokens once, whatever n; every choice's generated tokens."""
        n_prompt = sum(r[3] for i, r in enumerate(results) if i % n == 0)
        n_out = sum(r[4] for r in results)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    def token_text(i: int) -> str:
        return tokenizer.decode([i])

    def completion_logprobs(tokens, offset: int) -> dict:
        texts = [token_text(t.id) for t in tokens]
        offsets, at = [], offset
        for s in texts:
            offsets.append(at)
            at += len(s)
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{token_text(a): b for a, b in t.top} for t in tokens], "text_offset": offsets}

    def chat_logprobs(tokens) -> dict:
        def entry(i, lp):
            s = token_text(i)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(a, b) for a, b in t.top]}
                            for t in tokens]}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream(requests, outputs, body: _Sampling, first: list[dict], render, last: dict):
        """Server-sent events of a streamed request: the `first` chunks, then `render(choice, Output)`'s
        chunks as the engine's outputs arrive, a usage chunk (`last` plus usage) when the request asked
        for one, and `[DONE]`. Ending early (the client went away) cancels the requests."""
        counts = [[0, 0] for _ in requests]
        pending = len(requests)
        try:
            for c in first:
                yield sse(c)
            while pending:
                index, out = await outputs.get()
                if out.finish_reason == "error":
                    yield sse({"error": {"message": f"generation failed: {out.error}", "type": "server_error",
                                         "param": None, "code": None}})
                    return
                for c in render(index, out):
                    yield sse(c)
                if out.finish_reason:
                    counts[index] = [out.prompt_tokens, out.completion_tokens]
                    pending -= 1
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**last, "usage": usage([[None, None, None, *c] for c in counts], body.n)})
            yield "data: [DONE]\n\n"
        finally:
            for req in requests:
                req.cancel()  # a no-op for finished requests; frees the rows of a client gone mid-stream

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HttpRequest):
        stops = check_common(body)
        if body.suffix:
            raise ApiError(400, "suffix is not supported by this server", param="suffix", code="unsupported_parameter")
        if body.best_of is not None and body.best_of != body.n:
            raise ApiError(400, "best_of other than n is not supported", param="best_of", code="unsupported_parameter")
        if body.echo and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported (no prompt log-probs)", param="echo",
                           code="unsupported_parameter")
        raw = body.prompt
        if isinstance(raw, str):
            texts, prompts = [raw], None
        elif raw and all(isinstance(x, str) for x in raw):
            texts, prompts = list(raw), None
        elif raw and all(isinstance(x, int) for x in raw):
            texts, prompts = None, [list(raw)]
        elif raw and all(isinstance(x, list) for x in raw):
            texts, prompts = None, [list(x) for x in raw]
        else:
            raise ApiError(400, "prompt is empty", param="prompt", code="invalid_value")
        if prompts is None:
            prompts = [with_specials(tokenizer, tokenizer.encode(t)) for t in texts]
        else:
            bad = [t for p in prompts for t in p if not 0 <= t < engine.config.vocab_size]
            if bad or any(not p for p in prompts):
                raise ApiError(400, f"prompt token ids must be non-empty lists of ids in [0, "
                               f"{engine.config.vocab_size})" + (f"; got {bad[0]}" if bad else ""), param="prompt",
                               code="invalid_value")
            texts = [tokenizer.decode(p) for p in prompts]
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default, also for null
        params = [params_of(body, stops, max_tokens, eos, body.logprobs) for _ in prompts]
        for p, sp in zip(prompts, params):
            check_fits(len(p), max_tokens, sp, "max_tokens")
        requests, outputs = await run(prompts, params, body.n, body.seed)
        rid, model = f"cmpl-{uuid.uuid4().hex}", model_id

        def choice(index, text, tokens, finish, offset=0):
            return {"index": index, "text": text, "finish_reason": finish,
                    "logprobs": completion_logprobs(tokens, offset) if body.logprobs is not None else None}

        if not body.stream:
            results = await collect(http, requests, outputs)
            choices = []
            for i, r in enumerate(results):
                prefix = texts[i // body.n] if body.echo else ""
                choices.append(choice(i, prefix + r[0], r[1], r[2], len(prefix)))
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                    "choices": choices, "usage": usage(results, body.n)}

        offsets = [len(texts[i // body.n]) if body.echo else 0 for i in range(len(requests))]

        def render(index, out):
            head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
            if out.text or out.tokens or out.finish_reason:
                yield {**head, "choices": [choice(index, out.text, out.tokens, out.finish_reason, offsets[index])]}
            offsets[index] += len(out.text)

        first = [{"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                  "choices": [choice(i, texts[i // body.n], [], None)]} for i in range(len(requests)) if body.echo]
        last = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": []}
        events = stream(requests, outputs, body, first, render, last)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HttpRequest):
        stops = check_common(body)
        if chat is None:
            raise ApiError(400, "this model's tokenizer cannot render chats", code="unsupported")
        if body.tools:
            raise ApiError(400, "tools are not supported by this server", param="tools", code="unsupported_parameter")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise ApiError(400, f"response_format {body.response_format.get('type')!r} is not supported (only "
                           "'text')", param="response_format", code="unsupported_parameter")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                kinds = {p.type for p in content} - {"text"}
                if kinds:
                    raise ApiError(400, f"messages[{i}] has content parts of type {sorted(kinds)}; this model reads "
                                   "text only", param=f"messages.{i}.content", code="unsupported_content")
                content = "".join(p.text or "" for p in content)
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": content or ""})
        try:
            ids = chat.prompt_ids(messages)
        except ValueError as e:  # the template refused the chat (e.g. a role it does not have)
            raise ApiError(400, f"the chat cannot be rendered: {e}", param="messages", code="invalid_value") from None
        limit = body.max_completion_tokens or body.max_tokens
        max_tokens = limit if limit is not None else max(engine.max_len - len(ids), 0)
        if max_tokens < 1:
            raise ApiError(400, f"this model's context is {engine.max_len} tokens and the messages take {len(ids)}",
                           param="messages", code="context_length_exceeded")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = params_of(body, stops, max_tokens, chat_stops, logprobs)
        check_fits(len(ids), max_tokens, params,
                   "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        requests, outputs = await run([ids], [params], body.n, body.seed)
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", model_id

        if not body.stream:
            results = await collect(http, requests, outputs)
            choices = [{"index": i, "message": {"role": "assistant", "content": r[0]}, "finish_reason": r[2],
                        "logprobs": chat_logprobs(r[1]) if body.logprobs else None} for i, r in enumerate(results)]
            return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                    "choices": choices, "usage": usage(results, body.n)}

        def chunk(choices):
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                    "choices": choices}

        def render(index, out):
            lp = chat_logprobs(out.tokens) if body.logprobs and out.tokens else None
            if out.text or lp:
                yield chunk([{"index": index, "delta": {"content": out.text}, "logprobs": lp, "finish_reason": None}])
            if out.finish_reason:
                yield chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}])

        first = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]) for i in range(len(requests))]
        events = stream(requests, outputs, body, first, render, chunk([]))
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
