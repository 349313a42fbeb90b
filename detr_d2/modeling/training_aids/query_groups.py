"""Group DETR (Chen et al. 2022): G - 1 more copies of the query set, each matched one-to-one to
the targets on its own, so every object gets G positive queries per step instead of one.

The copies run through the decoder with the plain queries, in one pass, their self-attention
masked so that no group sees another: group 0 (the plain ``query_embed``) computes exactly what
it computes alone, and inference, which uses group 0 only, is plain DETR.
"""

from dataclasses import replace

from ..criterion import LossBranch
from .base import LearnedQueries, TrainingStep, group_major, layer_outputs


class QueryGroups(LearnedQueries):
    """Groups 1 .. G-1, ``weight`` [(G-1)*Q, C]; the plain branch becomes all G groups."""

    slot = "queries.group_embed"
    config_key = "MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS > 1"

    def __init__(self, *, hidden_dim: int, num_queries: int, num_groups: int):
        """
        Args:
            hidden_dim: C.
            num_queries: Q, the size of each group (the plain query set).
            num_groups: G >= 2, the plain group included (``MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS``).
        """
        if num_groups < 2:
            raise ValueError(
                f"QueryGroups needs num_groups >= 2 (MODEL.DETR.TRAINING_AIDS.QUERY_GROUPS), got {num_groups}."
            )
        super().__init__((num_groups - 1) * num_queries, hidden_dim)
        self.num_queries = num_queries
        self.num_groups = num_groups

    def set_sizes(self) -> list[int]:
        return [self.num_queries] * (self.num_groups - 1)

    def loss_branches(
        self, step: TrainingStep, own: slice | None, branches: list[LossBranch]
    ) -> list[LossBranch]:
        """The main branch widened to the G groups, stacked group-major along the batch
        (``[G*N, Q, ...]``, group 0 first; its losses are the mean over the groups)."""
        assert own is not None and own.start == self.num_queries, "groups follow the plain queries"
        groups = slice(0, own.stop)
        outputs = layer_outputs(
            group_major(step.logits[:, :, groups], self.num_groups, self.num_queries),
            group_major(step.boxes[:, :, groups], self.num_groups, self.num_queries),
        )
        return [replace(branches[0], outputs=outputs, num_groups=self.num_groups), *branches[1:]]

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, queries_per_group={self.num_queries}"
