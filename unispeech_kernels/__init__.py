"""unispeech-kernels: fast kernels for UniSpeech and wav2vec2-family speech models."""
from .dispatch import BackendUnavailableError, resolve_backend
from .ops.attention import attention
from .ops.attention_packed import attention_packed
from .ops.feature_encoder import feature_encoder
from .ops.forced_align import forced_align
from .integrations.patching import patch_model, unpatch_model
from .integrations.transformers import register_transformers_attention
from .ops.pos_conv import fold_weight_norm, pos_conv_embed
from .ops.rel_pos_attention import RelativePositionBias, rel_pos_attention
from .weight_norm import clear_weight_caches

__version__ = "0.1.0"
__all__ = ["attention", "attention_packed", "rel_pos_attention", "RelativePositionBias", "feature_encoder",
           "forced_align", "pos_conv_embed", "fold_weight_norm",
           "clear_weight_caches", "patch_model", "unpatch_model", "register_transformers_attention",
           "BackendUnavailableError", "resolve_backend", "__version__"]
