"""The evaluate stage's library: generation (:mod:`.generate`), the baselines (:mod:`.baselines`), Best-of-N with
its reward model (:mod:`.best_of_n`), the evaluated rows (:mod:`.rows`) and the HTML report (:mod:`.report_html`);
:mod:`.stage` runs it as a pipeline stage. The metrics and their statistics are :mod:`lm_lexicon.metrics`."""
