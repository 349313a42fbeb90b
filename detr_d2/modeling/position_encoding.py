"""Spatial position encodings of the DETR encoder (paper Sec. 3.2 and appendix A.4).

Shapes: N images, H x W feature map, C = 2 * num_pos_feats channels.
"""

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Parameter-free sine/cosine encoding of (y, x), counted over the non-padded pixels only.

    Matches the official DETR ``PositionEmbeddingSine``: coordinates are the cumulative sum of
    the valid-pixel mask, optionally normalised to ``[0, scale]`` per image, so padding does not
    shift the encoding of real pixels.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
    ):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            mask: bool [N, H, W], True on padding.
        Returns:
            float [N, C, H, W] position encoding, y features first, then x.
        """
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6  # official value; keeps fully padded rows/columns finite
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t  # [N, H, W, F]
        pos_y = y_embed[:, :, :, None] / dim_t
        # interleave sin (even features) and cos (odd features), as the official code does
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale:.4f}"
        )


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: one embedding per row and per column (up to 50 each)."""

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50):
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """Same contract as :class:`PositionEmbeddingSine`; the mask only gives the shape."""
        n, h, w = mask.shape
        max_size = self.row_embed.num_embeddings
        if h > max_size or w > max_size:
            raise ValueError(
                f"Feature map {h}x{w} exceeds the learned position table ({max_size}x{max_size}); "
                "use MODEL.DETR.POSITION_EMBEDDING 'sine' or smaller inputs."
            )
        x_emb = self.col_embed(torch.arange(w, device=mask.device))  # [W, F]
        y_emb = self.row_embed(torch.arange(h, device=mask.device))  # [H, F]
        pos = torch.cat(
            [x_emb.unsqueeze(0).expand(h, w, -1), y_emb.unsqueeze(1).expand(h, w, -1)], dim=-1
        )  # [H, W, 2F], x first as in the official code
        return pos.permute(2, 0, 1).unsqueeze(0).expand(n, -1, -1, -1)


def build_position_encoding(kind: str, hidden_dim: int) -> nn.Module:
    """The encoder's position encoding for ``MODEL.DETR.POSITION_EMBEDDING``."""
    if kind == "sine":
        return PositionEmbeddingSine(hidden_dim // 2, normalize=True)
    if kind == "learned":
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"MODEL.DETR.POSITION_EMBEDDING must be 'sine' or 'learned', got {kind!r}.")
