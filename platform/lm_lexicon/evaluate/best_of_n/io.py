"""Reading a saved reward model of any kind: the directory's ``reward_config.json`` says which."""
from __future__ import annotations

import json
from pathlib import Path

from lm_lexicon.evaluate.best_of_n.retrieval import RetrievalReward
from lm_lexicon.evaluate.best_of_n.reward import CONFIG_FILE, RewardModel


def load_reward_model(directory: str | Path, device: str = "cpu"):
    """A :class:`RetrievalReward` for a retrieval directory, else a :class:`RewardModel` (which checks the rest)."""
    config = Path(directory) / CONFIG_FILE
    backbone = json.loads(config.read_text(encoding="utf-8")).get("backbone") if config.is_file() else None
    if backbone == RetrievalReward.backbone:
        return RetrievalReward.load(directory, device)
    return RewardModel.load(directory, device)
