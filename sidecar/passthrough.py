"""`passthrough:` compiled from one Settings: which provider a path goes to, and how.

Built with the Runtime (so a reload swaps it with everything else); the handler is
`sidecar/api/passthrough.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.http1 import Egress
from sidecar.providers.base import ProviderClient
from sidecar.providers.passthrough import PassthroughUpstream, passthrough_upstream
from sidecar.settings.model import ProviderSettings
from sidecar.settings.passthrough import under

V1 = "/v1"  # what a client's path starts with; the provider's base URL stands for it


@dataclass(frozen=True, slots=True)
class PassthroughRoute:
    """Where a forwarded request goes: its prefix (the metrics' label), the provider, its
    upstream (URL and credentials) and its egress (its proxy, TLS and connection cap)."""

    prefix: str
    provider: ProviderSettings
    upstream: PassthroughUpstream
    egress: Egress

    @property
    def headers(self) -> Mapping[str, str]:
        return self.upstream.headers

    def url(self, raw_path: str, raw_query: str) -> str:
        """The provider's URL for a client's `/v1/<rest>` (as the provider's own OpenAI SDK
        would call it), with the provider's query and the client's."""
        return self.upstream.url(raw_path[len(V1) :], raw_query)


class PassthroughTable:
    """The configured prefixes' routes, and the route to any provider that passes through
    (stored responses: sidecar/stored_responses.py), its upstream built once per config."""

    def __init__(
        self, prefixes: Mapping[str, str], providers: Mapping[str, ProviderClient]
    ) -> None:
        self.providers = providers
        self._upstreams: dict[str, PassthroughUpstream | None] = {}
        routes = []
        for prefix, name in prefixes.items():  # the longest first (settings/passthrough.py)
            route = self.route_to(prefix, name)
            if route is None:  # refused at load
                raise ValueError(f"provider {name!r} cannot pass through")
            routes.append(route)
        self.routes = tuple(routes)
        self.prefixes = tuple(sorted(prefixes))

    def route_to(self, prefix: str, name: str) -> PassthroughRoute | None:
        """A route under `prefix` to provider `name`; None for a kind that cannot pass
        through."""
        client = self.providers[name]
        if name not in self._upstreams:
            self._upstreams[name] = passthrough_upstream(client.settings)
        upstream = self._upstreams[name]
        egress = getattr(client, "egress", None)
        if upstream is None or not isinstance(egress, Egress):
            return None
        return PassthroughRoute(prefix, client.settings, upstream, egress)

    def match(self, path: str) -> PassthroughRoute | None:
        """The route of the longest prefix `path` is under, or None."""
        for route in self.routes:
            if under(path, route.prefix):
                return route
        return None
