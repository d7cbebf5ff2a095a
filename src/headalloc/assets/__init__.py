"""The real assets, offline: SmolLM2-135M-Instruct, all-MiniLM-L6-v2 and English Wikipedia text,
found inside installed registry packages (see docs/assets.md)."""

from headalloc.assets.corpus import Corpus, load_corpus, token_windows
from headalloc.assets.models import cache_dir, load_model, resolve_model

__all__ = ["Corpus", "cache_dir", "load_corpus", "load_model", "resolve_model", "token_windows"]
