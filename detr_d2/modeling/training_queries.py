"""Training-only object queries that speed up DETR's convergence without changing its inference
graph: Group DETR's extra query groups, H-DETR's one-to-many queries and DN-DETR's denoising
queries.

One-to-one matching gives each object a single positive query per step. Group DETR (Chen et
al. 2022) trains G - 1 more copies of the query set, each matched one-to-one on its own; H-DETR
(Jia et al. 2023) adds a query set matched to every target repeated k times. Both run through
the same decoder as the plain queries, in one pass, with the decoder's self-attention masked so
that no set sees another: group 0 (the plain ``query_embed``) computes exactly what it computes
alone, and inference, which uses group 0 only, is plain DETR. DN-DETR (Li et al. 2022) feeds
noised copies of the ground truth as extra queries that learn to reconstruct their boxes: a
direct, matching-free signal for the decoder. The extra embeddings live under
``Detr.train_only`` and are left out of the inference model.

Shapes: Q plain queries, G groups, Qm one-to-many queries, T = G*Q + Qm, C hidden dim; P
denoising groups of D queries each (D = the most targets of an image in the batch).
"""

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)


def block_diagonal_mask(set_sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    """bool [T, T] self-attention mask, True where query i may not attend to query j: the
    queries form consecutive sets of ``set_sizes`` that see only their own set."""
    sizes = torch.as_tensor(list(set_sizes), device=device)
    set_ids = torch.arange(len(sizes), device=device).repeat_interleave(sizes)
    return set_ids[:, None] != set_ids[None, :]


def group_major(outputs: torch.Tensor, num_groups: int, per_group: int) -> torch.Tensor:
    """[L, N, G*Q, X] head outputs of G query sets of Q each -> [L, G*N, Q, X], the sets
    stacked group-major along the batch (entry g*N + i is set g of image i), the layout
    :meth:`SetCriterion.compute` matches group by group."""
    num_layers, n, _, dim = outputs.shape
    grouped = outputs.reshape(num_layers, n, num_groups, per_group, dim).transpose(1, 2)
    return grouped.reshape(num_layers, num_groups * n, per_group, dim)


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

    def set_sizes(self) -> list[int]:
        """Sizes of the query sets that must not see each other, in :meth:`queries` order."""
        return [self.num_queries] * self.num_groups + (
            [self.num_one_to_many] if self.num_one_to_many else []
        )

    def self_attention_mask(self, device: torch.device) -> torch.Tensor:
        """bool [T, T], True where query i may not attend to query j: across groups and between
        the groups and the one-to-many set (a block-diagonal pattern)."""
        return block_diagonal_mask(self.set_sizes(), device)

    def split(self, outputs: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Decoder-head outputs [L, N, T, D] -> ``groups`` [L, G*N, Q, D] (group-major along the
        batch, the layout :meth:`SetCriterion.compute` expects) and ``one_to_many``
        [L, N, Qm, D] (None without one-to-many queries)."""
        grouped = group_major(
            outputs[:, :, : self.num_groups * self.num_queries], self.num_groups, self.num_queries
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


def box_sine_embedding(boxes: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine encoding of normalised cxcywh boxes [..., 4] -> [..., dim]: dim/4 channels per
    coordinate, sin and cos interleaved, frequencies as DETR's position encoding."""
    per_coord = dim // 4
    exponent = 2 * (torch.arange(per_coord, device=boxes.device) // 2) / per_coord
    freqs = boxes[..., None].float() * 2 * math.pi / temperature**exponent  # [..., 4, dim/4]
    encoded = torch.stack([freqs[..., 0::2].sin(), freqs[..., 1::2].cos()], -1).flatten(-2)
    return encoded.flatten(-2)


class DenoisingQueries(nn.Module):
    """DN-DETR's denoising part for plain DETR, whose queries are learned positions with zero
    content: a noised ground-truth box enters as the query position (an MLP on its sine
    encoding) and its noised label as the content (an embedding). The decoder learns to
    reconstruct boxes from a nearby guess, which plain DETR's matching queries otherwise learn
    only through an unstable bipartite matching."""

    def __init__(
        self,
        *,
        hidden_dim: int,
        num_classes: int,
        num_groups: int,
        box_noise: float = 0.4,
        label_noise: float = 0.2,
    ):
        """
        Args:
            hidden_dim: C (divisible by 4: one quarter of the encoding per box coordinate).
            num_classes: K; label embedding row K is the padding of images with fewer targets.
            num_groups: P >= 1 noised copies of the targets (``MODEL.DETR.DENOISING.GROUPS``).
            box_noise: centres move by up to ``box_noise`` half-sizes, sizes scale by up to
                ``1 +- box_noise`` (DN-DETR's lambda_1 = lambda_2 = 0.4).
            label_noise: probability that a label is replaced by a random class.
        """
        super().__init__()
        if num_groups < 1 or hidden_dim % 4:
            raise ValueError(
                f"MODEL.DETR.DENOISING.GROUPS must be >= 1 here (got {num_groups}) and "
                f"MODEL.DETR.HIDDEN_DIM divisible by 4 for denoising (got {hidden_dim})."
            )
        self.num_classes = num_classes
        self.num_groups = num_groups
        self.box_noise = box_noise
        self.label_noise = label_noise
        self.hidden_dim = hidden_dim
        self.label_embed = nn.Embedding(num_classes + 1, hidden_dim)
        self.box_embed = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim)
        )

    def noised_targets(
        self, targets: list[dict]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P noised copies of ``targets`` (``labels``, cxcywh ``boxes``), group-major: labels
        [N, P*D], boxes [N, P*D, 4] and bool ``valid`` [N, P*D]; slot p*D + j is target j of
        copy p, slots past an image's targets are padding (label K)."""
        per_group = max(len(t["labels"]) for t in targets)
        device = self.label_embed.weight.device
        labels = torch.full(
            (len(targets), per_group), self.num_classes, dtype=torch.int64, device=device
        )
        boxes = torch.zeros(len(targets), per_group, 4, device=device)
        for i, t in enumerate(targets):
            labels[i, : len(t["labels"])] = t["labels"]
            boxes[i, : len(t["labels"])] = t["boxes"]
        labels = labels.repeat(1, self.num_groups)
        boxes = boxes.repeat(1, self.num_groups, 1)
        valid = labels < self.num_classes
        flip = (torch.rand(labels.shape, device=device) < self.label_noise) & valid
        labels = torch.where(flip, torch.randint_like(labels, self.num_classes), labels)
        sizes = boxes[..., 2:]
        jitter = (torch.rand_like(boxes) * 2 - 1) * self.box_noise
        shift = torch.cat([jitter[..., :2] * sizes / 2, jitter[..., 2:] * sizes], -1)
        return labels, (boxes + shift).clamp(min=0.0, max=1.0), valid

    def forward(self, targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Content and position queries [N, P*D, C] of :meth:`noised_targets` (padding slots
        get position 0), and D (0 when no image has a target)."""
        labels, boxes, valid = self.noised_targets(targets)
        position = self.box_embed(box_sine_embedding(boxes, self.hidden_dim)) * valid[..., None]
        return self.label_embed(labels), position, labels.shape[1] // self.num_groups

    def split(self, outputs: torch.Tensor, per_group: int) -> torch.Tensor:
        """Head outputs of the denoising queries [L, N, P*D, X] -> [L, P*N, D, X], group-major
        along the batch like the query groups (:meth:`SetCriterion.compute`)."""
        return group_major(outputs, self.num_groups, per_group)

    def extra_repr(self) -> str:
        return (
            f"groups={self.num_groups}, box_noise={self.box_noise}, label_noise={self.label_noise}"
        )
