"""The paper's ablations on a recipe: `lm-lexicon ablate` (the same options). Partition method (Table 3: semantic /
lexical / random / none), routing policy (Table 4: domain / token top-1 / token top-2 / soft- and hard-sequence) and
what the semantic clusters are made of (features: prompt / definition / prompt+definition), over seeds, with
mean ± std and a paired permutation test against the default arm. Writes {study}.md, {study}.png and {study}.json
under --out.

    python jobs/ablate.py --config configs/ablation.yaml --study all --seeds 21,42,84 --out runs/ablation

An evaluated arm keeps its metrics, predictions and configs; its model weights are deleted unless --keep-weights.
Interrupted? Run the same command again: finished arms are skipped (their ARM_DONE.json marker).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works from a plain checkout too

from lm_lexicon.cli import job_main  # noqa: E402

if __name__ == "__main__":
    job_main("ablate")
