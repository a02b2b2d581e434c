"""Surface metrics: Protocol B SacreBLEU and ROUGE-L, METEOR, exact match, distinct-n, length.

Every function takes hypotheses and references that have *already* been period-stripped
(:func:`lm_lexicon.metrics.bleu.strip_periods`; :func:`lm_lexicon.metrics.compute.compute_metrics` does it) and
returns ``(per_item_values, settings)`` -- values on a 0-100 scale except lengths (tokens) -- or raises
:class:`MetricUnavailable` with the reason when a dependency is missing. References are each line's own references
(Protocol B is per instance); only Protocol A groups references by headword.
"""
from __future__ import annotations

import io
import re
import warnings
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from lm_lexicon.metrics.bleu import tokenize_a


class MetricUnavailable(RuntimeError):
    """A metric that cannot be computed here (missing package, model not available offline, too few items...).

    :func:`~lm_lexicon.metrics.compute.compute_metrics` reports it as skipped with this message, never as 0.
    """


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # pragma: no cover - metadata missing
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# Protocol B: SacreBLEU sentence BLEU
# ----------------------------------------------------------------------------------------------------------------

def sacrebleu_sentence(hyps: Sequence[str], refs: Sequence[Sequence[str]], tokenize: str = "13a",
                       smooth_method: str = "exp", lowercase: bool = False) -> tuple[list[float], dict]:
    """SacreBLEU ``sentence_score`` per line (effective order on, the sacrebleu default for sentences)."""
    try:
        from sacrebleu.metrics import BLEU
    except ImportError as e:
        raise MetricUnavailable(f"sacrebleu is not installed ({e})") from e
    bleu = BLEU(tokenize=tokenize, smooth_method=smooth_method, lowercase=lowercase, effective_order=True)
    scores = [float(bleu.sentence_score(h, list(r)).score) for h, r in zip(hyps, refs)]
    settings = {"implementation": f"sacrebleu {_version('sacrebleu')} BLEU.sentence_score",
                "signature": f"case:{'lc' if lowercase else 'mixed'}|eff:yes|tok:{tokenize}|smooth:{smooth_method}",
                "references": "the line's own references (Protocol B)"}
    return scores, settings


# ----------------------------------------------------------------------------------------------------------------
# ROUGE-L
# ----------------------------------------------------------------------------------------------------------------

class UnicodeRougeTokenizer:
    """Lower-cased ``\\w+`` runs (Unicode-aware). rouge-score's default tokenizer keeps only ``[a-z0-9]``, which
    deletes accented letters and every non-Latin script, so it is only right for English."""

    name = "unicode: lowercase, \\w+ runs (Unicode), no stemming"

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


DEFAULT_ROUGE_TOKENIZER = "rouge-score default: lowercase, non-[a-z0-9] -> space, whitespace split"


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]], tokenizer: str = "default",
            use_stemmer: bool = False) -> tuple[list[float], dict]:
    """ROUGE-L F-measure per line with rouge-score; several references: the best F (``score_multi``).

    ``tokenizer``: ``"default"`` (rouge-score's own, English only) or ``"unicode"`` (:class:`UnicodeRougeTokenizer`).
    """
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise MetricUnavailable(f"rouge-score is not installed ({e})") from e
    if tokenizer not in ("default", "unicode"):
        raise ValueError(f"rouge tokenizer must be 'default' or 'unicode', got {tokenizer!r}")
    tok = UnicodeRougeTokenizer() if tokenizer == "unicode" else None
    if tok is not None and use_stemmer:
        raise ValueError("the Porter stemmer only applies to rouge-score's default (English) tokenizer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer, tokenizer=tok)
    scores = [100.0 * float(scorer.score_multi(list(r), h)["rougeL"].fmeasure) for h, r in zip(hyps, refs)]
    settings = {"implementation": f"rouge-score {_version('rouge-score')} rougeL F-measure (score_multi: best reference)",
                "tokenizer": tok.name if tok is not None else DEFAULT_ROUGE_TOKENIZER,
                "stemmer": "porter (words > 3 chars)" if use_stemmer else "none",
                "references": "the line's own references"}
    return scores, settings


# ----------------------------------------------------------------------------------------------------------------
# METEOR (nltk) and where its WordNet comes from
# ----------------------------------------------------------------------------------------------------------------

#: WordNet 3.0 ``lexnames`` (Debian's wordnet-base does not ship the file; nltk's reader needs it to parse synsets).
WORDNET_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl").split()
_LEXNAME_POS = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}

