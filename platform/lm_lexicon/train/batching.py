"""Tokenised training sets, padding, and length-bucketed batches whose order a resumed run can regenerate."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from lm_lexicon.data.prompts import record_prompt
from lm_lexicon.data.records import Record
from lm_lexicon.train.tokens import IGNORE_INDEX, assemble, bos_ids, eos_id, split_prompt_definition


class SFTDataset(torch.utils.data.Dataset):
    """Records tokenised once, up front (fast batched tokenisation), as unpadded examples.

    ``lengths`` (tokens per example) drives the length-bucketed batching.
    """

    def __init__(self, tokenizer, records: Sequence[Record], max_length: int,
                 domains: Optional[Sequence[int]] = None, templates=None):
        self.max_length = max_length
        records = list(records)
        if domains is not None and len(domains) != len(records):
            raise ValueError(f"{len(domains)} domain labels for {len(records)} records")
        prompts = [record_prompt(r, templates) for r in records]
        definitions = [r.definition for r in records]
        bos, eos = bos_ids(tokenizer), eos_id(tokenizer)
        self.examples: list[dict] = []
        if records:
            prompt_ids, definition_ids = split_prompt_definition(tokenizer, prompts, definitions)
            self.examples = [assemble(bos, p, d, eos, max_length) for p, d in zip(prompt_ids, definition_ids)]
            if domains is not None:  # the MoE's domain routing: the expert each sequence goes to
                for example, domain in zip(self.examples, domains):
                    example["domain"] = int(domain)
        self.lengths = [len(e["input_ids"]) for e in self.examples]
        self.n_target_tokens = sum(sum(1 for t in e["labels"] if t != IGNORE_INDEX) for e in self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def collate(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch: padding has attention 0 and label -100."""
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[row, :k] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention_mask[row, :k] = 1
        labels[row, :k] = torch.tensor(e["labels"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if "domain" in examples[0]:
        batch["domain_labels"] = torch.tensor([e["domain"] for e in examples], dtype=torch.long)
        # sequence-level routing decides from the prompt, as it will at generation time
        batch["routing_mask"] = (attention_mask == 1) & (labels == IGNORE_INDEX)
    return batch


class LengthBucketBatchSampler(torch.utils.data.Sampler):
    """Batches of similar-length examples, so little compute is spent on padding; random yet reproducible.

    Per epoch: shuffle all indices with a generator seeded by ``(seed, epoch)``, cut them into pools of
    ``batch_size * pool_batches``, sort each pool by length, cut pools into batches, shuffle the batch order.
    The order is a pure function of ``(seed, epoch)`` — no hidden state — so a resumed run can regenerate an epoch
    and skip the batches it already did. With ``num_replicas > 1`` (data-parallel ranks) each rank takes every
    ``num_replicas``-th batch, and all ranks get the same number of batches (DDP all-reduces must pair up).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 pool_batches: int = 50, drop_last: bool = False, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1 or pool_batches < 1:
            raise ValueError("batch_size and pool_batches must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.lengths = list(lengths)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.pool_batches, self.drop_last = pool_batches, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        n = len(self.lengths)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n).tolist()
            pool = self.batch_size * self.pool_batches
            pools = [sorted(order[i:i + pool], key=lambda j: self.lengths[j]) for i in range(0, n, pool)]
        else:
            rng = None
            pools = [sorted(range(n), key=lambda j: self.lengths[j])]
        batches = [p[i:i + self.batch_size] for p in pools for i in range(0, len(p), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches)).tolist()]
        if self.num_replicas > 1:
            per_rank = len(batches) // self.num_replicas
            batches = batches[self.rank::self.num_replicas][:per_rank]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return len(self.batches(self.epoch))


def batch_stream(sampler: LengthBucketBatchSampler, epoch: int, index: int) -> Iterator[tuple[int, int, list[int]]]:
    """Endless ``(epoch, index, batch)`` stream starting at a saved data position; steps may straddle epochs."""
    while True:
        batches = sampler.batches(epoch)
        for i in range(index, len(batches)):
            yield epoch, i, batches[i]
        epoch, index = epoch + 1, 0
