"""One replica's inference engine: scheduler, hybrid cache, runner, sampler. No Ray here."""
