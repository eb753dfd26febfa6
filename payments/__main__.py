"""Command line: ``python -m payments serve | simulator | reconcile | dispatch | prune``.

Commands that settle or deliver payments take ``--service module:attr`` (``add_service_argument``)
and run through ``run_with_host``, so they use the host's service and database (``payments.host``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .host import Host


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m payments", description="M-Pesa Mozambique payments module."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the demo gateway (router under /api, SQLite, built-in simulator)",
        description="Serve the payments API under /api with OpenAPI docs at /docs. Unless the"
        " environment says otherwise it uses MPESA_ENVIRONMENT=simulator (no credentials), the"
        " SQLite file PAYMENT_DATABASE_URL (default ./payments.db) and a fresh admin key, printed"
        " at start.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    _add_exposure_flag(serve, "demo gateway")
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="close a connection whose request headers are not complete in time (default 10)",
    )
    serve.add_argument(
        "--keep-alive",
        type=int,
        default=5,
        metavar="SECONDS",
        help="close an idle keep-alive connection after this long (default 5)",
    )
    serve.add_argument(
        "--limit-concurrency",
        type=int,
        default=1000,
        metavar="N",
        help="answer 503 to new requests beyond N open connections or tasks (default 1000)",
    )
    serve.add_argument(
        "--max-header-bytes",
        type=int,
        default=16 * 1024,
        metavar="BYTES",
        help="largest request line plus headers (default 16384); larger ones get 400",
    )

    simulator = commands.add_parser(
        "simulator",
        help="run the M-Pesa Mozambique simulator on a port",
        description="Serve a faithful, fault-injecting M-Pesa Mozambique sandbox. Point a client"
        " at it with MPESA_ENVIRONMENT=simulator and MPESA_BASE_URL=http://HOST:PORT.",
    )
    simulator.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    simulator.add_argument("--port", type=int, default=8001, help="port (default 8001)")
    _add_exposure_flag(simulator, "simulator")
    simulator.add_argument(
        "--pin-delay", type=float, default=0.0, help="seconds C2B waits for the customer's PIN"
    )
    simulator.add_argument(
        "--slow-response",
        type=float,
        default=300.0,
        help="seconds the scripted slow number (258842000002) takes to answer",
    )

    reconcile = commands.add_parser(
        "reconcile",
        help="settle payments whose outcome is unknown by asking M-Pesa",
        description="Query M-Pesa for every pending, processing or unknown payment at least"
        " --min-age seconds old and apply the answer; payments still unresolved after"
        " PAYMENT_RECONCILE_ATTENTION_AFTER seconds are flagged for an operator. Safe to run"
        " in several processes at once on PostgreSQL.",
    )
    reconcile.add_argument(
        "--min-age",
        type=float,
        default=None,
        metavar="SECONDS",
        help="only payments at least this old (default PAYMENT_RECONCILE_MIN_AGE, 60)",
    )
    reconcile.add_argument(
        "--loop",
        type=float,
        default=None,
        metavar="SECONDS",
        help="keep running, one pass every SECONDS (default: one pass, then exit)",
    )
    reconcile.add_argument(
        "--batch-size", type=int, default=None, help="payments per pass (default 50)"
    )
    add_service_argument(reconcile)

    prune = commands.add_parser(
        "prune",
        help="delete what the retention settings say is past keeping",
        description="Delete rejected notices older than PAYMENT_REJECTED_NOTICE_RETENTION"
        " seconds, processed notices older than PAYMENT_PROCESSED_NOTICE_RETENTION_DAYS and, when"
        " PAYMENT_AUDIT_RETENTION_DAYS is set, audit rows of payments settled before then. In"
        " batches; safe beside a running app. The reconciler's loop does the same hourly.",
    )
    prune.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted, delete nothing"
    )
    add_service_argument(prune)

    dispatch = commands.add_parser(
        "dispatch",
        help="deliver payment events: webhooks to PAYMENT_WEBHOOK_URLS, and the host's hooks",
        description="Deliver every due payment event: POST it, signed (Standard Webhooks), to"
        " each PAYMENT_WEBHOOK_URLS endpoint, retrying failures with backoff; with --service,"
        " also run the host service's hooks (on_payment_completed, ...) for events no process"
        " has run them for. Prunes events older than PAYMENT_EVENT_RETENTION_DAYS. Safe to run"
        " in several processes at once on PostgreSQL; on SQLite run one.",
    )
    dispatch.add_argument(
        "--loop",
        type=float,
        default=None,
        metavar="SECONDS",
        help="keep running, polling every SECONDS (default: deliver what is due, then exit)",
    )
    add_service_argument(dispatch)
    return parser


def add_service_argument(parser: argparse.ArgumentParser) -> None:
    """``--service module:attr``: every command that settles or delivers payments runs the
    host's service (its hooks) on the host's database (see ``payments.host``)."""
    parser.add_argument(
        "--service",
        default=None,
        metavar="MODULE:ATTR",
        help="your PaymentService (an instance, a subclass or a factory), e.g."
        " app.payments_hooks:shop_payments, so settled payments reach your hooks; default"
        " PAYMENT_SERVICE. Its sessions (PaymentService(sessions=SessionLocal)) are used, else"
        " PAYMENT_DATABASE_URL; with neither the command refuses to run.",
    )


def run_with_host(spec: str | None, work: Callable[[Host], Awaitable[None]]) -> None:
    """Run ``work`` with the host's service and sessions; a setup or database problem ends
    the command with its message and exit status 2 (no traceback)."""
    from .host import describe_failure, open_host

    async def main() -> None:
        async with open_host(spec) as host:
            await work(host)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as error:
        message = describe_failure(error)
        if message is None:
            raise
        print(f"python -m payments: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _add_exposure_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help=f"allow a non-loopback --host: the {what} is for development and tests only",
    )


def _refuse_remote(host: str, allow_remote: bool, what: str) -> None:
    """The demo and the simulator are development tools (the simulator's demo credentials are
    public): reachable from other machines only when asked for explicitly."""
    from .config import is_loopback_host

    if not allow_remote and not is_loopback_host(host):
        raise SystemExit(
            f"refusing to serve the {what} on {host}, which is not a loopback address: it is"
            " for development and tests. Pass --allow-remote if you really mean it."
        )


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        _refuse_remote(args.host, args.allow_remote, "demo gateway")
        serve(
            args.host,
            args.port,
            header_timeout=args.header_timeout,
            keep_alive=args.keep_alive,
            limit_concurrency=args.limit_concurrency,
            max_header_bytes=args.max_header_bytes,
        )
    elif args.command == "dispatch":
        run_with_host(args.service, lambda host: dispatch(host, args.loop))
    elif args.command == "reconcile":
        run_with_host(
            args.service,
            lambda host: reconcile(host, args.min_age, args.loop, args.batch_size),
        )
    elif args.command == "prune":
        run_with_host(args.service, lambda host: prune(host, dry_run=args.dry_run))
    elif args.command == "simulator":
        _refuse_remote(args.host, args.allow_remote, "simulator")
        from .simulator.app import SimulatorConfig, run_simulator

        config = SimulatorConfig(
            pin_delay_seconds=args.pin_delay, slow_response_seconds=args.slow_response
        )
        print(f"M-Pesa simulator on http://{args.host}:{args.port} (PIN delay {args.pin_delay}s)")
        run_simulator(args.host, args.port, config)


def serve(
    host: str,
    port: int,
    *,
    header_timeout: float = 10.0,
    keep_alive: int = 5,
    limit_concurrency: int = 1000,
    max_header_bytes: int = 16 * 1024,
) -> None:
    import uvicorn

    from .config import get_settings
    from .demo import bounded_protocol, create_app

    os.environ.setdefault("MPESA_ENVIRONMENT", "simulator")
    # The demo settles unknown outcomes itself, quickly, so a newcomer sees them resolve.
    os.environ.setdefault("PAYMENT_RECONCILE_IN_APP", "true")
    os.environ.setdefault("PAYMENT_RECONCILE_MIN_AGE", "5")
    os.environ.setdefault("PAYMENT_RECONCILE_INTERVAL", "5")
    if not os.environ.get("PAYMENT_ADMIN_API_KEY"):
        os.environ["PAYMENT_ADMIN_API_KEY"] = secrets.token_urlsafe(24)
    settings = get_settings()  # fail fast, naming the variable, before serving anything
    print(f"Payments demo gateway on http://{host}:{port}/api/payments (docs: /docs)")
    print(f"Provider: {settings.mpesa_environment}; database: {settings.database_url_for_display}")
    print(f"Admin API key (send as X-API-Key): {settings.admin_api_key}")
    trusted = (settings.payment_trusted_proxies or "").strip()
    uvicorn.run(
        create_app(),
        host=host,
        port=port,
        log_level="warning",
        http=bounded_protocol(header_timeout, max_header_bytes),
        timeout_keep_alive=keep_alive,
        limit_concurrency=limit_concurrency,
        # uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1: only the proxies
        # PAYMENT_TRUSTED_PROXIES names may set the client address, as in the module itself.
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
    )


async def reconcile(
    host: Host, min_age: float | None, loop: float | None, batch_size: int | None
) -> None:
    from .reconciliation import reconcile_forever, reconcile_once

    if loop is None:
        report = await reconcile_once(
            host.service, host.sessions, min_age=min_age, batch_size=batch_size
        )
        print(f"reconciliation: {report}")
    else:
        print(f"reconciling every {loop:g} s ({host.database_description})", flush=True)
        await reconcile_forever(
            host.service, host.sessions, interval=loop, min_age=min_age, batch_size=batch_size
        )


async def prune(host: Host, *, dry_run: bool) -> None:
    from .retention import prune as prune_once

    report = await prune_once(host.service.settings, host.sessions, dry_run=dry_run)
    print(f"prune{' (dry run: nothing deleted)' if dry_run else ''}: {report}")


async def dispatch(host: Host, loop: float | None) -> None:
    from .dispatcher import dispatch_forever, dispatch_once

    if loop is None:
        report = await dispatch_once(host.service, host.sessions)
        print(f"dispatch: {report}")
    else:
        print(f"dispatching every {loop:g} s ({host.database_description})", flush=True)
        await dispatch_forever(host.service, host.sessions, interval=loop)


if __name__ == "__main__":
    main()
