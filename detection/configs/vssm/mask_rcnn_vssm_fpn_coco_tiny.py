# Mask R-CNN FPN 1x with Vanilla VMamba-T (v0). Reported: box AP 46.5, mask AP 42.1;
# release file vssmtiny_mask_rcnn_swin_fpn_coco_epoch_12.pth.
_base_ = ['../vssm1/mask_rcnn_vssm_fpn_coco_tiny.py']

model = dict(backbone={{_base_.vmamba_v0_tiny}})
