"""deit: data-efficient image transformers, trained by distillation from a CNN teacher."""

from deit.models import create_model, list_models

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "list_models"]
