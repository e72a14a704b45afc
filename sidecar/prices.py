"""Model prices from a maintained catalog: Pydantic's genai-prices data, resolved at load.

A config may leave a catalog entry's prices (and context window) out: they are filled here
from the price data of the entry's provider kind (`PRICE_PROVIDERS` in sidecar/providers),
and refs outside the catalog are priced the same way when the data knows their model.
Everything is resolved into `Price` rates once per load (sidecar/settings/building.py) or
once per new ref (the router caches its candidates): a request prices its usage with plain
arithmetic on those rates (sidecar/pricing.py), never with a lookup in the data.

The data is the snapshot pinned with the installed package; `prices.auto_update` replaces it
with a fetched one off the request path (sidecar/prices_update.py), and the config is then
built again with it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sidecar.settings.model import Price, Rates

if TYPE_CHECKING:
    from genai_prices.types import ModelInfo, ModelPrice, Provider

log = logging.getLogger("ringside")

# genai-prices price keys → the Rates field each one fills
_RATE_FIELDS = (
    ("input_mtok", "input_per_mtok"),
    ("output_mtok", "output_per_mtok"),
    ("cache_read_mtok", "cache_read_per_mtok"),
    ("cache_write_mtok", "cache_write_per_mtok"),
    ("cache_write_1h_mtok", "cache_write_1h_per_mtok"),
    ("output_reasoning_mtok", "reasoning_per_mtok"),
)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genai-prices")
    except PackageNotFoundError:
        return "?"


@dataclass(frozen=True, slots=True)
class Found:
    """What the data says of one model: its price, context window, and where it came from."""

    price: Price
    context: int | None
    source: str  # e.g. "genai-prices 0.2.3: openai/gpt-4o-mini"


@dataclass(frozen=True, slots=True)
class PriceData:
    """One snapshot of the price data: genai-prices providers, and what to call it."""

    providers: Sequence[Provider]
    label: str  # "genai-prices 0.2.3", or "… (updated 2026-12-01T03:00:00Z)"

    @classmethod
    def bundled(cls) -> PriceData:
        """The snapshot pinned with the installed package (no network)."""
        from genai_prices.data import providers

        return cls(tuple(providers), f"genai-prices {package_version()}")

    @classmethod
    def from_json(cls, raw: Any, fetched_at: dt.datetime) -> PriceData:
        """A snapshot fetched by `prices.auto_update` (genai-prices' data.json); ValueError
        when it is not one."""
        from genai_prices.types import _providers_from_raw

        if not isinstance(raw, list):
            raise ValueError("expected a list of providers")
        providers = _providers_from_raw(raw)
        when = fetched_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(tuple(providers), f"genai-prices {package_version()} (updated {when})")

    def provider(self, provider_id: str) -> Provider | None:
        for provider in self.providers:
            if provider.id == provider_id:
                return provider
        return None


@dataclass(slots=True)
class PriceBook:
    """The price data as one load sees it: (provider kind, model id) → Found, for the kinds
    that have price data. Built once per load; `lookup` is for the load and for refs the
    router meets for the first time, never for a request it has priced before."""

    data: PriceData | None
    kinds: Mapping[str, tuple[str, ...]]  # provider kind → genai-prices provider ids, in order
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    @property
    def label(self) -> str:
        return self.data.label if self.data is not None else "no price data"

    def lookup(self, kind: str, model_id: str) -> Found | None:
        if self.data is None:
            return None
        all_providers = list(self.data.providers)
        for provider_id in self.kinds.get(kind, ()):
            provider = self.data.provider(provider_id)
            if provider is None:
                continue
            model = provider.find_model(model_id, all_providers=all_providers)
            if model is None:
                continue
            price = resolve_price(model, self.now)
            if price is None:
                return None  # the data knows it, but not by the token (e.g. per request)
            source = f"{self.data.label}: {provider.id}/{model.id}"
            return Found(price, model.context_window, source)
        return None


def price_book(kinds_in_use: Iterable[str], data: PriceData | None) -> PriceBook:
    """The PriceBook of one load. The data is read only when a configured provider's kind
    has price data (a config of `mock`, `ollama` or `vllm` providers never loads it)."""
    from sidecar.providers import PRICE_PROVIDERS

    wanted = any(PRICE_PROVIDERS.get(kind) for kind in kinds_in_use)
    if not wanted:
        return PriceBook(None, PRICE_PROVIDERS)
    return PriceBook(data if data is not None else PriceData.bundled(), PRICE_PROVIDERS)


def resolve_price(model: ModelInfo, now: dt.datetime) -> Price | None:
    """A model's genai-prices prices as `Price` rates: the prices in force at `now` (a price
    with a start date applies from that date), each tiered price's tiers as Price.tiers. A
    price that changes with the time of day (off-peak discounts) is taken at its highest, so
    a budget never charges less than the provider may bill. None when the model has no
    per-token input and output prices."""
    from genai_prices.types import TimeOfDateConstraint

    prices: list[ModelPrice] = [model.get_prices(now)]
    if isinstance(model.prices, list):
        prices += [
            conditional.prices
            for conditional in model.prices
            if isinstance(conditional.constraint, TimeOfDateConstraint)
        ]
    compiled = [compile_price(price) for price in prices]
    found = [price for price in compiled if price is not None]
    if len(found) != len(compiled) or not found:
        return None
    return found[0] if len(found) == 1 else _highest(found)


def compile_price(model_price: ModelPrice) -> Price | None:
    """genai-prices' ModelPrice → Price (tiered prices: one Rates per tier threshold, each
    holding every field's price at that threshold, as genai-prices picks them: by the call's
    whole input tokens)."""
    from genai_prices.types import TieredPrices

    values = {key: getattr(model_price, key, None) for key, _ in _RATE_FIELDS}
    if values["input_mtok"] is None or values["output_mtok"] is None:
        return None
    starts = sorted(
        {tier.start for value in values.values() if isinstance(value, TieredPrices)
         for tier in value.tiers}
    )  # fmt: skip

    def at(tokens: int | None) -> dict[str, float | None]:
        """Each field's rate for a call of more than `tokens` input tokens (None: base)."""
        rates: dict[str, float | None] = {}
        for key, name in _RATE_FIELDS:
            value = values[key]
            if isinstance(value, TieredPrices):
                chosen = value.base
                for tier in value.tiers:
                    if tokens is not None and tier.start <= tokens:
                        chosen = tier.price
                rates[name] = _usd(chosen)
            else:
                rates[name] = None if value is None else _usd(value)
        return rates

    base = at(None)
    tiers = tuple((start, Rates(**at(start))) for start in starts)  # type: ignore[arg-type]
    return Price(**base, tiers=tiers)  # type: ignore[arg-type]


def _usd(value: Decimal | float) -> float:
    return float(value)


def _highest(prices: list[Price]) -> Price:
    """Field by field, the highest of several prices (their tiers left out unless only the
    first has any)."""
    first = prices[0]
    fields: dict[str, float | None] = {}
    for _, name in _RATE_FIELDS:
        given = [getattr(price, name) for price in prices if getattr(price, name) is not None]
        fields[name] = max(given) if given else None
    return Price(**fields, tiers=first.tiers)  # type: ignore[arg-type]
