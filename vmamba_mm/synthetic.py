"""A small offline dataset of coloured shapes, for running detection and segmentation end to end.

One scene generator feeds two writers:

- COCO instances (``<out>/coco``): ``{train,val}/*.jpg`` and ``annotations/instances_{train,val}.json``
  with one category per shape, tight boxes (xywh) and polygon masks — what ``CocoDataset`` and the
  pycocotools ``CocoMetric`` read.
- ADE20K layout (``<out>/ade``): ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png`` label maps where 0 is "ignore" (ADE20K's
  ``reduce_zero_label``), the background is 1 (ADE class 0) and shape ``k`` is ``k + 2``.

Each shape class has its own colour family, so a detector learns it within a few hundred
iterations. Usage: ``python -m vmamba_mm.synthetic OUT [--size 512] [--num-train 200] [--num-val 20]``.
"""
import argparse
import json
import os

import cv2
import numpy as np

CLASSES = ('rectangle', 'ellipse', 'triangle')
# mean BGR colour per class; each object jitters around it
_CLASS_BGR = ((40, 40, 200), (40, 190, 40), (200, 60, 40))


def _polygon(rng, kind, cx, cy, r):
    if kind == 'rectangle':
        w, h = r * rng.uniform(0.6, 1.0, size=2)
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
    elif kind == 'ellipse':
        a, b = r * rng.uniform(0.55, 1.0, size=2)
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        pts = np.stack([a * np.cos(t), b * np.sin(t)], 1)
    else:
        t = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    angle = rng.uniform(0, np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return pts @ rot.T + np.array([cx, cy])


def draw_scene(rng, size, max_objects=4):
    """Returns (BGR image, [(class index, polygon (n, 2) float, mask (size, size) bool)])."""
    base = rng.integers(60, 200, size=3)
    ramp = np.linspace(-30, 30, size)[None, :, None] * rng.uniform(-1, 1, size=3)
    image = base + ramp + rng.normal(0, 12, size=(size, size, 3))
    occupied = np.zeros((size, size), bool)
    objects = []
    for _ in range(rng.integers(1, max_objects + 1)):
        label = int(rng.integers(len(CLASSES)))
        r = rng.uniform(0.08, 0.22) * size
        cx, cy = rng.uniform(r, size - r, size=2)
        poly = np.clip(_polygon(rng, CLASSES[label], cx, cy, r), 0, size - 1)
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
        mask = mask.astype(bool)
        if mask.sum() < 16 or (mask & occupied).any():
            continue
        occupied |= mask
        image[mask] = np.array(_CLASS_BGR[label]) + rng.normal(0, 20, size=3)
        objects.append((label, poly, mask))
    return np.clip(image, 0, 255).astype(np.uint8), objects


def write_coco(out, num_train, num_val, size, seed=0):
    """Writes ``out/{train,val}/*.jpg`` and ``out/annotations/instances_{train,val}.json``."""
    rng = np.random.default_rng(seed)
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)]
    os.makedirs(os.path.join(out, 'annotations'), exist_ok=True)
    ann_id = 1
    for split, count in (('train', num_train), ('val', num_val)):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image, objects = draw_scene(rng, size)
            name = f'{split}_{i:05d}.jpg'
            cv2.imwrite(os.path.join(out, split, name), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            images.append(dict(id=i + 1, file_name=name, height=size, width=size))
            for label, poly, mask in objects:
                ys, xs = np.nonzero(mask)
                x0, y0 = float(xs.min()), float(ys.min())
                annotations.append(dict(
                    id=ann_id, image_id=i + 1, category_id=label + 1, iscrowd=0,
                    bbox=[x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0],
                    area=float(mask.sum()),
                    segmentation=[[round(float(v), 2) for v in poly.reshape(-1)]]))
                ann_id += 1
        with open(os.path.join(out, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories), f)


def write_ade(out, num_train, num_val, size, seed=1):
    """Writes ``out/images/{training,validation}/*.jpg`` and label maps beside them."""
    rng = np.random.default_rng(seed)
    for split, count in (('training', num_train), ('validation', num_val)):
        for sub in ('images', 'annotations'):
            os.makedirs(os.path.join(out, sub, split), exist_ok=True)
        for i in range(count):
            image, objects = draw_scene(rng, size)
            label_map = np.ones((size, size), np.uint8)
            for label, _, mask in objects:
                label_map[mask] = label + 2
            name = f'ADE_{split}_{i:08d}'
            cv2.imwrite(os.path.join(out, 'images', split, name + '.jpg'), image,
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(os.path.join(out, 'annotations', split, name + '.png'), label_map)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out', help='writes OUT/coco and OUT/ade')
    parser.add_argument('--size', type=int, default=512, help='square image side in pixels')
    parser.add_argument('--num-train', type=int, default=200)
    parser.add_argument('--num-val', type=int, default=20)
    parser.add_argument('--task', choices=('det', 'seg', 'both'), default='both')
    args = parser.parse_args(argv)
    if args.task in ('det', 'both'):
        write_coco(os.path.join(args.out, 'coco'), args.num_train, args.num_val, args.size)
    if args.task in ('seg', 'both'):
        write_ade(os.path.join(args.out, 'ade'), args.num_train, args.num_val, args.size)
    print(f'wrote {args.num_train} train / {args.num_val} val images of {args.size}px '
          f'({args.task}) under {args.out}')


if __name__ == '__main__':
    main()
