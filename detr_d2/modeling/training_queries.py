"""Training-only object queries that speed up DETR's convergence without changing its inference
graph: Group DETR's extra query groups and H-DETR's one-to-many queries.

One-to-one matching gives each object a single positive query per step. Group DETR (Chen et
al. 2022) trains G - 1 more copies of the query set, each matched one-to-one on its own; H-DETR
(Jia et al. 2023) adds a query set matched to every target repeated k times. Both run through
the same decoder as the plain queries, in one pass, with the decoder's self-attention masked so
that no set sees another: group 0 (the plain ``query_embed``) computes exactly what it computes
alone, and inference, which uses group 0 only, is plain DETR. The extra embeddings live under
``Detr.train_only`` and are left out of the inference model.

Shapes: Q plain queries, G groups, Qm one-to-many queries, T = G*Q + Qm, C hidden dim.
"""

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


class TrainingQueries(nn.Module):
    """The extra query embeddings and the self-attention mask that keeps the sets apart."""

    def __init__(self, *, hidden_dim: int, num_queries: int, num_groups: int, num_one_to_many: int):
        """
        Args:
            hidden_dim: C.
            num_queries: Q, the size of each group (the plain query set).
            num_groups: G >= 1; G - 1 extra groups are trained (``MODEL.DETR.GROUPS``).
            num_one_to_many: Qm >= 0 one-to-many queries (``MODEL.DETR.ONE_TO_MANY.NUM_QUERIES``).
        """
        super().__init__()
        if num_groups < 1 or num_one_to_many < 0:
            raise ValueError(
                f"MODEL.DETR.GROUPS must be >= 1 (got {num_groups}) and "
                f"MODEL.DETR.ONE_TO_MANY.NUM_QUERIES >= 0 (got {num_one_to_many})."
            )
        self.num_queries = num_queries
        self.num_groups = num_groups
        self.num_one_to_many = num_one_to_many
        self.group_embed = (
            nn.Embedding((num_groups - 1) * num_queries, hidden_dim) if num_groups > 1 else None
        )
        self.one_to_many_embed = (
            nn.Embedding(num_one_to_many, hidden_dim) if num_one_to_many > 0 else None
        )

    @property
    def active(self) -> bool:
        return self.group_embed is not None or self.one_to_many_embed is not None

    def queries(self, plain: torch.Tensor) -> torch.Tensor:
        """[Q, C] plain queries -> [T, C]: group 0 (plain), groups 1..G-1, one-to-many."""
        parts = [plain] + [
            e.weight for e in (self.group_embed, self.one_to_many_embed) if e is not None
        ]
        return torch.cat(parts)

    def self_attention_mask(self, device: torch.device) -> torch.Tensor:
        """bool [T, T], True where query i may not attend to query j: across groups and between
        the groups and the one-to-many set (a block-diagonal pattern)."""
        set_ids = torch.arange(self.num_groups, device=device).repeat_interleave(self.num_queries)
        set_ids = torch.cat(
            [set_ids, torch.full((self.num_one_to_many,), self.num_groups, device=device)]
        )
        return set_ids[:, None] != set_ids[None, :]

    def split(self, outputs: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Decoder-head outputs [L, N, T, D] -> ``groups`` [L, G*N, Q, D] (group-major along the
        batch, the layout :meth:`SetCriterion.compute` expects) and ``one_to_many``
        [L, N, Qm, D] (None without one-to-many queries)."""
        num_layers, n, _, dim = outputs.shape
        grouped = outputs[:, :, : self.num_groups * self.num_queries]
        grouped = grouped.reshape(num_layers, n, self.num_groups, self.num_queries, dim)
        grouped = grouped.transpose(1, 2).reshape(
            num_layers, self.num_groups * n, self.num_queries, dim
        )
        one_to_many = (
            outputs[:, :, self.num_groups * self.num_queries :] if self.num_one_to_many else None
        )
        return {"groups": grouped, "one_to_many": one_to_many}

    @torch.no_grad()
    def init_from_plain(self, plain: torch.Tensor, noise: float = 0.1) -> None:
        """Start every extra query from a plain query (fine-tuning a checkpoint whose queries
        already know where objects are), plus Gaussian noise of ``noise`` times the queries'
        standard deviation: identical copies would be matched identically and never diverge."""
        std = float(plain.std()) if plain.numel() > 1 else 1.0
        for embed in (self.group_embed, self.one_to_many_embed):
            if embed is None:
                continue
            rows = torch.arange(embed.num_embeddings) % plain.shape[0]
            embed.weight.copy_(plain[rows] + noise * std * torch.randn_like(embed.weight))

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, queries_per_group={self.num_queries}, one_to_many={self.num_one_to_many}"
