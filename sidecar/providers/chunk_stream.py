"""The OpenAI side of a native provider's stream decoder: chunks, tool calls, the answer tool.

Each native decoder (anthropic, bedrock, cohere) parses its provider's events itself and hands
what they say to these methods, which write the `chat.completion.chunk`s and keep the counts the
StreamDecoder protocol reports. `ChunkStream` is what every one of them emits; `BlockStream` adds
the content-block state of the two whose tool calls are numbered blocks (anthropic, bedrock),
including the output tool of a json_schema request, whose input is the content.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from sidecar.providers.anthropic_request import OutputTool
from sidecar.providers.base import Usage


class ChunkStream:
    """OpenAI chunks of one choice, and the counts a StreamDecoder reports.

    The opening chunk (role) waits for the first content or tool call, so that a failure
    before any of them still counts as one before the first chunk (the cascade may escalate
    from it). A subclass sets `finished` and `usage` as its provider's events say, and may
    change `_base`'s id and model until the first chunk is out.
    """

    __slots__ = (
        "_base",
        "_content",
        "_opened",
        "finished",
        "keep_content",
        "produced",
        "usage",
        "wants_usage",
    )

    def __init__(self, wants_usage: bool, keep_content: bool, chunk_id: str, model: str) -> None:
        self.wants_usage = wants_usage
        self.keep_content = keep_content
        self.usage: Usage | None = None
        self.produced = 0
        self.finished = False
        self._content: list[str] = []
        self._base: dict[str, Any] = {
            "id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model,
        }  # fmt: skip
        self._opened = False

    @property
    def content(self) -> str:
        return "".join(self._content)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return orjson.dumps({**self._base, "choices": [choice]})

    def _emit(self, delta: dict[str, Any], finish: str | None = None) -> list[bytes]:
        out = []
        if not self._opened:
            self._opened = True
            out.append(self._chunk({"role": "assistant", "content": ""}))
        out.append(self._chunk(delta, finish))
        return out

    def _text(self, text: str) -> list[bytes]:
        """A content delta (none for empty text)."""
        if not text:
            return []
        self.produced += len(text)
        if self.keep_content:
            self._content.append(text)
        return self._emit({"content": text})

    def _tool_call(self, position: int, call_id: str, name: str, arguments: str) -> list[bytes]:
        """The chunk that opens the tool call at OpenAI index `position`."""
        self.produced += 1 + len(arguments)
        return self._emit(
            {"tool_calls": [{"index": position, "id": call_id, "type": "function",
                             "function": {"name": name, "arguments": arguments}}]}
        )  # fmt: skip

    def _arguments(self, position: int, piece: str) -> list[bytes]:
        """An argument delta of the tool call at OpenAI index `position`."""
        self.produced += len(piece)
        return self._emit({"tool_calls": [{"index": position, "function": {"arguments": piece}}]})

    def _usage_chunk(self, usage: dict[str, Any]) -> bytes:
        """The chunk without choices that carries the OpenAI `usage` object."""
        return orjson.dumps({**self._base, "choices": [], "usage": usage})


class BlockStream(ChunkStream):
    """A ChunkStream whose tool calls arrive as numbered content blocks.

    Each tool block is a tool call with its own OpenAI index, its input deltas the call's
    argument deltas; the output tool's block is no tool call, its input deltas are content,
    held back until the block stops when the answer is wrapped (only the whole input can be
    unwrapped).
    """

    __slots__ = ("_blocks", "_held", "answer_tool")

    def __init__(
        self,
        wants_usage: bool,
        keep_content: bool,
        answer_tool: OutputTool | None,
        chunk_id: str,
        model: str,
    ) -> None:
        super().__init__(wants_usage, keep_content, chunk_id, model)
        self.answer_tool = answer_tool
        self._blocks: dict[int, int | None] = {}  # block index → tool call index (None: answer)
        self._held: list[str] = []  # the wrapped answer tool's input, until its block stops

    def _finish_reason(self, reason: str) -> str:
        """`reason`, but `stop` for `tool_calls` when only the answer tool was called."""
        if reason == "tool_calls" and not any(i is not None for i in self._blocks.values()):
            return "stop"
        return reason

    def _tool_start(self, index: int, call_id: Any, name: Any) -> list[bytes]:
        """Block `index` starts a tool call (or the answer tool, when `name` is its name)."""
        tool = self.answer_tool
        if tool is not None and name == tool.name:
            self._blocks[index] = None
            return []
        call = sum(1 for i in self._blocks.values() if i is not None)
        self._blocks[index] = call
        return self._tool_call(call, str(call_id), str(name), "")

    def _tool_input(self, index: Any, piece: str) -> list[bytes]:
        """A piece of the input of the tool in block `index`."""
        if not piece or index not in self._blocks:
            return []
        call = self._blocks[index]
        if call is None:  # the answer tool: its input is the content
            if self.answer_tool is not None and self.answer_tool.wrapped:
                self._held.append(piece)
                return []
            return self._text(piece)
        self.produced += len(piece)  # `_arguments`, inline: one call less per argument delta
        return self._emit({"tool_calls": [{"index": call, "function": {"arguments": piece}}]})

    def _block_stop(self, index: Any) -> list[bytes]:
        """Block `index` stopped: when it is the wrapped answer tool, its answer as content."""
        if (
            not self._held
            or not isinstance(index, int)
            or self._blocks.get(index, 0) is not None
            or self.answer_tool is None
        ):
            return []
        held, self._held = "".join(self._held), []
        try:
            tool_input = orjson.loads(held)
        except orjson.JSONDecodeError:
            return self._text(held)  # validation at the end says what is wrong with it
        return self._text(self.answer_tool.answer(tool_input))
