"""The command-line tools, each a thin layer over library calls: `main` (one experiment),
`grid` (a grid of them), `data` (look at / export a config's data), `inspect`, `ask` and
`report` (read run directories), `bench` (benchmarks); `cli` and `runtime` are their shared
plumbing. Each runs as `python -m kstore_jax.<tool>`: a shim at the package's top
(kstore_jax/<tool>.py; kstore_jax/data/__main__.py for `data`) calls the tool's `run()`.

Nothing below the tools imports them (tests/test_layers.py). Importing this package loads no
jax (`report` runs without it).
"""
