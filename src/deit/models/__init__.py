"""Models: the DeiT / ViT transformer, its named variants, and timm models by name."""

from deit.models.pos_embed import resample_pos_embed
from deit.models.registry import VARIANTS, create_model, is_deit_model, list_models, load_weights
from deit.models.vit import EVAL_OUTPUTS, VisionTransformer, ViTConfig, fuse_heads

__all__ = [
    "EVAL_OUTPUTS",
    "VARIANTS",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "fuse_heads",
    "is_deit_model",
    "list_models",
    "load_weights",
    "resample_pos_embed",
]
