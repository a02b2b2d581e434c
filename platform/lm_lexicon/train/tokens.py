"""How a prompt/definition pair becomes training tokens, and a prompt generation tokens: one layout for both.

Sequence layout (the same for training and generation, see :func:`encode_prompt`)::

    [BOS] prompt-tokens  definition-tokens [EOS]   [PAD]...
    -100  -100 ...       = input ids ...    = eos  -100 ...      <- labels

* BOS is whatever the tokenizer itself puts before a text (Llama: ``<|begin_of_text|>``, the MiniLM decoder:
  ``[CLS]``, Qwen: nothing), so a plain batched ``tokenizer(prompts)`` + ``generate()`` sees what training saw.
* The definition is tokenised as it follows the prompt after one space (``prompt + " " + definition``), so byte-level
  BPE vocabularies see the leading-space word forms they will have to generate.
* Labels hold the input ids (Hugging Face convention); the shift happens in the loss
  (:func:`lm_lexicon.train.loss.definition_nll`): position ``i`` predicts token ``i + 1``.

Truncation (``max_length`` counts every token, BOS and EOS included): the definition keeps up to
``max(budget - prompt, budget // 4)`` tokens, where budget = ``max_length`` - BOS; the prompt gets the rest and is
truncated from the LEFT, because its tail (``... What is the definition of "term"?``) names the term and asks the
question, while the start of a long context is the least needed part. A definition cut short loses its EOS: the
model must not learn to stop mid-sentence.
"""
from __future__ import annotations

from typing import Optional

from lm_lexicon.data.prompts import record_prompt  # noqa: F401  (lm_lexicon.train.record_prompt too)

IGNORE_INDEX = -100


def bos_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer itself puts BEFORE a text (Llama: BOS; MiniLM decoder: [CLS]; Qwen: none).

    Taken from the tokenizer's own behaviour rather than from ``bos_token_id`` (GPT-2 has a BOS it never adds), so
    that training prefixes exactly what ``tokenizer(prompt)`` gives a batched ``generate()``. Suffixes a tokenizer
    appends (BERT's ``[SEP]``) are deliberately not copied: after a prompt comes the definition, not an end mark.
    """
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: the model could never learn where a definition ends")
    return int(tokenizer.eos_token_id)


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def split_prompt_definition(tokenizer, prompts: list[str], definitions: list[str]) -> tuple[list, list]:
    """Token ids of each prompt and of its definition as it follows the prompt after one space.

    The pair is tokenised jointly and split where the prompt's own tokens end; in the rare case a tokenizer merges
    across the boundary (so the joint tokens do not start with the prompt's), the definition is tokenised alone.
    """
    prompt_ids = _ids(tokenizer, prompts)
    joint_ids = _ids(tokenizer, [f"{p} {d}" for p, d in zip(prompts, definitions)])
    definition_ids = []
    for p, j, d in zip(prompt_ids, joint_ids, definitions):
        if j[:len(p)] == p:
            definition_ids.append(j[len(p):])
        else:
            definition_ids.append(_ids(tokenizer, [d])[0])
    return prompt_ids, definition_ids


def _truncate(prompt_ids: list[int], target_ids: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Fit prompt + target into ``budget`` tokens (policy in the module docstring)."""
    if len(prompt_ids) + len(target_ids) <= budget:
        return prompt_ids, target_ids
    target_keep = min(len(target_ids), max(budget - len(prompt_ids), budget // 4))
    prompt_keep = budget - target_keep
    return (prompt_ids[len(prompt_ids) - prompt_keep:] if prompt_keep > 0 else []), target_ids[:target_keep]


def assemble(bos: list[int], prompt_ids: list[int], definition_ids: list[int], eos: int, max_length: int) -> dict:
    """One example's ``{input_ids, attention_mask, labels}`` from its parts, truncated to ``max_length``."""
    budget = max_length - len(bos)
    if budget < 2:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt and a definition")
    prompt_ids, target = _truncate(prompt_ids, list(definition_ids) + [eos], budget)
    input_ids = bos + prompt_ids + target
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt_ids)) + target
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def encode_example(tokenizer, prompt: str, definition: str, max_length: int) -> dict:
    """``{input_ids, attention_mask, labels}`` (unpadded lists) for one prompt/definition pair.

    Labels are -100 on BOS and prompt tokens and equal the input ids on definition tokens and the final EOS, which
    is part of the loss so the model learns to stop. See the module docstring for the truncation policy.
    """
    prompt_ids, definition_ids = split_prompt_definition(tokenizer, [prompt], [definition])
    return assemble(bos_ids(tokenizer), prompt_ids[0], definition_ids[0], eos_id(tokenizer), max_length)


def encode_prompt(tokenizer, prompt: str, max_prompt_tokens: Optional[int] = None) -> list[int]:
    """The token ids a model is given at generation time: ``[BOS] + prompt``, left-truncated like in training.

    ``max_prompt_tokens`` counts BOS. Use this (or ``tokenizer(prompt)``, identical for the supported tokenizers
    when no truncation is needed) so that generation sees what training saw.
    """
    bos = bos_ids(tokenizer)
    ids = _ids(tokenizer, [prompt])[0]
    if max_prompt_tokens is not None:
        keep = max(0, max_prompt_tokens - len(bos))
        ids = ids[len(ids) - keep:] if keep else []
    return bos + ids
