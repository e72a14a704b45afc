"""`ringside` command line: serve, check-config, keys, token mint, usage export, prices,
inject-webhook."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from typing import TYPE_CHECKING

from sidecar.serve import run_worker
from sidecar.settings import ConfigError, Settings, load_settings
from sidecar.settings.building import is_loopback, metrics_exposure_warning
from sidecar.settings.model import HostPort
from sidecar.supervisor import supervise

if TYPE_CHECKING:
    from sidecar.stores.budget import UsageRecord

log = logging.getLogger("ringside")


def _summary(settings: Settings) -> str:
    auth = f"{len(settings.keys)} keys" if settings.keys else "no keys (open mode, loopback only)"
    return (
        f"ok: {settings.source}: {len(settings.providers)} providers, {len(settings.models)} "
        f"models, {len(settings.slots)} slots, {auth}, {settings.storage.backend} storage"
    )


def _warnings(settings: Settings) -> list[str]:
    """What the operator should hear about once: the load's warnings and an open /metrics
    (judged on the listeners in force, after `serve --admin-host` overrides)."""
    exposure = metrics_exposure_warning(settings)
    return [*settings.warnings, *([exposure] if exposure else [])]


def _loaded(path: str) -> Settings | None:
    """The settings of `path`, or None once its problems are printed to stderr."""
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _loaded(args.file)
    if settings is None:
        return 1
    from sidecar.pipeline import load_addon

    failed = False
    for index, spec in enumerate(settings.addons):
        try:
            load_addon(spec)  # serve would refuse an addon that does not import or build
        except Exception as exc:
            print(f"{settings.source}: addons[{index}]: cannot load {spec.path}: {exc}",
                  file=sys.stderr)  # fmt: skip
            failed = True
    if failed:
        return 1
    for warning in _warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    from sidecar.prices_command import price_lines, price_summary

    print(f"{_summary(settings)}; {price_summary(settings)}")
    for line in price_lines(settings):
        print(line)
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    key = "rk_" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    developer = args.developer or args.id
    print(f"key (shown once; give it to the caller): {key}")
    print("config line (paste under keys:):")
    print(f'  - {{id: {args.id}, sha256: "{digest}", developer: {developer}}}')
    return 0


def cmd_token_mint(args: argparse.Namespace) -> int:
    """Sign a client token locally, with the secret the gateways verify it with."""
    import orjson

    from sidecar.addons.auth import Auth
    from sidecar.client_tokens import ClientTokens, grant_from_request, token_answer
    from sidecar.errors import GatewayError

    settings = _loaded(args.config)
    if settings is None:
        return 2
    if settings.tokens.secret is None:
        print(
            f"{settings.tokens.secret_env} is not set: it must hold the secret the gateways "
            "verify client tokens with (tokens.secret_env)",
            file=sys.stderr,
        )
        return 2
    key = next((key for key in settings.keys if key.id == args.key_id), None)
    if key is None:
        print(f"{settings.source}: keys: no key with id {args.key_id!r}", file=sys.stderr)
        return 2
    problem = Auth.key_problem(key, time.time())
    if problem is not None:
        print(f"{problem}: its tokens would be refused", file=sys.stderr)
        return 2
    body: dict[str, object] = {"customer": args.customer}
    if args.model:
        body["allowed_models"] = args.model
    if args.origin is not None:
        body["origin"] = args.origin
    if args.client_ip is not None:
        body["client_ip"] = args.client_ip
    if args.ttl is not None:
        body["ttl_seconds"] = args.ttl
    try:
        grant = grant_from_request(body, key, settings.tokens)
    except GatewayError as exc:
        print(f"{exc.param}: {exc.message}" if exc.param else exc.message, file=sys.stderr)
        return 2
    token, claims = ClientTokens(settings.tokens).mint(grant)
    if args.json:
        print(orjson.dumps(token_answer(token, claims)).decode())
    else:
        print(token)
    return 0


def _override(settings: Settings, args: argparse.Namespace) -> Settings:
    from sidecar.app import with_listen

    api = admin = None
    if args.host or args.port:
        api = HostPort(args.host or settings.listen.api.host, args.port or settings.listen.api.port)
    if args.admin_host or args.admin_port:
        admin = HostPort(
            args.admin_host or settings.listen.admin.host,
            args.admin_port or settings.listen.admin.port,
        )
    settings = with_listen(settings, api, admin)
    if settings.open_mode and not is_loopback(settings.listen.api.host):
        raise ConfigError(
            [
                f"{settings.source}: listen.api: no keys are configured (open mode), which is "
                f"allowed only on a loopback listener, not {settings.listen.api.host}"
            ]
        )
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    metrics_dir = None
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # before prometheus_client is imported anywhere: it reads this once, at import
        metrics_dir = tempfile.mkdtemp(prefix="ringside-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        settings = _override(load_settings(args.config), args)
        if args.workers > 1 and settings.storage.backend == "memory":
            raise ConfigError(
                [
                    f"{settings.source}: storage.backend: --workers {args.workers} needs a store "
                    "the workers share (sqlite or redis); memory would give each its own budgets"
                ]
            )
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    from sidecar.server_limits import fd_limit_warning, raise_fd_limit

    fd_warning = fd_limit_warning(settings.limits, raise_fd_limit())  # workers inherit it
    for warning in [*_warnings(settings), *([fd_warning] if fd_warning else [])]:
        log.warning("%s", warning)  # once, by the supervisor: not per worker or request
    if args.workers > 1:
        try:
            return supervise(settings, args.config, started, args.workers)
        finally:
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
    return run_worker(settings, args.config, started, workers=1)


def _since(text: str) -> float:
    """`7d`, `24h`, `30m` ago, or an ISO 8601 time, or Unix seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    if text[-1:] in units and text[:-1].isdigit():
        return time.time() - int(text[:-1]) * units[text[-1]]
    from sidecar.api.usage import parse_time
    from sidecar.errors import GatewayError

    try:
        return parse_time(text, "--since")
    except GatewayError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def cmd_usage_export(args: argparse.Namespace) -> int:
    """Write the usage records of the configured store to stdout, oldest first."""
    from sidecar.stores import open_budget_store

    settings = _loaded(args.config)
    if settings is None:
        return 2
    storage = settings.storage
    if storage.backend == "memory":
        print(
            "storage.backend is memory: usage records live only inside the running sidecar; "
            "read them from GET /v1/customers/{id}/usage on its admin listener",
            file=sys.stderr,
        )
        return 1
    if storage.backend == "sqlite" and not os.path.exists(storage.sqlite_path):
        print(f"no usage records: {storage.sqlite_path} does not exist", file=sys.stderr)
        return 1

    async def read() -> list[UsageRecord]:
        store = await open_budget_store(storage, serve=False)
        try:
            return await store.usage(args.customer, args.since, None)
        finally:
            await store.close()

    try:
        records = asyncio.run(read())
    except Exception as exc:
        print(f"cannot read usage records from the {storage.backend} store: {exc}", file=sys.stderr)
        return 1
    try:
        _write_records(records, args.format)
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _write_records(records: list[UsageRecord], form: str) -> None:
    import csv

    import orjson

    from sidecar.stores.budget import UsageRecord, usd_text

    if form == "jsonl":
        for record in records:
            sys.stdout.buffer.write(orjson.dumps(record.public()) + b"\n")
    else:
        writer = csv.DictWriter(sys.stdout, fieldnames=list(UsageRecord("", 0).public()))
        writer.writeheader()
        for record in records:
            row = record.public()
            row.update(
                refs_tried=",".join(record.refs_tried),
                fallback="true" if record.fallback else "false",
                cost_usd=usd_text(record.cost),
            )
            writer.writerow(row)
    sys.stdout.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringside", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the sidecar")
    serve.add_argument("--config", required=True, help="YAML routing table")
    serve.add_argument("--host", help="api listener host (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="api listener port (default 8787)")
    serve.add_argument("--admin-host", help="admin listener host (default 0.0.0.0)")
    serve.add_argument("--admin-port", type=int, help="admin listener port (default 8788)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the listeners via SO_REUSEPORT (default 1)",
    )
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    keys = commands.add_parser("keys", help="API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_commands.add_parser("new", help="make a key and print its config line")
    new.add_argument("--id", default="app1", help="key id in the config (default app1)")
    new.add_argument("--developer", help="developer the key belongs to (default: the id)")
    new.set_defaults(func=cmd_keys_new)

    token = commands.add_parser("token", help="client tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    mint = token_commands.add_parser(
        "mint", help="sign a client token with the secret in tokens.secret_env; prints it"
    )
    mint.add_argument("--config", required=True, help="YAML routing table (keys, tokens)")
    mint.add_argument("--key-id", required=True, help="the key the token is bound to")
    mint.add_argument("--customer", required=True, help="the customer the token is charged to")
    mint.add_argument(
        "--model", action="append", help="an allowed ref or glob; repeat for more (default: all)"
    )
    mint.add_argument("--origin", help="bind to this web origin, e.g. https://app.example.com")
    mint.add_argument("--client-ip", help="bind to this client IP address")
    mint.add_argument("--ttl", type=int, help="lifetime in seconds (default tokens.default_ttl)")
    mint.add_argument("--json", action="store_true", help="print the token with its claims")
    mint.set_defaults(func=cmd_token_mint)

    usage = commands.add_parser("usage", help="usage records")
    usage_commands = usage.add_subparsers(dest="usage_command", required=True)
    export = usage_commands.add_parser("export", help="write usage records to stdout")
    export.add_argument("--config", required=True, help="YAML routing table (its storage)")
    export.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    export.add_argument("--since", type=_since, help="7d, 24h, 30m, ISO 8601 or Unix seconds")
    export.add_argument("--customer", help="only this customer's records")
    export.set_defaults(func=cmd_usage_export)

    from sidecar import prices_command

    prices = commands.add_parser(
        "prices", help="the effective catalog: each ref's prices and where they came from"
    )
    prices_command.add_arguments(prices)

    from sidecar.inject import command as inject

    webhook = commands.add_parser(
        "inject-webhook", help="the Kubernetes admission webhook that injects the sidecar"
    )
    inject.add_arguments(webhook)
    webhook.set_defaults(func=inject.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code
