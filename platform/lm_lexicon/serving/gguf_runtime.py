"""Define terms on the CPU with the GGUF bundle (:mod:`lm_lexicon.moe.gguf_bundle`) and llama-cpp-python.

:class:`GGUFDefiner` builds each item's prompt with the run's template, routes it with the bundled router (its
embedder, centroids and biases: the same domain the server would pick), and decodes greedily with the chosen domain's
GGUF file through llama-cpp-python -- the same decoding as the pipeline's greedy path
(:mod:`lm_lexicon.evaluate.generate`): argmax after the repetition penalty over prompt and output (``score / p`` if
positive else ``score * p``) and the no-repeat-n-gram rule on the output, stopping at EOS or after ``max_new_tokens``.
The token loop runs here, on the logits llama.cpp returns, so the rules are exactly the pipeline's rather than
llama.cpp's own samplers (whose repeat penalty looks at a window of the last 64 tokens by default).

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
    counted on the output only, as :mod:`lm_lexicon.evaluate.generate` does)."""
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
        self.llama_cpp = llama_cpp = import_llama_cpp()
        self.path = Path(path)
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=int(n_ctx), n_threads=n_threads,
                                   n_batch=min(512, int(n_ctx)), verbose=False, logits_all=False)
        self.add_bos = bool(add_bos)
        self.eos = int(self.llm.token_eos())
        self.n_vocab = int(self.llm.n_vocab())

    def tokenize(self, prompt: str) -> list[int]:
        """The prompt's tokens as training saw them: ``[BOS] prompt`` only if the tokenizer adds BOS; special-token
        text in a user's prompt stays text."""
        return list(self.llm.tokenize(prompt.encode("utf-8"), add_bos=self.add_bos, special=False))

    def logits_after(self, tokens: Sequence[int]) -> np.ndarray:
        """Next-token logits after evaluating ``tokens`` on top of the current context."""
        self.llm.eval(list(tokens))
        # read llama.cpp's buffer directly: llama-cpp-python (0.3.x) keeps Llama.scores only with logits_all=True
        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).astype(np.float32, copy=True)

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
            if len(out) < max_new_tokens:
                logits = self.logits_after([tok])
        return out

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace").strip()


