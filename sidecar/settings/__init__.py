"""Configuration: YAML → validated, frozen Settings; hot reload in `sidecar.settings.watch`."""

from sidecar.settings.loader import ConfigError, load_settings, parse_settings
from sidecar.settings.model import Settings

__all__ = ["ConfigError", "Settings", "load_settings", "parse_settings"]
