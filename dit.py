"""dit.py — the CogVideoX expert transformer and its T5 text encoder (paper §2.2, §3.1, App. A).

What is here, smallest piece first: timestep sinusoid -> 3D-RoPE (and the released 2B's 3D sin-cos
table) -> attention with QK-norm -> the expert transformer block (expert AdaLN, §2.2) -> ExpertDiT
(patchify, one [text; video] sequence, blocks, final AdaLN, unpatchify) -> its Frame Pack forward
(§3.1) -> the image-to-video input (App. A) -> released-weight loading -> the T5 text encoder and a
tiny trainable T5 for the toy demo -> LoRA adapters and their diffusers / PEFT file format.
CogVideoX 1.5 (the released 768x1360 models; not in the paper, which patchifies space only) is the
same model with three switches: a temporal patch (DiTConfig.patch_t = 2: one token covers two
latent frames, an odd frame count is padded as the release pads it, pad_frames), RoPE over the
patched grid (integer positions, as the 1.5 pipelines build it) and, for the I2V model, an "ofs"
embedding added to the time embedding (DiTConfig.ofs_dim). Training lives in train.py; this file
is only the model.
Where we differ from the release (same values, checked against diffusers in the tests): text and
video stay one sequence instead of two tensors concatenated per call, q, k, v are one fused Linear,
and RoPE is one complex multiply. Speed-only code (the last block computing video rows only; Frame
Pack attention without an (M, M) mask: each sample's span alone, or FlexAttention) is in the last
section, each called from one line. Sequence parallel (DeepSpeed-Ulysses, not in the paper; its own
section): with ExpertDiT.sp set, a group of ranks shares every row, 1/G of its tokens each, with an
all-to-all around attention (train.py / sample.py --sp N).

Run:
  python dit.py                            # tiny preset: parameters, timed forward+backward (CPU)
  python dit.py --preset cogvideox-5b      # a full preset on the meta device: parameter count
  python dit.py --preset cogvideox1.5-5b   # the 1.5 model (temporal patch 2)
  python dit.py --preset tiny --device cuda --bf16
  python -m pytest -q tests/test_dit.py    # parity with diffusers, packed == alone, save/load
  python -m pytest -q tests/test_dit.py -m slow -k flex    # the compiled FlexAttention kernel
  python -m pytest -q tests/test_lora.py   # LoRA files both ways with diffusers / PEFT
  python -m pytest -q tests/test_dit.py -k sequence_parallel  # SP on 2 gloo ranks == 1 process

Shape legend:
  B batch        C latent channels   T latent frames (T' in the paper)   h, w latent height, width
  p spatial patch   gh, gw = h/p, w/p   pt temporal patch (1; 1.5: 2)   Tp = ceil(T/pt) token frames
  n = Tp*gh*gw video tokens    L text tokens    N = L + n
  D hidden width     H heads    d head dim (D = H*d)    E time-embedding width
  S samples in a Frame Pack batch    R packed rows    M tokens per packed row
"""
import argparse
import functools
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint


@dataclass
class DiTConfig:
    in_channels: int = 16      # I2V doubles it: [noisy latent; image latent] (App. A)
    out_channels: int = 16
    patch: int = 2             # spatial patch (time: patch_t below)
    layers: int = 30
    heads: int = 30
    head_dim: int = 64
    time_dim: int = 512        # E: width of the timestep MLP output that drives every modulation
    text_dim: int = 4096       # T5 v1.1 XXL width
    text_len: int = 226        # prompt tokens (padded); only the sin-cos/learned tables need it
    # "rope" (paper, 5B) | "sincos" (released 2B) | "learned" (5B-I2V: RoPE + an absolute table)
    pos: str = "rope"
    rope_theta: float = 10000.0
    # False: extrapolation, integer positions at every size (§3.2); True: the pipeline's
    # interpolation
    rope_interp: bool = False
    # native latent grid (T, h, w): size of the sin-cos/learned tables, the interpolation target
    base_frames: int = 13
    base_height: int = 60
    base_width: int = 90
    spatial_scale: float = 1.875   # sin-cos only: spatial positions are divided by this
    temporal_scale: float = 1.0
    # block LayerNorms: the diffusers port and the original code differ; either value reproduces
    norm_eps: float = 1e-5
    qk_eps: float = 1e-6       # the per-head QK LayerNorm
    # Latent frames per token. 1: §2.2 "we do not patchify along the temporal dimension" (1.0
    # models); 2: CogVideoX 1.5, where each token covers two latent frames (release, not paper)
    patch_t: int = 1
    # CogVideoX1.5-5B-I2V: width of the "ofs" embedding (0: none), the sinusoid of the value `ofs`
    # through its own MLP, added to the time embedding; its pipelines and trainers always pass 2.0
    ofs_dim: int = 0
    ofs: float = 2.0

    @property
    def dim(self):
        return self.heads * self.head_dim


DIT_PRESETS = {
    # The shapes demo DiT: consumes the tiny VAE's latents of the toy clips and the tiny T5's
    # features; a forward takes milliseconds on a laptop CPU. Its base grid is the demo's clip.
    "tiny": DiTConfig(in_channels=8, out_channels=8, layers=4, heads=4, head_dim=32, time_dim=128,
                      text_dim=64, text_len=12, base_frames=3, base_height=8, base_width=8),
    "cogvideox-2b": DiTConfig(layers=30, heads=30, pos="sincos"),
    "cogvideox-5b": DiTConfig(layers=42, heads=48),
    "cogvideox-5b-i2v": DiTConfig(in_channels=32, layers=42, heads=48, pos="learned"),
    # CogVideoX 1.5 (released 768x1360, 81 frames at 16 fps): the 5B with a temporal patch of 2.
    # The released configs say sample_frames 81 (21 latent frames) and sample_height = sample_width
    # = 300 latent pixels: the bound of the pipelines' RoPE grid (150 x 150 patches), not a size.
    "cogvideox1.5-5b": DiTConfig(layers=42, heads=48, patch_t=2, base_frames=21, base_height=300,
                                 base_width=300),
    "cogvideox1.5-5b-i2v": DiTConfig(in_channels=32, layers=42, heads=48, patch_t=2, ofs_dim=512,
                                     base_frames=21, base_height=300, base_width=300),
}
# The demo's DiT (train.py PRESETS["shapes"]): the tiny one on the 4-channel latents of
# vae.VAE_PRESETS["shapes"], with 8 text tokens: the demo's longest caption ("a yellow square
# moves to the right") is 8 with its end token, and every padding token is a token of the
# sample's Frame Pack row (a 9-frame 24 px clip: 27 video tokens)
DIT_PRESETS["shapes"] = replace(DIT_PRESETS["tiny"], in_channels=4, out_channels=4, text_len=8)