#: nltk's morphy detachment rules (used by :class:`EmbeddedSynonyms`, which has no ``*.exc`` files).
_MORPHY_RULES = {
    "n": [("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y")],
    "v": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")],
    "a": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
    "r": [],
}


class _Lemma:
    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def name(self) -> str:
        return self._name


class _Synset:
    __slots__ = ("_lemmas",)

    def __init__(self, names: Sequence[str]):
        self._lemmas = [_Lemma(n) for n in names]

    def lemmas(self) -> list[_Lemma]:
        return self._lemmas


class NoSynonyms:
    """A WordNet stand-in with no synsets: METEOR then matches exact words and Porter stems only."""

    def synsets(self, word: str) -> list:
        return []


class EmbeddedSynonyms:
    """Synonym sets from the packaged WordNet definition-modeling corpus (no WordNet files needed).

    Lemmas that share a synset (``sense_id = lemma%<pos><offset>``) are synonyms. Partial by construction: only
    synsets with a quoted example that contains the lemma are in the corpus (about 33k of WordNet's 118k synsets),
    and lookup uses nltk's morphy detachment rules without the irregular-form exception lists. Multi-word lemmas get
    ``_`` for spaces, as in WordNet, so METEOR ignores them the same way.
    """

    def __init__(self, records=None):
        if records is None:
            from lm_lexicon.data.wordnet import load_packaged_corpus

            records = load_packaged_corpus()
        members: dict[str, set[str]] = defaultdict(set)
        for r in records:
            sid = r.sense_id or ""
            if "%" not in sid:
                continue
            members[sid.rsplit("%", 1)[1]].add(r.term.lower().replace(" ", "_"))
        self._synsets = {k: _Synset(sorted(v)) for k, v in members.items()}
        index: dict[tuple[str, str], list[str]] = defaultdict(list)
        for key, names in members.items():
            pos = "a" if key[0] in "as" else key[0]
            for name in names:
                index[(name, pos)].append(key)
        self._index = dict(index)
        self.n_synsets = len(self._synsets)

    def synsets(self, word: str) -> list[_Synset]:
        word = word.lower().replace(" ", "_")
        out: list[_Synset] = []
        seen: set[str] = set()
        for pos, rules in _MORPHY_RULES.items():
            forms = [word] + [word[: -len(old)] + new for old, new in rules if word.endswith(old) and len(word) > len(old)]
            for form in forms:
                for key in self._index.get((form, pos), ()):
                    if key not in seen:
                        seen.add(key)
                        out.append(self._synsets[key])
        return out


def _nltk_reader_for_dir(path: Path):
    """An nltk ``WordNetCorpusReader`` over a plain WordNet dict directory (e.g. Debian's /usr/share/wordnet).

    Two things stand between nltk and such a directory: nltk's path sentinel only reads below ``nltk.data.path``
    (so the directory is appended to it), and Debian omits the ``lexnames`` file (served from
    :data:`WORDNET_LEXNAMES` when absent). nltk's attempt to map the directory onto its own ``wordnet`` data (for
    the multilingual OMW functions, which METEOR does not use) is turned off.
    """
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    path = path.resolve()
    if str(path) not in [str(p) for p in nltk.data.path]:
        nltk.data.path.append(str(path))
    has_lexnames = (path / "lexnames").is_file()

    class _DictDirReader(WordNetCorpusReader):
        def open(self, fileid):  # noqa: A003 - nltk's name
            if fileid == "lexnames" and not has_lexnames:
                text = "".join(f"{i:02d}\t{name}\t{_LEXNAME_POS[name.split('.')[0]]}\n"
                               for i, name in enumerate(WORDNET_LEXNAMES))
                return io.StringIO(text)
            return super().open(fileid)

        def map_wn(self, version="wordnet"):
            # nltk maps a non-default WordNet onto its own "wordnet" data (for OMW) and compares the version
            # number with the string "wordnet", so it always tries: there is no such data here and no OMW use.
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": no OMW, not needed here
        reader = _DictDirReader(nltk.data.FileSystemPathPointer(str(path)), None)
    reader.synsets("dog")  # fail now, not in the middle of scoring
    return reader


