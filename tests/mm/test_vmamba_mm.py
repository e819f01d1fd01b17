"""The shared OpenMMLab package (vmamba_mm/): the MM_VSSM backbone, the distributed launcher, the
synthetic data command, and the package boundaries: detection/ and segmentation/ use vmamba_mm and
never each other, and vmamba_mm loads neither mmdet nor mmseg when imported."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TASKS = ('detection', 'segmentation')


def test_unknown_kwarg_and_missing_pretrained_are_errors(tmp_path):
    from vmamba_mm.backbone import MM_VSSM
    with pytest.raises(TypeError, match='embed_dims'):
        MM_VSSM(dims=16, depths=(1, 1, 1, 1), embed_dims=96)
    backbone = MM_VSSM(dims=16, depths=(1, 1, 1, 1), pretrained=str(tmp_path / 'absent.pth'))
    with pytest.raises(FileNotFoundError):
        backbone.init_weights()


def test_authors_classification_checkpoint_loads_into_mm_vssm(tmp_path):
    """An authors'-layout file ({'model': VSSM state_dict, ...}): only the classifier is left over
    and only the outnorms are missing; every other weight arrives."""
    from classification.models import VSSM
    from vmamba_mm.backbone import MM_VSSM
    kwargs = dict(dims=16, depths=(1, 1, 2, 1), ssm_d_state=1, ssm_ratio=1.0, forward_type='v05_noz',
                  mlp_ratio=4.0, downsample_version='v3', patchembed_version='v2', norm_layer='ln2d')
    classifier = VSSM(num_classes=10, **kwargs)
    path = tmp_path / 'ckpt_epoch_0.pth'
    torch.save({'model': classifier.state_dict(), 'epoch': 0, 'max_accuracy': 0.0}, path)

    backbone = MM_VSSM(pretrained=str(path), **kwargs)
    backbone.init_weights()
    report = backbone.load_report
    assert report['missing'] == [] and report['unexpected'] == []
    assert report['ignored'] and all(k.startswith('classifier.') for k in report['ignored'])
    assert sorted(report['expected_missing']) == sorted(
        f'outnorm{i}.{p}' for i in range(4) for p in ('weight', 'bias'))
    source = classifier.state_dict()
    for key, value in backbone.state_dict().items():
        if not key.startswith('outnorm'):
            torch.testing.assert_close(value, source[key], msg=key)


@pytest.mark.slow
def test_compiled_backbone_trains_like_the_eager_one():
    """compile=True (a config option: backbone=dict(..., compile=True)) runs the backbone through
    torch.compile: optimizer steps on batches of changing sizes (as detection batches are) give the eager
    run's weights, and evaluation at new sizes its features."""
    from vmamba_mm.backbone import MM_VSSM
    kwargs = dict(dims=16, depths=(1, 1, 1, 1), ssm_d_state=1, ssm_ratio=1.0, forward_type='v05_noz',
                  mlp_ratio=2.0, downsample_version='v3', patchembed_version='v2', norm_layer='ln2d',
                  drop_path_rate=0.0)
    generator = torch.Generator().manual_seed(0)
    train_images = [torch.randn(2, 3, h, w, generator=generator) for h, w in ((64, 96), (96, 64))]
    test_images = [torch.randn(1, 3, h, w, generator=generator) for h, w in ((64, 64), (96, 128))]
    runs = {}
    for compile_mode in (False, True):
        torch.manual_seed(0)
        backbone = MM_VSSM(compile=compile_mode, **kwargs).train()
        optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1)
        for images in train_images:
            optimizer.zero_grad()
            sum(f.square().mean() for f in backbone(images)).backward()
            optimizer.step()
        backbone.eval()
        with torch.no_grad():
            runs[compile_mode] = [backbone(images) for images in test_images], backbone.state_dict()
    assert MM_VSSM(compile=True, **kwargs).compile_mode == 'default'
    for eager, compiled in zip(runs[False][0], runs[True][0]):
        for eager_map, compiled_map in zip(eager, compiled):
            torch.testing.assert_close(compiled_map, eager_map, rtol=1e-4, atol=1e-4)
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, rtol=1e-4, atol=1e-4, msg=key)
    with pytest.raises(TypeError, match='compile must be a bool or a torch.compile mode'):
        MM_VSSM(compile=3, **kwargs)


