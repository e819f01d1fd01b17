#!/usr/bin/env bash
# Commands that train and evaluate every published VMamba model.
#
#   bash modelcard.sh --list          names, configs and the checkpoint file each one expects
#   bash modelcard.sh NAME [ARGS...]  run one (extra ARGS go to the underlying tool)
#   DRY_RUN=1 bash modelcard.sh NAME  print the command instead of running it
#
# Paths come from the environment (a clear error names the one that is missing):
#   IMAGENET  ImageFolder root with train/ and val/            (classification)
#   COCO      COCO 2017 root: train2017/ val2017/ annotations/ (detection)
#   ADE20K    ADEChallengeData2016 root: images/ annotations/  (segmentation)
#   CKPT_DIR  folder holding the released checkpoints (names below); detection/segmentation
#             training reads the classification checkpoint from it through the configs
#   OUTPUT    where runs write (default: ./work_dirs/modelcard)
#   GPUS (default 8), NNODES, NODE_RANK, MASTER_ADDR, PORT: the distributed launch
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# name | config | checkpoint file it needs (in $CKPT_DIR)
MODELS="
classification/vmambav2v_tiny_224:train   | classification/configs/vssm/vmambav2v_tiny_224.yaml  | -
classification/vmambav2v_tiny_224:eval    | classification/configs/vssm/vmambav2v_tiny_224.yaml  | vssm1_tiny_0230s_ckpt_epoch_264.pth
classification/vmambav2_small_224:train   | classification/configs/vssm/vmambav2_small_224.yaml  | -
classification/vmambav2_small_224:eval    | classification/configs/vssm/vmambav2_small_224.yaml  | vssm_small_0229_ckpt_epoch_222.pth
classification/vmambav2_base_224:train    | classification/configs/vssm/vmambav2_base_224.yaml   | -
classification/vmambav2_base_224:eval     | classification/configs/vssm/vmambav2_base_224.yaml   | vssm_base_0229_ckpt_epoch_237.pth
classification/vmambav2_tiny_224:train    | classification/configs/vssm/vmambav2_tiny_224.yaml   | -
classification/vmambav2_tiny_224:eval     | classification/configs/vssm/vmambav2_tiny_224.yaml   | vssm_tiny_0230_ckpt_epoch_262.pth
classification/vmambav2v_small_224:train  | classification/configs/vssm/vmambav2v_small_224.yaml | -
classification/vmambav2v_small_224:eval   | classification/configs/vssm/vmambav2v_small_224.yaml | vssm1_small_0229s_ckpt_epoch_240.pth
classification/vmambav2v_base_224:train   | classification/configs/vssm/vmambav2v_base_224.yaml  | -
classification/vmambav2v_base_224:eval    | classification/configs/vssm/vmambav2v_base_224.yaml  | vssm1_base_0229s_ckpt_epoch_225.pth
classification/vmambav0_tiny_224:train    | classification/configs/vssm/vmambav0_tiny_224.yaml   | -
classification/vmambav0_tiny_224:eval     | classification/configs/vssm/vmambav0_tiny_224.yaml   | vssmtiny_dp01_ckpt_epoch_292.pth
classification/vmambav0_small_224:train   | classification/configs/vssm/vmambav0_small_224.yaml  | -
classification/vmambav0_small_224:eval    | classification/configs/vssm/vmambav0_small_224.yaml  | vssmsmall_dp03_ckpt_epoch_238.pth
classification/vmambav0_base_224:train    | classification/configs/vssm/vmambav0_base_224.yaml   | -
classification/vmambav0_base_224:eval     | classification/configs/vssm/vmambav0_base_224.yaml   | vssmbase_dp06_ckpt_epoch_241.pth
detection/mask_rcnn_vssm_fpn_coco_tiny:train         | detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_tiny.py        | vssm1_tiny_0230s_ckpt_epoch_264.pth
detection/mask_rcnn_vssm_fpn_coco_tiny:test          | detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_tiny.py        | mask_rcnn_vssm_fpn_coco_tiny_s_epoch_12.pth
detection/mask_rcnn_vssm_fpn_coco_small:train        | detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_small.py       | vssm_small_0229_ckpt_epoch_222.pth
detection/mask_rcnn_vssm_fpn_coco_small:test         | detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_small.py       | mask_rcnn_vssm_fpn_coco_small_epoch_11.pth
detection/mask_rcnn_vssm_fpn_coco_base:train         | detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_base.py        | vssm_base_0229_ckpt_epoch_237.pth
detection/mask_rcnn_vssm_fpn_coco_base:test          | detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_base.py        | mask_rcnn_vssm_fpn_coco_base_epoch_11.pth
detection/mask_rcnn_vssm_fpn_coco_tiny_ms_3x:train   | detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_tiny_ms_3x.py  | vssm1_tiny_0230s_ckpt_epoch_264.pth
detection/mask_rcnn_vssm_fpn_coco_tiny_ms_3x:test    | detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_tiny_ms_3x.py  | mask_rcnn_vssm_fpn_coco_tiny_ms_3x_s_epoch_31.pth
detection/mask_rcnn_vssm_fpn_coco_small_ms_3x:train  | detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_small_ms_3x.py | vssm_small_0229_ckpt_epoch_222.pth
detection/mask_rcnn_vssm_fpn_coco_small_ms_3x:test   | detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_small_ms_3x.py | mask_rcnn_vssm_fpn_coco_small_ms_3x_epoch_32.pth
detection/vanilla_mask_rcnn_vssm_fpn_coco_tiny:train        | detection/configs/vssm/mask_rcnn_vssm_fpn_coco_tiny.py       | vssmtiny_dp01_ckpt_epoch_292.pth
detection/vanilla_mask_rcnn_vssm_fpn_coco_tiny:test         | detection/configs/vssm/mask_rcnn_vssm_fpn_coco_tiny.py       | vssmtiny_mask_rcnn_swin_fpn_coco_epoch_12.pth
detection/vanilla_mask_rcnn_vssm_fpn_coco_tiny_ms_3x:train  | detection/configs/vssm/mask_rcnn_vssm_fpn_coco_tiny_ms_3x.py | vssmtiny_dp01_ckpt_epoch_292.pth
detection/vanilla_mask_rcnn_vssm_fpn_coco_tiny_ms_3x:test   | detection/configs/vssm/mask_rcnn_vssm_fpn_coco_tiny_ms_3x.py | vssmtiny_mask_rcnn_swin_fpn_coco_ms_3x_epoch_34.pth
segmentation/upernet_vssm_4xb4-160k_ade20k-512x512_tiny:train     | segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py  | vssm1_tiny_0230s_ckpt_epoch_264.pth
segmentation/upernet_vssm_4xb4-160k_ade20k-512x512_tiny:test      | segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py  | upernet_vssm_4xb4-160k_ade20k-512x512_tiny_s_iter_160000.pth
segmentation/upernet_vssm_4xb4-160k_ade20k-512x512_tiny:test-tta  | segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py  | upernet_vssm_4xb4-160k_ade20k-512x512_tiny_s_iter_160000.pth
segmentation/upernet_vssm_4xb4-160k_ade20k-512x512_small:train    | segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_small.py | vssm_small_0229_ckpt_epoch_222.pth
segmentation/upernet_vssm_4xb4-160k_ade20k-512x512_small:test     | segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_small.py | upernet_vssm_4xb4-160k_ade20k-512x512_small_iter_144000.pth
segmentation/upernet_vssm_4xb4-160k_ade20k-512x512_small:test-tta | segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_small.py | upernet_vssm_4xb4-160k_ade20k-512x512_small_iter_144000.pth
segmentation/upernet_vssm_4xb4-160k_ade20k-512x512_base:train     | segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_base.py  | vssm_base_0229_ckpt_epoch_237.pth
segmentation/upernet_vssm_4xb4-160k_ade20k-512x512_base:test      | segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_base.py  | upernet_vssm_4xb4-160k_ade20k-512x512_base_iter_160000.pth
segmentation/upernet_vssm_4xb4-160k_ade20k-512x512_base:test-tta  | segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_base.py  | upernet_vssm_4xb4-160k_ade20k-512x512_base_iter_160000.pth
segmentation/vanilla_upernet_vssm_4xb4-160k_ade20k-512x512_tiny:train     | segmentation/configs/vssm/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py | vssmtiny_dp01_ckpt_epoch_292.pth
segmentation/vanilla_upernet_vssm_4xb4-160k_ade20k-512x512_tiny:test      | segmentation/configs/vssm/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py | vssmtiny_upernet_4xb4-160k_ade20k-512x512_iter_160000.pth
segmentation/vanilla_upernet_vssm_4xb4-160k_ade20k-512x512_tiny:test-tta  | segmentation/configs/vssm/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py | vssmtiny_upernet_4xb4-160k_ade20k-512x512_iter_160000.pth
"

