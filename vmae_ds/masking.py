"""Token masks for VideoMAE pretraining, generated for a whole batch at once.

Convention everywhere: a bool tensor of shape (B, N) with N = T * H * W tokens in (t, h, w) order,
True = hidden from the encoder / dropped from the decoder. Every mask hides an exact number of tokens
per sample, so visible/kept tokens can be gathered with a plain reshape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ENCODER_MASKS = ("tube", "random")
DECODER_MASKS = ("running_cell", "random", "frame", "none")
RUNNING_CELL_RATIOS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class TokenGrid:
    """Token grid after patch embedding: T tubelet-frames of H x W patches."""

    t: int
    h: int
    w: int

    @property
    def n(self) -> int:
        return self.t * self.h * self.w


def _rank_hide(scores: torch.Tensor, num_hidden: int) -> torch.Tensor:
    """Hide the `num_hidden` lowest-scoring positions per row (exact count, uniform if scores are iid)."""
    order = scores.argsort(dim=-1)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(-1, order[..., :num_hidden], True)
    return mask


def _check_ratio(kind: str, ratio: float) -> None:
    # ratio 1 would leave no visible (encoder) or no kept (decoder) token: empty gathers and a 0/0 loss
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{kind} mask ratio must be in [0, 1), got {ratio}")


def tube_mask(batch: int, grid: TokenGrid, ratio: float, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """One spatial mask per sample with int(ratio * H * W) hidden patches, repeated over all T."""
    _check_ratio("tube", ratio)
    hw = grid.h * grid.w
    num_hidden = int(ratio * hw)
    scores = torch.rand(batch, hw, generator=generator, device=device)
    frame = _rank_hide(scores, num_hidden)
    return frame.unsqueeze(1).expand(batch, grid.t, hw).reshape(batch, grid.n)


def random_mask(batch: int, grid: TokenGrid, ratio: float, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """int(ratio * N) hidden tokens per sample, drawn uniformly over all tokens."""
    _check_ratio("random", ratio)
    scores = torch.rand(batch, grid.n, generator=generator, device=device)
    return _rank_hide(scores, int(ratio * grid.n))


def running_cell_mask(batch: int, grid: TokenGrid, ratio: float = 0.5,
                      generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """VideoMAE V2 decoder mask: 2x2 cells, int(4 * ratio) of each cell hidden, shifted by one per t.

    Position j in a cell (row-major over the 2x2) at temporal index t is hidden iff
    (j + offset + t) mod 4 < int(4 * ratio); one of the 4 offsets is drawn per sample.
    """
    if ratio not in RUNNING_CELL_RATIOS:
        raise ValueError(f"running_cell ratio must be one of {RUNNING_CELL_RATIOS}, got {ratio}")
    if grid.h % 2 or grid.w % 2:
        raise ValueError(f"running_cell needs an even token grid, got {grid.h}x{grid.w}")
    hidden_per_cell = int(4 * ratio)
    offset = torch.randint(0, 4, (batch,), generator=generator, device=device)
    t = torch.arange(grid.t, device=device).view(1, grid.t, 1, 1)
    hh = torch.arange(grid.h, device=device).view(1, 1, grid.h, 1)
    ww = torch.arange(grid.w, device=device).view(1, 1, 1, grid.w)
    cell_pos = (hh % 2) * 2 + (ww % 2)
    phase = (cell_pos + offset.view(batch, 1, 1, 1) + t) % 4
    return (phase < hidden_per_cell).reshape(batch, grid.n)


def frame_mask(batch: int, grid: TokenGrid, ratio: float = 0.5, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Hide every other temporal index: the odd or the even ones, drawn per sample (ratio 0.5 only)."""
    if ratio != 0.5:
        raise ValueError(f"frame mask supports ratio 0.5 only, got {ratio}")
    if grid.t % 2:
        raise ValueError(f"frame mask needs an even number of tubelet-frames, got {grid.t}")
    parity = torch.randint(0, 2, (batch, 1), generator=generator, device=device)
    t = torch.arange(grid.t, device=device).view(1, grid.t)
    hidden_t = (t % 2) == parity
    return hidden_t.unsqueeze(-1).expand(batch, grid.t, grid.h * grid.w).reshape(batch, grid.n)


