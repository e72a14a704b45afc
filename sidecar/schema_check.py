"""Client JSON Schemas (SPEC 2.3) compiled once, and answers checked within a request's budget.

A `CompiledSchema` is what one distinct `response_format` compiles to: the Draft 2020-12
validator (jsonschema-rs: formats checked, patterns matched in linear time, no reference ever
fetched), the bound of what checking an answer against it costs (`sidecar.schema_graph`), and
the system instruction for providers without native JSON-schema support. They live in a
bounded `SchemaCache` keyed by a canonical hash, shared across config reloads, so a hot schema
is never compiled twice. A fresh one is compiled ahead of the request's checks (`prime`), its
measure (a Python walk, up to ~10 ms) in a thread so that it does not hold the event loop.

Schemas come from clients, so their cost is bounded. Each request gets its own `SchemaPlan`:
the compiled schema and what the request has spent on it. Compiling (when this request did)
and every check of every attempt together may hold the event loop `BUDGET_NS` (50 ms). The
validator holds the GIL and cannot be interrupted, so a check whose bound does not fit what is
left is not started: the answer counts as a schema failure whose message says the schema is too
costly. Between checks the loop is free (upstream calls are awaited), and a client that goes
away cancels its request there.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.errors import GatewayError, invalid_request
from sidecar.json_size import Sizes, serialized_size
from sidecar.schema_cost import (
    BUDGET_NS,
    MAX_SCHEMA_BYTES,
    NS_FIXED,
    NS_PARSE,
    NS_WALK,
    REGEX_SIZE_LIMIT,
    Cost,
    Refused,
    Shape,
    values,
)
from sidecar.schema_graph import measure

# jsonschema-rs (≈35 ms to import) is imported on the first response_format, not at startup;
# the server warms it up in a background thread once it is ready (see warm_up).

MAX_LISTED_ERRORS = 5
MAX_MESSAGE_CHARS = 200
DEFAULT_CACHE_SIZE = 512
LISTED_ERRORS_MAX_BYTES = 64 * 1024  # a larger invalid answer gets one problem, not a list

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\r?\n?(.*?)\r?\n?[ \t]*```", re.S)
_JSON_OBJECT = {"type": "json_object"}
_OBJECT_INSTRUCTION = (
    "Answer with a single JSON object and nothing else: no prose before or after it, "
    "no Markdown code fences."
)


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason an answer failed: where (a JSON pointer, "" for the whole value) and why."""

    pointer: str
    message: str

    def __str__(self) -> str:
        return f"{self.pointer or '(root)'}: {self.message}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The check of one answer: `problems` empty when it passed; `text` is the bare JSON."""

    text: str | None
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class CompiledSchema:
    """One compiled `response_format`, shared by every request that sends it."""

    kind: str  # "json_schema" | "json_object"
    validator: Any  # a jsonschema_rs validator; None for json_object: any JSON object passes
    instruction: str  # the system message for providers without native support
    cost: Cost | None  # what checking an answer can cost; None for json_object


