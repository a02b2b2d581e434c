"""Partition stage alone: embed the training prompts on Ray Data and split them into N balanced domains.

    python jobs/partition.py --config configs/tiny.yaml [partition.n_experts=8 partition.method=lexical ...]
    ray job submit --working-dir . -- python jobs/partition.py --config configs/tiny.yaml
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works from a plain checkout too

from lm_lexicon.cli import job_main  # noqa: E402

if __name__ == "__main__":
    job_main("partition")
