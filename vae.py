"""vae.py — the 3D causal VAE of CogVideoX (paper §2.1, Fig. 2).

A video (B, 3, T, H, W) in [-1, 1] with T = 4k+1 frames is compressed 4× in time and 8× in space
(the released model) into a diagonal Gaussian over latents (B, 16, k+1, H/8, W/8). Smallest piece
first: causal 3D convolution (Fig. 2b: time padding only in front, so frame t never sees t+1..)
and GroupNorm -> resnet blocks and down/upsampling -> encoder, decoder, posterior -> CausalVAE ->
checkpoints (ours, and the released weights in diffusers' layout) -> the training losses (§2.1 "L2
loss, LPIPS perceptual loss, GAN loss from a 3D discriminator", plus the KL term of the Gaussian),
PSNR and a flicker measure -> a reconstruct CLI. The same modules run over time in three ways:
  whole sequence (default)  GroupNorm statistics over the whole clip
  stream=True               chunks of latent frames with a causal-conv cache, GroupNorm per chunk:
                            what the diffusers port (and the released code) do
  cp_group=g                context parallel (§2.1, Fig. 2b): time split across ranks, each causal
                            conv sends its last k-1 frames to the next rank, GroupNorm sums
                            all-reduced; output AND gradients equal the whole sequence
plus optional spatial tiling with blending (tile=...) for frames too large for memory.

Encoder and decoder are exactly as released: on random float32 weights every output equals
diffusers' `AutoencoderKLCogVideoX` within 1e-4 (tests/test_vae.py). Deviations from the released
code (each documented where it happens): the CP decoder all-reduces its GroupNorm sums and CP
sends halo gradients back (both: exact CP); for T ≡ 5 (mod 8) the diffusers decoder chunks yield
4·T' frames, ours always 4·(T'-1)+1 (the causal design); GAN discriminator details (the paper
gives none).
Causality, precisely: every convolution is causal, but GroupNorm statistics cover whatever is
processed together (the clip, one stream chunk, or all CP ranks). So a stream chunk never depends on
later frames, while in whole-sequence mode later frames can shift earlier outputs slightly through
the norm statistics — true of the released model too (the paper does not discuss it).

Run:
  python vae.py --reconstruct clip.mp4 --preset tiny          # smoke test with random weights (CPU)
  python vae.py --reconstruct clip.mp4 --ckpt runs/vae/vae    # our checkpoint (CausalVAE.save)
  python vae.py --reconstruct clip.mp4 --ckpt CogVideoX-2b/vae --device cuda   # released weights
  torchrun --standalone --nproc_per_node 2 tests/_vae_cp_worker.py   # CP == one process (+ memory)
  python -m pytest -q tests/test_vae.py                       # parity, causality, CP, losses

Shape legend:
  B batch · T pixel frames (4k+1) · T' latent frames (k+1) · H, W pixels · h, w latent pixels
  C channels of a feature map · L latent channels · G GroupNorm groups · n causal halo (kernel-1)
"""
import argparse
import json
import operator
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ----- config -----


@dataclass
class VAEConfig:
    channels: tuple = (128, 256, 256, 512)  # encoder level widths; the decoder mirrors them
    layers: int = 3              # resnet blocks per encoder level (the decoder: one more per level)
    latent: int = 16             # latent channels L
    groups: int = 32             # GroupNorm groups (must divide every width)
    eps: float = 1e-6            # GroupNorm eps
    time_levels: int = 2         # the first `time_levels` levels also halve time (frame 0 kept)
    scaling_factor: float = 1.15258426  # the DiT sees z * scaling_factor (latent std ≈ 1)
    stream_latents: int = 2      # stream=True: latent frames per chunk (diffusers' value)
    # CogVideoX 1.5's VAE config: the I2V image latent is z / scaling_factor instead of z *
    # scaling_factor (see image_scale). The weights are the 1.0 VAE's.
    invert_scale_latents: bool = False

    @property
    def spatial_factor(self):  # one 2× downsample after every level but the last
        return 2 ** (len(self.channels) - 1)

    @property
    def image_scale(self):
        """What the I2V image latent (App. A) is multiplied by before it joins the DiT input: the
        scaling factor, like the video latent; for a VAE with invert_scale_latents (the released
        CogVideoX1.5-5B-I2V) its inverse. The 1.5 pipeline in diffusers divides ("the CogVideoX team
        forgot to multiply the scaling factor during training"); the official code does neither
        consistently (its SAT sampler passes the raw latent, its fine-tune scripts multiply;
        CogVideo issues 570, 761, finetrainers 110, 155). We follow the diffusers pipeline, in
        sampling and in training alike (sample.generate, train.dit_loss), so a model trained here
        samples as it was trained."""
        return 1 / self.scaling_factor if self.invert_scale_latents else self.scaling_factor

    @property
    def temporal_factor(self):
        return 2 ** self.time_levels


VAE_PRESETS = {
    # For tests and toy runs: 32×32×9 clips -> 8×3×8×8 latents, ~0.65M parameters, ~0.1 s per
    # clip on a CPU. Its scaling factor is a placeholder: train.py sets it from the trained
    # latents.
    "tiny": VAEConfig(channels=(16, 32, 32), layers=1, latent=8, groups=8, scaling_factor=1.0),
    # The released VAE of CogVideoX-2B and -5B: identical weights' shapes, different scaling factor.
    "cogvideox-2b": VAEConfig(),
    "cogvideox-5b": VAEConfig(scaling_factor=0.7),
    # CogVideoX 1.5 (released vae/config.json: scaling_factor 0.7, invert_scale_latents true)
    "cogvideox1.5-5b": VAEConfig(scaling_factor=0.7, invert_scale_latents=True),
}
# The demo's VAE (train.py PRESETS["shapes"]): the tiny one with 4 latent channels. Its decoder
# takes latent errors better: squares' median fill of its reconstructions with noise 0.2 (DiT
# units) on the latents 0.90 against 0.88 with 8 channels (800 steps each; 0.89 tells a square
# from a disc), and a DiT trained on it draws squares sooner (train.py).
VAE_PRESETS["shapes"] = replace(VAE_PRESETS["tiny"], latent=4)

# ----- how a forward call sees time: whole clip, stream chunk, or a CP rank's share (§2.1) -----


@dataclass
class Run:
    first: bool = True   # this piece holds frame 0, so the frame-0 special cases apply to it
    cache: dict = None   # stream=True: each causal conv's last n input frames, keyed by the conv
    group: object = None  # context parallel process group (None = single process)


def _peer(group, rank):  # send/recv take global ranks
    return dist.get_global_rank(group, rank) if group is not None else rank


