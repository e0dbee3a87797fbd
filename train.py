"""train.py — one training loop for the CogVideoX 3D causal VAE and the expert DiT (paper §2.1, §3, §3.1-§3.3, App. A).

One flat loop, the same code on a laptop CPU and under torchrun on many GPUs:
  §2.1  VAE: reconstruction + KL (+ LPIPS from a local file) + a 3D discriminator with its own optimizer and
        start step; the long-clip stage runs context parallel (--cp N: N ranks share one clip)
  §3    DiT: v-prediction MSE, zero-terminal-SNR schedule, text dropped to zeros 10% of the time,
        images mixed in as 1-frame videos
  §3.1  Frame Pack: clips of different durations share token rows (dit.forward_packed + data.FramePackSampler);
        --bucket gives the released code's simple mode (one shape per batch, short clips padded)
  §3.2  progressive stages from the preset (low res -> high res -> best 20%), weights carried over, RoPE extrapolates
  §3.3  explicit uniform timesteps over the global batch (--iid-timesteps for the ablation)
  App. A --i2v: the first frame's latent is concatenated along channels, with noise added to it

Run:
  python train.py                                          # the shapes demo (DESIGN §5): data, VAE, DiT, sample, score
  python train.py --quick --out /tmp/shapes                # the same pipeline in a few steps (a smoke test)
  python train.py --stage vae --preset tiny --data shapes/manifest.jsonl --out runs/vae
  python train.py --stage dit --preset tiny --data shapes/manifest.jsonl --vae runs/vae/vae \\
                  --text-encoder out/shapes/t5 --cache runs/cache --out runs/dit     # (the demo builds that tiny T5)
  python sample.py --ckpt runs/dit --prompt "a red circle moves to the left" --out red.mp4
  torchrun --standalone --nproc_per_node 2 train.py --stage dit ...          # DDP (gloo on CPU, nccl on GPU)
  torchrun --nnodes 8 --nproc_per_node 8 ... train.py --stage dit --preset cogvideox-5b --fsdp --grad-checkpoint ...
  torchrun --standalone --nproc_per_node 4 train.py --stage vae --cp 2 ...   # 2 CP groups of 2 ranks
  python train.py ... --resume                             # continue from --out's latest checkpoint, exactly
  python -m pytest -q tests/test_train.py

Reading one DiT step, top to bottom: `batches` + `Prepared` (data.py sampler keys -> cached posterior + T5 text) ->
`draws` (timesteps / noise / dropout for the GLOBAL batch, each rank takes its slots) -> `dit_loss`
(q_sample, v target, forward_packed, per-sample MSE) -> weighted sum -> backward (DDP/FSDP average) ->
clip -> AdamW -> EMA -> log line + JSONL -> checkpoint.

Shape legend:
  S samples on this rank   N samples in the global batch (all ranks)   C latent channels
  T pixel frames (4k+1)   T' = (T-1)/4+1 latent frames   H, W pixels   h, w latent grid   L text tokens   D text width
"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

import data
import diffusion
import dit
import vae


# ----- config -----

@dataclass
class TrainConfig:
    vae: str = "tiny"                 # vae.VAE_PRESETS key
    dit: str = "tiny"                 # dit.DIT_PRESETS key
    vae_stages: list = field(default_factory=lambda: [data.Stage([(32, 32)], [1, 9])])
    vae_steps: list = field(default_factory=lambda: [1000])
    dit_stages: list = field(default_factory=lambda: list(data.STAGES["shapes"]))  # §3.2 progressive
    dit_steps: list = field(default_factory=lambda: [500, 500])
    max_tokens: object = 0            # Frame Pack row length (an int, or a list: one per stage); 0 = the largest sample
    rows: int = 8                     # Frame Pack rows per rank and micro-batch
    batch: int = 4                    # samples per rank (VAE, and the DiT's bucket mode)
    drop_last: bool = False           # skip each epoch's partial batches (data samplers' drop_last)
    accum: int = 1                    # micro-batches per optimizer step
    lr: float = 1e-4                  # not given in the paper; a usual DiT value
    warmup: int = 100
    min_lr: float = 0.1               # cosine floor, as a fraction of lr
    weight_decay: float = 1e-4
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    clip: float = 1.0
    ema: float = 0.0                  # EMA decay (0 = off)
    text_drop: float = 0.1            # §3: text -> zeros, the unconditional input of classifier-free guidance
    snr_shift: float = 1.0            # released 2B: 3.0, 5B: 1.0
    i2v_noise: tuple = (-3.0, 0.5)    # App. A: log-sigma ~ N(mean, std) of the noise on the image condition (released)
    vae_lr: float = 1e-4
    disc_lr: float = 1e-4
    disc_start: int = 1000            # steps of plain reconstruction before the GAN term (§2.1)
    disc_ch: int = 64
    disc_weight: float = 0.5
    kl_weight: float = 1e-6
    recon: str = "l2"                 # §2.1 L2 ("l1" is the option DESIGN §5's prototype used)
    fit_scale: bool = True            # after VAE training set scaling_factor = 1/std(latents) (LDM practice)
    save_every: int = 500
    keep: int = 2                     # checkpoints kept
    seed: int = 0


S = data.Stage
PRESETS = {
    # Seconds on a CPU, for tests: both stages of the shapes schedule, a few steps each.
    "tiny": TrainConfig(vae_stages=[S([(16, 16)], [1, 5, 9])], vae_steps=[4], dit_steps=[3, 3], rows=2, batch=2,
                        lr=1e-3, warmup=2, disc_start=2, disc_ch=8, save_every=0),
    # The shapes demo (DESIGN §5). Stage one of the DiT at 16 px, stage two at 32 px (the sampling size).
    # The VAE sees 5-frame clips (one temporal compression step each way) and stills: the cheapest data that
    # trains every part of it; the DiT then encodes longer clips with it (the causal VAE is length-agnostic).
    # L2 as in §2.1: measured here, L1 at batch 8 was still reconstructing black frames after 250 steps
    # (0/24 clips kept their colour) while L2 at batch 2 kept every colour after 200 (DESIGN §5's pitfall).
    # Stage two packs stills with the clips cut to the sampled length: measured here, the same steps on
    # 9/13/17-frame clips followed 13/24 seen and 3/8 held-out prompts, on 9-frame clips 23/24 and 6/8
    # (motion is learned after colour, and short clips put ~2x more samples in each step). drop_last: the
    # last Frame Pack batch of an epoch is nearly empty, a wasted and noisy step.
    "shapes": TrainConfig(vae_stages=[S([(32, 32)], [1, 5])], vae_steps=[400], recon="l2",
                          dit_stages=[data.STAGES["shapes"][0], S([(32, 32), (32, 48)], [1, 9])],
                          dit_steps=[300, 1700], rows=12, max_tokens=[96, 256], batch=2, lr=1e-3, warmup=50,
                          vae_lr=2e-3, disc_start=10**9, disc_ch=16, save_every=250, drop_last=True),
    # Full scale (GPU clusters). The paper gives no optimizer numbers beyond the AdamW settings.
    "cogvideox-2b": TrainConfig(vae="cogvideox-2b", dit="cogvideox-2b", snr_shift=3.0, fit_scale=False,
                                vae_stages=[S([(256, 256)], [17], fps=8), S([(256, 256)], [49], fps=8)],
                                vae_steps=[100_000, 20_000], dit_stages=list(data.STAGES["cogvideox"]),
                                dit_steps=[100_000, 50_000, 20_000, 5_000], rows=1, batch=1, ema=0.9999,
                                warmup=1000, save_every=1000),
    "cogvideox-5b": TrainConfig(vae="cogvideox-5b", dit="cogvideox-5b", snr_shift=1.0, fit_scale=False,
                                dit_stages=list(data.STAGES["cogvideox"]), dit_steps=[100_000, 50_000, 20_000, 5_000],
                                rows=1, batch=1, ema=0.9999, warmup=1000, save_every=1000),
    # App. A: fine-tuned from the T2V model (--init), 480x720 clips of 49 frames, image latent on 16 more channels.
    "cogvideox-5b-i2v": TrainConfig(vae="cogvideox-5b", dit="cogvideox-5b-i2v", snr_shift=1.0, fit_scale=False,
                                    dit_stages=[S([(480, 720)], [49], fps=8)], dit_steps=[20_000], rows=1, batch=1,
                                    warmup=500, save_every=1000),
}


class SettingsError(ValueError):
    """Bad settings: main() prints the one-line message (which names the fix) and exits with code 2."""


# ----- distributed setup: one process, or torchrun (RANK in the environment) -----

def setup(device, cp):
    """-> (rank, world, device, cp_group). gloo on CPU, nccl on GPU (DESIGN §6.8).

    torchrun (single or multi node) sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; a plain `python train.py`
    sets none of them and runs as rank 0 of 1 with no process group at all, so the one-process path never
    touches torch.distributed. cp > 1 cuts the world into groups of cp consecutive ranks (§2.1 context
    parallel): each group shares one clip, so the data-parallel world is world / cp."""
    if "RANK" in os.environ and not dist.is_initialized():
        gpu = device.startswith("cuda")
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device = f"cuda:{torch.cuda.current_device()}"
        dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if cp < 1 or world % cp:
        raise SettingsError(f"--cp {cp} does not divide the {world} ranks; pick a divisor of the world size")
    group = None
    for g in range(world // cp if cp > 1 else 0):  # every rank must create every group, in the same order
        ranks = list(range(g * cp, (g + 1) * cp))
        made = dist.new_group(ranks)
        group = made if rank in ranks else group
    return rank, world, torch.device(device), group


def all_sum(x):
    """Sum a float tensor over all ranks (no-op in one process). Used for what the log reports (global loss,
    tokens, bad files) and for decisions every rank must take alike (skip a NaN step, stop on a signal)."""
    x = torch.as_tensor(x, dtype=torch.float64).clone()
    if dist.is_initialized():
        x = x.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(x)
    return x.cpu()


class Call(nn.Module):
    """DDP and FSDP hook their gradient sync / parameter gathering into nn.Module.__call__; this routes any
    function of the wrapped model through it: net(fn, *args) runs fn(model, *args) (e.g. model.forward_packed)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


