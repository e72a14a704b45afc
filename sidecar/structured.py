"""Structured output (SPEC 2.3): the re-prompt loop.

What a `response_format` compiles to, and how an answer is checked within its request's budget,
is `sidecar.schema_check`. `enforce` is the re-prompt loop the cascade runs around each
candidate's call: an answer that fails is sent back with its errors, at most MAX_REPROMPTS
times; a candidate that never satisfies the schema, or whose answers cost the request its
schema budget, fails with `Outcome.SCHEMA_FAILURE`, which the cascade escalates from.
A streamed request's side (an answer checked at its end, a buffered answer sent as chunks) is
`sidecar.structured_stream`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sidecar.errors import Outcome, UpstreamError
from sidecar.providers.base import Completion
from sidecar.schema_check import (
    CompiledSchema,
    Problem,
    SchemaCache,
    SchemaPlan,
    Verdict,
    warm_up,
)
from sidecar.schema_cost import BUDGET_NS

if TYPE_CHECKING:
    from sidecar.flow import Flow
    from sidecar.routing import Candidate

__all__ = [
    "CompiledSchema",
    "Problem",
    "SchemaCache",
    "SchemaPlan",
    "Verdict",
    "enforce",
    "warm_up",
]

MAX_REPROMPTS = 2

Call = Callable[["Flow", "Candidate", dict[str, Any]], Awaitable[Completion]]


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
        if plan.exhausted:
            raise UpstreamError(
                Outcome.SCHEMA_FAILURE,
                "the schema is too costly: checking answers against it used the "
                f"{BUDGET_NS / 1e6:.0f} ms this request may spend on its schema"
                + (f"; the last answer: {summary(problems)}" if problems else ""),
                reason="schema",
            )
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
    raise UpstreamError(
        Outcome.SCHEMA_FAILURE,
        f"the answer did not match response_format after {MAX_REPROMPTS} re-prompts: "
        + summary(problems),
        reason="schema",
    )


def summary(problems: tuple[Problem, ...]) -> str:
    """The problems of one answer on one line, as error messages quote them."""
    return "; ".join(str(p) for p in problems)


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