class _Halo(torch.autograd.Function):
    """§2.1 context parallel (Fig. 2b): prepend the previous rank's last n frames to x.

    The ranks form a chain 0 -> 1 -> ... : rank r receives its halo, then forwards the last n
    frames of (halo ++ x) to r+1. Chaining (instead of every rank sending its own tail at once, as
    released) keeps the result exact when a rank holds fewer than n frames (e.g. 1 latent frame per
    rank).
    Backward runs the chain in reverse and hands the halo's gradient back to where the frames came
    from; the released code drops it, which makes CP gradients differ from one process."""

    @staticmethod
    def forward(ctx, x, n, group):  # x: (B, C, T_local, H, W) -> (B, C, n + T_local, H, W)
        r, world = dist.get_rank(group), dist.get_world_size(group)
        ctx.n, ctx.group, ctx.r, ctx.world = n, group, r, world
        if r > 0:
            head = x.new_empty(*x.shape[:2], n, *x.shape[3:])  # (B, C, n, H, W)
            dist.recv(head, src=_peer(group, r - 1), group=group)
            x = torch.cat([head, x], 2)
        else:
            x = x.clone()  # rank 0 already padded itself; return a fresh tensor, not the input
        if r < world - 1:
            dist.send(x[:, :, -n:].contiguous(), dst=_peer(group, r + 1), group=group)
        return x

    @staticmethod
    def backward(ctx, g):  # g: (B, C, n + T_local, H, W)
        n, group, r = ctx.n, ctx.group, ctx.r
        g = g.contiguous().clone()
        if r < ctx.world - 1:  # the frames we sent on were used by the next rank: add their grad
            tail = torch.empty_like(g[:, :, -n:])
            dist.recv(tail, src=_peer(group, r + 1), group=group)
            g[:, :, -n:] += tail
        if r > 0:  # the halo came from the previous rank: its gradient goes back there
            dist.send(g[:, :, :n].contiguous(), dst=_peer(group, r - 1), group=group)
            g = g[:, :, n:]
        return g, None, None


class _AllReduce(torch.autograd.Function):
    """Differentiable sum over the group: the gradient of a sum is the sum of the gradients.
    (= torch.distributed.nn.functional.all_reduce, which torch 2.13 deprecates with a warning.)"""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return _AllReduce.apply(g, ctx.group), None


def cp_sizes(T, world, factor=4):
    """Frames per rank (§2.1 CP): rank 0 takes frame 0 plus an equal share of the rest, so that
    every temporal downsample pairs the same frames as in one process. factor=4 for pixel frames
    (the VAE's temporal factor), 1 for latent frames."""
    if world > 1 and T == 1:  # every other rank would hold no frame (a conv of nothing fails)
        raise ValueError(f"context parallel: 1 frame (an image) cannot be split over {world} "
                         f"ranks; encode or decode it in one process (cp_group=None)")
    if T < 1 or (T - 1) % (factor * world):
        raise ValueError(f"context parallel: {T} frames cannot be split over {world} ranks; need "
                         f"(T-1) divisible by {factor * world} (e.g. T={factor * world + 1}) — "
                         f"trim the clip or use fewer ranks")
    m = (T - 1) // world
    return [m + 1] + [m] * (world - 1)


def cp_split(x, group=None, factor=4):
    """This rank's share of a whole clip (B, C, T, H, W) -> (B, C, T_local, H, W)."""
    sizes = cp_sizes(x.shape[2], dist.get_world_size(group), factor)
    r = dist.get_rank(group)
    return x.narrow(2, sum(sizes[:r]), sizes[r])  # a view, as slicing would be


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # (B, C, T_local, H, W) -> (B, C, T, H, W) on every rank
        r, world = dist.get_rank(group), dist.get_world_size(group)
        m = x.shape[2] - (r == 0)  # frames per rank after frame 0
        # equal sizes for all_gather: (B, C, m+1, H, W)
        pad = F.pad(x, (0, 0, 0, 0, 0, int(r > 0)))
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad.contiguous(), group=group)
        ctx.group, ctx.start, ctx.size = group, 0 if r == 0 else 1 + r * m, x.shape[2]
        return torch.cat([parts[0]] + [p[:, :, :m] for p in parts[1:]], 2)

    @staticmethod
    def backward(ctx, g):  # every rank's loss may use every frame: sum, then keep our slice
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g[:, :, ctx.start:ctx.start + ctx.size], None


def cp_gather(x, group=None):
    """Inverse of cp_split (differentiable): every rank gets the whole clip. Backward sums every
    rank's gradient of the gathered clip and hands each rank its own frames' share; so when every
    rank computes the same loss on the gathered clip, averaging parameter gradients over the group
    (as DDP does) gives exactly the one-process gradient."""
    return _Gather.apply(x, group)


# ----- causal convolution and GroupNorm: where time crosses a chunk or rank boundary (§2.1) -----


def time_pad(x, n, run, key):
    """§2.1 temporally causal padding: n frames in front only, never behind.
    (B, C, T, H, W) -> (B, C, n+T, H, W)

    The first piece repeats frame 0 (released "first" pad mode; the paper's figure shows generic
    padding); a later stream chunk uses the cached last n frames of the previous chunk; a CP rank
    receives them from the previous rank."""
    if n == 0:
        return x
    if run.group is not None:
        if run.first:
            x = torch.cat([x[:, :, :1]] * n + [x], 2)  # (B, C, n+T, H, W)
        return _Halo.apply(x, n, run.group)
    head = run.cache.get(key) if run.cache is not None else None
    if head is None:
        head = x[:, :, :1].expand(-1, -1, n, -1, -1)  # (B, C, n, H, W) copies of frame 0
    x = torch.cat([head, x], 2)  # (B, C, n+T, H, W)
    if run.cache is not None:
        run.cache[key] = x[:, :, -n:].clone()  # clone: don't keep the whole chunk alive
    return x


