"""The shipped tiny model is exactly what scripts/make-tiny-model.py writes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "models" / "tiny-llama.gguf"


def test_make_tiny_model_reproduces_the_shipped_file(tmp_path: Path) -> None:
    out = tmp_path / "tiny.gguf"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make-tiny-model.py"), str(out)],
        check=True,
        capture_output=True,
    )
    made = hashlib.sha256(out.read_bytes()).hexdigest()
    shipped = hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
    assert made == shipped
    assert out.stat().st_size < 1024 * 1024
