# UperNet 160k with VMamba-S. Reported mIoU SS/MS 50.6/51.2;
# release file upernet_vssm_4xb4-160k_ade20k-512x512_small_iter_144000.pth.
_base_ = ['./upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py']

model = dict(backbone={{_base_.vmamba_small}})
