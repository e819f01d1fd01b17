"""UperNet with the VMamba backbone (segmentation/): training, inference, test tool, --tta, FLOPs.

CPU only: tiny generated ADE20K-layout images (batch 2: PPM's BatchNorm needs more than one
value per channel in train mode); the real VMamba-T where the test is about VMamba-T, a tiny
backbone and head where it is about the tools.
"""
import pickle
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / 'segmentation/configs/demo/upernet_vssm_synthetic_tiny.py'
TINY_MODEL = {
    'model.backbone.dims': 16, 'model.backbone.depths': [1, 1, 1, 1],
    'model.decode_head.in_channels': [16, 32, 64, 128], 'model.decode_head.channels': 32,
    'model.auxiliary_head.in_channels': 64, 'model.auxiliary_head.channels': 16,
}
TINY_MODEL_ARGS = [f'{key}={value}'.replace(' ', '') for key, value in TINY_MODEL.items()]
NO_WORKERS = [f'{split}_dataloader.{key}' for split in ('train', 'val', 'test')
              for key in ('num_workers=0', 'persistent_workers=False')]


@pytest.fixture(scope='module')
def demo_data(tmp_path_factory):
    from vmamba_mm.synthetic import write_ade
    root = tmp_path_factory.mktemp('demo')
    write_ade(str(root / 'ade'), num_train=4, num_val=2, size=64)
    return root


@pytest.mark.slow
def test_upernet_vmamba_t_trains_and_infers(tmp_path, monkeypatch, demo_data):
    """The real VMamba-T UperNet: a few training steps on one generated batch lower the loss,
    then the saved weights run through mmseg.apis.init_model / inference_model."""
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmseg.apis import inference_model, init_model
    from mmseg.registry import DATASETS, MODELS

    torch.manual_seed(0)
    monkeypatch.setenv('VMAMBA_DEMO_DATA', str(demo_data))
    cfg = Config.fromfile(str(DEMO))
    init_default_scope('mmseg')
    model = MODELS.build(cfg.model)
    model.init_weights()
    assert type(model.backbone).__name__ == 'MM_VSSM' and model.backbone.depths == [2, 2, 8, 2]
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    batch = pseudo_collate([dataset[0], dataset[1]])
    optim_wrapper = build_optim_wrapper(
        model, dict(cfg.optim_wrapper, optimizer=dict(cfg.optim_wrapper.optimizer, lr=2e-4)))
    model.train()
    losses = [model.train_step(batch, optim_wrapper)['loss'].item() for _ in range(3)]
    assert losses[-1] < losses[0], losses

    ckpt = tmp_path / 'seg.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {'dataset_meta': dataset.metainfo}}, ckpt)
    segmentor = init_model(cfg, str(ckpt), device='cpu')
    result = inference_model(segmentor, str(demo_data / 'ade/images/validation/ADE_validation_00000000.jpg'))
    assert result.pred_sem_seg.data.shape == (1, 64, 64)


@pytest.mark.slow
def test_train_test_and_tta_tools(tmp_path, demo_data, mm_tool):
    """tools/train.py trains UperNet (tiny backbone/head) and saves a checkpoint; tools/test.py
    evaluates it with IoUMetric, single-scale and with --tta (6 scales x flip). The tools run in a
    foreign cwd: the configs' custom_imports find MM_VSSM in the installed package."""
    work = tmp_path / 'work'
    mm_tool('segmentation', 'train.py', DEMO, '--work-dir', work, '--cfg-options', *TINY_MODEL_ARGS, *NO_WORKERS,
             'train_cfg.max_iters=2', 'train_cfg.val_interval=100',
             'default_hooks.checkpoint.interval=2', cwd=tmp_path, data=demo_data)
    ckpt = work / 'iter_2.pth'
    assert ckpt.is_file()

    test_args = [DEMO, ckpt, '--work-dir', work, '--cfg-options', *TINY_MODEL_ARGS, *NO_WORKERS]
    log = mm_tool('segmentation', 'test.py', *test_args, cwd=tmp_path, data=demo_data)
    assert 'mIoU:' in log
    log = mm_tool('segmentation', 'test.py', *test_args[:2], '--tta', *test_args[2:], cwd=tmp_path, data=demo_data)
    assert 'mIoU:' in log
    from mmengine.config import Config
    used = Config.fromfile(str(work / 'upernet_vssm_synthetic_tiny.py'))
    assert used.model.type == 'SegTTAModel' and used.model.module.backbone.type == 'MM_VSSM'


