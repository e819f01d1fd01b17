# Mask R-CNN FPN 3x multi-scale with VMamba-S. Reported: box AP 49.9, mask AP 44.2;
# release file mask_rcnn_vssm_fpn_coco_small_ms_3x_epoch_32.pth.
_base_ = ['./mask_rcnn_vssm_fpn_coco_tiny_ms_3x.py']

model = dict(backbone={{_base_.vmamba_small}})
