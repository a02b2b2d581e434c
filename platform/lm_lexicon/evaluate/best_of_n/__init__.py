"""Best-of-N, in one place: the outcome reward model, its preference pairs, picks and curves (:mod:`.reward`); the
steps of the procedure (:mod:`.steps`: sampling, training the reward model, the language filter, reranking, the
per-metric analysis); the evaluate stage's run of it end to end (:mod:`.run`) and its section of the report
(:mod:`.report`)."""
