"""The whole LM-Lexicon pipeline on the embedded default or any recipe: `lm-lexicon run` (the same options).

    python jobs/pipeline.py --config configs/tiny.yaml [--stages data,partition] [--force experts] [--verbose]
        [section.field=value ...]
    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/tiny.yaml

Ctrl-C or SIGTERM stops every process of the run within 30 s; a re-run resumes after the last finished stage.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works from a plain checkout too

from lm_lexicon.cli import job_main  # noqa: E402

if __name__ == "__main__":
    job_main("run")
