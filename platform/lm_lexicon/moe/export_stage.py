"""Export stage: what the ecosystem loads without this project's code.

* ``collapsed/`` (domain routing): one plain dense checkpoint per domain (shared weights + that domain's expert FFN)
  plus ``router/`` and ``collapsed.json`` — the serving layout (one deployment per domain), loadable by transformers
  or vLLM as is.
* ``mixtral/`` (token routing, Llama/Mistral family): a ``MixtralForCausalLM`` checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

from lm_lexicon.artifacts import StageResult, fingerprint, run_stage


def export_model(moe_dir: Path, out_dir: Path, routing: str, log=print, final_dir: Path | None = None) -> dict:
    from lm_lexicon.moe import export_collapsed, export_mixtral

    written = {}
    if routing == "domain":
        export_collapsed(moe_dir, out_dir / "collapsed")
        written["collapsed"] = str(out_dir / "collapsed")
    elif routing == "token":
        try:
            export_mixtral(moe_dir, out_dir / "mixtral")
            written["mixtral"] = str(out_dir / "mixtral")
        except ValueError as e:  # e.g. a BERT-family seed: no Mixtral equivalent
            written["mixtral_skipped"] = str(e)
    else:
        written["skipped"] = f"no standard export for {routing!r} routing; load the MoE with lm_lexicon.moe.load"
    final = str(final_dir or out_dir)  # record and log where it will be once the stage is finished, not the work dir
    written = {k: v.replace(str(out_dir), final) if k in ("collapsed", "mixtral") else v for k, v in written.items()}
    for kind, path in written.items():
        log(f"[export] {kind}: {path}")
    (out_dir / "export.json").write_text(json.dumps({"routing": routing, **written}, indent=2))
    return written


def run_export_stage(cfg, merge_result: StageResult, force: bool = False, log=print) -> StageResult:
    fp = fingerprint(cfg, (), (merge_result.fingerprint,))
    return run_stage("export", Path(cfg.output_dir) / "export", fp,
                     lambda work: export_model(merge_result.path / "model", work, cfg.merge.routing, log,
                                               final_dir=Path(cfg.output_dir) / "export"),
                     cfg, force, log)


def gguf_metadata_source(cfg, metadata_from: Path | None = None) -> Path:
    """The GGUF whose tokenizer the run's GGUF files reuse: ``metadata_from`` if given, else the seed's own GGUF
    (``bundled-smollm2``); a seed that did not come from a GGUF needs ``metadata_from``."""
    from lm_lexicon.seed_models import SEED_SMOLLM2, smollm2_gguf_path

    if metadata_from is not None:
        if not Path(metadata_from).is_file():
            raise FileNotFoundError(f"--gguf-metadata {metadata_from}: no such file")
        return Path(metadata_from)
    if cfg.seed_model.name == SEED_SMOLLM2:
        return smollm2_gguf_path()
    raise ValueError(f"the seed {cfg.seed_model.name!r} did not come from a GGUF file, so there is no tokenizer "
                     "metadata to reuse: pass --gguf-metadata FILE.gguf (any GGUF of the same base model, any "
                     "quantisation; its vocabulary is checked against the experts' tokenizer)")


def export_gguf_files(cfg, export_dir: Path, *, dtype: str = "bf16", metadata_from: Path | None = None,
                      overwrite: bool = True, log=print) -> dict:
    """Write ``<export_dir>/gguf`` from the finished export stage's ``collapsed/`` (domain routing only), with the
    experts' prompt templates (saved with them) and greedy decoding settings (the evaluate section's, as served)."""
    from lm_lexicon.moe.gguf_bundle import export_gguf

    if cfg.merge.routing != "domain":
        raise ValueError(f"GGUF files are made per domain, from the collapsed export of a domain-routed run; this run "
                         f"routes by {cfg.merge.routing!r}")
    ev = cfg.evaluate
    generation = {"max_new_tokens": ev.max_new_tokens, "repetition_penalty": ev.repetition_penalty,
                  "no_repeat_ngram_size": ev.no_repeat_ngram_size}
    return export_gguf(Path(export_dir) / "collapsed", Path(export_dir) / "gguf",
                       metadata_source=gguf_metadata_source(cfg, metadata_from), dtype=dtype,
                       generation=generation, overwrite=overwrite, log=log)
