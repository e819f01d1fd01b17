"""VMamba as a timm model family: pretrained cfgs and loading through timm's loader (the authors' release layout),
the checkpoint filter, features_only and forward_intermediates (one feature path with Backbone_VSSM), pruning,
the classifier API, device / dtype construction, torch.fx tracing, and clear errors for bad input.
(timm's own test-suite over the family: scripts/timm_model_tests.sh.)"""
import copy

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from yacs.config import CfgNode

import classification.models as models
from classification.config import load_config
from classification.models import Backbone_VSSM, load_pretrained
from classification.models.vmamba import checkpoint_filter_fn

SMALL = dict(depths=(1, 1, 1, 1))  # every builder's layout, one block per stage


def authors_file(path, model, ema=None):
    """A file laid out as the authors release them: model and model_ema weights, optimizer state, a pickled yacs
    config (which timm's weights-only reader refuses)."""
    ema = ema if ema is not None else {k: v + 1 for k, v in model.state_dict().items()}
    torch.save({"model": model.state_dict(), "model_ema": ema, "optimizer": {}, "epoch": 263,
                "max_accuracy": 82.6, "config": CfgNode({"MODEL": CfgNode({"TYPE": "vssm"})})}, path)
    return path


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


# ------------------------------------------------------------------------------------------ cfgs, pretrained


def test_every_published_model_has_a_release_cfg():
    for name in models.BUILDERS:
        cfg = timm.models.get_pretrained_cfg(f"{name}.in1k")
        assert cfg is not None, name
        assert cfg.url.startswith("https://github.com/MzeroMiko/VMamba/releases/download/%23v")
        assert ("%23v0cls/" in cfg.url) == name.startswith("vanilla")
        assert cfg.num_classes == 1000 and cfg.input_size == (3, 224, 224) and cfg.classifier == "classifier.head"
        assert cfg.first_conv == "patch_embed.0"
    assert set(timm.list_pretrained("*vmamba*")) == {f"{name}.in1k" for name in models.BUILDERS}
    assert "test_vmamba" in timm.list_models("test_*")


@pytest.mark.parametrize("name", models.BUILDERS)
def test_pretrained_true_loads_an_authors_file_through_timm(name, tmp_path):
    torch.manual_seed(0)
    source = timm.create_model(name, **SMALL)
    path = authors_file(tmp_path / "release.pth", source)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    assert loaded.pretrained_cfg["file"] == str(path)
    x = torch.randn(1, 3, 64, 48)
    direct = timm.create_model(name, **SMALL)
    direct.load_state_dict(torch.load(path, weights_only=False)["model"], strict=True)
    torch.testing.assert_close(logits(loaded, x), logits(direct, x), rtol=0, atol=0)


def test_pretrained_file_with_a_new_head_other_channels_or_features_only(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vmamba_tiny_s1l8", **SMALL)
    overlay = dict(file=str(authors_file(tmp_path / "release.pth", source)))
    fine_tune = timm.create_model("vmamba_tiny_s1l8", pretrained=True, pretrained_cfg_overlay=overlay,
                                  num_classes=5, **SMALL)
    assert fine_tune.get_classifier().out_features == 5
    torch.testing.assert_close(fine_tune.layers[2].blocks[0].op.A_logs, source.layers[2].blocks[0].op.A_logs)
    encoder = timm.create_model("vmamba_tiny_s1l8", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0,
                                **SMALL)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(logits(encoder, x), source.eval().forward_head(source.forward_features(x),
                                                                              pre_logits=True))
    gray = timm.create_model("vmamba_tiny_s1l8", pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1,
                             **SMALL)
    torch.testing.assert_close(gray.patch_embed[0].weight, source.patch_embed[0].weight.sum(1, keepdim=True))
    features = timm.create_model("vmamba_tiny_s1l8", pretrained=True, pretrained_cfg_overlay=overlay,
                                 features_only=True, **SMALL).eval()
    with torch.no_grad():
        torch.testing.assert_close(features(x)[2], source.forward_intermediates(x, intermediates_only=True)[2])


def test_bad_release_files_fail_naming_the_key(tmp_path):
    source = timm.create_model("vmamba_tiny_s1l8", **SMALL)

    def create(state_dict):
        path = tmp_path / "bad.pth"
        torch.save({"model": state_dict}, path)
        return timm.create_model("vmamba_tiny_s1l8", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                 **SMALL)

    missing = {k: v for k, v in source.state_dict().items() if k != "layers.1.blocks.0.op.Ds"}
    with pytest.raises(RuntimeError, match=r"missing \['layers\.1\.blocks\.0\.op\.Ds'\]"):
        create(missing)
    with pytest.raises(RuntimeError, match=r"unexpected \['layers\.1\.blocks\.0\.op\.extra'\]"):
        create({**source.state_dict(), "layers.1.blocks.0.op.extra": torch.zeros(1)})
    wrong = dict(source.state_dict(), **{"layers.0.blocks.0.op.dt_projs_weight": torch.zeros(4, 96, 7)})
    with pytest.raises(ValueError, match=r"layers\.0\.blocks\.0\.op\.dt_projs_weight: checkpoint \(4, 96, 7\)"):
        create(wrong)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        timm.create_model("vmamba_tiny_s1l8", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path /
                                                                                                   "nowhere.pth")))


