"""Backbone_VSSM feature maps are where the image is: a localised input change moves each stage's
output at the matching cell (non-square input, so a transposed or flipped cross-merge would show),
train mode equals eval mode without drop path, and every parameter gets a gradient."""
import pytest
import torch

from classification.models import Backbone_VSSM

KWARGS = dict(dims=16, depths=(1, 1, 2, 1), ssm_d_state=1, ssm_ratio=1.0, forward_type='v05_noz',
              mlp_ratio=4.0, downsample_version='v3', patchembed_version='v2', drop_path_rate=0.0)
H, W = 96, 160  # strides 4..32 divide both; H != W


def build(norm_layer):
    torch.manual_seed(0)
    return Backbone_VSSM(norm_layer=norm_layer, **KWARGS)


@pytest.mark.parametrize('norm_layer', ['ln2d', 'ln'])
@pytest.mark.parametrize('row, col', [(8, 136), (72, 24)])
def test_localised_change_shows_at_its_cell_in_every_stage(norm_layer, row, col):
    model = build(norm_layer).eval()
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(1))
    x2 = x.clone()
    x2[:, :, row:row + 8, col:col + 8] += 3.0  # an 8x8 patch centred at (row + 4, col + 4)
    with torch.no_grad():
        outs, outs2 = model(x), model(x2)
    for i, (a, b) in enumerate(zip(outs, outs2)):
        stride = 4 * 2 ** i
        assert a.shape[-2:] == (H // stride, W // stride)
        change = (a - b).abs().sum(1)[0]
        # a cell the patch covers, or (the conv stem and downsamples, 3x3 stride 2 padding 1, centre
        # cell j at 2j of their input: up to half a cell before its nominal centre) the one after
        r, c = divmod(int(change.argmax()), change.shape[1])
        assert row // stride <= r <= (row + 7) // stride + 1, (i, r, c)
        assert col // stride <= c <= (col + 7) // stride + 1, (i, r, c)


def test_train_mode_equals_eval_mode_and_every_parameter_learns():
    model = build('ln2d')
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eval_outs = model.eval()(x)
    outs = model.train()(x)
    for a, b in zip(outs, eval_outs):
        torch.testing.assert_close(a, b)
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []
