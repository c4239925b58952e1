"""VideoMAE V2 vision transformer: encoder, pretraining decoder and fine-tuning classifier.

Parameter names follow the official checkpoints (encoder.blocks.{i}.attn.qkv, q_bias, v_bias, ...)
so importing them is a key-prefix exercise, not a rename table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch.utils.checkpoint import checkpoint

from ..attention import KernelChoice
from ..flops import aligned
from ..masking import TokenSelection, gather_tokens, select_tokens
from .pos_embed import sinusoid_table

CheckpointFn = Callable[..., torch.Tensor]


def _torch_checkpoint(fn: Callable, *args: torch.Tensor) -> torch.Tensor:
    return checkpoint(fn, *args, use_reentrant=False)


class Attention(nn.Module):
    """Multi-head self-attention with q and v biases only (k bias is zero), as in the official code."""

    def __init__(self, dim: int, num_heads: int, kernel: KernelChoice):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = self.kernel(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _PadOutLinear(nn.Linear):
    """A Linear whose output runs `pad` zero features wider: the GEMM gets an aligned width, the parameters
    (and so checkpoints, exports, optimizer states and imports) keep the unpadded shape.

    The zero rows are made in the forward, not stored: no gradient, no optimizer state, no weight decay can
    reach them, so they stay exactly zero. Padding its own weight in its own forward keeps ZeRO-3's
    gather-around-forward valid."""

    pad: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pad:
            return super().forward(x)
        bias = None if self.bias is None else F.pad(self.bias, (0, self.pad))
        return F.linear(x, F.pad(self.weight, (0, 0, 0, self.pad)), bias)


class _PadInLinear(nn.Linear):
    """A Linear that takes an input `pad` features wider than its weight, the extra ones meeting zero columns."""

    pad: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pad:
            return super().forward(x)
        return F.linear(x, F.pad(self.weight, (0, self.pad)), self.bias)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm's Mlp's parameter names). With `align` > 1 the hidden width runs rounded up to
    a multiple of `align` with zero features: the same outputs and gradients (fc1's zero rows give GELU(0) = 0,
    which meets fc2's zero columns) from aligned GEMMs (ViT-g's decoder: int(512 * 48 / 11) = 2234 runs as
    2240)."""

    def __init__(self, dim: int, hidden: int, align: int = 1):
        super().__init__()
        if align < 1:
            raise ValueError(f"mlp align must be >= 1, got {align}")
        self.fc1 = _PadOutLinear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = _PadInLinear(hidden, dim)
        self.fc1.pad = self.fc2.pad = aligned(hidden, align) - hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block, no layer scale."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, kernel: KernelChoice, drop_path: float = 0.0,
                 mlp_align: int = 1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, kernel)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), mlp_align)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TubeletConv(nn.Conv3d):
    """The tubelet embedding's weights: a Conv3d with kernel = stride = (tubelet, p, p).

    Given the visible tokens' ids it embeds only those: their tubelets are picked from a strided view of the
    clip (the rest is never read) and meet the kernel as one matmul, the same sums the conv computes for them;
    at 90 % masking that skips 90 % of the conv's work. It is the Conv3d's own forward, so ZeRO-3 gathers the
    weight around it."""

    def forward(self, video: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, N, dim) every token in grid order, or (B, Nv, dim) the tokens `visible`."""
        if visible is None:
            return super().forward(video).flatten(2).transpose(1, 2)
        b, c, t, h, w = video.shape
        kt, kh, kw = self.kernel_size
        gt, gh, gw = t // kt, h // kh, w // kw
        cells = video.reshape(b, c, gt, kt, gh, kh, gw, kw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        ti, rest = visible // (gh * gw), visible % (gh * gw)
        rows = torch.arange(b, device=visible.device).unsqueeze(1)
        patches = cells[rows, ti, rest // gw, rest % gw].flatten(2)  # (B, Nv, C*kt*kh*kw): the weight's order
        return F.linear(patches, self.weight.flatten(1), self.bias)


class PatchEmbed(nn.Module):
    """Tubelet embedding (`proj`: the authors' key)."""

    def __init__(self, patch_size: int, tubelet_size: int, in_chans: int, dim: int):
        super().__init__()
        k = (tubelet_size, patch_size, patch_size)
        self.proj = TubeletConv(in_chans, dim, kernel_size=k, stride=k)

    def forward(self, video: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(video, visible)


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, num_ckpt: int, ckpt_fn: CheckpointFn,
                keep_last: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the blocks; also return the outputs of the last `keep_last` blocks (oldest first)."""
    kept = []
    for i, blk in enumerate(blocks):
        x = ckpt_fn(blk, x) if i < num_ckpt else blk(x)
        if i >= len(blocks) - keep_last:
            kept.append(x)
    return x, kept


def drop_path_schedule(rate: float, depth: int) -> list[float]:
    """Linearly increasing drop-path rates 0 .. rate over `depth` blocks (the authors' linspace).

    Plain Python, not torch.linspace: inside zero.Init torch constructors cast floats to bf16."""
    return [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


def _visible_index(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask (True = hidden) or an index tensor of visible tokens -> the index tensor."""
    if mask.dtype == torch.bool:
        return select_tokens(mask, None).visible
    return mask


class VideoEncoder(nn.Module):
    """Patch embedding + fixed position table + blocks + final norm; runs only visible tokens."""

    def __init__(self, *, img_size: int, patch_size: int, num_frames: int, tubelet_size: int, dim: int,
                 depth: int, num_heads: int, mlp_ratio: float, kernel: KernelChoice, in_chans: int = 3,
                 drop_path_rate: float = 0.0, final_norm: bool = True, embed_visible_only: bool = True):
        super().__init__()
        # False: the authors' way, the conv over every token, then the hidden ones dropped (same values)
        self.embed_visible_only = embed_visible_only
        self.grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.num_frames, self.img_size = num_frames, img_size  # the input it takes
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.dim = dim
        self.patch_embed = PatchEmbed(patch_size, tubelet_size, in_chans, dim)
        self.register_buffer("pos_embed", sinusoid_table(self.num_tokens, dim), persistent=False)
        dpr = drop_path_schedule(drop_path_rate, depth)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, kernel, dpr[i]) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6) if final_norm else nn.Identity()
        self.num_ckpt_blocks = 0
        self.ckpt_fn: CheckpointFn = _torch_checkpoint

    def forward(self, video: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """video (B, C, T, H, W) normalised float; mask: bool (B, N) True = hidden, or the (B, Nv) index of
        visible tokens, or None for all tokens. Returns the final-normed visible tokens."""
        return self.forward_features(video, mask)[0]

    def forward_features(self, video: torch.Tensor, mask: torch.Tensor | None = None,
                         keep_last: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(final-normed tokens, outputs of the last `keep_last` blocks before the final norm)."""
        if mask is None:
            x = self.patch_embed(video)
            x = x + self.pos_embed.to(dtype=x.dtype)
        elif self.embed_visible_only:
            visible = _visible_index(mask)
            x = self.patch_embed(video, visible)
            x = x + gather_tokens(self.pos_embed.to(dtype=x.dtype).expand(x.shape[0], -1, -1), visible)
        else:
            x = self.patch_embed(video)
            x = gather_tokens(x + self.pos_embed.to(dtype=x.dtype), _visible_index(mask))
        x, inter = _run_blocks(self.blocks, x, self.num_ckpt_blocks, self.ckpt_fn, keep_last)
        return self.norm(x), inter


class VideoDecoder(nn.Module):
    """Blocks + norm + pixel head; returns predictions for the last `num_out` tokens."""

    def __init__(self, *, num_tokens: int, dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 out_dim: int, kernel: KernelChoice, drop_path_rate: float = 0.0, mlp_align: int = 1):
        super().__init__()
        self.register_buffer("pos_embed", sinusoid_table(num_tokens, dim), persistent=False)
        # the authors give the decoder the encoder's drop_path_rate, spread over its own depth
        dpr = drop_path_schedule(drop_path_rate, depth)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, kernel, dpr[i], mlp_align)
                                    for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)
        self.num_ckpt_blocks = 0
        self.ckpt_fn: CheckpointFn = _torch_checkpoint

    def forward(self, x: torch.Tensor, num_out: int) -> torch.Tensor:
        x, _ = _run_blocks(self.blocks, x, self.num_ckpt_blocks, self.ckpt_fn)
        return self.head(self.norm(x[:, -num_out:]))


def trunc_normal_std_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Normal(0, std) truncated at +-1 std, as the authors' `trunc_normal_` wrapper calls timm's (a=-std, b=std);
    timm's own default truncates at +-2 absolute, which for std 0.02 is no truncation at all."""
    return trunc_normal_(tensor, std=std, a=-std, b=std)


def _init_module(module: nn.Module, linear_weight: Callable[[torch.Tensor], object]) -> None:
    """The authors' per-module init: Linear weight as given with zero bias, LayerNorm 1/0, q/v biases 0, the
    Conv3d patch embedding PyTorch's default."""
    if isinstance(module, nn.Linear):
        linear_weight(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv3d):
        module.reset_parameters()
    elif isinstance(module, Attention):
        nn.init.zeros_(module.q_bias)
        nn.init.zeros_(module.v_bias)


def _init_pretrain(module: nn.Module) -> None:
    """Pretraining: xavier-uniform Linears."""
    _init_module(module, nn.init.xavier_uniform_)


def _init_finetune(module: nn.Module) -> None:
    """Fine-tuning: trunc-normal(.02) Linears, cut at +-1 std."""
    _init_module(module, lambda w: trunc_normal_std_(w, 0.02))


def _default_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        module.reset_parameters()


class PretrainVideoMAE(nn.Module):
    """Encoder on visible tokens -> decoder on visible tokens + mask tokens at decoder-kept positions."""

    def __init__(self, *, img_size: int, patch_size: int, num_frames: int, tubelet_size: int, dim: int,
                 depth: int, num_heads: int, mlp_ratio: float, decoder_dim: int, decoder_depth: int,
                 decoder_heads: int, attention: str = "auto", drop_path_rate: float = 0.0, in_chans: int = 3,
                 embed_visible_only: bool = True, decoder_mlp_align: int = 64):
        """embed_visible_only / decoder_mlp_align: see VideoEncoder / Mlp; False / 1 run the authors' way
        (the same values and the same parameters either way)."""
        super().__init__()
        self.kernel = KernelChoice(attention)
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        self.encoder = VideoEncoder(img_size=img_size, patch_size=patch_size, num_frames=num_frames,
                                    tubelet_size=tubelet_size, dim=dim, depth=depth, num_heads=num_heads,
                                    mlp_ratio=mlp_ratio, kernel=self.kernel, in_chans=in_chans,
                                    drop_path_rate=drop_path_rate, embed_visible_only=embed_visible_only)
        self.grid = self.encoder.grid
        self.encoder_to_decoder = nn.Linear(dim, decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder = VideoDecoder(num_tokens=self.encoder.num_tokens, dim=decoder_dim, depth=decoder_depth,
                                    num_heads=decoder_heads, mlp_ratio=mlp_ratio,
                                    out_dim=in_chans * tubelet_size * patch_size**2, kernel=self.kernel,
                                    drop_path_rate=drop_path_rate, mlp_align=decoder_mlp_align)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise parameters and the position tables, e.g. after meta-device build + to_empty().

        As the authors: encoder and decoder get xavier-uniform Linears; `encoder_to_decoder` is built after
        their init and keeps PyTorch's default Linear init; the mask token is trunc-normal(.02) cut at +-1 std.
        """
        # through Module.apply only: under zero.Init, apply() gathers a built submodule's partitioned
        # parameters around the call, a direct call would initialise an empty shard
        self.encoder.apply(_init_pretrain)
        self.decoder.apply(_init_pretrain)
        self.encoder_to_decoder.apply(_default_init)
        trunc_normal_std_(self.mask_token, 0.02)
        for part in (self.encoder, self.decoder):
            table = sinusoid_table(part.pos_embed.shape[1], part.pos_embed.shape[2], device=part.pos_embed.device)
            part.pos_embed.copy_(table)

    def set_activation_checkpointing(self, mode: str = "none", num_blocks: int = 0,
                                     fn: CheckpointFn | None = None) -> None:
        """mode: none | full (every encoder and decoder block) | selective (first `num_blocks` encoder blocks)."""
        depth = len(self.encoder.blocks)
        if mode == "none":
            enc, dec = 0, 0
        elif mode == "full":
            enc, dec = depth, len(self.decoder.blocks)
        elif mode == "selective":
            if not 0 < num_blocks <= depth:
                raise ValueError(f"selective checkpointing needs 0 < num_blocks <= {depth}, got {num_blocks}")
            enc, dec = num_blocks, 0
        else:
            raise ValueError(f"activation checkpointing mode must be none|full|selective, got {mode!r}")
        self.encoder.num_ckpt_blocks, self.decoder.num_ckpt_blocks = enc, dec
        if fn is not None:
            self.encoder.ckpt_fn = self.decoder.ckpt_fn = fn

    def forward(self, video: torch.Tensor, encoder_mask: torch.Tensor | TokenSelection,
                decoder_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions (B, N_keep, C*t*p*p) for decoder-kept positions in ascending token order.

        Masks: bool (B, N) tensors (True = hidden / dropped; decoder_mask None = encoder-only masking: the
        decoder predicts the encoder-hidden positions), or one `TokenSelection` (the index form the trainer
        uses: no host sync, see vmae_ds.masking).
        """
        sel = encoder_mask if isinstance(encoder_mask, TokenSelection) else select_tokens(encoder_mask, decoder_mask)
        x_vis = self.encoder_to_decoder(self.encoder(video, sel.visible))
        b = x_vis.shape[0]
        pos = self.decoder.pos_embed.to(dtype=x_vis.dtype).expand(b, -1, -1)
        pos_vis, pos_kept = gather_tokens(pos, sel.visible), gather_tokens(pos, sel.kept)
        x = torch.cat([x_vis + pos_vis, self.mask_token.to(x_vis.dtype) + pos_kept], dim=1)
        return self.decoder(x, pos_kept.shape[1])


class VideoClassifier(VideoEncoder):
    """Fine-tuning model: the same encoder (keys without `encoder.`), mean pool -> fc_norm -> head."""

    def __init__(self, *, num_classes: int, head_drop_rate: float = 0.0, init_scale: float = 0.001,
                 attention: str = "auto", **encoder_kwargs):
        kernel = KernelChoice(attention)
        super().__init__(kernel=kernel, final_norm=False, **encoder_kwargs)
        self.kernel = kernel
        self.fc_norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.head_dropout = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(self.dim, num_classes)
        self.init_scale = init_scale
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The authors' fine-tuning init; the head is then scaled down by `init_scale` (0.001)."""
        self.apply(_init_finetune)
        self.head.apply(self._scale_head)  # apply(): see PretrainVideoMAE.init_weights

    @torch.no_grad()
    def reset_head(self) -> None:
        """A fresh head (as at construction), e.g. after loading a checkpoint trained on other labels."""
        self.head.apply(_init_finetune)
        self.head.apply(self._scale_head)

    def _scale_head(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            module.weight.mul_(self.init_scale)
            module.bias.zero_()
        self.pos_embed.copy_(sinusoid_table(self.pos_embed.shape[1], self.pos_embed.shape[2],
                                            device=self.pos_embed.device))

    def set_activation_checkpointing(self, mode: str = "none", num_blocks: int = 0,
                                     fn: CheckpointFn | None = None) -> None:
        depth = len(self.blocks)
        if mode not in ("none", "full", "selective"):
            raise ValueError(f"activation checkpointing mode must be none|full|selective, got {mode!r}")
        if mode == "selective" and not 0 < num_blocks <= depth:
            raise ValueError(f"selective checkpointing needs 0 < num_blocks <= {depth}, got {num_blocks}")
        self.num_ckpt_blocks = {"none": 0, "full": depth, "selective": num_blocks}[mode]
        if fn is not None:
            self.ckpt_fn = fn

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = super().forward(video)
        return self.head(self.head_dropout(self.fc_norm(x.mean(1))))