class CausalConv3d(nn.Conv3d):
    """k×k×k conv, zero padding in space, causal padding in time (Fig. 2b). Keeps T unchanged."""

    def __init__(self, cin, cout, k=3):
        super().__init__(cin, cout, k, padding=(0, k // 2, k // 2))

    def forward(self, x, run):  # (B, Cin, T, H, W) -> (B, Cout, T, H, W)
        x = time_pad(x, self.kernel_size[0] - 1, run, self)  # (B, Cin, T+k-1, H, W)
        # the plain conv; small CPU inputs take oneDNN (same math, speed only: see the last section)
        return _onednn_conv3d(self, x) if _onednn_fits(x) else super().forward(x)


def group_norm(x, gn, run):
    """GroupNorm over (C/G, T, H, W). Under CP the statistics must cover the whole clip (§2.1):
    each rank sums x and x² per group (in float64, so the difference of the two sums stays
    accurate), one all-reduce adds the sums, activations are never gathered. The released decoder
    does not all-reduce (per-rank statistics, so its CP output depends on the rank count); we do,
    to be exact."""
    if run.group is None:
        return gn(x)  # torch's fused kernel: the same statistics, faster on one process
    B, C = x.shape[:2]
    xg = x.reshape(B, gn.num_groups, -1)  # (B, G, C/G*T*H*W)
    count = torch.full_like(xg[..., 0], xg.shape[-1], dtype=torch.float64)  # (B, G)
    # (3, B, G): per group, the sums of x and x² and the element count
    s = torch.stack([xg.sum(-1, dtype=torch.double), (xg * xg).sum(-1, dtype=torch.double), count])
    s = _AllReduce.apply(s, run.group)  # summed over ranks (and so are its gradients)
    mean = s[0] / s[2]  # (B, G)
    rstd = torch.rsqrt(s[1] / s[2] - mean * mean + gn.eps)  # (B, G)
    # fold normalisation and affine into one x * a + b per channel (cheaper than four passes)
    a = rstd.repeat_interleave(C // gn.num_groups, 1).to(x.dtype) * gn.weight  # (B, C)
    b = gn.bias - mean.repeat_interleave(C // gn.num_groups, 1).to(x.dtype) * a  # (B, C)
    shape = (B, C) + (1,) * (x.dim() - 2)
    return torch.addcmul(b.view(shape), x, a.view(shape))


# ----- building blocks: spatial norm, resnet block, down/upsampling (§2.1) -----


class SpatialNorm(nn.Module):
    """Decoder norm conditioned on the latent (released code; MoVQ-style):
    GN(f)·conv_y(z↑) + conv_b(z↑)."""

    def __init__(self, c, latent, cfg):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.groups, c, cfg.eps)
        self.conv_y = nn.Conv3d(latent, c, 1)
        self.conv_b = nn.Conv3d(latent, c, 1)

    def forward(self, f, z, run):  # f (B, C, T, H, W), z (B, L, T', h, w) -> (B, C, T, H, W)
        T, H, W = f.shape[-3:]
        if run.first and T > 1:  # latent frame 0 -> pixel frame 0 alone; the rest spread evenly
            z = torch.cat([F.interpolate(z[:, :, :1], size=(1, H, W)),
                           F.interpolate(z[:, :, 1:], size=(T - 1, H, W))], 2)  # (B, L, T, H, W)
        else:
            z = F.interpolate(z, size=(T, H, W))  # (B, L, T, H, W) nearest
        return group_norm(f, self.norm, run) * self.conv_y(z) + self.conv_b(z)


class ResBlock(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus a 1×1×1 conv shortcut when the width changes.
    latent > 0 makes the norms spatial norms (decoder)."""

    def __init__(self, cin, cout, cfg, latent=0):
        super().__init__()
        norm = lambda c: (SpatialNorm(c, latent, cfg) if latent
                          else nn.GroupNorm(cfg.groups, c, cfg.eps))
        self.norm1, self.conv1 = norm(cin), CausalConv3d(cin, cout)
        self.norm2, self.conv2 = norm(cout), CausalConv3d(cout, cout)
        self.shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else None

    def _norm(self, m, x, run, z):
        return m(x, z, run) if isinstance(m, SpatialNorm) else group_norm(x, m, run)

    def forward(self, x, run, z=None):  # (B, Cin, T, H, W) -> (B, Cout, T, H, W)
        h = self.conv1(F.silu(self._norm(self.norm1, x, run, z)), run)
        h = self.conv2(F.silu(self._norm(self.norm2, h, run, z)), run)
        return h + (x if self.shortcut is None else self.shortcut(x))


def _per_frame(conv, x):  # a 2D conv on every frame: (B, C, T, H, W) -> (B, C', T, H', W')
    y = conv(x.transpose(1, 2).flatten(0, 1))  # (B*T, C', H', W')
    return y.unflatten(0, (x.shape[0], -1)).transpose(1, 2)


class Down(nn.Module):
    """§2.1 compression step: (optionally) halve time, then a stride-2 3×3 conv per frame."""

    def __init__(self, c, time):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)
        self.time = time

    def forward(self, x, run):  # (B, C, T, H, W) -> (B, C, T/2 (+1), H/2, W/2)
        if self.time and x.shape[2] > 1:
            # frame 0 is kept as is (an image is a 1-frame video), the rest are averaged in pairs
            head, rest = (x[:, :, :1], x[:, :, 1:]) if run.first else (x[:, :, :0], x)
            x = torch.cat([head, rest.unflatten(2, (-1, 2)).mean(3)], 2)  # (B, C, 1+(T-1)/2, H, W)
        # released: pad right/bottom only, then an unpadded stride-2 conv
        x = F.pad(x, (0, 1, 0, 1))
        return _per_frame(self.conv, x)


class Up(nn.Module):
    """Decoder mirror of Down: (optionally) double time keeping frame 0 single, nearest 2× in
    space, then a 3×3 conv per frame."""

    def __init__(self, c, time):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.time = time

    def forward(self, x, run):  # (B, C, T, h, w) -> (B, C, 2T (-1), 2h, 2w)
        if self.time:
            head, rest = (x[:, :, :1], x[:, :, 1:]) if run.first else (x[:, :, :0], x)
            x = torch.cat([head, rest.repeat_interleave(2, 2)], 2)  # (B, C, 1 + 2(T-1), h, w)
        y = F.interpolate(x.transpose(1, 2).flatten(0, 1), scale_factor=2.0)  # (B*T, C, 2h, 2w)
        return self.conv(y).unflatten(0, (x.shape[0], -1)).transpose(1, 2)


class Level(nn.Module):
    """One resolution level: resnet blocks, then an optional Down/Up."""

    def __init__(self, cin, cout, n, cfg, resample=None, latent=0):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(cout if i else cin, cout, cfg, latent) for i in range(n))
        self.resample = resample

    def forward(self, x, run, z=None):
        for block in self.blocks:
            x = block(x, run, z)
        return x if self.resample is None else self.resample(x, run)


# ----- encoder, decoder, posterior (§2.1, Fig. 2a) -----


class Encoder(nn.Module):
    """§2.1 Fig. 2a: conv in, levels (with spatial and, early on, temporal downsampling), two mid
    blocks, GN + SiLU, conv to mean and logvar. No attention (the paper's 3D VAE is all conv)."""

    def __init__(self, cfg):
        super().__init__()
        ch, last = cfg.channels, len(cfg.channels) - 1
        self.conv_in = CausalConv3d(3, ch[0])
        self.down = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers, cfg,
                  Down(ch[i], i < cfg.time_levels) if i < last else None)
            for i in range(len(ch)))
        self.mid = nn.ModuleList(ResBlock(ch[-1], ch[-1], cfg) for _ in range(2))
        self.norm_out = nn.GroupNorm(cfg.groups, ch[-1], cfg.eps)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent)

    def forward(self, x, run):  # (B, 3, T, H, W) -> (B, 2L, T', h, w)
        h = self.conv_in(x, run)
        for level in self.down:
            h = level(h, run)
        for block in self.mid:
            h = block(h, run)
        return self.conv_out(F.silu(group_norm(h, self.norm_out, run)), run)


class Decoder(nn.Module):
    """Mirror of the encoder; every norm is a spatial norm conditioned on the latent z."""

    def __init__(self, cfg):
        super().__init__()
        ch, last, L = cfg.channels[::-1], len(cfg.channels) - 1, cfg.latent
        self.conv_in = CausalConv3d(L, ch[0])
        self.mid = nn.ModuleList(ResBlock(ch[0], ch[0], cfg, L) for _ in range(2))
        self.up = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers + 1, cfg,
                  Up(ch[i], i < cfg.time_levels) if i < last else None, L)
            for i in range(len(ch)))
        self.norm_out = SpatialNorm(ch[-1], L, cfg)
        self.conv_out = CausalConv3d(ch[-1], 3)

    def forward(self, z, run):  # (B, L, T', h, w) -> (B, 3, T, H, W)
        h = self.conv_in(z, run)
        for block in self.mid:
            h = block(h, run, z)
        for level in self.up:
            h = level(h, run, z)
        return self.conv_out(F.silu(self.norm_out(h, z, run)), run)


