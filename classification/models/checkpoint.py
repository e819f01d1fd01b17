"""Loading VMamba weights: the authors' release files, our own checkpoints, or bare state_dicts.

``load_state_dict_from(source)`` accepts a path, a full checkpoint dict (``{"model": ...,
"model_ema": ..., ...}`` or mmengine's ``{"state_dict": {"backbone.*": ...}}``) or a bare
state_dict, and says which one it found. ``load_pretrained(model, source)`` loads it into any model (ours or a
timm baseline), checking shapes first so that a mismatch names the key, and returns a report of what did not
match. A model that knows other checkpoint layouts (VSSM: the authors' legacy key names) maps them in its
``filter_checkpoint(state_dict)``, which load_pretrained calls.
"""
import logging
import os
import pickle

import torch

__all__ = ["load_state_dict_from", "load_pretrained", "LoadReport", "torch_load_cpu"]

logger = logging.getLogger(__name__)

# checkpoint-dict keys holding a state_dict, in order of preference
STATE_DICT_KEYS = ("model", "state_dict", "model_ema")


def _is_state_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def torch_load_cpu(path):
    """A checkpoint file onto the CPU: .safetensors, or torch.load with the safe ``weights_only`` reader first and
    the full unpickler for files that also hold other Python objects."""
    if os.fspath(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # the authors' files pickle their yacs config next to the weights
        return torch.load(path, map_location="cpu", weights_only=False)


def load_state_dict_from(source, key=None):
    """-> (state_dict, kind), kind a short description such as "checkpoint['model']".

    ``key`` picks a checkpoint entry (e.g. "model_ema"); by default the first of
    STATE_DICT_KEYS present. DDP ``module.`` prefixes are removed; for an mmengine checkpoint
    only the ``backbone.`` weights are kept, without the prefix.
    """
    where = ""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        source, where = torch_load_cpu(path), f" in {path}"
    if not isinstance(source, dict):
        raise TypeError(f"expected a path, a checkpoint dict or a state_dict, got {type(source).__name__}")

    if key is not None:
        if key not in source:
            raise KeyError(f"checkpoint{where} has no entry {key!r}; entries: {sorted(map(str, source))}")
        state_dict, kind = source[key], f"checkpoint[{key!r}]"
    elif _is_state_dict(source):
        state_dict, kind = source, "state_dict"
    else:
        found = [k for k in STATE_DICT_KEYS if k in source]
        if not found:
            raise ValueError(f"no state_dict found{where}: top-level entries are {sorted(map(str, source))[:20]}")
        state_dict, kind = source[found[0]], f"checkpoint[{found[0]!r}]"
    if not _is_state_dict(state_dict):
        raise ValueError(f"{kind}{where} is not a state_dict of tensors")

    state_dict = dict(state_dict)
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
        kind += " (DDP 'module.' prefix removed)"
    if kind == "checkpoint['state_dict']" and any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        kind += " (mmengine backbone.* weights)"
    return state_dict, kind + where


class LoadReport(dict):
    """kind, missing, unexpected, ignored, expected_missing, new_head (key lists); ``ok`` when nothing
    unexplained is left."""

    @property
    def ok(self):
        return not self["missing"] and not self["unexpected"]

    def __str__(self):
        parts = [f"loaded {self['kind']}"]
        for name in ("missing", "unexpected", "ignored", "expected_missing", "new_head"):
            if self.get(name):
                keys = self[name]
                parts.append(f"{name} {len(keys)}: {keys[:8]}{' ...' if len(keys) > 8 else ''}")
        return "; ".join(parts)


def _shapes_match(model_shape, ckpt_shape):
    # Linear2d accepts a conv-shaped (out, in, 1, 1) weight
    return model_shape == ckpt_shape or (len(ckpt_shape) == 4 and ckpt_shape[2:] == (1, 1)
                                         and model_shape == ckpt_shape[:2])


def load_pretrained(model, source, key=None, strict=True, ignore_prefixes=(), expected_missing_prefixes=(),
                    new_head_prefixes=()):
    """Load ``source`` (see load_state_dict_from) into ``model``; returns a LoadReport.

    ``ignore_prefixes``: checkpoint keys dropped before loading (reported as ignored).
    ``expected_missing_prefixes``: model keys allowed to be absent (reported separately).
    ``new_head_prefixes``: a classifier head whose checkpoint tensors do not fit the model (another number of
    classes, or none) is not loaded and stays at its initialisation (reported as new_head).
    With ``strict`` any other missing or unexpected key is an error; without it they are reported
    and logged. A shape mismatch is always an error naming the key.
    """
    state_dict, kind = load_state_dict_from(source, key)
    filter_checkpoint = getattr(model, "filter_checkpoint", None)
    state_dict = filter_checkpoint(state_dict) if filter_checkpoint is not None else dict(state_dict)
    ignored = sorted(k for k in state_dict if k.startswith(tuple(ignore_prefixes)))
    for k in ignored:
        del state_dict[k]

    own = model.state_dict()
    new_head = [k for k, v in state_dict.items() if k.startswith(tuple(new_head_prefixes))
                and (k not in own or not _shapes_match(own[k].shape, v.shape))]
    for k in new_head:
        del state_dict[k]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and not _shapes_match(own[k].shape, v.shape)]
    if mismatched:
        raise ValueError(f"shape mismatch loading {kind}:\n  " + "\n  ".join(mismatched))

    result = model.load_state_dict(state_dict, strict=False)
    expected = tuple(expected_missing_prefixes) + (tuple(new_head_prefixes) if new_head else ())
    report = LoadReport(
        kind=kind,
        missing=[k for k in result.missing_keys if not k.startswith(expected)] if expected else list(result.missing_keys),
        expected_missing=[k for k in result.missing_keys if expected and k.startswith(expected)],
        unexpected=list(result.unexpected_keys),
        ignored=ignored,
        new_head=new_head,
    )
    if strict and not report.ok:
        raise RuntimeError(f"strict load of {kind} failed: missing {report['missing']}, "
                           f"unexpected {report['unexpected']}")
    (logger.info if report.ok else logger.warning)(str(report))
    return report
