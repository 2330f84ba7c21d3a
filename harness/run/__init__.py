"""The run stage: which cells run where and when (scheduler, packing), one cell from fetch to
record (the cell runner), what is sampled meanwhile (telemetry), what the user sees (progress),
and the same over a Ray cluster."""