def test_checkpoint_filter_maps_every_released_layout():
    model = timm.create_model("vanilla_vmamba_tiny", **SMALL)
    own = model.state_dict()
    legacy = {}
    for k, v in own.items():
        k = k.replace(".norm.", ".ln_1.") if ".blocks." in k else k
        k = k.replace(".op.", ".self_attention.").replace("patch_embed.0.", "patch_embed.proj.")
        k = k.replace("patch_embed.2.", "patch_embed.norm.").replace("classifier.", "")
        legacy[k] = v
    assert "layers.0.blocks.0.self_attention.x_proj_weight" in legacy and "head.weight" in legacy
    for wrapped in (legacy, {"model": legacy, "model_ema": {}}, {f"module.{k}": v for k, v in legacy.items()},
                    {"state_dict": {f"backbone.{k}": v for k, v in own.items()}}):
        mapped = checkpoint_filter_fn(wrapped, model)
        assert mapped.keys() == own.keys() if "state_dict" not in wrapped else mapped.keys() <= own.keys()
    fresh = timm.create_model("vanilla_vmamba_tiny", **SMALL)
    assert load_pretrained(fresh, legacy).ok
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, own[name]), name


def test_trainer_pretrained_uses_the_same_loader(tmp_path):
    from classification import main as trainer
    source = timm.create_model("vmamba_tiny_s1l8", **SMALL)
    state_dict = trainer.read_pretrained(str(authors_file(tmp_path / "release.pth", source)))
    model = timm.create_model("vmamba_tiny_s1l8", num_classes=3, **SMALL)
    trainer.load_pretrained_weights(model, state_dict, "release.pth", __import__("logging").getLogger("test"))
    torch.testing.assert_close(model.layers[3].blocks[0].norm.weight, source.layers[3].blocks[0].norm.weight)
    assert model.get_classifier().out_features == 3


# --------------------------------------------------------------------------------------------- features


@pytest.mark.parametrize("name", ["test_vmamba", "vanilla_vmamba_tiny"])
def test_features_only_and_forward_intermediates(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL).eval()
    x = torch.randn(2, 3, 83, 61)  # odd sizes: ceil at every stride-2 step (v2), floor + pad (v1)
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(taps) == 4 and all(t.dim() == 4 for t in taps)
        assert [t.shape[1] for t in taps] == [info["num_chs"] for info in model.feature_info]
        nhwc = model.forward_intermediates(x, indices=[1, 3], output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc[0], taps[1].permute(0, 2, 3, 1))
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True, stop_early=True)
        torch.testing.assert_close(last_two[1], taps[3])
        normed = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)[0]
        norm_input = taps[3] if model.output_fmt == "NCHW" else taps[3].permute(0, 2, 3, 1)
        torch.testing.assert_close(normed, model._format(model.classifier.norm(norm_input), "NCHW"))
        torch.manual_seed(0)  # the same initial weights as `model`
        features = timm.create_model(name, features_only=True, out_indices=(0, 2), **SMALL).eval()
        outs = features(x)
    assert features.feature_info.channels() == [model.feature_info[0]["num_chs"], model.feature_info[2]["num_chs"]]
    assert features.feature_info.reduction() == [4, 16]
    torch.testing.assert_close(outs[0], taps[0])
    torch.testing.assert_close(outs[1], taps[2])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")


@pytest.mark.parametrize("norm_layer", ["ln2d", "ln"])
def test_backbone_is_forward_intermediates_plus_outnorms(norm_layer):
    torch.manual_seed(0)
    kwargs = dict(dims=16, depths=(1, 1, 2, 1), ssm_d_state=1, ssm_ratio=1.0, forward_type="v05_noz",
                  mlp_ratio=2.0, downsample_version="v3", patchembed_version="v2", drop_path_rate=0.0)
    backbone = Backbone_VSSM(out_indices=(0, 2, 3), norm_layer=norm_layer, **kwargs).eval()
    classifier = models.VSSM(norm_layer=norm_layer, **kwargs).eval()
    classifier.load_state_dict(backbone.state_dict(), strict=False)
    x = torch.randn(1, 3, 70, 45)
    with torch.no_grad():
        outs = backbone(x)
        taps = classifier.forward_intermediates(x, indices=[0, 2, 3], output_fmt=classifier.output_fmt,
                                                intermediates_only=True)
    for i, out, tap in zip((0, 2, 3), outs, taps):
        expected = classifier._format(getattr(backbone, f"outnorm{i}")(tap), "NCHW")
        assert out.is_contiguous()  # standard NCHW memory, as mmcv's ops need
        torch.testing.assert_close(out, expected)


