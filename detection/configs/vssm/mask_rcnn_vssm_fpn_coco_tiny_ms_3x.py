# Mask R-CNN FPN 3x multi-scale with Vanilla VMamba-T (v0). Reported: box AP 48.5, mask AP 43.2;
# release file vssmtiny_mask_rcnn_swin_fpn_coco_ms_3x_epoch_34.pth.
_base_ = ['../vssm1/mask_rcnn_vssm_fpn_coco_tiny_ms_3x.py']

model = dict(backbone={{_base_.vmamba_v0_tiny}})
