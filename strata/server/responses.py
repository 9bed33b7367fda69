"""Engine outputs -> OpenAI responses: one non-streaming JSON body, or SSE chunks (same id and created on
every chunk, role first, finish_reason on the last content chunk, optional usage chunk, then [DONE]).
Each chunk's logprobs are those of the tokens whose text it carries (the engine's outputs say how many).
A client that goes away aborts its engine requests, streaming or not."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from strata.server.errors import to_api_error
from strata.server.protocol import random_id
from strata.server.request_stream import RequestStream
from strata.server.tool_calls import ToolCallStreamer, tool_message


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always runs `on_close` (abort the engine requests), even when the client
    disconnects while the body generator is suspended. The body streams while a second task waits for the
    client's disconnect, which stops it: what StreamingResponse does under uvicorn's ASGI 2.3, with two plain
    asyncio tasks instead of an anyio task group (~55 us of the event loop per response)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        streaming = asyncio.ensure_future(self.stream_response(send))
        watching = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait((streaming, watching), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            if not streaming.done():  # the client went away, or this task is cancelled
                streaming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await streaming
            self.on_close()
            await self.body_iterator.aclose()
        for task in (streaming, watching):  # an error of either ends the response, as in a task group
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
        if self.background is not None:
            await self.background()


async def _merge(streams: list[RequestStream]):
    """Yields (prompt_index, RequestOutput) from several request streams as they arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i, s):
        try:
            async for out in s:
                q.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            q.put_nowait((i, e))
        q.put_nowait((i, end))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            i, item = await q.get()
            if item is end:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()

