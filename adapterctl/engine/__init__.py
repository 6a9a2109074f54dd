"""Live models (torch, transformers): LoRA layers, injection and AdapterModel.

Only the library API and the `load`/`save` commands import this package; `--help`, `inspect`,
`select` and `convert` never do.
"""
