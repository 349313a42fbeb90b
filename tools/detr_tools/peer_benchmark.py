"""Our DETR training step beside Hugging Face transformers' ``DetrForObjectDetection``.

Both models get the same architecture, the same weights (ours copied into theirs, checked in
eval mode), the same batch and the official optimizer recipe, and their steps are timed
interleaved in one process (:func:`detr_tools.benchmark.time_interleaved`), so the ratio says
what our implementation costs against a widely used one on the same machine at the same moment.
transformers is not a dependency of detr_d2: it is imported from a side folder
(:func:`import_transformers`). ``tools/benchmark_peer.py`` is the command line.
"""

import importlib
import logging
import os
import re
import sys

import torch
from detectron2.config import CfgNode

from detr_d2.errors import UserInputError
from detr_tools.benchmark import (
    environment_record,
    first_last_loss,
    memory_record,
    summarize_interleaved,
    synthetic_batch,
    time_interleaved,
    train_call,
)

logger = logging.getLogger(__name__)

PEER_PATH_ENV = "DETR_PEER_PATH"
INSTALL_HINT = (
    "pip install --target /work/hf_side --no-deps transformers huggingface_hub tokenizers "
    "safetensors regex httpx2 httpcore2 anyio idna truststore h11"
)
OURS, PEER = "detr_d2", "transformers"

# ResNet depth -> (HF block type, blocks per stage), as Detectron2's build_resnet_backbone.
RESNET_LAYOUTS = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
}

# Our parameter names (the official repository's outside the backbone) -> HF
# DetrForObjectDetection's. Backbone keys: :func:`_hf_backbone_key`; packed attention
# projections: :func:`to_hf_state_dict`.
_PREFIXES = {
    "position_embedding.row_embed.": "model.position_embedding.row_embeddings.",
    "position_embedding.col_embed.": "model.position_embedding.column_embeddings.",
    "input_proj.": "model.input_projection.",
    "query_embed.": "model.query_position_embeddings.",
    "class_embed.": "class_labels_classifier.",
    "bbox_embed.": "bbox_predictor.",
    "transformer.decoder.norm.": "model.decoder.layernorm.",
}
# Inside model.{encoder,decoder}.layers.i: the post-norm layers of the official transformer.py
# (norm1 after self-attention, the decoder's norm2 after cross-attention, the last after the FFN).
_LAYER_PARTS = {
    "encoder": {
        "self_attn.out_proj": "self_attn.o_proj",
        "linear1": "mlp.fc1",
        "linear2": "mlp.fc2",
        "norm1": "self_attn_layer_norm",
        "norm2": "final_layer_norm",
    },
    "decoder": {
        "self_attn.out_proj": "self_attn.o_proj",
        "multihead_attn.out_proj": "encoder_attn.o_proj",
        "linear1": "mlp.fc1",
        "linear2": "mlp.fc2",
        "norm1": "self_attn_layer_norm",
        "norm2": "encoder_attn_layer_norm",
        "norm3": "final_layer_norm",
    },
}
_LAYER_KEY = re.compile(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_PACKED_KEY = re.compile(
    r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|multihead_attn)\."
    r"in_proj_(weight|bias)$"
)
_ATTENTION = {"self_attn": "self_attn", "multihead_attn": "encoder_attn"}
_HF_BACKBONE = "model.backbone.model."


