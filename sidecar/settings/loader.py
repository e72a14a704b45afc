"""A config file → `Settings`: read (`sidecar.settings.reading`), then build
(`sidecar.settings.building`); ConfigError on any problem, never a half-valid Settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from sidecar.settings.building import build
from sidecar.settings.model import Settings
from sidecar.settings.reading import ConfigError, read_config

if TYPE_CHECKING:
    from sidecar.prices import PriceData


def load_settings(
    path: str, env: Mapping[str, str] | None = None, price_data: PriceData | None = None
) -> Settings:
    """Read, expand, validate and build. Raises ConfigError; never returns a half-valid Settings.
    `price_data`: the prices a catalog entry leaves out (None: the installed package's)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return parse_settings(text, path, os.environ if env is None else env, price_data)


def parse_settings(
    text: str, source: str, env: Mapping[str, str], price_data: PriceData | None = None
) -> Settings:
    """The Settings that config text builds; `source` names it in problems."""
    data, where = read_config(text, source, env)
    return build(data, where, env, price_data)
