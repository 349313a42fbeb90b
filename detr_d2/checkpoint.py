"""Loading DETR weights: official DETR ``.pth`` files (converted on load), our own Detectron2
checkpoints, local paths or URLs, always with ``torch.load(weights_only=True)``.

Official checkpoints (github.com/facebookresearch/detr) store ``{"model": state_dict, ...,
"args": argparse.Namespace}`` with a torchvision ResNet under ``backbone.0.body.``; panoptic
ones wrap everything under ``detr.``. Their class head is indexed by dataset category id
(COCO: 92 rows, COCO panoptic: 251 rows, the last row is "no object").
"""

import hashlib
import logging
import os
import pickle
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections import Counter, OrderedDict
from collections.abc import Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from iopath.common.file_io import get_cache_dir

from .checkpoint_fit import CheckpointMismatch, architecture_of_model
from .compat import AtomicWrites, allow_official_args_namespace, let_model_convert
from .errors import UserInputError
from .layout import ClassLayout

logger = logging.getLogger(__name__)

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8})\.pth$")  # torch.hub convention: sha256 prefix


class UnsafeCheckpoint(UserInputError, pickle.UnpicklingError):
    """A checkpoint that pickles objects other than tensors, plain containers and
    ``argparse.Namespace``: refused, as loading it could run code."""


def safe_torch_load(path: str) -> dict:
    """``torch.load(weights_only=True)`` that also accepts the ``argparse.Namespace`` official
    DETR files carry under ``args``, and refuses any other pickled object with a clear error."""
    if not os.path.isfile(path):
        raise UserInputError(f"{path}: no such checkpoint file")
    try:
        # not a ``safe_globals`` block: its exit would remove the Namespace that Detectron2's own
        # checkpointer needs for official files (see detr_d2/compat.py)
        allow_official_args_namespace()
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False, the opposite of ours: keep only the class
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" (it holds {found.group(1)})" if found else ""
        raise UnsafeCheckpoint(
            f"Refusing to load {path}: it contains pickled objects other than tensors, plain "
            f"containers and argparse.Namespace{what}, which could run code when loaded. Only "
            f"load checkpoints you trust; re-save a trusted one as a plain state dict "
            f"(torch.save({{'model': state_dict}}, path))."
        ) from None


def torchvision_resnet_as_official(state_dict: dict[str, torch.Tensor]) -> dict:
    """A torchvision ImageNet ResNet state dict (``conv1``, ``layer1`` ... ``fc``) under the
    backbone prefix of official DETR files, without its classifier and batch counters, so it
    converts as their backbone does (it fills the backbone only: ``MODEL.DETR.INIT.PARTIAL``);
    any other state dict as it is."""
    if not ("conv1.weight" in state_dict and "layer1.0.conv1.weight" in state_dict):
        return state_dict
    return {
        f"backbone.0.body.{k}": v
        for k, v in state_dict.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }


def is_official_detr_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("backbone.0.body.", "detr.backbone.0.body.")) for k in state_dict)


def _rename_official_key(key: str) -> tuple[str, str]:
    """(new key, kind of change) for one key of an official state dict."""
    if key.startswith("detr."):
        key = key[len("detr.") :]
    if key.startswith("backbone.1."):  # learned position embedding lives beside the body
        return "position_embedding." + key[len("backbone.1.") :], "renamed"
    m = re.match(r"^backbone\.0\.body\.(conv1|bn1)\.(.*)$", key)
    if m:
        target = "conv1" if m.group(1) == "conv1" else "conv1.norm"
        return f"backbone.stem.{target}.{m.group(2)}", "renamed"
    m = re.match(r"^backbone\.0\.body\.layer(\d)\.(\d+)\.(conv|bn)(\d)\.(.*)$", key)
    if m:
        stage, block, kind, idx, rest = m.groups()
        norm = ".norm" if kind == "bn" else ""
        return f"backbone.res{int(stage) + 1}.{block}.conv{idx}{norm}.{rest}", "renamed"
    m = re.match(r"^backbone\.0\.body\.layer(\d)\.(\d+)\.downsample\.([01])\.(.*)$", key)
    if m:
        stage, block, idx, rest = m.groups()
        norm = ".norm" if idx == "1" else ""
        return f"backbone.res{int(stage) + 1}.{block}.shortcut{norm}.{rest}", "renamed"
    return key, "kept"


