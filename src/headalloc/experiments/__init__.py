"""Registered experiments. Importing this package registers every built-in experiment."""

from headalloc.experiments import saturation, synthetic, theory  # noqa: F401
