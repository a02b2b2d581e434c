"""Baselines (constant, retrieval) and ICL exemplar selection, on small hand-made data."""
import hashlib
import re

import numpy as np
import pytest

from lm_lexicon.evaluate.baselines import (ConstantBaseline, RetrievalBaseline, build_icl_prompts,
                                           format_few_shot_prompt, select_icl_exemplars)
from lm_lexicon.data.prompts import record_prompt
from lm_lexicon.data.records import Record


def R(term, definition, context="", split="train", lang="en"):
    return Record(term=term, context=context, definition=definition, source="toy", lang=lang, split=split)


def Q(term, context="", lang="en"):
    """A test-split query (its definition is unknown to the baselines)."""
    return Record(term=term, context=context, definition="?", source="query", lang=lang, split="test")


class BagOfWordsEmbedder:
    """Deterministic stand-in for the MiniLM embedder: hashed bag of lower-cased words, unit vectors."""

    dim = 64
    model_id = "bag-of-words"

    def __init__(self):
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


TRAIN = [R("ocean", "a large body of salt water", "they sailed across the ocean"),
         R("sea", "a division of an ocean", "the sea was calm"),
         R("marine", "of or relating to the sea", "marine life"),
         R("nautical", "of or relating to ships or sailing", "nautical miles"),
         R("lunar", "of or relating to the moon", "a lunar eclipse"),
         R("teacher", "a person whose occupation is teaching", "the teacher explained the lesson"),
         R("runner", "a person who runs", "the runner crossed the finish line"),
         R("baker", "a person who bakes bread", "the baker sold bread")]


# --------------------------------------------------------------------------------------------------------------
# Constant
# --------------------------------------------------------------------------------------------------------------

def test_constant_frequency_is_the_most_frequent_first_words_prefix():
    cb = ConstantBaseline(strategy="frequency").fit(TRAIN)
    assert cb.prediction == "of or relating"  # 3 of 8 definitions start with it; "a person who" only 2
    assert cb.report["count"] == 3
    assert cb.predict(TRAIN[:3]) == ["of or relating"] * 3
    assert ConstantBaseline(strategy="frequency", fixed_words=2).fit(TRAIN).prediction in ("of or", "a person")


def test_constant_bleu_picks_the_candidate_with_the_best_train_protocol_a_score():
    cb = ConstantBaseline(strategy="bleu", max_words=5, top_per_length=3, sample_size=100).fit(TRAIN)
    cands = cb.report["candidates"]
    assert cands == sorted(cands, key=lambda d: -d["train_bleu_a"])
    assert cb.prediction == cands[0]["prefix"]
    # every candidate is a real prefix of a training definition, with its count
    for c in cands:
        words = c["prefix"].split()
        assert sum(r.definition.split()[:len(words)] == words for r in TRAIN) == c["count"]
    # hand check of one score: "of or relating to the" vs the 5 single-reference headwords (sample = all rows)
    from lm_lexicon.metrics import sentence_bleu_a

    five = next(c for c in cands if c["prefix"] == "of or relating to the")
    expected = 100 * np.mean([sentence_bleu_a("of or relating to the", [r.definition]) for r in TRAIN])
    assert five["train_bleu_a"] == pytest.approx(expected)
    again = ConstantBaseline(strategy="bleu", max_words=5, top_per_length=3, sample_size=100).fit(TRAIN)
    assert again.prediction == cb.prediction  # deterministic


def test_constant_errors():
    with pytest.raises(RuntimeError):
        ConstantBaseline().predict(TRAIN)
    with pytest.raises(ValueError):
        ConstantBaseline(strategy="longest")
    with pytest.raises(ValueError):
        ConstantBaseline().fit([])


# --------------------------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------------------------

