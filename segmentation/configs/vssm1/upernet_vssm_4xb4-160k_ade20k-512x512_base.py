# UperNet 160k with VMamba-B. Reported mIoU SS/MS 51.0/51.6;
# release file upernet_vssm_4xb4-160k_ade20k-512x512_base_iter_160000.pth.
_base_ = ['./upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py']

model = dict(
    backbone={{_base_.vmamba_base}},
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