def make_encoder_mask(kind: str, batch: int, grid: TokenGrid, ratio: float,
                      generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    if kind == "tube":
        return tube_mask(batch, grid, ratio, generator, device)
    if kind == "random":
        return random_mask(batch, grid, ratio, generator, device)
    raise ValueError(f"encoder mask must be one of {ENCODER_MASKS}, got {kind!r}")


def make_decoder_mask(kind: str, batch: int, grid: TokenGrid, ratio: float,
                      generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Decoder drop mask, or None for encoder-only masking (VideoMAE v1)."""
    if kind == "none":
        return None
    if kind == "running_cell":
        return running_cell_mask(batch, grid, ratio, generator, device)
    if kind == "random":
        return random_mask(batch, grid, ratio, generator, device)
    if kind == "frame":
        return frame_mask(batch, grid, ratio, generator, device)
    raise ValueError(f"decoder mask must be one of {DECODER_MASKS}, got {kind!r}")


def make_masks(encoder_kind: str, encoder_ratio: float, decoder_kind: str, decoder_ratio: float,
               batch: int, grid: TokenGrid, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(encoder_mask, decoder_mask) for one batch; decoder_mask is None in encoder-only mode."""
    enc = make_encoder_mask(encoder_kind, batch, grid, encoder_ratio, generator, device)
    dec = make_decoder_mask(decoder_kind, batch, grid, decoder_ratio, generator, device)
    return enc, dec


def decoder_kept(encoder_mask: torch.Tensor, decoder_mask: torch.Tensor | None) -> torch.Tensor:
    """Positions the decoder predicts: ~decoder_mask, or the encoder-hidden ones in encoder-only mode."""
    return encoder_mask if decoder_mask is None else ~decoder_mask


def loss_positions(encoder_mask: torch.Tensor, decoder_mask: torch.Tensor | None) -> torch.Tensor:
    """Among the decoder-kept positions (ascending order), which carry loss: encoder-hidden ones.

    Shape (B, N_keep), aligned with the model's output.
    """
    kept = decoder_kept(encoder_mask, decoder_mask)
    b = encoder_mask.shape[0]
    return encoder_mask[kept].reshape(b, -1)


@dataclass(frozen=True)
class TokenSelection:
    """A batch's masks as fixed-count index tensors, the form the model and loss consume.

    visible: (B, Nv) encoder-visible token ids, ascending; kept: (B, Nk) decoder-predicted ids, ascending;
    loss_weight: (B, Nk) float, 1 where a kept token was hidden from the encoder. Every mask hides an exact
    count per sample, so the shapes do not depend on the data: a GPU can queue the decoder without waiting
    for the encoder (boolean-mask indexing would make the host wait for the count).
    """

    visible: torch.Tensor
    kept: torch.Tensor
    loss_weight: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenSelection:
        return TokenSelection(*(t.to(device, non_blocking=non_blocking)
                                for t in (self.visible, self.kept, self.loss_weight)))

    def pin_memory(self) -> TokenSelection:
        return TokenSelection(*(t.pin_memory() for t in (self.visible, self.kept, self.loss_weight)))


def _true_positions(mask: torch.Tensor, what: str) -> torch.Tensor:
    """Ascending positions of the True entries of every row; all rows must hold the same count."""
    counts = mask.sum(dim=1)
    n = int(counts[0])
    if not bool((counts == n).all()):
        raise ValueError(f"{what}: rows hold different counts ({sorted(set(counts.tolist()))}); every mask must "
                         f"select an exact number of tokens per sample")
    # stable sort of 0/1 keys puts the True positions first, in ascending order
    return torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :n]


def select_tokens(encoder_mask: torch.Tensor, decoder_mask: torch.Tensor | None) -> TokenSelection:
    """Bool masks (True = hidden / dropped) -> index form. Run it where the masks are made (CPU)."""
    kept = decoder_kept(encoder_mask, decoder_mask)
    kept_idx = _true_positions(kept, "decoder-kept positions")
    return TokenSelection(visible=_true_positions(~encoder_mask, "encoder-visible positions"), kept=kept_idx,
                          loss_weight=encoder_mask.gather(1, kept_idx).float())


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, C) -> (B, len(index[b]), C): rows `index` of every sample."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def attention_visible(attention: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """UMT's semantic mask: per frame, a multinomial draw without replacement weighted by the teacher's
    class-token attention; the first N - int(ratio * N) drawn stay visible.

    attention (B, T, N) non-negative weights per frame -> (B, T * Nv) visible token ids (t-major, ascending).
    """
    _check_ratio("attention", mask_ratio)
    b, t, n = attention.shape
    keep = n - int(mask_ratio * n)
    # a row of zeros (or a tiny share) cannot feed multinomial: a floor keeps every patch drawable
    weights = attention.float().clamp_min(0).reshape(b * t, n) + 1e-12
    drawn = torch.multinomial(weights, keep, replacement=False, generator=generator)
    frame = torch.arange(t, device=attention.device).repeat(b).unsqueeze(1) * n
    return (drawn.sort(dim=1).values + frame).reshape(b, t * keep)
