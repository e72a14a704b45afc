"""Where a stored response's operations go: the provider with the native Responses API that
made it (SPEC 2.6's Responses API, beyond create).

OpenAI keeps a response it made (`store` defaults to true; a `background: true` one runs on
after its create is answered), and the client asks for it again by id: `GET /v1/responses/{id}`
(a background response is polled there), `DELETE`, `POST …/cancel`, `GET …/input_items`. Only
the provider that made it has it, so the sidecar remembers which provider answered each native
response it passed on (`ResponseOwners`: the latest MAX_OWNERS ids of this process, kept across
reloads) and sends an id it does not know to the first provider of a native kind in the config.
The request goes as a pass-through does (sidecar/api/passthrough.py): the provider's key, its
egress, the answer streamed back as it comes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.http1 import Egress
from sidecar.providers.azure import AzureAdapter
from sidecar.providers.base import ProviderClient
from sidecar.providers.passthrough import passthrough_upstream
from sidecar.settings.model import ProviderSettings

PREFIX = "/v1/responses"  # also the metrics' model label of these calls
MAX_OWNERS = 10_000  # ids remembered per process (about 2 MiB when full)
# the JSON defaults of an adapter's headers: the client's Accept (an SSE retrieval) wins
_JSON_DEFAULTS = frozenset({"content-type", "accept"})


class ResponseOwners:
    """Which provider answered each native response this process passed on, latest first."""

    def __init__(self, limit: int = MAX_OWNERS) -> None:
        self.limit = limit
        self._owners: OrderedDict[str, str] = OrderedDict()

    def remember(self, response_id: object, provider: str) -> None:
        if not isinstance(response_id, str) or not response_id or len(response_id) > 256:
            return
        self._owners[response_id] = provider
        self._owners.move_to_end(response_id)
        while len(self._owners) > self.limit:
            self._owners.popitem(last=False)

    def owner(self, response_id: str) -> str | None:
        return self._owners.get(response_id)


@dataclass(frozen=True, slots=True)
class StoredRoute:
    """One stored-response call's upstream: `{base}{rest of the path}`, the provider's query
    (azure's api-version) before the client's, its credentials, its egress."""

    prefix: str
    provider: ProviderSettings
    base: str
    query: str
    headers: Mapping[str, str]
    egress: Egress

    def url(self, raw_path: str, raw_query: str) -> str:
        url = self.base + raw_path[len(PREFIX) :]
        query = "&".join(part for part in (self.query, raw_query) if part)
        return f"{url}?{query}" if query else url


def stored_route(
    response_id: str, owners: ResponseOwners, providers: Mapping[str, ProviderClient]
) -> StoredRoute | None:
    """The route of a stored response's call, or None when no provider has the native
    Responses API."""
    native = [name for name, client in providers.items() if client.caps.responses]
    if not native:
        return None
    known = owners.owner(response_id)
    name = known if known in native else native[0]
    return _route(providers[name])


def _route(client: ProviderClient) -> StoredRoute | None:
    settings = client.settings
    egress = getattr(client, "egress", None)
    if not isinstance(egress, Egress):
        return None
    adapter = getattr(client, "adapter", None)
    if isinstance(adapter, AzureAdapter):
        base, _, query = adapter.responses_url.partition("?")
        headers = _credentials(adapter.auth_headers(), settings)
        return StoredRoute(PREFIX, settings, base, query, headers, egress)
    upstream = passthrough_upstream(settings)  # the openai kind: OpenAI's own paths
    if upstream is None:
        return None
    return StoredRoute(
        PREFIX, settings, upstream.base_url + "/responses", "", upstream.headers, egress
    )


def _credentials(headers: Mapping[str, str], settings: ProviderSettings) -> dict[str, str]:
    own = {name.lower() for name in settings.headers}
    return {
        name: value
        for name, value in headers.items()
        if name.lower() not in _JSON_DEFAULTS or name.lower() in own
    }
