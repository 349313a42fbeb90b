"""The interface between :class:`~detr_d2.modeling.detr.Detr` and its training aids, and what
the aids share.

Shapes: N images, Q plain queries, T = Q + the aids' queries, L decoder layers (1 without deep
supervision), C hidden dim, K classes.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..criterion import LossBranch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtraQueries:
    """Decoder queries that an aid adds for one step.

    Attributes:
        position: [S, C] (the same for every image) or [N, S, C] (per image); they enter the
            decoder as positions, like the plain ``query_embed``.
        set_sizes: sizes of consecutive sets (summing to S) that attend only to themselves.
        content: [N, S, C] decoder input, or None for zeros (as the plain queries).
    """

    position: torch.Tensor
    set_sizes: list[int]
    content: torch.Tensor | None = None


@dataclass(frozen=True)
class TrainingStep:
    """What a training step computed, for the aids' loss branches.

    Attributes:
        logits: [L, N, T, K+1] class logits of every query: the plain ones first, then each
            aid's, in the order of the aids.
        boxes: [L, N, T, 4] sigmoid cxcywh boxes.
        memory: [N, C, H, W] encoder output.
        padding: bool [N, H, W], True on padding.
        stride: input pixels per feature cell.
        image_sizes: N unpadded (height, width).
        targets: N target dicts of the criterion (``labels``, ``boxes``).
    """

    logits: torch.Tensor
    boxes: torch.Tensor
    memory: torch.Tensor
    padding: torch.Tensor
    stride: float
    image_sizes: Sequence[tuple[int, int]]
    targets: list[dict[str, torch.Tensor]]


class TrainingAid(nn.Module):
    """A part that exists only for training and speeds up DETR's convergence; inference never
    calls it, and the inference model drops it (``Detr.train_only``).

    In each training step ``Detr`` calls, for its aids in order:

    1. :meth:`queries` before the decoder: the aid's extra queries, or None;
    2. :meth:`loss_branches` after the heads: the aid adds its branch to the criterion's list.

    ``slot`` is where the aid's parameters sit under ``Detr.train_only`` (the checkpoint keys),
    ``config_key`` the setting that switches it on (for error messages).
    """

    slot: str
    config_key: str

    def queries(self, targets: list[dict[str, torch.Tensor]]) -> ExtraQueries | None:
        """The queries this aid adds to this step's decoder, or None (the default: none)."""
        return None

    def loss_branches(
        self, step: TrainingStep, own: slice | None, branches: list[LossBranch]
    ) -> list[LossBranch]:
        """``branches`` (the first is the plain queries') with this aid's branch added.

        Args:
            step: the step's predictions and targets.
            own: where this aid's queries are along T in ``step``; None if it added none.
            branches: the branches of the plain queries and of the aids before this one.
        """
        raise NotImplementedError


# ---------------------------------------------------------------- decoder queries of a step
@dataclass(frozen=True)
class DecoderQueries:
    """The decoder inputs of a training step: the plain queries and every aid's.

    Attributes:
        position: [T, C], or [N, T, C] when an aid adds per-image queries.
        attention_mask: bool [T, T] query self-attention mask (True = blocked), or None.
        content: [N, T, C] decoder input, or None (zeros).
        spans: where each aid's queries are along T (None: it added none), in aid order.
    """

    position: torch.Tensor
    attention_mask: torch.Tensor | None
    content: torch.Tensor | None
    spans: list[slice | None]

    @classmethod
    def assemble(
        cls, plain: torch.Tensor, extras: Sequence[ExtraQueries | None]
    ) -> "DecoderQueries":
        """The plain queries [Q, C], then the aids' shared queries, then their per-image ones,
        each set masked off from the others; ``plain`` alone (no mask) when no aid adds any."""
        shared = [(i, e) for i, e in enumerate(extras) if e is not None and e.position.dim() == 2]
        per_image = [
            (i, e) for i, e in enumerate(extras) if e is not None and e.position.dim() == 3
        ]
        if not shared and not per_image:
            return cls(plain, None, None, [None] * len(extras))
        spans, set_sizes, start = [None] * len(extras), [len(plain)], len(plain)
        for i, extra in shared + per_image:
            spans[i] = slice(start, start + sum(extra.set_sizes))
            set_sizes += extra.set_sizes
            start = spans[i].stop
        position = torch.cat([plain] + [e.position for _, e in shared]) if shared else plain
        content = None
        if per_image:
            n = per_image[0][1].position.shape[0]
            position = position.expand(n, -1, -1)  # [N, T', C]: shared by every image
            content = torch.cat(
                [torch.zeros_like(position)]
                + [
                    torch.zeros_like(e.position) if e.content is None else e.content
                    for _, e in per_image
                ],
                1,
            )
            position = torch.cat([position] + [e.position.to(position) for _, e in per_image], 1)
        return cls(position, block_diagonal_mask(set_sizes, plain.device), content, spans)


