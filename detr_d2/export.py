"""Export DETR to TorchScript or ONNX, and run the exported graphs behind the model's interface.

The exported graph is the inference model (batch norms folded, no criterion or matcher):

    inputs:  images      float32 [N, 3, H, W], 0-255 in ``INPUT.FORMAT`` channel order, each
                         image at the top-left, any padding (its values are ignored);
             image_sizes int64 [N, 2], (height, width) of each unpadded image.
    outputs: pred_logits [N, Q, K+1], pred_boxes [N, Q, 4] (raw heads: cxcywh relative to each
             image), scores [N, Q], classes int64 [N, Q], boxes [N, Q, 4] (xyxy pixels of each
             image; the official ``PostProcess``), and with ``MODEL.MASK_ON`` pred_masks
             [N, Q, H4, W4] (mask logits on the padded grid, H4 x W4 = 1/4 of H x W).

Normalization, the padding mask and the position encoding are computed in the graph from
``image_sizes``, so one graph serves every image size and batches of differently sized images.
A JSON file beside the model (:data:`META_FILE`) holds what a deployment needs without the
config: input format, pixel mean/std, test resize, class names and post-processing thresholds.
:class:`ExportedDetr` runs an export directory with TorchScript or onnxruntime and returns
Detectron2's output dicts through the same post-processing as :class:`Detr`.
"""

import copy
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import ImageList
from torch import nn

from .modeling.box_ops import box_cxcywh_to_xyxy
from .modeling.detr import Detr
from .modeling.inference_graph import inference_model
from .modeling.postprocessing import PostprocessOptions, class_probabilities, inference_results
from .precision import PRECISIONS

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "EXPORT_FORMATS",
    "DetrExportGraph",
    "ExportedDetr",
    "export_model",
    "exported_model",
    "pad_batch",
]

EXPORT_FORMATS = ("torchscript", "onnx")
BACKENDS = ("pytorch", "torchscript", "onnxruntime")
META_FILE = "detr_export.json"
MODEL_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
INPUT_NAMES = ("images", "image_sizes")
DETECTION_OUTPUTS = ("pred_logits", "pred_boxes", "scores", "classes", "boxes")
MASK_OUTPUT = "pred_masks"
# ONNX opset of the dynamo exporter's default translation table (onnxscript 0.7)
ONNX_OPSET = 18


class DetrExportGraph(nn.Module):
    """The traced function: a raw padded batch and its sizes in, raw and post-processed outputs
    out (see the module docstring). Everything shape-dependent is computed from tensors, so the
    trace keeps no image size."""

    def __init__(self, model: Detr):
        super().__init__()
        assert not model.training, "export the model in eval mode"
        self.model = model

    @property
    def output_names(self) -> tuple[str, ...]:
        return DETECTION_OUTPUTS + ((MASK_OUTPUT,) if self.model.mask_on else ())

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        image_sizes = image_sizes.to(torch.int64)
        # zeros after normalization on the padding, as the official batching (whatever came in)
        padding = model.padding_mask(ImageList(images, image_sizes), images.shape[-2:])
        pixels = (images - model.pixel_mean) / model.pixel_std
        if model.input_format == "BGR":
            pixels = pixels.flip(1)
        pixels = pixels.masked_fill(padding[:, None], 0.0)
        outputs = model._test_heads(ImageList(pixels, image_sizes), with_aux=False)
        # official PostProcess (softmax without "no object", or the sigmoid scores of models
        # trained with a sigmoid class loss), boxes scaled by each image's size
        activation = model.postprocess.score_activation
        scores, classes = class_probabilities(outputs["pred_logits"], activation).max(-1)
        height_width = image_sizes.to(torch.float32)
        scale = height_width[:, [1, 0, 1, 0]][:, None]  # [N, 1, 4] (w, h, w, h)
        boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"]) * scale
        result = (outputs["pred_logits"], outputs["pred_boxes"], scores, classes, boxes)
        if model.mask_on:
            result += (outputs["pred_masks"],)
        return result


def pad_batch(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 [N, 3, H, W] zero-padded at the bottom/right, int64 [N, 2] sizes) of CHW images,
    the graph's inputs."""
    sizes = torch.as_tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.int64)
    height, width = sizes.max(0).values.tolist()
    batch = torch.zeros((len(images), 3, height, width), dtype=torch.float32)
    for i, image in enumerate(images):
        batch[i, :, : image.shape[-2], : image.shape[-1]] = image.float()
    return batch, sizes