def convert_official_state_dict(
    state_dict: dict[str, torch.Tensor],
    num_classes: int,
    class_rows: Sequence[int] | None = None,
) -> tuple["OrderedDict[str, torch.Tensor]", dict[str, list[str]]]:
    """Official DETR layout -> detr_d2 (Detectron2) layout.

    Args:
        state_dict: an official ``checkpoint["model"]``.
        num_classes: K of the model that will load it.
        class_rows: for each of the K contiguous classes, the checkpoint's class-head row
            (its category id), used when the head has a different number of rows than K + 1.
    Returns:
        the converted state dict, and a report ``{"renamed"|"kept"|"remapped": keys}``. The class
        head is remapped with ``class_rows`` (plus the last, "no object" row) when it has not K + 1
        rows and ``class_rows`` fits it; otherwise it is left as is (the checkpointer then
        re-initialises a head of the wrong size).
    """
    converted: OrderedDict[str, torch.Tensor] = OrderedDict()
    report: dict[str, list[str]] = {"renamed": [], "kept": [], "remapped": []}
    for key, value in state_dict.items():
        new_key, kind = _rename_official_key(key)
        converted[new_key] = value
        report[kind].append(f"{key} -> {new_key}" if kind == "renamed" else key)
    rows = converted["class_embed.weight"].shape[0] if "class_embed.weight" in converted else None
    remappable = (
        class_rows is not None and len(class_rows) == num_classes and max(class_rows) < rows - 1
        if rows
        else False
    )
    if rows is not None and rows != num_classes + 1 and remappable:
        index = torch.as_tensor(list(class_rows) + [rows - 1])
        for name in ("class_embed.weight", "class_embed.bias"):
            converted[name] = converted[name][index].clone()
            report["remapped"].append(f"{name} ({rows} rows -> {num_classes} classes + no-object)")
    return converted, report


