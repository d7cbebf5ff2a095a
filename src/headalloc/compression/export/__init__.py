"""Writing a compressed model where it will run.

folder  a Hugging Face folder (safetensors, the runtime's code, tokenizer, model card) that loads with plain
        transformers (`trust_remote_code=True`)
gguf    a GGUF file for llama.cpp (per-layer head counts, `deci`)
"""

from headalloc.compression.export.folder import AUTO_MAP, MARKER, check_output, model_card, save_compressed
from headalloc.compression.export.gguf import check_exportable, export_gguf, load_for_export

__all__ = ["AUTO_MAP", "MARKER", "check_output", "model_card", "save_compressed", "check_exportable", "export_gguf",
           "load_for_export"]