def example_images(image: torch.Tensor) -> list[torch.Tensor]:
    """Two differently sized CHW images for tracing: ``image`` and a crop of it. Tracing with a
    padded batch of two keeps the batch and padding paths general (torch.export specialises
    dimensions of size 1)."""
    height, width = image.shape[-2:]
    return [image, image[:, : max(32, height * 3 // 4), : max(32, width * 5 // 6)]]


def class_names_from_cfg(cfg: CfgNode) -> list[str]:
    """Class names of ``DATASETS.TEST[0]`` when they match ``MODEL.DETR.NUM_CLASSES`` (stuff
    names for panoptic layouts), else "class <i>"."""
    num_classes = cfg.MODEL.DETR.NUM_CLASSES
    if len(cfg.DATASETS.TEST):
        name = cfg.DATASETS.TEST[0]
        if "thing_classes" not in MetadataCatalog.get(name).as_dict() and name in DatasetCatalog:
            try:
                DatasetCatalog.get(name)  # COCO-json loaders set the class names on first load
            except OSError as e:  # files not on this machine: names are optional
                logger.warning(f"Class names of {name!r} unavailable ({e}).")
        meta = MetadataCatalog.get(name)
        for key in ("stuff_classes", "thing_classes"):
            names = meta.get(key)
            if names and len(names) == num_classes:
                return list(names)
    return [f"class {i}" for i in range(num_classes)]


def _export_copy(model: Detr, cfg: CfgNode, precision: str) -> Detr:
    """An eval-mode copy of ``model`` as it runs inference (folded batch norms), without the
    training-only criterion, running in ``precision``."""
    if cfg.TEST.COMPILE:
        raise ValueError("TEST.COMPILE must be False for export: torch.compile does not trace.")
    exported = inference_model(model.eval(), cfg)
    if exported is model:
        exported = copy.deepcopy(model)
    exported.criterion = None  # Hungarian matcher (scipy) and losses are training-only
    exported.test_precision = PRECISIONS[precision]
    return exported.eval()


def _trace_torchscript(graph: DetrExportGraph, example: tuple[torch.Tensor, ...], path: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        traced = torch.jit.trace(graph, example, check_trace=False)
    package = str(Path(__file__).parent)
    for warning in caught:
        # A TracerWarning in our code means a value was frozen into the graph: refuse the
        # export. Those of PyTorch's attention and Detectron2's Conv2d are shape assertions.
        if issubclass(warning.category, torch.jit.TracerWarning) and warning.filename.startswith(
            package
        ):
            raise RuntimeError(
                f"Tracing froze a value into the graph at {warning.filename}:{warning.lineno}: "
                f"{warning.message}"
            )
    traced.save(str(path))


def _export_onnx(graph: DetrExportGraph, example: tuple[torch.Tensor, ...], path: Path):
    batch = torch.export.Dim("batch", min=1, max=64)
    height = torch.export.Dim("height", min=32, max=4096)
    width = torch.export.Dim("width", min=32, max=4096)
    program = torch.onnx.export(
        graph,
        example,
        dynamic_shapes={"images": {0: batch, 2: height, 3: width}, "image_sizes": {0: batch}},
        input_names=list(INPUT_NAMES),
        output_names=list(graph.output_names),
        opset_version=ONNX_OPSET,
        dynamo=True,
        optimize=True,
        external_data=False,
    )
    program.save(str(path))


def export_model(
    model: Detr,
    cfg: CfgNode,
    export_format: str,
    output_dir: str,
    sample_image: torch.Tensor,
    precision: str = "fp32",
) -> Path:
    """Export ``model`` (in ``INPUT.FORMAT``, loaded weights) to ``output_dir`` and write the
    metadata JSON beside it; returns the model file.

    Args:
        export_format: "torchscript" or "onnx".
        sample_image: uint8/float CHW image in ``INPUT.FORMAT``, already test-resized, to trace
            with (the graph is not specialised to its size).
        precision: "fp32" always; "bf16" (CPU or GPU) and "fp16" (GPU) for TorchScript only
            (onnxruntime's CPU kernels are fp32).
    """
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {EXPORT_FORMATS}, got {export_format!r}.")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {list(PRECISIONS)}, got {precision!r}.")
    if export_format == "onnx" and precision != "fp32":
        raise ValueError(
            f"--precision {precision} is not available for ONNX: onnxruntime's CPU provider has "
            "no bf16/fp16 convolution kernels. Export fp32, or use --format torchscript."
        )
    if precision == "fp16" and torch.device(cfg.MODEL.DEVICE).type == "cpu":
        raise ValueError("--precision fp16 needs MODEL.DEVICE cuda; use bf16 on CPU.")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    graph = DetrExportGraph(_export_copy(model, cfg, precision)).eval()
    images, sizes = pad_batch(example_images(sample_image))
    example = (images.to(graph.model.device), sizes.to(graph.model.device))
    path = output / MODEL_FILES[export_format]
    logger.info(
        f"Exporting {export_format} ({precision}) with a traced batch of sizes {sizes.tolist()}."
    )
    with torch.no_grad():
        if export_format == "torchscript":
            _trace_torchscript(graph, example, path)
        else:
            _export_onnx(graph, example, path)
    meta = export_metadata(cfg, graph, export_format, precision, path.name)
    (output / META_FILE).write_text(json.dumps(meta, indent=1))
    logger.info(f"Wrote {path} and {output / META_FILE}.")
    return path


def export_metadata(
    cfg: CfgNode, graph: DetrExportGraph, export_format: str, precision: str, model_file: str
) -> dict:
    """What a deployment needs besides the graph (see the module docstring)."""
    model = graph.model
    return {
        "format": export_format,
        "model_file": model_file,
        "precision": precision,
        "input_names": list(INPUT_NAMES),
        "output_names": list(graph.output_names),
        "input_format": model.input_format,
        "input_layout": "images float32 [N,3,H,W] 0-255, top-left, padded; image_sizes int64 [N,2]",
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "pixel_std": model.pixel_std.flatten().tolist(),
        "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        "class_names": class_names_from_cfg(cfg),
        "postprocess": asdict(model.postprocess),
        "torch_version": torch.__version__,
    }


class ExportedDetr:
    """An export directory run by TorchScript or onnxruntime, called like :class:`Detr` in eval
    mode: Detectron2 input dicts (``image`` CHW in the export's input format, optional
    ``height``/``width``) in, ``instances`` / ``sem_seg`` / ``panoptic_seg`` dicts out."""

    def __init__(self, directory: str, backend: str, device: str = "cpu", num_threads: int = 0):
        """
        Args:
            directory: an ``--output`` folder of ``tools/export_model.py``.
            backend: "torchscript" (a ``model.ts``) or "onnxruntime" (a ``model.onnx``).
            num_threads: onnxruntime intra-op threads (0: torch's thread count, for fair timing).
        """
        meta_path = Path(directory) / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found: pass the --output folder of tools/export_model.py."
            )
        self.meta = json.loads(meta_path.read_text())
        wanted = {"torchscript": "torchscript", "onnxruntime": "onnx"}.get(backend)
        if wanted is None:
            raise ValueError(f"backend must be 'torchscript' or 'onnxruntime', got {backend!r}.")
        if self.meta["format"] != wanted:
            raise ValueError(
                f"--backend {backend} needs a model exported with --format {wanted}, but "
                f"{directory} holds a {self.meta['format']} export ({self.meta['model_file']})."
            )
        self.backend = backend
        self.device = torch.device(device)
        self.options = PostprocessOptions(**self.meta["postprocess"])
        path = str(Path(directory) / self.meta["model_file"])
        if backend == "torchscript":
            self._module = torch.jit.load(path, map_location=self.device).eval()
        else:
            import onnxruntime  # optional dependency, only needed for this backend

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = num_threads or torch.get_num_threads()
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda":
                providers.insert(0, "CUDAExecutionProvider")
            self._session = onnxruntime.InferenceSession(path, options, providers=providers)

    @property
    def input_format(self) -> str:
        return self.meta["input_format"]

    def eval(self) -> "ExportedDetr":
        """No-op, so code written for ``nn.Module`` models runs exported ones too."""
        return self

    def run_graph(self, images: torch.Tensor, image_sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        """The graph's outputs, by name, as fp32/int64 CPU tensors (inputs as :func:`pad_batch`)."""
        if self.backend == "torchscript":
            with torch.no_grad():
                values = self._module(images.to(self.device), image_sizes.to(self.device))
            values = [v.float() if v.is_floating_point() else v for v in values]
        else:
            feeds = {"images": images.float().numpy(), "image_sizes": image_sizes.numpy()}
            values = [torch.from_numpy(v) for v in self._session.run(None, feeds)]
        return {name: value.cpu() for name, value in zip(self.meta["output_names"], values)}

    def __call__(self, batched_inputs: list[dict]) -> list[dict]:
        images, sizes = pad_batch([x["image"] for x in batched_inputs])
        outputs = self.run_graph(images, sizes)
        image_sizes = [tuple(s) for s in sizes.tolist()]
        output_sizes = [
            (x.get("height", h), x.get("width", w))
            for x, (h, w) in zip(batched_inputs, image_sizes)
        ]
        return inference_results(
            outputs, self.options, tuple(images.shape[-2:]), image_sizes, output_sizes
        )


def exported_model(cfg: CfgNode, backend: str, directory: str | None) -> ExportedDetr:
    """The ``--backend`` / ``--exported`` model of the tools: the export in ``directory``, with
    the outputs and thresholds of ``cfg`` (``MODEL.DETR.TEST``), so that it computes what the
    PyTorch model of ``cfg`` would."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {backend!r}.")
    if not directory:
        raise ValueError(
            f"--backend {backend} needs --exported DIR (an output of tools/export_model.py)."
        )
    model = ExportedDetr(directory, backend, device=cfg.MODEL.DEVICE)
    test = cfg.MODEL.DETR.TEST
    if (test.SEMANTIC_ON or test.PANOPTIC_ON) and not model.options.mask_on:
        raise ValueError(
            f"MODEL.DETR.TEST.SEMANTIC_ON/PANOPTIC_ON need mask logits, but the export in "
            f"{directory} has none: export a MODEL.MASK_ON model."
        )
    if cfg.INPUT.FORMAT != model.input_format:
        raise ValueError(
            f"INPUT.FORMAT={cfg.INPUT.FORMAT!r} but the export in {directory} takes "
            f"{model.input_format!r} images: use the config it was exported with."
        )
    model.options = replace(
        model.options,
        instance_on=test.INSTANCE_ON,
        semantic_on=test.SEMANTIC_ON,
        panoptic_on=test.PANOPTIC_ON,
        panoptic_threshold=test.PANOPTIC_THRESHOLD,
        mask_threshold=test.MASK_THRESHOLD,
    )
    return model
