"""Registered experiments. Importing this package registers every built-in experiment."""

from headalloc.experiments import saturation, single_head, synthetic, theory  # noqa: F401
