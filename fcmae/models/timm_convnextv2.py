"""timm's ConvNeXt V2 with the stem of a model pretrained on 16- or 8-pixel patches (#50)."""
import torch


def timm_convnextv2(name: str, stem_stride: int = 4, **kwargs):
    """timm's ``name`` (``convnextv2_<size>``) with a stem of ``stem_stride`` (8 x it is the mask patch it was
    pretrained on). timm's ``patch_size`` is that stride, but at 2 timm also gives stage 0 a stride-2
    downsample (its rule: a stem of stride 2 is followed by one); ConvNeXt V2 at 16-pixel patches has none,
    so it is removed: the model then has exactly the encoder's layers and keys."""
    import timm
    model = timm.create_model(name, pretrained=False, patch_size=stem_stride, **kwargs)
    if stem_stride == 2:
        model.stages[0].downsample = torch.nn.Identity()
    return model


# how to build it by hand, for the export log and its refusals
TIMM_STEM_2 = ("timm.create_model('{name}', patch_size=2); model.stages[0].downsample = torch.nn.Identity() "
               "(timm adds a stride-2 downsample after a stem of stride 2; "
               "fcmae.models.timm_convnextv2.timm_convnextv2 does both)")
