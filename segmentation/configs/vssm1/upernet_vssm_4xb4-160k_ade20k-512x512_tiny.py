# UperNet, ADE20K 512x512, 160k iterations (AdamW 6e-5, wd 0.01, warm-up 1500 then poly), VMamba-T.
# Reported mIoU SS/MS 47.9/48.8; release file upernet_vssm_4xb4-160k_ade20k-512x512_tiny_s_iter_160000.pth.
_base_ = [
    'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    '../../../vmamba_mm/configs/vmamba.py',
]
custom_imports = dict(imports=['segmentation.models'], allow_failed_imports=False)

model = dict(
    backbone={{_base_.vmamba_tiny}},
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
optim_wrapper = dict(paramwise_cfg={{_base_.vmamba_paramwise_cfg}})
