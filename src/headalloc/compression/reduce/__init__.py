"""Building the student from the teacher and a plan.

geometry  the teacher's attention shape (what plans and budgets count)
layer     one layer's reduced weights from its plan: rotary pairs, value-output SVD, latents, factorisations
linalg    whitened truncated SVDs (whole and block-diagonal) and their helpers
moments   the statistics a factorised output projection is fitted to
student   the student model (attention from the reduced layers, everything else the teacher's)
"""

from headalloc.compression.reduce.geometry import Geometry
from headalloc.compression.reduce.layer import (factor_projections, pair_importance, reduce_latent, reduce_layer,
                                                reduce_mla, value_output_svd)
from headalloc.compression.reduce.linalg import block_whitened_low_rank, low_rank_svd, whitened_low_rank
from headalloc.compression.reduce.moments import FactorInputs, factor_inputs, grad_moments, output_moments
from headalloc.compression.reduce.student import (attention_module, build_student, cast_parameters, compress_model,
                                                  identity_plan, student_specs)

__all__ = ["Geometry", "factor_projections", "pair_importance", "reduce_latent", "reduce_layer", "reduce_mla",
           "value_output_svd", "block_whitened_low_rank", "low_rank_svd", "whitened_low_rank", "FactorInputs",
           "factor_inputs", "grad_moments", "output_moments", "attention_module", "build_student", "cast_parameters",
           "compress_model", "identity_plan", "student_specs"]