@pytest.mark.slow
def test_dist_train_and_dist_test_tta_on_two_cpu_processes(tmp_path, demo_data, mm_tool, logged_metrics):
    """dist_train.sh trains on 2 CPU processes (the heads' SyncBN becomes BatchNorm; no warm-up and a large lr,
    so 2 iterations give predictions that score); dist_test.sh --tta on 2 processes dumps the predictions of
    test.py --tta on one, in the same order, and logs the same IoUMetric values (one thread per process in both,
    so each image's forward is the same computation)."""
    work = tmp_path / 'work'
    log = mm_tool('segmentation', 'dist_train.sh', DEMO, 2, '--work-dir', work, '--cfg-options', *TINY_MODEL_ARGS,
                  *NO_WORKERS, 'train_cfg.max_iters=2', 'train_cfg.val_interval=100',
                  'default_hooks.checkpoint.interval=2', 'param_scheduler.0.start_factor=1.0',
                  'optim_wrapper.optimizer.lr=0.01', 'randomness.seed=0', cwd=tmp_path, data=demo_data)
    assert 'SyncBN layers become BatchNorm' in log and 'Saving checkpoint at 2 iterations' in log
    metrics, predictions = [], []
    for tool, processes in (('test.py', []), ('dist_test.sh', [2])):
        out = tmp_path / f'{tool}.pkl'
        log = mm_tool('segmentation', tool, DEMO, work / 'iter_2.pth', *processes, '--tta', '--out', out,
                      '--work-dir', tmp_path / 'test', '--cfg-options', *TINY_MODEL_ARGS, *NO_WORKERS,
                      cwd=tmp_path, data=demo_data, env={'OMP_NUM_THREADS': '1'})
        metrics.append(logged_metrics(log, 'test'))
        predictions.append(pickle.loads(out.read_bytes()))
    one, two = predictions
    assert [p['img_path'] for p in two] == [p['img_path'] for p in one] and len(one) == 2
    for a, b in zip(one, two):
        assert torch.equal(a['seg_logits']['data'], b['seg_logits']['data'])
        assert torch.equal(a['pred_sem_seg']['data'], b['pred_sem_seg']['data'])
    assert metrics[0] == metrics[1] and metrics[0]['aAcc'] > 0, metrics


def test_flops_count_the_decode_head_too(monkeypatch, demo_data):
    """vmamba_mm.flops on a segmentation config (tiny backbone and head): the whole segmentor's
    test-mode forward, i.e. more than its backbone alone, and every parameter of the model."""
    from mmengine.config import Config
    from classification.models.flops import count_flops
    from vmamba_mm.backbone import MM_VSSM
    from vmamba_mm.flops import build_from_config, model_flops
    monkeypatch.setenv('VMAMBA_DEMO_DATA', str(demo_data))
    cfg = Config.fromfile(str(DEMO))
    cfg.merge_from_dict(TINY_MODEL)
    flops, params = model_flops(cfg, (3, 64, 64))
    model, scope = build_from_config(cfg)
    assert scope == 'mmseg' and isinstance(model.backbone, MM_VSSM)
    assert params == sum(p.numel() for p in model.parameters())
    assert flops > count_flops(model.backbone.eval(), torch.randn(1, 3, 64, 64)) > 0
