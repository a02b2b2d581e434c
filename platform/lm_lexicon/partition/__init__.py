"""The partition stage's library: embed the prompts (:mod:`.embed`, or the lexical featurizer), split the training
rows into balanced semantic domains (:mod:`.clustering`), route new prompts to a domain (:mod:`.routing`) and
report on the split (:mod:`.cluster_report`). :mod:`.stage` runs it as a pipeline stage. Importing this package
imports nothing heavy."""