def import_transformers(peer_path: str | None):
    """The ``transformers`` module, from the side folder ``peer_path`` (appended to
    ``sys.path``, so the environment's own torch and numpy keep precedence), offline: nothing
    may be downloaded. A missing install is a :class:`UserInputError` saying how to make one."""
    # read by huggingface_hub at import time: no hub calls, even for a missing file
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    if peer_path:
        if not os.path.isdir(peer_path):
            raise UserInputError(
                f"--peer-path {peer_path}: no such folder; install transformers there with: "
                f"{INSTALL_HINT}"
            )
        if peer_path not in sys.path:
            sys.path.append(peer_path)
    try:
        return importlib.import_module("transformers")
    except ImportError as e:  # missing, or one of its own dependencies missing
        where = f"--peer-path {peer_path}" if peer_path else f"--peer-path or ${PEER_PATH_ENV}"
        raise UserInputError(
            f"cannot import transformers ({e}) from {where}: install it into a side folder with "
            f"`{INSTALL_HINT}` and pass --peer-path /work/hf_side (or set {PEER_PATH_ENV})"
        ) from None


def _whole(value: float, key: str) -> int:
    """HF's DetrConfig types matching costs and loss weights as ``int``."""
    if float(value) != int(value):
        raise ValueError(f"{key} = {value}: transformers' DetrConfig takes whole numbers only.")
    return int(value)


def hf_detr_config(transformers, cfg: CfgNode):
    """The ``DetrConfig`` of our ``cfg``'s architecture and loss: a local ResNet config (no timm,
    nothing pretrained), dropout ``MODEL.DETR.DROPOUT`` at all three places the official
    transformer has it (HF's defaults leave attention and activation dropout at 0)."""
    detr, resnets = cfg.MODEL.DETR, cfg.MODEL.RESNETS
    if resnets.DEPTH not in RESNET_LAYOUTS:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH {resnets.DEPTH}: the peer model supports {sorted(RESNET_LAYOUTS)}."
        )
    if detr.PRE_NORM or resnets.RES5_DILATION != 1 or cfg.MODEL.MASK_ON:
        raise ValueError(
            "The peer model is plain DETR: set MODEL.DETR.PRE_NORM False, "
            "MODEL.RESNETS.RES5_DILATION 1 and MODEL.MASK_ON False."
        )
    layer_type, depths = RESNET_LAYOUTS[resnets.DEPTH]
    width = resnets.RES2_OUT_CHANNELS
    backbone = transformers.ResNetConfig(
        embedding_size=resnets.STEM_OUT_CHANNELS,
        hidden_sizes=[width * 2**i for i in range(4)],
        depths=depths,
        layer_type=layer_type,
        hidden_act="relu",
        downsample_in_first_stage=False,
        downsample_in_bottleneck=resnets.STRIDE_IN_1X1,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return transformers.DetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=backbone,
        num_labels=detr.NUM_CLASSES,
        num_queries=detr.NUM_OBJECT_QUERIES,
        d_model=detr.HIDDEN_DIM,
        encoder_layers=detr.ENC_LAYERS,
        decoder_layers=detr.DEC_LAYERS,
        encoder_attention_heads=detr.NHEADS,
        decoder_attention_heads=detr.NHEADS,
        encoder_ffn_dim=detr.DIM_FEEDFORWARD,
        decoder_ffn_dim=detr.DIM_FEEDFORWARD,
        dropout=detr.DROPOUT,
        attention_dropout=detr.DROPOUT,
        activation_dropout=detr.DROPOUT,
        position_embedding_type=detr.POSITION_EMBEDDING,
        auxiliary_loss=detr.LOSS.DEEP_SUPERVISION,
        class_cost=_whole(detr.MATCHER.COST_CLASS, "MODEL.DETR.MATCHER.COST_CLASS"),
        bbox_cost=_whole(detr.MATCHER.COST_BBOX, "MODEL.DETR.MATCHER.COST_BBOX"),
        giou_cost=_whole(detr.MATCHER.COST_GIOU, "MODEL.DETR.MATCHER.COST_GIOU"),
        bbox_loss_coefficient=_whole(detr.LOSS.L1_WEIGHT, "MODEL.DETR.LOSS.L1_WEIGHT"),
        giou_loss_coefficient=_whole(detr.LOSS.GIOU_WEIGHT, "MODEL.DETR.LOSS.GIOU_WEIGHT"),
        eos_coefficient=detr.LOSS.NO_OBJECT_WEIGHT,
    )


