"""Deep image clustering: pure PyTorch / numpy blocks. Never imports Ray (docs/DESIGN.md §2). The Python API is
`DeepClusterer` (clustering/estimator.py)."""


def __getattr__(name: str):
    # Lazy, so that `import clustering.config` (the CLI's first step) does not import torch.
    if name in ("DeepClusterer", "modularity_scorer", "modularity_x_evenness_scorer"):
        from . import estimator

        return getattr(estimator, name)
    raise AttributeError(name)
