"""Training-only parts that speed up DETR's convergence without changing its inference graph
(docs/convergence.md): Group DETR's query groups, H-DETR's one-to-many queries, DN-DETR's
denoising queries and a dense auxiliary head on the encoder.

Each is a :class:`TrainingAid` that adds its queries (with the self-attention mask that keeps
them apart) and its :class:`~detr_d2.modeling.criterion.LossBranch` through the same two
methods; ``Detr`` keeps them under ``train_only``, and inference never calls them.
"""

from .base import (
    DecoderQueries,
    ExtraQueries,
    LearnedQueries,
    TrainingAid,
    TrainingStep,
    aids_in,
    block_diagonal_mask,
    init_learned_queries,
    train_only_modules,
)
from .denoising import DenoisingQueries
from .dense_head import DenseAuxHead
from .one_to_many import OneToManyQueries
from .query_groups import QueryGroups

__all__ = [
    "DecoderQueries",
    "DenoisingQueries",
    "DenseAuxHead",
    "ExtraQueries",
    "LearnedQueries",
    "OneToManyQueries",
    "QueryGroups",
    "TrainingAid",
    "TrainingStep",
    "aids_in",
    "block_diagonal_mask",
    "build_training_aids",
    "init_learned_queries",
    "train_only_modules",
]


def build_training_aids(cfg, num_classes: int) -> list[TrainingAid]:
    """The aids ``cfg.MODEL.DETR.TRAINING_AIDS`` switches on (``QUERY_GROUPS`` > 1,
    ``ONE_TO_MANY.NUM_QUERIES`` > 0, ``DENSE_AUX.ENABLED``, ``DENOISING.GROUPS`` > 0), in the order
    they run."""
    detr, aids = cfg.MODEL.DETR, cfg.MODEL.DETR.TRAINING_AIDS
    for key, value, least in (
        ("QUERY_GROUPS", aids.QUERY_GROUPS, 1),
        ("ONE_TO_MANY.NUM_QUERIES", aids.ONE_TO_MANY.NUM_QUERIES, 0),
        ("DENOISING.GROUPS", aids.DENOISING.GROUPS, 0),
    ):
        if value < least:
            raise ValueError(
                f"MODEL.DETR.TRAINING_AIDS.{key} must be >= {least} ({least} = off), got {value}."
            )
    # built in this order so that a seed gives the same initial weights as earlier versions
    groups = one_to_many = dense = denoising = None
    if aids.QUERY_GROUPS > 1:
        groups = QueryGroups(
            hidden_dim=detr.HIDDEN_DIM,
            num_queries=detr.NUM_OBJECT_QUERIES,
            num_groups=aids.QUERY_GROUPS,
        )
    if aids.ONE_TO_MANY.NUM_QUERIES > 0:
        one_to_many = OneToManyQueries(
            hidden_dim=detr.HIDDEN_DIM,
            num_queries=aids.ONE_TO_MANY.NUM_QUERIES,
            repeat=aids.ONE_TO_MANY.REPEAT,
            loss_weight=aids.ONE_TO_MANY.WEIGHT,
        )
    if aids.DENSE_AUX.ENABLED:
        dense = DenseAuxHead(detr.HIDDEN_DIM, num_classes, loss_weight=aids.DENSE_AUX.WEIGHT)
    if aids.DENOISING.GROUPS > 0:
        denoising = DenoisingQueries(
            hidden_dim=detr.HIDDEN_DIM,
            num_classes=num_classes,
            num_groups=aids.DENOISING.GROUPS,
            box_noise=aids.DENOISING.BOX_NOISE,
            label_noise=aids.DENOISING.LABEL_NOISE,
            loss_weight=aids.DENOISING.WEIGHT,
        )
    return [aid for aid in (groups, one_to_many, denoising, dense) if aid is not None]
