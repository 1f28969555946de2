"""The ``llama-supervisor`` command line.

Exit codes (shared/CONFIG.md): 0 success; 2 bad usage or invalid config; 3 model source or
integrity refused; 4 the child could not be started or kept running; 1 anything else. Every
refusal prints one line ``error: <reason_code>: <fixed message>`` to stderr, and never the URL, a
path under the store, the digest, a token or a key.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, TextIO

import anyio
import httpx
from anyio.abc import TaskStatus

from supervisor import __version__
from supervisor.config import Config, load_config, render_config
from supervisor.errors import SupervisorError, unwrap_group
from supervisor.fetch import FetchProgress, fetch_model, verify_model
from supervisor.logging import configure_logging, get_logger
from supervisor.policy import Reason
from supervisor.runtime import ChildError, Service

__all__ = [
    "EXIT_CHILD",
    "EXIT_ERROR",
    "EXIT_INTEGRITY",
    "EXIT_OK",
    "EXIT_USAGE",
    "ProgressPrinter",
    "exit_code_for",
    "main",
    "render_status",
]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTEGRITY: Final = 3
EXIT_CHILD: Final = 4

_INTEGRITY_REASONS: Final = frozenset(
    {
        Reason.MALFORMED_SPEC,
        Reason.SCHEME_NOT_ALLOWED,
        Reason.SOURCE_NOT_ALLOWED,
        Reason.DIGEST_MISMATCH,
        Reason.SIZE_MISMATCH,
        Reason.TOO_MANY_REDIRECTS,
        Reason.TLS_ERROR,
        Reason.MODEL_MISSING,
    }
)

_log = get_logger("cli")


def exit_code_for(error: SupervisorError) -> int:
    """The CLI's exit code for an error, from its reason."""
    if error.reason in (Reason.INVALID_CONFIG, Reason.MALFORMED_INPUT):
        return EXIT_USAGE
    if error.reason in _INTEGRITY_REASONS:
        return EXIT_INTEGRITY
    return EXIT_ERROR


def _fail(error: SupervisorError, stream: TextIO) -> int:
    print(f"error: {error.reason.value}: {error.message}", file=stream)
    return exit_code_for(error)


def _mib(value: float) -> str:
    return f"{value / (1024 * 1024):.1f} MiB"