def test_retrieval_copies_the_definition_of_the_nearest_training_prompt():
    emb = BagOfWordsEmbedder()
    rb = RetrievalBaseline().fit(TRAIN, emb)
    queries = [Q("ocean", "they sailed across the ocean"),  # identical prompt -> itself
               {"term": "baker", "context": "the baker sold bread", "definition": "?", "source": "q", "split": "test"}]
    assert rb.predict(queries) == ["a large body of salt water", "a person who bakes bread"]
    scores, idx = rb.search(queries, k=3)
    assert scores.shape == (2, 3) and idx[0, 0] == 0
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def test_retrieval_with_precomputed_embeddings_matches_the_embedder():
    emb = BagOfWordsEmbedder()
    pre = emb.encode([record_prompt(r) for r in TRAIN]) * 3.0  # not unit: fit normalises
    rb = RetrievalBaseline().fit(TRAIN, embeddings=pre)
    q = [Q("sea", "the sea was calm")]
    assert rb.predict(q, embeddings=emb.encode([record_prompt(q[0])])) == ["a division of an ocean"]
    with pytest.raises(ValueError):
        rb.predict(q)  # no embedder to embed the queries
    with pytest.raises(ValueError):
        RetrievalBaseline().fit(TRAIN, embeddings=pre[:3])


def test_retrieval_with_the_bundled_minilm():
    import torch

    torch.set_num_threads(1)
    from lm_lexicon.partition.embed import Embedder

    rb = RetrievalBaseline().fit(TRAIN, Embedder(num_threads=1))
    pred = rb.predict([Q("pastry chef", "the pastry chef baked bread and cakes"),
                       Q("solar", "a solar eclipse")])
    assert pred[0] == "a person who bakes bread"
    assert pred[1] == "of or relating to the moon"


# --------------------------------------------------------------------------------------------------------------
# ICL exemplars
# --------------------------------------------------------------------------------------------------------------

def test_random_icl_is_seeded_per_query_and_excludes_the_query_term():
    pool = TRAIN + [R("Sea", "a large expanse of water", "the Sea of Japan")]
    queries = [Q("sea", "by the sea"), Q("moon", "the moon rose")]
    a = select_icl_exemplars(queries, pool, k=3, method="random", seed=1)
    assert [len(x) for x in a] == [3, 3]
    assert all(e.term.lower() != "sea" for e in a[0])
    assert a == select_icl_exemplars(queries, pool, k=3, method="random", seed=1)
    # a query's exemplars do not depend on the queries after it
    assert select_icl_exemplars(queries[:1], pool, k=3, method="random", seed=1)[0] == a[0]
    seeds = {tuple(e.term for e in select_icl_exemplars(queries, pool, k=3, seed=s)[1]) for s in range(6)}
    assert len(seeds) > 1
    # asking for more than the eligible pool returns the whole eligible pool
    everything = select_icl_exemplars(queries[:1], pool, k=50, method="random")[0]
    assert len(everything) == len(pool) - 2 and len({id(e) for e in everything}) == len(everything)
    assert select_icl_exemplars(queries, pool, k=0) == [[], []]


def test_retrieval_icl_returns_nearest_first_without_the_query_term():
    emb = BagOfWordsEmbedder()
    queries = [Q("marine", "marine life"), Q("chef", "the baker sold bread")]
    chosen = select_icl_exemplars(queries, TRAIN, k=2, method="retrieval", embedder=emb)
    assert all(e.term != "marine" for e in chosen[0])  # the identical-prompt record is excluded
    assert chosen[1][0].term == "baker"
    retriever = RetrievalBaseline().fit(TRAIN, emb)
    assert select_icl_exemplars(queries, None, k=2, method="retrieval", retriever=retriever) == chosen
    kept = select_icl_exemplars(queries[:1], TRAIN, k=1, method="retrieval", embedder=emb, exclude_same_term=False)
    assert kept[0][0].term == "marine"
    with pytest.raises(ValueError):
        select_icl_exemplars(queries, TRAIN, k=2, method="nearest")


