"""Expert stage alone: one expert per domain plus the dense baseline, each a Ray Train run launched from Ray Tune.

    python jobs/train_experts.py --config configs/tiny.yaml [train.lr=1e-4 partition.n_experts=8 ...]
    ray job submit --working-dir . -- python jobs/train_experts.py --config configs/llama3-8b-3dex.yaml
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works from a plain checkout too

from lm_lexicon.cli import job_main  # noqa: E402

if __name__ == "__main__":
    job_main("train-experts")