@dataclass(slots=True)
class SchemaPlan:
    """A request's `response_format`: the compiled schema, and what the request has spent on it
    (nanoseconds holding the event loop: the compile if this request did it, every check)."""

    compiled: CompiledSchema
    spent_ns: int = 0

    @property
    def kind(self) -> str:
        return self.compiled.kind

    @property
    def exhausted(self) -> bool:
        """Whether the request has no budget left for another check."""
        return self.compiled.cost is not None and self.spent_ns >= BUDGET_NS

    def request_body(self, body: dict[str, Any], native: bool, json_mode: bool) -> dict[str, Any]:
        """The body to send a provider: untouched for native support, else with the instruction
        as a system message and the provider's JSON mode (json_object) where it has one.
        `native` is native json_schema: a json_object request goes native only with a JSON mode
        (a kind can have json_schema and not json_object)."""
        if json_mode if self.kind == "json_object" else native:
            return body
        prepared = dict(body)
        messages = list(body["messages"])
        at = 0
        while at < len(messages) and messages[at].get("role") in ("system", "developer"):
            at += 1
        messages.insert(at, {"role": "system", "content": self.compiled.instruction})
        prepared["messages"] = messages
        if json_mode:
            prepared["response_format"] = dict(_JSON_OBJECT)
        else:
            prepared.pop("response_format", None)
        return prepared

    def check(self, content: str | None) -> Verdict:
        """Parse `content` (code fences stripped) and validate it, within the request's budget."""
        if content is None:
            return Verdict(None, (Problem("", "the answer has no content"),))
        cost = self.compiled.cost
        if cost is None:
            text, value, problem = _parse(content)
            if problem is None and not isinstance(value, dict):
                kind = type(value).__name__
                problem = Problem("", f"expected a JSON object, got a {kind}")
            return Verdict(text, () if problem is None else (problem,))
        size = len(content) if content.isascii() else len(content.encode())
        started = time.perf_counter_ns()
        try:
            if cost.fixed_ns + cost.byte_ns * size > BUDGET_NS - self.spent_ns:
                refused = self._refused(content, size, cost, started)
                if refused is not None:
                    return refused
            return self._checked(content, size, cost, started)
        finally:
            self.spent_ns += time.perf_counter_ns() - started

    def _left(self, started: int) -> int:
        return BUDGET_NS - self.spent_ns - (time.perf_counter_ns() - started)

    def _refused(self, content: str, size: int, cost: Cost, started: int) -> Verdict | None:
        """The verdict when the answer may not be checked: its bound, with its values counted
        (half its bytes overcounts them), does not fit what the request has left."""
        left = self._left(started)
        parsing = NS_FIXED + NS_PARSE * size
        if parsing > left:  # not even parsing it fits: counting would not help
            return _too_costly(size, parsing, left)
        need = cost.check_ns(size, values(content))
        left = self._left(started)
        return _too_costly(size, need, left) if need > left else None

    def _checked(self, content: str, size: int, cost: Cost, started: int) -> Verdict:
        text, value, problem = _parse(content)
        if problem is not None:
            return Verdict(text, (problem,))
        shape: Shape | None = None
        if cost.below is None:  # the bound depends on how deep the answer's values are
            shape = cost.shape(value)
            need = cost.walked_ns(size, shape)
            if need > self._left(started):
                return _too_costly(size, need, self._left(started), shape)
        validator = self.compiled.validator
        try:
            if validator.is_valid(value):
                return Verdict(text, ())
        except (ValueError, RecursionError):  # jsonschema-rs: "Recursion limit reached"
            return Verdict(text, (Problem("", "the answer is nested too deeply to validate"),))
        if size > LISTED_ERRORS_MAX_BYTES or NS_WALK * (size // 2 + 1) > self._left(started):
            return Verdict(text, (_unlisted(size),))
        shape = shape or cost.shape(value)
        if cost.errors_ns(size, shape) > self._left(started):
            return Verdict(text, (_unlisted(size),))
        try:
            errors = list(validator.iter_errors(value))
        except (ValueError, RecursionError):
            return Verdict(text, (Problem("", "the answer is nested too deeply to validate"),))
        found = sorted(errors, key=_error_order)[:MAX_LISTED_ERRORS]
        return Verdict(text, tuple(_problem(e) for e in found) or (_unlisted(size),))


def _parse(content: str) -> tuple[str | None, Any, Problem | None]:
    """(the bare JSON text, its value, or why there is none): code fences stripped."""
    try:
        return content, orjson.loads(content), None
    except orjson.JSONDecodeError as exc:
        fenced = _FENCE.search(content)
        if fenced is None:
            return None, None, Problem("", f"the answer is not valid JSON: {exc}")
        text = fenced.group(1).strip()
        try:
            return text, orjson.loads(text), None
        except orjson.JSONDecodeError as inner:
            return None, None, Problem("", f"the fenced block is not valid JSON: {inner}")


def _too_costly(size: int, need: float, left: float, shape: Shape | None = None) -> Verdict:
    deep = " (its values are nested too deep for this schema's recursion)"
    why = deep if shape is not None and shape.too_deep else ""
    took = "" if need == float("inf") else f" could take {need / 1e6:.1f} ms and"
    message = (
        f"the schema is too costly to check this answer of {size} bytes: checking it{took} "
        f"would overrun the {BUDGET_NS / 1e6:.0f} ms a request may spend on its schema "
        f"({max(left, 0) / 1e6:.1f} ms left){why}"
    )
    return Verdict(None, (Problem("", message),))


def _unlisted(size: int) -> Problem:
    return Problem(
        "",
        f"the answer does not match the schema (the gateway does not list the errors of an "
        f"answer of {size} bytes against this schema: it would take too long)",
    )


def _error_order(error: Any) -> tuple[int, list[str]]:
    path = error.instance_path
    return len(path), [str(p) for p in path]


def _problem(error: Any) -> Problem:
    message = error.message
    if len(message) > MAX_MESSAGE_CHARS:  # the value first, what is wrong with it last: keep both
        head = MAX_MESSAGE_CHARS * 2 // 3
        message = message[:head] + "…" + message[head + 1 - MAX_MESSAGE_CHARS :]
    return Problem(pointer(error.instance_path), message)


def pointer(path: Any) -> str:
    """A JSON pointer (RFC 6901) for a path of keys and indexes."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


class SchemaCache:
    """Compiled schemas (and refusals of bad ones) by canonical hash; least recently used out.

    Long-lived: one per gateway process, shared by every Runtime across config reloads.
    """

    def __init__(self, size: int = DEFAULT_CACHE_SIZE) -> None:
        self.size = size
        self._compiled: OrderedDict[bytes, CompiledSchema | GatewayError] = OrderedDict()
        self._executor: ThreadPoolExecutor | None = None  # measures fresh schemas (`prime`)

    def __len__(self) -> int:
        return len(self._compiled)

    def plan(
        self, response_format: Any, sizes: Sizes | None = None, primed: Primed | None = None
    ) -> SchemaPlan | None:
        """This request's plan for its `response_format` (already shape-checked), None for text;
        `sizes`, a large body's parts measured in slices (sidecar.json_size), for its bound;
        `primed`, what `prime` did for this request's format (its key, its compile's cost).

        Raises 400 `invalid_request` (param `response_format`) when the schema is not itself
        valid JSON Schema, or is over one of the bounds of `sidecar.schema_cost`.
        """
        if not isinstance(response_format, dict):
            return None
        kind = response_format.get("type")
        if kind not in ("json_schema", "json_object"):
            return None
        key, size = (primed.key, primed.size) if primed else _key(response_format, sizes)
        found = self._compiled.get(key)
        spent = primed.spent_ns if primed else 0
        if found is None:
            started = time.perf_counter_ns()
            found = _compile(response_format, size)
            spent = time.perf_counter_ns() - started
            self._keep(key, found)
        else:
            self._compiled.move_to_end(key)
        if isinstance(found, GatewayError):
            # a fresh exception per request: a raised one keeps its traceback, and with it the
            # frames of the request (its whole body) for as long as the cache keeps the refusal
            raise GatewayError(
                found.status, found.code, found.message, param=found.param,
                error_type=found.error_type, headers=found.headers,
            )  # fmt: skip
        return SchemaPlan(found, spent)

    async def prime(self, response_format: dict[str, Any], sizes: Sizes | None = None) -> Primed:
        """Compile a shape-checked `response_format` this cache does not hold yet, its schema's
        measure (`sidecar.schema_graph`: a Python walk, ~3-10 µs a subschema, 3-13 ms at the
        1,000-subschema bound) in a thread instead of on the event loop; what `plan` then
        reads. Raises what `plan` would for the format's size."""
        key, size = _key(response_format, sizes)
        if key in self._compiled or response_format.get("type") != "json_schema":
            return Primed(key, size, 0)
        schema = response_format["json_schema"].get("schema", {})
        measured = await asyncio.get_running_loop().run_in_executor(
            self._measurer(), _measured, schema
        )
        if key in self._compiled:  # another request's compile of the same schema came first
            return Primed(key, size, 0)
        started = time.perf_counter_ns()
        compiled = _compile(response_format, size, measured)
        spent = time.perf_counter_ns() - started
        self._keep(key, compiled)
        return Primed(key, size, spent)

    def _keep(self, key: bytes, compiled: CompiledSchema | GatewayError) -> None:
        self._compiled[key] = compiled
        if len(self._compiled) > self.size:
            self._compiled.popitem(last=False)

    def _measurer(self) -> ThreadPoolExecutor:
        """One thread: fresh schemas are measured one at a time, so a flood of them queues
        instead of multiplying threads. While it runs, the interpreter hands the GIL back to
        the event loop every `SWITCH_INTERVAL` s (its default, 5 ms, would let each measure
        hold the loop that long)."""
        if self._executor is None:
            sys.setswitchinterval(SWITCH_INTERVAL)
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="ringside-schema")
        return self._executor


