"""Train/test entry points shared by ``detection/tools`` and ``segmentation/tools``.

mmdet's and mmseg's own ``tools/{train,test}.py`` differ only in details; everything here is
driven by the config (its ``default_scope`` picks mmdet or mmseg, its ``custom_imports`` register
``MM_VSSM``), so one implementation serves both folders and works from any working directory.
"""
import argparse
import datetime
import os
import os.path as osp

import torch
import torch.distributed as dist

try:
    from mmengine.config import Config, DictAction
    from mmengine.logging import MMLogger
    from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm
    from mmengine.registry import MODEL_WRAPPERS
    from mmengine.runner import Runner
except ImportError as error:  # the base environment (./dev.sh demo) has no OpenMMLab stack
    raise SystemExit(f'{error.name} is not installed: the detection / segmentation tools need mmengine, mmcv, '
                     'mmdet and mmseg; install them with ./dev.sh setup --mm') from None


def _trust_runner_checkpoints():
    """Checkpoints written by mmengine's Runner hold a message hub (HistoryBuffer, numpy arrays),
    which the ``torch.load(weights_only=True)`` default of torch >= 2.6 refuses; mmengine 0.10
    does not pass ``weights_only``. Our tools resume/test from checkpoints the user points them
    at (as in every OpenMMLab tool), so load them as full pickles unless the user chose otherwise.
    """
    os.environ.setdefault('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')


def _common_args(parser):
    parser.add_argument('--work-dir', help='where logs and checkpoints go '
                        '(default: ./work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. model.backbone.pretrained=None')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank=N (torch >= 2.0) or --local_rank=N
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def _load_config(args):
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """MMDistributedDataParallel for a model on the CPU (processes over gloo).

    mmengine's Runner passes ``device_ids=[LOCAL_RANK]``, which DDP accepts for a GPU model only, so they are
    dropped. SyncBN synchronises over GPUs only: its layers become BatchNorm, each process normalising over its
    own batch (what mmengine does for a one-process run).
    """

    def __init__(self, module, device_ids=None, **kwargs):
        sync_bn_layers = sum(type(m).__name__ == 'SyncBatchNorm' for m in module.modules())
        if sync_bn_layers:
            MMLogger.get_current_instance().warning(
                f'{sync_bn_layers} SyncBN layers become BatchNorm: SyncBN needs CUDA, and these processes run on '
                'the CPU; each normalises over its own batch')
        super().__init__(module=revert_sync_batchnorm(module), **kwargs)


def _join_cpu_processes(cfg):
    """Set up ``--launcher pytorch`` on a machine without CUDA.

    mmengine's set-up assumes one GPU per process (torch.cuda.set_device, the config's NCCL backend, DDP on
    device LOCAL_RANK). Here the processes join over gloo before the Runner exists (it then skips its own
    set-up), and the model goes into CPUDistributedDataParallel.
    """
    if cfg.launcher != 'pytorch':
        raise RuntimeError(f'--launcher {cfg.launcher} needs CUDA GPUs; on the CPU start the processes with '
                           'dist_train.sh / dist_test.sh (--launcher pytorch)')
    dist_cfg = cfg.get('env_cfg', {}).get('dist_cfg', {})
    dist.init_process_group(backend='gloo', timeout=datetime.timedelta(seconds=dist_cfg.get('timeout', 1800)))
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    if wrapper.get('type', 'MMDistributedDataParallel') != 'MMDistributedDataParallel':
        raise RuntimeError(f"model_wrapper_cfg type {wrapper['type']!r} cannot run on the CPU; without CUDA "
                           'the processes use CPUDistributedDataParallel')
    wrapper['type'] = 'CPUDistributedDataParallel'
    # mmengine's defaults when the config names no wrapper
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper


def _build_runner(cfg):
    if cfg.launcher != 'none' and not torch.cuda.is_available():
        _join_cpu_processes(cfg)
    if 'runner_type' in cfg:
        from mmengine.registry import RUNNERS
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def _run(run):
    """run() (a runner's train or test), then leave the process group a distributed run joined: a process that
    exits with gloo's worker threads still running can abort ("terminate called without an active exception")."""
    try:
        return run()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def train(argv=None):
    parser = argparse.ArgumentParser(description='Train a detector / segmentor')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by (total batch / auto_scale_lr.base_batch_size)')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from CHECKPOINT, or from the latest checkpoint in the '
                        'work dir when no path is given')
    _common_args(parser)
    args = parser.parse_args(argv)
    _trust_runner_checkpoints()
    cfg = _load_config(args)

    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise RuntimeError(f'{args.config} has no auto_scale_lr.base_batch_size')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    runner = _build_runner(cfg)
    _run(runner.train)
    return runner


def test(argv=None):
    parser = argparse.ArgumentParser(description='Test (evaluate) a detector / segmentor')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='also dump the raw predictions to this .pkl file')
    parser.add_argument('--tta', action='store_true',
                        help="test-time augmentation from the config's tta_model/tta_pipeline "
                        '(segmentation: scales 0.5..1.75 x flip, i.e. mIoU(MS))')
    _common_args(parser)
    args = parser.parse_args(argv)
    _trust_runner_checkpoints()
    cfg = _load_config(args)
    cfg.load_from = args.checkpoint

    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise RuntimeError(f'{args.config} defines no tta_model / tta_pipeline')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model

    runner = _build_runner(cfg)
    if args.out is not None:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError('--out must be a .pkl or .pickle file')
        from mmengine.evaluator import DumpResults
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
    return _run(runner.test)
