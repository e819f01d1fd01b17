# UperNet VMamba-T on the synthetic shapes of `python -m vmamba_mm.synthetic $VMAMBA_DEMO_DATA`
# (ADE20K layout and dataset class, 150-class head; images used at their generated size): a short
# from-scratch run that exercises training, IoUMetric evaluation and --tta without ADE20K.
# 300 iterations, evaluation every 100; warm-up shortened to 50 iterations, no pretrained backbone.
_base_ = ['../vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py']

data_root = '{{$VMAMBA_DEMO_DATA:data/vmamba_demo}}/ade/'

data_preprocessor = dict(size=None, size_divisor=32)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(pretrained=None))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=2,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

train_cfg = dict(max_iters=300, val_interval=100)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=50, end=300, by_epoch=False),
]
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=100))
