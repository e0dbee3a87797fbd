"""The CogVideoX expert transformer (paper §2.2, Figures 1 and 4) and its T5 text encoder.

What is here, smallest piece first:
  timestep sinusoid + MLP -> 3D-RoPE (and the 2B's 3D sin-cos table) -> attention with QK-norm ->
  expert transformer block (expert AdaLN, §2.2) -> ExpertDiT (patchify, [text; video] sequence,
  blocks, final AdaLN, unpatchify) -> Frame Pack forward (§3.1) -> released-weight loading ->
  T5 text encoder and a tiny trainable T5 for the toy demo.

Run:
  python dit.py                                   # tiny preset: params, one forward+backward, timing (CPU)
  python dit.py --preset cogvideox-5b             # full presets are built on the meta device: parameter count
  python dit.py --preset tiny --device cuda --bf16
  python -m pytest -q tests/test_dit.py           # parity with diffusers, packed == unpacked, ...
Training (CPU or torchrun) lives in train.py; this file is only the model.

Shape legend
  B batch            C latent channels      T latent frames (T' in the paper)   h, w latent height, width
  p spatial patch    gh, gw = h/p, w/p      n = T*gh*gw video tokens            L text tokens
  N = L + n tokens   D hidden width         H heads        d head dim (D = H*d)  E time-embedding width
  S samples in a Frame Pack batch           R packed rows  M tokens per packed row
"""
import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint


@dataclass
class DiTConfig:
    in_channels: int = 16      # I2V doubles it: [noisy latent; image latent] along channels (App. A)
    out_channels: int = 16
    patch: int = 2             # spatial only; §2.2 "we do not patchify along the temporal dimension"
    layers: int = 30
    heads: int = 30
    head_dim: int = 64
    time_dim: int = 512        # E: width of the timestep MLP output that drives every modulation
    text_dim: int = 4096       # T5 v1.1 XXL width
    text_len: int = 226        # prompt tokens (padded); only the sin-cos/learned tables depend on it
    pos: str = "rope"          # "rope" (paper, 5B) | "sincos" (released 2B) | "learned" (5B-I2V: RoPE + table)
    rope_theta: float = 10000.0
    rope_interp: bool = False  # False: extrapolation, integer positions at every size (§3.2); True: pipeline's interpolation
    base_frames: int = 13      # native latent grid (T, h, w): sin-cos/learned tables, interpolation target
    base_height: int = 60
    base_width: int = 90
    spatial_scale: float = 1.875   # sin-cos only: spatial positions divided by this
    temporal_scale: float = 1.0
    norm_eps: float = 1e-5     # block LayerNorms: the diffusers port and the original code differ; either reproduces
    qk_eps: float = 1e-6       # the per-head QK LayerNorm
    learned_trainable: bool = False  # "learned" table: buffer as released (not a parameter) or a trainable Parameter

    @property
    def dim(self):
        return self.heads * self.head_dim


DIT_PRESETS = {
    # The shapes demo DiT: consumes the tiny VAE's latents of the toy clips and the tiny T5's features;
    # a forward takes milliseconds on a laptop CPU. Its base grid is the demo's training clip.
    "tiny": DiTConfig(in_channels=8, out_channels=8, layers=4, heads=4, head_dim=32, time_dim=128, text_dim=64,
                      text_len=12, base_frames=3, base_height=8, base_width=8),
    "cogvideox-2b": DiTConfig(layers=30, heads=30, pos="sincos"),
    "cogvideox-5b": DiTConfig(layers=42, heads=48),
    "cogvideox-5b-i2v": DiTConfig(in_channels=32, layers=42, heads=48, pos="learned"),
}


