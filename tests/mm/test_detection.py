"""Mask R-CNN with the VMamba backbone (detection/): registration, training, inference, tools.

CPU only: tiny generated images; the real VMamba-T where the test is about VMamba-T, a tiny
backbone (dims 16, one block per stage) where it is about the tools.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / 'detection/configs/demo/mask_rcnn_vssm_fpn_synthetic_tiny.py'
TINY_BACKBONE = [
    'model.backbone.dims=16', 'model.backbone.depths=[1,1,1,1]',
    'model.neck.in_channels=[16,32,64,128]',
]
NO_WORKERS = [f'{split}_dataloader.{key}' for split in ('train', 'val', 'test')
              for key in ('num_workers=0', 'persistent_workers=False')]


@pytest.fixture(scope='module')
def demo_data(tmp_path_factory):
    from vmamba_mm.synthetic import write_coco
    root = tmp_path_factory.mktemp('demo')
    write_coco(str(root / 'coco'), num_train=4, num_val=3, size=64)
    return root


def load_demo_config(data, monkeypatch):
    from mmengine.config import Config
    monkeypatch.setenv('VMAMBA_DEMO_DATA', str(data))
    return Config.fromfile(str(DEMO))


def test_swin_kwargs_left_in_a_config_are_rejected(monkeypatch, demo_data):
    """Without `_delete_` the inherited Swin arguments would reach MM_VSSM: an error, not ignored."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    cfg = load_demo_config(demo_data, monkeypatch)
    init_default_scope('mmdet')
    with pytest.raises(TypeError, match='num_heads'):
        MODELS.build(dict(cfg.model.backbone, num_heads=[3, 6, 12, 24]))


