"""Provider kinds → clients. The only place that knows which kinds exist.

`ADAPTERS` maps each kind with a network adapter to the function that builds its adapter from
the provider's settings (once, at load); `mock` answers in-process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from sidecar.providers.openai_compat import COMPAT_KINDS, OpenAICompatAdapter
from sidecar.settings.model import ProviderSettings

if TYPE_CHECKING:
    from sidecar.http1 import Http1Client
    from sidecar.providers.base import Adapter, ProviderClient


def _compat(settings: ProviderSettings) -> Adapter:
    return OpenAICompatAdapter(settings, COMPAT_KINDS[settings.kind])


ADAPTERS: Mapping[str, Callable[[ProviderSettings], Adapter]] = MappingProxyType(
    {
        **dict.fromkeys(COMPAT_KINDS, _compat),
    }
)

SUPPORTED_KINDS = frozenset({*ADAPTERS, "mock"})


def build_client(settings: ProviderSettings, http1: Http1Client) -> ProviderClient:
    """A client for one configured provider; kinds are checked at config load."""
    if settings.kind == "mock":
        from sidecar.providers.mock import MockProvider

        return MockProvider(settings)
    from sidecar.upstream import HttpProvider

    return HttpProvider(settings, ADAPTERS[settings.kind](settings), http1)
