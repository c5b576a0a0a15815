"""Parallelism beyond data parallelism: expert parallelism (MoE experts sharded over ranks, tokens dispatched by
all-to-all) and context parallelism. `config` holds the `parallel` section of the training config; `groups` builds
the process groups both use."""
