"""Framework integrations. Importing this package arranges for ``attn_implementation="triton"`` to be
registered with transformers whenever transformers' attention and mask interfaces are imported,
before or after us, without importing transformers itself; see ``integrations/transformers.py``."""
from .transformers import register_when_imported

register_when_imported()
