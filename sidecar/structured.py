"""Structured output (SPEC 2.3): `response_format` compiled once, answers parsed and validated.

A `SchemaPlan` is what one distinct `response_format` compiles to: the Draft 2020-12 validator
(with format checking), and the system instruction for providers without native JSON-schema
support. Plans live in a bounded `SchemaCache` keyed by a canonical hash, shared across config
reloads, so a hot schema is never compiled twice. `enforce` is the re-prompt loop the cascade
runs around each candidate's call; a candidate that never satisfies the schema fails with
`Outcome.SCHEMA_FAILURE`, which the cascade escalates from.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import cache
from itertools import islice
from typing import TYPE_CHECKING, Any

import orjson

from sidecar.errors import GatewayError, Outcome, UpstreamError, invalid_request
from sidecar.providers.base import Completion
from sidecar.safe_regex import SAFE_KEYWORDS, unbounded_keyword
from sidecar.schema_compiler import Predicate, compile_predicate

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import ValidationError

    from sidecar.flow import Flow
    from sidecar.routing import Candidate

# jsonschema (≈0.1 s to import) is imported on the first response_format, not at startup;
# the server warms it up in a background thread once it is ready (see warm_up).

MAX_REPROMPTS = 2
MAX_LISTED_ERRORS = 5
MAX_MESSAGE_CHARS = 200
DEFAULT_CACHE_SIZE = 512

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\r?\n?(.*?)\r?\n?[ \t]*```", re.S)
_NOT_SCHEMA_KEYS = frozenset({"const", "enum", "default", "examples"})
_JSON_OBJECT = {"type": "json_object"}
_OBJECT_INSTRUCTION = (
    "Answer with a single JSON object and nothing else: no prose before or after it, "
    "no Markdown code fences."
)

Call = Callable[["Flow", "Candidate", dict[str, Any]], Awaitable[Completion]]


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
class SchemaPlan:
    """One compiled `response_format`: how to ask a provider for it, and how to check answers."""

    kind: str  # "json_schema" | "json_object"
    validator: Draft202012Validator | None  # None for json_object: any JSON object passes
    instruction: str  # the system message for providers without native support
    fast: Predicate | None = None  # True only for valid values; None: always ask `validator`

    def request_body(self, body: dict[str, Any], native: bool, json_mode: bool) -> dict[str, Any]:
        """The body to send a provider: untouched for native support, else with the instruction
        as a system message and the provider's JSON mode (json_object) where it has one."""
        if native or (self.kind == "json_object" and json_mode):
            return body
        prepared = dict(body)
        messages = list(body["messages"])
        at = 0
        while at < len(messages) and messages[at].get("role") in ("system", "developer"):
            at += 1
        messages.insert(at, {"role": "system", "content": self.instruction})
        prepared["messages"] = messages
        if json_mode:
            prepared["response_format"] = dict(_JSON_OBJECT)
        else:
            prepared.pop("response_format", None)
        return prepared

    def check(self, content: str | None) -> Verdict:
        """Parse `content` (code fences stripped) and validate it."""
        if content is None:
            return Verdict(None, (Problem("", "the answer has no content"),))
        text = content
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            fenced = _FENCE.search(content)
            if fenced is None:
                return Verdict(None, (Problem("", f"the answer is not valid JSON: {exc}"),))
            text = fenced.group(1).strip()
            try:
                value = orjson.loads(text)
            except orjson.JSONDecodeError as inner:
                problem = Problem("", f"the fenced block is not valid JSON: {inner}")
                return Verdict(None, (problem,))
        if self.validator is None:
            if not isinstance(value, dict):
                kind = type(value).__name__
                return Verdict(text, (Problem("", f"expected a JSON object, got a {kind}"),))
            return Verdict(text, ())
        try:
            if self.fast is not None and self.fast(value):
                return Verdict(text, ())
            errors = self.validator.iter_errors(value)
            first = next(errors, None)
            if first is None:
                return Verdict(text, ())
            found = sorted([first, *islice(errors, 50)], key=_error_order)
        except RecursionError:
            return Verdict(text, (Problem("", "the answer is nested too deeply to validate"),))
        return Verdict(text, tuple(_problem(e) for e in found[:MAX_LISTED_ERRORS]))


