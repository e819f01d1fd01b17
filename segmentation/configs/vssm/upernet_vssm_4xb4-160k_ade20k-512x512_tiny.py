# UperNet 160k with Vanilla VMamba-T (v0). Reported mIoU SS/MS 47.3/48.3;
# release file vssmtiny_upernet_4xb4-160k_ade20k-512x512_iter_160000.pth.
_base_ = ['../vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py']

model = dict(backbone={{_base_.vmamba_v0_tiny}})
