"""Ray entry points: parse config, call clustering/, wire Ray Train / Tune / Data. Thin by design."""