@dataclass(frozen=True, slots=True)
class Primed:
    """What `SchemaCache.prime` did for one request's format: its cache key and serialized
    size, and the ns its compile held the event loop (0: compiled earlier, or not here)."""

    key: bytes
    size: int
    spent_ns: int


SWITCH_INTERVAL = 0.0005  # s: how long a thread holds the GIL while the event loop waits for it


def _key(response_format: dict[str, Any], sizes: Sizes | None) -> tuple[bytes, int]:
    """A format's cache key (the hash of its canonical form) and canonical size; 400 over
    MAX_SCHEMA_BYTES."""
    size = serialized_size(response_format, sizes)  # unsorted: 8x cheaper on a huge one
    if size > MAX_SCHEMA_BYTES:  # refused before sorting it for the cache key
        raise _too_big(size)
    canonical = orjson.dumps(response_format, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=16).digest(), len(canonical)


def _measured(schema: Any) -> Cost | Refused:
    try:
        return measure(schema)
    except Refused as refused:
        return refused


def warm_up() -> None:
    """Import what compiling a schema needs (run off the event loop, after startup)."""
    _compile({"type": "json_schema", "json_schema": {"name": "warm", "schema": {}}}, 0)


def _too_big(size: int) -> GatewayError:
    return invalid_request(
        f"response_format is {size} bytes; the gateway takes schemas of at most "
        f"{MAX_SCHEMA_BYTES // 1024} KiB",
        "response_format",
    )


