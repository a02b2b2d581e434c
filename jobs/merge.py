"""Merge stage alone: experts -> one sparse MoE routed by domain, then the light router/expert fine-tune on Ray Train.

    python jobs/merge.py --config configs/tiny.yaml [merge.routing=token merge.top_k=2 finetune.max_steps=100 ...]
    ray job submit --working-dir . -- python jobs/merge.py --config configs/tiny.yaml
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works from a plain checkout too

from lm_lexicon.cli import job_main  # noqa: E402

if __name__ == "__main__":
    job_main("merge")
