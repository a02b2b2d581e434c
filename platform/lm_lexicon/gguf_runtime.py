"""Define terms on the CPU with the GGUF bundle (:mod:`lm_lexicon.moe.gguf_bundle`) and llama-cpp-python.

:class:`GGUFDefiner` builds each item's prompt with the run's template, routes it with the bundled router (its
embedder, centroids and biases: the same domain the server would pick), and decodes greedily with the chosen domain's
GGUF file through llama-cpp-python -- the same decoding as the pipeline's greedy path (:mod:`lm_lexicon.generate`):
argmax after the repetition penalty over prompt and output (``score / p`` if positive else ``score * p``) and the
no-repeat-n-gram rule on the output, stopping at EOS or after ``max_new_tokens``. The token loop runs here, on the
logits llama.cpp returns, so the rules are exactly the pipeline's rather than llama.cpp's own samplers (whose
repeat penalty looks at a window of the last 64 tokens by default).

llama-cpp-python is optional (``pip install 'lm-lexicon[gguf-runtime]'``); it is imported only here, and its
absence is a :class:`GGUFRuntimeUnavailable` that says how to install it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from lm_lexicon.moe.gguf_bundle import load_manifest

LLAMA_CPP_INSTALL = ("pip install 'lm-lexicon[gguf-runtime]'   # or: pip install 'llama-cpp-python>=0.3'\n"
                     "llama-cpp-python compiles llama.cpp from source (about 10-20 min on 2 cores; a C/C++ compiler "
                     "and cmake are needed). For a CPU build tuned to this machine:\n"
                     "CMAKE_ARGS='-DGGML_NATIVE=ON' pip install 'llama-cpp-python>=0.3'")


class GGUFRuntimeUnavailable(ImportError):
    """llama-cpp-python is not installed; the message says how to install it."""


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise GGUFRuntimeUnavailable(f"--backend gguf needs llama-cpp-python ({e}). Install it:\n"
                                     f"{LLAMA_CPP_INSTALL}") from None
    return llama_cpp


# =================================================================================================== decoding rules
def penalise_repeats(logits: np.ndarray, seen: Sequence[int], penalty: float) -> np.ndarray:
    """Hugging Face's repetition penalty: every token already in the sequence gets ``score / p`` (positive) or
    ``score * p`` (negative), once however often it occurs."""
    if penalty == 1.0 or not len(seen):
        return logits
    ids = np.unique(np.asarray(seen, dtype=np.int64))
    scores = logits[ids]
    logits[ids] = np.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def banned_by_ngrams(generated: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in ``generated`` (Hugging Face's no_repeat_ngram_size,
    counted on the output only, as :mod:`lm_lexicon.generate` does)."""
    if n <= 0 or len(generated) < n:
        return []
    prefix = tuple(generated[len(generated) - n + 1:]) if n > 1 else ()
    return [generated[i + n - 1] for i in range(len(generated) - n + 1)
            if tuple(generated[i:i + n - 1]) == prefix]


def processed_logits(logits: np.ndarray, prompt: Sequence[int], generated: Sequence[int], penalty: float,
                     no_repeat_ngram_size: int) -> np.ndarray:
    """The scores a greedy step picks its argmax from (a copy; ``logits`` is left as it is)."""
    scores = penalise_repeats(np.array(logits, dtype=np.float32), list(prompt) + list(generated), penalty)
    banned = banned_by_ngrams(list(generated), no_repeat_ngram_size)
    if banned:
        scores[banned] = -np.inf
    return scores


