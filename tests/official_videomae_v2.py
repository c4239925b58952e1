"""An independent, eager re-implementation of the official VideoMAE V2 pretraining code, for parity tests.

Written from the documented behaviour of OpenGVLab/VideoMAEv2 (models/modeling_pretrain.py,
engine_for_pretraining.py, dataset/masking_generator.py): the same module and attribute names (so the
state dict has exactly the official keys), the numpy sinusoid table kept as a plain tensor attribute
(not saved), qkv with concatenated (q_bias, 0, v_bias), eager math attention, the official
`forward(x, mask, decode_mask)`, the engine's target/loss and the numpy mask generators.
It deliberately shares no code with `vmae_ds`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def get_sinusoid_encoding_table(n_position: int, d_hid: int) -> torch.Tensor:
    """Sinusoid position encoding table, computed in float64 numpy as the authors do."""

    def get_position_angle_vec(position):
        return [position / np.power(10000, 2 * (hid_j // 2) / d_hid) for hid_j in range(d_hid)]

    sinusoid_table = np.array([get_position_angle_vec(pos_i) for pos_i in range(n_position)])
    sinusoid_table[:, 0::2] = np.sin(sinusoid_table[:, 0::2])  # dim 2i
    sinusoid_table[:, 1::2] = np.cos(sinusoid_table[:, 1::2])  # dim 2i+1
    return torch.tensor(sinusoid_table, dtype=torch.float, requires_grad=False).unsqueeze(0)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.fc2(x)
        return self.drop(x)


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 attn_head_dim=None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        if attn_head_dim is not None:
            head_dim = attn_head_dim
        all_head_dim = head_dim * self.num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.qkv = nn.Linear(dim, all_head_dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(all_head_dim))
            self.v_bias = nn.Parameter(torch.zeros(all_head_dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(all_head_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        x = self.proj(x)
        return self.proj_drop(x)


class Block(nn.Module):
    """Pre-norm block; init_values = 0 in VideoMAE V2 pretraining, so no gamma_1 / gamma_2 (layer scale)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        assert drop_path == 0.0, "parity tests run deterministically"
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, num_frames=16, tubelet_size=2):
        super().__init__()
        self.tubelet_size = int(tubelet_size)
        num_spatial_patches = (img_size // patch_size) ** 2
        self.num_patches = num_spatial_patches * (num_frames // self.tubelet_size)
        self.proj = nn.Conv3d(in_channels=in_chans, out_channels=embed_dim,
                              kernel_size=(self.tubelet_size, patch_size, patch_size),
                              stride=(self.tubelet_size, patch_size, patch_size))

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def _norm(dim):
    return nn.LayerNorm(dim, eps=1e-6)


class PretrainVisionTransformerEncoder(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                 tubelet_size, num_frames):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, num_frames, tubelet_size)
        num_patches = self.patch_embed.num_patches
        # plain tensor attribute: fixed, and therefore not in the state dict
        self.pos_embed = get_sinusoid_encoding_table(num_patches, embed_dim)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_layer=_norm)
                                     for _ in range(depth)])
        self.norm = _norm(embed_dim)
        self.head = nn.Identity()  # encoder_num_classes = 0

    def forward_features(self, x, mask):
        x = self.patch_embed(x)
        x = x + self.pos_embed.type_as(x).to(x.device).clone().detach()
        B, _, C = x.shape
        x_vis = x[~mask].reshape(B, -1, C)  # ~mask means visible
        for blk in self.blocks:
            x_vis = blk(x_vis)
        return self.norm(x_vis)

    def forward(self, x, mask):
        return self.head(self.forward_features(x, mask))


class PretrainVisionTransformerDecoder(nn.Module):
    def __init__(self, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias):
        super().__init__()
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_layer=_norm)
                                     for _ in range(depth)])
        self.norm = _norm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x, return_token_num):
        for blk in self.blocks:
            x = blk(x)
        if return_token_num > 0:
            return self.head(self.norm(x[:, -return_token_num:]))
        return self.head(self.norm(x))


class PretrainVisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, encoder_in_chans=3, encoder_embed_dim=768, encoder_depth=12,
                 encoder_num_heads=12, decoder_num_classes=1536, decoder_embed_dim=384, decoder_depth=4,
                 decoder_num_heads=6, mlp_ratio=4.0, qkv_bias=True, tubelet_size=2, all_frames=16):
        super().__init__()
        assert decoder_num_classes == 3 * tubelet_size * patch_size**2
        self.encoder = PretrainVisionTransformerEncoder(img_size, patch_size, encoder_in_chans, encoder_embed_dim,
                                                        encoder_depth, encoder_num_heads, mlp_ratio, qkv_bias,
                                                        tubelet_size, all_frames)
        self.decoder = PretrainVisionTransformerDecoder(decoder_num_classes, decoder_embed_dim, decoder_depth,
                                                        decoder_num_heads, mlp_ratio, qkv_bias)
        self.encoder_to_decoder = nn.Linear(encoder_embed_dim, decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.pos_embed = get_sinusoid_encoding_table(self.encoder.patch_embed.num_patches, decoder_embed_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x, mask, decode_mask=None):
        decode_vis = mask if decode_mask is None else ~decode_mask

        x_vis = self.encoder(x, mask)  # [B, N_vis, C_e]
        x_vis = self.encoder_to_decoder(x_vis)  # [B, N_vis, C_d]
        B, N_vis, C = x_vis.shape

        # the visible tokens are not unshuffled; the pos embedding is gathered to match instead
        expand_pos_embed = self.pos_embed.expand(B, -1, -1).type_as(x).to(x.device).clone().detach()
        pos_emd_vis = expand_pos_embed[~mask].reshape(B, -1, C)
        pos_emd_mask = expand_pos_embed[decode_vis].reshape(B, -1, C)

        x_full = torch.cat([x_vis + pos_emd_vis, self.mask_token + pos_emd_mask], dim=1)  # [B, N, C_d]
        return self.decoder(x_full, pos_emd_mask.shape[1])


# ------------------------------------------------------------------------------- engine target / loss

def official_labels(images, decode_masked_pos, patch_size, tubelet_size=2):
    """The engine's target: unnormalise, 'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c',
    normalise per token and channel (unbiased std + 1e-6), 'b n p c -> b n (p c)', keep decoder-visible."""
    mean = torch.as_tensor(IMAGENET_DEFAULT_MEAN)[None, :, None, None, None]
    std = torch.as_tensor(IMAGENET_DEFAULT_STD)[None, :, None, None, None]
    unnorm_images = images * std + mean  # in [0, 1]
    b, c, T, H, W = unnorm_images.shape
    t, h, w = T // tubelet_size, H // patch_size, W // patch_size
    # written as einops would expand it: split axes, then order (b, t, h, w, p0, p1, p2, c)
    x = unnorm_images.view(b, c, t, tubelet_size, h, patch_size, w, patch_size)
    x = torch.einsum("bctihjwk->bthwijkc", x).reshape(b, t * h * w, tubelet_size * patch_size**2, c)
    images_norm = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    images_patch = images_norm.reshape(b, t * h * w, -1)  # 'b n p c -> b n (p c)'
    B, N, C = images_patch.shape
    return images_patch[~decode_masked_pos].reshape(B, -1, C)


def official_loss(outputs, labels, bool_masked_pos, decode_masked_pos):
    """MSE per token, averaged over encoder-hidden tokens among the decoder-visible ones."""
    B = outputs.shape[0]
    loss = (outputs - labels) ** 2
    loss = loss.mean(dim=-1)
    cal_loss_mask = bool_masked_pos[~decode_masked_pos].reshape(B, -1)
    return (loss * cal_loss_mask).sum() / cal_loss_mask.sum()


# ------------------------------------------------------------------------------------ mask generators

class TubeMaskingGenerator:
    def __init__(self, input_size, mask_ratio):
        self.frames, self.height, self.width = input_size
        self.num_patches_per_frame = self.height * self.width
        self.total_patches = self.frames * self.num_patches_per_frame
        self.num_masks_per_frame = int(mask_ratio * self.num_patches_per_frame)
        self.total_masks = self.frames * self.num_masks_per_frame

    def __call__(self):
        mask_per_frame = np.hstack([
            np.zeros(self.num_patches_per_frame - self.num_masks_per_frame),
            np.ones(self.num_masks_per_frame),
        ])
        np.random.shuffle(mask_per_frame)
        return np.tile(mask_per_frame, (self.frames, 1)).flatten()


class Cell:
    def __init__(self, num_masks, num_patches):
        self.num_masks = num_masks
        self.num_patches = num_patches
        self.size = num_masks + num_patches
        self.queue = np.hstack([np.ones(num_masks), np.zeros(num_patches)])
        self.queue_ptr = 0

    def set_ptr(self, pos=-1):
        self.queue_ptr = np.random.randint(self.size) if pos < 0 else pos

    def get_cell(self):
        cell_idx = (np.arange(self.size) + self.queue_ptr) % self.size
        return self.queue[cell_idx]

    def run_cell(self):
        self.queue_ptr += 1


class RunningCellMaskingGenerator:
    """All 4 start positions are precomputed; a call picks one (1 = dropped from the decoder)."""

    def __init__(self, input_size, mask_ratio=0.5):
        self.frames, self.height, self.width = input_size
        self.mask_ratio = mask_ratio
        num_masks_per_cell = int(4 * self.mask_ratio)
        assert 0 < num_masks_per_cell < 4
        num_patches_per_cell = 4 - num_masks_per_cell
        self.cell = Cell(num_masks_per_cell, num_patches_per_cell)
        self.cell_size = (2, 2)

        mask_list = []
        for ptr_pos in range(self.cell.size):
            self.cell.set_ptr(ptr_pos)
            mask = []
            for _ in range(self.frames):
                self.cell.run_cell()
                mask_unit = self.cell.get_cell().reshape(self.cell_size)
                mask_map = np.tile(mask_unit, [self.height // 2, self.width // 2])
                mask.append(mask_map.flatten())
            mask_list.append(np.stack(mask, axis=0))
        self.all_mask_maps = np.stack(mask_list, axis=0)

    def __call__(self):
        mask = self.all_mask_maps[np.random.randint(self.cell.size)]
        return np.copy(mask)
