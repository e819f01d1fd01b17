# The synthetic UperNet demo with mmseg's Swin-T backbone instead of VMamba-T (same data,
# pipeline, schedule): the baseline of `benchmarks/gpu_check.sh mm`.
_base_ = ['./upernet_vssm_synthetic_tiny.py']

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
        drop_path_rate=0.3,
        patch_norm=True,
        use_abs_pos_embed=False,
        out_indices=(0, 1, 2, 3)))
