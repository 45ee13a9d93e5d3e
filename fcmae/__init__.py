"""fcmae: FCMAE self-supervised pretraining of ConvNeXt V2 with a true sparse encoder."""
from .models import FCMAE, ConvNeXtV2, create_fcmae
from .models.variants import VARIANTS

__version__ = "0.1.0"


def list_models() -> list[str]:
    return [f"convnextv2_{k}" for k in VARIANTS]


__all__ = ["FCMAE", "ConvNeXtV2", "create_fcmae", "list_models", "__version__"]
