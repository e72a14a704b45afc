"""Provider kinds → clients. The only place that knows which kinds exist.

`ADAPTERS` maps each kind with a network adapter to the function that builds its adapter from
the provider's settings (once, at load); `mock` answers in-process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from sidecar.providers import azure, bedrock, bedrock_auth, gemini, vertex, vertex_auth
from sidecar.providers.anthropic import AnthropicAdapter
from sidecar.providers.cohere import CohereAdapter
from sidecar.providers.openai_compat import COMPAT_KINDS, OpenAICompatAdapter
from sidecar.settings.model import ProviderSettings

if TYPE_CHECKING:
    from sidecar.http1 import Http1Client
    from sidecar.providers.base import Adapter, ProviderClient
    from sidecar.upstream import Authorize


def _compat(settings: ProviderSettings) -> Adapter:
    return OpenAICompatAdapter(settings, COMPAT_KINDS[settings.kind])


ADAPTERS: Mapping[str, Callable[[ProviderSettings], Adapter]] = MappingProxyType(
    {
        **dict.fromkeys(COMPAT_KINDS, _compat),
        "anthropic": AnthropicAdapter,
        "azure": azure.AzureAdapter,
        "bedrock": bedrock.BedrockAdapter,
        "cohere": CohereAdapter,
        "gemini": gemini.GeminiAdapter,
        "vertex": vertex.VertexAdapter,
    }
)

SUPPORTED_KINDS = frozenset({*ADAPTERS, "mock"})

# per kind, what its settings need beyond the JSON Schema: (key, message) problems at load
SETTINGS_CHECKS: Mapping[str, Callable[[ProviderSettings], list[tuple[str, str]]]] = (
    MappingProxyType(
        {
            "azure": azure.settings_problems,
            "bedrock": bedrock.settings_problems,
            "gemini": gemini.settings_problems,
            "vertex": vertex.settings_problems,
        }
    )
)
# per kind whose credentials sign (or authorize) each call, what builds that hook for a provider
# (None: it has a static credential in its headers); credentials resolved off the request path
AUTHORIZERS: Mapping[str, Callable[[ProviderSettings], Authorize | None]] = MappingProxyType(
    {"bedrock": bedrock_auth.signer, "vertex": vertex_auth.authorizer}
)
TOKEN_KINDS = frozenset({"azure"})  # the kinds that send token_file / token_env as a bearer
# per kind, the genai-prices providers whose price data bill its models, tried in order
# (sidecar/prices.py); a kind with none (self-hosted: ollama, vllm; deepinfra, which the data
# does not cover; mock) is priced by the config alone
PRICE_PROVIDERS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "openai": ("openai",),
        "azure": ("azure", "openai"),  # Azure's own prices, then OpenAI's for its models
        "anthropic": ("anthropic",),
        "gemini": ("google",),
        "vertex": ("google",),  # Gemini, and Claude through Google's fallback to Anthropic
        "bedrock": ("aws",),
        "cohere": ("cohere",),
        "mistral": ("mistral",),
        "groq": ("groq",),
        "together": ("together",),
        "fireworks": ("fireworks",),
        "deepseek": ("deepseek",),
        "xai": ("x-ai",),
        "perplexity": ("perplexity",),
        "openrouter": ("openrouter",),
        "cerebras": ("cerebras",),
        "deepinfra": (),
        "ollama": (),
        "vllm": (),
        "mock": (),
    }
)


def provider_problems(settings: ProviderSettings) -> list[tuple[str, str]]:
    """What is wrong with one provider's settings for its kind, as (key under the provider,
    message); the key is "" for the provider as a whole. Checked at load."""
    problems = [
        (key, f"is read only by the kinds {', '.join(sorted(TOKEN_KINDS))}")
        for key in ("token_file", "token_env")
        if getattr(settings, key) and settings.kind not in TOKEN_KINDS
    ]
    check = SETTINGS_CHECKS.get(settings.kind)
    return problems + check(settings) if check is not None else problems


def catalog_caps(settings: ProviderSettings) -> frozenset[str]:
    """The `caps` of a catalog entry of this provider that lists none: its kind's capability
    flags (json_schema as the provider's `native_json_schema` says, when it says; never
    `embeddings`, a model's own), and `stream`, which every kind does. An explicit `caps:` list
    in the catalog wins over these."""
    if settings.kind == "mock":
        from sidecar.providers.mock import MockProvider

        caps, native = MockProvider.caps, MockProvider.native_json_schema
    else:
        try:
            adapter = ADAPTERS[settings.kind](settings)
        except Exception:  # settings its kind refuses: reported at load by provider_problems
            return frozenset({"stream"})
        caps, native = adapter.caps, adapter.native_json_schema
    names = set(caps.names())
    names.discard("json_schema")
    # a kind that embeds serves chat models too: only the catalog can say which model embeds
    names.discard("embeddings")
    if native:
        names.add("json_schema")
    return frozenset({*names, "stream"})


def build_client(settings: ProviderSettings, http1: Http1Client) -> ProviderClient:
    """A client for one configured provider; kinds are checked at config load."""
    if settings.kind == "mock":
        from sidecar.providers.mock import MockProvider

        return MockProvider(settings)
    from sidecar.upstream import HttpProvider

    authorizer = AUTHORIZERS.get(settings.kind)
    authorize = authorizer(settings) if authorizer is not None else None
    return HttpProvider(settings, ADAPTERS[settings.kind](settings), http1, authorize)