class ProgressPrinter:
    """A progress bar on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, name: str, stream: TextIO, *, plain_interval_s: float = 5.0) -> None:
        self.name = name
        self.stream = stream
        self.tty = stream.isatty()
        self.plain_interval_s = plain_interval_s
        self.last_plain = 0.0
        self.drew = False

    def __call__(self, progress: FetchProgress) -> None:
        percent = 100.0 * progress.done_bytes / max(progress.total_bytes, 1)
        text = (
            f"{self.name}: {percent:5.1f}% {_mib(progress.done_bytes)} of "
            f"{_mib(progress.total_bytes)}, {_mib(progress.rate_bytes_per_s)}/s"
        )
        if self.tty:
            width = 24
            filled = int(width * percent / 100)
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r[{bar}] {text}\x1b[K")
            self.stream.flush()
            self.drew = True
            return
        now = time.monotonic()
        if (
            now - self.last_plain >= self.plain_interval_s
            or progress.done_bytes >= progress.total_bytes
        ):
            self.last_plain = now
            print(f"fetch: {text}", file=self.stream, flush=True)

    def done(self) -> None:
        if self.drew:
            self.stream.write("\n")
            self.stream.flush()
            self.drew = False


# ----------------------------------------------------------------------------------------------
# commands


def _cmd_fetch(config: Config, args: argparse.Namespace) -> int:
    printer = ProgressPrinter(config.model.name, sys.stderr)
    try:
        anyio.run(lambda: fetch_model(config.model, config.store.dir, on_progress=printer))
    finally:
        printer.done()
    print(f"{config.model.name} verified")
    return EXIT_OK


def _cmd_verify(config: Config, args: argparse.Namespace) -> int:
    anyio.run(verify_model, config.model, config.store.dir)
    print(f"{config.model.name} verified")
    return EXIT_OK


async def _serve(config: Config) -> int:
    printer = ProgressPrinter(config.model.name, sys.stderr)
    fetched = {"bytes": 0}

    def progress(update: FetchProgress) -> None:
        fetched["bytes"] = update.done_bytes
        printer(update)

    try:
        model = await fetch_model(config.model, config.store.dir, on_progress=progress)
    finally:
        printer.done()
    service = Service(config, model, fetch_bytes=fetched["bytes"])
    done = anyio.Event()

    async def run_service(*, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await service.run(task_status=task_status)
        finally:
            done.set()

    async def on_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                _log.info("serve.signal", signal=signal.Signals(signum).name)
                service.request_shutdown()

    async def announce(port: int) -> None:
        await service.supervisor.wait_ready()
        host = config.gateway.host
        shown = f"[{host}]" if ":" in host else host
        print(f"{config.model.name} ready at http://{shown}:{port}/v1", flush=True)

    with unwrap_group():
        async with anyio.create_task_group() as tg:
            tg.start_soon(on_signals)
            port = await tg.start(run_service)
            tg.start_soon(announce, port)
            await done.wait()
            tg.cancel_scope.cancel()
    return EXIT_OK


def _cmd_serve(config: Config, args: argparse.Namespace) -> int:
    try:
        return anyio.run(_serve, config)
    except ChildError as error:
        print(f"error: {error.reason.value}: {error.message}", file=sys.stderr)
        return EXIT_CHILD


def _cmd_check_config(config: Config, args: argparse.Namespace) -> int:
    print(render_config(config), end="")
    return EXIT_OK


def _with_overrides(config: Config, args: argparse.Namespace) -> Config:
    """Command-line overrides of the config (serve's --host, --port, --store)."""
    gateway = config.gateway
    if getattr(args, "host", None) is not None:
        gateway = dataclasses.replace(gateway, host=args.host)
    if getattr(args, "port", None) is not None:
        gateway = dataclasses.replace(gateway, port=args.port)
    store = config.store
    if getattr(args, "store", None) is not None:
        store = dataclasses.replace(store, dir=args.store.expanduser().resolve())
    return dataclasses.replace(config, gateway=gateway, store=store)


def _format_bytes(value: object) -> str:
    if not isinstance(value, int | float):
        return "not observed"
    return f"{value / (1024 * 1024):.1f} MiB"


def render_status(doc: dict[str, object]) -> str:
    """A /status document as a few readable lines."""
    resources = doc.get("resources")
    res = resources if isinstance(resources, dict) else {}
    cpu = res.get("cpu_percent")
    lines = [
        ("state", f"{doc.get('state')} (restarts: {doc.get('restarts')})"),
        ("model", f"{doc.get('model')} (sha256 {doc.get('sha256')}...)"),
        ("backend", str(doc.get("backend"))),
        ("requests", f"in flight {doc.get('in_flight')}, queued {doc.get('queued')}"),
        (
            "resources",
            f"RAM {_format_bytes(res.get('ram_bytes'))}, "
            f"CPU {f'{cpu:.1f} %' if isinstance(cpu, int | float) else 'not observed'}, "
            f"VRAM {_format_bytes(res.get('vram_bytes'))}",
        ),
        ("refusing", str(doc.get("refusing") or "no")),
        ("stopped by", str(doc.get("stop_reason") or "-")),
        ("uptime", f"{doc.get('uptime_s')} s"),
    ]
    return "".join(f"{key:<11}{value}\n" for key, value in lines)


def _cmd_status(args: argparse.Namespace) -> int:
    tokens = os.environ.get(args.token_env, "")
    token = next((t.strip() for t in tokens.split(",") if t.strip()), None)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = args.url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    try:
        with httpx.Client(trust_env=False, timeout=args.timeout) as client:
            response = client.get(url + "/status", headers=headers)
    except (httpx.HTTPError, ValueError):
        print("error: network_error: the supervisor did not answer", file=sys.stderr)
        return EXIT_ERROR
    if response.status_code == 401:
        print("error: unauthorized: a valid token is needed (see --token-env)", file=sys.stderr)
        return EXIT_ERROR
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if response.status_code != 200 or not isinstance(doc, dict):
        print("error: http_status: the supervisor answered with an error", file=sys.stderr)
        return EXIT_ERROR
    print(render_status(doc), end="")
    return EXIT_OK


_COMMANDS: Final[dict[str, tuple[str, Callable[[Config, argparse.Namespace], int]]]] = {
    "serve": ("fetch and verify the model, run and supervise the server", _cmd_serve),
    "fetch": ("download (or copy) and verify the model into the store", _cmd_fetch),
    "verify": ("re-hash the stored model in full (exit 0, or 3 and quarantine)", _cmd_verify),
    "check-config": ("validate a config and print it, secrets masked", _cmd_check_config),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-supervisor",
        description="Supervise a llama.cpp server: verified model, health-driven lifecycle, "
        "bounded admission.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="log format on stderr (auto: console on a terminal, JSON lines otherwise)",
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, _fn) in _COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", required=True, type=Path, help="the TOML config file")
        if name == "serve":
            sub.add_argument("--host", help="override gateway.host")
            sub.add_argument("--port", type=int, help="override gateway.port (0: any free port)")
            sub.add_argument("--store", type=Path, help="override store.dir")
    status = commands.add_parser(
        "status",
        help="show a running supervisor's /status",
        description="Show a running supervisor's /status as a short summary.",
    )
    status.add_argument(
        "--url", required=True, help="the supervisor's URL, e.g. http://127.0.0.1:8000"
    )
    status.add_argument(
        "--token-env",
        default="LLAMA_SUPERVISOR_TOKENS",
        help="environment variable holding the bearer token(s); the first one is sent",
    )
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return EXIT_USAGE if exit_.code not in (0, None) else EXIT_OK
    json_logs = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(json=json_logs, level=args.log_level)
    try:
        if args.command == "status":
            return _cmd_status(args)
        _help, command = _COMMANDS[args.command]
        config = _with_overrides(load_config(args.config), args)
        return command(config, args)
    except SupervisorError as error:
        return _fail(error, sys.stderr)
    except KeyboardInterrupt:
        print("error: interrupted: stopped by the user", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # noqa: BLE001 - the last line of defence prints no details
        _log.error("cli.failed", error_type=type(error).__name__)
        print("error: internal_error: unexpected failure (see the log)", file=sys.stderr)
        return EXIT_ERROR
