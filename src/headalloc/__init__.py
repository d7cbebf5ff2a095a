"""headalloc: how a Transformer's attention heads and head dimensions are spread across layers.

Layout: `theory` (bound, allocation solver, softmax saturation), `models` (grouped-head attention
and models), `tasks` (synthetic tasks), `training` (trainer, sweeps), `assets` (packaged real
models and text), `probe` (attention capture, saturation), `compression` (head reduction, the
exported model format), `evaluation`, `experiments` (registered reproductions), `reports`
(figures, HTML), `cli`.

Importing headalloc registers the compressed-model classes with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` loads a model that `headalloc compress` saved.
"""

__version__ = "0.1.0"

try:  # registration needs transformers; the theory works without it
    import headalloc.compression.register  # noqa: F401
except ImportError:  # pragma: no cover
    pass


def __getattr__(name: str):
    """The Python API of `headalloc compress`, imported on first use: `headalloc.compress(...)`
    (see `headalloc.compression.pipeline.compress`) and its settings, `headalloc.CompressConfig`."""
    if name == "compress":
        from headalloc.compression.pipeline import compress

        return compress
    if name == "CompressConfig":
        from headalloc.compression.settings import CompressConfig

        return CompressConfig
    raise AttributeError(f"module 'headalloc' has no attribute {name!r}")
