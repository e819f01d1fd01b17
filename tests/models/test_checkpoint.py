"""Checkpoint loading: the authors' layout (checkpoint dict with model / model_ema and a pickled
config), bare state_dicts, legacy names, Linear2d conv-shaped weights, Backbone_VSSM, loud failures."""
import pytest
import torch
from yacs.config import CfgNode

from classification.models import Backbone_VSSM, VSSM, load_pretrained, load_state_dict_from
from classification.models.vmamba import Linear2d


def tiny(norm_layer="ln2d", **overrides):
    kw = dict(dims=8, depths=(1, 1, 2, 1), ssm_d_state=1, ssm_ratio=1.0, ssm_conv_bias=False,
              forward_type="v05_noz", mlp_ratio=2.0, downsample_version="v3", patchembed_version="v2",
              norm_layer=norm_layer, drop_path_rate=0.0, num_classes=5)
    kw.update(overrides)
    return VSSM(**kw)


def tiny_v0():
    return tiny("ln", forward_type="v0", ssm_d_state=4, ssm_ratio=2.0, mlp_ratio=0.0, ssm_conv_bias=True,
                downsample_version="v1", patchembed_version="v1")


@pytest.fixture
def official_style_file(tmp_path):
    """A file laid out like the authors' release: model, model_ema, optimizer state, yacs config."""
    torch.manual_seed(0)
    model, ema = tiny(), tiny()
    path = tmp_path / "ckpt_epoch_1.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "optimizer": {}, "epoch": 1,
                "max_accuracy": 0.5, "config": CfgNode({"MODEL": CfgNode({"TYPE": "vssm"})})}, path)
    return path, model, ema


def test_round_trip_through_file(official_style_file):
    path, model, ema = official_style_file
    fresh = tiny()
    report = load_pretrained(fresh, path)  # strict by default
    assert report.ok and "checkpoint['model']" in report["kind"] and str(path) in report["kind"]
    x = torch.randn(1, 3, 45, 39)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)
    load_pretrained(fresh, path, key="model_ema")
    for (name, a), b in zip(fresh.state_dict().items(), ema.state_dict().values()):
        assert torch.equal(a, b), name
    # plain torch loading of the same file, as the issue states it: strict=True on ckpt["model"]
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    tiny().load_state_dict(ckpt["model"], strict=True)


def test_sources_are_recognised(official_style_file):
    path, model, _ = official_style_file
    sd = model.state_dict()
    assert load_state_dict_from(sd)[1] == "state_dict"
    assert load_state_dict_from({"model": sd, "epoch": 3})[1] == "checkpoint['model']"
    ddp, kind = load_state_dict_from({f"module.{k}": v for k, v in sd.items()})
    assert set(ddp) == set(sd) and "module." in kind
    mm = {"state_dict": {**{f"backbone.{k}": v for k, v in sd.items()}, "neck.conv.weight": torch.zeros(1)}}
    backbone_sd, kind = load_state_dict_from(mm)
    assert set(backbone_sd) == set(sd) and "mmengine" in kind
    with pytest.raises(KeyError, match="model_ema"):
        load_state_dict_from({"model": sd}, key="model_ema")
    with pytest.raises(ValueError, match="no state_dict"):
        load_state_dict_from({"epoch": 3, "optimizer": {}})


def test_missing_file_and_shape_mismatch_fail_loudly(tmp_path, official_style_file):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_pretrained(tiny(), tmp_path / "nowhere.pth")
    path, _, _ = official_style_file
    wider = tiny(num_classes=7)
    with pytest.raises(ValueError, match=r"classifier\.head\.weight: checkpoint \(5, 64\) vs model \(7, 64\)"):
        load_pretrained(wider, path)
    sd = tiny().state_dict()
    del sd["layers.0.blocks.0.op.Ds"]
    with pytest.raises(RuntimeError, match=r"layers\.0\.blocks\.0\.op\.Ds"):
        load_pretrained(tiny(), sd)
    report = load_pretrained(tiny(), sd, strict=False)
    assert report["missing"] == ["layers.0.blocks.0.op.Ds"] and not report.ok


def test_linear2d_loads_conv_shaped_weight():
    layer = Linear2d(6, 4)
    conv_weight = torch.randn(4, 6, 1, 1)
    layer.load_state_dict({"weight": conv_weight, "bias": torch.zeros(4)})
    torch.testing.assert_close(layer.weight, conv_weight.flatten(1))
    model = tiny()
    sd = model.state_dict()
    key = "layers.0.blocks.0.mlp.fc1.weight"
    sd[key] = sd[key][:, :, None, None].clone()
    load_pretrained(tiny(), sd)


def test_legacy_v0_names_load_strict_through_load_pretrained():
    model = tiny_v0()
    legacy = {}
    for k, v in model.state_dict().items():
        k = k.replace(".norm.", ".ln_1.") if ".blocks." in k else k
        k = k.replace(".op.", ".self_attention.").replace("patch_embed.0.", "patch_embed.proj.")
        k = k.replace("patch_embed.2.", "patch_embed.norm.").replace("classifier.", "")
        legacy[k] = v
    assert "layers.0.blocks.0.ln_1.weight" in legacy and "head.weight" in legacy
    fresh = tiny_v0()
    assert load_pretrained(fresh, legacy).ok  # strict: checkpoint_filter_fn maps every legacy name
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_backbone_loads_classification_checkpoint(official_style_file):
    path, model, _ = official_style_file
    backbone = Backbone_VSSM(pretrained=str(path), norm_layer="ln2d", dims=8, depths=(1, 1, 2, 1), ssm_d_state=1,
                             ssm_ratio=1.0, ssm_conv_bias=False, forward_type="v05_noz", mlp_ratio=2.0,
                             downsample_version="v3", patchembed_version="v2", drop_path_rate=0.0)
    report = backbone.load_report
    assert report["ignored"] == sorted(k for k in model.state_dict() if k.startswith("classifier."))
    assert report["missing"] == [] and report["unexpected"] == []
    assert sorted(report["expected_missing"]) == sorted(f"outnorm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    torch.testing.assert_close(backbone.layers[2].blocks[1].op.A_logs, model.layers[2].blocks[1].op.A_logs)
    with pytest.raises(FileNotFoundError):
        Backbone_VSSM(pretrained="/nonexistent/vssm.pth", dims=8, depths=(1, 1, 1, 1))
