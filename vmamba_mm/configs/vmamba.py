# Backbone arguments of the published VMamba models, as the authors' detection/configs/vssm1 and
# segmentation/configs/vssm1 files give them (and their classification yaml files named below);
# every detection and segmentation config inherits this file by relative path and picks one with
# `backbone={{_base_.vmamba_<size>}}`.
# `_delete_` drops the inherited Swin arguments (MM_VSSM rejects unknown keywords).
# `pretrained` is the authors' released classification checkpoint, looked up in $CKPT_DIR.
ckpt_dir = '{{$CKPT_DIR:ckpts}}'

vmamba_v2 = dict(
    _delete_=True,
    type='MM_VSSM',
    out_indices=(0, 1, 2, 3),
    ssm_d_state=1,
    ssm_dt_rank='auto',
    ssm_conv=3,
    ssm_conv_bias=False,
    forward_type='v05_noz',
    mlp_ratio=4.0,
    downsample_version='v3',
    patchembed_version='v2',
    norm_layer='ln2d')
# VMamba-T [s1l8] (classification/configs/vssm/vmambav2v_tiny_224.yaml)
vmamba_tiny = dict(
    vmamba_v2, dims=96, depths=(2, 2, 8, 2), ssm_ratio=1.0, drop_path_rate=0.2,
    pretrained=ckpt_dir + '/vssm1_tiny_0230s_ckpt_epoch_264.pth')
# VMamba-S [s2l15] (vmambav2_small_224.yaml)
vmamba_small = dict(
    vmamba_v2, dims=96, depths=(2, 2, 15, 2), ssm_ratio=2.0, drop_path_rate=0.3,
    pretrained=ckpt_dir + '/vssm_small_0229_ckpt_epoch_222.pth')
# VMamba-B [s2l15] (vmambav2_base_224.yaml)
vmamba_base = dict(
    vmamba_v2, dims=128, depths=(2, 2, 15, 2), ssm_ratio=2.0, drop_path_rate=0.6,
    pretrained=ckpt_dir + '/vssm_base_0229_ckpt_epoch_237.pth')
# Vanilla VMamba-T (vmambav0_tiny_224.yaml)
vmamba_v0_tiny = dict(
    _delete_=True,
    type='MM_VSSM',
    out_indices=(0, 1, 2, 3),
    dims=96,
    depths=(2, 2, 9, 2),
    ssm_d_state=16,
    ssm_ratio=2.0,
    ssm_dt_rank='auto',
    ssm_conv=3,
    ssm_conv_bias=True,
    forward_type='v0',
    mlp_ratio=0.0,
    downsample_version='v1',
    patchembed_version='v1',
    norm_layer='ln',
    drop_path_rate=0.2,
    pretrained=ckpt_dir + '/vssmtiny_dp01_ckpt_epoch_292.pth')

# AdamW without weight decay on normalisation layers (by type, whatever their name) and on the
# SSM parameters A_logs / Ds; the inherited Swin `custom_keys` ('norm', ...) stay.
vmamba_paramwise_cfg = dict(
    norm_decay_mult=0.0,
    custom_keys={
        '.A_logs': dict(decay_mult=0.0),
        '.Ds': dict(decay_mult=0.0),
    })
