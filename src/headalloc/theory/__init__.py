"""Theory: the error bound, the allocation solver, and softmax saturation."""

from headalloc.theory.bound import (
    Allocation,
    AllocationResult,
    BoundParts,
    allocate,
    dimension_term,
    error_bound,
    selection_term,
    tradeoff_curve,
)
from headalloc.theory.saturation import softmax_jacobian_norm

__all__ = [
    "Allocation",
    "AllocationResult",
    "BoundParts",
    "allocate",
    "dimension_term",
    "error_bound",
    "selection_term",
    "softmax_jacobian_norm",
    "tradeoff_curve",
]
