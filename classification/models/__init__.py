"""VMamba models: ``build_model(config)`` for the trainer and the timm-registered builders."""
from .checkpoint import load_pretrained, load_state_dict_from
from .vmamba import (
    FORWARD_TYPES,
    Backbone_VSSM,
    SS2D,
    VSSBlock,
    VSSM,
    vanilla_vmamba_base,
    vanilla_vmamba_small,
    vanilla_vmamba_tiny,
    vmamba_base_s1l20,
    vmamba_base_s2l15,
    vmamba_small_s1l20,
    vmamba_small_s2l15,
    vmamba_tiny_s1l8,
    vmamba_tiny_s2l5,
)

MODEL_TYPES = ("vssm", "timm")
BUILDERS = (
    "vmamba_tiny_s1l8", "vmamba_small_s2l15", "vmamba_base_s2l15", "vmamba_tiny_s2l5", "vmamba_small_s1l20",
    "vmamba_base_s1l20", "vanilla_vmamba_tiny", "vanilla_vmamba_small", "vanilla_vmamba_base",
)


def vssm_kwargs_from_config(config):
    """VSSM keyword arguments from the yacs config (MODEL.*, MODEL.VSSM.*, TRAIN.USE_CHECKPOINT)."""
    v = config.MODEL.VSSM
    return dict(
        patch_size=v.PATCH_SIZE,
        in_chans=v.IN_CHANS,
        num_classes=config.MODEL.NUM_CLASSES,
        depths=list(v.DEPTHS),
        dims=v.EMBED_DIM,
        ssm_d_state=v.SSM_D_STATE,
        ssm_ratio=v.SSM_RATIO,
        ssm_dt_rank=v.SSM_DT_RANK,
        ssm_act_layer=v.SSM_ACT_LAYER,
        ssm_conv=v.SSM_CONV,
        ssm_conv_bias=v.SSM_CONV_BIAS,
        ssm_drop_rate=v.SSM_DROP_RATE,
        ssm_init=v.SSM_INIT,
        forward_type=v.SSM_FORWARDTYPE,
        mlp_ratio=v.MLP_RATIO,
        mlp_act_layer=v.MLP_ACT_LAYER,
        mlp_drop_rate=v.MLP_DROP_RATE,
        gmlp=v.GMLP,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        patch_norm=v.PATCH_NORM,
        norm_layer=v.NORM_LAYER,
        downsample_version=v.DOWNSAMPLE,
        patchembed_version=v.PATCHEMBED,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT,
        posembed=v.POSEMBED,
    )


def build_model(config):
    """MODEL.TYPE "vssm": a VSSM from MODEL.VSSM.*; "timm": timm.create_model(MODEL.NAME, ...)."""
    model_type = config.MODEL.TYPE
    if model_type == "vssm":
        return VSSM(**vssm_kwargs_from_config(config))
    if model_type == "timm":
        import timm
        extra = dict(config.MODEL.TIMM_KWARGS)
        return timm.create_model(config.MODEL.NAME, pretrained=False, num_classes=config.MODEL.NUM_CLASSES,
                                 drop_path_rate=config.MODEL.DROP_PATH_RATE, **extra)
    raise ValueError(f"unknown MODEL.TYPE {model_type!r}; valid: {list(MODEL_TYPES)}")


__all__ = ["build_model", "vssm_kwargs_from_config", "VSSM", "Backbone_VSSM", "SS2D", "VSSBlock", "FORWARD_TYPES",
           "load_pretrained", "load_state_dict_from", "BUILDERS", *BUILDERS]