def test_few_shot_prompt_format():
    q = Q("lake", "we swam in the lake")
    prompt = format_few_shot_prompt(q, [TRAIN[0], TRAIN[1]])
    assert prompt == ('"they sailed across the ocean" What is the definition of "ocean"? a large body of salt water'
                      '\n\n"the sea was calm" What is the definition of "sea"? a division of an ocean'
                      '\n\n"we swam in the lake" What is the definition of "lake"?')
    es = format_few_shot_prompt(R("perro", "", lang="es"), [R("gato", "mamífero felino", lang="es")], separator="\n")
    assert es == ("Define the Spanish word 'gato'. Use only Spanish to reply. mamífero felino\n"
                  "Define the Spanish word 'perro'. Use only Spanish to reply.")
    prompts = build_icl_prompts([q, q], TRAIN, k=2, method="random", seed=3)
    assert len(prompts) == 2 and prompts[0] == prompts[0]
    assert prompts[0].endswith('What is the definition of "lake"?') and prompts[0].count("\n\n") == 2


# ---------------------------------------------------------------------------------------------- chat prompting
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer():
    from lm_lexicon.seed_models import causal_bert_tokenizer

    tok = causal_bert_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_chat_prompt_puts_exemplars_in_earlier_turns(chat_tokenizer):
    from lm_lexicon.evaluate.baselines import chat_prompt

    query = Q("bank", "we sat on the bank")
    exemplars = [R("cat", "a small feline", "the cat slept"), R("run", "move fast")]
    assert chat_prompt(chat_tokenizer, query) == f"<user>{record_prompt(query)}</s><assistant>"
    assert chat_prompt(chat_tokenizer, query, exemplars) == (
        f"<user>{record_prompt(exemplars[0])}</s><assistant>a small feline</s>"
        f"<user>{record_prompt(exemplars[1])}</s><assistant>move fast</s>"
        f"<user>{record_prompt(query)}</s><assistant>")


def test_icl_chat_prompts_use_the_same_exemplars_as_plain_ones(chat_tokenizer):
    from lm_lexicon.evaluate.baselines import build_icl_chat_prompts

    pool = [R(f"w{i}", f"definition {i}", f"context {i}") for i in range(20)]
    queries = [Q("bank", "the bank"), Q("tree", "a tall tree")]
    plain = build_icl_prompts(queries, pool, k=3, method="random", seed=5)
    chat = build_icl_chat_prompts(chat_tokenizer, queries, pool, k=3, method="random", seed=5)
    for p, c in zip(plain, chat):
        used = re.findall(r"definition \d+", p)
        assert len(used) == 3 and re.findall(r"definition \d+", c) == used


def test_chat_prompt_needs_a_chat_template():
    from lm_lexicon.evaluate.baselines import chat_prompt
    from lm_lexicon.seed_models import causal_bert_tokenizer

    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt(causal_bert_tokenizer(), Q("bank"))


def test_seed_prompting_auto_plain_chat(tmp_path, chat_tokenizer):
    from lm_lexicon.config import EvalConfig
    from lm_lexicon.seed_models import causal_bert_tokenizer
    from lm_lexicon.evaluate.stage import seed_chat_tokenizer

    with_chat, without = tmp_path / "chat", tmp_path / "plain"
    chat_tokenizer.save_pretrained(str(with_chat))
    causal_bert_tokenizer().save_pretrained(str(without))
    assert seed_chat_tokenizer(EvalConfig(seed_prompting="auto"), with_chat).chat_template == CHAT_TEMPLATE
    assert seed_chat_tokenizer(EvalConfig(seed_prompting="plain"), with_chat) is None
    assert seed_chat_tokenizer(EvalConfig(seed_prompting="auto"), without) is None
    with pytest.raises(ValueError, match="no chat template"):
        seed_chat_tokenizer(EvalConfig(seed_prompting="chat"), without)
