"""Command line: ``python -m payments simulator``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m payments", description="M-Pesa Mozambique payments module."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    simulator = commands.add_parser(
        "simulator",
        help="run the M-Pesa Mozambique simulator on a port",
        description="Serve a faithful, fault-injecting M-Pesa Mozambique sandbox. Point a client"
        " at it with MPESA_ENVIRONMENT=simulator and MPESA_BASE_URL=http://HOST:PORT.",
    )
    simulator.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    simulator.add_argument("--port", type=int, default=8001, help="port (default 8001)")
    simulator.add_argument(
        "--pin-delay", type=float, default=0.0, help="seconds C2B waits for the customer's PIN"
    )
    simulator.add_argument(
        "--slow-response",
        type=float,
        default=300.0,
        help="seconds the scripted slow number (258842000002) takes to answer",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "simulator":
        from .simulator import SimulatorConfig, run_simulator

        config = SimulatorConfig(
            pin_delay_seconds=args.pin_delay, slow_response_seconds=args.slow_response
        )
        print(f"M-Pesa simulator on http://{args.host}:{args.port} (PIN delay {args.pin_delay}s)")
        run_simulator(args.host, args.port, config)


if __name__ == "__main__":
    main()