def _no_retrieval(uri: str) -> Any:
    raise ValueError(f"{uri} is not fetched: only references inside the schema are followed")


def _compile(
    response_format: dict[str, Any], size: int, measured: Cost | Refused | None = None
) -> CompiledSchema | GatewayError:
    if response_format["type"] == "json_object":
        return CompiledSchema("json_object", None, _OBJECT_INSTRUCTION, None)
    import jsonschema_rs

    if size > MAX_SCHEMA_BYTES:
        return _too_big(size)
    spec = response_format["json_schema"]
    schema = spec.get("schema", {})
    cost = _measured(schema) if measured is None else measured
    if isinstance(cost, Refused):
        return invalid_request(f"response_format.json_schema.schema {cost}", "response_format")
    try:
        validator = jsonschema_rs.Draft202012Validator(
            schema,
            validate_formats=True,
            retriever=_no_retrieval,
            pattern_options=jsonschema_rs.RegexOptions(size_limit=REGEX_SIZE_LIMIT),
        )
    except jsonschema_rs.ValidationError as exc:
        reason = exc.message.split("\n", 1)[0]
        if 'is not a "regex"' in reason:
            reason += (
                " (patterns are matched in linear time: lookaround, backreferences and "
                f"patterns that compile to over {REGEX_SIZE_LIMIT // 1024} KiB are not "
                "supported; for a long counted repetition such as [a-z]{1,500}, use + and "
                "maxLength)"
            )
        where = pointer(exc.instance_path)
        return invalid_request(
            "response_format.json_schema.schema is not a valid JSON Schema (Draft 2020-12): "
            f"{reason}" + (f" (at {where})" if where else ""),
            "response_format",
        )
    except ValueError as exc:
        return invalid_request(
            f"response_format.json_schema.schema cannot be used: {exc}", "response_format"
        )
    return CompiledSchema("json_schema", validator, _instruction(spec, schema), cost)


def format_instruction(response_format: dict[str, Any]) -> str:
    """The system instruction that asks for a json_object / json_schema `response_format` in
    words: for an adapter whose provider cannot take that format in this request (Cohere's
    beside tools)."""
    if response_format.get("type") != "json_schema":
        return _OBJECT_INSTRUCTION
    spec = response_format.get("json_schema")
    spec = spec if isinstance(spec, dict) else {}
    return _instruction(spec, spec.get("schema", {}))


def _instruction(spec: dict[str, Any], schema: Any) -> str:
    name = spec.get("name", "response")
    description = spec.get("description")
    about = f" ({description})" if isinstance(description, str) and description else ""
    return (
        f'Answer with a single JSON value named "{name}"{about} that conforms to the JSON '
        "Schema below. Output only the JSON: no prose before or after it, no Markdown code "
        "fences.\nJSON Schema:\n" + orjson.dumps(schema).decode()
    )