def _error_order(error: ValidationError) -> tuple[int, list[str]]:
    return len(error.absolute_path), [str(p) for p in error.absolute_path]


def _problem(error: ValidationError) -> Problem:
    message = error.message
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    return Problem(pointer(error.absolute_path), message)


def pointer(path: Any) -> str:
    """A JSON pointer (RFC 6901) for a path of keys and indexes."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


class SchemaCache:
    """Compiled plans (and refusals of bad schemas) by canonical hash; least recently used out.

    Long-lived: one per gateway process, shared by every Runtime across config reloads.
    """

    def __init__(self, size: int = DEFAULT_CACHE_SIZE) -> None:
        self.size = size
        self._plans: OrderedDict[bytes, SchemaPlan | GatewayError] = OrderedDict()

    def __len__(self) -> int:
        return len(self._plans)

    def plan(self, response_format: Any) -> SchemaPlan | None:
        """The plan for a request's `response_format` (already shape-checked), None for text.

        Raises 400 `invalid_request` (param `response_format`) when the schema is not itself
        valid JSON Schema.
        """
        if not isinstance(response_format, dict):
            return None
        kind = response_format.get("type")
        if kind not in ("json_schema", "json_object"):
            return None
        key = hashlib.blake2b(
            orjson.dumps(response_format, option=orjson.OPT_SORT_KEYS), digest_size=16
        ).digest()
        found = self._plans.get(key)
        if found is None:
            found = _compile(response_format)
            self._plans[key] = found
            if len(self._plans) > self.size:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        if isinstance(found, GatewayError):
            raise found
        return found


def warm_up() -> None:
    """Import what compiling a schema needs (run off the event loop, after startup)."""
    import jsonschema  # noqa: F401
    import jsonschema_specifications  # noqa: F401
    import regex  # noqa: F401

    _validator_class()


def _compile(response_format: dict[str, Any]) -> SchemaPlan | GatewayError:
    if response_format["type"] == "json_object":
        return SchemaPlan("json_object", None, _OBJECT_INSTRUCTION)
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    # the metaschemas only: a $ref is never fetched over the network
    from jsonschema_specifications import REGISTRY as no_remote_refs

    spec = response_format["json_schema"]
    schema = spec.get("schema", {})
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = pointer(exc.path)
        return invalid_request(
            "response_format.json_schema.schema is not a valid JSON Schema (Draft 2020-12): "
            f"{exc.message}" + (f" (at {where})" if where else ""),
            "response_format",
        )
    unresolved = _unresolvable_ref(schema, no_remote_refs)
    if unresolved is not None:
        return invalid_request(
            f"response_format.json_schema.schema has a $ref that cannot be resolved: "
            f"{unresolved!r} (only references inside the schema are followed)",
            "response_format",
        )
    unbounded = unbounded_keyword(schema)
    if unbounded is not None:
        return invalid_request(
            f"response_format.json_schema.schema uses {unbounded}, which the gateway does not "
            "support (it cannot bound the time that matching takes)",
            "response_format",
        )
    formats = Draft202012Validator.FORMAT_CHECKER
    validator = _validator_class()(schema, registry=no_remote_refs, format_checker=formats)
    fast = compile_predicate(schema, formats)
    return SchemaPlan("json_schema", validator, _instruction(spec, schema), fast)


@cache
def _validator_class() -> Any:
    """Draft 2020-12 with the keywords that match client patterns bounded in time."""
    from jsonschema import Draft202012Validator, validators

    return validators.extend(Draft202012Validator, SAFE_KEYWORDS)


def _unresolvable_ref(schema: Any, registry: Any) -> str | None:
    """The first `$ref` that does not point inside the schema itself, if any."""
    from referencing.exceptions import Unresolvable
    from referencing.jsonschema import DRAFT202012

    if not isinstance(schema, dict):
        return None
    root = registry.resolver_with_root(DRAFT202012.create_resource(schema))
    for resolver, ref in _refs(schema, root, is_root=True):
        try:
            resolver.lookup(ref)
        except Unresolvable:
            return ref
    return None


def _refs(node: Any, resolver: Any, is_root: bool = False) -> Iterator[tuple[Any, str]]:
    if isinstance(node, list):
        for item in node:
            yield from _refs(item, resolver)
        return
    if not isinstance(node, dict):
        return
    if not is_root and isinstance(node.get("$id"), str):
        from referencing.jsonschema import DRAFT202012

        resolver = resolver.in_subresource(DRAFT202012.create_resource(node))
    for key, value in node.items():
        if key in ("$ref", "$dynamicRef") and isinstance(value, str):
            yield resolver, value
        elif key not in _NOT_SCHEMA_KEYS:
            yield from _refs(value, resolver)


def _instruction(spec: dict[str, Any], schema: Any) -> str:
    name = spec.get("name", "response")
    description = spec.get("description")
    about = f" ({description})" if isinstance(description, str) and description else ""
    return (
        f'Answer with a single JSON value named "{name}"{about} that conforms to the JSON '
        "Schema below. Output only the JSON: no prose before or after it, no Markdown code "
        "fences.\nJSON Schema:\n" + orjson.dumps(schema).decode()
    )


def reprompt_message(problems: tuple[Problem, ...]) -> str:
    lines = "\n".join(f"- {problem}" for problem in problems)
    return (
        "Your previous answer does not match the required JSON Schema:\n"
        f"{lines}\nAnswer again with only the corrected JSON."
    )


def without_stream(body: dict[str, Any]) -> dict[str, Any]:
    """The body for a buffered call: the re-prompt loop reads whole answers."""
    if "stream" not in body and "stream_options" not in body:
        return body
    return {k: v for k, v in body.items() if k not in ("stream", "stream_options")}


def _checked_choices(completion: Completion) -> list[dict[str, Any]]:
    """The choices whose content is the answer: not tool-call endings, not refusals."""
    checked: list[dict[str, Any]] = []
    for choice in completion.body.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            checked.append({"message": {}})
            continue
        if message.get("tool_calls") or choice.get("finish_reason") == "tool_calls":
            continue
        if message.get("content") is None and isinstance(message.get("refusal"), str):
            continue
        checked.append(choice)
    return checked


async def enforce(
    call: Call, flow: Flow, candidate: Candidate, plan: SchemaPlan, native: bool, json_mode: bool
) -> Completion:
    """Call `candidate` until its answer validates, re-prompting at most MAX_REPROMPTS times.

    Every call is an ordinary Attempt (so usage, cost and budgets count re-prompts); the
    returned body's content is the bare JSON (fences stripped) and, when the request made more
    than one call, its `usage` is the sum of all of them.
    """
    flow.schema_enforced = True
    body = without_stream(plan.request_body(flow.body, native, json_mode))
    label = candidate.label
    problems: tuple[Problem, ...] = ()
    for round_ in range(MAX_REPROMPTS + 1):
        if round_:
            flow.reprompts += 1
            flow.schema_reprompts.append(label)
        completion = await call(flow, candidate, body)
        choices = _checked_choices(completion)
        if not choices:
            return completion  # ends in tool calls (or a refusal): not validated as content
        verdicts = [plan.check(_content(choice)) for choice in choices]
        failed = next((i for i, v in enumerate(verdicts) if not v.ok), None)
        if failed is None:
            flow.schema_checks.append((label, "valid"))
            return _finished(flow, completion, choices, verdicts)
        flow.schema_checks.append((label, "invalid"))
        problems = verdicts[failed].problems
        answer = _content(choices[failed]) or ""
        body = {
            **body,
            "messages": [
                *body["messages"],
                {"role": "assistant", "content": answer},
                {"role": "user", "content": reprompt_message(problems)},
            ],
        }
    summary = "; ".join(str(p) for p in problems)
    raise UpstreamError(
        Outcome.SCHEMA_FAILURE,
        f"the answer did not match response_format after {MAX_REPROMPTS} re-prompts: {summary}",
        reason="schema",
    )


def _content(choice: dict[str, Any]) -> str | None:
    content = choice.get("message", {}).get("content")
    return content if isinstance(content, str) else None


def _finished(
    flow: Flow, completion: Completion, choices: list[dict[str, Any]], verdicts: list[Verdict]
) -> Completion:
    """The completion to return: bare JSON content, usage summed over the request's calls."""
    changed = False
    for choice, verdict in zip(choices, verdicts, strict=True):
        if verdict.text is not None and verdict.text != _content(choice):
            choice["message"]["content"] = verdict.text
            changed = True
    if completion.usage is not None and flow.usage != completion.usage:
        completion.body["usage"] = flow.usage.as_openai()
        changed = True
    if not changed:
        return completion
    return Completion(completion.body, completion.usage, raw=None)