def num_tokens(cfg, T_lat, h_lat, w_lat):
    """Text + video tokens of one sample: what a Frame Pack row budget is counted in (§3.1).
    With a temporal patch an odd frame count is padded first (pad_frames): ceil(T / pt) token
    frames."""
    return cfg.text_len + -(-T_lat // cfg.patch_t) * (h_lat // cfg.patch) * (w_lat // cfg.patch)


def learned_cover(cfg, sf, tf):
    """What a "learned" position table (5B-I2V, App. A) covers, in pixels: ((H, W), the most
    frames), for a VAE of spatial / temporal factors sf, tf. The table has the native grid's rows
    only: other sizes and longer clips are refused (train.py and sample.py check it up front)."""
    return (cfg.base_height * sf, cfg.base_width * sf), (cfg.base_frames - 1) * tf + 1


def pad_frames(x, pt):
    """(..., T, h, w) -> (..., T + k, h, w), k = (-T) mod pt: latent frame 0 repeated k times in
    front, so the frames split into whole temporal patches (CogVideoX 1.5). The release's padding:
    its trainers prepend copies of latent frame 0, and its pipelines sample the extra frame in
    front and drop it after decoding (sample.generate). A no-op for pt = 1 or whole patches."""
    k = -x.shape[-3] % pt
    return torch.cat([x.narrow(-3, 0, 1)] * k + [x], dim=-3) if k else x  # (..., T + k, h, w)


def check_patch_t(cfg):
    """What the 1.5 release pairs with a temporal patch: RoPE at integer positions over the patched
    grid (its pipelines build no other), and an ofs embedding as wide as the time embedding it is
    added to."""
    if cfg.patch_t < 1:
        raise ValueError(f"DiTConfig.patch_t={cfg.patch_t}: use 1 (1.0 models) or 2 (1.5)")
    if cfg.patch_t > 1 and (cfg.pos != "rope" or cfg.rope_interp):
        raise ValueError(f"DiTConfig.patch_t={cfg.patch_t} needs pos='rope' with rope_interp=False "
                         "(the 1.5 release's integer RoPE positions)")
    if cfg.ofs_dim and cfg.ofs_dim != cfg.time_dim:
        raise ValueError(f"DiTConfig.ofs_dim={cfg.ofs_dim} must equal time_dim={cfg.time_dim}: the "
                         "ofs embedding is added to the time embedding")


# ----- timestep embedding -----

def timestep_sinusoid(t, dim):
    """(B,) integer steps 0..999 -> (B, dim) [cos | sin], frequencies exp(-ln(1e4) i / half).
    Same op order as the released port so fp32 values agree bit for bit even at t = 999."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device).float() / half)
    args = t[:, None].float() * freqs[None]                          # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)     # (B, dim), cos first


# ----- 3D-RoPE (§2.2) -----

def rope_positions(T, gh, gw, cfg):
    """Float positions per axis of the token grid (T = token frames). Extrapolation (§3.2, the
    paper's choice): integer positions at any size, so neighbouring tokens keep their relative
    offsets; CogVideoX 1.5 uses exactly these over its patched grid (its pipelines' "slice"
    grid). Interpolation (the diffusers pipeline): the grid is fitted inside the native grid
    (resize + centre crop), positions spread by linspace."""
    if not cfg.rope_interp:
        return [torch.arange(s, dtype=torch.float32) for s in (T, gh, gw)]
    bh, bw = cfg.base_height // cfg.patch, cfg.base_width // cfg.patch
    # taller than native: fit the height, else the width
    rh, rw = (bh, int(round(bh / gh * gw))) if gh / gw > bh / bw else (int(round(bw / gw * gh)), bw)
    top, left = int(round((bh - rh) / 2.0)), int(round((bw - rw) / 2.0))
    # Released quirk, copied as is: the last position is end*(g-1)/g, scaled from the crop's
    # absolute end rather than its length, so with a crop offset the spacing is not crop size / g.
    ph = torch.linspace(top, (top + rh) * (gh - 1) / gh, gh, dtype=torch.float32)
    pw = torch.linspace(left, (left + rw) * (gw - 1) / gw, gw, dtype=torch.float32)
    pt = torch.linspace(0, T * (T - 1) / T, T, dtype=torch.float32)  # = arange(T): never rescaled
    return [pt, ph, pw]


def rope_table(T, gh, gw, cfg):
    """(n, d/2) complex rotations e^{i angle} for the video tokens in (t, h, w) order.

    §2.2 3D-RoPE: the head dim is split t : h : w = 2/8 : 3/8 : 3/8 and each part rotates by its
    own axis (the paper lists x, y : 3/8 each and t : 2/8; the released order of the parts is
    [t | h | w]). Rotation acts on interleaved pairs (x0, x1), (x2, x3), ..., i.e. on the complex
    numbers x0 + i x1, ...: one complex multiply per pair (the release's cos/sin with a stacked,
    negated copy is the same rotation in more passes)."""
    d = cfg.head_dim
    dims = (d // 4, d // 8 * 3, d // 8 * 3)
    angles = []
    for pos, dd in zip(rope_positions(T, gh, gw, cfg), dims):
        freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dd, 2, dtype=torch.float32) / dd))
        angles.append(torch.outer(pos, freqs))                       # (size, dd/2)
    at, ah, aw = angles
    grid = torch.cat([at[:, None, None].expand(-1, gh, gw, -1),      # (T, gh, gw, d/2)
                      ah[None, :, None].expand(T, -1, gw, -1),
                      aw[None, None, :].expand(T, gh, -1, -1)], dim=-1).reshape(T * gh * gw, d // 2)
    return torch.polar(torch.ones_like(grid), grid)                  # (n, d/2) complex: cos + i sin


def apply_rope(x, rot):
    """x (R, N, H, d); rot (R|1, N, 1, d/2) complex. Text tokens carry rot = 1
    (RoPE only on video, §2.2). Computed in fp32 like the release, so bf16 activations do not
    lose the phase. One complex multiply forward and one backward, instead of a swap, two
    products and a sum each way."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))     # (R, N, H, d/2) complex pairs
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)      # (R, N, H, d)


# ----- 3D sin-cos table (released 2B) -----

def sincos_1d(pos, dim):
    """(m,) positions -> (m, dim) [sin | cos], float64 as in the release."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))  # (dim/2,)
    out = torch.outer(pos.double(), omega)                            # (m, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=-1)                  # (m, dim)


def sincos_table(T, gh, gw, cfg):
    """(n, D) absolute table of the released 2B, added to the video patch embeddings. Layout
    [time D/4 | width 3D/8 | height 3D/8]; spatial positions are divided by spatial_scale, which
    maps the 480x720 patch grid onto the 256x384 first-stage grid (§3.2 progressive training). The
    paper's ablation (Fig. 3a) prefers 3D-RoPE; the released 2B still uses this table, so it stays
    selectable."""
    D = cfg.dim
    t = sincos_1d(torch.arange(T) / cfg.temporal_scale, D // 4)       # (T, D/4)
    ww = sincos_1d(torch.arange(gw) / cfg.spatial_scale, 3 * D // 8)  # (gw, 3D/8)
    hh = sincos_1d(torch.arange(gh) / cfg.spatial_scale, 3 * D // 8)  # (gh, 3D/8)
    return torch.cat([t[:, None, None].expand(-1, gh, gw, -1),        # (T, gh, gw, D)
                      ww[None, None, :].expand(T, gh, -1, -1),
                      hh[None, :, None].expand(T, -1, gw, -1)], dim=-1).reshape(T * gh * gw, D)


# ----- 3D full attention (§2.2) and the Frame Pack mask (§3.1) -----

class Seq(NamedTuple):
    """What a block needs to know about the token layout of its input rows.
    Unpacked rows: text_len = L, idx = None (every row is [L text; n video] of one sample).
    Packed rows: idx (R, M) picks each token's modulation row 2*s + (0 video | 1 text) of
    sample s."""
    text_len: int
    idx: torch.Tensor = None
    rot: torch.Tensor = None    # (R|1, M, 1, d/2) complex RoPE rotations; None for sin-cos
    # None: every row is one sample (full attention, no mask); a bool (R, 1, M, M) tensor from
    # pack_mask; or a speed-section plan computing the same attention without an (M, M) tensor
    mask: object = None
    # None, or per row the (first slot, end, modulation row) pieces that cover it: the same
    # modulation as idx without per-token (R, M, D) copies of it (speed section)
    pieces: list = None
    # an SPGroup: the rows are this rank's 1/G of every row's slots (sequence parallel section)
    sp: object = None


def pack_mask(seg):
    """THE rule of Frame Pack attention (§3.1): token i may attend to token j iff both belong to
    the same sample, so a packed sample sees exactly what it would see alone. seg (R, M) sample id
    per token; padding has id -1, so padding attends to padding only (never an empty softmax row,
    so no NaN). -> a bool (R, 1, M, M) SDPA mask: the reference path, M² per row. packed_attention
    (speed section) computes the same attention with memory linear in M."""
    return (seg[:, :, None] == seg[:, None, :])[:, None]             # (R, 1, M, M)


def attention(q, k, v, mask):
    """q, k, v (R, N, H, d) -> (R, N, H, d). §2.2 3D full attention: one softmax over all text
    and video tokens of a sample. Unpacked rows need no mask at all (text and video of one sample
    see each other), which keeps SDPA on its fastest (flash / memory-efficient) kernels."""
    if mask is not None and not isinstance(mask, torch.Tensor):
        return mask(q, k, v)          # Frame Pack without an (M, M) mask (speed section)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))                  # (R, H, N, d)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2)                                          # (R, N, H, d)


# ----- expert transformer block (§2.2) -----

def modulate(x, shift, scale):
    """AdaLN: x * (1 + scale) + shift, x already LayerNorm-ed (one fused multiply-add)."""
    return torch.addcmul(shift, x, 1 + scale)


def gated(x, gate, y):
    """The gated residual x + gate * y."""
    return x + gate * y


class Block(nn.Module):
    """One LayerNorm, attention and MLP shared by text and video; only the modulation is per expert.
    §2.2 Expert AdaLN: SiLU -> Linear(E, 6D) gives (shift, scale, gate) for video and another for
    text. The paper's ablation (Fig. 3c) found expert MLPs no better, so the experts are this
    modulation only."""

    def __init__(self, cfg):
        super().__init__()
        D, self.H, self.d = cfg.dim, cfg.heads, cfg.head_dim
        self.norm1 = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.mod1 = nn.Linear(cfg.time_dim, 6 * D)
        self.qkv = nn.Linear(D, 3 * D)          # fused q, k, v: one matmul instead of three
        # QK-norm, per head: keeps the attention logits bounded
        self.q_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.qk_eps)
        self.k_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.qk_eps)
        self.proj = nn.Linear(D, D)
        self.norm2 = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.mod2 = nn.Linear(cfg.time_dim, 6 * D)
        self.fc1 = nn.Linear(D, 4 * D)
        self.fc2 = nn.Linear(4 * D, D)
        self.mlp_chunks = 1                     # > 1: the MLP's backward one token slice at a time

    def attn(self, h, seq, q_from=0):
        """(R, N, D) -> (R, N - q_from, D). q_from > 0 (see video_rows_block): outputs only for
        the tokens from q_from on; their queries still attend to every token's keys and values."""
        R, N, D = h.shape
        q, k, v = self.qkv(h).view(R, N, 3, self.H, self.d).unbind(2)  # each (R, N, H, d)
        # QK-norm before RoPE, as released; q (R, N - q_from, H, d)
        q, k = self.q_norm(q[:, q_from:]), self.k_norm(k)
        if seq.rot is not None:
            q, k = apply_rope(q, seq.rot[:, q_from:]), apply_rope(k, seq.rot)
        q, k = q.to(v.dtype), k.to(v.dtype)
        # SP: all-to-all to every slot of 1/G of the heads and back (sequence parallel section)
        o = attention(q, k, v, seq.mask) if seq.sp is None else sp_attention(q, k, v, seq)
        return self.proj(o.reshape(R, N - q_from, D))                 # (R, N - q_from, D)

    def mlp(self, h, seq=None):
        if self.mlp_chunks > 1 and torch.is_grad_enabled():  # memory for compute (speed section)
            return chunked_mlp(self, h, self.mlp_chunks)
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))      # (R, N, D)

    def sub(self, x, e, seq, norm, mod, f, q_from=0):
        """One sub-layer: x + gate * f(LN(x) * (1 + scale) + shift), with the (shift, scale, gate)
        of each token's expert. q_from = L (see video_rows_block): f returns the video rows only,
        and so does sub."""
        # (S, [video, text], [shift, scale, gate], D): the released chunk order
        m = mod(e).view(-1, 2, 3, x.shape[-1])
        h = norm(x)                                                    # (R, N, D)
        if seq.idx is not None:
            # Packed rows: per-token modulation, gathered from each token's (sample, expert) row
            # (§3.1: every sample keeps its own timestep).
            if seq.pieces is not None:             # long rows: piece by piece (speed section)
                return piecewise_sub(x, h, m.flatten(0, 1), seq, f)
            # index_select, not m[idx]: its backward is an index_add, several times faster on
            # CPU than advanced indexing's accumulating index_put (same values)
            mm = m.flatten(0, 1).index_select(0, seq.idx.flatten())   # (R·M, 3, D)
            shift, scale, gate = mm.view(*seq.idx.shape, 3, -1).unbind(2)  # each (R, M, D)
            return gated(x, gate, f(modulate(h, shift, scale), seq))
        # Unpacked rows: [L text; n video]. The released code carries text and video as two
        # tensors and concatenates them for every attention and MLP call. We keep one sequence: the
        # shared LayerNorm, attention and MLP run once on it; only the cheap element-wise modulation
        # looks at which expert a token belongs to. (vs, vc, vg): the video expert's shift, scale,
        # gate; (ts, tc, tg): the text expert's.
        (vs, vc, vg), (ts, tc, tg) = (z.unbind(1) for z in m[:, :, :, None].unbind(1))  # (B, 1, D)
        L = seq.text_len
        if L == 0:                              # video rows only (the last block's MLP)
            return gated(x, vg, f(modulate(h, vs, vc), seq))           # (B, n, D)
        sizes = [L, x.shape[1] - L]
        # split (not two slices): its backward is one concatenation instead of zero-filled grads
        ht, hv = h.split(sizes, dim=1)                                 # (B, L, D), (B, n, D)
        # text tokens take the text expert's (shift, scale), video tokens the video expert's
        y = f(torch.cat([modulate(ht, ts, tc), modulate(hv, vs, vc)], dim=1), seq)  # (B, N, D)
        if q_from:                              # y: the video rows only
            return gated(x[:, q_from:], vg, y)                         # (B, n, D)
        # x + gate * y with each expert's gate on its own tokens; gating the two parts of y (not
        # one cat of the gates) keeps nothing (B, N, D) for backward but y itself
        yt, yv = y.split(sizes, dim=1)                                 # (B, L, D), (B, n, D)
        return gated(x, 1, torch.cat([tg * yt, vg * yv], dim=1))       # (B, N, D)

    def forward(self, x, e, seq, video_only=False):
        """x (R, N, D), e (S, E) = SiLU(time embedding) -> (R, N, D). Each sub-layer has its own
        expert modulation (Fig. 1). video_only: the (B, n, D) video rows only (speed section)."""
        if video_only:
            return video_rows_block(self, x, e, seq)
        # x + gate1 * attn(LN1(x) * (1 + scale1) + shift1), then the same with the MLP
        x = self.sub(x, e, seq, self.norm1, self.mod1, self.attn)
        return self.sub(x, e, seq, self.norm2, self.mod2, self.mlp)


# ----- the whole model -----

