"""Register the compressed-model classes with transformers' Auto classes, so that in a process that
has imported headalloc `AutoModelForCausalLM.from_pretrained(folder)` loads a saved model without
`trust_remote_code` (elsewhere, the folder's own `modeling_headalloc.py` does it)."""

from transformers import AutoConfig, AutoModelForCausalLM

from headalloc.compression.modeling_headalloc import MODEL_TYPE, HeadallocConfig, HeadallocForCausalLM

AutoConfig.register(MODEL_TYPE, HeadallocConfig, exist_ok=True)
AutoModelForCausalLM.register(HeadallocConfig, HeadallocForCausalLM, exist_ok=True)