def _hf_backbone_key(key: str) -> str | None:
    """HF's ResNetBackbone name for a key of Detectron2's ResNet (see detr_d2/checkpoint.py for
    its torchvision names): stage resN is HF's stages.{N-2}, block convK its layer.{K-1}."""
    stem = re.match(r"^backbone\.stem\.conv1\.(norm\.)?(.+)$", key)
    if stem:
        part = "normalization" if stem[1] else "convolution"
        return f"{_HF_BACKBONE}embedder.embedder.{part}.{stem[2]}"
    block = re.match(r"^backbone\.res(\d)\.(\d+)\.(shortcut|conv(\d))\.(norm\.)?(.+)$", key)
    if block:
        stage, index, conv, conv_index, norm, rest = block.groups()
        where = "shortcut" if conv == "shortcut" else f"layer.{int(conv_index) - 1}"
        part = "normalization" if norm else "convolution"
        stages = f"{_HF_BACKBONE}encoder.stages.{int(stage) - 2}"
        return f"{stages}.layers.{index}.{where}.{part}.{rest}"
    return None


def hf_key(key: str) -> str | None:
    """HF's name for our state-dict ``key`` (not for ``in_proj``, which HF splits into three);
    ``None`` when HF has no such tensor."""
    if key.startswith("backbone."):
        return _hf_backbone_key(key)
    layer = _LAYER_KEY.match(key)
    if layer:
        stack, index, part, kind = layer.groups()
        target = _LAYER_PARTS[stack].get(part)
        return f"model.{stack}.layers.{index}.{target}.{kind}" if target else None
    for prefix, target in _PREFIXES.items():
        if key.startswith(prefix):
            return target + key[len(prefix) :]
    return None


def to_hf_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our state dict under HF's names, and our keys it has no place for.

    ``nn.MultiheadAttention``'s packed ``in_proj_weight`` [3C, C] / ``in_proj_bias`` [3C] are
    the query, key and value projections stacked in that order; HF keeps them as ``q_proj``,
    ``k_proj`` and ``v_proj``."""
    converted, unmapped = {}, []
    for key, value in state_dict.items():
        packed = _PACKED_KEY.match(key)
        if packed:
            stack, index, attention, kind = packed.groups()
            prefix = f"model.{stack}.layers.{index}.{_ATTENTION[attention]}"
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                converted[f"{prefix}.{name}.{kind}"] = chunk.clone()
            continue
        target = hf_key(key)
        if target is None:
            unmapped.append(key)
        else:
            converted[target] = value.clone()
    return converted, unmapped


@torch.no_grad()
def vary_constant_tensors(model: torch.nn.Module, seed: int) -> int:
    """Give every floating tensor that initialisation left constant (norm scales and shifts,
    frozen batch norm statistics, attention and FFN biases) values spread around it: positive
    constants within 10 % (variances stay positive), zeros by 0.1 standard normals. Otherwise
    a swapped pair of such tensors would copy into identical outputs. Returns how many changed."""
    generator = torch.Generator().manual_seed(seed)
    varied = 0
    for tensor in model.state_dict().values():
        if not tensor.is_floating_point() or tensor.numel() < 2:
            continue
        value = float(tensor.flatten()[0])
        if not bool((tensor == value).all()):
            continue
        if value > 0:
            tensor.mul_(0.9 + 0.2 * torch.rand(tensor.shape, generator=generator).to(tensor.device))
        else:
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator).to(tensor.device))
        varied += 1
    return varied


def copy_weights(model: torch.nn.Module, hf_model: torch.nn.Module) -> int:
    """Load ``model``'s weights into ``hf_model`` and give HF's backbone our frozen stages
    (HF's own rule freezes by parameter names that its non-timm ResNet does not use: the whole
    backbone ends up frozen). Every tensor on both sides must be matched. Returns how many
    parameter tensors HF's model had trainable as built."""
    converted, unmapped = to_hf_state_dict(model.state_dict())
    missing, unexpected = hf_model.load_state_dict(converted, strict=False)
    assert not (unmapped or missing or unexpected), (
        f"weights copy incomplete: ours without HF name {unmapped}, HF tensors not filled "
        f"{list(missing)}, names HF does not have {list(unexpected)}"
    )
    ours = dict(model.named_parameters())
    hf_params = dict(hf_model.named_parameters())
    trainable_before = sum(p.requires_grad for p in hf_params.values())
    for name, parameter in ours.items():
        target = hf_key(name)
        if target in hf_params:
            hf_params[target].requires_grad_(parameter.requires_grad)
    logger.info(
        f"Copied {len(converted)} tensors into the HF model; its trainable parameters "
        f"{trainable_before} -> {sum(p.requires_grad for p in hf_params.values())} "
        f"(ours: {sum(p.requires_grad for p in ours.values())})."
    )
    return trainable_before


