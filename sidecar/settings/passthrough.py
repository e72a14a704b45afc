"""`passthrough:` (SPEC 2.6): path prefixes the sidecar forwards to a provider as they are.

What the JSON Schema cannot say is checked here: a prefix may not overlap a path the sidecar
serves itself (it would shadow it, or be shadowed), two prefixes may not be the same path once
a trailing `/` is dropped, a prefix has no `.` or `..` segment, and it names a provider of the
config whose kind passes through (the OpenAI-compatible ones and azure:
`sidecar/providers/passthrough.py`).
Nested prefixes are allowed: the longest one that matches a request wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.settings.model import ProviderSettings
from sidecar.settings.reading import Located

# the api listener's own paths (SPEC 1): a prefix equal to, inside or above one is refused
SERVED_PATHS = (
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/models",
    "/v1/client_tokens",
)


def under(path: str, prefix: str) -> bool:
    """Whether `path` is `prefix` or below it, segment by segment (`/v1/audio` holds
    `/v1/audio/speech`, not `/v1/audiobooks`)."""
    return path == prefix or path.startswith(prefix + "/")


def build_passthrough(
    data: Mapping[str, Any],
    providers: Mapping[str, ProviderSettings],
    where: Located,
    problems: list[str],
) -> dict[str, str]:
    """The `passthrough:` section as prefix → provider name, the longest prefix first; each
    prefix without a trailing `/`. Problems are appended to `problems`."""
    from sidecar.providers.passthrough import PASSTHROUGH_KINDS

    table: dict[str, str] = {}
    for given, provider in data.get("passthrough", {}).items():
        at = ("passthrough", given)
        prefix = given.rstrip("/")
        segments = prefix.split("/")[1:]
        if any(segment in ("", ".", "..") for segment in segments):
            problems.append(where.problem(at, "a path prefix has no empty, . or .. segment"))
            continue
        served = [path for path in SERVED_PATHS if under(path, prefix) or under(prefix, path)]
        if served:
            problems.append(
                where.problem(
                    at,
                    f"overlaps {', '.join(served)}, which the sidecar serves itself: name a "
                    "path of its own (e.g. /v1/moderations, /v1/audio, /v1/files)",
                )
            )
            continue
        if prefix in table:
            problems.append(where.problem(at, f"is {prefix} again (a trailing / is dropped)"))
            continue
        settings = providers.get(provider)
        if settings is None:
            problems.append(where.problem(at, f"provider {provider!r} is not in providers"))
            continue
        if settings.kind not in PASSTHROUGH_KINDS:
            problems.append(
                where.problem(
                    at,
                    f"provider {provider!r} is of kind {settings.kind}, whose API is not "
                    "OpenAI's: only OpenAI-compatible kinds pass through ("
                    + ", ".join(sorted(PASSTHROUGH_KINDS))
                    + ")",
                )
            )
            continue
        table[prefix] = provider
    return dict(sorted(table.items(), key=lambda item: -len(item[0])))
