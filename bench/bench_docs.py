"""Record a benchmark's result lines as a section of docs/BENCHMARKS.md (replacing an older run of the same one)."""
from __future__ import annotations

import platform
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nRun by hand (`python bench/<name>.py --write`); each section is replaced by the latest run.\n"


def write_section(title: str, lines: list[str]) -> None:
    text = DOC.read_text() if DOC.exists() else HEADER
    stamp = f"_{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, Python {platform.python_version()}_"
    body = f"## {title}\n\n{stamp}\n\n" + "\n".join(lines) + "\n"
    parts = text.split("\n## ")
    kept = [parts[0].rstrip("\n") + "\n"] + ["## " + p.rstrip("\n") + "\n" for p in parts[1:]
                                            if not p.startswith(title)]
    DOC.write_text("\n".join(kept + [body]))