class Gaussian:
    """The posterior q(z|x) = N(mean, exp(logvar)), per latent element (the "latent space
    regularizer" of Fig. 2a)."""

    def __init__(self, mean, logvar):
        self.mean, self.logvar = mean, logvar  # (B, L, T', h, w) each

    def sample(self, generator=None, eps=None):
        """The reparameterisation z = mean + exp(logvar / 2)·eps, eps ~ N(0, I): (B, L, T', h, w).

        eps given (e.g. train.py's noise, drawn per sample): moved to the mean's device and dtype.
        Otherwise drawn from generator where the generator lives (a CPU generator cannot fill a CUDA
        tensor), then moved: the same seed gives the same latent on every device."""
        if eps is None:
            eps = self.noise(self.mean.shape, generator)
        return self.mean + torch.exp(0.5 * self.logvar) * eps.to(self.mean.device, self.mean.dtype)

    def noise(self, shape, generator=None):
        """eps ~ N(0, I) of `shape`, drawn where the generator lives (else on the mean's device)."""
        dev = generator.device if generator is not None else self.mean.device
        return torch.randn(shape, generator=generator, device=dev, dtype=self.mean.dtype)

    def kl(self):  # KL(q || N(0, I)) summed per sample: (B,)
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1 - self.logvar).flatten(1).sum(1)


def _ramp(n, overlap, ref):  # blending weights along one axis: rises over the overlap, never 0
    i = torch.arange(n, device=ref.device, dtype=ref.dtype)
    return torch.clamp(torch.minimum(i + 1, n - i) / (overlap + 1), max=1)


def _tiled(fn, x, tile, overlap, scale):
    """Run fn on overlapping spatial tiles of x and blend the outputs with linear ramps (not in the
    paper; the diffusers port tiles large frames the same way). scale = output size / input size."""
    H, W = x.shape[-2:]
    if H <= tile and W <= tile:
        return fn(x)
    starts = lambda n: [0] if n <= tile else list(range(0, n - tile, tile - overlap)) + [n - tile]
    out = weight = None
    for i in starts(H):
        for j in starts(W):
            y = fn(x[..., i:i + tile, j:j + tile])  # (B, C', T', th, tw)
            if out is None:
                out = y.new_zeros(*y.shape[:3], int(H * scale), int(W * scale))
                weight = y.new_zeros(out.shape[-2:])
            o = int(overlap * scale)
            w = _ramp(y.shape[-2], o, y)[:, None] * _ramp(y.shape[-1], o, y)[None]  # (th, tw)
            oi, oj, th, tw = int(i * scale), int(j * scale), y.shape[-2], y.shape[-1]
            out[..., oi:oi + th, oj:oj + tw] += y * w
            weight[oi:oi + th, oj:oj + tw] += w
    return out / weight


# ----- the whole VAE (§2.1) -----