# =================================================================================================== one model
class GGUFModel:
    """One domain's GGUF file in llama-cpp-python, decoded token by token."""

    def __init__(self, path: str | Path, *, n_ctx: int = 1024, n_threads: Optional[int] = None,
                 add_bos: bool = False):
        llama_cpp = import_llama_cpp()
        self.path = Path(path)
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=int(n_ctx), n_threads=n_threads,
                                   n_batch=min(512, int(n_ctx)), verbose=False, logits_all=False)
        self.add_bos = bool(add_bos)
        self.eos = int(self.llm.token_eos())

    def tokenize(self, prompt: str) -> list[int]:
        """The prompt's tokens as training saw them: ``[BOS] prompt`` only if the tokenizer adds BOS; special-token
        text in a user's prompt stays text."""
        return list(self.llm.tokenize(prompt.encode("utf-8"), add_bos=self.add_bos, special=False))

    def logits_after(self, tokens: Sequence[int]) -> np.ndarray:
        """Next-token logits after evaluating ``tokens`` on top of the current context."""
        self.llm.eval(list(tokens))
        return np.asarray(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int, repetition_penalty: float = 1.0,
               no_repeat_ngram_size: int = 0, on_step: Optional[Callable[[tuple, np.ndarray], None]] = None
               ) -> list[int]:
        """Greedy token ids after ``prompt_ids`` (without the EOS), under the pipeline's decoding rules.
        ``on_step(generated prefix, scores)`` sees the scores of every step (the parity test compares them)."""
        budget = self.llm.n_ctx() - max_new_tokens
        prompt_ids = list(prompt_ids)[-budget:] if len(prompt_ids) > budget else list(prompt_ids)
        self.llm.reset()
        logits = self.logits_after(prompt_ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            scores = processed_logits(logits, prompt_ids, out, repetition_penalty, no_repeat_ngram_size)
            if on_step is not None:
                on_step(tuple(out), scores)
            tok = int(np.argmax(scores))
            if tok == self.eos:
                break
            out.append(tok)
            logits = self.logits_after([tok])
        return out

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace").strip()


# =================================================================================================== the bundle
class GGUFDefiner:
    """Route and define with a GGUF bundle; ``define(items)`` has the shape of the server's ``/v1/definitions``."""

    def __init__(self, bundle_dir: str | Path, *, n_threads: Optional[int] = None, n_ctx: int = 1024,
                 generation: Optional[Mapping] = None, router=None):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = load_manifest(self.bundle_dir)
        import_llama_cpp()  # fail before loading the router's embedder
        self.generation = {**self.manifest["generation"], **dict(generation or {})}
        self.files = {int(e["domain"]): self.bundle_dir / e["file"] for e in self.manifest["domains"]}
        missing = [str(p) for p in self.files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.bundle_dir}: missing GGUF files {missing}")
        self.n_threads, self.n_ctx = n_threads, n_ctx
        self._router = router
        self._models: dict[int, GGUFModel] = {}

    @property
    def router(self):
        if self._router is None:
            from lm_lexicon.routing import DomainRouter

            if not self.manifest.get("router_dir"):
                raise ValueError(f"{self.bundle_dir}: the bundle has no router; give the domain explicitly")
            self._router = DomainRouter.load(self.bundle_dir / self.manifest["router_dir"], load_embedder=True)
        return self._router

    def model(self, domain: int) -> GGUFModel:
        if domain not in self.files:
            raise ValueError(f"domain {domain} is not in the bundle (domains: {sorted(self.files)})")
        if domain not in self._models:
            self._models[domain] = GGUFModel(self.files[domain], n_ctx=self.n_ctx, n_threads=self.n_threads,
                                             add_bos=self.manifest.get("add_bos", False))
        return self._models[domain]

    def prompt(self, term: str, context: str = "", lang: str = "en") -> str:
        from lm_lexicon.data.prompts import format_prompt

        return format_prompt(term.strip(), (context or "").strip(), lang, templates=self.manifest["prompt"]["overrides"])

    def define(self, items: Sequence[Mapping], n: int = 1, return_scores: bool = False, seed: int = 0,
               domains: Optional[Sequence[int]] = None) -> list[dict]:
        """One result per item (term, context?, lang?), in order; ``domains`` skips the router."""
        if n != 1 or return_scores:
            raise ValueError("the GGUF backend decodes greedily without a reward model: n must be 1, no scores")
        t0 = time.perf_counter()
        prompts = [self.prompt(it["term"], it.get("context") or "", it.get("lang") or "en") for it in items]
        routed = list(domains) if domains is not None else [int(d) for d in self.router.route_prompts(prompts)]
        t_route = time.perf_counter()
        g = self.generation
        results = []
        for it, prompt, d in zip(items, prompts, routed):
            t1 = time.perf_counter()
            m = self.model(int(d))
            ids = m.greedy(m.tokenize(prompt), int(g["max_new_tokens"]), float(g["repetition_penalty"]),
                           int(g.get("no_repeat_ngram_size") or 0))
            results.append({"term": it["term"], "lang": it.get("lang") or "en", "definition": m.detokenize(ids),
                            "domain": int(d), "score": None, "selection": "greedy", "candidates": None,
                            "timing_ms": {"route": round(1000 * (t_route - t0) / max(1, len(items)), 1),
                                          "generate": round(1000 * (time.perf_counter() - t1), 1),
                                          "total": round(1000 * (time.perf_counter() - t1 + (t_route - t0)
                                                                 / max(1, len(items))), 1)}})
        return results


class LocalClient:
    """The GGUF backend behind the interface of :class:`lm_lexicon.serving.client.LexiconClient` (``define``,
    ``define_one``): items are validated as the server validates them (a bad row is a 422 naming it), so
    ``lm-lexicon define`` and :func:`lm_lexicon.serving.client.define_file` work unchanged, one row at a time."""

    def __init__(self, definer: GGUFDefiner, domain: Optional[int] = None):
        self.definer = definer
        self.domain = domain

    def __enter__(self) -> "LocalClient":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def define(self, items: Sequence[dict], n: int = 1, return_scores: bool = False, seed: int = 0) -> list[dict]:
        from lm_lexicon.serving.client import ApiClientError
        from lm_lexicon.serving.schemas import ApiError, Limits, parse_definitions_request

        try:
            req = parse_definitions_request({"items": list(items), "n": int(n), "return_scores": bool(return_scores),
                                             "seed": int(seed)}, Limits(max_items=max(1, len(items))))
        except ApiError as e:
            raise ApiClientError(e.status, e.code, e.message, e.details) from None
        rows = [it.model_dump() for it in req.items]
        domains = [self.domain] * len(rows) if self.domain is not None else None
        return self.definer.define(rows, n=n, return_scores=return_scores, seed=seed, domains=domains)

    def define_one(self, term: str, context: str = "", lang: str = "en", **kw) -> dict:
        return self.define([{"term": term, "context": context, "lang": lang}], **kw)[0]
