"""What the benchmark scripts share: paths, the llama-server binary, serve's command line, and
writing a result table to bench/."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "config" / "models" / "tiny-llama.gguf"
CLI = ROOT / ".venv" / "bin" / "llama-supervisor"


def llama_server() -> str:
    """$LLAMA_SERVER_BIN, or the one scripts/build-llama-server builds (once) and caches."""
    found = os.environ.get("LLAMA_SERVER_BIN")
    if found:
        return found
    out = subprocess.run(
        [str(ROOT / "scripts" / "build-llama-server")], capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def serve_argv(config: Path) -> list[str]:
    return [str(CLI), "--log-format", "json", "serve", "--config", str(config)]


def publish(out: Path, name: str, script: str, table: str, data: dict[str, Any]) -> None:
    """Print the table; write bench/<name>.md (the table the README quotes) and .json."""
    print(table)
    out.mkdir(exist_ok=True)
    meta = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, **data}, indent=2) + "\n")
    (out / f"{name}.md").write_text(
        f"<!-- {script}, {meta['date']}, {meta['cpus']} CPUs -->\n{table}\n"
    )
