"""Data stage: load the configured sources into {split}.jsonl files with a manifest of what was kept and rejected."""
from __future__ import annotations

from pathlib import Path

from lm_lexicon.artifacts import StageResult, fingerprint, run_stage


def run_data_stage(cfg, force: bool = False, log=print) -> StageResult:
    from lm_lexicon.data.corpus import corpus_stats, load_corpus, save_corpus

    def build(work: Path) -> dict:
        corpus = load_corpus(cfg.data)
        save_corpus(corpus, work, cfg.model_dump(mode="json"))
        for report in corpus.reports:
            log(f"[data] {report.summary()}")
        for split, sub in corpus.subsampled.items():
            log(f"[data] {split}: seeded sample of {sub['kept']:,} of {sub['available']:,} rows (seed {sub['seed']})")
        return {"rows": {s: len(r) for s, r in corpus.splits.items()},
                "rejected": {r.source: r.n_rejected for r in corpus.reports},
                "subsampled": corpus.subsampled,
                "stats": corpus_stats(corpus.splits)}

    return run_stage("data", Path(cfg.output_dir) / "data", fingerprint(cfg, ("data",)), build, cfg, force, log)
