"""Export stage: what the ecosystem loads without this project's code.

* ``collapsed/`` (domain routing): one plain dense checkpoint per domain (shared weights + that domain's expert FFN)
  plus ``router/`` and ``collapsed.json`` — the serving layout (one deployment per domain), loadable by transformers
  or vLLM as is.
* ``mixtral/`` (token routing, Llama/Mistral family): a ``MixtralForCausalLM`` checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

from lm_lexicon.stages.artifacts import StageResult, fingerprint, run_stage


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
