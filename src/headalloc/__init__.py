"""headalloc: how a Transformer's attention heads and head dimensions should be spread across layers.

Layout: `theory` (bound, allocation solver, softmax saturation), `models` (grouped-head attention
and models), `tasks` (synthetic tasks), `training` (trainer, sweeps), `assets` (packaged real
models and text), `probe` (attention capture), `compression`, `evaluation`, `experiments`
(registered reproductions), `reports` (figures, HTML), `cli`.
"""

__version__ = "0.1.0"
