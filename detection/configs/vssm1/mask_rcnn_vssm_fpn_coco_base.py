# Mask R-CNN FPN 1x with VMamba-B. Reported: box AP 49.2, mask AP 44.1;
# release file mask_rcnn_vssm_fpn_coco_base_epoch_11.pth.
_base_ = ['./mask_rcnn_vssm_fpn_coco_tiny.py']

model = dict(
    backbone={{_base_.vmamba_base}},
    neck=dict(in_channels=[128, 256, 512, 1024]))
