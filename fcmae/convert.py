"""The converter's old import path (``fcmae.convert.to_dense`` and friends), kept so that user code
written against it keeps working; the converter lives in :mod:`fcmae.export.convert`."""
from .export.convert import (FORMATS, TIMM_CONV_MLP, canonical_to_format, canonical_to_timm,  # noqa: F401
                             dense_conv_to_me, dense_depthwise_to_me, detect_layout, expected_shapes, infer_shape,
                             me_conv_to_dense, me_depthwise_to_dense, to_canonical, to_dense, unwrap_state_dict,
                             variant_of)
from .storage.weights_file import CheckpointError, load_state_dict_file, save_state_dict  # noqa: F401
