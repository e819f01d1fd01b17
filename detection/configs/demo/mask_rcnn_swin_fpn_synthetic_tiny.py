# The synthetic Mask R-CNN demo with mmdet's Swin-T backbone instead of VMamba-T (same data,
# pipeline, schedule): the baseline of `benchmarks/gpu_check.sh mm`.
_base_ = ['./mask_rcnn_vssm_fpn_synthetic_tiny.py']

model = dict(
    backbone=dict(
        _delete_=True,
        type='SwinTransformer',
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        drop_path_rate=0.2,
        patch_norm=True,
        out_indices=(0, 1, 2, 3)))