def block_diagonal_mask(set_sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    """bool [T, T] self-attention mask, True where query i may not attend to query j: the
    queries form consecutive sets of ``set_sizes`` that see only their own set."""
    sizes = torch.as_tensor(list(set_sizes), device=device)
    set_ids = torch.arange(len(sizes), device=device).repeat_interleave(sizes)
    return set_ids[:, None] != set_ids[None, :]


# ---------------------------------------------------------------- outputs of query sets
def group_major(outputs: torch.Tensor, num_groups: int, per_group: int) -> torch.Tensor:
    """[L, N, G*Q, X] head outputs of G query sets of Q each -> [L, G*N, Q, X], the sets
    stacked group-major along the batch (entry g*N + i is set g of image i), the layout
    :meth:`SetCriterion.compute` matches group by group."""
    num_layers, n, _, dim = outputs.shape
    grouped = outputs.reshape(num_layers, n, num_groups, per_group, dim).transpose(1, 2)
    return grouped.reshape(num_layers, num_groups * n, per_group, dim)


def layer_outputs(layer_logits: torch.Tensor, layer_boxes: torch.Tensor) -> dict:
    """[L, ...] logits and boxes of every decoder layer -> the criterion's outputs dict: the
    last layer's, with the earlier ones under ``aux_outputs``."""
    outputs = {"pred_logits": layer_logits[-1], "pred_boxes": layer_boxes[-1]}
    if len(layer_logits) > 1:
        outputs["aux_outputs"] = [
            {"pred_logits": a, "pred_boxes": b} for a, b in zip(layer_logits[:-1], layer_boxes[:-1])
        ]
    return outputs


# ---------------------------------------------------------------- learned query sets
class LearnedQueries(TrainingAid):
    """An aid whose queries are learned embeddings, ``weight`` [S, C] (the parameter name of the
    ``nn.Embedding`` it replaces in older checkpoints), initialised like ``nn.Embedding``."""

    def __init__(self, num_embeddings: int, hidden_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, hidden_dim))
        nn.init.normal_(self.weight)

    def set_sizes(self) -> list[int]:
        raise NotImplementedError

    def queries(self, targets: list[dict[str, torch.Tensor]]) -> ExtraQueries:
        return ExtraQueries(self.weight, self.set_sizes())

    @torch.no_grad()
    def init_from_plain(self, plain: torch.Tensor, noise: float = 0.1) -> None:
        """Start every query from a plain query (fine-tuning a checkpoint whose queries already
        know where objects are), plus Gaussian noise of ``noise`` times the queries' standard
        deviation: identical copies would be matched identically and never diverge."""
        std = float(plain.std()) if plain.numel() > 1 else 1.0
        rows = torch.arange(len(self.weight)) % plain.shape[0]
        self.weight.copy_(plain[rows] + noise * std * torch.randn_like(self.weight))


def init_learned_queries(
    aids: Sequence[TrainingAid], state_dict: dict, prefix: str, plain: torch.Tensor
) -> bool:
    """Before ``Detr`` loads ``state_dict``: a checkpoint without the learned training-only
    queries (official, or trained without them) starts them from its own object queries
    (``prefix + "query_embed.weight"``, shaped as ``plain``), so fine-tuning keeps what they
    learned (logged); one with all of them (resume) loads them as they are. Returns whether it
    did."""
    learned = [a for a in aids if isinstance(a, LearnedQueries)]
    keys = [f"{prefix}train_only.{aid.slot}.weight" for aid in learned]
    stored = state_dict.get(prefix + "query_embed.weight")
    if all(k in state_dict for k in keys) or stored is None or stored.shape != plain.shape:
        return False
    for aid, key in zip(learned, keys):
        aid.init_from_plain(stored.to(plain))
        state_dict.setdefault(key, aid.weight.detach().clone())
    logger.info("Training-only query sets initialised from the checkpoint's object queries.")
    return True


# ---------------------------------------------------------------- Detr.train_only
# Where the aids' parameters sit under ``Detr.train_only`` follows the checkpoints of the
# versions before the aids were parts of their own (``train_only.queries.group_embed.weight``),
# and so does the registration order (state-dict order, which saved optimizer states rely on).
_STATE_DICT_ORDER = ("queries.group_embed", "queries.one_to_many_embed", "dense_head", "denoising")
# The order the aids run in: their queries' order in the decoder and their keys' in the loss dict.
_RUN_ORDER = ("queries.group_embed", "queries.one_to_many_embed", "denoising", "dense_head")


def train_only_modules(aids: Sequence[TrainingAid]) -> nn.ModuleDict:
    """The ``Detr.train_only`` module tree of ``aids`` (at their ``slot``s)."""
    by_slot = {aid.slot: aid for aid in aids}
    unknown = set(by_slot) - set(_STATE_DICT_ORDER)
    assert not unknown and len(by_slot) == len(aids), f"unknown or repeated slots in {aids}"
    train_only = nn.ModuleDict()
    for slot in _STATE_DICT_ORDER:
        if slot not in by_slot:
            continue
        parent, _, name = slot.rpartition(".")
        if parent and parent not in train_only:
            train_only[parent] = nn.ModuleDict()
        (train_only[parent] if parent else train_only)[name] = by_slot[slot]
    return train_only


def aids_in(train_only: nn.ModuleDict) -> list[TrainingAid]:
    """The aids of ``train_only`` in the order they run."""
    aids = [m for m in train_only.modules() if isinstance(m, TrainingAid)]
    return sorted(aids, key=lambda aid: _RUN_ORDER.index(aid.slot))