class BatchDecoder:
    """Greedy decoding of several prompts at once in one llama.cpp context (one sequence id per prompt): each step
    decodes one token of every unfinished sequence in a single ``llama_decode`` call, as llama.cpp's server batches
    requests. Built on llama.cpp's C API as llama-cpp-python binds it (its ``Llama`` class decodes one sequence);
    same rules and results as :meth:`GGUFModel.greedy` up to float rounding (batched matmuls sum in another order).
    """

    def __init__(self, model: GGUFModel, max_batch: int = 16, n_ctx_per_seq: int = 256):
        lc = self.lc = model.llama_cpp
        self.model, self.max_batch, self.n_ctx_per_seq = model, int(max_batch), int(n_ctx_per_seq)
        params = lc.llama_context_default_params()
        params.n_ctx = self.max_batch * self.n_ctx_per_seq
        params.n_batch = params.n_ubatch = max(512, self.max_batch)
        params.n_seq_max = self.max_batch
        threads = model.llm.context_params.n_threads
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(model.llm.model, params)
        if self.ctx is None:
            raise RuntimeError(f"llama.cpp could not create a context for {self.max_batch} sequences")
        self.batch = lc.llama_batch_init(params.n_batch, 0, 1)
        self.capacity = int(params.n_batch)

    def close(self) -> None:
        if self.ctx is not None:
            self.lc.llama_batch_free(self.batch)
            self.lc.llama_free(self.ctx)
            self.ctx = None

    def __del__(self):
        self.close()

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """``entries``: (token, position, sequence id, wants logits), in chunks the batch holds."""
        for start in range(0, len(entries), self.capacity):
            chunk = entries[start:start + self.capacity]
            b = self.batch
            b.n_tokens = len(chunk)
            for i, (tok, pos, seq, logits) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
                b.seq_id[i][0] = seq
            if self.lc.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed (context full?)")
            for i, (_, _, seq, logits) in enumerate(chunk):
                if logits:
                    self._logits[seq] = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i),
                                                              shape=(self.model.n_vocab,)).astype(np.float32)

    def greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, repetition_penalty: float = 1.0,
               no_repeat_ngram_size: int = 0) -> list[list[int]]:
        """Greedy ids for every prompt (in order), ``max_batch`` prompts at a time."""
        out: list[list[int]] = []
        for start in range(0, len(prompts), self.max_batch):
            out += self._greedy_group([list(p)[-(self.n_ctx_per_seq - max_new_tokens):]
                                       for p in prompts[start:start + self.max_batch]],
                                      max_new_tokens, repetition_penalty, no_repeat_ngram_size)
        return out

    def _greedy_group(self, prompts, max_new_tokens, penalty, ngram) -> list[list[int]]:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        self._logits: dict[int, np.ndarray] = {}
        self._decode([(t, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, t in enumerate(p)])
        generated: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        for step in range(max_new_tokens):
            picks = {seq: int(np.argmax(processed_logits(self._logits[seq], prompts[seq], generated[seq], penalty,
                                                         ngram))) for seq in active}
            active = [seq for seq in active if picks[seq] != self.model.eos]
            for seq in active:
                generated[seq].append(picks[seq])
            if not active or step == max_new_tokens - 1:
                break
            self._decode([(picks[seq], len(prompts[seq]) + len(generated[seq]) - 1, seq, True) for seq in active])
        return generated


# =================================================================================================== the bundle
class GGUFDefiner:
    """Route and define with a GGUF bundle; ``define(items)`` has the shape of the server's ``/v1/definitions``."""

    def __init__(self, bundle_dir: str | Path, *, n_threads: Optional[int] = None, n_ctx: int = 1024,
                 generation: Optional[Mapping] = None, router=None, max_batch: int = 16):
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
        self._batchers: dict[int, BatchDecoder] = {}
        self.max_batch = int(max_batch)

    @property
    def router(self):
        if self._router is None:
            from lm_lexicon.partition.routing import DomainRouter

            if not self.manifest.get("router_dir"):
                raise ValueError(f"{self.bundle_dir}: the bundle has no router; give the domain explicitly")
            self._router = DomainRouter.load(self.bundle_dir / self.manifest["router_dir"], load_embedder=True)
        return self._router

    def close(self) -> None:
        """Free llama.cpp's contexts and models now (at interpreter exit llama-cpp-python's finalisers can fail
        noisily, its module globals already gone)."""
        for batcher in self._batchers.values():
            batcher.close()
        for m in self._models.values():
            m.llm.close()
        self._batchers, self._models = {}, {}

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
        route_ms = 1000 * (t_route - t0) / max(1, len(items))
        definitions: dict[int, str] = {}
        spent: dict[int, float] = {}
        for d in sorted(set(routed)):  # the rows of one domain decode together
            rows = [i for i, r in enumerate(routed) if r == d]
            t1 = time.perf_counter()
            for i, text in zip(rows, self._decode(int(d), [prompts[i] for i in rows])):
                definitions[i] = text
            for i in rows:
                spent[i] = 1000 * (time.perf_counter() - t1) / len(rows)
        return [{"term": it["term"], "lang": it.get("lang") or "en", "definition": definitions[i],
                 "domain": int(routed[i]), "score": None, "selection": "greedy", "candidates": None,
                 "timing_ms": {"route": round(route_ms, 1), "generate": round(spent[i], 1),
                               "total": round(route_ms + spent[i], 1)}} for i, it in enumerate(items)]

    def _decode(self, domain: int, prompts: list[str]) -> list[str]:
        g = self.generation
        rules = (int(g["max_new_tokens"]), float(g["repetition_penalty"]), int(g.get("no_repeat_ngram_size") or 0))
        m = self.model(domain)
        encoded = [m.tokenize(p) for p in prompts]
        if len(encoded) == 1:
            return [m.detokenize(m.greedy(encoded[0], *rules))]
        if domain not in self._batchers:
            self._batchers[domain] = BatchDecoder(m, max_batch=self.max_batch)
        return [m.detokenize(ids) for ids in self._batchers[domain].greedy(encoded, *rules)]


class LocalClient:
    """The GGUF backend behind the interface of :class:`lm_lexicon.serving.client.LexiconClient` (``define``,
    ``define_one``): items are validated as the server validates them (a bad row is a 422 naming it), so
    ``lm-lexicon define`` and :func:`lm_lexicon.serving.client.define_file` work unchanged (a file's rows arrive in
    chunks of ``--batch-size``; the rows of a chunk that share a domain are decoded together)."""

    def __init__(self, definer: GGUFDefiner, domain: Optional[int] = None):
        self.definer = definer
        self.domain = domain

    def __enter__(self) -> "LocalClient":
        return self

    def __exit__(self, *exc) -> None:
        self.definer.close()

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
