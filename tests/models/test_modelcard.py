"""modelcard.sh: every published model is listed with its config and checkpoint; runs check env."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLASSIFICATION = ('vmambav2v_tiny_224', 'vmambav2_small_224', 'vmambav2_base_224', 'vmambav2_tiny_224',
                  'vmambav2v_small_224', 'vmambav2v_base_224', 'vmambav0_tiny_224',
                  'vmambav0_small_224', 'vmambav0_base_224')


def modelcard(*args, **env):
    return subprocess.run(['bash', str(REPO / 'modelcard.sh'), *args], cwd='/tmp', text=True,
                          capture_output=True, env={'PATH': os.environ['PATH'], **env}, timeout=60)


def test_list_covers_every_published_model():
    proc = modelcard('--list')
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[1:]}
    for name in CLASSIFICATION:
        assert f'classification/{name}:train' in rows and f'classification/{name}:eval' in rows
    for size in ('tiny', 'small', 'base'):
        assert f'detection/mask_rcnn_vssm_fpn_coco_{size}:test' in rows
        assert f'segmentation/upernet_vssm_4xb4-160k_ade20k-512x512_{size}:test-tta' in rows
    assert rows['detection/mask_rcnn_vssm_fpn_coco_tiny:test'][1] == 'mask_rcnn_vssm_fpn_coco_tiny_s_epoch_12.pth'
    assert rows['classification/vmambav2v_tiny_224:eval'][1] == 'vssm1_tiny_0230s_ckpt_epoch_264.pth'
    for config, _ in rows.values():
        assert (REPO / config).is_file(), config


def test_run_names_what_is_missing(tmp_path):
    proc = modelcard('detection/mask_rcnn_vssm_fpn_coco_tiny:test')
    assert proc.returncode == 2 and 'CKPT_DIR' in proc.stderr
    proc = modelcard('detection/mask_rcnn_vssm_fpn_coco_tiny:test', CKPT_DIR=str(tmp_path))
    assert proc.returncode == 2 and 'mask_rcnn_vssm_fpn_coco_tiny_s_epoch_12.pth' in proc.stderr
    (tmp_path / 'upernet_vssm_4xb4-160k_ade20k-512x512_tiny_s_iter_160000.pth').touch()
    proc = modelcard('segmentation/upernet_vssm_4xb4-160k_ade20k-512x512_tiny:test-tta',
                     CKPT_DIR=str(tmp_path), ADE20K='/data/ade', DRY_RUN='1', GPUS='1')
    assert proc.returncode == 0, proc.stderr
    assert 'segmentation/tools/dist_test.sh' in proc.stdout and '--tta' in proc.stdout
    assert 'test_dataloader.dataset.data_root=/data/ade/' in proc.stdout
    assert modelcard('no/such:model').returncode == 2
