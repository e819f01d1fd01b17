# Mask R-CNN FPN 1x with VMamba-S. Reported: box AP 48.7, mask AP 43.7;
# release file mask_rcnn_vssm_fpn_coco_small_epoch_11.pth.
_base_ = ['./mask_rcnn_vssm_fpn_coco_tiny.py']

model = dict(backbone={{_base_.vmamba_small}})
