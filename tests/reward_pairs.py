"""Preference pairs for the reward-model tests (test_reward_seed, test_reward_policy): the better definition is fluent
("a <adj> <noun> of the kind"); the worse one is the same words shuffled."""
from __future__ import annotations

import random

from lm_lexicon.evaluate.best_of_n.reward import PreferencePair

ADJ = ["small", "large", "red", "wooden", "quiet", "bright", "old", "sharp", "soft", "heavy", "cold", "round"]
NOUN = ["animal", "tool", "building", "plant", "machine", "container", "vehicle", "garment", "instrument", "bird"]


def fluent_vs_shuffled_pairs(n: int, seed: int) -> list[PreferencePair]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = f"a {rng.choice(ADJ)} {rng.choice(NOUN)} of the kind".split()
        worse = list(words)
        while worse == words:
            rng.shuffle(worse)
        out.append(PreferencePair(f'"seen {seed}-{i}" What is the definition of "term{i}"?', " ".join(words),
                                  " ".join(worse), i))
    return out
