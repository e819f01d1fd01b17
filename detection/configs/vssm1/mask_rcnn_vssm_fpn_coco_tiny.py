# Mask R-CNN FPN 1x (12 epochs, steps 8/11, AdamW 1e-4, wd 0.05, 2 img/GPU x 8) with VMamba-T.
# Reported: box AP 47.3, mask AP 42.7; release file mask_rcnn_vssm_fpn_coco_tiny_s_epoch_12.pth.
_base_ = [
    'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
    '../../../vmamba_mm/configs/vmamba.py',
]
custom_imports = dict(imports=['detection.models'], allow_failed_imports=False)

model = dict(
    backbone={{_base_.vmamba_tiny}},
    neck=dict(in_channels=[96, 192, 384, 768]))
optim_wrapper = dict(paramwise_cfg={{_base_.vmamba_paramwise_cfg}})
