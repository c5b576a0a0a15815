"""Our Triton kernels, each with a plain PyTorch `reference.py` beside it.

The sources live in the repository's top-level `kernels/` folder and install as `hybridlm.kernels.gated_delta` and
`hybridlm.kernels.moe` (pyproject.toml's package-dir). That folder has no `__init__.py` on purpose: a process whose
`sys.path` holds the repository root (`python train.py`, `python -m pytest`) would otherwise import it as the
top-level `kernels`, shadowing Hugging Face's `kernels` package, which transformers >= 5.25 imports at start-up.
"""
