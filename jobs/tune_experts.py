"""Ray Tune scan over the number of experts (paper Fig. 5): `lm-lexicon scan` (the same options). Each trial is the
whole pipeline at its N, evaluated on the validation split; writes scan.md (table), scan.png (metric vs N) and
scan.json under --out.

    python jobs/tune_experts.py --config configs/tiny.yaml --ns 1,2,4,8 --out runs/scan [section.field=value ...]
    ray job submit --working-dir . -- python jobs/tune_experts.py --config configs/tiny.yaml --max-concurrent 4

On a 2-CPU machine keep --max-concurrent 1 (the default): a trial's stages need both CPUs, and the trial itself
reserves --trial-cpus (default 0). On a cluster, raise --max-concurrent to run pipelines side by side.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works from a plain checkout too

from lm_lexicon.cli import job_main  # noqa: E402

if __name__ == "__main__":
    job_main("scan")
