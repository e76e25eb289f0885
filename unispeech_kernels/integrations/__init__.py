"""Framework integrations. Importing this package registers ``attn_implementation="triton"`` with
transformers when it is installed (a no-op otherwise); see ``integrations/transformers.py``."""
from .transformers import register_transformers_attention

register_transformers_attention()