@pytest.mark.parametrize('task', TASKS)
def test_dist_scripts_launch_their_own_tools(task, tmp_path):
    """dist_train.sh / dist_test.sh build the legacy-launcher command for this folder's tools."""
    env = dict(os.environ, PYTHON='echo', NNODES='2', NODE_RANK='1', MASTER_ADDR='10.0.0.1', PORT='29999')
    tools = REPO / task / 'tools'
    train = subprocess.run(['bash', str(tools / 'dist_train.sh'), 'cfg.py', '4', '--amp'],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert train[:2] == ['-m', 'torch.distributed.launch']
    assert {'--nnodes=2', '--node_rank=1', '--master_addr=10.0.0.1', '--nproc_per_node=4',
            '--master_port=29999'} <= set(train)
    assert train[-5:] == [str(tools / 'train.py'), 'cfg.py', '--amp', '--launcher', 'pytorch']
    test = subprocess.run(['bash', str(tools / 'dist_test.sh'), 'cfg.py', 'ckpt.pth', '1', '--tta'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert '--nproc_per_node=1' in test
    assert test[-6:] == [str(tools / 'test.py'), 'cfg.py', 'ckpt.pth', '--tta', '--launcher', 'pytorch']
    # one node and no PORT: a standalone launcher on a free port (29500 may be another job's)
    one_node = {k: v for k, v in env.items() if k not in ('NNODES', 'NODE_RANK', 'MASTER_ADDR', 'PORT')}
    test = subprocess.run(['bash', str(tools / 'dist_test.sh'), 'cfg.py', 'ckpt.pth', '2'],
                          cwd=tmp_path, env=one_node, capture_output=True, text=True, check=True).stdout.split()
    assert test[:4] == ['-m', 'torch.distributed.launch', '--standalone', '--nproc_per_node=2']
    assert not [arg for arg in test if arg.startswith(('--master', '--nnodes', '--node_rank'))]

    missing_gpus = subprocess.run(['bash', str(tools / 'dist_test.sh'), 'cfg.py', 'ckpt.pth'],
                                  cwd=tmp_path, env=env, capture_output=True, text=True)
    assert missing_gpus.returncode == 2 and missing_gpus.stdout == ''
    assert 'dist_test.sh CONFIG CHECKPOINT GPUS' in missing_gpus.stderr


def test_synthetic_command_writes_coco_and_ade_layouts(tmp_path):
    out = tmp_path / 'data'
    subprocess.run([sys.executable, '-m', 'vmamba_mm.synthetic', str(out), '--size', '48',
                    '--num-train', '3', '--num-val', '1'], cwd=tmp_path, check=True, capture_output=True)
    coco = json.loads((out / 'coco/annotations/instances_train.json').read_text())
    assert [c['name'] for c in coco['categories']] == ['rectangle', 'ellipse', 'triangle']
    assert len(coco['images']) == 3 and coco['annotations']
    assert all((out / 'coco/train' / image['file_name']).is_file() for image in coco['images'])
    labels = sorted((out / 'ade/annotations/training').glob('*.png'))
    assert len(labels) == 3 and len(list((out / 'ade/images/training').glob('*.jpg'))) == 3
    values = np.unique(np.concatenate([cv2.imread(str(p), cv2.IMREAD_UNCHANGED).ravel() for p in labels]))
    assert values[0] == 1 and set(values) <= {1, 2, 3, 4}  # background 1, shape k is k + 2


def _module_of(path):
    parts = path.relative_to(REPO).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _references(path):
    """What a Python file depends on: the modules it imports (import statements, relative ones
    resolved, and a config's ``custom_imports``) and the files it inherits (a config's ``_base_``,
    as paths relative to the repository; ``mmdet::...`` kept as written)."""
    tree = ast.parse(path.read_text(), str(path))
    modules, bases = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            folders = path.relative_to(REPO).parent.parts  # level 1 is the file's own package
            module = list(folders[:len(folders) - node.level + 1] if node.level else [])
            module += node.module.split('.') if node.module else []
            # `from a import b` may import module a.b; `from .. import x` names x only there
            modules.update('.'.join(module + [alias.name]) for alias in node.names)
            if module:
                modules.add('.'.join(module))
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name, value = node.targets[0].id, node.value
            if name == 'custom_imports':
                fields = ({k.arg: k.value for k in value.keywords} if isinstance(value, ast.Call)
                          else {ast.literal_eval(k): v for k, v in zip(value.keys, value.values)})
                imports = ast.literal_eval(fields['imports'])
                modules.update([imports] if isinstance(imports, str) else imports)
            elif name == '_base_':
                base = ast.literal_eval(value)
                for entry in [base] if isinstance(base, str) else base:
                    bases.add(entry if '::' in entry else
                              os.path.relpath((path.parent / entry).resolve(), REPO))
    return modules, bases


def _depends_on(modules, bases, package):
    return sorted([m for m in modules if m.split('.')[0] == package] +
                  [b for b in bases if Path(b).parts[0] == package])


def test_detection_and_segmentation_share_code_only_through_vmamba_mm():
    """Every .py under detection/ and segmentation/ (configs included): no import, custom_imports or
    _base_ reaches the other package, and no script names the other's folder; vmamba_mm depends on
    neither, not even inside a function."""
    found = {}
    for task in TASKS:
        other, = set(TASKS) - {task}
        modules, bases = set(), set()
        for path in sorted((REPO / task).rglob('*.py')):
            file_modules, file_bases = _references(path)
            assert not _depends_on(file_modules, file_bases, other), path
            modules |= file_modules
            bases |= file_bases
        for script in sorted((REPO / task).rglob('*.sh')):
            assert not re.search(rf'\b{other}/', script.read_text()), script
        found[task] = modules, bases
    for task in TASKS:
        modules, bases = found[task]
        # the scan sees each package's own links, so its silence about the other one means something
        assert {f'{task}.models', 'vmamba_mm.launch'} <= modules
        assert 'vmamba_mm/configs/vmamba.py' in bases
    for path in sorted((REPO / 'vmamba_mm').rglob('*.py')):
        modules, bases = _references(path)
        assert not any(_depends_on(modules, bases, task) for task in TASKS), path


def test_importing_vmamba_mm_loads_neither_mmdet_nor_mmseg():
    """The shared modules need only mmengine when imported; the task packages bring in their library.
    (vmamba_mm.flops imports a task's data-sample class inside the call that builds that task's model.)"""
    modules = sorted(_module_of(p) for p in (REPO / 'vmamba_mm').glob('*.py'))
    script = (f'import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n'
              'print(sorted({m.split(".")[0] for m in sys.modules} & '
              '{"mmdet", "mmseg", "detection", "segmentation", "mmengine"}))')
    proc = subprocess.run([sys.executable, '-c', script], cwd='/', capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'vmamba_mm.backbone' in modules and 'vmamba_mm.launch' in modules
    assert proc.stdout.strip().splitlines()[-1] == "['mmengine']"