@pytest.mark.slow
def test_mask_rcnn_vmamba_t_trains_and_infers(tmp_path, monkeypatch, demo_data):
    """The real VMamba-T Mask R-CNN: a few training steps on one generated batch lower the loss,
    then the saved weights run through mmdet.apis.init_detector / inference_detector."""
    from mmdet.apis import inference_detector, init_detector
    from mmdet.registry import DATASETS, MODELS
    from mmengine.dataset import pseudo_collate
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope

    torch.manual_seed(0)
    cfg = load_demo_config(demo_data, monkeypatch)
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert type(model.backbone).__name__ == 'MM_VSSM' and model.backbone.depths == [2, 2, 8, 2]
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    batch = pseudo_collate([dataset[0], dataset[1]])
    optim_wrapper = build_optim_wrapper(
        model, dict(cfg.optim_wrapper, optimizer=dict(cfg.optim_wrapper.optimizer, lr=2e-4)))
    model.train()
    losses = [model.train_step(batch, optim_wrapper)['loss'].item() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses

    ckpt = tmp_path / 'det.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {'dataset_meta': dataset.metainfo}}, ckpt)
    detector = init_detector(cfg, str(ckpt), device='cpu')
    image = str(demo_data / 'coco/val/val_00000.jpg')
    result = inference_detector(detector, image)
    assert result.pred_instances.bboxes.shape[1] == 4
    assert result.pred_instances.masks.shape[1:] == (64, 64)


@pytest.mark.slow
def test_train_resume_and_test_tools(tmp_path, demo_data, mm_tool):
    """tools/train.py trains (tiny backbone) and resumes its own checkpoint (torch >= 2.6
    weights_only default); tools/test.py evaluates a checkpoint with pycocotools' CocoMetric.
    The tools run in a foreign cwd: the configs' custom_imports find MM_VSSM in the package."""
    work = tmp_path / 'work'
    common = ['--work-dir', work, '--cfg-options', *TINY_BACKBONE, *NO_WORKERS,
              'train_cfg.val_interval=100', 'default_hooks.checkpoint.interval=1']
    mm_tool('detection', 'train.py', DEMO, *common, 'train_cfg.max_iters=1', cwd=tmp_path, data=demo_data)
    assert (work / 'iter_1.pth').is_file()
    log = mm_tool('detection', 'train.py', DEMO, '--resume', *common, 'train_cfg.max_iters=2',
                   cwd=tmp_path, data=demo_data)
    assert 'resumed epoch: 0, iter: 1' in log and (work / 'iter_2.pth').is_file()

    out = tmp_path / 'preds.pkl'
    log = mm_tool('detection', 'test.py', DEMO, work / 'iter_2.pth', '--out', out, '--work-dir', work,
                   '--cfg-options', *TINY_BACKBONE, *NO_WORKERS, cwd=tmp_path, data=demo_data)
    assert 'coco/bbox_mAP:' in log and 'coco/segm_mAP:' in log
    assert out.is_file()


@pytest.mark.slow
def test_dist_train_on_two_cpu_processes_evaluates_like_one(tmp_path, demo_data, mm_tool, logged_metrics):
    """dist_train.sh trains on 2 CPU processes (gloo, DDP without device ids, a free port); its closing
    evaluation, each process on its share of the images, logs the CocoMetric values that test.py gives on one
    process for the saved weights (one thread per process in both, so each image's forward is the same
    computation). No warm-up, a larger lr and a score threshold of 0 (100 detections per image) make the
    metrics of 2 iterations more than zero."""
    work = tmp_path / 'work'
    options = ['--cfg-options', *TINY_BACKBONE, *NO_WORKERS, 'model.test_cfg.rcnn.score_thr=0', 'randomness.seed=0',
               'param_scheduler.0.start_factor=1.0', 'optim_wrapper.optimizer.lr=0.001']
    log = mm_tool('detection', 'dist_train.sh', DEMO, 2, '--work-dir', work, *options, 'train_cfg.max_iters=2',
                  'train_cfg.val_interval=100', 'default_hooks.checkpoint.interval=2', cwd=tmp_path, data=demo_data)
    assert 'Distributed training: True' in log and "type='CPUDistributedDataParallel'" in log
    assert 'Saving checkpoint at 2 iterations' in log
    two = logged_metrics(log, 'val')
    log = mm_tool('detection', 'test.py', DEMO, work / 'iter_2.pth', '--work-dir', tmp_path / 'test', *options,
                  cwd=tmp_path, data=demo_data, env={'OMP_NUM_THREADS': '1'})
    one = logged_metrics(log, 'test')
    assert one == two and one['coco/bbox_mAP_50'] > 0, (one, two)


@pytest.mark.slow
def test_published_configs_build_through_the_apis_from_a_foreign_cwd(tmp_path):
    """`custom_imports` alone registers MM_VSSM: no cwd, PYTHONPATH or prior import needed."""
    script = f'''
from mmdet.apis import init_detector
from mmseg.apis import init_model
no_ckpt = {{"model.backbone.pretrained": None}}
det = init_detector("{REPO}/detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_tiny.py", device="cpu", cfg_options=no_ckpt)
det0 = init_detector("{REPO}/detection/configs/vssm/mask_rcnn_vssm_fpn_coco_tiny.py", device="cpu", cfg_options=no_ckpt)
seg = init_model("{REPO}/segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py", device="cpu", cfg_options=no_ckpt)
print(type(det.backbone).__name__, type(det0.backbone).__name__, type(seg.backbone).__name__)
'''
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == ['MM_VSSM'] * 3


@pytest.mark.parametrize('norm_layer', ['ln2d', 'ln'])
def test_backbone_features_read_correctly_by_mmcv_roi_align(norm_layer):
    # mmcv's RoIAlign indexes its input as NCHW memory whatever its strides; a channels-last output
    # made every RoI feature garbage (training loss fell, box AP stayed at zero)
    from mmcv.ops import RoIAlign
    from vmamba_mm.backbone import MM_VSSM
    torch.manual_seed(0)
    backbone = MM_VSSM(dims=16, depths=(1, 1, 1, 1), norm_layer=norm_layer).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 96))
    rois = torch.tensor([[0, 3.0, 2.0, 13.0, 11.0]])
    for stride, feat in zip((4, 8, 16, 32), feats):
        assert feat.is_contiguous()
        op = RoIAlign((7, 7), 1.0 / stride, sampling_ratio=2, aligned=True)
        reference = op(feat.detach().clone(memory_format=torch.contiguous_format), rois * 4)
        torch.testing.assert_close(op(feat, rois * 4), reference)
