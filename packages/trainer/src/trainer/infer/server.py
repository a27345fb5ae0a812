"""The HTTP API of ``trainer serve`` (Starlette): the OpenAI completions API over an :class:`Engine`.

``POST /v1/completions``: ``prompt`` (text, token ids, or a list of either), ``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ``stop``, ``seed``, ``stream``,
``ignore_eos``; the answer is a ``text_completion`` object, or with ``stream`` server-sent events ending
with ``data: [DONE]``.
``GET /v1/models`` lists the one model; ``GET /health`` says the engine's state (requests, free blocks).

A bad request (malformed JSON, an unknown field, a value out of range, a prompt that does not fit) is
answered with HTTP 400 and ``{"error": {"message", "type", "param", "code"}}``, ``param`` naming the field,
before anything runs. A client that goes away mid-stream aborts its requests, which frees their blocks.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..errors import TrainerError
from .engine import Engine, Output, Request
from .sampling import SamplingParams

DEFAULTS: dict[str, Any] = {
    "max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": None, "repetition_penalty": 1.0,
    "seed": None, "stop": None, "ignore_eos": False,
}  # fmt: skip
# accepted with only the value that changes nothing
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1, None), "echo": (False,), "logprobs": (None,), "suffix": (None,),
    "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "user": (), "stream_options": (),
}  # fmt: skip
KNOWN = {"model", "prompt", "stream", *DEFAULTS, *NEUTRAL}


class BadRequest(Exception):
    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(None, f"the body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadRequest(None, "the body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise BadRequest(unknown[0], f"{unknown[0]}: unknown field; known fields are {sorted(KNOWN)}")
    for name, allowed in NEUTRAL.items():
        if name in body and allowed and body[name] not in allowed:
            raise BadRequest(name, f"{name}={body[name]!r}: not supported; only {allowed[0]!r}")
    return body


def prompts_of(body: dict[str, Any]) -> list[str | list[int]]:
    """The prompts of a request: one text, one list of token ids, or a list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_list(p) for p in prompt):
        return list(prompt)
    raise BadRequest("prompt", "prompt: must be a string, a list of token ids, or a non-empty list of either")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(t) for t in value)


def params_of(body: dict[str, Any]) -> SamplingParams:
    values = {name: body.get(name, default) for name, default in DEFAULTS.items()}
    for name in values:
        if values[name] is None:
            values[name] = DEFAULTS[name]
    stop = values.pop("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif not isinstance(stop, list):
        raise BadRequest("stop", "stop: must be a string or a list of strings")
    try:
        return SamplingParams(stop=tuple(stop), **values)
    except TrainerError as err:
        raise BadRequest(str(err).split(":", 1)[0], str(err)) from None


def build_app(engine: Engine, model_name: str) -> Starlette:
    """The Starlette application over ``engine`` (its loop must be started)."""

    async def health(_: HTTPRequest) -> JSONResponse:
        return JSONResponse({"status": "ok", **engine.stats()})

    async def models(_: HTTPRequest) -> JSONResponse:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "trainer"}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(http: HTTPRequest) -> Any:
        try:
            body = parse_body(await http.body())
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise BadRequest("stream", "stream: must be true or false")
            if "model" in body and not isinstance(body["model"], str):
                raise BadRequest("model", "model: must be a string")
            params = params_of(body)
            requests = [Request(p, params) for p in prompts_of(body)]
            streams = [engine.submit(r) for r in requests]
        except BadRequest as err:
            return error(400, str(err), err.param)
        except TrainerError as err:
            return error(400, str(err), str(err).split(":", 1)[0])
        firsts = await asyncio.gather(*(anext(s) for s in streams))
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if stream:
            events = _events(cid, created, model_name, streams, firsts, http)
            return StreamingResponse(events, media_type="text/event-stream")
        results = await asyncio.gather(*(_collect(s, f) for s, f in zip(streams, firsts)))
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
            for i, (text, last) in enumerate(results)
        ]
        prompt_tokens = sum(last.prompt_tokens for _, last in results)
        completion_tokens = sum(last.completion_tokens for _, last in results)
        usage = {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }  # fmt: skip
        obj = "text_completion"
        return JSONResponse(
            {"id": cid, "object": obj, "created": created, "model": model_name, "choices": choices, "usage": usage}
        )

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    return Starlette(routes=routes)


async def _collect(stream: AsyncIterator[Output], first: Output) -> tuple[str, Output]:
    text, last = first.text, first
    async for out in stream:
        text, last = text + out.text, out
    return text, last


async def _events(
    cid: str,
    created: int,
    model: str,
    streams: list[AsyncIterator[Output]],
    firsts: list[Output],
    http: HTTPRequest,
) -> AsyncIterator[str]:
    """Server-sent events of every prompt's outputs as they come. The client leaving (the server only
    drops what is sent after that, so its disconnect message is watched for) closes every stream, which
    aborts its request."""
    queue: asyncio.Queue[tuple[int, Output | None]] = asyncio.Queue()

    async def disconnected() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    async def pump(i: int, stream: AsyncIterator[Output], first: Output) -> None:
        await queue.put((i, first))
        if first.finish_reason is None:
            async for out in stream:
                await queue.put((i, out))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s, f)) for i, (s, f) in enumerate(zip(streams, firsts))]
    gone = asyncio.create_task(disconnected())
    tasks.append(gone)
    try:
        open_streams = len(streams)
        while open_streams:
            item = asyncio.create_task(queue.get())
            await asyncio.wait({item, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not item.done():
                item.cancel()
                return
            i, out = item.result()
            if out is None:
                open_streams -= 1
                continue
            if not out.text and out.finish_reason is None:
                continue  # text held back (a possible stop string, an unfinished character)
            choice = {"index": i, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
            chunk = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
