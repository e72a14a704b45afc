"""Where a stored response's operations go: the provider with the native Responses API that
made it (SPEC 2.6's Responses API, beyond create).

OpenAI keeps a response it made (`store` defaults to true; a `background: true` one runs on
after its create is answered), and the client asks for it again by id: `GET /v1/responses/{id}`
(a background response is polled there), `DELETE`, `POST …/cancel`, `GET …/input_items`. Only
the provider that made it has it, so the sidecar remembers which provider answered each native
response it passed on (`ResponseOwners`: the latest MAX_OWNERS ids of this process, kept across
reloads) and sends an id it does not know to the first provider of a native kind in the config.
The request goes as a pass-through does (sidecar/api/passthrough.py), on the provider's
pass-through upstream (sidecar/providers/passthrough.py: openai's `{base_url}/responses/…`,
azure's `/openai/v1/responses/…` or dated `/openai/responses/…?api-version=…`): the provider's
key, its egress, the answer streamed back as it comes.
"""

from __future__ import annotations

from collections import OrderedDict

from sidecar.passthrough import PassthroughRoute, PassthroughTable

PREFIX = "/v1/responses"  # also the metrics' model label of these calls
MAX_OWNERS = 10_000  # ids remembered per process (about 2 MiB when full)


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


def stored_route(
    response_id: str, owners: ResponseOwners, table: PassthroughTable
) -> PassthroughRoute | None:
    """The route of a stored response's call, or None when no provider has the native
    Responses API."""
    native = [name for name, client in table.providers.items() if client.caps.responses]
    if not native:
        return None
    known = owners.owner(response_id)
    return table.route_to(PREFIX, known if known in native else native[0])
