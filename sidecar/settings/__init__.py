"""Configuration: YAML → validated, frozen Settings; hot reload in `sidecar.settings.watch`."""

from sidecar.settings.loader import load_settings, parse_settings
from sidecar.settings.model import Settings
from sidecar.settings.reading import ConfigError

__all__ = ["ConfigError", "Settings", "load_settings", "parse_settings"]
