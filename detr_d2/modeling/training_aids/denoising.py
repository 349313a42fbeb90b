"""DN-DETR's denoising queries (Li et al. 2022) for plain DETR: noised copies of the ground truth
enter the decoder as extra queries that learn to reconstruct their boxes, a direct,
matching-free signal that plain DETR's queries otherwise learn only through an unstable
bipartite matching. Keys suffixed ``_dn``.

Shapes: N images, P denoising groups of D queries each (D = the most targets of an image in the
batch), C hidden dim, K classes.
"""

import math

import torch
from torch import nn

from ..criterion import LossBranch
from .base import ExtraQueries, TrainingAid, TrainingStep, group_major, layer_outputs


def box_sine_embedding(boxes: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine encoding of normalised cxcywh boxes [..., 4] -> [..., dim]: dim/4 channels per
    coordinate, sin and cos interleaved, frequencies as DETR's position encoding."""
    per_coord = dim // 4
    exponent = 2 * (torch.arange(per_coord, device=boxes.device) // 2) / per_coord
    freqs = boxes[..., None].float() * 2 * math.pi / temperature**exponent  # [..., 4, dim/4]
    encoded = torch.stack([freqs[..., 0::2].sin(), freqs[..., 1::2].cos()], -1).flatten(-2)
    return encoded.flatten(-2)


class DenoisingQueries(TrainingAid):
    """DN-DETR's denoising part for plain DETR, whose queries are learned positions with zero
    content: a noised ground-truth box enters as the query position (an MLP on its sine
    encoding) and its noised label as the content (an embedding). Each group of D queries
    attends only to itself, and query j of a group is supervised by the target it was made
    from (no matching)."""

    slot = "denoising"
    config_key = "MODEL.DETR.TRAINING_AIDS.DENOISING"

    def __init__(
        self,
        *,
        hidden_dim: int,
        num_classes: int,
        num_groups: int,
        box_noise: float = 0.4,
        label_noise: float = 0.2,
        loss_weight: float = 1.0,
    ):
        """
        Args:
            hidden_dim: C (divisible by 4: one quarter of the encoding per box coordinate).
            num_classes: K; label embedding row K is the padding of images with fewer targets.
            num_groups: P >= 1 noised copies of the targets (``MODEL.DETR.TRAINING_AIDS.DENOISING.GROUPS``).
            box_noise: centres move by up to ``box_noise`` half-sizes, sizes scale by up to
                ``1 +- box_noise`` (DN-DETR's lambda_1 = lambda_2 = 0.4).
            label_noise: probability that a label is replaced by a random class.
            loss_weight: weight of the branch relative to the plain one (``DENOISING.WEIGHT``).
        """
        super().__init__()
        if num_groups < 1 or hidden_dim % 4:
            raise ValueError(
                f"MODEL.DETR.TRAINING_AIDS.DENOISING.GROUPS must be >= 1 here (got {num_groups}) and "
                f"MODEL.DETR.HIDDEN_DIM divisible by 4 for denoising (got {hidden_dim})."
            )
        self.num_classes = num_classes
        self.num_groups = num_groups
        self.box_noise = box_noise
        self.label_noise = label_noise
        self.hidden_dim = hidden_dim
        self.loss_weight = loss_weight
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

    def queries(self, targets: list[dict[str, torch.Tensor]]) -> ExtraQueries | None:
        """P groups of D per-image queries [N, P*D, C]; None when no image has a target."""
        content, position, per_group = self(targets)
        if per_group == 0:
            return None
        return ExtraQueries(position, [per_group] * self.num_groups, content)

    def loss_branches(
        self, step: TrainingStep, own: slice | None, branches: list[LossBranch]
    ) -> list[LossBranch]:
        """The ``_dn`` branch: the P groups stacked group-major along the batch ([P*N, D, ...]),
        query j of each group matched to target j of its image."""
        if own is None:
            return branches
        per_group = (own.stop - own.start) // self.num_groups
        outputs = layer_outputs(
            group_major(step.logits[:, :, own], self.num_groups, per_group),
            group_major(step.boxes[:, :, own], self.num_groups, per_group),
        )
        branch = LossBranch(
            "_dn",
            outputs,
            step.targets,
            self.loss_weight,
            num_groups=self.num_groups,
            identity_matches=True,
            terms=("labels", "boxes"),
        )
        return [*branches, branch]

    def extra_repr(self) -> str:
        return (
            f"groups={self.num_groups}, box_noise={self.box_noise}, "
            f"label_noise={self.label_noise}, loss_weight={self.loss_weight}"
        )
