"""Provider kinds → clients. The only place that knows which kinds exist."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sidecar.providers.openai_compat import COMPAT_KINDS, OpenAICompatAdapter
from sidecar.settings.model import ProviderSettings

if TYPE_CHECKING:
    from sidecar.http1 import Http1Client
    from sidecar.providers.base import ProviderClient

SUPPORTED_KINDS = frozenset({*COMPAT_KINDS, "mock"})


def build_client(settings: ProviderSettings, http1: Http1Client) -> ProviderClient:
    """A client for one configured provider; kinds are checked at config load."""
    if settings.kind == "mock":
        from sidecar.providers.mock import MockProvider

        return MockProvider(settings)
    from sidecar.upstream import HttpProvider

    adapter = OpenAICompatAdapter(settings, COMPAT_KINDS[settings.kind])
    return HttpProvider(settings, adapter, http1)