die() { echo "modelcard.sh: $*" >&2; exit 2; }
need() { [ -n "${!1:-}" ] || die "set $1 ($2)"; }
field() { echo "$1" | cut -d'|' -f"$2" | xargs; }

list() {
  printf '%-72s %-66s %s\n' NAME CONFIG "CHECKPOINT (in \$CKPT_DIR)"
  echo "$MODELS" | while IFS= read -r line; do
    [ -n "$line" ] || continue
    printf '%-72s %-66s %s\n' "$(field "$line" 1)" "$(field "$line" 2)" "$(field "$line" 3)"
  done
}

run() {
  if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; else (cd "$ROOT" && "$@"); fi
}

main() {
  [ $# -ge 1 ] || die "usage: bash modelcard.sh --list | NAME [ARGS...]"
  if [ "$1" = "--list" ]; then list; return; fi
  local name=$1; shift
  local line
  line=$(echo "$MODELS" | awk -F'|' -v n="$name" '{k=$1; gsub(/ /, "", k)} k == n {print; exit}')
  [ -n "$line" ] || die "unknown model '$name' (see: bash modelcard.sh --list)"
  local config ckpt task action
  config=$(field "$line" 2); ckpt=$(field "$line" 3)
  task=${name%%/*}; action=${name##*:}
  local stem=${name#*/}; stem=${stem%%:*}
  local out=${OUTPUT:-$ROOT/work_dirs/modelcard}/$stem
  local gpus=${GPUS:-8}
  if [ "$ckpt" != "-" ]; then
    need CKPT_DIR "folder with $ckpt"
    [ -f "$CKPT_DIR/$ckpt" ] || die "$CKPT_DIR/$ckpt does not exist (download the release file '$ckpt')"
    export CKPT_DIR
  fi
  local launch=("${PYTHON:-python}" -m torch.distributed.launch --nnodes "${NNODES:-1}"
                --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}"
                --master_port "${PORT:-29501}" --nproc_per_node "$gpus")
  case "$task" in
    classification)
      need IMAGENET "ImageNet root with train/ and val/"
      local cls=("${launch[@]}" classification/main.py --cfg "$config" --batch-size 128
                 --data-path "$IMAGENET" --output "$out")
      case "$action" in
        train) run "${cls[@]}" "$@" ;;
        eval) run "${cls[@]}" --eval --pretrained "$CKPT_DIR/$ckpt" "$@" ;;
      esac ;;
    detection)
      need COCO "COCO 2017 root with train2017/ val2017/ annotations/"
      local data=(--cfg-options "train_dataloader.dataset.data_root=$COCO/"
                  "val_dataloader.dataset.data_root=$COCO/" "test_dataloader.dataset.data_root=$COCO/"
                  "val_evaluator.ann_file=$COCO/annotations/instances_val2017.json"
                  "test_evaluator.ann_file=$COCO/annotations/instances_val2017.json")
      case "$action" in
        train) run bash detection/tools/dist_train.sh "$config" "$gpus" --work-dir "$out" "${data[@]}" "$@" ;;
        test) run bash detection/tools/dist_test.sh "$config" "$CKPT_DIR/$ckpt" "$gpus" --work-dir "$out" "${data[@]}" "$@" ;;
      esac ;;
    segmentation)
      need ADE20K "ADEChallengeData2016 root with images/ annotations/"
      local data=(--cfg-options "train_dataloader.dataset.data_root=$ADE20K/"
                  "val_dataloader.dataset.data_root=$ADE20K/" "test_dataloader.dataset.data_root=$ADE20K/")
      case "$action" in
        train) run bash segmentation/tools/dist_train.sh "$config" "$gpus" --work-dir "$out" "${data[@]}" "$@" ;;
        test) run bash segmentation/tools/dist_test.sh "$config" "$CKPT_DIR/$ckpt" "$gpus" --work-dir "$out" "${data[@]}" "$@" ;;
        test-tta) run bash segmentation/tools/dist_test.sh "$config" "$CKPT_DIR/$ckpt" "$gpus" --tta --work-dir "$out" "${data[@]}" "$@" ;;
      esac ;;
  esac
}

main "$@"