def num_tokens(cfg, T_lat, h_lat, w_lat):
    """Text + video tokens of one sample: what a Frame Pack row budget is counted in (§3.1)."""
    return cfg.text_len + T_lat * (h_lat // cfg.patch) * (w_lat // cfg.patch)


# ----- timestep embedding -----

def timestep_sinusoid(t, dim):
    """(B,) integer steps 0..999 -> (B, dim) [cos | sin], frequencies exp(-ln(1e4) i / half).
    Same op order as the released port so fp32 values agree bit for bit even at t = 999."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]                          # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)     # (B, dim), cos first


# ----- 3D-RoPE (§2.2) -----

def rope_positions(T, gh, gw, cfg):
    """Float positions per axis. Extrapolation (§3.2, the paper's choice): integer positions at any size,
    so neighbouring tokens keep their relative offsets. Interpolation (the diffusers pipeline): the grid
    is fitted inside the native grid (resize + centre crop) and positions are spread with linspace."""
    if not cfg.rope_interp:
        return [torch.arange(s, dtype=torch.float32) for s in (T, gh, gw)]
    bh, bw = cfg.base_height // cfg.patch, cfg.base_width // cfg.patch
    if gh / gw > bh / bw:                                            # taller than native: fit the height
        rh, rw = bh, int(round(bh / gh * gw))
    else:                                                            # fit the width
        rh, rw = int(round(bw / gw * gh)), bw
    top, left = int(round((bh - rh) / 2.0)), int(round((bw - rw) / 2.0))
    # Released quirk, copied as is: the last position is end*(g-1)/g, scaled from the crop's absolute end
    # rather than its length, so with a crop offset the spacing is not exactly crop size / g.
    ph = torch.linspace(top, (top + rh) * (gh - 1) / gh, gh, dtype=torch.float32)
    pw = torch.linspace(left, (left + rw) * (gw - 1) / gw, gw, dtype=torch.float32)
    pt = torch.linspace(0, T * (T - 1) / T, T, dtype=torch.float32)  # = arange(T): time is never rescaled
    return [pt, ph, pw]


def rope_table(T, gh, gw, cfg):
    """(n, d/2) complex rotations e^{i angle} for the video tokens in (t, h, w) order.

    §2.2 3D-RoPE: the head dim is split t : h : w = 2/8 : 3/8 : 3/8 and each part rotates by its own axis
    (the paper lists x, y : 3/8 each and t : 2/8; the released order of the parts is [t | h | w]). Rotation
    acts on interleaved pairs (x0, x1), (x2, x3), ..., i.e. on the complex numbers x0 + i x1, ...: one complex
    multiply per pair (the release's cos/sin with a stacked, negated copy is the same rotation in more passes)."""
    d = cfg.head_dim
    dims = (d // 4, d // 8 * 3, d // 8 * 3)
    angles = []
    for pos, dd in zip(rope_positions(T, gh, gw, cfg), dims):
        freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dd, 2, dtype=torch.float32) / dd))  # (dd/2,)
        angles.append(torch.outer(pos, freqs))                       # (size, dd/2)
    at, ah, aw = angles
    grid = torch.cat([at[:, None, None].expand(-1, gh, gw, -1),      # (T, gh, gw, d/2)
                      ah[None, :, None].expand(T, -1, gw, -1),
                      aw[None, None, :].expand(T, gh, -1, -1)], dim=-1).reshape(T * gh * gw, d // 2)
    return torch.polar(torch.ones_like(grid), grid)                  # (n, d/2) complex64: cos + i sin


def apply_rope(x, rot):
    """x (R, N, H, d); rot (R|1, N, 1, d/2) complex. Text tokens carry rot = 1 (RoPE only on video, §2.2).
    Computed in fp32 like the release, so bf16 activations do not lose the phase. One complex multiply
    forward and one backward, instead of a swap, two products and a sum each way."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))     # (R, N, H, d/2) pairs as complex
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)     # (R, N, H, d)


# ----- 3D sin-cos table (released 2B) -----

def sincos_1d(pos, dim):
    """(m,) positions -> (m, dim) [sin | cos], float64 as in the release."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))  # (dim/2,)
    out = torch.outer(pos.double(), omega)                            # (m, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=-1)                  # (m, dim)


def sincos_table(T, gh, gw, cfg):
    """(n, D) absolute table of the released 2B, added to the video patch embeddings. Layout
    [time D/4 | width 3D/8 | height 3D/8]; spatial positions are divided by spatial_scale, which maps the
    480x720 patch grid onto the 256x384 first-stage grid (§3.2 progressive training). The paper's ablation (Fig. 3a)
    prefers 3D-RoPE; the released 2B still uses this table, so we keep it selectable."""
    D = cfg.dim
    t = sincos_1d(torch.arange(T) / cfg.temporal_scale, D // 4)       # (T, D/4)
    ww = sincos_1d(torch.arange(gw) / cfg.spatial_scale, 3 * D // 8)  # (gw, 3D/8)
    hh = sincos_1d(torch.arange(gh) / cfg.spatial_scale, 3 * D // 8)  # (gh, 3D/8)
    return torch.cat([t[:, None, None].expand(-1, gh, gw, -1),        # (T, gh, gw, D)
                      ww[None, None, :].expand(T, gh, -1, -1),
                      hh[None, :, None].expand(T, -1, gw, -1)], dim=-1).reshape(T * gh * gw, D)


# ----- attention: SDPA, or FlexAttention for packed rows -----

class Seq(NamedTuple):
    """What a block needs to know about the token layout of its input rows.
    Unpacked rows: text_len = L, idx = None (every row is [L text; n video] of one sample).
    Packed rows:   idx (R, M) picks each token's modulation row 2*s + (0 video | 1 text) of sample s."""
    text_len: int
    idx: torch.Tensor = None
    rot: torch.Tensor = None    # (R|1, M, 1, d/2) complex RoPE rotations; None for the sin-cos model
    mask: object = None         # None (full attention) or what pack_mask returned


def pack_mask(seg, flex=False):
    """THE one place the Frame Pack mask is built (§3.1, DESIGN §4): token i may attend to token j iff
    both belong to the same sample. seg (R, M) sample id per token; padding has id -1, so padding attends
    to padding only (never an empty softmax row, so no NaN). Returns a bool (R, 1, M, M) SDPA mask, or a
    FlexAttention BlockMask that skips whole blocks across samples (a varlen kernel could slot in here)."""
    if not flex:
        return (seg[:, :, None] == seg[:, None, :])[:, None]         # (R, 1, M, M)
    from torch.nn.attention.flex_attention import create_block_mask
    R, M = seg.shape
    return create_block_mask(lambda b, h, q, k: seg[b, q] == seg[b, k], R, None, M, M, device=seg.device)


_flex = None


def attention(q, k, v, mask):
    """q, k, v (R, N, H, d) -> (R, N, H, d). §2.2 3D full attention: one softmax over all text and video
    tokens of a sample. SDPA picks flash / memory-efficient kernels on GPU when the mask is None."""
    # Unpacked rows need no mask at all (text and video of one sample see each other, §2.2), which keeps
    # SDPA on its fastest kernels; only packed rows pay for a mask.
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))                  # (R, H, N, d)
    if mask is not None and not isinstance(mask, torch.Tensor):     # a FlexAttention BlockMask
        global _flex
        if _flex is None:                    # compiled once (~6 s on CPU); eager flex materialises all scores
            from torch.nn.attention.flex_attention import flex_attention
            _flex = torch.compile(flex_attention, dynamic=False)
        o = _flex(q, k, v, block_mask=mask)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2)                                          # (R, N, H, d)


# ----- expert transformer block (§2.2) -----

class Block(nn.Module):
    """One LayerNorm, attention and MLP shared by text and video; only the modulation is per expert.
    §2.2 Expert AdaLN: SiLU -> Linear(E, 6D) gives (shift, scale, gate) for video and another for text.
    The paper's ablation (Fig. 3c) found expert MLPs no better, so the experts are this modulation only."""

    def __init__(self, cfg):
        super().__init__()
        D, self.H, self.d = cfg.dim, cfg.heads, cfg.head_dim
        self.norm1 = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.mod1 = nn.Linear(cfg.time_dim, 6 * D)
        self.qkv = nn.Linear(D, 3 * D)          # fused q, k, v: one matmul instead of three
        self.q_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.qk_eps)  # QK-norm per head, keeps logits bounded
        self.k_norm = nn.LayerNorm(cfg.head_dim, eps=cfg.qk_eps)
        self.proj = nn.Linear(D, D)
        self.norm2 = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.mod2 = nn.Linear(cfg.time_dim, 6 * D)
        self.fc1 = nn.Linear(D, 4 * D)
        self.fc2 = nn.Linear(4 * D, D)

    def attn(self, h, seq, q_from=0):
        """(R, N, D) -> (R, N - q_from, D): q_from > 0 computes the outputs of tokens q_from.. only (their
        queries attend to every token's keys and values)."""
        R, N, D = h.shape
        q, k, v = self.qkv(h).view(R, N, 3, self.H, self.d).unbind(2)  # each (R, N, H, d)
        q = q[:, q_from:]                                              # (R, N - q_from, H, d)
        q, k = self.q_norm(q), self.k_norm(k)                          # QK-norm before RoPE, as released
        if seq.rot is not None:
            q, k = apply_rope(q, seq.rot[:, q_from:]), apply_rope(k, seq.rot)
        o = attention(q.to(v.dtype), k.to(v.dtype), v, seq.mask)      # (R, N - q_from, H, d)
        return self.proj(o.reshape(R, N - q_from, D))                 # (R, N - q_from, D)

    def mlp(self, h):
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))      # (R, N, D)

    def sub(self, x, e, seq, norm, mod, fn, q_from=0):
        """x + gate * fn(LN(x) * (1 + scale) + shift), with (shift, scale, gate) of the token's expert.
        Unpacked rows hold seq.text_len text tokens, then video. q_from = text_len: fn returns the video
        rows only, and so does sub."""
        m = mod(e).view(-1, 2, 3, x.shape[-1])  # (S, [video, text], [shift, scale, gate], D); released chunk order
        h = norm(x)                                                    # (R, N, D)
        # The released code carries text and video as two tensors and concatenates them for every attention
        # and MLP call. We keep one [text; video] sequence: the shared LayerNorm, attention and MLP run once
        # on it, and only the cheap element-wise modulation looks at which expert a token belongs to.
        if seq.idx is None:                     # unpacked: [L text; n video] in every row
            sizes = [seq.text_len, x.shape[1] - seq.text_len]
            (vs, vc, vg), (ts, tc, tg) = (z.unbind(1) for z in m[:, :, :, None].unbind(1))  # each (B, 1, D)
            if sizes[0] == 0:                   # video rows only (the last block's MLP)
                return torch.addcmul(x, fn(torch.addcmul(vs, h, 1 + vc), seq), vg)  # (B, n, D)
            # split (not two slices): its backward is one concatenation instead of zero-filled full-size grads
            ht, hv = h.split(sizes, dim=1)                             # (B, L, D), (B, n, D)
            y = fn(torch.cat([torch.addcmul(ts, ht, 1 + tc), torch.addcmul(vs, hv, 1 + vc)], dim=1), seq)
            if q_from:                          # y: the video rows only
                return torch.addcmul(x[:, q_from:], y, vg)             # (B, n, D)
            yt, yv = y.split(sizes, dim=1)
            return x + torch.cat([yt * tg, yv * vg], dim=1)            # (B, N, D)
        # packed: per-token modulation, gathered from each token's (sample, expert) row (§3.1: own timestep)
        s, c, g = m.flatten(0, 1)[seq.idx].unbind(2)                   # each (R, M, D)
        return torch.addcmul(x, fn(torch.addcmul(s, h, 1 + c), seq), g)

    def forward(self, x, e, seq, video_only=False):
        """video_only (the last block of an unpacked forward): nobody reads the text rows of its output, so
        their queries, attention output, projection and MLP are skipped; returns (B, n, D) video rows."""
        # e = SiLU(time embedding), per sample; each sub-layer has its own expert modulation (Fig. 1).
        q_from = seq.text_len if video_only else 0
        x = self.sub(x, e, seq, self.norm1, self.mod1, lambda h, s: self.attn(h, s, q_from), q_from)
        if video_only:
            seq = seq._replace(text_len=0)      # only video rows are left
        return self.sub(x, e, seq, self.norm2, self.mod2, lambda h, _: self.mlp(h))