@lru_cache(maxsize=8)
def resolve_meteor_wordnet(mode: str = "auto", wordnet_dir: str | None = None):
    """Pick METEOR's synonym source; returns ``(wordnet_like, description)``. Never downloads.

    ``mode``: ``"auto"`` tries, in order, an explicit ``wordnet_dir``, nltk's own installed WordNet data
    (``nltk.data.find``, no download), a WordNet dict directory found on the machine (``/usr/share/wordnet`` ...,
    see :func:`lm_lexicon.data.wordnet.find_wordnet_dir`), then the packaged corpus (:class:`EmbeddedSynonyms`);
    ``"dir"`` requires a dict directory, ``"nltk"`` nltk's data, ``"embedded"`` the packaged corpus, ``"none"``
    exact + stem matching only.
    """
    if mode not in ("auto", "dir", "nltk", "embedded", "none"):
        raise ValueError(f"meteor wordnet mode must be auto|dir|nltk|embedded|none, got {mode!r}")
    errors: list[str] = []
    if mode == "none":
        return NoSynonyms(), "none: exact + Porter-stem matching only (synonym stage off)"
    if mode in ("auto", "dir") and wordnet_dir:
        try:
            from lm_lexicon.data.wordnet import find_wordnet_dir

            d = find_wordnet_dir(wordnet_dir)
            return _nltk_reader_for_dir(Path(d)), f"wordnet-dir: nltk WordNetCorpusReader over {d}"
        except Exception as e:  # noqa: BLE001 - reported, then the next source is tried
            errors.append(f"wordnet_dir {wordnet_dir}: {e}")
            if mode == "dir":
                raise MetricUnavailable(f"METEOR: WordNet dir unusable: {e}") from e
    if mode in ("auto", "nltk"):
        try:
            import nltk.data

            for res in ("corpora/wordnet", "corpora/wordnet.zip"):
                try:
                    nltk.data.find(res)
                except LookupError:
                    continue
                from nltk.corpus import wordnet as nltk_wn

                nltk_wn.synsets("dog")
                return nltk_wn, f"nltk-data: nltk.corpus.wordnet ({res}, WordNet {nltk_wn.get_version()})"
            errors.append("nltk has no WordNet data installed")
        except Exception as e:  # noqa: BLE001
            errors.append(f"nltk wordnet: {e}")
        if mode == "nltk":
            raise MetricUnavailable("METEOR: " + "; ".join(errors))
    if mode in ("auto", "dir") and not wordnet_dir:
        try:
            from lm_lexicon.data.wordnet import find_wordnet_dir

            d = find_wordnet_dir()
            return _nltk_reader_for_dir(Path(d)), f"wordnet-dir: nltk WordNetCorpusReader over {d}"
        except Exception as e:  # noqa: BLE001
            errors.append(f"wordnet dir: {str(e).splitlines()[0]}")
            if mode == "dir":
                raise MetricUnavailable(f"METEOR: no WordNet dict directory: {e}") from e
    try:
        syn = EmbeddedSynonyms()
        return syn, (f"embedded: synonym sets of the packaged WordNet corpus ({syn.n_synsets} synsets, partial; "
                     "morphy rules without exception lists)")
    except Exception as e:  # noqa: BLE001
        errors.append(f"embedded corpus: {e}")
    if mode == "embedded":
        raise MetricUnavailable("METEOR: " + "; ".join(errors))
    return NoSynonyms(), "none: exact + Porter-stem matching only (no WordNet found: " + "; ".join(errors) + ")"


