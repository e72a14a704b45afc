"""`passthrough:` compiled from one Settings: which provider a path goes to, and how.

Built with the Runtime (so a reload swaps it with everything else); the handler is
`sidecar/api/passthrough.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from sidecar.http1 import Egress
from sidecar.providers.base import ProviderClient
from sidecar.providers.passthrough import passthrough_upstream
from sidecar.settings.model import ProviderSettings
from sidecar.settings.passthrough import under

V1 = "/v1"  # what a client's path starts with; the provider's base URL stands for it


class ForwardRoute(Protocol):
    """What the pass-through handler forwards a request with: a configured prefix's route,
    or a stored response's (sidecar/stored_responses.py)."""

    @property
    def prefix(self) -> str: ...  # the metrics' model label and the log's name for it

    @property
    def provider(self) -> ProviderSettings: ...

    @property
    def headers(self) -> Mapping[str, str]: ...  # the provider's credentials

    @property
    def egress(self) -> Egress: ...

    def url(self, raw_path: str, raw_query: str) -> str: ...


@dataclass(frozen=True, slots=True)
class PassthroughRoute:
    """One configured prefix: where its requests go, with which credentials, through which
    egress (the provider's own: its proxy, TLS and connection cap)."""

    prefix: str
    provider: ProviderSettings
    base_url: str
    headers: Mapping[str, str]
    egress: Egress

    def url(self, raw_path: str, raw_query: str) -> str:
        """`{base_url}/<rest>` for a client's `/v1/<rest>` (as the provider's own OpenAI SDK
        would call it), with the client's query string."""
        url = self.base_url + raw_path[len(V1) :]
        return f"{url}?{raw_query}" if raw_query else url


class PassthroughTable:
    def __init__(
        self, prefixes: Mapping[str, str], providers: Mapping[str, ProviderClient]
    ) -> None:
        routes = []
        for prefix, name in prefixes.items():  # the longest first (settings/passthrough.py)
            client = providers[name]
            upstream = passthrough_upstream(client.settings)
            egress = getattr(client, "egress", None)
            if upstream is None or not isinstance(egress, Egress):  # refused at load
                raise ValueError(f"provider {name!r} cannot pass through")
            routes.append(
                PassthroughRoute(
                    prefix, client.settings, upstream.base_url, upstream.headers, egress
                )
            )
        self.routes = tuple(routes)
        self.prefixes = tuple(sorted(prefixes))

    def match(self, path: str) -> PassthroughRoute | None:
        """The route of the longest prefix `path` is under, or None."""
        for route in self.routes:
            if under(path, route.prefix):
                return route
        return None
