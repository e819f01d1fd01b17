# Mask R-CNN FPN 3x (36 epochs, steps 27/33) with multi-scale training (short side 480..800 step 32,
# long side 1333, or the DETR-style resize-crop-resize), VMamba-T.
# Reported: box AP 48.8, mask AP 43.7; release file mask_rcnn_vssm_fpn_coco_tiny_ms_3x_s_epoch_31.pth.
_base_ = [
    'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py',
    '../../../vmamba_mm/configs/vmamba.py',
]
custom_imports = dict(imports=['detection.models'], allow_failed_imports=False)

model = dict(
    backbone={{_base_.vmamba_tiny}},
    neck=dict(in_channels=[96, 192, 384, 768]))
optim_wrapper = dict(paramwise_cfg={{_base_.vmamba_paramwise_cfg}})