_METEOR_TOKEN = re.compile(r"\w+|[^\w\s]")


def meteor_tokenize(text: str) -> list[str]:
    """METEOR tokens: ``\\w+`` runs and single punctuation marks (nltk's word_tokenize needs punkt data)."""
    return _METEOR_TOKEN.findall(text)


def meteor(hyps: Sequence[str], refs: Sequence[Sequence[str]], wordnet: str = "auto",
           wordnet_dir: str | None = None, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> tuple[list[float], dict]:
    """nltk METEOR per line (best over the line's references), x100.

    As implemented by nltk, the synonym stage runs after the stem stage on the *stemmed* leftovers, so a synonym
    counts only where the reference word is its own Porter stem ("big"/"great" match, "big"/"large" do not, since
    "large" was stemmed to "larg").
    """
    try:
        from nltk.stem.porter import PorterStemmer
        from nltk.translate.meteor_score import meteor_score
    except ImportError as e:
        raise MetricUnavailable(f"nltk is not installed ({e})") from e
    wn, source = resolve_meteor_wordnet(wordnet, wordnet_dir)
    stemmer = PorterStemmer()
    scores = []
    for h, rs in zip(hyps, refs):
        ht = meteor_tokenize(h)
        rts = [meteor_tokenize(r) for r in rs]
        scores.append(100.0 * float(meteor_score(rts, ht, stemmer=stemmer, wordnet=wn, alpha=alpha, beta=beta,
                                                 gamma=gamma)))
    settings = {"implementation": f"nltk {_version('nltk')} meteor_score (best reference)",
                "tokenizer": "regex \\w+|[^\\w\\s]; lowercased by nltk (preprocess=str.lower)",
                "stages": "exact, porter stem, wordnet synonyms", "wordnet": source,
                "alpha": alpha, "beta": beta, "gamma": gamma, "references": "the line's own references"}
    return scores, settings


# ----------------------------------------------------------------------------------------------------------------
# Exact match, distinct-n, length
# ----------------------------------------------------------------------------------------------------------------

def _normalize(text: str, lowercase: bool) -> str:
    text = " ".join(text.split())
    return text.lower() if lowercase else text


def exact_match(hyps: Sequence[str], refs: Sequence[Sequence[str]], lowercase: bool = False) -> tuple[list[float], dict]:
    """100 when the prediction equals one of the line's references (whitespace collapsed), else 0."""
    scores = []
    for h, rs in zip(hyps, refs):
        nh = _normalize(h, lowercase)
        scores.append(100.0 if nh and any(nh == _normalize(r, lowercase) for r in rs) else 0.0)
    settings = {"normalization": "periods stripped, whitespace collapsed" + (", lowercased" if lowercase else
                                                                                ", case-sensitive"),
                "empty prediction": "never a match", "references": "the line's own references"}
    return scores, settings


def distinct_n(hyps: Sequence[str], n: int) -> tuple[float, dict]:
    """Corpus distinct-n (Li et al. 2016): distinct n-grams / all n-grams over all predictions, x100."""
    grams: Counter = Counter()
    for h in hyps:
        toks = tokenize_a(h)
        for i in range(len(toks) - n + 1):
            grams[tuple(toks[i:i + n])] += 1
    total = sum(grams.values())
    settings = {"n": n, "tokens": "whitespace, case-sensitive (Protocol A tokens)", "scope": "corpus-level",
                "ngrams_total": total, "ngrams_distinct": len(grams)}
    if total == 0:
        raise MetricUnavailable(f"distinct-{n}: the predictions contain no {n}-gram")
    return 100.0 * len(grams) / total, settings


def lengths(texts: Sequence[str]) -> list[int]:
    """Whitespace token counts (Protocol A tokens)."""
    return [len(tokenize_a(t)) for t in texts]