class RequestContext:
    """One client request in flight: its engine streams and what has been sent."""

    def __init__(self, serving, req, is_chat: bool, prompts, texts, streams):
        self.s, self.req, self.is_chat = serving, req, is_chat
        self.prompts, self.texts, self.streams = prompts, texts, streams
        self.id = random_id("chatcmpl-" if is_chat else "cmpl-")
        self.created = int(time.time())
        self.object = "chat.completion" if is_chat else "text_completion"
        self.finals: dict[int, object] = {}
        self.tool_parser = None  # a ToolParser when the reply may call tools (strata/server/tool_parsers.py)
        self._envelope: tuple[str, str] | None = None  # see _text_chunk

    def abort_all(self) -> None:
        for s in self.streams:
            s.abort()

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(o.token_ids) for out in self.finals.values() for o in out.outputs)
        cached = sum(out.num_cached_tokens for out in self.finals.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _logprobs(self, entries, offset: int = 0):
        if entries is None or self.req.logprobs is None or self.req.logprobs is False:
            return None
        return self.s.chat_logprobs(entries) if self.is_chat else self.s.completion_logprobs(entries, offset)

    @property
    def echo_logprobs(self) -> bool:
        """Completions with echo and logprobs: the prompt's tokens lead each choice's logprobs."""
        return not self.is_chat and self.req.echo and self.req.logprobs is not None

    def _echo_entries(self, pi: int) -> list[dict]:
        return self.s.echo_entries(self.prompts[pi], self.finals[pi].prompt_logprobs)

    # ---- non-streaming ----------------------------------------------------------------------------
    async def collect(self, raw: Request) -> JSONResponse:
        async def consume():
            async for i, out in _merge(self.streams):
                self.finals[i] = out

        async def disconnected():
            while (await raw.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.create_task(consume()), asyncio.create_task(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client went away: free its blocks now
                work.cancel()
                self.abort_all()
                return JSONResponse({}, status_code=499)
            work.result()
        finally:
            watch.cancel()
            self.abort_all()
        n = self.req.n
        choices = []
        for pi in range(len(self.prompts)):
            echo = self.texts[pi] or ""
            final = self.finals[pi]
            for o in final.outputs:
                entries = (self._echo_entries(pi) + o.logprobs) if self.echo_logprobs else o.logprobs
                c = {"index": pi * n + o.index, "logprobs": self._logprobs(entries, 0 if self.echo_logprobs
                                                                            else len(echo)),
                     "finish_reason": _reason(o.finish_reason)}
                if self.is_chat and self.tool_parser is not None:
                    c["message"], called = tool_message(self.tool_parser, o.text)
                    if called and o.finish_reason == "stop":
                        c["finish_reason"] = "tool_calls"
                elif self.is_chat:
                    c["message"] = {"role": "assistant", "content": o.text}
                else:
                    c["text"] = echo + o.text
                    if self.req.prompt_logprobs is not None:
                        c["prompt_logprobs"] = self.s.vllm_prompt_logprobs(final.prompt_logprobs)
                choices.append(c)
        choices.sort(key=lambda c: c["index"])
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.s.model_name,
                "choices": choices, "usage": self.usage()}
        if self.is_chat and self.req.prompt_logprobs is not None:
            body["prompt_logprobs"] = self.s.vllm_prompt_logprobs(self.finals[0].prompt_logprobs)
        return JSONResponse(body)

    # ---- streaming ---------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict], usage=False) -> str:
        body = {"id": self.id, "object": self.object + (".chunk" if self.is_chat else ""), "created": self.created,
                "model": self.s.model_name, "choices": choices}
        opts = self.req.stream_options
        if opts is not None and opts.continuous_usage_stats:
            body["usage"] = self.usage()  # so far: the prompt, and the tokens generated up to this chunk
        elif opts is not None and opts.include_usage:
            body["usage"] = self.usage() if usage else None
        return f"data: {_dumps(body)}\n\n"

    def _text_chunk(self, index: int, text: str, finish: str | None) -> str:
        """_chunk([_choice(index, text, finish=finish)]), the same bytes, for the chunks of every token (no
        logprobs, no per-chunk usage): the fields every chunk repeats are encoded once per request."""
        if self._envelope is None:
            head = _dumps({"id": self.id, "object": self.object + (".chunk" if self.is_chat else ""),
                           "created": self.created, "model": self.s.model_name, "choices": []})[:-2]  # ends "["
            opts = self.req.stream_options
            usage = ',"usage":null' if opts is not None and opts.include_usage else ""
            self._envelope = (f"data: {head}", f"]{usage}}}\n\n")
        if self.is_chat:
            body = f'"delta":{{"content":{_dumps(text)}}}' if text else '"delta":{}'
        else:
            body = f'"text":{_dumps(text)}'
        reason = "null" if finish is None else _dumps(finish)
        head, tail = self._envelope
        return f'{head}{{"index":{index},{body},"logprobs":null,"finish_reason":{reason}}}{tail}'

    def _choice(self, index: int, text: str | None, role=False, logprobs=None, finish=None) -> dict:
        if self.is_chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    def _tool_chunks(self, streamer: ToolCallStreamer, idx: int, text: str, lp, finish):
        """The chunks of a choice whose reply may call tools: content and tool_calls deltas."""
        deltas = streamer.deltas(text, final=finish is not None)
        if finish == "stop" and streamer.has_calls:
            finish = "tool_calls"
        if not deltas and (finish or lp):
            deltas = [{}]
        for k, delta in enumerate(deltas):
            last = k == len(deltas) - 1
            yield self._chunk([{"index": idx, "delta": delta, "logprobs": lp if k == 0 else None,
                                "finish_reason": finish if last else None}])

    async def sse(self):
        """The SSE body: chunks that are ready together go out in one write (a stream that fell behind the
        engine catches up in one send instead of one per token)."""
        buf = []
        async with contextlib.aclosing(self._sse_chunks()) as chunks:
            async for chunk in chunks:
                buf.append(chunk)
                if not any(s.has_pending for s in self.streams):
                    yield "".join(buf)
                    buf = []
        if buf:
            yield "".join(buf)

    async def _sse_chunks(self):
        n = self.req.n
        num_choices = len(self.prompts) * n
        sent_lp = [0] * num_choices
        offsets = [len(self.texts[i // n] or "") for i in range(num_choices)]
        done: set[int] = set()
        # with echo and logprobs the echo chunk waits for the prompt logprobs (the first engine output)
        echo_pending = set(range(len(self.prompts))) if self.echo_logprobs else set()
        tools = [ToolCallStreamer(self.tool_parser) for _ in range(num_choices)] if self.tool_parser else None
        opts = self.req.stream_options
        per_chunk_usage = opts is not None and opts.continuous_usage_stats
        try:
            for idx in range(num_choices):
                if self.is_chat:
                    yield self._chunk([self._choice(idx, None, role=True)])
                elif self.texts[idx // n] and not echo_pending:
                    yield self._chunk([self._choice(idx, self.texts[idx // n])])
            async for pi, out in _merge(self.streams):
                self.finals[pi] = out
                if pi in echo_pending and out.prompt_logprobs is not None:
                    echo_pending.discard(pi)
                    lp = self._logprobs(self._echo_entries(pi), 0)
                    for idx in range(pi * n, pi * n + n):
                        yield self._chunk([self._choice(idx, self.texts[pi], logprobs=lp)])
                for o in out.outputs:
                    idx = pi * n + o.index
                    if idx in done:
                        continue
                    lp = None
                    if o.logprobs is not None and self.req.logprobs not in (None, False):
                        new = o.logprobs[sent_lp[idx]:]
                        sent_lp[idx] = len(o.logprobs)
                        lp = self._logprobs(new, offsets[idx]) if new else None
                    if lp is not None and not self.is_chat:
                        offsets[idx] += sum(len(t) for t in lp["tokens"])
                    finish = _reason(o.finish_reason) if o.finish_reason else None
                    if tools is not None:
                        for chunk in self._tool_chunks(tools[idx], idx, o.text, lp, finish):
                            yield chunk
                    elif lp is None and not per_chunk_usage and (o.delta or finish):
                        yield self._text_chunk(idx, o.delta, finish)
                    elif o.delta or finish or lp:
                        yield self._chunk([self._choice(idx, o.delta, logprobs=lp, finish=finish)])
                    if finish:
                        done.add(idx)
            if self.req.stream_options is not None and self.req.stream_options.include_usage:
                yield self._chunk([], usage=True)
        except Exception as e:  # noqa: BLE001 - the status is already 200: the error travels in the stream
            yield to_api_error(e).sse()
        finally:
            self.abort_all()
        yield "data: [DONE]\n\n"


def _reason(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")
