"""Models: grouped-head attention (heads of different sizes in one layer) and small models built from it."""

from headalloc.models.attention import (GroupedAttention, HeadGroup, as_groups, attention_flops_per_token,
                                        attention_params)
from headalloc.models.seqmodel import SeqModel, SeqModelConfig, load_seqmodel, save_seqmodel

__all__ = ["GroupedAttention", "HeadGroup", "SeqModel", "SeqModelConfig", "as_groups", "attention_flops_per_token",
           "attention_params", "load_seqmodel", "save_seqmodel"]