# ----- the whole model -----

class ExpertDiT(nn.Module):
    """v-prediction network: x (B, C_in, T, h, w), t (B,), text (B, L, text_dim) -> v (B, C_out, T, h, w)."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.pos not in ("rope", "sincos", "learned"):
            raise ValueError(f"DiTConfig.pos={cfg.pos!r}: use 'rope', 'sincos' or 'learned'")
        if cfg.head_dim % 16:
            raise ValueError(f"head_dim={cfg.head_dim}: use a multiple of 16 so the t:h:w RoPE split is whole pairs")
        self.cfg, D, p = cfg, cfg.dim, cfg.patch
        self.patch = nn.Linear(cfg.in_channels * p * p, D)  # = the released Conv2d(k=p, stride=p) on (c, ph, pw)
        self.text_proj = nn.Linear(cfg.text_dim, D)          # T5 features -> D, one Linear (§2.2)
        self.time_in = nn.Sequential(nn.Linear(D, cfg.time_dim), nn.SiLU(), nn.Linear(cfg.time_dim, cfg.time_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm_final = nn.LayerNorm(D, eps=cfg.norm_eps)
        # Released quirk: a plain LayerNorm and then the AdaLN's own LayerNorm, two in a row. Kept for the weights.
        self.norm_out = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.mod_out = nn.Linear(cfg.time_dim, 2 * D)        # (shift, scale); video tokens only, no text expert
        self.proj_out = nn.Linear(D, p * p * cfg.out_channels)
        if cfg.pos == "learned":
            # 5B-I2V (App. A): RoPE plus an absolute table over [text; native video grid]. The paper's Fig. 3b
            # found the two converge alike; the released I2V has it, as a persistent buffer (not a parameter).
            n = cfg.text_len + cfg.base_frames * (cfg.base_height // p) * (cfg.base_width // p)
            table = torch.zeros(1, n, D)
            if cfg.learned_trainable:
                self.pos = nn.Parameter(table)
            else:
                self.register_buffer("pos", table)
        self.checkpointing = False   # True: recompute each block in backward (activation checkpointing)
        self.autocast = None         # torch.bfloat16: run the forward under autocast (GPU full scale)
        self.flex = False            # True: Frame Pack rows use FlexAttention's BlockMask instead of a dense mask
        self._tables = {}            # cached RoPE / sin-cos tables keyed by grid and device
        self.init_weights()

    def init_weights(self):
        """All initialisation in one place. DiT-style: xavier linears, zero biases; the modulation and the
        output projection start at zero, so every block is the identity and v = 0 at step 0 (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in self.time_in[0], self.time_in[2]:
            nn.init.normal_(lin.weight, std=0.02)
        for blk in self.blocks:
            for lin in blk.mod1, blk.mod2:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        for lin in self.mod_out, self.proj_out:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.cfg.pos == "learned" and self.pos.device.type != "meta":
            c = self.cfg                         # start the learned table at the sin-cos table, as diffusers builds it
            grid = sincos_table(c.base_frames, c.base_height // c.patch, c.base_width // c.patch, c)
            with torch.no_grad():
                self.pos.zero_()
                self.pos[0, c.text_len:] = grid.to(self.pos.dtype)

    # --- positions ---

    def _table(self, kind, L, T, gh, gw, device):
        """Cached per grid size, so sampling and training never rebuild them.
        "rope": (L + n, d/2) complex rotations for one sample's [text; video] tokens; the text rows are the
        identity rotation (1 + 0i), which applies RoPE to video positions only without slicing q, k.
        "sincos": (n, D) table for the video tokens (the text slots get nothing added)."""
        key = (kind, L, T, gh, gw, device)
        if key not in self._tables:
            if kind == "rope":
                rot = rope_table(T, gh, gw, self.cfg)                  # (n, d/2)
                self._tables[key] = torch.cat([torch.ones(L, rot.shape[1], dtype=rot.dtype), rot]).to(device)  # (L + n, d/2)
            else:
                self._tables[key] = sincos_table(T, gh, gw, self.cfg).to(device)  # (n, D)
        return self._tables[key]

    def _video_embed(self, x, L):
        """x (B, C, T, h, w) -> (B, n, D) patch embeddings with the absolute table added (sin-cos or learned)."""
        cfg, p = self.cfg, self.cfg.patch
        B, C, T, h, w = x.shape
        if C != cfg.in_channels or h % p or w % p:
            raise ValueError(f"latent (B, C, T, h, w)={tuple(x.shape)}: need C={cfg.in_channels} and h, w multiples "
                             f"of {p} (crop or resize the video)")
        gh, gw = h // p, w // p
        tok = self.patch(rearrange(x, "b c t (gh ph) (gw pw) -> b (t gh gw) (c ph pw)", ph=p, pw=p))  # (B, n, D)
        if cfg.pos == "sincos":
            tok = tok + self._table("sincos", 0, T, gh, gw, x.device).to(tok.dtype)
        elif cfg.pos == "learned":
            if (gh, gw) != (cfg.base_height // p, cfg.base_width // p) or T > cfg.base_frames or L != cfg.text_len:
                raise ValueError(f"the learned position table covers {cfg.text_len} text tokens and latents up to "
                                 f"{cfg.base_frames}x{cfg.base_height}x{cfg.base_width}; got L={L}, latent {T}x{h}x{w}")
            # Fewer frames take the first rows of the (t, h, w)-ordered table. (diffusers falls back to a
            # sin-cos table there, a quirk we do not copy; at the native size both agree.)
            tok = tok + self.pos[0, L:L + tok.shape[1]].to(tok.dtype)
        return tok

    def _text_embed(self, text):
        txt = self.text_proj(text)                                     # (B, L, D)
        if self.cfg.pos == "learned":
            txt = txt + self.pos[:, :text.shape[1]].to(txt.dtype)      # the table has text slots too
        return txt

    def _final(self, x, m):
        """x (..., D) video tokens, m (..., 2, D) (shift, scale) -> (..., p*p*C_out)."""
        h = self.norm_out(self.norm_final(x))
        return self.proj_out(h * (1 + m[..., 1, :]) + m[..., 0, :])

    def _blocks(self, x, e, seq, video_only=False):
        """video_only: the last block returns only the video rows (unpacked rows: [L text; n video])."""
        for i, blk in enumerate(self.blocks):
            last = video_only and i == len(self.blocks) - 1
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, e, seq, last, use_reentrant=False)  # keep only block inputs; recompute in backward
            else:
                x = blk(x, e, seq, last)
        return x

    def _amp(self, device):
        return torch.autocast(device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None)

    def forward(self, x, t, text, max_tokens=None):
        """x (B, C_in, T, h, w) latents (already times the VAE scaling factor), t (B,) steps, text (B, L, text_dim).
        A list of latents with max_tokens goes to forward_packed: calling it through forward keeps DDP / FSDP
        wrappers (which only hook forward) in charge of gradient synchronisation."""
        if isinstance(x, (list, tuple)):
            if max_tokens is None:
                raise ValueError("a list of latents is a Frame Pack batch: pass max_tokens (row length in tokens)")
            return self.forward_packed(x, t, text, max_tokens)
        B, _, T, h, w = x.shape
        L, p = text.shape[1], self.cfg.patch
        if t.shape != (B,) or text.shape[0] != B or text.shape[2] != self.cfg.text_dim:
            raise ValueError(f"need t (B,) and text (B, L, {self.cfg.text_dim}) for B={B}; got t {tuple(t.shape)}, "
                             f"text {tuple(text.shape)}")
        with self._amp(x.device):
            # §2.2 / Fig. 1: the timestep drives every modulation. The SiLU that starts each modulation MLP is
            # the same for all of them, so it is applied once here.
            e = F.silu(self.time_in(timestep_sinusoid(t, self.cfg.dim).to(self.patch.weight.dtype)))  # (B, E)
            # §2.2: text tokens go before the video tokens; one sequence, one attention.
            seqx = torch.cat([self._text_embed(text), self._video_embed(x, L)], dim=1)  # (B, N, D)
            seq = Seq(L)
            if self.cfg.pos != "sincos":         # the 2B has no RoPE: its positions are already in the tokens
                rot = self._table("rope", L, T, h // p, w // p, x.device)      # (N, d/2)
                seq = Seq(L, None, rot[None, :, None])                          # (1, N, 1, d/2): broadcast over B, H
            vid = self._blocks(seqx, e, seq, video_only=True)          # (B, n, D): the text outputs are never read
            m = self.mod_out(e).view(B, 1, 2, -1)                      # (B, 1, [shift, scale], D)
            out = self._final(vid, m)                                  # (B, n, p*p*C_out)
        return rearrange(out.to(x.dtype), "b (t gh gw) (c ph pw) -> b c t (gh ph) (gw pw)",
                         t=T, gh=h // p, ph=p, pw=p)

    # ----- Frame Pack (§3.1) -----

    def forward_packed(self, latents, t, text, max_tokens):
        """§3.1 Frame Pack (after NaViT's Patch'n'Pack): samples of different durations and resolutions,
        images (T = 1) included, share token rows of at most max_tokens. Each sample keeps its own
        timestep (per-token modulation), its own 3D positions and attends only to itself, so the result
        equals running every sample alone. (The released code instead pads short clips by repeating the
        last frame; with this forward that is just the unpacked call on padded latents.)
        latents: list of S (C_in, T_s, h_s, w_s); t (S,); text (S, L, text_dim) -> list of (C_out, T_s, h_s, w_s)."""
        S, L, p = len(latents), text.shape[1], self.cfg.patch
        if t.shape != (S,) or text.shape[0] != S:
            raise ValueError(f"need t ({S},) and text ({S}, L, D) for {S} latents; got {tuple(t.shape)}, {tuple(text.shape)}")
        grids = [(z.shape[1], z.shape[2] // p, z.shape[3] // p) for z in latents]
        sizes = [L + T * gh * gw for T, gh, gw in grids]
        rows = []                                                      # first fit, in order
        for s, n in enumerate(sizes):
            if n > max_tokens:
                raise ValueError(f"sample {s} has {n} tokens > max_tokens={max_tokens}: raise max_tokens or drop it")
            fit = [r for r in rows if sum(sizes[i] for i in r) + n <= max_tokens]
            if fit:
                fit[0].append(s)
            else:
                rows.append([s])
        R, M, dev = len(rows), max(sum(sizes[i] for i in r) for r in rows), text.device
        nv = [n - L for n in sizes]
        voff = [0] + torch.tensor(nv).cumsum(0).tolist()               # start of each sample's video tokens
        # Index plan, built on the host from shapes only: for every slot of every row, which source token
        # fills it (src), which sample it belongs to (seg, for the mask), which modulation row it uses
        # (idx) and which RoPE row (rid). Rows are padded to the longest row M; a padding slot takes a zero
        # token, segment -1 and the identity rotation, and its output is never read.
        src, seg, idx, rid, vdst = [], [], [], [], [None] * S
        for r, row in enumerate(rows):
            for s in row:
                src += list(range(s * L, (s + 1) * L)) + list(range(S * L + voff[s], S * L + voff[s + 1]))
                seg += [s] * sizes[s]
                idx += [2 * s + 1] * L + [2 * s] * nv[s]               # text expert row 2s+1, video 2s
                rid += list(range(1 + s * L + voff[s], 1 + (s + 1) * L + voff[s + 1]))
                vdst[s] = range(len(src) - nv[s], len(src))            # where sample s's video tokens sit
            pad = (r + 1) * M - len(src)                                # padding: zero token, own segment -1
            src, seg, idx, rid = src + [S * L + voff[-1]] * pad, seg + [-1] * pad, idx + [0] * pad, rid + [0] * pad
        as_t = lambda a: torch.tensor(a, device=dev).view(R, M)
        seg, idx = as_t(seg), as_t(idx)
        with self._amp(dev):
            e = F.silu(self.time_in(timestep_sinusoid(t, self.cfg.dim).to(self.patch.weight.dtype)))  # (S, E)
            txt = self._text_embed(text).flatten(0, 1)                 # (S*L, D)
            vid = torch.cat([self._video_embed(z[None], L)[0] for z in latents])  # (sum n, D)
            tokens = torch.cat([txt, vid.to(txt.dtype), txt.new_zeros(1, txt.shape[1])])  # last row = padding
            x = tokens[as_t(src)]                                      # (R, M, D)
            seq = Seq(L, idx, mask=pack_mask(seg, self.flex))
            if self.cfg.pos != "sincos":     # per-sample positions: every sample starts at (0, 0, 0), as if alone
                tabs = [self._table("rope", L, *g, dev) for g in grids]
                rot = torch.cat([torch.ones_like(tabs[0][:1])] + tabs)  # (1 + S*L + sum n, d/2); row 0: padding, identity
                seq = seq._replace(rot=rot[as_t(rid)][:, :, None])       # (R, M, 1, d/2)
            x = self._blocks(x, e, seq)
            sid = torch.repeat_interleave(torch.arange(S, device=dev), torch.tensor(nv, device=dev))  # (sum n,)
            m = self.mod_out(e).view(S, 2, -1)[sid]                    # (sum n, 2, D)
            vdst = torch.tensor([i for v in vdst for i in v], device=dev)     # (sum n,) in sample order
            out = self._final(x.flatten(0, 1)[vdst], m).to(latents[0].dtype)  # (sum n, p*p*C_out)
        return [rearrange(o, "(t gh gw) (c ph pw) -> c t (gh ph) (gw pw)", t=T, gh=gh, ph=p, pw=p)
                for o, (T, gh, gw) in zip(out.split(nv), grids)]

    # ----- checkpoints -----

    def save(self, folder):
        """folder/config.json + folder/model.safetensors, each written to a temp file and renamed (atomic)."""
        from safetensors.torch import save_file
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".model.safetensors.{os.getpid()}.tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, tmp)
        os.replace(tmp, os.path.join(folder, "model.safetensors"))
        tmp = os.path.join(folder, f".config.json.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(self.cfg), f, indent=1)
        os.replace(tmp, os.path.join(folder, "config.json"))

    @classmethod
    def load(cls, folder, device="cpu", dtype=None):
        """Our checkpoint back; dtype None keeps the stored dtype."""
        from safetensors.torch import load_file
        cfg = _config(json.loads(Path(folder, "config.json").read_text()))
        sd = load_file(os.path.join(folder, "model.safetensors"))
        return _load_checked(cfg, sd, folder, dtype).to(device)

    @classmethod
    def from_diffusers(cls, folder, device="cpu", dtype=torch.float32, **overrides):
        """Load a diffusers CogVideoXTransformer3DModel folder (or a pipeline folder with transformer/),
        single-file or sharded, fp32/fp16/bf16. overrides: DiTConfig fields, e.g. rope_interp=True to
        reproduce the diffusers pipeline's RoPE at non-native sizes."""
        folder = Path(folder)
        if (folder / "transformer" / "config.json").exists():
            folder = folder / "transformer"
        cfg = _config({**_diffusers_config(json.loads((folder / "config.json").read_text())), **overrides})
        sd = _from_diffusers_keys(_read_safetensors(folder), cfg)
        return _load_checked(cfg, sd, folder, dtype).to(device)


# ----- released-weight loading -----

def _config(d):
    names = {f.name for f in fields(DiTConfig)}
    if set(d) - names:
        raise ValueError(f"unknown DiTConfig fields {sorted(set(d) - names)}: the checkpoint is from another version")
    return DiTConfig(**d)


def _diffusers_config(dc):
    """diffusers config.json -> DiTConfig fields; refuses what this file does not implement (CogVideoX 1.5)."""
    need = {"patch_size_t": None, "ofs_embed_dim": None, "activation_fn": "gelu-approximate", "flip_sin_to_cos": True,
            "freq_shift": 0, "timestep_activation_fn": "silu", "norm_elementwise_affine": True, "attention_bias": True,
            "patch_bias": True}
    for k, v in need.items():
        if dc.get(k, v) != v:
            raise ValueError(f"diffusers config {k}={dc[k]!r} is not supported (CogVideoX 1.0 needs {v!r})")
    pos = ("learned" if dc.get("use_learned_positional_embeddings") else "rope") \
        if dc.get("use_rotary_positional_embeddings") else "sincos"
    tcr = dc.get("temporal_compression_ratio", 4)
    return dict(in_channels=dc["in_channels"], out_channels=dc.get("out_channels") or dc["in_channels"],
                patch=dc.get("patch_size", 2), layers=dc["num_layers"], heads=dc["num_attention_heads"],
                head_dim=dc["attention_head_dim"], time_dim=dc["time_embed_dim"], text_dim=dc["text_embed_dim"],
                text_len=dc.get("max_text_seq_length", 226), pos=pos,
                base_frames=(dc.get("sample_frames", 49) - 1) // tcr + 1,  # config counts pixel frames
                base_height=dc.get("sample_height", 60), base_width=dc.get("sample_width", 90),
                spatial_scale=dc.get("spatial_interpolation_scale", 1.875),
                temporal_scale=dc.get("temporal_interpolation_scale", 1.0), norm_eps=dc.get("norm_eps", 1e-5))


def _read_safetensors(folder):
    """All tensors of a diffusers folder: an index json (sharded) or one .safetensors (any variant)."""
    from safetensors.torch import load_file
    index = sorted(folder.glob("*.safetensors.index*.json"), key=lambda f: (f.name.count("."), f.name))  # plain first
    if index:
        files = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
    else:
        files = sorted(f.name for f in folder.glob("*.safetensors"))
        if "diffusion_pytorch_model.safetensors" in files:
            files = ["diffusion_pytorch_model.safetensors"]
        if len(files) != 1:
            raise ValueError(f"{folder}: expected one .safetensors file or an index json, found {files or 'none'}")
    sd = {}
    for f in files:
        sd.update(load_file(folder / f))
    return sd


def _from_diffusers_keys(sd, cfg):
    """Our names <- diffusers names. q, k, v are fused into one qkv; the patch Conv2d becomes a Linear."""
    sd, out = dict(sd), {}
    take = lambda k: sd.pop(k) if k in sd else None
    D = cfg.dim
    for wb in ("weight", "bias"):
        w = take(f"patch_embed.proj.{wb}")
        out[f"patch.{wb}"] = w.reshape(D, -1) if w is not None and wb == "weight" else w  # (D, C, p, p) -> (D, C*p*p)
        pairs = {"text_proj": "patch_embed.text_proj", "time_in.0": "time_embedding.linear_1",
                 "time_in.2": "time_embedding.linear_2", "norm_final": "norm_final", "norm_out": "norm_out.norm",
                 "mod_out": "norm_out.linear", "proj_out": "proj_out"}
        for i in range(cfg.layers):
            b = f"transformer_blocks.{i}."
            pairs.update({f"blocks.{i}.{a}": b + c for a, c in [
                ("norm1", "norm1.norm"), ("mod1", "norm1.linear"), ("q_norm", "attn1.norm_q"),
                ("k_norm", "attn1.norm_k"), ("proj", "attn1.to_out.0"), ("norm2", "norm2.norm"),
                ("mod2", "norm2.linear"), ("fc1", "ff.net.0.proj"), ("fc2", "ff.net.2")]})
            qkv = [take(f"{b}attn1.to_{z}.{wb}") for z in "qkv"]
            out[f"blocks.{i}.qkv.{wb}"] = torch.cat(qkv) if all(z is not None for z in qkv) else None
        for ours, theirs in pairs.items():
            out[f"{ours}.{wb}"] = take(f"{theirs}.{wb}")
    if cfg.pos == "learned":
        out["pos"] = take("patch_embed.pos_embedding")
    missing = sorted(k for k, v in out.items() if v is None)
    if missing or sd:
        raise ValueError(f"diffusers weights do not match the config: missing {missing[:8]}{'...' if len(missing) > 8 else ''}"
                         f", unexpected {sorted(sd)[:8]}{'...' if len(sd) > 8 else ''} (wrong folder or a 1.5 model?)")
    return out


def _load_checked(cfg, sd, where, dtype):
    """Build the model on the meta device (no memory, no random init of billions of weights), check the
    keys with one clear error naming missing / unexpected / mis-shaped ones, then adopt the tensors."""
    with torch.device("meta"):
        model = ExpertDiT(cfg)
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or extra or bad:
        raise ValueError(f"{where}: checkpoint does not fit DiTConfig: missing {missing[:8]}, unexpected {extra[:8]}, "
                         f"shape mismatch {bad[:8]}")
    model.load_state_dict({k: v.to(dtype or v.dtype) for k, v in sd.items()}, assign=True)
    return model


# ----- T5 text encoder -----

def _sub(folder, name):
    """A pipeline folder keeps the tokenizer and the encoder in subfolders; a plain folder holds both."""
    folder = Path(folder)
    return folder / name if (folder / name).is_dir() else folder


class TextEncoder:
    """Frozen T5 encoder from a local folder (no hub access). As released: pad every prompt to max_length
    tokens and run the encoder WITHOUT an attention mask (the padding tokens' outputs are part of the
    conditioning the DiT was trained with). The unconditional input in training is all zeros (§3)."""

    def __init__(self, folder, device="cpu", dtype=None, max_length=226):
        from transformers import T5EncoderModel, T5Tokenizer
        tok, enc = _sub(folder, "tokenizer"), _sub(folder, "text_encoder")
        # Offline only: a missing folder must not turn into a hub lookup of a repo id of that name.
        if not (enc / "config.json").is_file():
            raise FileNotFoundError(f"T5 text encoder folder {enc} not found (no config.json): pass a local folder "
                                    "holding a T5 encoder + tokenizer (a released model's root, or dit.build_tiny_t5's output)")
        if not (tok / "spiece.model").is_file() and not (tok / "tokenizer.json").is_file():
            raise FileNotFoundError(f"T5 tokenizer not found in {tok} (no spiece.model / tokenizer.json)")
        self.tok = T5Tokenizer.from_pretrained(str(tok), local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(str(enc), dtype=dtype, local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.device, self.max_length, self.dim = torch.device(device), max_length, self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts):
        """list of B prompts -> (B, max_length, dim)."""
        ids = self.tok(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                       add_special_tokens=True, return_tensors="pt").input_ids                       # (B, L)
        return self.model(ids.to(self.device))[0]                      # (B, L, dim)

    def zeros(self, n):
        """The unconditional embedding used in training (text dropped 10% of the time): all zeros."""
        return torch.zeros(n, self.max_length, self.dim, device=self.device, dtype=self.model.dtype)


def build_tiny_t5(folder, texts, d_model=64, layers=2, heads=4, d_ff=128, vocab_size=256, seed=0):
    """Write a random tiny T5 encoder and a WORD-level SentencePiece tokenizer trained on texts to folder.
    Word level because a default unigram model on a few dozen short captions collapses to single
    characters, so different captions truncate to the same tokens (DESIGN §5). extra_ids=0: no sentinels."""
    import io

    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    os.makedirs(folder, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(list(texts)), model_writer=buf, model_type="word",
                                   vocab_size=vocab_size, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, character_coverage=1.0, minloglevel=2)  # T5's ids: pad 0, </s> 1, unk 2
    with open(os.path.join(folder, "spiece.model"), "wb") as f:
        f.write(buf.getvalue())
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 226}, f)
    tok = T5Tokenizer.from_pretrained(folder)  # T5Tokenizer(vocab_file=...) builds a broken one in transformers 5
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
                   num_heads=heads, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                   is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)  # v1.1 style, like the XXL
    T5EncoderModel(cfg).save_pretrained(folder)
    return folder


# ----- CLI -----

def main():
    ap = argparse.ArgumentParser(description="CogVideoX expert transformer: parameter count and a timed step.")
    ap.add_argument("--preset", default="tiny", choices=list(DIT_PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="autocast the forward to bfloat16")
    ap.add_argument("--checkpointing", action="store_true", help="recompute blocks in backward")
    a = ap.parse_args()
    cfg = DIT_PRESETS[a.preset]
    if a.preset != "tiny" and a.device == "cpu":
        with torch.device("meta"):
            m = ExpertDiT(cfg)
        print(f"{a.preset}: {sum(p.numel() for p in m.parameters()):,} parameters (meta device, nothing allocated)")
        return
    m = ExpertDiT(cfg).to(a.device)
    m.checkpointing, m.autocast = a.checkpointing, torch.bfloat16 if a.bf16 else None
    print(f"{a.preset}: {sum(p.numel() for p in m.parameters()):,} parameters")
    x = torch.randn(a.batch, cfg.in_channels, cfg.base_frames, cfg.base_height, cfg.base_width, device=a.device)
    t = torch.randint(0, 1000, (a.batch,), device=a.device)
    text = torch.randn(a.batch, cfg.text_len, cfg.text_dim, device=a.device)
    for i in range(3):
        t0 = time.perf_counter()
        m(x, t, text).square().mean().backward()
        print(f"forward+backward {1000 * (time.perf_counter() - t0):.1f} ms (tokens per sample "
              f"{num_tokens(cfg, *x.shape[2:])})")


if __name__ == "__main__":
    main()
