"""Registered experiments. Importing this package registers every built-in experiment."""

from headalloc.experiments import compression, lm_allocation, saturation, single_head, synthetic, theory  # noqa: F401
