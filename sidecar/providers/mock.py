"""The in-process `mock` provider: configurable content, usage, latency, failures and streaming.

Used by `config/demo.yaml`, by tests of in-process behaviour and by benchmarks. No network.
Per model id (`mock.models.<id>`, falling back to `mock.default`):
  content / contents   the reply; with `contents`, the n-th assistant turn of the conversation
                       gets the n-th entry (so a schema re-prompt can get a better answer)
  latency_ms           wait before answering (and before the first chunk)
  chunk_delay_ms       wait between stream chunks;  chunks: how many content chunks
  fail_status          answer this HTTP status as an OpenAI-style error instead
  prompt_tokens / completion_tokens   usage to report (estimated from text when omitted)
A request with `tools` is answered with a call of one of them (`tool_choice` honoured: none,
auto, required, a named function), its arguments built from the tool's parameter schema
(mock_arguments.py) — unless the conversation ends with a tool result, which gets the reply: so
a client's agent loop ends. Embeddings are deterministic unit vectors of each input
(mock_embeddings.py): the same text, model and dimensions give the same vector.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.errors import classify_http_failure
from sidecar.providers.base import Completion, KindCaps, UpstreamCall, Usage
from sidecar.providers.mock_arguments import example_arguments
from sidecar.providers.mock_embeddings import TooManyValues, embeddings_answer
from sidecar.settings.model import ProviderSettings

DEFAULT_CONTENT = "Hello from the Ringside mock provider."


@dataclass(frozen=True, slots=True)
class MockReply:
    contents: tuple[str, ...] = (DEFAULT_CONTENT,)
    latency: float = 0.0
    chunk_delay: float = 0.0
    chunks: int = 8
    fail_status: int | None = None
    fail_message: str = "mock failure"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str = "stop"

    @classmethod
    def from_config(cls, data: Mapping[str, Any], base: MockReply | None = None) -> MockReply:
        base = base or cls()
        if "contents" in data:
            contents = tuple(data["contents"])
        elif "content" in data:
            contents = (data["content"],)
        else:
            contents = base.contents
        return cls(
            contents=contents,
            latency=data.get("latency_ms", base.latency * 1000) / 1000,
            chunk_delay=data.get("chunk_delay_ms", base.chunk_delay * 1000) / 1000,
            chunks=data.get("chunks", base.chunks),
            fail_status=data.get("fail_status", base.fail_status),
            fail_message=data.get("fail_message", base.fail_message),
            prompt_tokens=data.get("prompt_tokens", base.prompt_tokens),
            completion_tokens=data.get("completion_tokens", base.completion_tokens),
            finish_reason=data.get("finish_reason", base.finish_reason),
        )


def estimate_tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def _prompt_text(messages: Any) -> str:
    parts: list[str] = []
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            texts = (part.get("text") for part in content if isinstance(part, dict))
            parts.extend(text for text in texts if isinstance(text, str))
    return " ".join(parts)


def tool_call(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The tool call the mock answers `body` with, in OpenAI's shape; None for a reply."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    choice = body.get("tool_choice", "auto")
    functions = [
        t["function"]
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    ]  # fmt: skip
    if not functions or choice == "none":
        return None
    chosen = functions[0]
    if isinstance(choice, dict):
        named = choice.get("function")
        name = named.get("name") if isinstance(named, dict) else None
        chosen = next((f for f in functions if f["name"] == name), chosen)
    elif choice != "required":  # auto: a tool result just came back, so answer it
        messages = body.get("messages")
        last = messages[-1] if isinstance(messages, list) and messages else None
        if isinstance(last, dict) and last.get("role") == "tool":
            return None
    arguments = orjson.dumps(example_arguments(chosen.get("parameters", {}))).decode()
    return {
        "id": "call_mock_" + os.urandom(6).hex(),
        "type": "function",
        "function": {"name": chosen["name"], "arguments": arguments},
    }


def _assistant_turns(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")


class MockProvider:
    """A ProviderClient that answers in-process."""

    # one choice a call; embeddings: deterministic vectors (mock_embeddings.py)
    caps = KindCaps(tools=True, vision=False, json_schema=False, n=False, embeddings=True)
    native_json_schema = False
    json_mode = True

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings
        config = settings.options.get("mock", {})
        self.default = MockReply.from_config(config.get("default", {}))
        self.replies = {
            model: MockReply.from_config(data, self.default)
            for model, data in config.get("models", {}).items()
        }

    def _plan(self, call: UpstreamCall) -> tuple[MockReply, str, Usage, str, dict[str, Any] | None]:
        reply = self.replies.get(call.model_id, self.default)
        messages = call.body.get("messages")
        prompt = reply.prompt_tokens or estimate_tokens(_prompt_text(messages))
        called = tool_call(call.body)
        if called is not None:
            produced = reply.completion_tokens or estimate_tokens(
                called["function"]["name"] + called["function"]["arguments"]
            )
            return reply, "", Usage(prompt, produced), "tool_calls", called
        turn = min(_assistant_turns(messages), len(reply.contents) - 1)
        content = reply.contents[turn]
        finish = reply.finish_reason
        cap = call.body.get("max_completion_tokens") or call.body.get("max_tokens")
        completion = reply.completion_tokens or estimate_tokens(content)
        if isinstance(cap, int) and completion > cap:
            content = content[: cap * 4]
            completion, finish = cap, "length"
        return reply, content, Usage(prompt, completion), finish, None

    async def _fail_or_wait(self, reply: MockReply) -> None:
        if reply.latency:
            await asyncio.sleep(reply.latency)
        if reply.fail_status is not None:
            raise classify_http_failure(reply.fail_status, reply.fail_message, code="mock_failure")

    async def complete(self, call: UpstreamCall) -> Completion:
        reply, content, usage, finish, called = self._plan(call)
        await self._fail_or_wait(reply)
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if called is not None:
            message = {"role": "assistant", "content": None, "refusal": None,
                       "tool_calls": [called]}  # fmt: skip
        body = {
            "id": "chatcmpl-mock-" + os.urandom(8).hex(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage.as_openai(),
            "system_fingerprint": "ringside-mock",
        }
        return Completion(body, usage)

    async def embed(self, call: UpstreamCall) -> Completion:
        reply = self.replies.get(call.model_id, self.default)
        await self._fail_or_wait(reply)
        try:
            body, usage = embeddings_answer(call.body, call.model_id)
        except TooManyValues as refused:
            raise classify_http_failure(400, str(refused), code="invalid_value") from None
        return Completion(body, usage)

    async def open_stream(self, call: UpstreamCall) -> MockChunkStream:
        reply, content, usage, finish, called = self._plan(call)
        await self._fail_or_wait(reply)
        options = call.body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        return MockChunkStream(call.model_id, reply, content, usage, finish, wants_usage, called)


class MockChunkStream:
    def __init__(
        self,
        model_id: str,
        reply: MockReply,
        content: str,
        usage: Usage,
        finish: str,
        wants_usage: bool,
        called: dict[str, Any] | None = None,
    ) -> None:
        self.usage: Usage | None = None
        self._called = called
        self.content = ""
        self._delay = reply.chunk_delay
        self._final_usage = usage
        self._wants_usage = wants_usage
        self._finish = finish
        self._base = {
            "id": "chatcmpl-mock-" + os.urandom(8).hex(),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model_id,
            "system_fingerprint": "ringside-mock",
        }
        size = max(1, -(-len(content) // max(1, reply.chunks)))
        self._pieces = [content[i : i + size] for i in range(0, len(content), size)] or [""]
        if called is not None:  # one step, the call's
            self._pieces = [""]
        self._step = 0

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return orjson.dumps({**self._base, "choices": [choice]})

    @property
    def ended(self) -> bool:
        return self._step > len(self._pieces) + 1

    def __aiter__(self) -> MockChunkStream:
        return self

    async def __anext__(self) -> list[bytes]:
        step = self._step
        self._step += 1
        if step == 0:
            return [self._chunk({"role": "assistant", "content": "", "refusal": None}, None)]
        if self._called is not None and step == 1:  # the call, in one delta, as OpenAI may
            return [self._chunk({"tool_calls": [{"index": 0, **self._called}]}, None)]
        if step <= len(self._pieces):
            if self._delay:
                await asyncio.sleep(self._delay)
            piece = self._pieces[step - 1]
            self.content += piece
            return [self._chunk({"content": piece}, None)]
        if step == len(self._pieces) + 1:
            self.usage = self._final_usage
            out = [self._chunk({}, self._finish)]
            if self._wants_usage:
                out.append(
                    orjson.dumps({**self._base, "choices": [], "usage": self.usage.as_openai()})
                )
            return out
        raise StopAsyncIteration

    @property
    def produced(self) -> int:
        if self._called is not None and self._step > 1:
            return len(self._called["function"]["arguments"])
        return len(self.content)  # the configured reply: bounded, kept whole

    async def aclose(self) -> None:
        if self.usage is None:  # cut short: charge what was produced
            prompt = self._final_usage.prompt_tokens
            self.usage = Usage(prompt, estimate_tokens(self.content) if self.content else 0)
