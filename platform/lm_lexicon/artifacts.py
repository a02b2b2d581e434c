"""Stage directories, completion markers and provenance."""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lm_lexicon._util import written_atomically

MARKER = "_SUCCESS.json"


@dataclass
class StageResult:
    name: str
    path: Path
    fingerprint: str
    reused: bool
    seconds: float
    summary: dict


def fingerprint(cfg, sections: tuple[str, ...], upstream: tuple[str, ...] = ()) -> str:
    """Fingerprint of a stage: its config sections and the fingerprints of the stages it reads."""
    own = cfg.stage_hash(*sections) if sections else ""
    return hashlib.sha256(json.dumps([own, list(upstream)]).encode()).hexdigest()[:16]


def prune_checkpoints(storage_path: str, run_tag: str, recipe: str) -> tuple[int, int]:
    """Delete the ``checkpoint_*`` directories of the Ray Train runs ``{recipe}-*-{run_tag}`` under a local
    ``storage_path`` (a finished stage no longer needs them: it resumes from its own directory). Their logs,
    ``result.json`` and ``progress.csv`` stay. A remote URI is left alone. Returns (directories removed, bytes)."""
    if "://" in storage_path:
        return 0, 0
    root = Path(storage_path).resolve()
    removed, freed = 0, 0
    for run_dir in sorted(root.glob(f"{recipe}-*-{run_tag}")):
        for ckpt in sorted(run_dir.rglob("checkpoint_*")):
            if not ckpt.is_dir() or not ckpt.exists():
                continue
            freed += sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
            shutil.rmtree(ckpt)
            removed += 1
    return removed, freed


def release_checkpoints(cfg, result: "StageResult", run_tag: str, log: Callable[[str], None] = print) -> None:
    """After a stage finished here (not reused), drop its Ray Train checkpoints unless resources.keep_checkpoints."""
    if result.reused or cfg.resources.keep_checkpoints:
        return
    removed, freed = prune_checkpoints(cfg.resources.storage_path, run_tag, cfg.name)
    if removed:
        log(f"[{result.name}] removed {removed} Ray Train checkpoint(s) ({freed / 1e6:.0f} MB) under "
            f"{cfg.resources.storage_path}: the stage directory holds the final models "
            "(resources.keep_checkpoints=true keeps them)")


def stage_done(path: str | Path, fp: str) -> dict | None:
    """The marker of a finished stage with this fingerprint, or None."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None
    return data if data.get("fingerprint") == fp else None


def _provenance() -> dict:
    from lm_lexicon import __version__

    return {"lm_lexicon": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "host": socket.gethostname(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_stage(name: str, path: str | Path, fp: str, fn: Callable[[Path], dict], cfg=None, force: bool = False,
              log: Callable[[str], None] = print) -> StageResult:
    """Run ``fn(work_dir) -> summary`` unless a finished stage with the same fingerprint is there.

    The stage writes into a temporary sibling directory that is renamed into place only when it succeeded, so a crash
    never leaves a half-written directory that looks finished.
    """
    path = Path(path)
    done = None if force else stage_done(path, fp)
    if done is not None:
        log(f"[{name}] reusing {path} (finished {done.get('provenance', {}).get('finished_at', '?')})")
        return StageResult(name, path, fp, True, 0.0, done.get("summary", {}))
    # a failure leaves <name>.partial (the next run clears it); a stage linked from another run (ablations link
    # unchanged upstream stages) is unlinked, not followed, when this one replaces it
    with written_atomically(path, ".partial") as tmp:
        log(f"[{name}] running -> {path}")
        t0 = time.perf_counter()
        summary = fn(tmp) or {}
        seconds = time.perf_counter() - t0
        if cfg is not None:
            from lm_lexicon.config import dump_config

            dump_config(cfg, tmp / "config.yaml")
        (tmp / MARKER).write_text(json.dumps({"stage": name, "fingerprint": fp, "seconds": round(seconds, 2),
                                              "summary": summary, "provenance": _provenance()}, indent=2))
    log(f"[{name}] done in {seconds:.1f}s")
    return StageResult(name, path, fp, False, seconds, summary)