class ExpertDiT(nn.Module):
    """v-prediction network: x (B, C_in, T, h, w), t (B,), text (B, L, text_dim)
    -> v (B, C_out, T, h, w)."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.pos not in ("rope", "sincos", "learned"):
            raise ValueError(f"DiTConfig.pos={cfg.pos!r}: use 'rope', 'sincos' or 'learned'")
        if cfg.head_dim % 16:
            raise ValueError(f"head_dim={cfg.head_dim}: use a multiple of 16 (whole RoPE pairs)")
        check_patch_t(cfg)
        self.cfg, D, p, pt = cfg, cfg.dim, cfg.patch, cfg.patch_t
        # = the released Conv2d(k=p, stride=p) on (c, ph, pw); 1.5: the released Linear on
        # (c, pt, ph, pw)
        self.patch = nn.Linear(cfg.in_channels * pt * p * p, D)
        self.text_proj = nn.Linear(cfg.text_dim, D)          # T5 features -> D, one Linear (§2.2)
        self.time_in = nn.Sequential(nn.Linear(D, cfg.time_dim), nn.SiLU(),
                                     nn.Linear(cfg.time_dim, cfg.time_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        # Released quirk: a plain LayerNorm, then the AdaLN's own LayerNorm, two in a row. Kept for
        # the weights.
        self.norm_final = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.norm_out = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.mod_out = nn.Linear(cfg.time_dim, 2 * D)        # (shift, scale); video only
        self.proj_out = nn.Linear(D, pt * p * p * cfg.out_channels)
        # 1.5-I2V: sinusoid(ofs) -> Linear -> SiLU -> Linear, added to the time embedding
        self.ofs_in = nn.Sequential(nn.Linear(cfg.ofs_dim, cfg.ofs_dim), nn.SiLU(),
                                    nn.Linear(cfg.ofs_dim, cfg.ofs_dim)) if cfg.ofs_dim else None
        if cfg.pos == "learned":
            # 5B-I2V (App. A): RoPE plus an absolute table over [text; native video grid]. The
            # paper's Fig. 3b found the two converge alike. The official I2V config trains it
            # (learnable_pos_embed: a Parameter, zero init); the released weights hold its values
            # (their 5,625,087,552 parameters count it; diffusers keeps it as a buffer, inference).
            n = cfg.text_len + cfg.base_frames * (cfg.base_height // p) * (cfg.base_width // p)
            self.pos = nn.Parameter(torch.zeros(1, n, D))
        self.checkpointing = False   # True: recompute each block in backward (saves memory)
        self.offload = False         # with checkpointing: the block inputs wait in host memory
        self.autocast = None         # torch.bfloat16: run the forward under autocast (GPU)
        # Frame Pack attention: "auto" | "dense" | "segments" | "flex" (see packed_attention)
        self.packed_attention = "auto"
        self._tables = {}            # cached RoPE / sin-cos tables keyed by grid and device
        # an SPGroup: each sample's tokens split over a group of ranks (sequence parallel section)
        self.sp = None
        self.init_weights()

    def init_weights(self, seed=None):
        """All initialisation in one place, one tensor at a time (initial()): each from its own
        generator seeded by (seed, its name), so the values depend neither on the order modules
        are built in nor on how train.py later shards the model (an FSDP rank fills its shard from
        the same full value). seed None: drawn from torch's global generator (torch.manual_seed
        decides). Nothing to do on the meta device or on fake tensors (a step simulator)."""
        from torch._subclasses.fake_tensor import FakeTensor
        named = [*self.named_parameters(), *self.named_buffers()]
        if all(t.is_meta or isinstance(t, FakeTensor) for _, t in named):
            return
        seed = int(torch.randint(2**62, ())) if seed is None else seed
        with torch.no_grad():
            for name, t in named:
                t.copy_(self.initial(name, seed))

    def initial(self, name, seed):
        """The initial value of parameter (or buffer) `name`, full size, on the CPU. DiT-style:
        xavier linears, zero biases, LayerNorms weight 1 and bias 0, the timestep MLP N(0, 0.02);
        the modulation and the output projection start at zero, so every block is the identity
        and v = 0 at step 0 (adaLN-Zero)."""
        owner_name, _, leaf = name.rpartition(".")
        owner = self.get_submodule(owner_name)
        shape = getattr(owner, leaf).shape
        g = torch.Generator().manual_seed(int.from_bytes(
            hashlib.sha256(f"{seed}|{name}".encode()).digest()[:8], "little") % 2**63)
        zero = [self.mod_out, self.proj_out] + [m for b in self.blocks for m in (b.mod1, b.mod2)]
        if leaf in ("lora_A", "lora_B"):  # adapters (LoRA section): PEFT's init, B = 0
            return owner.initial(leaf, g)
        small = [self.time_in[0], self.time_in[2]]
        if self.ofs_in is not None:  # 1.5-I2V: N(0, 0.02) in, zero out: an I2V fine-tune from a
            small.append(self.ofs_in[0])  # T2V model begins with the T2V's modulation
            zero.append(self.ofs_in[2])
        if name == "pos":  # the learned table: zeros, as the official I2V config starts it
            return torch.zeros(shape)
        if leaf == "bias" or any(owner is m for m in zero):
            return torch.zeros(shape)
        if isinstance(owner, nn.LayerNorm):
            return torch.ones(shape)
        if any(owner is m for m in small):
            return torch.empty(shape).normal_(0.0, 0.02, generator=g)
        return nn.init.xavier_uniform_(torch.empty(shape), generator=g)  # every other Linear

    # ----- positions and embeddings -----

    def _table(self, kind, L, T, gh, gw, device):
        """Cached per grid size, so sampling and training never rebuild them.
        "rope": (L + n, d/2) complex rotations for one sample's [text; video] tokens; the text rows
        are the identity rotation (1 + 0i), which applies RoPE to video positions only without
        slicing q, k. "sincos": (n, D) table for the video tokens (text slots get nothing added)."""
        key = (kind, L, T, gh, gw, device)
        if key not in self._tables:
            if kind == "rope":
                rot = rope_table(T, gh, gw, self.cfg)                  # (n, d/2)
                self._tables[key] = torch.cat([rot.new_ones(L, rot.shape[1]), rot]).to(device)
            else:
                # (n, D), computed in float64 and kept in float32, as the release keeps it
                self._tables[key] = sincos_table(T, gh, gw, self.cfg).float().to(device)
        return self._tables[key]

    def _video_embed(self, x, L):
        """x (B, C, T, h, w) -> (B, n, D) patch embeddings plus the absolute table, if any. With a
        temporal patch, an odd T is padded first (pad_frames)."""
        c, p, pt = self.cfg, self.cfg.patch, self.cfg.patch_t
        B, C, T, h, w = x.shape
        if C != c.in_channels or h % p or w % p:
            raise ValueError(f"latent (B, C, T, h, w)={tuple(x.shape)}: need C={c.in_channels} and "
                             f"h, w multiples of {p} (crop or resize the video)")
        gh, gw = h // p, w // p
        x = pad_frames(x, pt)                                          # (B, C, Tp*pt, h, w)
        patches = rearrange(x, "b c (t pt) (gh ph) (gw pw) -> b (t gh gw) (c pt ph pw)", pt=pt,
                            ph=p, pw=p)
        tok = self.patch(patches)                                      # (B, n, D)
        if c.pos == "sincos":
            tok = tok + self._table("sincos", 0, T, gh, gw, x.device).to(tok.dtype)
        elif c.pos == "learned":
            native = (c.base_height // p, c.base_width // p, c.text_len)
            if (gh, gw, L) != native or T > c.base_frames:
                raise ValueError(f"the learned position table covers {c.text_len} text tokens and "
                                 f"latents up to {c.base_frames}x{c.base_height}x{c.base_width}; "
                                 f"got L={L}, latent {T}x{h}x{w}")
            # Fewer frames take the first rows of the (t, h, w)-ordered table. (diffusers falls back
            # to a sin-cos table there, a quirk we do not copy; at the native size both agree.)
            tok = tok + self.pos[0, L:L + tok.shape[1]].to(tok.dtype)
        return tok

    def _text_embed(self, text):
        txt = self.text_proj(text)                                     # (B, L, D)
        if self.cfg.pos == "learned":
            txt = txt + self.pos[:, :text.shape[1]].to(txt.dtype)  # the table has text slots too
        return txt

    def _time_embed(self, t):
        """(B,) steps -> (B, E). §2.2 / Fig. 1: the timestep drives every modulation. The SiLU
        that starts each modulation MLP is the same for all of them, so it is applied once here.
        1.5-I2V (release only): plus the ofs embedding, before that SiLU."""
        dt = self.patch.weight.dtype
        e = self.time_in(timestep_sinusoid(t, self.cfg.dim).to(dt))   # (B, E)
        if self.ofs_in is not None:
            ofs = torch.full(t.shape, self.cfg.ofs, device=t.device)   # (B,) the constant 2.0
            e = e + self.ofs_in(timestep_sinusoid(ofs, self.cfg.ofs_dim).to(dt))  # (B, E)
        return F.silu(e)

    def _final(self, x, m):
        """The final AdaLN: x (..., D) video tokens, m (..., 2, D) (shift, scale)
        -> (..., pt*p*p*C_out)."""
        h = self.norm_out(self.norm_final(x))                         # (..., D)
        return self.proj_out(modulate(h, m[..., 0, :], m[..., 1, :]))

    def _blocks(self, x, e, seq, video_only=False):
        """video_only: the last block returns only the video rows (unpacked [L text; n video])."""
        for i, blk in enumerate(self.blocks):
            last = video_only and i == len(self.blocks) - 1
            if self.checkpointing and torch.is_grad_enabled():
                # keep only the block inputs (offload: in host memory); recompute in backward
                x = offloaded(blk, x, e, seq, last) if self.offload else \
                    checkpoint(blk, x, e, seq, last, use_reentrant=False)
            else:
                x = blk(x, e, seq, last)
        return x

    def _amp(self, device):
        return torch.autocast(device.type, dtype=self.autocast or torch.bfloat16,
                              enabled=self.autocast is not None)

    # ----- forward (§2.2, Figure 1) -----

    def forward(self, x, t, text):
        """x (B, C_in, T, h, w) latents (already times the VAE scaling factor), t (B,) steps,
        text (B, L, text_dim) -> v (B, C_out, T, h, w). With a temporal patch (1.5) an odd T is
        padded in front (pad_frames) and v keeps the last T frames."""
        B, _, T, h, w = x.shape
        L, p, pt = text.shape[1], self.cfg.patch, self.cfg.patch_t
        Tp = -(-T // pt)                                               # token frames
        if t.shape != (B,) or text.shape[0] != B or text.shape[2] != self.cfg.text_dim:
            raise ValueError(f"need t (B,) and text (B, L, {self.cfg.text_dim}) for B={B}; got t "
                             f"{tuple(t.shape)}, text {tuple(text.shape)}")
        if self.sp is not None:  # sequence parallel: the packed layout, one sample per row
            return torch.stack(self.forward_packed(list(x), t, text, range(B)))  # (B, C_out, ...)
        with self._amp(x.device):
            e = self._time_embed(t)                                    # (B, E)
            # §2.2: text tokens go before the video tokens; one sequence, one attention.
            seqx = torch.cat([self._text_embed(text), self._video_embed(x, L)], dim=1)  # (B, N, D)
            seq = Seq(L)
            if self.cfg.pos != "sincos":         # the 2B has no RoPE: positions are in the tokens
                rot = self._table("rope", L, Tp, h // p, w // p, x.device)     # (N, d/2)
                seq = Seq(L, None, rot[None, :, None])       # (1, N, 1, d/2): broadcast over B, H
            vid = self._blocks(seqx, e, seq, video_only=True)  # (B, n, D): text outputs unread
            # (B, 1, [shift, scale], D) -> out (B, n, pt*p*p*C_out)
            out = self._final(vid, self.mod_out(e).view(B, 1, 2, -1))
        out = rearrange(out.to(x.dtype), "b (t gh gw) (c pt ph pw) -> b c (t pt) (gh ph) (gw pw)",
                        t=Tp, gh=h // p, pt=pt, ph=p, pw=p)          # (B, C_out, Tp*pt, h, w)
        return out[:, :, -T:]                       # (B, C_out, T, h, w): padded frames dropped

    # ----- Frame Pack forward (§3.1) -----

    def forward_packed(self, latents, t, text, rows, max_tokens=None):
        """§3.1 Frame Pack (after NaViT's Patch'n'Pack): samples of different durations and
        resolutions, images (T = 1) included, share token rows. Each sample keeps its own timestep
        (per-token modulation), its own 3D positions and attends only to itself, so the result
        equals running every sample alone. (The released code instead pads short clips by repeating
        the last frame; here that is just the unpacked forward on padded latents.)
        latents: list of S (C_in, T_s, h_s, w_s); t (S,); text (S, L, text_dim); rows: the row id
        of every sample (list or LongTensor of S ids), as data.FramePackSampler packed them. The
        model makes no packing decision: a row's samples are laid out in list order; ids need not be
        contiguous. Rows are padded to the longest row, or to max_tokens when given (a fixed shape).
        (Mode "auto" on a CPU instead lays every sample out in one unpadded row: flat_layout.)
        -> list of S (C_out, T_s, h_s, w_s)."""
        S, L, p = len(latents), text.shape[1], self.cfg.patch
        rows = [int(r) for r in rows]                                # ids on the host
        if t.shape != (S,) or text.shape[0] != S or len(rows) != S:
            raise ValueError(f"need t ({S},), text ({S}, L, D) and {S} row ids for {S} latents; "
                             f"got t {tuple(t.shape)}, text {tuple(text.shape)}, {len(rows)} ids")
        pt = self.cfg.patch_t  # token frames: ceil(T / pt) (pad_frames)
        grids = [(-(-z.shape[1] // pt), z.shape[2] // p, z.shape[3] // p) for z in latents]
        sizes = [L + T * gh * gw for T, gh, gw in grids]              # tokens of each sample
        nv = [n - L for n in sizes]                                  # video tokens of each sample
        # the R rows (in id order), each the list of its samples
        groups = [[s for s in range(S) if rows[s] == r] for r in sorted(set(rows))]
        used = [sum(sizes[s] for s in g) for g in groups]
        R, M, dev = len(groups), max_tokens or max(used), text.device
        if max(used) > M:
            raise ValueError(f"a row holds {max(used)} tokens > max_tokens={max_tokens}")
        M = sp_row_length(self, M)  # SP: a multiple of the group size (more padding slots)
        # The samples of one latent shape are embedded (and un-patched) as one batch: the same
        # values in a few operations instead of a few per sample (speed).
        kinds = {}                                                   # latent shape -> samples
        for s, z in enumerate(latents):
            kinds.setdefault(tuple(z.shape), []).append(s)
        order = [s for ss in kinds.values() for s in ss]             # samples, shape after shape
        flat = self.packed_attention == "auto" and flat_layout(dev, self.sp, groups)
        if flat:  # speed: one row of every sample, shape after shape, no padding (flat_layout)
            groups, R, M = [order], 1, sum(sizes)
        # Index plan, built on the host from shapes only. The token table holds each sample's
        # [L text; n video] tokens in sample order. For every slot of every row: which table token
        # fills it (src; the RoPE table has the same layout), which sample it belongs to (seg, for
        # the mask) and which modulation row it uses (idx). Padding slots copy token 0 and have
        # segment -1: they see only each other, nobody sees them and their outputs are never read,
        # so their values do not matter.
        off = list(itertools.accumulate(sizes, initial=0))          # sample s: table rows off[s]..
        # The embeddings come out as [all text (S·L); video, shape after shape]; token table row i
        # is their row new[i].
        vstart = dict(zip(order, itertools.accumulate([nv[s] for s in order], initial=S * L)))
        new = [i for s in range(S) for i in itertools.chain(range(s * L, (s + 1) * L),
                                                               range(vstart[s], vstart[s] + nv[s]))]
        src, seg, idx, vdst, spans = [], [], [], [None] * S, []
        for r, g in enumerate(groups):
            for s in g:
                spans.append((r, len(src) - r * M, sizes[s]))        # (row, first slot, tokens)
                vdst[s] = range(len(src) + L, len(src) + sizes[s])   # slots of s's video tokens
                src += range(off[s], off[s + 1])
                seg += [s] * sizes[s]
                idx += [2 * s + 1] * L + [2 * s] * nv[s]             # text expert 2s+1, video 2s
            pad = (r + 1) * M - len(src)
            src, seg, idx = src + [0] * pad, seg + [-1] * pad, idx + [0] * pad
        idx_rows = [idx[r * M:(r + 1) * M] for r in range(R)]
        src, seg, idx = (torch.tensor(a, device=dev).view(R, M) for a in (src, seg, idx))
        with self._amp(dev):
            e = self._time_embed(t)                                    # (S, E)
            txt = self._text_embed(text)                               # (S, L, D)
            vid = [self._video_embed(torch.stack([latents[s] for s in ss]), L).flatten(0, 1)
                   for ss in kinds.values()]                         # per shape (k·n, D)
            # [all text; video by shape] (S·L + sum n, D), read through new: slot -> token table
            # row (src) -> embedding row
            x = torch.cat([txt.flatten(0, 1)] + vid).to(txt.dtype)[  # (S·L + sum n, D)
                torch.tensor(new, device=dev)[src]]                  # (R, M, D)
            # §3.1: each sample attends to itself only: pack_mask's rule, computed without an
            # (M, M) tensor unless the mode asks for it (speed section)
            # Rows of one sample each (e.g. one long clip per row at full scale) have the unpacked
            # layout [L text; n video (+ padding)]: modulation broadcast per row, no per-token
            # gather (3 (R, M, D) tensors per sub-layer)
            one = [g[0] for g in groups] if all(len(g) == 1 for g in groups) else None
            mask = packed_attention("segments" if flat else self.packed_attention, seg, spans)
            # modulation: per-token gathers (idx) for the dense mask and the flat row, per run of
            # tokens (pieces) for the other Segments and flex rows (memory: see piecewise_sub)
            piece = not (one or flat or isinstance(mask, torch.Tensor))
            seq = Seq(L, None if one else idx, mask=mask, pieces=runs(idx_rows) if piece else None)
            if self.cfg.pos != "sincos":
                # per-sample positions: every sample starts at (0, 0, 0), as if alone
                rot = torch.cat([self._table("rope", L, *g, dev) for g in grids])  # (sum N, d/2)
                seq = seq._replace(rot=rot[src][:, :, None])           # (R, M, 1, d/2)
            if self.sp is not None:  # sequence parallel: this rank keeps 1/G of every row's slots
                x, seq = sp_shard(self, x, seq, idx_rows)              # (R, M/G, D)
                one = None                                   # modulation per piece (seq.pieces)
            x = self._blocks(x, e if one is None else e[one], seq)  # (R, M, D); e per row if one
            # the video tokens' slots, shape after shape (samples in `order`)
            vdst = torch.tensor([i for s in order for i in vdst[s]], device=dev)  # (sum n,)
            if self.sp is not None:  # the final layer on this rank's slots, gathered: (R, M, P)
                out = sp_final(self, x, e, seq).flatten(0, 1)[vdst]    # (sum n, p*p*C_out)
            else:
                # final (shift, scale) of every video token: (S, 2, D) -> (sum n, 2, D), samples
                # in `order`
                m = self.mod_out(e).view(S, 2, -1)[torch.tensor(order, device=dev)]
                m = m.repeat_interleave(torch.tensor([nv[s] for s in order], device=dev), 0,
                                        output_size=sum(nv))          # shapes on the host
                out = self._final(x.flatten(0, 1)[vdst], m)              # (sum n, p*p*C_out)
            out = out.to(latents[0].dtype)
        res = [None] * S
        per_kind = out.split([len(ss) * nv[ss[0]] for ss in kinds.values()])
        for ss, o in zip(kinds.values(), per_kind):  # un-patch the samples of one shape together
            (T, gh, gw), Ts = grids[ss[0]], latents[ss[0]].shape[1]
            o = rearrange(o.view(len(ss), nv[ss[0]], -1),              # (k, n, pt*p*p*C_out)
                          "k (t gh gw) (c pt ph pw) -> k c (t pt) (gh ph) (gw pw)", t=T, gh=gh,
                          pt=pt, ph=p, pw=p)[:, :, -Ts:]             # (k, C_out, T_s, h_s, w_s)
            for s, u in zip(ss, o.unbind(0)):
                res[s] = u
        return res

    # ----- checkpoints -----

    def save(self, folder, state_dict=None):
        """folder/config.json FIRST, then folder/model.safetensors, each atomic (a temp file
        renamed): a folder that has weights always has their config. state_dict (e.g. gathered FSDP
        or EMA weights) replaces self.state_dict() when given. The one DiT folder writer."""
        from safetensors.torch import save_file

        from data import atomic_write   # lazily: dit.py stays importable without data.py
        os.makedirs(folder, exist_ok=True)
        cfg = json.dumps(asdict(self.cfg), indent=1)
        atomic_write(os.path.join(folder, "config.json"), lambda tmp: Path(tmp).write_text(cfg))
        sd = self.state_dict() if state_dict is None else state_dict
        sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
        atomic_write(os.path.join(folder, "model.safetensors"), lambda tmp: save_file(sd, tmp))

    @classmethod
    def load(cls, folder, device="cpu", dtype=None):
        """Our checkpoint back (what save wrote); dtype None keeps the stored dtype."""
        cfg = load_config(folder)
        return _load_checked(cfg, _read_safetensors(Path(folder)), folder, dtype).to(device)

    @classmethod
    def from_diffusers(cls, folder, device="cpu", dtype=torch.float32, **overrides):
        """Load a diffusers CogVideoXTransformer3DModel folder (or a pipeline folder with
        transformer/), single-file or sharded, fp32/fp16/bf16. overrides: DiTConfig fields, e.g.
        rope_interp=True to reproduce the diffusers pipeline's RoPE at non-native sizes."""
        folder, cfg = diffusers_folder_config(folder, **overrides)
        sd = _from_diffusers_keys(_read_safetensors(folder), cfg)
        return _load_checked(cfg, sd, folder, dtype).to(device)


# ----- image-to-video input (App. A) -----

def i2v_input(z, image):
    """App. A: the I2V DiT sees [noisy latent; image latent] along channels. z (B, C, T', h, w)
    noisy latent; image (B, C, 1, h, w) latent of the first frame (already times the scaling
    factor; noised by the caller in training) -> (B, 2C, T', h, w): the image latent in latent
    frame 0, zeros in the others. The one place this input is built (training and sampling)."""
    cond = F.pad(image, (0, 0, 0, 0, 0, z.shape[2] - 1))  # (B, C, T', h, w): zeros after frame 0
    return torch.cat([z, cond.to(z.dtype)], dim=1)       # (B, 2C, T', h, w)


# ----- released-weight loading -----

def _read_json(path):
    """A config file as a dict, or one line naming it when it is torn or no JSON object (a missing
    one: FileNotFoundError)."""
    from data import json_object  # lazily: dit.py stays importable without data.py
    return json_object(path)


def load_config(folder):
    """Our checkpoint folder's DiTConfig, from its config.json alone (no weights read)."""
    d = _read_json(Path(folder, "config.json"))
    if "_class_name" in d:
        raise ValueError(f"{folder} holds a diffusers {d['_class_name']}, not one of our "
                         "checkpoints: load it with ExpertDiT.from_diffusers (sample.py "
                         "--model-dir)")
    return _config(d, Path(folder, "config.json"))


def _config(d, path="config.json"):
    """A dict of DiTConfig fields (from the file `path`) -> DiTConfig, each value of its type."""
    from data import config_from  # lazily: dit.py stays importable without data.py
    d = {k: v for k, v in d.items() if k != "learned_trainable"}  # retired: the table always trains
    extra = sorted(set(d) - {f.name for f in fields(DiTConfig)})
    if extra:
        raise ValueError(f"unknown DiTConfig fields {extra}: a checkpoint of another version")
    return config_from(DiTConfig, d, path)


def diffusers_folder_config(folder, **overrides):
    """A diffusers transformer folder (or a pipeline folder holding transformer/) -> (that folder,
    its DiTConfig with `overrides`), reading config.json only."""
    folder = Path(folder)
    # a pipeline folder, even one whose transformer/ lost its config.json: the error names that
    # file (it named the pipeline folder's own config.json, which no release has)
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"
    dc = _read_json(folder / "config.json")
    if dc.get("_class_name") != "CogVideoXTransformer3DModel":  # e.g. the vae/ next to it
        raise ValueError(f"{folder}: config.json describes "
                         f"{dc.get('_class_name', 'no diffusers model')!r}, not "
                         "'CogVideoXTransformer3DModel'; pass the released model's folder or its "
                         "transformer/ (our own checkpoints load with ExpertDiT.load)")
    try:  # a value of the wrong type in the arithmetic below, a key missing
        cfg = _diffusers_config(dc, folder / "config.json")
    except (TypeError, KeyError) as e:
        raise ValueError(f"{folder / 'config.json'}: not a CogVideoXTransformer3DModel config "
                         f"({type(e).__name__}: {e}); copy or export it again") from None
    return folder, _config({**cfg, **overrides}, folder / "config.json")


def _diffusers_config(dc, path="config.json"):
    """diffusers config.json -> DiTConfig fields; refuses what this file does not implement.
    CogVideoX 1.5: patch_size_t -> patch_t, ofs_embed_dim -> ofs_dim. Its configs say patch_bias
    false, but diffusers' 1.5 patch Linear has a bias regardless (so do the released weights), so
    patch_bias only matters for the 1.0 Conv2d."""
    need = {"activation_fn": "gelu-approximate", "flip_sin_to_cos": True, "freq_shift": 0,
            "timestep_activation_fn": "silu", "norm_elementwise_affine": True,
            "attention_bias": True}
    if dc.get("patch_size_t") is None:
        need["patch_bias"] = True
    for k, v in need.items():
        if dc.get(k, v) != v:
            raise ValueError(f"diffusers config {k}={dc[k]!r} is not supported (need {v!r})")
    for k in ("use_rotary_positional_embeddings", "use_learned_positional_embeddings"):
        if dc.get(k) is not None and not isinstance(dc[k], bool):  # "false" was taken as true
            raise TypeError(f"{k} = {dc[k]!r} is not true or false")  # (named with the file)
    pos = ("learned" if dc.get("use_learned_positional_embeddings") else "rope") \
        if dc.get("use_rotary_positional_embeddings") else "sincos"
    g, C = dc.get, dc["in_channels"]
    # sample_frames counts pixel frames: latent frames = (frames - 1) / temporal compression + 1
    from data import temporal_ratio  # lazily: dit.py stays importable without data.py
    T = (g("sample_frames", 49) - 1) // temporal_ratio(dc, path) + 1
    return dict(in_channels=C, out_channels=g("out_channels") or C, patch=g("patch_size", 2),
                layers=dc["num_layers"], heads=dc["num_attention_heads"], pos=pos, base_frames=T,
                head_dim=dc["attention_head_dim"], time_dim=dc["time_embed_dim"],
                text_dim=dc["text_embed_dim"], text_len=g("max_text_seq_length", 226),
                base_height=g("sample_height", 60), base_width=g("sample_width", 90),
                spatial_scale=g("spatial_interpolation_scale", 1.875),
                temporal_scale=g("temporal_interpolation_scale", 1.0), norm_eps=g("norm_eps", 1e-5),
                patch_t=g("patch_size_t") or 1, ofs_dim=g("ofs_embed_dim") or 0)


def _read_safetensors(folder):
    """All tensors of a model folder: ours (model.safetensors) or a diffusers one (an index json
    when sharded, else one .safetensors file of any variant). dit.py's one safetensors reader;
    vae.py keeps its own so that each model file stands alone."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file as read

    def load_file(path):  # a truncated or corrupt file: one line naming it, not a traceback
        try:
            return read(path)
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e}); copy or export it "
                             "again") from None
    # a plain index before a variant's (fp16)
    index = sorted(folder.glob("*.safetensors.index*.json"), key=lambda f: (f.name.count("."), f))
    if index:
        from data import index_shards  # lazily: dit.py stays importable without data.py
        files = index_shards(index[0])
    else:
        files = sorted(f.name for f in folder.glob("*.safetensors"))
        known = {"model.safetensors", "diffusion_pytorch_model.safetensors"} & set(files)
        files = sorted(known) or files
        if len(files) != 1:
            raise ValueError(f"{folder}: expected one .safetensors file or an index json, found "
                             f"{files or 'none'}")
    return {k: v for f in files for k, v in load_file(folder / f).items()}


def _diffusers_names(cfg):
    """Our module name -> the diffusers module name, for every module that maps one to one (not
    the fused qkv, nor the patch embedding). One table for the weights and the LoRA files."""
    pairs = {"text_proj": "patch_embed.text_proj", "time_in.0": "time_embedding.linear_1",
             "time_in.2": "time_embedding.linear_2", "norm_final": "norm_final",
             "norm_out": "norm_out.norm", "mod_out": "norm_out.linear", "proj_out": "proj_out"}
    if cfg.ofs_dim:
        pairs.update({"ofs_in.0": "ofs_embedding.linear_1", "ofs_in.2": "ofs_embedding.linear_2"})
    for i in range(cfg.layers):
        pairs.update({f"blocks.{i}.{a}": f"transformer_blocks.{i}.{c}" for a, c in [
            ("norm1", "norm1.norm"), ("mod1", "norm1.linear"), ("q_norm", "attn1.norm_q"),
            ("k_norm", "attn1.norm_k"), ("proj", "attn1.to_out.0"), ("norm2", "norm2.norm"),
            ("mod2", "norm2.linear"), ("fc1", "ff.net.0.proj"), ("fc2", "ff.net.2")]})
    return pairs


def _from_diffusers_keys(sd, cfg):
    """Our names <- diffusers names. q, k, v are fused into one qkv; the patch Conv2d becomes a
    Linear (1.5's patch embedding already is one, on the same (c, pt, ph, pw) order)."""
    sd, out = dict(sd), {}
    take = lambda k: sd.pop(k) if k in sd else None
    pairs = _diffusers_names(cfg)
    for wb in ("weight", "bias"):
        w = take(f"patch_embed.proj.{wb}")  # (D, C, p, p) | (D, C*pt*p*p) -> (D, ...)
        out[f"patch.{wb}"] = w.reshape(cfg.dim, -1) if w is not None and wb == "weight" else w
        for i in range(cfg.layers):
            qkv = [take(f"transformer_blocks.{i}.attn1.to_{z}.{wb}") for z in "qkv"]
            out[f"blocks.{i}.qkv.{wb}"] = None if None in qkv else torch.cat(qkv)
        for ours, theirs in pairs.items():
            out[f"{ours}.{wb}"] = take(f"{theirs}.{wb}")
    if cfg.pos == "learned":
        out["pos"] = take("patch_embed.pos_embedding")
    missing = sorted(k for k, v in out.items() if v is None)
    if missing or sd:
        raise ValueError(f"diffusers weights do not match the config: missing {missing[:8]}, "
                         f"unexpected {sorted(sd)[:8]} (wrong folder?)")
    return out


def _load_checked(cfg, sd, where, dtype):
    """Build the model on the meta device (no memory, no random init of billions of weights), check
    the keys with one clear error naming missing / unexpected / mis-shaped ones, adopt the
    tensors."""
    with torch.device("meta"):
        model = ExpertDiT(cfg)
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or extra or bad:
        raise ValueError(f"{where}: checkpoint does not fit DiTConfig: missing {missing[:8]}, "
                         f"unexpected {extra[:8]}, shape mismatch {bad[:8]}")
    model.load_state_dict({k: v.to(dtype or v.dtype) for k, v in sd.items()}, assign=True)
    return model


# ----- T5 text encoder -----

def t5_folders(folder):
    """-> (tokenizer folder, encoder folder) of a T5 folder: a pipeline folder (a released model)
    keeps them in tokenizer/ and text_encoder/ beside its other models; a plain one has both, and
    a release's text_encoder/ passed alone takes the tokenizer/ beside it."""
    f = Path(folder)
    tok, enc = (f / n if (f / n).is_dir() else f for n in ("tokenizer", "text_encoder"))
    if tok == f and not has_tokenizer(f) and has_tokenizer(f.parent / "tokenizer"):
        tok = f.parent / "tokenizer"
    return tok, enc


def has_tokenizer(folder):
    return (folder / "spiece.model").is_file() or (folder / "tokenizer.json").is_file()


class TextEncoder:
    """Frozen T5 encoder from a local folder (no hub access). As released: pad every prompt to
    max_length tokens and run the encoder WITHOUT an attention mask (the padding tokens' outputs
    are part of the conditioning the DiT was trained with). The unconditional input in training is
    all zeros (§3)."""

    def __init__(self, folder, device="cpu", dtype=None, max_length=226):
        from transformers import T5EncoderModel, T5Tokenizer
        tok, enc = t5_folders(folder)
        # Offline only: a missing folder must not turn into a hub lookup of a repo id of that name.
        if not (enc / "config.json").is_file():
            raise FileNotFoundError(f"T5 text encoder folder {enc} not found (no config.json): "
                                    "pass a local T5 folder (a released model's, build_tiny_t5's)")
        if not has_tokenizer(tok):
            raise FileNotFoundError(f"T5 tokenizer not found in {tok} (no spiece.model / .json)")
        self.tok = T5Tokenizer.from_pretrained(str(tok), local_files_only=True)
        # dtype None: float32, whatever the files' precision (a released T5 is stored in half
        # precision) and the transformers version (5 loads the stored one, 4 float32): a CPU runs
        # float32 (bf16 matmuls are ~400x slower on AVX2); a GPU caller passes torch.bfloat16
        dtype = dtype or torch.float32
        self.model, info = T5EncoderModel.from_pretrained(str(enc), dtype=dtype,
                                                          local_files_only=True,
                                                          output_loading_info=True)
        # transformers only logs these (a missing weight keeps its random init): refuse them, as
        # our own loaders do. A whole T5 (e.g. t5-v1_1-xxl) is fine: its decoder and untied LM
        # head are the half an encoder leaves out.
        extra = [k for k in info["unexpected_keys"] if not k.startswith(("decoder.", "lm_head."))]
        bad = [("missing", info["missing_keys"]), ("unexpected", extra)]
        bad = [f"{n} {sorted(k)[:3]}" for n, k in bad if k]
        if bad:
            raise ValueError(f"{enc}: the T5 weights do not fit its config.json ({'; '.join(bad)})"
                             "; copy or export the text encoder again")
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device, self.max_length = torch.device(device), max_length
        self.dim = self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts):
        """list of B prompts -> (B, max_length, dim). A prompt longer than max_length tokens keeps
        its first max_length (as released), with a warning saying so."""
        for p, n in zip(prompts, map(len, self.tok(list(prompts)).input_ids)):
            if n > self.max_length:
                print(f"warning: a {len(p.split())}-word prompt is {n} tokens; the text encoder "
                      f"keeps its first {self.max_length}, the rest is dropped: {p[:50]!r}...",
                      file=sys.stderr)
        ids = self.tok(list(prompts), padding="max_length", max_length=self.max_length,  # (B, L)
                       truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        return self.model(ids.to(self.device))[0]                      # (B, L, dim)

    def zeros(self, n):
        """The unconditional embedding used in training (text dropped 10% of the time): zeros."""
        return torch.zeros(n, self.max_length, self.dim, device=self.device, dtype=self.model.dtype)


def build_tiny_t5(folder, texts, d_model=64, layers=2, heads=4, d_ff=128, vocab_size=256, seed=0):
    """Write a random tiny T5 encoder and a WORD-level SentencePiece tokenizer trained on texts to
    folder. Word level because a default unigram model on a few dozen short captions collapses to
    single characters, so different captions would truncate to the same tokens and the DiT could
    not tell them apart. extra_ids=0: no sentinel tokens. Built in folder.part and renamed into
    place whole: a kill part way (save_pretrained writes config.json before the weights) leaves no
    folder a later run (the demo's --resume) takes for a T5."""
    import io
    import shutil

    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    given, final = folder, Path(folder)
    folder = final.with_name(final.name + ".part")
    shutil.rmtree(folder, ignore_errors=True)  # an earlier build's remains
    os.makedirs(folder)
    buf = io.BytesIO()
    # T5's ids: pad 0, </s> 1, unk 2
    spm.SentencePieceTrainer.train(sentence_iterator=iter(list(texts)), model_writer=buf,
                                   model_type="word", vocab_size=vocab_size, hard_vocab_limit=False,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
                                   minloglevel=2)
    Path(folder, "spiece.model").write_bytes(buf.getvalue())
    Path(folder, "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 226}))
    # from_pretrained: T5Tokenizer(vocab_file=...) builds a broken tokenizer in transformers 5
    tok = T5Tokenizer.from_pretrained(folder)
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    # v1.1 style (gated GELU, untied), like the XXL
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=d_model // heads, d_ff=d_ff,
                   num_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
                   relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False,
                   tie_word_embeddings=False)
    T5EncoderModel(cfg).save_pretrained(folder)
    if final.exists():  # a rebuild replaces the old T5 whole
        shutil.rmtree(final)
    os.replace(folder, final)
    return given


# ----- LoRA: low-rank adapters on frozen weights (not in the paper) -----
# Most users fine-tune the released models with LoRA (Hu et al., 2021): every weight stays frozen
# and each adapted Linear learns a low-rank update, y = W x + (alpha / r) · B (A x) with A (r, in),
# B (out, r), r small. Initialised as PEFT does (A Kaiming-uniform with a = √5, B zeros, no
# dropout), so before the first step the model IS the base.
# The file is what diffusers' CogVideoX pipelines load with load_lora_weights (PEFT's layout, as
# CogVideoXPipeline.save_lora_weights writes it): pytorch_lora_weights.safetensors holding, per
# adapted module, "transformer.<diffusers module>.lora_A.weight" (r, in) and ".lora_B.weight"
# (out, r), e.g. transformer.transformer_blocks.3.attn1.to_q.lora_A.weight. The rank is in the
# shapes; alpha travels in the header's "lora_adapter_metadata" (the LoraConfig as JSON, its keys
# prefixed "transformer."). A file without it means alpha = r (scale 1): diffusers reads it so,
# and its CogVideoX training script then asks for set_adapters(alpha / r) by hand.
# Our fused qkv Linear carries three adapters, one per projection: q, k and v map to to_q, to_k and
# to_v exactly as in that layout.

LORA_TARGETS = {"attn": ("qkv", "proj"), "attn+mlp": ("qkv", "proj", "fc1", "fc2")}
LORA_FILE = "pytorch_lora_weights.safetensors"   # diffusers' LORA_WEIGHT_NAME_SAFE


class LoRALinear(nn.Linear):
    """An nn.Linear(in, out) plus `parts` low-rank adapters, one per equal slice of the output:
    y = W x + b + scale · [B_1 A_1 x; ...; B_P A_P x], scale = alpha / r. parts = 3 for the fused
    qkv (q, k, v each their own adapter). `weight` and `bias` are the wrapped Linear's own
    Parameters (their state-dict names stay); lora_A (P·r, in) stacks the A_p, lora_B (out, r) the
    B_p along the output (for P = 1, PEFT's two weights exactly)."""

    def __init__(self, base, rank, alpha, parts=1, dtype=None):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.r, self.parts, self.scale = rank, parts, alpha / rank
        kw = dict(device=base.weight.device, dtype=dtype or base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(parts * rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        if not self.lora_A.is_meta:  # on the meta device: train.py fills it (ExpertDiT.initial)
            with torch.no_grad():
                self.lora_A.copy_(self.initial("lora_A"))

    def initial(self, leaf, generator=None):
        """PEFT's starting value of "lora_A" or "lora_B", full size, on the CPU: each A_p (r, in)
        Kaiming-uniform with a = √5 (fan_in = in), B zeros."""
        t = torch.zeros(getattr(self, leaf).shape)
        if leaf == "lora_A":
            for a in t.chunk(self.parts):
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        return t

    def forward(self, x):
        """x (..., in) -> (..., out)."""
        y = F.linear(x, self.weight, self.bias)                       # (..., out)
        # the adapters stay float32 over a bf16 base (add_lora): without autocast (which casts
        # by itself, and no extra copy of x is kept) cast in, and the update back out
        if x.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)                              # (..., in)
        u = F.linear(x, self.lora_A)                                 # (..., P·r)
        if self.parts == 1:
            d = F.linear(u, self.lora_B)                             # (..., out)
        else:  # part p: its r columns of u through its out/P rows of B
            d = torch.cat([F.linear(up, bp) for up, bp in               # (..., out)
                           zip(u.chunk(self.parts, -1), self.lora_B.chunk(self.parts))], -1)
        return torch.add(y, d.to(y.dtype), alpha=self.scale)

    def delta(self):
        """scale · [B_1 A_1; ...; B_P A_P] (out, in) in float32: what merging adds to W."""
        A, B = self.lora_A.float().chunk(self.parts), self.lora_B.float().chunk(self.parts)
        return self.scale * torch.cat([b @ a for a, b in zip(A, B)])  # (out, in)


def lora_modules(model):
    """{our module name: LoRALinear} of a model, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _swap(model, name, new):
    parent, _, last = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, last, new)


def add_lora(model, rank, alpha=None, targets="attn", dtype=torch.float32):
    """Freeze every weight of `model` and give each block's `targets` Linears (LORA_TARGETS;
    "attn" = q, k, v and the output projection, as diffusers' CogVideoX LoRA script) rank-`rank`
    adapters in `dtype` (fp32: they are what trains, even over a bf16 base). alpha None = rank
    (scale 1). -> the adapters' parameters, the only trainable ones."""
    if rank < 1 or targets not in LORA_TARGETS:
        raise ValueError(f"LoRA rank {rank}, targets {targets!r}: need rank >= 1 and targets in "
                         f"{list(LORA_TARGETS)}")
    model.requires_grad_(False)
    for blk in model.blocks:
        for name in LORA_TARGETS[targets]:
            parts = 3 if name == "qkv" else 1
            setattr(blk, name, LoRALinear(getattr(blk, name), rank, alpha or rank, parts, dtype))
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its weight (W + scale · B A, summed in fp32, stored in W's dtype)
    and put a plain Linear back: the same function, no adapter matmuls per step. -> model."""
    for name, m in lora_modules(model).items():
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        w = (m.weight.float() + m.delta()).to(m.weight.dtype)
        lin.weight, lin.bias = nn.Parameter(w, requires_grad=m.weight.requires_grad), m.bias
        _swap(model, name, lin)
    return model


def _lora_names(cfg):
    """Each adaptable module of ours (every Linear, and the patch embedding) -> its diffusers
    module names, one per part: the fused qkv -> [to_q, to_k, to_v]."""
    names = {k: [v] for k, v in _diffusers_names(cfg).items() if "norm" not in k.split(".")[-1]}
    names.update({f"blocks.{i}.qkv": [f"transformer_blocks.{i}.attn1.to_{z}" for z in "qkv"]
                  for i in range(cfg.layers)})
    names["patch"] = ["patch_embed.proj"]     # a Conv2d(k = p, stride = p) in the 1.0 release
    return names


def lora_state(model, state_dict=None):
    """The model's adapters in the diffusers layout -> (tensors, LoraConfig fields). state_dict:
    the adapters under our names (e.g. gathered from FSDP, or the EMA's); default: the model's."""
    from collections import Counter
    sd = model.state_dict() if state_dict is None else state_dict
    names, out, rank, alpha, p = _lora_names(model.cfg), {}, {}, {}, model.cfg.patch
    for name, m in lora_modules(model).items():
        A = sd[f"{name}.lora_A"].detach().cpu().chunk(m.parts)       # P x (r, in)
        B = sd[f"{name}.lora_B"].detach().cpu().chunk(m.parts)       # P x (out/P, r)
        for theirs, a, b in zip(names[name], A, B):
            # the 1.0 release's Conv2d shapes: A (r, C, p, p), B (D, r, 1, 1); 1.5's is a Linear
            if name == "patch" and model.cfg.patch_t == 1:
                a, b = a.reshape(m.r, -1, p, p), b[:, :, None, None]
            out[f"transformer.{theirs}.lora_A.weight"] = a.contiguous()
            out[f"transformer.{theirs}.lora_B.weight"] = b.contiguous()
            rank[theirs], alpha[theirs] = m.r, m.scale * m.r
    if not rank:
        raise ValueError("the model has no LoRA adapters to export (add_lora / load_lora)")
    r0, a0 = (Counter(d.values()).most_common(1)[0][0] for d in (rank, alpha))
    # PEFT's rule for modules that differ from the common rank / alpha: "^name" patterns
    cfg = {"r": r0, "lora_alpha": a0, "target_modules": sorted(rank), "lora_dropout": 0.0,
           "bias": "none", "use_rslora": False, "use_dora": False, "lora_bias": False,
           "init_lora_weights": True,
           "rank_pattern": {f"^{k}": v for k, v in rank.items() if v != r0},
           "alpha_pattern": {f"^{k}": v for k, v in alpha.items() if v != a0}}
    return out, cfg


def save_lora(model, path, state_dict=None):
    """Write the adapters as `path` (a .safetensors file, or a folder that gets LORA_FILE),
    atomically, in the layout CogVideoXPipeline.load_lora_weights reads (see above). -> the file's
    path."""
    from safetensors.torch import save_file

    from data import atomic_write   # lazily: dit.py stays importable without data.py
    path = Path(path) if str(path).endswith(".safetensors") else Path(path) / LORA_FILE
    tensors, cfg = lora_state(model, state_dict)
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(
        {f"transformer.{k}": v for k, v in cfg.items()}, indent=2, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(str(path), lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def read_lora(path):
    """A LoRA file of ours, of diffusers (save_lora_weights) or of PEFT (save_pretrained:
    adapter_model.safetensors + adapter_config.json), or a folder holding one -> ({diffusers module:
    (A, B)}, its LoraConfig fields, {} when the file carries none)."""
    from safetensors import SafetensorError, safe_open
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in (LORA_FILE, "adapter_model.safetensors") if (p / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{p}: no {LORA_FILE} or adapter_model.safetensors in it")
        p = found[0]
    try:
        with safe_open(str(p), "pt") as f:
            header, sd = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{p}: not a readable safetensors file ({e})") from None
    cfg, src = {}, p
    if "lora_adapter_metadata" in header:   # diffusers: keys prefixed by the component
        try:
            meta = json.loads(header["lora_adapter_metadata"])
        except json.JSONDecodeError as e:
            meta = f"torn JSON ({e})"
        if not isinstance(meta, dict):
            raise ValueError(f"{p}: its header's lora_adapter_metadata is no LoraConfig object "
                             f"({str(meta)[:60]}); export the file again")
        # a bare LoraConfig has no dotted keys; else the transformer's part (none: alpha = r)
        cfg = {k[12:]: v for k, v in meta.items() if k.startswith("transformer.")} \
            if any("." in k for k in meta) else meta
    elif (p.parent / "adapter_config.json").is_file():  # PEFT's save_pretrained
        src = p.parent / "adapter_config.json"
        cfg = _read_json(src)
    # what _lora_scale computes with, each of its type: a hand-edited value was a TypeError
    # traceback after the base model had loaded (or a string use_rslora silently taken as true)
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    pats = cfg.get("alpha_pattern") or {}
    for k, ok, want in (
            ("lora_alpha", num(cfg.get("lora_alpha", 8)), "a number"),
            ("alpha_pattern", isinstance(pats, dict) and all(map(num, pats.values())),
             "a {module: number} object"),
            *((b, isinstance(cfg.get(b, False), (bool, type(None))), "true or false")
              for b in ("use_rslora", "use_dora", "lora_bias"))):
        if not ok:
            raise ValueError(f"{src}: LoraConfig {k} = {cfg[k]!r} is not {want}; fix it or export "
                             "the file again")
    if cfg.get("use_dora") or cfg.get("lora_bias"):
        raise ValueError(f"{p}: a DoRA / LoRA-bias adapter; only plain LoRA is supported")
    text = [k for k in sd if k.startswith("text_encoder")]
    if text:  # diffusers' CogVideoX pipelines drop these: the transformer's alone is not the result
        raise ValueError(f"{p}: {len(text)} tensors adapt the text encoder (e.g. {text[0]}); "
                         "only transformer adapters are supported: save its transformer.* alone")
    pairs = {}
    for k, v in sd.items():
        name = k.removeprefix("transformer.").removeprefix("base_model.model.")
        hit = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if hit is None:
            raise ValueError(f"{p}: {k!r} is not a PEFT LoRA weight (<module>.lora_A.weight / "
                             f".lora_B.weight of the transformer)")
        pairs.setdefault(hit[1], {})[hit[2]] = v
    half = sorted(n for n, ab in pairs.items() if len(ab) != 2)
    if half or not pairs:
        what = f"lora_A or lora_B missing for {half[:4]}" if half else "no LoRA weights in it"
        raise ValueError(f"{p}: {what}")
    return {n: (ab["A"], ab["B"]) for n, ab in pairs.items()}, cfg


def _lora_scale(cfg, name, r):
    """PEFT's scale of module `name` with rank r: alpha / r (alpha / √r with use_rslora). alpha:
    the first alpha_pattern that matches "(.*\\.)?(pattern)$" (PEFT's rule), else lora_alpha
    (LoraConfig's default 8); a file without a config means alpha = r (diffusers' reading)."""
    if not cfg:
        return 1.0
    alpha = cfg.get("lora_alpha", 8)
    for pat, a in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pat})$", name):
            alpha = a
            break
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


@torch.no_grad()
def load_lora(model, path, scale=1.0):
    """Adapters from a LoRA file (read_lora) onto `model`'s modules, times `scale` (diffusers'
    set_adapters weight). The fused qkv takes to_q, to_k, to_v as its three parts (zeros for a
    projection the file does not adapt); parts of other ranks are zero-padded to the largest and
    their scale folded into B. -> the number of diffusers modules adapted."""
    pairs, cfg = read_lora(path)
    names = _lora_names(model.cfg)
    ours = {t: (n, z) for n, ts in names.items() for z, t in enumerate(ts)}
    unknown = sorted(set(pairs) - set(ours))
    if unknown:
        raise ValueError(f"{path}: adapters on {unknown[:3]}, not modules of this "
                         f"{model.cfg.layers}-layer CogVideoX transformer (another model's LoRA?)")
    groups = {}
    for t, (A, B) in pairs.items():
        n, z = ours[t]
        # a Conv2d's (r, C, p, p), (D, r, 1, 1) -> (r, C·p·p), (D, r); Linears' stay
        groups.setdefault(n, {})[z] = (t, A.flatten(1), B.flatten(1))
    for n, parts in groups.items():
        base, P = model.get_submodule(n), len(names[n])
        if isinstance(base, LoRALinear):
            raise ValueError(f"{n} already has an adapter: merge it first (merge_lora)")
        r, o = max(A.shape[0] for _, A, _ in parts.values()), base.out_features // P
        scales = {z: _lora_scale(cfg, t, A.shape[0]) for z, (t, A, _) in parts.items()}
        # the module's scale, the parts' largest (0 only if every part's is: then 1, B = 0); the
        # other parts fold theirs in B (to_q's own divided the rest by 0 with alpha 0 on to_q)
        s = max(scales.values(), key=abs) or 1.0
        m = LoRALinear(base, r, s * r, P)
        m.lora_A.zero_()
        for z, (t, A, B) in parts.items():
            rz = A.shape[0]
            if A.shape[1] != base.in_features or B.shape != (o, rz):
                raise ValueError(f"{path}: {t} has A {tuple(A.shape)}, B {tuple(B.shape)}; this "
                                 f"model needs ({rz}, {base.in_features}), ({o}, {rz})")
            m.lora_A[z * r:z * r + rz] = A                           # (rz, in) of part z
            m.lora_B[z * o:(z + 1) * o, :rz] = B * (scales[z] / s)   # (o, rz) of part z
        m.scale = s * scale
        _swap(model, n, m)
    return len(pairs)


# ----- sequence parallel: one sample's tokens over a group of ranks (not in the paper) -----
# DeepSpeed-Ulysses for the DiT, the transformer's counterpart of the VAE's context parallel
# (§2.1): an 81x768x1360 clip is 85,906 tokens, and that one sample's activations are spread over a
# group of G ranks. Each rank of the group holds 1/G of the slots of every row, text AND video
# together: the L text tokens are the first slots of their sample's span, like any other token
# (handling them as a separate stream is what goes wrong in xDiT #295). Rows are padded to a
# multiple of G with Frame Pack's padding slots (sample -1: they attend only to each other, nobody
# attends to them, their outputs are never read), so no token count has to divide by G (xDiT #358,
# #471).
# Everything per token runs on the rank's own slots: LayerNorms, QK-norm, RoPE at each token's own
# 3D position, the modulation of its (sample, expert), the MLP and the final layer. Attention needs
# every slot: one all-to-all turns q, k, v (R, M/G, H, d) into (R, M, H/G, d) -- the whole row for
# H/G of the heads --, the unsharded model's attention runs there unchanged (with Frame Pack's
# per-sample rule built for the whole row: dense mask, Segments or flex), and a second all-to-all
# turns (R, M, H/G, d) back into (R, M/G, H, d). The final layer's output (p*p*C_out per slot,
# small) is gathered, so every rank of the group returns the same whole output. The gather's
# backward is its adjoint (a reduce-scatter sum): each rank's gradients, of the parameters and of
# the inputs, are G times its slots' share, and their MEAN over the group is one process's gradient
# -- the mean DDP and FSDP take over ranks anyway (train.py then scales by the data-parallel world).
# Cost per block, forward: the two all-to-alls move 4·M·D values per row (q, k, v out, the output
# back); each rank sends and receives (G-1)/G of its 4·M·D/G. Backward moves the same again.

class SPGroup(NamedTuple):
    """ExpertDiT.sp: the sequence-parallel group this rank belongs to (None: no SP)."""
    group: object   # the torch.distributed process group of the G ranks that share each row
    size: int       # G
    rank: int       # this rank's place g: it holds slots [g·M/G, (g+1)·M/G) of every row


def sp_group(group):
    """A process group -> the SPGroup of this rank in it."""
    return SPGroup(group, dist.get_world_size(group), dist.get_rank(group))


def sp_row_length(model, M):
    """Row length M -> M rounded up to a multiple of the group size (the added slots are padding).
    Also the one check of the split: every rank takes H/G whole heads."""
    sp = model.sp
    if sp is None:
        return M
    H = model.cfg.heads
    if H % sp.size:
        divisors = [g for g in range(1, H + 1) if H % g == 0]
        raise ValueError(f"sequence parallel over {sp.size} ranks: the {H} attention heads do not "
                         f"divide by {sp.size}; use a group size in {divisors}")
    return -(-M // sp.size) * sp.size


def _all_to_all(x, sp, to_heads):
    """to_heads: x (P, M/G, H, d) this rank's slots, every head -> (P, M, H/G, d) every slot,
    this rank's H/G heads; else the inverse. P: the leading dims (rows, and q/k/v)."""
    G = sp.size
    if to_heads:
        P, m, H, d = x.shape
        # head group g goes to rank g: (G, P, m, H/G, d)
        send = x.reshape(P, m, G, H // G, d).permute(2, 0, 1, 3, 4).contiguous()
    else:
        P, M, h, d = x.shape
        send = x.reshape(P, G, M // G, h, d).transpose(0, 1).contiguous()  # (G, P, M/G, H/G, d)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=sp.group)  # block g now holds what rank g sent
    if to_heads:  # block g: rank g's slots, our heads
        return recv.transpose(0, 1).reshape(P, G * m, H // G, d)       # (P, M, H/G, d)
    return recv.permute(1, 2, 0, 3, 4).reshape(P, M // G, G * h, d)   # (P, M/G, H, d)


class _AllToAll(torch.autograd.Function):
    """_all_to_all with autograd: the backward of one direction is the other direction."""

    @staticmethod
    def forward(ctx, x, sp, to_heads):
        ctx.sp, ctx.to_heads = sp, to_heads
        return _all_to_all(x, sp, to_heads)

    @staticmethod
    def backward(ctx, g):
        return _all_to_all(g, ctx.sp, not ctx.to_heads), None, None


class _Gather(torch.autograd.Function):
    """(R, M/G, P) this rank's slots -> (R, M, P) every slot, the same on every rank of the group.
    Backward, its adjoint: the group's gradients summed, each rank keeping its own slots'."""

    @staticmethod
    def forward(ctx, x, sp):
        ctx.sp = sp
        R, m, P = x.shape
        out = x.new_empty(sp.size * R, m, P)
        dist.all_gather_single(out, x.contiguous(), group=sp.group)  # (G·R, M/G, P): rank by rank
        return out.view(sp.size, R, m, P).transpose(0, 1).reshape(R, sp.size * m, P)  # (R, M, P)

    @staticmethod
    def backward(ctx, g):
        sp, (R, M, P) = ctx.sp, g.shape
        send = g.reshape(R, sp.size, M // sp.size, P).transpose(0, 1)  # (G, R, M/G, P)
        send = send.reshape(sp.size * R, M // sp.size, P)                # block g for rank g
        out = g.new_empty(R, M // sp.size, P)
        dist.reduce_scatter_single(out, send, group=sp.group)        # (R, M/G, P) summed
        return out, None


def sp_shard(model, x, seq, idx_rows):
    """forward_packed's rows -> this rank's slots. x (R, M, D) every slot of every row (M a
    multiple of G); seq: the layout of the whole rows; idx_rows: each slot's modulation row
    2s + (0 video | 1 text) -> (x (R, M/G, D), seq of this rank's slots). The attention plan
    (seq.mask) stays the whole rows': it runs after the all-to-all."""
    sp = model.sp
    m = x.shape[1] // sp.size
    a = sp.rank * m                                                   # our slots [a, a + m)
    local = [row[a:a + m] for row in idx_rows]
    seq = seq._replace(idx=torch.tensor(local, device=x.device), pieces=runs(local), sp=sp,
                       rot=None if seq.rot is None else seq.rot[:, a:a + m])  # our positions
    return x[:, a:a + m].clone(), seq  # a copy: the whole rows are freed


def sp_attention(q, k, v, seq):
    """Block.attn's attention under SP: q, k, v (R, M/G, H, d) -> (R, M/G, H, d). One all-to-all
    carries all three; the attention (and Frame Pack's mask) sees whole rows."""
    qkv = _AllToAll.apply(torch.cat([q, k, v]), seq.sp, True)       # (3R, M, H/G, d)
    o = attention(*qkv.chunk(3), seq.mask)                            # (R, M, H/G, d)
    return _AllToAll.apply(o, seq.sp, False)                          # (R, M/G, H, d)


def sp_final(model, x, e, seq):
    """The final AdaLN and projection on this rank's slots, piece by piece with each piece's
    sample's (shift, scale), gathered over the group. x (R, M/G, D), e (S, E) -> (R, M, P), P =
    p*p*C_out. Text and padding slots get a value too (unread)."""
    mm = model.mod_out(e).view(len(e), 2, -1)                         # (S, [shift, scale], D)
    out = torch.stack([torch.cat([model._final(x[r, a:b], mm[j // 2]) for a, b, j in pieces])
                       for r, pieces in enumerate(seq.pieces)])       # (R, M/G, P)
    return _Gather.apply(out, seq.sp)                                 # (R, M, P)


# ----- CLI -----

def main(argv=None):
    ap = argparse.ArgumentParser(description="CogVideoX expert transformer: size, a timed step.")
    ap.add_argument("--preset", default="tiny", choices=list(DIT_PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, help="samples in the timed step (default: 2)")
    ap.add_argument("--bf16", action="store_true", help="autocast the forward to bfloat16")
    ap.add_argument("--checkpointing", action="store_true", help="recompute blocks in backward")
    a = ap.parse_args(argv)
    if a.batch is not None and a.batch < 1:
        ap.error(f"--batch must be >= 1, got {a.batch}")
    import data  # the CLIs' one device check; imported here so dit.py stays importable alone
    try:
        # the device's type, not its string: "cpu:0" is the CPU too (it built a full 5B there)
        cpu = data.check_device(a.device).type == "cpu"
    except ValueError as e:
        ap.error(str(e))
    meta = cpu and a.preset not in ("tiny", "shapes")
    step = [f for f, v in (("--batch", a.batch is not None), ("--bf16", a.bf16),
                           ("--checkpointing", a.checkpointing)) if v]
    if meta and step:
        # a full preset on the CPU only counts parameters: the step's options were ignored
        ap.error(f"{a.preset} on the CPU counts parameters and times no step: drop "
                 f"{', '.join(step)} (or pass --device cuda)")
    a.batch = a.batch or 2
    cfg, count = DIT_PRESETS[a.preset], lambda m: f"{sum(p.numel() for p in m.parameters()):,}"
    if meta:  # the full-size ones on the CPU: counted on the meta device
        with torch.device("meta"):
            print(f"{a.preset}: {count(ExpertDiT(cfg))} parameters (meta device: none allocated)")
        return
    m = ExpertDiT(cfg).to(a.device)
    m.checkpointing, m.autocast = a.checkpointing, torch.bfloat16 if a.bf16 else None
    print(f"{a.preset}: {count(m)} parameters")
    shape = (a.batch, cfg.in_channels, cfg.base_frames, cfg.base_height, cfg.base_width)
    x, t = torch.randn(shape, device=a.device), torch.randint(0, 1000, (a.batch,), device=a.device)
    text = torch.randn(a.batch, cfg.text_len, cfg.text_dim, device=a.device)
    for i in range(3):
        t0 = time.perf_counter()
        m(x, t, text).square().mean().backward()
        print(f"forward+backward {1000 * (time.perf_counter() - t0):.1f} ms (tokens per sample "
              f"{num_tokens(cfg, *x.shape[2:])})")


# ----- speed (not in the paper) -----

def video_rows_block(blk, x, e, seq):
    """The last block of an unpacked forward: nobody reads the text rows of its output, so their
    queries, attention outputs, projection and MLP are skipped. (B, N, D) -> (B, n, D), the same
    values as blk(x, e, seq)[:, L:]."""
    L = seq.text_len
    x = blk.sub(x, e, seq, blk.norm1, blk.mod1, lambda h, s: blk.attn(h, s, q_from=L), q_from=L)
    return blk.sub(x, e, seq._replace(text_len=0), blk.norm2, blk.mod2, blk.mlp)  # (B, n, D)


# Frame Pack attention (§3.1) without an (M, M) tensor. pack_mask is the rule; Segments and
# FlexPlan compute the same values with memory linear in the row length M.

PACKED_ATTENTION = ("auto", "dense", "segments", "flex")
# auto on CPU, where forward_packed keeps the sampler's rows (sequence parallel, the simulator; see
# flat_layout): rows of several samples up to this many tokens use the dense mask. Measured (tiny
# DiT fwd+bwd, 2 threads, python tests/bench.py --only attn): segments / dense = 3.2 on 12 rows of
# 96 tokens, 3.0 at 168, 2.1 at 256 (many short runs of per-piece modulation), 1.1 at 512 and
# 0.75 at 1024 (2 rows of 4 samples). The bound stays at 256 where the mask is small (M² bools a
# row); longer rows and every GPU run use Segments.
DENSE_MAX_TOKENS = 256


FLAT = True  # the CPU layout below; train.py's step simulator (a GPU run) turns it off


def flat_layout(device, sp, groups):
    """Should forward_packed (mode "auto") lay every sample out in ONE row, shape after shape,
    with no padding, instead of in the sampler's rows (groups: each row's samples)? Speed only,
    the same values (each sample attends to itself in any layout): on a CPU, when some row holds
    several samples. Segments then attends each shape's samples as one batch of views: sum n²
    instead of the dense mask's M² per row, no padding slots; the modulation is gathered per
    token (three (1, ΣN, D) tensors a sub-layer kept for backward, which the pieces of long rows
    avoid: fine at a CPU's sizes). Not under sequence parallelism (each rank holds its slice of
    every row) nor in the step simulator, which runs a GPU's step.
    Measured (tiny DiT fwd+bwd, 2 threads, python tests/bench.py --only attn): one row / dense
    mask in the sampler's rows = 0.93, 0.90, 0.77 on 12 rows of 96, 168, 256 tokens (the demo's
    two stages, and 32 px clips), 0.76 and 0.54 on 2 rows of 512, 1024."""
    return FLAT and device.type == "cpu" and sp is None and any(len(g) > 1 for g in groups)


def packed_attention(mode, seg, spans):
    """-> Seq.mask for Frame Pack rows. seg (R, M) sample id per slot (-1: padding); spans: the
    (row, first slot, tokens) of every sample. mode:
      dense     pack_mask's (R, 1, M, M) bool mask: the reference (CPU tests, small rows)
      segments  each sample's span attends on its own (Segments): exact, memory linear in M,
                no compile, flash-eligible on GPU
      flex      FlexAttention with a BlockMask (FlexPlan): compiled once per row shape (R, M), so
                pass max_tokens to forward_packed to keep M fixed
      auto      segments on GPU; on CPU dense for short rows of several samples
                (DENSE_MAX_TOKENS), segments otherwise. forward_packed on a CPU first lays
                the samples out in one row, shape after shape (flat_layout), which takes
                segments; the CPU rows left here are sequence parallel's and the simulator's
    In every mode, rows that each hold one sample and no padding get plain SDPA without a mask."""
    if mode not in PACKED_ATTENTION:
        raise ValueError(f"packed attention {mode!r}: use one of {', '.join(PACKED_ATTENTION)}")
    R, M = seg.shape
    if all(n == M for _, _, n in spans):          # one sample fills each row: no mask at all
        return None
    if mode == "auto":
        short = seg.device.type == "cpu" and len(spans) > R and M <= DENSE_MAX_TOKENS
        mode = "dense" if short else "segments"
    if mode == "dense":
        return pack_mask(seg)                                         # (R, 1, M, M)
    if mode == "flex":
        return FlexPlan(seg)
    return Segments(spans, R, M, seg.device)


class Segments:
    """Varlen attention by segments: each sample's contiguous [text; video] span of its row runs
    SDPA alone, on views of q, k, v (no copies), with no mask, so the cost is sum n_i² instead of
    M² per row and memory stays linear in M. Adjacent samples of one length (e.g. one latent
    shape) run as one batch: the same views reshaped to (k, n, H, d), one call instead of k.
    Padding slots get 0 (nobody reads them)."""

    def __init__(self, spans, R, M, device):
        # per row its runs of adjacent equal-length samples: [first slot, samples k, tokens n]
        self.rows = [[] for _ in range(R)]
        for r, a, n in spans:
            run = self.rows[r][-1] if self.rows[r] else None
            if run and run[2] == n and run[0] + run[1] * n == a:
                run[1] += 1
            else:
                self.rows[r].append([a, 1, n])
        # each row cut into pieces [gap, run, gap, run, ..., tail]: slots no sample holds are gaps
        self.cuts = []
        for runs in self.rows:
            cut, at = [], 0
            for a, k, n in runs:
                cut, at = cut + [a - at, k * n], a + k * n
            self.cuts.append(cut + [M - at])

    def __call__(self, q, k, v):
        """q, k, v (R, M, H, d) -> (R, M, H, d)."""
        H, d = q.shape[2:]
        out = []
        for r, zs in enumerate(zip(q.unbind(0), k.unbind(0), v.unbind(0))):
            # split (not slicing): its backward is one cat, a slice's a zero (M, H, d) per piece
            qs, ks, vs = (z.split(self.cuts[r]) for z in zs)          # each piece (m, H, d)
            parts = [q.new_zeros(self.cuts[r][0], H, d)]
            for i, (_, kn, n) in enumerate(self.rows[r]):
                qkv = (z[2 * i + 1].view(kn, n, H, d).transpose(1, 2) for z in (qs, ks, vs))
                o = F.scaled_dot_product_attention(*qkv)                # (k, H, n, d)
                parts += [o.transpose(1, 2).reshape(kn * n, H, d),      # (k·n, H, d)
                          q.new_zeros(self.cuts[r][2 * i + 2], H, d)]   # padding: 0
            out.append(torch.cat(parts))                              # (M, H, d)
        return torch.stack(out) if len(out) > 1 else out[0][None]     # (R, M, H, d)


class FlexPlan:
    """FlexAttention with a BlockMask built from per-block segment ranges, so nothing M x M is
    made (create_block_mask would evaluate the rule on all M² pairs): (R, M/128, M/128) booleans
    say which 128 x 128 tiles touch one sample (full) or two (partial: the rule is applied)."""

    def __init__(self, seg, block=128):
        from torch.nn.attention.flex_attention import BlockMask
        R, M = seg.shape
        nb = -(-M // block)
        # padding (-1, at the end of its row) gets the next-to-largest id and the slots past M of
        # the last tile the largest (never a full tile, as create_block_mask has it): ids never
        # decrease along a row
        top = torch.iinfo(seg.dtype).max
        seg = seg.masked_fill(seg < 0, top - 1)                        # (R, M)
        tiles = torch.cat([seg, seg.new_full((R, nb * block - M), top)], 1).view(R, nb, block)
        lo, hi = tiles.amin(-1), tiles.amax(-1)                       # each (R, nb)
        # tiles i, j share a sample iff their id ranges overlap (each sample's slots are one run)
        touch = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])
        one = lo == hi
        full = one[:, :, None] & one[:, None, :] & (lo[:, :, None] == lo[:, None, :])  # (R, nb, nb)

        def kv(b):                              # (R, 1, nb) counts, (R, 1, nb, nb) indices first
            order = torch.argsort((~b).to(torch.int8), dim=-1, stable=True)
            return b.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

        same = lambda b, h, q, k: seg[b, q] == seg[b, k]
        self.mask = BlockMask.from_kv_blocks(*kv(touch & ~full), *kv(full), BLOCK_SIZE=block,
                                             mask_mod=same, seq_lengths=(M, M))

    def __call__(self, q, k, v):
        """q, k, v (R, M, H, d) -> (R, M, H, d)."""
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))              # (R, H, M, d)
        return compiled_flex()(q, k, v, block_mask=self.mask).transpose(1, 2)
def runs(idx_rows):
    """Per row of slot -> modulation row ids (lists), its runs: [(first slot, end, row)]."""
    out = []
    for row in idx_rows:
        runs = [[0, 1, row[0]]]
        for i, j in enumerate(row[1:], 1):
            if j == runs[-1][2]:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1, j])
        out.append(runs)
    return out


def piecewise_sub(x, h, mm, seq, f):
    """Block.sub on packed rows, one run of tokens with one modulation row at a time, instead of
    gathering (shift, scale, gate) for every token: the same values, and nothing (R, M, D) is kept
    for backward beyond what the unpacked layout keeps (the gathered scale and gate would be).
    x, h (R, M, D); mm (2S, 3, D) the (shift, scale, gate) rows."""
    rows = lambda fn, v: torch.stack([torch.cat([fn(v[r, a:b], mm[j]) for a, b, j in runs])
                                      for r, runs in enumerate(seq.pieces)])
    y = f(rows(lambda v, m: modulate(v, m[0], m[1]), h), seq)         # (R, M, D)
    return x + rows(lambda v, m: m[2] * v, y)                          # gate · f(...)


HOST = "cpu"  # where offloaded block inputs wait; train.py's step simulator sets "meta" (no memory)


def offloaded(blk, x, e, seq, last):
    """Activation checkpointing whose saved block input x (R, N, D) waits in host memory: on a GPU
    the 42 saved inputs of the 5B at 17,776 tokens are 4.3 GiB that the device no longer holds;
    the copy out and back overlaps with the blocks' compute. Same values and gradients.
    _ANCHOR: over a frozen base (LoRA) neither x nor e requires grad, yet the block's adapters do;
    an input that requires grad makes the output require it, so this backward runs."""
    return _Offloaded.apply(blk, seq, last, x, e, _ANCHOR)


_ANCHOR = torch.zeros((), requires_grad=True)  # never gets a gradient (backward returns None)


class _Offloaded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, blk, seq, last, x, e, anchor):
        ctx.blk, ctx.seq, ctx.last = blk, seq, last
        ctx.amp = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)
        if x.is_cuda:  # pinned, so the copy is asynchronous
            ctx.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, True)
        else:
            ctx.host = x.detach().to(HOST)
        ctx.save_for_backward(e)
        with torch.no_grad():
            return blk(x, e, seq, last)

    @staticmethod
    def backward(ctx, g):
        if ctx.host.is_meta:  # the step simulator's host keeps no data (fake or --real): the
            x = torch.zeros(ctx.host.shape, dtype=ctx.host.dtype, device=g.device)  # shape only
        else:
            x = ctx.host.to(g.device, non_blocking=True)
        x.requires_grad_()
        e = ctx.saved_tensors[0].detach().requires_grad_()
        with torch.enable_grad(), torch.autocast(g.device.type, ctx.amp[1], enabled=ctx.amp[0]):
            y = ctx.blk(x, e, ctx.seq, ctx.last)  # the block again, its parameters' gradients too
        torch.autograd.backward(y, g)
        return None, None, None, x.grad, e.grad, None


def chunked_mlp(blk, h, k):
    """The MLP over k slices of the tokens, each slice checkpointed: backward holds one slice's
    (R, N/k, 4D) hidden activations at a time, not the whole (R, N, 4D) pre- and post-GELU pair
    and their gradients (1.6 GiB for the 5B at 17,776 tokens in bf16), for one more MLP forward
    (about +15% of a checkpointed step's FLOPs). The same values and gradients."""
    from torch.utils.checkpoint import checkpoint
    f = lambda v: blk.fc2(F.gelu(blk.fc1(v), approximate="tanh"))   # (R, n, D) -> (R, n, D)
    return torch.cat([checkpoint(f, c, use_reentrant=False) for c in h.chunk(k, dim=1)], dim=1)


@functools.cache
def compiled_flex():
    """FlexAttention, compiled once per process and row shape (~6 s on CPU): eager flex_attention
    materialises all scores, which is what the BlockMask is there to avoid."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


if __name__ == "__main__":
    main()
