"""H-DETR's one-to-many branch (Jia et al. 2023): a separate query set matched to every target
repeated k times, so each object has k positives; box and class terms only, keys suffixed
``_o2m``. The set attends only to itself, so the plain queries compute what they compute alone.
"""

from ..criterion import LossBranch
from .base import LearnedQueries, TrainingStep, layer_outputs


class OneToManyQueries(LearnedQueries):
    """Qm one-to-many queries, ``weight`` [Qm, C]."""

    slot = "queries.one_to_many_embed"
    config_key = "MODEL.DETR.TRAINING_AIDS.ONE_TO_MANY"

    def __init__(self, *, hidden_dim: int, num_queries: int, repeat: int, loss_weight: float):
        """
        Args:
            hidden_dim: C.
            num_queries: Qm >= 1 (``MODEL.DETR.TRAINING_AIDS.ONE_TO_MANY.NUM_QUERIES``).
            repeat: k, how often each target is repeated (``ONE_TO_MANY.REPEAT``).
            loss_weight: weight of the branch relative to the plain one (``ONE_TO_MANY.WEIGHT``).
        """
        if num_queries < 1:
            raise ValueError(
                "OneToManyQueries needs num_queries >= 1 (MODEL.DETR.TRAINING_AIDS.ONE_TO_MANY.NUM_QUERIES), "
                f"got {num_queries}."
            )
        super().__init__(num_queries, hidden_dim)
        self.repeat = repeat
        self.loss_weight = loss_weight

    def set_sizes(self) -> list[int]:
        return [len(self.weight)]

    def loss_branches(
        self, step: TrainingStep, own: slice | None, branches: list[LossBranch]
    ) -> list[LossBranch]:
        assert own is not None, "the one-to-many queries are in every step"
        repeated = [
            {"labels": t["labels"].repeat(self.repeat), "boxes": t["boxes"].repeat(self.repeat, 1)}
            for t in step.targets
        ]
        outputs = layer_outputs(step.logits[:, :, own], step.boxes[:, :, own])
        branch = LossBranch("_o2m", outputs, repeated, self.loss_weight, terms=("labels", "boxes"))
        return [*branches, branch]

    def extra_repr(self) -> str:
        return f"queries={len(self.weight)}, repeat={self.repeat}, loss_weight={self.loss_weight}"