def streamed_failure(
    flow: Flow, candidate: Candidate, plan: SchemaPlan, content: str, tool_calls: bool
) -> GatewayError | None:
    """Validate a natively streamed answer at its end; the 422 to send as an SSE event, if any."""
    flow.schema_enforced = True
    if tool_calls:
        return None
    verdict = plan.check(content)
    flow.schema_checks.append((candidate.label, "valid" if verdict.ok else "invalid"))
    if verdict.ok:
        return None
    summary = "; ".join(str(p) for p in verdict.problems)
    return schema_failed(f"the streamed answer does not match response_format: {summary}")


def mentions_tool_calls(chunks: list[bytes]) -> bool:
    """Whether streamed chunks carry tool calls (a key, never escaped text inside content)."""
    return any(b'"tool_calls":' in c or b'"finish_reason":"tool_calls"' in c for c in chunks)


def schema_failed(message: str) -> GatewayError:
    return GatewayError(422, "response_schema_validation_failed", message, param="response_format")


def completion_chunks(completion: Completion, include_usage: bool) -> list[bytes]:
    """A buffered answer as OpenAI `chat.completion.chunk` payloads (without `[DONE]`)."""
    body = completion.body
    base: dict[str, Any] = {
        "id": body.get("id", "chatcmpl-ringside"),
        "object": "chat.completion.chunk",
        "created": body.get("created", 0),
        "model": body.get("model"),
    }
    if "system_fingerprint" in body:
        base["system_fingerprint"] = body["system_fingerprint"]
    if include_usage:
        base["usage"] = None
    chunks: list[bytes] = []

    def add(index: int, delta: dict[str, Any], finish: str | None) -> None:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        chunks.append(orjson.dumps({**base, "choices": [choice]}))

    for position, choice in enumerate(body.get("choices") or ()):
        index = choice.get("index", position)
        message = choice.get("message") or {}
        add(index, {"role": "assistant", "content": ""}, None)
        content = message.get("content")
        if isinstance(content, str) and content:
            add(index, {"content": content}, None)
        tool_calls = message.get("tool_calls")
        if isinstance(tool_calls, list) and tool_calls:
            calls = [{"index": i, **call} for i, call in enumerate(tool_calls)]
            add(index, {"tool_calls": calls}, None)
        add(index, {}, choice.get("finish_reason") or "stop")
    if include_usage:
        usage = body.get("usage")
        if usage is None and completion.usage is not None:
            usage = completion.usage.as_openai()
        chunks.append(orjson.dumps({**base, "choices": [], "usage": usage}))
    return chunks