class CausalVAE(nn.Module):
    """§2.1 3D causal VAE. encode(x) -> Gaussian (UNSCALED; the DiT sees z * cfg.scaling_factor),
    decode(z) -> x. Keyword options (tile combines with either of the others; cp_group wins over
    stream):
      stream=True   chunks of cfg.stream_latents latent frames with a causal cache (= diffusers);
                    stream=n chunks of n latent frames (less memory, shorter GroupNorm windows)
      cp_group=g    context parallel: x / z is this rank's share (cp_split), output is too
      tile=N        spatial tiles of N pixels (encode) / N latent pixels (decode), blended over
                    `overlap`
    """

    def __init__(self, cfg):
        super().__init__()
        # groups < 1 first: 0 would divide by zero here, and a negative count divides every width
        if (not 0 <= cfg.time_levels < len(cfg.channels) or cfg.groups < 1
                or any(c % cfg.groups for c in cfg.channels)):
            raise ValueError(f"bad VAEConfig {cfg}: need time_levels < number of levels and groups "
                             f"(>= 1) dividing every width")
        # a copy: train.py may set cfg.scaling_factor without touching the preset
        self.cfg = cfg = replace(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _check(self, x, encoding, group, tile, overlap):
        cfg, what = self.cfg, "encode" if encoding else "decode"
        want = 3 if encoding else cfg.latent
        if x.dim() != 5 or x.shape[1] != want:
            raise ValueError(f"{what}: expected (B, {want}, T, H, W), got {tuple(x.shape)}")
        T, tf, sf = x.shape[2], cfg.temporal_factor, cfg.spatial_factor
        if encoding and (x.shape[-1] % sf or x.shape[-2] % sf):
            raise ValueError(f"encode: H and W must be multiples of {sf} (the spatial factor), got "
                             f"{tuple(x.shape[-2:])} — resize or crop the frames")
        first = group is None or dist.get_rank(group) == 0
        if encoding and (T - first) % tf:
            raise ValueError(f"encode: got {T} frames; the causal VAE needs T = {tf}k+1 (e.g. "
                             f"{tf + 1}, {2 * tf + 1}) — trim or pad the clip" if first else
                             f"encode: context-parallel rank holds {T} frames, need a multiple of "
                             f"{tf}; split the clip with cp_split")
        if tile and not (tile > 0 and 0 <= overlap < tile):  # else tiles vanish: 0/0 blends
            raise ValueError(f"{what}: tile={tile}, overlap={overlap}: need tile > 0 and "
                             f"0 <= overlap < tile")
        if tile and encoding and (tile % sf or overlap % sf):
            raise ValueError(f"encode: tile and overlap must be multiples of {sf}, got "
                             f"{tile}, {overlap}")

    def _chunk(self, stream):
        """encode / decode's stream= -> latent frames per chunk, 0 for the whole clip at once
        (False, None or 0: data.EncodePlan's "no streaming"). A negative or fractional count,
        or a string, is one ValueError (-1 ran chunks of -1 frames, 2.5 was cut to 2)."""
        if stream is True:
            return self.cfg.stream_latents
        if stream is None or stream is False:
            return 0
        try:
            n = operator.index(stream)  # a whole number (numpy's too), not 2.5 or "2"
        except TypeError:
            n = -1
        if n < 0:
            raise ValueError(f"stream={stream!r}: pass True (chunks of cfg.stream_latents = "
                             f"{self.cfg.stream_latents} latent frames), a whole number n >= 1 "
                             f"of latent frames per chunk, or False (the whole clip at once)")
        return n

    def _run(self, net, x, group, stream, chunk):
        if group is not None:  # this rank's share of the clip; frame 0 lives on rank 0
            return net(x, Run(first=dist.get_rank(group) == 0, group=group))
        if not stream:
            return net(x, Run())
        # stream: the first chunk takes the remainder (T mod chunk) so every later chunk is full,
        # exactly as the diffusers port does; GroupNorm statistics are per chunk in this mode
        T, cache = x.shape[2], {}
        n0 = chunk + T % chunk if T >= chunk else T
        outs = [net(x[:, :, :n0], Run(first=True, cache=cache))]
        for s in range(n0, T, chunk):
            outs.append(net(x[:, :, s:s + chunk], Run(first=False, cache=cache)))
        return torch.cat(outs, 2)  # (B, C', T_out, H', W')

    def encode(self, x, cp_group=None, stream=False, tile=None, overlap=None):
        """x (B, 3, T, H, W) in [-1, 1] -> Gaussian over (B, L, T', h, w)."""
        sf = self.cfg.spatial_factor
        overlap = overlap if overlap is not None else (tile or 0) // 4 // sf * sf
        self._check(x, True, cp_group, tile, overlap)
        n = self._chunk(stream)
        fn = lambda v: self._run(self.encoder, v, cp_group, n, n * self.cfg.temporal_factor)
        h = _tiled(fn, x, tile, overlap, 1 / sf) if tile else fn(x)  # (B, 2L, T', h, w)
        mean, logvar = h.chunk(2, 1)
        return Gaussian(mean, logvar.clamp(-30.0, 20.0))  # released clamp keeps exp(logvar) finite

    def decode(self, z, cp_group=None, stream=False, tile=None, overlap=None):
        """z (B, L, T', h, w) UNSCALED (divide DiT latents by scaling_factor first)
        -> (B, 3, T, H, W)."""
        overlap = overlap if overlap is not None else (tile or 0) // 4
        self._check(z, False, cp_group, tile, overlap)
        n = self._chunk(stream)
        fn = lambda v: self._run(self.decoder, v, cp_group, n, n)
        return _tiled(fn, z, tile, overlap, self.cfg.spatial_factor) if tile else fn(z)

    def forward(self, x, cp_group=None, sample=True, generator=None, eps=None):
        """Autoencode (what VAE training calls, e.g. through DDP): -> (reconstruction, posterior).
        z = posterior.sample(generator, eps) (under CP, eps is this rank's share), or its mean.
        Under CP without eps, the whole clip's noise is drawn (same generator or seed on every
        rank) and each rank takes its share: the same z as one process. (A draw of the rank's own
        shape would repeat rank 0's first noise frames on the other ranks.)"""
        post = self.encode(x, cp_group=cp_group)
        if sample and eps is None and cp_group is not None:
            r, world = dist.get_rank(cp_group), dist.get_world_size(cp_group)
            B, L, t, h, w = post.mean.shape
            T = (t - (r == 0)) * world + 1  # latent frames of the whole clip (cp_sizes)
            eps = cp_split(post.noise((B, L, T, h, w), generator), cp_group, factor=1)
        z = post.sample(generator, eps) if sample else post.mean
        return self.decode(z, cp_group=cp_group), post

    # ----- checkpoints: ours, and the released weights in diffusers' layout -----

    def save(self, folder, state_dict=None):
        """config.json, then model.safetensors, each written to a temp file then renamed (atomic).
        state_dict (e.g. a gathered FSDP or EMA state) replaces self.state_dict() when given.

        The config goes first: a crash between the two renames leaves the new config with the old
        weights (load() then fails loudly if the shapes differ), never new weights under an old
        config (e.g. a stale scaling_factor that would load silently)."""
        from safetensors.torch import save_file

        from data import atomic_write  # imported here: vae.py stays importable without data.py
        os.makedirs(folder, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu()
              for k, v in (state_dict or self.state_dict()).items()}
        text = json.dumps(asdict(self.cfg), indent=2)
        atomic_write(os.path.join(folder, "config.json"), lambda p: Path(p).write_text(text))
        atomic_write(os.path.join(folder, "model.safetensors"), lambda p: save_file(sd, p))

    @classmethod
    def load(cls, folder, device="cpu"):
        model = cls(load_config(folder))
        _load_state(model, _read_safetensors(folder, stem="model"), folder)
        return model.to(device)

    @classmethod
    def load_folder(cls, folder, device="cpu"):
        """Our checkpoint (load) or a released vae/ folder (from_diffusers), by its config.json: a
        DiT trained on a released VAE keeps that folder as it is in its export."""
        diffusers = "_class_name" in _read_config(folder, FOLDER_KINDS)
        return (cls.from_diffusers if diffusers else cls.load)(folder, device=device)

    @classmethod
    def from_diffusers(cls, folder, variant=None, device="cpu"):
        """Load a diffusers AutoencoderKLCogVideoX folder (released CogVideoX `vae/`): config.json +
        diffusion_pytorch_model[.variant].safetensors, or shards listed in
        *.safetensors.index*.json. Weights are cast to float32 (fp16/bf16 files are fine)."""
        cfg = diffusers_folder_config(folder)
        sd = {_diffusers_key(k): v.float() for k, v in _read_safetensors(folder, variant).items()}
        model = cls(cfg)
        _load_state(model, sd, folder)
        return model.to(device)


def load_config(folder):
    """Our checkpoint folder's VAEConfig, from its config.json alone (no weights read)."""
    import data  # imported here: vae.py stays importable without data.py
    d = _read_config(folder, "CausalVAE.save")
    unknown = set(d) - set(VAEConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{folder}/config.json has unknown VAEConfig fields {sorted(unknown)}"
                         f"; for a diffusers folder use CausalVAE.from_diffusers")
    return data.config_from(VAEConfig, d, os.path.join(folder, "config.json"))


FOLDER_KINDS = "CausalVAE.save or diffusers save_pretrained"  # what a VAE folder may hold


def folder_config(folder):
    """The VAEConfig of our checkpoint folder or of a released vae/ folder (load_folder's
    counterpart), from its config.json alone."""
    diffusers = "_class_name" in _read_config(folder, FOLDER_KINDS)
    return (diffusers_folder_config if diffusers else load_config)(folder)


def diffusers_folder_config(folder):
    """A diffusers AutoencoderKLCogVideoX folder's VAEConfig, from its config.json alone; refuses
    another model's folder and what this file does not implement."""
    d = _read_config(folder, "a diffusers AutoencoderKLCogVideoX save_pretrained")
    if d.get("_class_name") != "AutoencoderKLCogVideoX":  # e.g. the transformer/ next to vae/
        raise ValueError(f"{folder}: config.json describes "
                         f"{d.get('_class_name', 'no diffusers model')!r}, not "
                         f"'AutoencoderKLCogVideoX'; pass the released model's vae/ folder "
                         f"(our own checkpoints load with CausalVAE.load)")
    if d.get("use_quant_conv") or d.get("use_post_quant_conv"):
        raise ValueError(f"{folder}: quant convs are not in CogVideoX's VAE; not supported")
    return diffusers_config(d, os.path.join(folder, "config.json"))


def diffusers_config(d, path="config.json"):
    """A diffusers AutoencoderKLCogVideoX config.json (as a dict) -> VAEConfig."""
    import data  # imported here: vae.py stays importable without data.py
    ratio = data.temporal_ratio(d, path)
    # null: diffusers' default; any other value goes to config_from as it is (bool() took "false"
    # as true)
    inv = d.get("invert_scale_latents")
    return data.config_from(VAEConfig, dict(
        channels=d.get("block_out_channels", (128, 256, 256, 512)),
        layers=d.get("layers_per_block", 3), latent=d.get("latent_channels", 16),
        groups=d.get("norm_num_groups", 32), eps=d.get("norm_eps", 1e-6),
        time_levels=ratio.bit_length() - 1, scaling_factor=d.get("scaling_factor", 1.15258426),
        invert_scale_latents=False if inv is None else inv), path)


def _read_config(folder, what):
    """folder/config.json as a dict, or a one-line error naming what the folder should be."""
    import data  # imported here: vae.py stays importable without data.py
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        why = "does not exist" if not os.path.isdir(folder) else "has no config.json"
        raise FileNotFoundError(f"VAE folder {folder} {why}: pass a folder written by {what}")
    return data.json_object(path)


def _diffusers_key(k):
    """diffusers name -> ours, e.g.
    encoder.down_blocks.0.resnets.1.conv1.conv.weight -> encoder.down.0.blocks.1.conv1.weight"""
    k = k.replace("mid_block.resnets.", "mid.").replace("down_blocks.", "down.")
    k = k.replace("up_blocks.", "up.").replace("resnets.", "blocks.")
    k = k.replace("downsamplers.0.", "resample.").replace("upsamplers.0.", "resample.")
    k = k.replace("norm_layer.", "norm.").replace("conv_shortcut.", "shortcut.")
    # the causal-conv wrapper
    return re.sub(r"(conv_in|conv_out|conv1|conv2|conv_y|conv_b)\.conv\.", r"\1.", k)


def _read_safetensors(folder, variant=None, stem="diffusion_pytorch_model"):
    """All tensors of a model folder: {stem}[.variant].safetensors, or the shards its index json
    lists. The one safetensors reader of this file (dit.py keeps its own so each model file stands
    alone)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file as read

    def load_file(path):  # a truncated or corrupt file: one line naming it, not a traceback
        try:
            return read(path)
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e}); copy or export it "
                             "again") from None
    names = os.listdir(folder)
    v = f".{variant}" if variant else ""
    single, index = f"{stem}{v}.safetensors", f"{stem}.safetensors.index{v}.json"
    if variant is None and single not in names and index not in names:  # only a variant: use it
        pattern = rf"{stem}\.(\w+)\.safetensors|{stem}\.safetensors\.index\.(\w+)\.json"
        found = sorted(n for n in names if re.fullmatch(pattern, n))
        if len(found) == 1:
            single = index = found[0]
    if single in names and single.endswith(".safetensors"):
        return load_file(os.path.join(folder, single))
    if index in names:
        import data  # imported here: vae.py stays importable without data.py
        sd = {}
        for s in data.index_shards(os.path.join(folder, index)):
            sd.update(load_file(os.path.join(folder, s)))
        return sd
    raise FileNotFoundError(f"{folder}: no {single} or {index} (files: {sorted(names)[:8]}); "
                            f"pass variant='fp16' for variant files")


def _load_state(model, sd, source):
    """Strict load with an error that lists what does not fit."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        show = lambda l: f"{len(l)} {l[:12]}{' ...' if len(l) > 12 else ''}"
        raise ValueError(f"{source}: weights do not match the model config: missing "
                         f"{show(missing)}; unexpected {show(unexpected)}; "
                         f"wrong shape {show(shapes)}")
    model.load_state_dict(sd)


# ----- losses (§2.1) -----
# "a weighted combination of the L2 loss, LPIPS perceptual loss, and GAN loss from a 3D
# discriminator", plus the KL term of the Gaussian; short clips first, then long clips with CP.

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class _Lin(nn.Module):  # LPIPS' learned per-channel weights (named as the file's linK.model.1.*)
    def __init__(self, c):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) on a VGG16 backbone. Parameter names follow torchvision's
    vgg16.features (`features.N.weight`) and the LPIPS linear layers (`linK.model.1.weight`), so the
    public files load: torchvision's vgg16-*.pth + LPIPS' vgg.pth, or one full LPIPS state dict
    (`net.sliceK.N.*`). Built only from such files (load_lpips): random weights are not LPIPS."""

    TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features
    MIN_SIZE = 16  # VGG's 4 max-pools before relu5_3 leave 1 pixel of a 16-pixel side, 0 of 15

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in _VGG16:
            layers += [nn.MaxPool2d(2, 2)] if v == "M" else [nn.Conv2d(c, v, 3, padding=1),
                                                             nn.ReLU()]
            c = c if v == "M" else v
        self.features = nn.Sequential(*layers)
        for i, c in enumerate((64, 128, 256, 512, 512)):
            setattr(self, f"lin{i}", _Lin(c))
        # LPIPS' input scaling (ImageNet statistics expressed for [-1, 1] inputs)
        for name, v in (("shift", [-0.030, -0.088, -0.188]), ("scale", [0.458, 0.448, 0.450])):
            self.register_buffer(name, torch.tensor(v).view(1, 3, 1, 1), persistent=False)

    def forward(self, x, y):  # (N, 3, H, W) twice, in [-1, 1] -> (N,) perceptual distance
        h = (torch.cat([x, y]) - self.shift) / self.scale  # (2N, 3, H, W)
        d, k = 0, 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.TAPS:
                f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
                fx, fy = f.chunk(2)
                d = d + getattr(self, f"lin{k}").model((fx - fy).pow(2)).mean([1, 2, 3])  # (N,)
                k += 1
        return d


def load_lpips(paths=None):
    """LPIPS from local weight file(s) (.safetensors or .pth/.pt, comma-separated), frozen; None
    (and a log line saying the perceptual term is off) when no file is given."""
    if not paths:
        print("vae: perceptual (LPIPS) loss disabled: no VGG16/LPIPS weight file given")
        return None
    from safetensors.torch import load_file
    sd = {}
    for p in (paths.split(",") if isinstance(paths, str) else paths):
        sd.update(load_file(p) if p.endswith(".safetensors")
                  else torch.load(p, map_location="cpu", weights_only=True))
    # the VGG head and LPIPS' constants are unused
    sd = {re.sub(r"^(net\.)?slice\d\.", "features.", k): v for k, v in sd.items()
          if not k.startswith(("classifier.", "scaling_layer."))}
    net = LPIPS()
    _load_state(net, {k: v.float() for k, v in sd.items()}, f"LPIPS weights {paths}")
    print(f"vae: perceptual (LPIPS) loss on, weights from {paths}")
    return net.eval().requires_grad_(False)


class Discriminator3D(nn.Module):
    """3D PatchGAN: strided 3D convs give one real/fake logit per space-time patch (§2.1 "GAN loss
    from a 3D discriminator"). The LDM / CogVideo discriminators use BatchNorm; we use GroupNorm
    (batches are tiny and it needs no synchronisation under DDP)."""

    K = (3, 4, 4)  # time kernel 3 (padding 1) so 1-frame images pass too; 4x4 in space

    def __init__(self, ch=64, layers=3):
        super().__init__()
        k, c = self.K, ch
        seq = [nn.Conv3d(3, ch, k, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, layers):
            c2 = ch * min(2 ** i, 8)
            seq += [nn.Conv3d(c, c2, k, 2, 1, bias=False), nn.GroupNorm(8, c2), nn.LeakyReLU(0.2)]
            c = c2
        seq += [nn.Conv3d(c, 1, k, 1, 1)]
        self.net = nn.Sequential(*seq)
        for m in self.modules():  # pix2pix / taming init: N(0, 0.02) convs
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):  # (B, 3, T, H, W) -> (B, 1, t, h, w) logits
        return self.net(x)

    @classmethod
    def min_size(cls, layers=3):
        """The smallest frame side (pixels) that leaves one logit: `layers` stride-2 convs, then
        the stride-1 one (16 for 3 layers; a smaller frame fails inside conv3d)."""
        k = cls.K[1]
        n = 1
        while True:
            m = n
            for _ in range(layers):
                m = (m + 2 - k) // 2 + 1  # stride 2, padding 1
            if m + 2 - k + 1 >= 1:
                return n
            n += 1


def adaptive_weight(nll, gan, last_layer, group=None):
    """Taming-transformers' balance: scale the GAN term so its gradient at the decoder's last layer
    is as large as the reconstruction's (clamped; a constant for the backward). group: the context
    parallel group, whose every rank computed nll and gan on the gathered clip (cp_gather): each
    holds its own frames' part of the last layer's gradient, so the parts are summed (the gather's
    factor of the group size cancels in the ratio) and the weight equals one process's."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, last_layer, retain_graph=True)[0]
    if group is not None:
        g = torch.stack([g_nll, g_gan])  # (2, *last_layer.shape)
        dist.all_reduce(g, group=group)
        g_nll, g_gan = g
    return (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def generator_loss(x, x_rec, posterior, step=0, *, recon="l2", kl_weight=1e-6, lpips=None,
                   perceptual_weight=1.0, disc=None, disc_weight=0.5, disc_start=0, last_layer=None,
                   group=None):
    """VAE (generator) loss -> (loss, parts). x, x_rec (B, 3, T, H, W); posterior = encode(x).

    recon "l2" (§2.1) or "l1". Measured on the tiny VAE: with L1 it kept reconstructing black
    frames (0/24 clips kept their colour after 250 steps at batch 8), with L2 every clip kept its
    colour after 200. kl is the per-sample KL sum divided by the pixel count, so kl_weight means
    what it does in LDM. The GAN term (hinge: -D(x_rec)) is 0 before disc_start; with last_layer
    (the decoder's conv_out.weight) its weight is adaptive; under context parallel pass the group
    (x, x_rec and posterior then gathered by cp_gather). parts are graph-connected tensors (call
    float() to log)."""
    if recon not in ("l1", "l2"):
        raise ValueError(f"recon must be 'l1' or 'l2', got {recon!r}")
    diff = x_rec - x
    rec = diff.abs().mean() if recon == "l1" else diff.pow(2).mean()
    per = zero = rec.new_zeros(())
    if lpips is not None:  # per frame: (B*T, 3, H, W)
        frames = lambda v: v.transpose(1, 2).flatten(0, 1)
        per = lpips(frames(x), frames(x_rec)).mean()
    nll = rec + perceptual_weight * per
    kl = posterior.kl().sum() / x.numel()
    gan, w = zero, zero
    if disc is not None and step >= disc_start:
        gan = -disc(x_rec).mean()
        if last_layer is not None and torch.is_grad_enabled():
            w = disc_weight * adaptive_weight(nll, gan, last_layer, group)
        else:
            w = zero + disc_weight
    loss = nll + kl_weight * kl + w * gan
    return loss, {"loss": loss, "recon": rec, "perceptual": per, "kl": kl, "gan": gan,
                  "gan_weight": w}


def discriminator_loss(disc, x, x_rec, step=0, disc_start=0):
    """Hinge loss of the 3D discriminator -> (loss, parts); graph-connected 0 before disc_start."""
    if step < disc_start:
        zero = sum(p.sum() for p in disc.parameters()) * 0.0
        return zero, {"disc": zero, "logits_real": zero.detach(), "logits_fake": zero.detach()}
    real, fake = disc(x.detach()), disc(x_rec.detach())
    loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return loss, {"disc": loss, "logits_real": real.mean().detach(),
                  "logits_fake": fake.mean().detach()}


# ----- reconstruction metrics (§2.1) -----
# The paper reports PSNR 29.1 and flickering 85.5 for its VAE on WebVid clips of 17×256×256.


def psnr(x, y):
    """PSNR in dB of y against x, both in [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = (x.float() - y.float()).pow(2).mean().clamp_min(1e-12)
    return float(10 * torch.log10(4.0 / mse))


def flicker(x, y):
    """How much more (or less) y changes between consecutive frames than x does: mean over pixels of
    | |y_t - y_t-1| - |x_t - x_t-1| |, in 8-bit pixel units (the paper does not define its metric
    exactly; lower is better, 0 for a perfect reconstruction)."""
    if x.shape[2] < 2:
        raise ValueError("flicker needs at least 2 frames")
    dx = (x[:, :, 1:] - x[:, :, :-1]).abs().float()
    dy = (y[:, :, 1:] - y[:, :, :-1]).abs().float()
    return float((dy - dx).abs().mean() * 127.5)


# ----- CLI: reconstruct a video file -----


def main(argv=None):
    p = argparse.ArgumentParser(
        description="CogVideoX 3D causal VAE: reconstruct a video, print PSNR and flicker.")
    p.add_argument("--reconstruct", metavar="VIDEO", required=True,
                   help="input video; writes --out (default VIDEO_STEM.recon.mp4 next to it)")
    p.add_argument("--out", help="the reconstruction's path (.mp4 or .mkv, lossless)")
    p.add_argument("--ckpt",
                   help="a CausalVAE.save folder, or a diffusers AutoencoderKLCogVideoX one")
    p.add_argument("--preset", choices=sorted(VAE_PRESETS),
                   help="random-weight model when --ckpt is not given (default: tiny; "
                        "refused with --ckpt, whose config decides)")
    p.add_argument("--frames", type=int, default=49,
                   help="at most this many frames (trimmed to 4k+1, or the VAE's tk+1)")
    p.add_argument("--tile", type=int, default=None,
                   help="spatial tile in pixels, a multiple of the spatial factor (large frames)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.frames < 1:
        p.error(f"--frames must be >= 1, got {a.frames}")
    if a.ckpt and a.preset:  # the checkpoint's config decides: the preset was ignored
        p.error("--preset picks a random-weight model; --ckpt has its own: drop one")
    a.preset = a.preset or "tiny"
    import data  # the one home of video I/O; imported here so vae.py stays importable alone
    out = a.out or os.path.splitext(a.reconstruct)[0] + ".recon.mp4"
    # bad input is a one-line error (exit code 2), never a traceback
    try:
        if not out.lower().endswith((".mp4", ".mkv")):
            raise ValueError(f"--out {out}: write a .mp4 or .mkv path")
        data.check_not_input([out], {a.reconstruct: "--reconstruct"})
        data.check_writable(out, "--out")  # before the work, not after it
        data.check_device(a.device)
        if a.ckpt:
            vae = CausalVAE.load_folder(a.ckpt)
        else:
            print(f"no --ckpt: random {a.preset} weights (a smoke test, not a reconstruction)")
            vae = CausalVAE(VAE_PRESETS[a.preset])
        sf = vae.cfg.spatial_factor
        if a.tile is not None and (a.tile <= 0 or a.tile % sf):
            raise ValueError(f"--tile must be a positive multiple of the spatial factor {sf}, got "
                             f"{a.tile}")
        if not os.path.isfile(a.reconstruct):
            raise ValueError(f"{a.reconstruct}: " + ("a folder; pass one video file" if
                                                     os.path.isdir(a.reconstruct) else
                                                     "no such file"))
        try:  # native size, turned upright; at most --frames frames, trimmed to 4k+1
            x = data.load_video(a.reconstruct, (a.frames - 1) // 4 * 4 + 1)  # (3, T, H, W)
            fps = data.probe(a.reconstruct)["fps"] or 8
        except data.BadVideo as e:
            raise ValueError(f"{a.reconstruct}: cannot decode ({e})") from None
        tf = vae.cfg.temporal_factor  # a VAE compressing time 8x needs 8k+1 frames, not 4k+1
        x = x[:, :(x.shape[1] - 1) // tf * tf + 1]  # (3, T, H, W), T = tk+1
    except (OSError, ValueError) as e:
        p.error(str(e))
    vae = vae.to(a.device).eval()
    H, W = x.shape[-2] // sf * sf, x.shape[-1] // sf * sf  # crop to whole latent pixels
    if H == 0 or W == 0:
        p.error(f"{a.reconstruct}: frames of {tuple(x.shape[-2:])} pixels are smaller than the "
                f"spatial factor {sf}")
    if (H, W) != tuple(x.shape[-2:]):
        print(f"note: {x.shape[-2]}x{x.shape[-1]} cropped to {H}x{W} (the top-left corner, a "
              f"multiple of the spatial factor {sf}); the reconstruction has that size")
    x = x[:, :, :H, :W][None].to(a.device)  # (1, 3, T, H, W)
    with torch.no_grad():
        z = vae.encode(x, stream=True, tile=a.tile).mean
        y = vae.decode(z, stream=True, tile=a.tile // sf if a.tile else None).clamp(-1, 1)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    data.write_video(y[0], out, fps)  # fps kept exact (12.5 stays 12.5, 29.97 is 30000/1001)
    print(f"{tuple(x.shape)} -> latents {tuple(z.shape)} -> {out} ({fps:g} fps)")
    print(f"psnr {psnr(x, y):.2f} dB"
          + (f" | flicker {flicker(x, y):.2f}" if x.shape[2] > 1 else ""))


# ----- speed (not in the paper) -----


ONEDNN = True  # the CPU fast path below; train.py's step simulator (a GPU run) turns it off


def _onednn_fits(x):
    """Would PyTorch send this time-padded CausalConv3d input (B, C, T, H, W) to its slow generic
    kernel? It picks the backend from the input's sizes (Convolution.cpp, ConvParams::use_mkldnn):
    a CPU fp32 input of ONE clip with C*T*H <= 20480, e.g. one context-parallel rank's slice or
    a stream chunk, does not go to oneDNN. A batch of two or more clips does, forward and
    backward, and its plain backward is ~2x faster than the one below (the VAE's training step
    on the demo's batches of 2: 64 against 114 ms of convolution backward)."""
    B, C, T, H = x.shape[:4]
    return (ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and B == 1 and C * T * H <= 20480)


def _onednn_conv3d(conv, x):  # conv(x) on oneDNN: (B, Cin, T+k-1, H, W) -> (B, Cout, T, H, W)
    return _OneDNNConv3d.apply(x, conv.weight, conv.bias, conv.padding)


class _OneDNNConv3d(torch.autograd.Function):
    """Speed and memory only, same math (to float rounding): a CPU fp32 stride-1 3D conv whose
    forward AND backward run on oneDNN. The generic kernel that _onednn_fits detects is 3-10x slower
    and its backward unfolds the input into a C*27-times larger column buffer (over 100 MB for one
    64x64 decoder layer). The forward calls oneDNN directly; the backward sees (B, C, T, H, W) as
    (B, C, W, H, T) -- the same convolution with the kernel's axes swapped -- which PyTorch's size
    rule then sends to oneDNN as well."""

    @staticmethod
    def forward(ctx, x, w, b, padding):  # x (B, Cin, T+k-1, H, W) already time-padded
        ctx.save_for_backward(x, w)
        ctx.padding = padding
        # -> (B, Cout, T, H, W)
        return torch.mkldnn_convolution(x, w, b, padding, (1, 1, 1), (1, 1, 1), 1)

    @staticmethod
    def backward(ctx, g):  # g (B, Cout, T, H, W)
        x, w = ctx.saved_tensors
        # (.., T, H, W) <-> (.., W, H, T), a view
        t = lambda v: v.transpose(2, 4) if v is not None else None
        gx, gw, gb = torch.ops.aten.convolution_backward(
            t(g), t(x), t(w), [w.shape[0]], [1, 1, 1], list(ctx.padding[::-1]), [1, 1, 1], False,
            [0, 0, 0], 1, list(ctx.needs_input_grad[:3]))
        return t(gx), t(gw), gb, None


if __name__ == "__main__":
    main()
