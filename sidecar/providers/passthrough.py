"""Which provider kinds a `passthrough:` path may name, and how a request reaches them.

Only the OpenAI-compatible kinds (the rows of COMPAT_KINDS): their APIs have OpenAI's paths
under their base URL, so `/v1/<rest>` from a client goes to `{base_url}/<rest>`, as the
provider's own OpenAI SDK would send it. The other kinds' APIs have other paths and other
bodies: a pass-through to them would be a translation, which is an endpoint's job.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sidecar.providers.azure import AzureAdapter
from sidecar.providers.openai_compat import COMPAT_KINDS, OpenAICompatAdapter
from sidecar.settings.model import ProviderSettings

PASSTHROUGH_KINDS = frozenset({*COMPAT_KINDS, "azure"})
_CHAT_PATH = "/chat/completions"
# the chat adapter's own headers that the client's own replace
_JSON_DEFAULTS = frozenset({"content-type", "accept"})


@dataclass(frozen=True, slots=True)
class PassthroughUpstream:
    """Where one provider's pass-through requests go, and the headers they carry."""

    base_url: str  # without a trailing slash: `/v1/<rest>` goes to `{base_url}/<rest>`
    credentials: Callable[[], Mapping[str, str]]  # the provider's credentials and `headers:`
    query: str = ""  # the provider's own query (azure's api-version), before the client's

    @property
    def headers(self) -> Mapping[str, str]:
        """The headers of a call made now (an azure token file is read when it changes)."""
        return self.credentials()

    def url(self, rest: str, client_query: str) -> str:
        """`{base_url}{rest}` with the provider's query, then the client's."""
        query = "&".join(part for part in (self.query, client_query) if part)
        return f"{self.base_url}{rest}?{query}" if query else self.base_url + rest


def passthrough_upstream(settings: ProviderSettings) -> PassthroughUpstream | None:
    """The upstream of a provider whose kind passes through, else None. Its credentials are
    added exactly as its chat adapter adds them (same header, same scheme), and its configured
    `headers:` too; the adapter's JSON Content-Type and Accept are left to the client's."""
    if settings.kind == "azure":
        azure = AzureAdapter(settings)  # its own token file reader: re-read when it changes
        return PassthroughUpstream(
            azure.api_base,
            lambda: _credentials(azure.auth_headers(), settings),
            azure.api_query,
        )
    row = COMPAT_KINDS.get(settings.kind)
    if row is None:
        return None
    compat = OpenAICompatAdapter(settings, row)
    headers = _credentials(compat.headers, settings)
    return PassthroughUpstream(compat.url.removesuffix(_CHAT_PATH), lambda: headers)


def _credentials(headers: Mapping[str, str], settings: ProviderSettings) -> dict[str, str]:
    own = {name.lower() for name in settings.headers}
    return {
        name: value
        for name, value in headers.items()
        if name.lower() not in _JSON_DEFAULTS or name.lower() in own
    }