def wrap(model, fsdp, device, call=True):
    """DDP by default, FSDP2 (torch's fully_shard: each block, then the root) with --fsdp, nothing in one process."""
    net = Call(model) if call else model
    if not dist.is_initialized():
        return net
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for m in model.modules():
            if isinstance(m, nn.ModuleList):
                for block in m:
                    fully_shard(block)
        return fully_shard(net)
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(net, device_ids=[device] if device.type == "cuda" else None)


def sync(net, on):
    """Gradient accumulation: skip the all-reduce on every micro-batch but the last (the gradients of the
    earlier micro-batches just accumulate locally; the last backward reduces the sum once)."""
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2
        net.set_requires_gradient_sync(on)
        return nullcontext()
    return net.no_sync() if hasattr(net, "no_sync") and not on else nullcontext()


# ----- per-step randomness, drawn for the global batch -----

def mix(*xs):
    """A deterministic 63-bit seed from integers (FNV-1a); Python's hash() is salted per process for strings."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (x % 2**64)) * 1099511628211) % 2**64
    return h % 2**63


def gen(*xs):
    return torch.Generator().manual_seed(mix(*xs))


def draws(tc, n, step, micro, iid):
    """Every per-sample random quantity of one micro-batch, for all N samples of the GLOBAL batch.

    Each rank then takes its own slots (the sampler numbers the global batch), so 2 DDP ranks draw exactly what
    one process running the combined batch draws. §3.3: explicit uniform sampling splits [0, 1000) into N strata,
    sample i inside the i-th; the strata are then shuffled over the samples, since the packer orders samples
    (long clips that waited start the next batch) and a fixed stratum per slot would tie timesteps to length."""
    g = gen(tc.seed, step, micro)
    if iid or n > 1000:
        t = diffusion.iid_timesteps(n, 1000, generator=g)  # (N,) the common practice §3.3 argues against
    else:
        t = diffusion.explicit_uniform_timesteps(n, 0, 1, 1000, generator=g)[torch.randperm(n, generator=g)]  # (N,)
    drop = torch.rand(n, generator=g) < tc.text_drop  # (N,) §3 text dropout
    sigma = (torch.randn(n, generator=g) * tc.i2v_noise[1] + tc.i2v_noise[0]).exp()  # (N,) App. A condition noise
    return t, drop, sigma


def noise(shape, *key):
    """Gaussian noise owned by one sample of the global batch (keyed by its slot), the same on any rank.

    Drawn on the CPU from its own generator, so it does not depend on the device, on how many samples a rank
    holds or in which order they come, and a resumed run draws exactly what the uninterrupted run drew."""
    return torch.randn(shape, generator=gen(*key))


# ----- learning rate -----

def lr_at(tc, base, step, steps):
    """Linear warmup, then cosine down to min_lr·base, over one stage (each §3.2 stage restarts the schedule).

    A pure function of the step: the "scheduler state" of a checkpoint is the step number itself."""
    if step < tc.warmup:
        return base * (step + 1) / tc.warmup
    p = (step - tc.warmup) / max(1, steps - tc.warmup)
    return base * (tc.min_lr + (1 - tc.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


# ----- data: sampler keys -> prepared samples -----

class Prepared(torch.utils.data.Dataset):
    """The DiT's view of a data.VideoDataset: sampler key -> posterior (mean, logvar) of the clip's latent and its
    T5 embedding, from data.LatentCache when given (encode once, reuse every epoch) or encoded on the spot."""

    def __init__(self, ds, ae, text, cache, ids):
        self.ds, self.ae, self.text, self.cache, self.ids = ds, ae, text, cache, ids

    def __len__(self):
        return len(self.ds)

    @torch.no_grad()
    def __getitem__(self, key):
        index, *rest = key if isinstance(key, tuple) else (key,)
        e, shape = self.ds.entries[index], self.ds.shapes[index]
        if shape is None:
            return None
        out = {"index": index, **dict(zip(("row", "slot", "weight", "n_global"), rest))}

        def encode():
            item = self.ds[index]
            if item is None:
                raise data.BadVideo(self.ds.bad.get(e["path"], "unreadable"))
            x = item["video"][None].to(self.ae_device, self.ae_dtype)  # (1, 3, T, H, W)
            return {k: v[0] for k, v in self.posteriors(x).items()}

        def embed():
            return {"text": self.text.encode([e["caption"]])[0].float()}  # (L, D)

        try:
            if self.cache is None:
                out.update(encode())
            else:
                out.update(self.cache.get_or_make(self.key(e["path"], shape), encode))
        except (data.BadVideo, OSError):  # counted by collate, reason warned by data.VideoDataset
            return None
        out.update(embed() if self.cache is None else
                   self.cache.get_or_make(self.cache.text_key(e["caption"], self.ids[1]), embed))
        return out

    @torch.no_grad()
    def fill(self, indices, bar=True, stage=0, chunk=16):
        """Encode the cache misses among `indices` in batches of one shape (much faster than one by one on a CPU)
        and their captions; a progress bar for this preparation work."""
        from tqdm import tqdm
        todo = {}
        for i in indices:
            e = self.ds.entries[i]
            try:
                k = self.key(e["path"], self.ds.shapes[i])
            except OSError:
                continue  # a missing file: skipped (and counted) when training reaches it
            if self.cache.get(k) is None:
                todo.setdefault(tuple(self.ds.shapes[i]), []).append((i, k))
        work = [g[j:j + chunk] for g in todo.values() for j in range(0, len(g), chunk)]
        for group in tqdm(work, desc=f"caching latents (stage {stage})", disable=not bar, leave=False):
            items = [(self.ds[i], k) for i, k in group]
            items = [(it, k) for it, k in items if it is not None]
            if items:
                x = torch.stack([it["video"] for it, _ in items]).to(self.ae_device, self.ae_dtype)  # (B, 3, T, H, W)
                post = self.posteriors(x)  # GroupNorm is per sample: the same latents as one by one (up to rounding)
                for j, (_, k) in enumerate(items):
                    self.cache.put(k, {name: v[j] for name, v in post.items()})
        for i in indices:  # captions: the T5 embedding of each distinct caption once
            c = self.ds.entries[i]["caption"]
            self.cache.get_or_make(self.cache.text_key(c, self.ids[1]),
                                   lambda: {"text": self.text.encode([c])[0].float()})

    def key(self, path, shape):
        # "+frame0": the entry also holds the first frame's own posterior (App. A's image condition)
        return self.cache.key(path, shape, self.ids[0], fps=self.ds.stage.fps, latent="posterior+frame0")

    def posteriors(self, x):
        """x (B, 3, T, H, W) -> the clip's posterior and the first frame's own, each (B, C, T' or 1, h, w).

        The I2V condition (App. A) is encode(first frame), exactly what sample.py feeds at inference. It is not
        latent frame 0 of the whole clip: the whole-clip GroupNorm statistics see the later frames."""
        post, img = self.ae.encode(x), self.ae.encode(x[:, :, :1])
        return {"mean": post.mean.float(), "logvar": post.logvar.float(),
                "img_mean": img.mean.float(), "img_logvar": img.logvar.float()}

    @property
    def ae_device(self):
        return next(self.ae.parameters()).device

    @property
    def ae_dtype(self):
        return next(self.ae.parameters()).dtype


def collate(items):
    """Keep the good samples; count the bad ones (data.VideoDataset warned with the reason)."""
    good = [it for it in items if it is not None]
    return {"items": good, "bad": len(items) - len(good)}


def batches(make_loader, sampler, pos):
    """Endless stream of this rank's micro-batches; pos {"epoch", "batch"} counts what was consumed (resume).

    The sampler's batches are a pure function of (seed, epoch), so the data position is just two integers:
    a resumed run rebuilds the epoch's list of batches and starts at pos["batch"], no sampler state to pickle."""
    while True:
        sampler.set_epoch(pos["epoch"])
        keys = list(sampler)
        if not keys:  # nothing readable at this stage's sizes: stop instead of spinning over empty epochs
            raise SettingsError("no readable sample fits this stage (see the skipped files above); check --data, "
                                "--size and --frames with `python data.py inspect`")
        if pos["batch"] < len(keys):
            for b in make_loader(keys[pos["batch"]:]):
                pos["batch"] += 1
                yield b
        pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0


def model_id(folder):
    """Cache key part naming a model folder's exact weights (path, size, mtime of its files): a retrained VAE
    or another T5 never reuses stale latents / embeddings from the cache."""
    st = [(f, os.stat(os.path.join(folder, f))) for f in sorted(os.listdir(folder))]
    return "|".join(f"{os.path.abspath(folder)}/{f}:{s.st_size}:{s.st_mtime_ns}" for f, s in st if f[0] != ".")


# ----- the DiT loss of one micro-batch (§3) -----

def dit_loss(net, cfg, batch, tc, ac, step, micro, iid, i2v, max_tokens, sf, device):
    """-> (loss for backward, per-sample MSE (S,), t (S,), weights (S,), tokens (S,)) of this rank's samples.

    The loss is world·Σ_j w_j·mse_j with w_j = the sample's share of the global batch's video tokens (data.py),
    so after DDP/FSDP average the gradients over ranks it is the token-weighted mean over the whole global batch."""
    items = batch["items"]
    n = items[0]["n_global"] if items else 1
    t_all, drop_all, sigma_all = draws(tc, n, step, micro, iid)
    slot = [max(it["slot"], 0) for it in items]  # a weight-0 filler (slot -1) borrows slot 0's draws
    t = t_all[slot].to(device)  # (S,)
    w = torch.tensor([it["weight"] for it in items], dtype=torch.float32, device=device)  # (S,)
    z0, zt, target = [], [], []
    for j, it in enumerate(items):
        key = (tc.seed, step, micro, slot[j])
        eps = noise(it["mean"].shape, *key, 1).to(device)  # (C, T', h, w) posterior sample
        z = (it["mean"].to(device) + (0.5 * it["logvar"].to(device)).exp() * eps) * sf  # §2.1: the DiT sees z·scale
        e = noise(z.shape, *key, 2).to(device)  # (C, T', h, w) diffusion noise
        z0.append(z)
        zt.append(diffusion.q_sample(z[None], t[j:j + 1], e[None], ac)[0])  # (C, T', h, w)
        target.append(diffusion.v_target(z[None], e[None], t[j:j + 1], ac)[0])  # §3 v-prediction
        if i2v:  # App. A: [noisy latent; image latent] along channels; frame 0 = noised image latent, rest zeros
            c = torch.zeros_like(z)
            img = (it["img_mean"].to(device) + (0.5 * it["img_logvar"].to(device)).exp() * noise(
                it["img_mean"].shape, *key, 4).to(device)) * sf  # (C, 1, h, w): encode(first frame), as sampled
            c[:, :1] = img + sigma_all[slot[j]] * noise(img.shape, *key, 3).to(device)
            zt[-1] = torch.cat([zt[-1], c])  # (2C, T', h, w)
    if not items:  # every file of this micro-batch was bad: a zero loss that still syncs gradients
        # through net's forward, so DDP/FSDP run their gradient hooks on this rank too (else the others hang)
        zero = net(lambda m: sum(p.sum() for p in m.parameters()) * 0.0)
        return zero, *(torch.zeros(0, device=device) for _ in range(4))
    text = torch.stack([it["text"] for it in items]).to(device)  # (S, L, D)
    keep = (~drop_all[slot]).to(device, text.dtype)  # (S,)
    text = text * keep[:, None, None]  # §3: dropped text is all zeros
    if max_tokens:  # §3.1 Frame Pack
        v = net(lambda m, *a: m.forward_packed(*a), zt, t, text, max_tokens)  # list of (C, T', h, w)
    else:  # bucket mode: one shape per batch
        v = list(net(lambda m, *a: m(*a), torch.stack(zt), t, text))  # S x (C, T', h, w)
    mse = torch.stack([(a.float() - b.float()).pow(2).mean() for a, b in zip(v, target)])  # (S,)
    world = dist.get_world_size() if dist.is_initialized() else 1
    tokens = torch.tensor([dit.num_tokens(cfg, *z.shape[1:]) for z in z0], device=device)  # (S,)
    return world * (w * mse).sum(), mse.detach(), t, w, tokens


# ----- the VAE loss of one micro-batch (§2.1) -----

def autoencode(model, x, eps, group):
    """x (B, 3, T, H, W) (this rank's share under CP) -> (reconstruction, posterior); z = mean + std·eps."""
    post = model.encode(x, cp_group=group)
    return model.decode(post.mean + (0.5 * post.logvar).exp() * eps, cp_group=group), post


def vae_loss(net, model, disc, batch, tc, step, micro, group, lpips, device):
    """-> (generator loss, parts, x, reconstruction). Under CP every rank of a group holds the whole clip, encodes
    and decodes its share, and gathers the reconstruction (differentiably): each rank computes the full clip's
    loss, and the gather's backward sums the group's gradients, so the update equals one process."""
    items = batch["items"]
    x = torch.stack([it["video"] for it in items]).to(device)  # (B, 3, T, H, W)
    T, tf, sf = x.shape[2], model.cfg.temporal_factor, model.cfg.spatial_factor
    shape = (model.cfg.latent, (T - 1) // tf + 1, x.shape[3] // sf, x.shape[4] // sf)
    eps = torch.stack([noise(shape, tc.seed, step, micro, max(it.get("slot", 0), 0)) for it in items]).to(device)
    if group is None:
        rec, post = net(autoencode, x, eps, None)  # (B, 3, T, H, W)
    else:
        rec, post = net(autoencode, vae.cp_split(x, group), vae.cp_split(eps, group, factor=1), group)
        rec = vae.cp_gather(rec, group)  # (B, 3, T, H, W) on every rank of the group
        post = vae.Gaussian(vae.cp_gather(post.mean, group), vae.cp_gather(post.logvar, group))
    use_disc = disc is not None and step >= tc.disc_start
    if use_disc:
        disc.requires_grad_(False)  # the generator's GAN term must not touch the discriminator's gradients
    loss, parts = vae.generator_loss(x, rec, post, step, recon=tc.recon, kl_weight=tc.kl_weight, lpips=lpips,
                                     disc=disc if use_disc else None, disc_weight=tc.disc_weight,
                                     disc_start=tc.disc_start,
                                     last_layer=model.decoder.conv_out.weight if group is None else None)
    if use_disc:
        disc.requires_grad_(True)
    if all(it.get("weight", 1.0) == 0 for it in items):
        loss = loss * 0.0  # a weight-0 filler (last batch of an epoch) only keeps the ranks in step
    return loss, parts, x, rec, post


# ----- checkpoints -----

def full_state(model):
    """Full (unsharded) state dict on CPU; under FSDP a collective, and only rank 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_opt_state(model, opt):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local(x):
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def write_model(folder, cfg, sd):
    """Same files as ExpertDiT.save / CausalVAE.save (config.json + model.safetensors), from a state dict."""
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg if isinstance(cfg, dict) else asdict(cfg), f, indent=1)


def save_checkpoint(out, step, rank, parts, opts, ema, state, keep):
    """out/ckpt/step_N/ {<name>/config.json + model.safetensors, ema.safetensors, state.pt, train.json}, written to a
    temp folder and renamed (atomic), then out/ckpt/latest points at it. parts: {name: (model, cfg)}.
    state.pt holds only tensors, numbers and strings, so it loads with torch.load(weights_only=True)."""
    sds = {name: full_state(m) for name, (m, _) in parts.items()}  # collectives first, on every rank
    osds = {name: full_opt_state(parts[name][0], o) for name, o in opts.items()}
    emas = {k: local(v).cpu() for k, v in ema.items()} if ema else None
    if rank != 0:
        return
    root = os.path.join(out, "ckpt")
    final, tmp = os.path.join(root, f"step_{step:07d}"), os.path.join(root, f".tmp_step_{step:07d}")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, (_, cfg) in parts.items():
        write_model(os.path.join(tmp, name), cfg, sds[name])
    if emas:
        save_file(emas, os.path.join(tmp, "ema.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save({"opt": osds, "rng": rng}, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "train.json"), "w") as f:
        json.dump(state, f, indent=1)
    trash = final + ".old"  # a checkpoint of this step already there (e.g. a signal right after a save): swap it
    if os.path.exists(final):  # out by renames only, so `latest` never names a half-deleted folder
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)
    with open(os.path.join(root, "latest.tmp"), "w") as f:
        f.write(os.path.basename(final))
    os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    old = sorted(d for d in os.listdir(root) if d.startswith("step_"))[:-keep]
    for d in old:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def load_checkpoint(out, parts, opts, ema):
    """Inverse of save_checkpoint (every rank reads the files; FSDP re-shards) -> train.json's state."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    root = os.path.join(out, "ckpt")
    with open(os.path.join(root, "latest")) as f:
        folder = os.path.join(root, f.read().strip())
    full = StateDictOptions(full_state_dict=True)
    for name, (m, _) in parts.items():
        set_model_state_dict(m, load_file(os.path.join(folder, name, "model.safetensors")), options=full)
    st = torch.load(os.path.join(folder, "state.pt"), weights_only=True)  # never unpickles code
    for name, o in opts.items():
        set_optimizer_state_dict(parts[name][0], o, st["opt"][name], options=full)
    if ema:
        for k, v in load_file(os.path.join(folder, "ema.safetensors")).items():
            if hasattr(ema[k], "full_tensor"):  # FSDP: keep only this rank's shard of the full tensor
                from torch.distributed.tensor import distribute_tensor
                v = distribute_tensor(v, ema[k].device_mesh, ema[k].placements)
            ema[k].copy_(v)
    torch.set_rng_state(st["rng"]["cpu"])
    if "cuda" in st["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["rng"]["cuda"])
    with open(os.path.join(folder, "train.json")) as f:
        return json.load(f)


# ----- settings checks (exit code 2) -----

def check(args, tc, rank, world):
    if not args.data or not os.path.exists(args.data):
        raise SettingsError(f"--data {args.data!r} not found: pass a manifest .jsonl or a folder of videos "
                            f"(python data.py shapes --out shapes makes one)")
    ac, dc = vae.VAE_PRESETS[tc.vae], dit.DIT_PRESETS[tc.dit]
    tf, sf = ac.temporal_factor, ac.spatial_factor
    size = sf * (dc.patch if args.stage == "dit" else 1)
    stages = tc.dit_stages if args.stage == "dit" else tc.vae_stages
    for i, st in enumerate(stages):
        for f in st.frames:
            if f < 1 or (f - 1) % tf:
                raise SettingsError(f"stage {i}: {f} frames is not {tf}k+1; use {max(1, (f - 1) // tf * tf + 1)} "
                                    f"or {(f - 1 + tf - 1) // tf * tf + 1}")
            if args.cp > 1 and f > 1 and (f - 1) % (tf * args.cp):
                raise SettingsError(f"stage {i}: {f} frames cannot be split over --cp {args.cp}; need (T-1) divisible "
                                    f"by {tf * args.cp}")
        for h, w in st.resolutions:
            if h % size or w % size:
                raise SettingsError(f"stage {i}: {h}x{w} is not a multiple of {size} (VAE spatial factor"
                                    f"{' x patch' if args.stage == 'dit' else ''}); use {h // size * size}x{w // size * size}")
    if args.stage == "dit":
        if args.cp > 1:
            raise SettingsError("--cp is the VAE's context parallel; drop it for --stage dit")
        if not args.vae or not (args.cache or args.text_encoder):
            raise SettingsError("--stage dit needs --vae DIR (its latents and scaling factor) and --text-encoder DIR "
                                "(or a --cache DIR already holding the text embeddings)")
    elif args.fsdp:
        raise SettingsError("--fsdp shards the DiT; train the VAE with DDP (drop --fsdp)")
    for name in ("vae", "text_encoder", "init"):
        p = getattr(args, name, None)
        if p and not os.path.isdir(p):
            raise SettingsError(f"--{name.replace('_', '-')} {p!r} is not a folder")


# ----- the training loop -----

def train(args):
    """Trains one model (args.stage) over the preset's stages; returns {"losses": [...], "out": folder}."""
    tc = PRESETS[args.preset]
    over = {k: getattr(args, k, None) for k in ("lr", "accum", "rows", "batch", "ema", "save_every", "seed",
                                                 "max_tokens", "recon")}
    over = {k: v for k, v in over.items() if v is not None}
    if "lr" in over and args.stage == "vae":
        over["vae_lr"] = over.pop("lr")
    tc = replace(tc, **over)
    key = "dit" if args.stage == "dit" else "vae"
    stages, steps = getattr(tc, key + "_stages"), getattr(tc, key + "_steps")
    if args.steps:  # "N" for every stage or "N1,N2,..." one per stage
        steps = [int(v) for v in str(args.steps).split(",")]
        steps = steps * len(stages) if len(steps) == 1 else steps
        if len(steps) != len(stages):
            raise SettingsError(f"--steps lists {len(steps)} numbers for {len(stages)} stages; give one or {len(stages)}")
    if args.frames:  # the same frame counts / sizes in every stage
        stages = [replace(st, frames=[int(v) for v in args.frames.split(",")]) for st in stages]
    if args.size:
        try:
            res = [tuple(int(v) for v in r.split("x")) for r in args.size.split(",")]
        except ValueError:
            raise SettingsError(f"--size {args.size!r}: write HxW[,HxW...], e.g. 32x32,32x48") from None
        stages = [replace(st, resolutions=res) for st in stages]
    tc = replace(tc, **{key + "_stages": stages, key + "_steps": steps})
    rank, world, device, group = setup(args.device, args.cp)
    check(args, tc, rank, world)
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(tc.seed)  # same initial weights on every rank
    is_dit = args.stage == "dit"
    ae = disc = lpips = text = cache = None
    dp_rank, dp_world = (rank // args.cp, world // args.cp)

    if is_dit:
        cfg = dit.DIT_PRESETS[tc.dit]
        if args.i2v and cfg.in_channels == cfg.out_channels:
            cfg = replace(cfg, in_channels=2 * cfg.out_channels)  # App. A: [noisy; image] latents
        model = dit.ExpertDiT(cfg)
        if args.init:  # e.g. the T2V weights for the I2V fine-tune: the patch embedding grows (new channels start at 0)
            sd = load_file(os.path.join(args.init, "model.safetensors"))
            w = sd["patch.weight"]
            if w.shape != model.patch.weight.shape:
                p2 = cfg.patch * cfg.patch
                grown = model.patch.weight.detach().clone().zero_().view(w.shape[0], cfg.in_channels, p2)
                grown[:, :w.shape[1] // p2] = w.view(w.shape[0], -1, p2)
                sd["patch.weight"] = grown.view(w.shape[0], -1)
            model.load_state_dict(sd)
        model.checkpointing = args.grad_checkpoint
        model.autocast = torch.bfloat16 if device.type == "cuda" else None  # bf16 autocast on GPU
        ae = vae.CausalVAE.load(args.vae, device=device).eval().requires_grad_(False)  # frozen: §3 trains the DiT only
        vcfg = ae.cfg
        if args.text_encoder:
            text = dit.TextEncoder(args.text_encoder, device=device, max_length=cfg.text_len)
        cache = data.LatentCache(args.cache) if args.cache else None
        ids = (model_id(args.vae), f"{model_id(args.text_encoder)}|{cfg.text_len}" if args.text_encoder else "")
        lr0 = tc.lr
        parts = {"dit": (model, cfg)}
    else:
        cfg = vae.VAE_PRESETS[tc.vae]
        model = vae.CausalVAE(cfg)
        if args.init:
            model.load_state_dict(load_file(os.path.join(args.init, "model.safetensors")))
        disc = vae.Discriminator3D(tc.disc_ch).to(device)
        lpips = vae.load_lpips(args.lpips) if rank == 0 or args.lpips else None
        lpips = lpips.to(device) if lpips is not None else None
        vcfg, lr0 = cfg, tc.vae_lr
        parts = {"vae": (model, cfg), "disc": (disc, {"ch": tc.disc_ch})}
    # Seeded identically on every rank, so all ranks start from the same weights (DDP also broadcasts rank 0's).
    model.to(device)
    net = wrap(model, args.fsdp, device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = lambda p: p.dim() >= 2  # no weight decay on biases and norm gains
    groups = [{"params": [p for p in params if decay(p)], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if not decay(p)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr0, betas=tc.betas, eps=tc.eps, foreach=device.type == "cpu" or None)
    opts = {"dit" if is_dit else "vae": opt}
    if disc is not None:
        dnet = wrap(disc, False, device, call=False)
        dopt = torch.optim.AdamW(disc.parameters(), lr=tc.disc_lr, betas=tc.betas, eps=tc.eps)
        opts["disc"] = dopt
    # EMA copies live next to the (possibly sharded) parameters, so under FSDP each rank keeps its shard only.
    ema = {k: p.detach().clone() for k, p in model.named_parameters()} if tc.ema and is_dit else None
    ac = diffusion.alphas_cumprod(snr_shift_scale=tc.snr_shift)  # (1000,) float64, §3

    # -- resume: weights, optimizer, RNG, and where the data stream was --
    step, pos, bad_files = 0, {"stage": 0, "epoch": 0, "batch": 0}, 0
    zstat = torch.zeros(4, dtype=torch.float64)  # VAE: count, Σ mean, Σ mean², Σ var of the posteriors
    if args.resume and os.path.exists(os.path.join(args.out, "ckpt", "latest")):
        st = load_checkpoint(args.out, parts, opts, ema)
        step, pos, bad_files, zstat = st["step"], st["pos"], st["bad_files"], torch.tensor(st["zstat"])
        say(f"resumed from step {step} (stage {pos['stage']}, epoch {pos['epoch']}, batch {pos['batch']})")
    elif args.resume:
        say(f"--resume: no checkpoint in {args.out}/ckpt yet, starting from scratch")

    stop = {"sig": 0}  # SIGTERM / SIGINT: finish the step, write a checkpoint, exit; a second signal kills at once

    def on_signal(num, _):
        stop.update(sig=num)
        signal.signal(num, signal.SIG_DFL)

    before = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "log.jsonl"), "a") if rank == 0 else None
    total, ends = sum(steps), [sum(steps[:i + 1]) for i in range(len(steps))]
    nparams = sum(p.numel() for p in params)
    say(f"{args.stage}: {nparams:,} parameters | world {world}{f' (cp {args.cp})' if args.cp > 1 else ''}"
        f"{' fsdp' if args.fsdp else ' ddp' if world > 1 else ''} | {len(steps)} stage(s), {total} steps | {device}")
    losses, consec_bad, stage_i, stream = [], 0, -1, None
    entries = data.read_manifest(args.data)

    while step < total:
        # -- §3.2 progressive stages: a new stage rebuilds the data; the weights carry over --
        # The model and optimizer are untouched across a stage change; only the resolution set / frame counts /
        # subset change. RoPE positions are integer patch indices at any size (extrapolation, §3.2), so a larger
        # grid just sees new positions. The learning rate schedule restarts (warmup + cosine per stage).
        if stage_i != next(i for i, e in enumerate(ends) if step < e):
            stage_i = next(i for i, e in enumerate(ends) if step < e)
            if pos["stage"] != stage_i:
                pos = {"stage": stage_i, "epoch": 0, "batch": 0}
            stage = stages[stage_i]
            ds = data.VideoDataset(entries, stage, mode="bucket" if (args.bucket or not is_dit) else "pack")
            if not is_dit and args.cp > 1:  # a CP group splits time: images and too-short clips cannot be split
                ds.shapes = [s if s and s[0] > 1 and (s[0] - 1) % (4 * args.cp) == 0 else None for s in ds.shapes]
            if not any(ds.shapes):
                raise SettingsError(f"stage {stage_i}: no readable sample in --data fits {stage.resolutions} x frames "
                                    f"{stage.frames} ({len(ds.bad)} unreadable); check with `python data.py inspect`")
            if is_dit and not args.bucket:  # §3.1 Frame Pack: rows of max_tokens, any mix of durations and images
                sizes = [s for s in ds.shapes if s]
                need = max(data.num_tokens(*s, cfg.text_len, vcfg.temporal_factor, vcfg.spatial_factor, cfg.patch)
                           for s in sizes)
                max_tokens = (tc.max_tokens[stage_i] if isinstance(tc.max_tokens, list) else tc.max_tokens) or need
                sampler = data.FramePackSampler(ds.shapes, max_tokens, tc.rows, cfg.text_len, vcfg.temporal_factor,
                                                vcfg.spatial_factor, cfg.patch, seed=tc.seed, rank=dp_rank,
                                                world_size=dp_world, drop_last=tc.drop_last)
            else:  # one shape per batch: the VAE (whole clips), or the DiT in the released code's padded mode
                max_tokens = 0
                sampler = data.BucketSampler(ds.shapes, tc.batch, seed=tc.seed, rank=dp_rank, world_size=dp_world,
                                             drop_last=tc.drop_last)
            src = Prepared(ds, ae, text, cache, ids) if is_dit else ds
            if is_dit and cache is not None:  # fill the cache first, each rank its share, then everyone reads it
                src.fill([i for i, s in enumerate(ds.shapes) if s and i % world == rank], rank == 0, stage_i)
                if dist.is_initialized():
                    dist.barrier()
            loader = lambda keys: torch.utils.data.DataLoader(src, batch_sampler=keys, collate_fn=collate,
                                                              num_workers=args.workers)
            stream = batches(loader, sampler, pos)
            start = ends[stage_i] - steps[stage_i]
            eff = sampler.efficiency() if hasattr(sampler, "efficiency") else 1.0
            say(f"stage {stage_i}: {stage.resolutions} x frames {stage.frames}"
                f"{f' top {stage.subset:.0%}' if stage.subset else ''} | {len([s for s in ds.shapes if s])} samples | "
                + (f"Frame Pack rows of {max_tokens} tokens, packing {eff:.0%}" if max_tokens else "buckets"))

        # -- one optimizer step: accum micro-batches, then clip, AdamW, EMA --
        # Each micro-batch is one batch of the data sampler for THIS rank (its rows of the global batch). Its loss
        # is already normalised over the global batch, so summing micro-batches / accum and letting DDP average
        # over ranks gives the token-weighted mean over everything this step saw.
        t0 = time.perf_counter()
        lr = lr_at(tc, lr0, step - start, steps[stage_i])
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        tot = {"loss": 0.0, "tokens": 0.0, "bad": 0}
        per, ts, parts_log = [], [], {}
        for micro in range(tc.accum):
            batch = next(stream)
            tot["bad"] += batch["bad"]
            with sync(net, micro == tc.accum - 1):
                if is_dit:
                    loss, mse, t, w, tok = dit_loss(net, cfg, batch, tc, ac, step, micro, args.iid_timesteps,
                                                    args.i2v, max_tokens, vcfg.scaling_factor, device)
                    tot["loss"] += float((w * mse).sum()) / tc.accum
                    tot["tokens"] += float(tok.sum())
                    per.append(mse[w > 0].cpu())  # weight-0 fillers stay out of the per-t statistics
                    ts.append(t[w > 0].cpu())
                else:
                    loss, pr, x, rec, post = vae_loss(net, model, disc, batch, tc, step, micro, group, lpips, device)
                    tot["loss"] += float(loss.detach()) / tc.accum / (args.cp if group is not None else 1)
                    if step >= total - max(1, total // 5):  # latent statistics over the last 20% of steps
                        m = post.mean.detach().double()
                        zstat += torch.stack([m.new_tensor(m.numel()), m.sum(), (m * m).sum(),
                                              post.logvar.detach().double().exp().sum()]).cpu() / args.cp
                    tot["tokens"] += x.numel() / 3 / (args.cp if group is not None else 1)
                    parts_log = {k: float(v.detach()) for k, v in pr.items() if k != "loss"}
                (loss / tc.accum).backward()
        # The logged loss is the global one (every rank's weighted sum), not rank 0's share, so a one-process run
        # and a torchrun run of the same global batch print the same number.
        red = all_sum([tot["loss"], tot["tokens"], tot["bad"]])
        gloss = float(red[0]) / (1 if is_dit else dp_world)
        # Clip on the global gradient norm (DDP gradients are already averaged; FSDP's clip reduces over shards).
        # Every rank sees the same norm and the same loss, so all of them agree to skip a non-finite step.
        gnorm = torch.nn.utils.clip_grad_norm_(params, tc.clip)
        gnorm = float(local(gnorm))
        if not (math.isfinite(gloss) and math.isfinite(gnorm)):  # a NaN/inf loss: skip the update, warn, go on
            consec_bad += 1
            opt.zero_grad(set_to_none=True)
            say(f"warning: step {step}: non-finite loss {gloss} / grad norm {gnorm}, update skipped "
                f"({consec_bad} in a row)", file=sys.stderr)
            if consec_bad >= args.max_bad_steps:
                raise SettingsError(f"{consec_bad} non-finite losses in a row: lower --lr, check the data, or resume "
                                   f"from an earlier checkpoint")
        else:
            consec_bad = 0
            opt.step()
            if ema is not None:  # EMA of the weights: what sample.py gets when --ema is on (smoother samples)
                with torch.no_grad():
                    torch._foreach_lerp_(list(ema.values()), [p.detach() for p in model.parameters()], 1 - tc.ema)
        # §2.1 GAN: after disc_start the 3D discriminator takes its own hinge-loss step on this step's last
        # micro-batch (real clips vs detached reconstructions), with its own AdamW and learning rate.
        # Not after a skipped (non-finite) step: a NaN reconstruction would poison the discriminator's weights.
        if disc is not None and step >= tc.disc_start and consec_bad == 0:
            for g in dopt.param_groups:
                g["lr"] = lr_at(tc, tc.disc_lr, step - max(start, tc.disc_start), steps[stage_i])
            dopt.zero_grad(set_to_none=True)
            dloss, dparts = vae.discriminator_loss(dnet, x, rec.detach(), step, tc.disc_start)
            dloss.backward()
            dnorm = torch.nn.utils.clip_grad_norm_(disc.parameters(), tc.clip)
            if math.isfinite(float(dloss.detach())) and math.isfinite(float(local(dnorm))):
                dopt.step()
            parts_log.update({k: float(v.detach()) for k, v in dparts.items()})
        bad_files += int(red[2])
        step += 1
        ms = 1000 * (time.perf_counter() - t0)
        losses.append(gloss)

        # -- logs: one greppable line per step + JSONL --
        rec_ = {"step": step, "stage": stage_i, "loss": gloss, "lr": lr, "ms": ms, "grad_norm": gnorm,
                "tok_s": float(red[1]) / (ms / 1000), "bad_files": bad_files}
        if is_dit:
            allp, allt = torch.cat(per), torch.cat(ts)
            if dist.is_initialized():
                got = [None] * world
                dist.all_gather_object(got, (allp.tolist(), allt.tolist()))
                allp, allt = torch.tensor([v for g in got for v in g[0]]), torch.tensor([v for g in got for v in g[1]])
            if len(allp):
                rec_["loss_by_t"] = diffusion.loss_by_bucket(allp, allt)  # Fig. 3d
            if max_tokens:
                rec_["packing"] = float(red[1]) / (tc.accum * tc.rows * dp_world * max_tokens)
        else:
            rec_.update(parts_log)
        if rank == 0:
            extra = f" | pack {rec_['packing']:.0%}" if "packing" in rec_ else \
                "".join(f" | {k} {v:.4f}" for k, v in parts_log.items() if k in ("recon", "kl", "gan", "disc"))
            print(f"step {step}/{total} | loss {gloss:.4f} | lr {lr:.1e} | {ms:.0f} ms | "
                  f"{'tok/s' if is_dit else 'px/s'} {rec_['tok_s']:.0f}"
                  f"{extra}", flush=True)
            log.write(json.dumps(rec_) + "\n")
            log.flush()

        # -- checkpoints: every save_every steps, at the end, and on a signal (all ranks agree first) --
        # torchrun forwards SIGTERM to every worker, but maybe not at the same step: summing the flags makes
        # all ranks stop after the same step, so the checkpoint's collectives line up.
        sig = int(all_sum([stop["sig"] or (step == args.stop_at)])[0]) > 0
        if (tc.save_every and step % tc.save_every == 0) or step == total or sig:
            state = {"step": step, "pos": dict(pos, stage=stage_i), "bad_files": bad_files, "zstat": zstat.tolist(),
                     "preset": args.preset,
                     "stage_kind": args.stage, "config": asdict(tc), "model_config": asdict(cfg)}
            save_checkpoint(args.out, step, rank, parts, opts, ema, state, tc.keep)
        if sig:
            say(f"stopped at step {step} ({'signal ' + str(stop['sig']) if stop['sig'] else '--stop-at'}); "
                f"checkpoint written, continue with --resume")
            break

    # -- export for sample.py (rank 0): out/dit|vae + text_encoder + sample.json --
    # sample.load_ckpt(out) expects dit/, vae/, text_encoder/ side by side; the VAE and T5 the DiT was trained
    # with are copied next to it so the folder is self-contained.
    if step == total:
        if is_dit:
            sd = full_state(model)  # collectives under FSDP: every rank takes part, rank 0 gets the tensors
            if ema is not None:
                full = {k: local(v).cpu() for k, v in ema.items()}  # likewise, so iterate over ema on every rank
                sd = {k: full.get(k, v) for k, v in sd.items()}
            if rank == 0:
                write_model(os.path.join(args.out, "dit"), cfg, sd)
                for name, src_dir in (("vae", args.vae), ("text_encoder", args.text_encoder)):
                    if src_dir and os.path.abspath(src_dir) != os.path.abspath(os.path.join(args.out, name)):
                        shutil.copytree(src_dir, os.path.join(args.out, name), dirs_exist_ok=True)
                last = stages[-1]
                H, W = last.resolutions[0]
                meta = {"num_frames": max(f for f in last.frames), "height": H, "width": W,
                        "fps": last.fps or 8.0, "snr_shift_scale": tc.snr_shift}
                with open(os.path.join(args.out, "sample.json"), "w") as f:
                    json.dump(meta, f, indent=1)
        else:
            sd, (n, s1, s2, var) = full_state(model), all_sum(zstat).tolist()
            if rank == 0:
                if tc.fit_scale:  # LDM practice: scale latents to unit std so the DiT's noise schedule fits them
                    std = math.sqrt(max(s2 / n - (s1 / n) ** 2 + var / n, 1e-12))  # Var z = Var mean + E var
                    cfg = replace(cfg, scaling_factor=1.0 / std)
                    say(f"vae: scaling_factor = {cfg.scaling_factor:.4f} (1 / std of the latents)")
                write_model(os.path.join(args.out, "vae"), cfg, sd)
    if log:
        log.close()
    for s, h in before.items():
        signal.signal(s, h)
    return {"losses": losses, "out": args.out, "step": step, "stopped": step < total}


# ----- the shapes demo (DESIGN §5): the whole paper at toy scale -----

def demo(args):
    """make_shapes -> train the tiny VAE -> tiny T5 -> cache latents -> tiny DiT (Frame Pack, explicit uniform
    sampling, two progressive stages) -> one video per evaluation prompt -> data.shapes_follow -> the score line."""
    import sample

    t0 = time.time()
    out, q = args.out or "out/shapes", args.quick
    # The time target is for an idle machine. When other processes already keep a core busy, two OpenMP threads
    # spin-wait on each other and run 10-100x slower than one, so take one thread then (an explicit
    # OMP_NUM_THREADS / torch.set_num_threads choice of the user is left alone).
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)
    if busy and "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        print(f"demo: the machine is busy (load {os.getloadavg()[0]:.1f}): one thread, expect it to run slower")
    times = {}
    lap = lambda name: times.update({name: time.time() - t0 - sum(times.values())})
    scale = args.demo_scale if args.demo_scale else (0.01 if q else 1.0)
    tc = PRESETS["shapes"]
    n = 60 if q else 400
    manifest = os.path.join(out, "data", "manifest.jsonl")
    if not os.path.exists(manifest):
        print(f"demo: writing {n} shapes samples to {out}/data")
        data.make_shapes(os.path.join(out, "data"), n, seed=0)
    lap("data")
    # (1) §2.1 the VAE
    common = dict(preset="shapes", data=manifest, device=args.device, fsdp=False, cp=1, resume=args.resume,
                  lr=None, accum=None, rows=None, batch=None, ema=None, save_every=None, seed=None, workers=0,
                  iid_timesteps=False, i2v=False, bucket=False, grad_checkpoint=False, init=None, lpips=None,
                  max_bad_steps=args.max_bad_steps, stop_at=None, frames=None, size=None, max_tokens=None)
    ns = lambda **k: argparse.Namespace(**{**common, **k})
    vsteps = max(2, round(sum(tc.vae_steps) * scale))
    if not os.path.exists(os.path.join(out, "vae", "vae", "model.safetensors")):
        if train(ns(stage="vae", out=os.path.join(out, "vae"), steps=vsteps, vae=None, text_encoder=None,
                    cache=None))["stopped"]:
            return print("demo: stopped during VAE training; `python train.py --resume` continues") or {}
    vdir = os.path.join(out, "vae", "vae")
    lap("vae")
    # (2) the tiny T5 over every caption and prompt (word-level tokenizer, DESIGN §5 pitfall)
    t5 = os.path.join(out, "t5")
    if not os.path.exists(os.path.join(t5, "config.json")):
        texts = [e["caption"] for e in data.read_manifest(manifest)] + [p for p, _ in data.eval_prompts()]
        dit.build_tiny_t5(t5, texts, d_model=dit.DIT_PRESETS[tc.dit].text_dim)
    # (3) §3 the DiT, two progressive stages, from cached latents
    dsteps = ",".join(str(max(2, round(s * scale))) for s in tc.dit_steps)
    res = train(ns(stage="dit", out=os.path.join(out, "dit"), steps=dsteps, vae=vdir, text_encoder=t5,
                   cache=os.path.join(out, "cache")))
    if res["stopped"]:
        return print("demo: stopped during DiT training; `python train.py --resume` continues") or {}
    lap("dit")
    # (4) sample one video per evaluation prompt and check it. Guidance: measured on the demo's DiT over two
    # seeds, a lower scale kept the held-out pairings better (a high one pushes colours past the palette).
    net, ae, text, scfg = sample.load_ckpt(os.path.join(out, "dit"))
    prompts = data.eval_prompts()
    videos = sample.generate(net, ae, text, [p for p, _ in prompts], 9, 32, 32, steps=4 if q else 20, cfg=4.0,
                             seed=0, ac=diffusion.alphas_cumprod(snr_shift_scale=tc.snr_shift), progress=True)
    ok = {False: [0, 0], True: [0, 0]}
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    for i, ((p, held), v) in enumerate(zip(prompts, videos)):
        good = data.shapes_follow(v, p)
        ok[held][0] += good
        ok[held][1] += 1
        name = os.path.join(out, "samples", f"{i:02d}_{'held_' if held else ''}{p.replace(' ', '_')}")
        sample.write_mp4(v, name + ".mp4", 8)
        sample.contact_sheet(v, name + ".png")
    lap("sample")
    mins = (time.time() - t0) / 60
    print("demo: minutes per phase: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items()))
    line = (f"shapes: seen {ok[False][0]}/{ok[False][1]} follow their prompt, held-out {ok[True][0]}/{ok[True][1]} "
            f"({mins:.1f} min; videos and contact sheets in {out}/samples)")
    print(line)
    return {"seen": ok[False], "held": ok[True], "minutes": mins, "times": times, "dit_losses": res["losses"]}


# ----- CLI -----

def main(argv=None):
    p = argparse.ArgumentParser(description="Train the CogVideoX VAE or DiT (no arguments: the shapes demo).")
    p.add_argument("--stage", choices=["vae", "dit"], help="what to train (omit for the shapes demo)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--data", help="manifest .jsonl or folder (data.read_manifest)")
    p.add_argument("--out", help="output folder (checkpoints, log.jsonl, exported model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vae", help="DiT stage: trained VAE folder (CausalVAE.save)")
    p.add_argument("--text-encoder", help="DiT stage: T5 folder (dit.TextEncoder)")
    p.add_argument("--cache", help="DiT stage: latent / text-embedding cache folder (data.LatentCache)")
    p.add_argument("--init", help="start from these weights (a model folder), e.g. the T2V DiT for --i2v")
    p.add_argument("--lpips", help="VAE stage: local VGG16/LPIPS weight file(s) for the perceptual loss")
    p.add_argument("--recon", choices=["l1", "l2"], help="VAE stage: reconstruction loss (§2.1 says L2)")
    p.add_argument("--steps", help="steps per stage: N, or N1,N2,... one per stage (overrides the preset)")
    p.add_argument("--frames", help="frame counts for every stage, e.g. 1,9,17 (4k+1)")
    p.add_argument("--size", help="resolutions HxW for every stage, e.g. 32x32,32x48")
    p.add_argument("--max-tokens", type=int, help="Frame Pack row length (default: the stage's largest sample)")
    p.add_argument("--lr", type=float)
    p.add_argument("--accum", type=int, help="gradient accumulation micro-batches")
    p.add_argument("--rows", type=int, help="Frame Pack rows per rank")
    p.add_argument("--batch", type=int, help="samples per rank (VAE, bucket mode)")
    p.add_argument("--ema", type=float, help="EMA decay, e.g. 0.9999 (0 = off)")
    p.add_argument("--save-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--fsdp", action="store_true", help="shard the DiT with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--cp", type=int, default=1, help="VAE: ranks per context-parallel group (§2.1)")
    p.add_argument("--i2v", action="store_true", help="image-to-video fine-tune (App. A)")
    p.add_argument("--iid-timesteps", action="store_true", help="i.i.d. timesteps instead of §3.3's explicit uniform")
    p.add_argument("--bucket", action="store_true", help="one shape per batch (released code) instead of Frame Pack")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute each DiT block in backward")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt/latest")
    p.add_argument("--stop-at", type=int, help="write a checkpoint and exit after this step (as on SIGTERM)")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite losses in a row")
    p.add_argument("--quick", action="store_true", help="demo: a few steps only (a smoke test of the pipeline)")
    p.add_argument("--demo-scale", type=float, help="demo: multiply every step count by this")
    args = p.parse_args(argv)
    try:
        if args.stage is None:
            threads = torch.get_num_threads()  # demo() may drop to one thread on a busy machine: restore it after
            try:
                return demo(args)
            finally:
                torch.set_num_threads(threads)
        if not args.out:
            raise SettingsError("--out DIR is required with --stage (where checkpoints and logs go)")
        return train(args)
    except (SettingsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
