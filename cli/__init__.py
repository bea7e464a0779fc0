"""The `taps` command line (CONTRACTS.md): `taps generate | serve | drafters | eval`, in cli.main.

It sits outside the core package `taps`, which stays pure PyTorch: `serve` and `drafters` reach
into `cluster` and `eval` into `eval`, each imported lazily, so `taps generate` stays a plain
in-process PyTorch run. `python -m cli ...` runs it without the console script."""