def hf_inputs(model: torch.nn.Module, batch: list[dict]) -> dict:
    """Our batch as HF's model takes it: ``pixel_values`` [N, 3, H, W] normalised and padded by
    our own preprocessing, ``pixel_mask`` [N, H, W] (1 on image pixels), ``labels`` (per image
    ``class_labels`` [G] and ``boxes`` [G, 4] cxcywh relative to the image, our targets)."""
    with torch.no_grad():
        images = model.preprocess_image(batch)
    pixel_mask = torch.zeros(
        images.tensor.shape[0], *images.tensor.shape[-2:], dtype=torch.long, device=model.device
    )
    for mask, (height, width) in zip(pixel_mask, images.image_sizes):
        mask[:height, :width] = 1
    labels = [
        {"class_labels": t["labels"], "boxes": t["boxes"]}
        for t in model.prepare_targets(batch, images.tensor.shape[-2:])
    ]
    return {"pixel_values": images.tensor, "pixel_mask": pixel_mask, "labels": labels}


@torch.no_grad()
def output_differences(model: torch.nn.Module, hf_model: torch.nn.Module, image: dict) -> dict:
    """Max absolute differences of HF's logits and boxes from ours on one image in eval mode.
    HF's decoder with ``auxiliary_loss`` feeds each layer the layer-normed output of the one
    before (the official decoder norms only the copies it returns), so the match is checked
    without it; the difference with it is recorded too."""
    model.eval()
    hf_model.eval()
    ours = model.predict_raw([image])
    inputs = hf_inputs(model, [image])
    differences = {}
    auxiliary = hf_model.config.auxiliary_loss
    for aux in (False, True):
        hf_model.config.auxiliary_loss = aux
        theirs = hf_model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
        suffix = "_hf_aux_loss_on" if aux else ""
        differences[f"logits_max_abs_diff{suffix}"] = float(
            (theirs.logits - ours["pred_logits"]).abs().max()
        )
        differences[f"boxes_max_abs_diff{suffix}"] = float(
            (theirs.pred_boxes - ours["pred_boxes"]).abs().max()
        )
    hf_model.config.auxiliary_loss = auxiliary
    differences["logits_max_abs"] = float(ours["pred_logits"].abs().max())
    return differences


