"""The ``llama-supervisor`` command line.

Exit codes (shared/CONFIG.md): 0 success; 2 bad usage or invalid config; 3 model source or
integrity refused; 4 the child could not be started or kept running; 1 anything else. Every
refusal prints one line ``error: <reason_code>: <fixed message>`` to stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from supervisor import __version__

__all__ = ["EXIT_CHILD", "EXIT_ERROR", "EXIT_INTEGRITY", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTEGRITY = 3
EXIT_CHILD = 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-supervisor",
        description="Supervise a llama.cpp server: verified model, health-driven lifecycle, "
        "bounded admission.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    parser.parse_args(argv)
    parser.print_help(sys.stderr)
    return EXIT_USAGE
