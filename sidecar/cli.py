"""`ringside` command line: serve, check-config, keys, token mint, usage export, inject-webhook."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from typing import TYPE_CHECKING

from sidecar.settings import ConfigError, Settings, load_settings
from sidecar.settings.loader import is_loopback, metrics_exposure_warning
from sidecar.settings.model import HostPort

if TYPE_CHECKING:
    from sidecar.stores.budget import UsageRecord

log = logging.getLogger("ringside")

GC_YOUNG_THRESHOLD = 10_000  # objects surviving between young collections (CPython's is 700)


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
    print(_summary(settings))
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


def settle_heap() -> None:
    """Keep what startup built (modules, config, compiled routes) out of every later garbage
    collection, and collect the young generation less often: requests free their objects by
    reference counting, so frequent collections only re-scan long-lived state.

    Only the young generations are collected first: startup's few cycles (a dozen objects) are
    still young, and a full collection would re-scan every module object for ≈10 ms of startup
    to find nothing more."""
    gc.collect(1)
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


async def _serve(settings: Settings, config_path: str, started: float, workers: int = 1) -> None:
    from aiohttp import web

    from sidecar.app import create_apps
    from sidecar.appkeys import GatewayState
    from sidecar.server_limits import (
        GuardedRunner,
        GuardedServer,
        ListenerGuard,
        api_connection_ceiling,
    )
    from sidecar.shutdown import CUT_SECONDS, Drain

    state = GatewayState(config_path, settings, workers=workers)
    reuse_port = workers > 1
    api_app, admin_app = create_apps(state)
    # each listener's deadlines and connection cap (limits.*, read again at each connection)
    api_guard = ListenerGuard(
        "api", lambda: state.settings.limits, api_connection_ceiling(settings.limits)
    )
    admin_guard = ListenerGuard("admin", lambda: state.settings.limits)
    # the drain (sidecar/shutdown.py) has ended every api request before the runners stop
    api_runner = GuardedRunner(
        api_app, api_guard, handler_cancellation=True, access_log=None,
        shutdown_timeout=CUT_SECONDS,
    )  # fmt: skip
    admin_runner = GuardedRunner(
        admin_app, admin_guard, access_log=None, shutdown_timeout=CUT_SECONDS
    )
    await api_runner.setup()
    await admin_runner.setup()
    api_guard.attach(state.runtime.services.metrics)
    admin_guard.attach(state.runtime.services.metrics)
    listen = settings.listen
    api_site = web.TCPSite(
        api_runner, listen.api.host, listen.api.port, backlog=1024, reuse_port=reuse_port
    )
    await api_site.start()
    await web.TCPSite(
        admin_runner, listen.admin.host, listen.admin.port, reuse_port=reuse_port
    ).start()
    settle_heap()
    from sidecar.structured import warm_up

    # ready first; what only some requests need is imported off the event loop
    warm_up_task = asyncio.get_running_loop().run_in_executor(None, warm_up)
    mode = "open mode" if settings.open_mode else f"{len(settings.keys)} keys"
    log.info(
        "ringside ready in %.0f ms: api http://%s/v1, admin http://%s (%s, config %s)",
        (time.perf_counter() - started) * 1000,
        listen.api,
        listen.admin,
        mode,
        config_path,
    )

    loop = asyncio.get_running_loop()
    assert isinstance(api_runner.server, GuardedServer)
    drain = Drain(state, api_runner.server, [api_site])
    loop.add_signal_handler(signal.SIGTERM, drain.begin, signal.SIGTERM)
    loop.add_signal_handler(signal.SIGINT, drain.begin, signal.SIGINT)
    loop.add_signal_handler(signal.SIGHUP, lambda: state.holder and state.holder.reload())
    await drain.started.wait()
    await drain.run()  # /readyz fails, new requests for a delay, then in-progress ones finish
    await warm_up_task
    await api_runner.cleanup()  # the usage writer writes out its queue, the stores close
    await admin_runner.cleanup()


def _run_worker(settings: Settings, config_path: str, started: float, workers: int) -> int:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    try:
        with runner:
            runner.run(_serve(settings, config_path, started, workers))
    except ConfigError as exc:  # e.g. an addon that cannot be loaded
        print(exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ringside: cannot listen: {exc}", file=sys.stderr)
        return 3
    return 0


def _supervise(settings: Settings, config_path: str, started: float, workers: int) -> int:
    """Fork `workers` processes sharing the listeners (SO_REUSEPORT); forward signals; reap.

    Metrics go through prometheus-client's multiprocess mode so that whichever worker answers
    /metrics reports the sum of all of them. A worker that dies is replaced until shutdown.
    """
    from prometheus_client import multiprocess

    def spawn() -> int:
        pid = os.fork()
        if pid == 0:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os._exit(_run_worker(settings, config_path, started, workers))
        return pid

    children = {spawn() for _ in range(workers)}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    worst = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        children.discard(pid)
        multiprocess.mark_process_dead(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            worst = max(worst, abs(code))
        elif code in (2, 3):  # a config or listen error: the next worker would fail the same way
            stopping = True
            forward(signal.SIGTERM, None)
            worst = code
        else:
            log.error("worker %d exited with %d; starting another", pid, code)
            time.sleep(0.5)
            children.add(spawn())
    return worst


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
            return _supervise(settings, args.config, started, args.workers)
        finally:
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
    return _run_worker(settings, args.config, started, workers=1)


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