def hf_train_call(cfg: CfgNode, hf_model: torch.nn.Module, inputs: dict):
    """One call = the official training step on HF's model: forward with labels (HF's own
    matcher and loss), backward, ``clip_grad_norm_`` over all trainable parameters, AdamW with
    the backbone at ``BASE_LR * BACKBONE_MULTIPLIER`` (official main.py's two groups, weight
    decay on every parameter). Returns the call and the list its total losses go to."""
    hf_model.train()
    trainable = [(n, p) for n, p in hf_model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in trainable if n.startswith("model.backbone.")]
    rest = [p for n, p in trainable if not n.startswith("model.backbone.")]
    optimizer = torch.optim.AdamW(
        [
            {"params": rest},
            {"params": backbone, "lr": cfg.SOLVER.BASE_LR * cfg.SOLVER.BACKBONE_MULTIPLIER},
        ],
        lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )
    params = [p for _, p in trainable]
    clip = cfg.SOLVER.CLIP_GRADIENTS
    losses = []

    def run():
        loss = hf_model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        if clip.ENABLED:
            torch.nn.utils.clip_grad_norm_(params, clip.CLIP_VALUE, clip.NORM_TYPE)
        optimizer.step()
        losses.append(loss.item())  # as our trainer, which logs its losses every step

    return run, losses


def run_peer_benchmark(
    cfg: CfgNode,
    transformers,
    *,
    build_model,
    batch_size: int = 2,
    image_size: tuple[int, int] = (512, 683),
    warmup: int = 2,
    rounds: int = 10,
    seed: int = 0,
) -> dict:
    """The record of one side-by-side measurement (a JSON-able dict): environment, the weight
    check, and per model the summary of its step times plus every round's time; ``ratio_*`` of
    ``detr_d2`` is ours over HF's per round (below 1: ours is faster).

    Args:
        cfg: our frozen config (fp32, CPU).
        transformers: the module :func:`import_transformers` returned.
        build_model: our model from ``cfg``, as the tools build it.
        batch_size, image_size: the synthetic batch (noise images, 1-6 random boxes each).
        warmup: untimed steps of each model first; rounds: timed steps of each.
    """
    torch.manual_seed(seed)
    model = build_model(cfg)
    hf_model = transformers.DetrForObjectDetection(hf_detr_config(transformers, cfg))
    hf_model.to(model.device)
    varied = vary_constant_tensors(model, seed)
    hf_trainable_as_built = copy_weights(model, hf_model)
    batch = synthetic_batch(
        batch_size, *image_size, cfg.MODEL.DETR.NUM_CLASSES, seed=seed, with_targets=True
    )
    check = {**output_differences(model, hf_model, batch[0]), "varied_constant_tensors": varied}
    logger.info(
        f"Same weights, eval mode, one image: max |HF - ours| logits "
        f"{check['logits_max_abs_diff']:.2e}, boxes {check['boxes_max_abs_diff']:.2e} (with HF's "
        f"auxiliary_loss on: {check['logits_max_abs_diff_hf_aux_loss_on']:.2e}, "
        f"{check['boxes_max_abs_diff_hf_aux_loss_on']:.2e})."
    )
    ours_call, storage = train_call(cfg, model, [batch])
    hf_call, hf_losses = hf_train_call(cfg, hf_model, hf_inputs(model, batch))
    times = time_interleaved(
        {PEER: hf_call, OURS: ours_call}, warmup, rounds, torch.device(cfg.MODEL.DEVICE)
    )
    variants = summarize_interleaved(times, batch_size)
    variants[OURS]["total_loss_first_last"] = first_last_loss(storage)
    variants[PEER]["total_loss_first_last"] = [hf_losses[0], hf_losses[-1]]
    return {
        "task": "train",
        "mode": "interleaved",
        **environment_record(cfg),
        "transformers": transformers.__version__,
        "hf_attention_implementation": hf_model.config._attn_implementation,
        "batch_size": batch_size,
        "image_size": list(image_size),
        "weights_check": check,
        "hf_trainable_tensors_as_built": hf_trainable_as_built,
        "trainable_parameters": {
            OURS: sum(p.numel() for p in model.parameters() if p.requires_grad),
            PEER: sum(p.numel() for p in hf_model.parameters() if p.requires_grad),
        },
        "variants": variants,
        "ratio_ours_to_hf_median": variants[OURS]["ratio_to_first_median"],
        "round_seconds": times,
        **memory_record(torch.device(cfg.MODEL.DEVICE)),
    }
