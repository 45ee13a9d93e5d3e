"""Model code: the ConvNeXt V2 family, masking, the sparse encoder, the decoder and the loss."""
from .convnextv2 import ConvNeXtV2
from .fcmae import FCMAE, create_fcmae
from .sparse_encoder import SparseConvNeXtV2Encoder
from .variants import VARIANTS, get_variant

__all__ = ["ConvNeXtV2", "FCMAE", "create_fcmae", "SparseConvNeXtV2Encoder", "VARIANTS", "get_variant"]