def test_prune_intermediate_layers():
    torch.manual_seed(0)
    model = timm.create_model("test_vmamba").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        pruned = copy.deepcopy(model)
        assert pruned.prune_intermediate_layers([1], prune_norm=True) == [1]
        assert len(pruned.layers) == 2 and pruned.num_features == model.feature_info[1]["num_chs"]
        torch.testing.assert_close(pruned.forward_features(x), taps[1])
        assert pruned(x).shape == taps[1].shape  # no classifier, no pooling left
        kept = copy.deepcopy(model)
        kept.prune_intermediate_layers([3], prune_head=False)
        torch.testing.assert_close(kept(x), model(x))


# ---------------------------------------------------------------------------------------- classifier API


def test_classifier_api():
    model = timm.create_model("vmamba_tiny_s1l8", **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (2, 768, 2, 2) and model.num_features == model.head_hidden_size == 768
    pre = model.forward_head(features, pre_logits=True)
    assert pre.shape == (2, 768)
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), pre)
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 768, 2, 2)
    model.reset_classifier(7, "max")
    assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(7, "catavgmax")
    vanilla = timm.create_model("vanilla_vmamba_tiny", num_classes=0, global_pool="", **SMALL)
    assert vanilla.output_fmt == "NHWC" and vanilla(x).shape == (2, 2, 2, 768)
    groups = timm.models.group_parameters(model, model.group_matcher())
    # stem, one group per block (a stage's downsample, and the final norm, with its last block), the head
    assert len(groups) == 1 + sum(SMALL["depths"]) + 1
    assert "layers.0.downsample.1.weight" in groups[1] and "classifier.norm.weight" in groups[4]
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        timm.create_model("vmamba_tiny_s1l8", not_an_argument=1)


def test_device_and_dtype_at_construction():
    model = timm.create_model("vmamba_small_s2l15", device="meta", dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model(torch.randn(1, 3, 224, 224, device="meta", dtype=torch.bfloat16))
    assert out.shape == (1, 1000) and out.dtype == torch.bfloat16
    model.reset_classifier(3)
    assert model.get_classifier().weight.device.type == "meta" and model.get_classifier().weight.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["test_vmamba", "vanilla_vmamba_tiny"])
def test_fx_tracing_keeps_the_custom_ops_as_leaves(name):
    kwargs = {} if name == "test_vmamba" else SMALL
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    assert any("ss2d_core" in n for n in nodes)
    extractor = create_feature_extractor(model, return_nodes={nodes[-1]: "out"}, tracer_kwargs=tracer_kwargs)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)["out"], model(x))
    torch.manual_seed(0)  # the same initial weights as `model`
    features = timm.create_model(name, features_only=True, feature_cls="fx", **kwargs).eval()
    with torch.no_grad():  # the graph's features come in the model's own layout
        expected = model.forward_intermediates(x, output_fmt=model.output_fmt, intermediates_only=True)[3]
        torch.testing.assert_close(features(x)[3], expected)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_names_the_problem():
    model = timm.create_model("test_vmamba").eval()
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\), got a tensor of shape \(3, 64, 64\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got a tensor of shape \(1, 1, 64, 64\)"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(TypeError, match="input is torch.float64 but the model's weights are torch.float32"):
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="tensor of images"):
        model([torch.randn(3, 64, 64)])
    # a model in 16-bit weights runs on the CPU (SS2D's fp32 core output is normalised in fp32)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert half(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_unknown_config_keys_list_the_nearest_valid_ones(tmp_path):
    with pytest.raises(KeyError, match=r"'MODEL.VSSM.DEPTH' in --opts; did you mean MODEL.VSSM.DEPTHS"):
        load_config(opts=["MODEL.VSSM.DEPTH", "[2, 2, 2, 2]"])
    with pytest.raises(ValueError, match="KEY VALUE pairs"):
        load_config(opts=["TRAIN.EPOCHS"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("TRAIN:\n  BASE_LRR: 1.0\n")
    with pytest.raises(KeyError, match=r"'TRAIN.BASE_LRR' in .*bad.yaml; did you mean TRAIN.BASE_LR"):
        load_config(str(bad))
