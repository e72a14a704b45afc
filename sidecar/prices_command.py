"""`ringside prices`: the effective catalog of a config, each price with where it came from;
and the lines `check-config` adds about prices."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from sidecar.settings import ConfigError, Settings, load_settings
from sidecar.settings.building import split_fc_ref
from sidecar.settings.model import Price, Rates

CONFIG = "config"
UNPRICED = "none: unpriced (a customer or key with a budget cannot use it)"


@dataclass(frozen=True, slots=True)
class Priced:
    """One ref as the gateway prices it."""

    ref: str
    price: Price | None
    context: int | None
    source: str


def priced(settings: Settings, ref: str) -> Priced | None:
    """How `ref` is priced: its catalog entry's price, else the price data's, else its
    provider's default_price; None when `ref` is not an fc: ref of a configured provider."""
    entry = settings.models.get(ref)
    if entry is not None:
        return Priced(ref, entry.price, entry.context, entry.price_source or UNPRICED)
    parts = split_fc_ref(ref)
    provider = settings.providers.get(parts[0]) if parts else None
    if parts is None or provider is None:
        return None
    book = settings.price_book
    found = book.lookup(provider.kind, parts[1]) if book is not None else None
    if found is not None:
        return Priced(ref, found.price, found.context, found.source)
    if provider.default_price is not None:
        source = f"providers.{provider.name}.default_price"
        return Priced(ref, provider.default_price, None, source)
    return Priced(ref, None, None, UNPRICED)


def price_summary(settings: Settings) -> str:
    """Where the catalog's prices came from, in a few words (check-config's summary line)."""
    sources = [entry.price_source for entry in settings.models.values()]
    stated = sum(source == CONFIG for source in sources)
    missing = sum(source is None for source in sources)
    filled = len(sources) - stated - missing
    parts = [f"{stated} priced by the config"]
    if filled:
        label = settings.price_book.label if settings.price_book is not None else "price data"
        parts.append(f"{filled} by {label}")
    if missing:
        parts.append(f"{missing} unpriced")
    return "prices: " + ", ".join(parts)


def price_lines(settings: Settings) -> list[str]:
    """A line for each catalog entry whose price the config does not state: where it came
    from, or that it has none."""
    return [
        f"price: {ref}: {entry.price_source or UNPRICED}"
        for ref, entry in settings.models.items()
        if entry.price_source != CONFIG
    ]


def _usd(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _rates(rates: Rates) -> str:
    return (
        f"in {_usd(rates.input_per_mtok)}  out {_usd(rates.output_per_mtok)}  "
        f"cache read {_usd(rates.cache_read_per_mtok)}  "
        f"cache write {_usd(rates.cache_write_per_mtok)}"
        + (f" (1h {_usd(rates.cache_write_1h_per_mtok)})" if rates.cache_write_1h_per_mtok else "")
        + (f"  reasoning {_usd(rates.reasoning_per_mtok)}" if rates.reasoning_per_mtok else "")
    )


def describe(item: Priced) -> list[str]:
    """The lines `ringside prices` prints for one ref (USD per million tokens)."""
    context = f"  context {item.context}" if item.context else ""
    if item.price is None:
        return [f"{item.ref}{context}", f"    {item.source}"]
    lines = [f"{item.ref}{context}", f"    {_rates(item.price)}   ({item.source})"]
    lines += [
        f"    input over {above} tokens: {_rates(rates)}" for above, rates in item.price.tiers
    ]
    return lines


def cmd_prices(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.provider is not None and args.provider not in settings.providers:
        print(f"no provider named {args.provider!r} in {settings.source}", file=sys.stderr)
        return 1
    refs = list(args.refs) or [
        ref
        for ref, entry in settings.models.items()
        if args.provider is None or entry.provider == args.provider
    ]
    failed = False
    print(f"# USD per million tokens ('-': billed at the input rate); price data: "
          f"{settings.price_book.label if settings.price_book else 'none'}")  # fmt: skip
    for ref in refs:
        item = priced(settings, ref)
        if item is None:
            print(f"{ref}: not an fc:<provider>/<model> ref of a configured provider",
                  file=sys.stderr)  # fmt: skip
            failed = True
            continue
        if args.provider is not None and not ref.startswith(f"fc:{args.provider}/"):
            continue
        print("\n".join(describe(item)))
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML routing table")
    parser.add_argument("--provider", help="only this provider's refs")
    parser.add_argument(
        "refs", nargs="*", metavar="REF", help="fc: refs to price (default: the catalog)"
    )
    parser.set_defaults(func=cmd_prices)
