"""`ringside inject-webhook`: flags (each also read from a RINGSIDE_INJECT_* variable) and run.

Kept free of heavy imports: the parser of every `ringside` command builds these arguments.
"""

from __future__ import annotations

import argparse
import os
import sys

from sidecar.inject.options import (
    DEFAULT_CONFIG_MAP,
    DEFAULT_ENV_SECRET,
    DEFAULT_IMAGE,
    DEFAULT_RESOURCES,
)

ENV_PREFIX = "RINGSIDE_INJECT_"


def _env(flag: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + flag.upper().replace("-", "_"), default)


def host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT`."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def option(flag: str, help: str, default: str | None = None, **kwargs: object) -> None:
        value = _env(flag, default)
        required = value is None
        variable = ENV_PREFIX + flag.upper().replace("-", "_")
        shown = f"default {default}, " if default else ""
        parser.add_argument(
            f"--{flag}",
            default=value,
            required=required,
            help=f"{help} ({shown}env {variable})",
            **kwargs,  # type: ignore[arg-type]
        )

    option("listen", "HOST:PORT of the HTTPS listener", "0.0.0.0:8443", type=host_port)
    option("tls-cert", "PEM certificate chain; re-read when the file changes")
    option("tls-key", "PEM private key of the certificate; re-read with it")
    option("image", "image of the injected sidecar", DEFAULT_IMAGE)
    option("default-config-map", "ConfigMap holding ringside.yaml", DEFAULT_CONFIG_MAP)
    option("default-env-secret", "Secret whose keys become the sidecar's environment, "
           "optional; empty for none", DEFAULT_ENV_SECRET)  # fmt: skip
    for key, default in DEFAULT_RESOURCES.items():
        option(key, f"the sidecar's {key.replace('-', ' ')}; empty for none", default)
    option("drain-seconds", "after SIGTERM, fail /readyz but keep answering this long", "3",
           type=float)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import asyncio
    import ssl

    from sidecar.inject.options import InjectDefaults
    from sidecar.inject.tls import ReloadingTLS
    from sidecar.inject.webhook import serve

    defaults = InjectDefaults(
        image=args.image,
        config_map=args.default_config_map,
        env_secret=args.default_env_secret,
        resources={key: getattr(args, key.replace("-", "_")) for key in DEFAULT_RESOURCES},
    )
    problems = defaults.problems()
    if problems:
        print("ringside inject-webhook: " + "; ".join(problems), file=sys.stderr)
        return 2
    try:
        tls = ReloadingTLS(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        print(f"ringside inject-webhook: cannot load the TLS files: {exc}", file=sys.stderr)
        return 2
    host, port = args.listen
    try:
        asyncio.run(serve(host, port, tls, defaults, args.drain_seconds))
    except OSError as exc:
        print(f"ringside inject-webhook: cannot listen: {exc}", file=sys.stderr)
        return 3
    return 0