def official_head_rows(state_dict: dict[str, torch.Tensor]) -> int | None:
    """Rows of an official state dict's class head (92 COCO, 251 COCO panoptic), if it has one."""
    for key in ("class_embed.weight", "detr.class_embed.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return None


def convert_official_for_model(
    state_dict: dict[str, torch.Tensor], model: torch.nn.Module, layout: ClassLayout, init=None
) -> "OrderedDict[str, torch.Tensor]":
    """An official state dict in ``model``'s layout: keys renamed, then the class head and the
    object queries fitted to the model (:func:`~detr_d2.finetune.adapt_heads` with ``init``, a
    :class:`~detr_d2.finetune.CheckpointInit`: seeded from named classes, or the rows of the
    model's COCO classes, or dropped and re-initialised, each with a log line)."""
    from .finetune import CheckpointInit, adapt_heads, checkpoint_class_layout

    converted, report = convert_official_state_dict(state_dict, layout.num_classes)
    counts = Counter({k: len(v) for k, v in report.items() if v})
    logger.info(
        "Converted an official DETR checkpoint: " + ", ".join(f"{n} {k}" for k, n in counts.items())
    )
    own = model.state_dict()
    init = init or CheckpointInit()
    adapt_heads(converted, own, layout, init, checkpoint_class_layout(converted, None))
    drop_mismatched_heads(converted, own)
    return converted


def drop_mismatched_heads(
    state_dict: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> None:
    """Drop (so they keep their fresh initialisation) the class head and query embeddings of
    ``state_dict`` when their sizes differ from the model's ``own``, with one log line each."""
    checks = [
        ("class_embed", ("class_embed.weight", "class_embed.bias"), "classes", 1),
        ("query_embed", ("query_embed.weight",), "queries", 0),
    ]
    for head, keys, what, extra in checks:
        shapes = {k: tuple(state_dict[k].shape) for k in keys if k in state_dict and k in own}
        if any(shapes[k] != tuple(own[k].shape) for k in shapes):
            ckpt_n = shapes[keys[0]][0] - extra
            model_n = own[keys[0]].shape[0] - extra
            for k in keys:
                state_dict.pop(k, None)
            key = "NUM_CLASSES" if what == "classes" else "NUM_OBJECT_QUERIES"
            logger.info(
                f"Re-initialised {head}: the checkpoint has {ckpt_n} {what}, the model "
                f"{model_n} (MODEL.DETR.{key})."
            )


def stored_class_layout(path: str) -> ClassLayout | None:
    """The class layout a detr_d2 checkpoint was saved with (``None`` for other files)."""
    if not path or re.match(r"^https?://", path) or not os.path.isfile(path):
        return None
    loaded = safe_torch_load(path)
    stored = loaded.get("class_layout") if isinstance(loaded, dict) else None
    return ClassLayout.from_dict(stored) if stored else None


def download_weights(url: str, cache_dir: str | None = None, timeout: float = 15.0) -> str:
    """Download ``url`` once into Detectron2's (iopath's) cache and return the local path.

    The 8 hex digits of official file names (``detr-r50-e632da11.pth``) are a sha256 prefix and
    are checked. Offline, fails at once with what to pass instead.
    """
    cache_dir = cache_dir or os.path.join(get_cache_dir(), "detr_d2")
    filename = os.path.basename(urllib.request.urlparse(url).path)
    local = os.path.join(cache_dir, filename)
    if os.path.isfile(local):
        return local
    os.makedirs(cache_dir, exist_ok=True)
    logger.info(f"Downloading {url} to {local} ...")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            with tempfile.NamedTemporaryFile(dir=cache_dir, delete=False) as tmp:
                shutil.copyfileobj(response, tmp)
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(
            f"Could not download MODEL.WEIGHTS={url} ({e}). This machine may be offline. "
            f"Download the file on a machine with internet access, copy it here, and pass its "
            f"local path instead: MODEL.WEIGHTS /path/to/{filename}"
        ) from None
    expected = _HASH_IN_NAME.search(filename)
    if expected:
        digest = hashlib.sha256()
        with open(tmp.name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if not digest.hexdigest().startswith(expected.group(1)):
            os.unlink(tmp.name)
            raise RuntimeError(
                f"Checksum mismatch for {url}: sha256 starts with {digest.hexdigest()[:8]}, "
                f"the file name says {expected.group(1)}. The download is corrupt; try again."
            )
    os.replace(tmp.name, local)
    return local


class DetrCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that loads everything safely, URLs included, writes atomically,
    and saves the model's class layout beside its weights (``"class_layout"``), so a model
    directory is enough to predict with the right class names.

    Official DETR files are converted by the model itself (``Detr.convert_checkpoint_state_dict``),
    so they load the same way through Detectron2's own ``DetectionCheckpointer``.
    Arguments are those of ``DetectionCheckpointer``.
    """

    def __init__(self, model, save_dir: str = "", **kwargs):
        super().__init__(model, save_dir, **kwargs)
        # fvcore's save and tag_last_checkpoint write through it: atomically (compat item 10)
        self.path_manager = AtomicWrites(self.path_manager)
        # what ``save`` writes as "model": the model's state dict, or e.g. its weight EMA
        self.saved_model_state = None

    def save(self, name: str, **kwargs) -> None:
        """fvcore's ``save``, written atomically: the file is written beside its final name,
        flushed to disk and renamed, and ``last_checkpoint`` is updated the same way afterwards,
        so a run killed at any moment leaves the previous good checkpoint in place. Adds the class
        layout and, when ``saved_model_state`` is set, saves what it returns as "model"."""
        extra = {}
        if self.saved_model_state is not None:
            extra["model"] = self.saved_model_state()
        model = self._unwrapped_model()
        layout = getattr(model, "class_layout", None)
        if layout is not None:
            extra["class_layout"] = layout.to_dict()
            extra["architecture"] = architecture_of_model(model)
        super().save(name, **{**extra, **kwargs})  # fvcore merges kwargs into the file last

    def load(self, path: str, *args, **kwargs):
        if path and re.match(r"^https?://", path):
            path = download_weights(path)
        elif path and not os.path.isfile(self.path_manager.get_local_path(path)):
            raise UserInputError(
                f'MODEL.WEIGHTS={path}: no such file (give the path of a .pth file, or "" '
                f"to start from a fresh model)"
            )
        try:
            return super().load(path, *args, **kwargs)
        except CheckpointMismatch as e:
            raise CheckpointMismatch(f"MODEL.WEIGHTS={path}: {e}") from None

    def _torch_load(self, f: str) -> dict:
        loaded = safe_torch_load(f)
        if isinstance(loaded, dict) and is_official_detr_state_dict(loaded.get("model", loaded)):
            # keep only the weights and the training arguments (checked against the config): the
            # official optimizer/scheduler states do not apply here
            args = {"args": loaded["args"]} if "args" in loaded else {}
            return {"model": loaded.get("model", loaded), **args}
        return loaded

    def _load_model(self, checkpoint: dict):
        # converted first, so that the head check sees this model's names (the wrapped upstream
        # method converts again: a no-op on a converted state dict)
        let_model_convert(self, checkpoint)
        # our own checkpoints of another class or query count (fine-tuning a detr_d2 model)
        drop_mismatched_heads(checkpoint["model"], self._unwrapped_model().state_dict())
        return super()._load_model(checkpoint)

    def _unwrapped_model(self):
        return getattr(self.model, "module", self.model)
