"""The plumbing: what every program needs and a reader of the method does not (user errors,
loading, the sampler, the run folder, config parsing, torchrun ranks, tracking)."""
