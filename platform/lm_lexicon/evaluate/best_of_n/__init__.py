"""Best-of-N: the outcome reward model, picks and curves (:mod:`.reward`) and the procedure the evaluate stage runs
(:mod:`.steps`)."""
