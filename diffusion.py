"""diffusion.py — CogVideoX's noise schedule, v-prediction and samplers
(paper §3, §3.3, Figure 3d).

Smallest piece first: the noise schedule (LDM "scaled linear" betas, the released models' SNR
shift, zero terminal SNR: §3 "we adopt v-prediction and zero SNR, following the noise schedule used
in LDM"); the forward process and v-prediction; timestep sampling for training (explicit uniform
sampling, §3.3, and the i.i.d. baseline); the samplers used at inference (DDIM η = 0 and DPM++(2M)
SDE with "trailing" timestep spacing, as released); classifier-free guidance (static and the
released dynamic schedule); the min-SNR loss weight (not in the paper; the toy demo's); the loss
per timestep range of Figure 3d. Nothing here knows about videos: every function works on tensors
of any shape (B, ...). The sampling defaults (steps, guidance, sampler) live in one place,
sample.py's SampleConfig and PRESETS.

Run:
  python diffusion.py                     # the schedule (ā, SNR) at the 50 trailing sampling steps
  python diffusion.py --shift 3.0 --steps 50 --sampler dpm
  python -m pytest -q tests/test_diffusion.py

Shape legend:
  B batch · ... any trailing dims (C, T', h, w for latents) · N = num_train_steps (1000)
"""

import argparse
import math

import torch

# "ddim": the released 2B scheduler (η = 0); "dpm": DPM++(2M) SDE, the released 5B scheduler.
SAMPLERS = ("ddim", "dpm")


# ----- noise schedule (§3) -----

def alphas_cumprod(num_steps=1000, beta_start=0.00085, beta_end=0.012, snr_shift_scale=1.0,
                   zero_terminal_snr=True):
    """ā_t for t = 0..N−1, float64 (N,). The defaults are the released schedule; snr_shift_scale
    s is 3.0 for the released 2B, 1.0 (no shift) for the 5B and for the toy shapes set (the shift
    makes every step noisier, which 480×720 video needs and a 32×32 toy does not).

    §3 "noise schedule used in LDM": β_t = linspace(√β_start, √β_end, N)²,
    ā_t = Π_{i≤t} (1 − β_i).
    Released code (not in the paper): the SNR shift ā/(1−ā) ← (ā/(1−ā)) / s, which in ā
    reads ā ← ā / (s + (1−s)·ā); it moves every step to lower SNR, as high-resolution video
    needs more noise to destroy the same amount of signal.
    §3 zero SNR (Lin et al. 2024, Alg. 1): shift and scale √ā so that √ā_{N−1} = 0 and
    √ā_0 is unchanged; the model then sees pure noise at t = N−1, exactly what sampling
    starts from.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (got {num_steps}); the released models use 1000")
    if not (math.isfinite(snr_shift_scale) and snr_shift_scale > 0):  # (NaN would pass a `<= 0`)
        raise ValueError(f"snr_shift_scale must be a finite number > 0 (got {snr_shift_scale}); "
                         "1.0 is no shift")
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)  # (N,)
    ac = ac / (snr_shift_scale + (1.0 - snr_shift_scale) * ac)  # SNR shift (released code)
    if zero_terminal_snr:
        root = ac.sqrt()  # (N,)
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))  # §3 zero SNR: last → 0, first kept
        ac = root**2
    return ac


# ----- forward process and v-prediction (§3) -----

def _at(ac, t, like):
    """ā[t] as a (B, 1, 1, …) tensor broadcastable against `like` (B, ...), in like's dtype.

    The schedule stays float64 until this gather, so √(1−ā) near ā → 1 keeps its
    precision."""
    t = torch.as_tensor(t, device=ac.device).long()
    if t.min() < 0 or t.max() >= len(ac):
        raise ValueError(f"timesteps must lie in [0, {len(ac) - 1}] "
                         f"(got min {int(t.min())}, max {int(t.max())})")
    a = ac[t].to(device=like.device, dtype=like.dtype)  # (B,)
    return a.view(-1, *([1] * (like.dim() - 1)))  # (B, 1, …)


def q_sample(x0, t, noise, ac):
    """x_t = √ā_t·x0 + √(1−ā_t)·ε (DDPM forward process, Eq. 1's argument)."""
    a = _at(ac, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0, noise, t, ac):
    """§3 v-prediction (Salimans & Ho 2022): v = √ā·ε − √(1−ā)·x0.

    Why v and not ε: at t = N−1 zero terminal SNR makes x_t pure noise, so predicting ε there is
    trivial and x̂0 = (x_t − √(1−ā)ε̂)/√ā divides by zero; v stays informative
    (v = −x0 at ā = 0).
    """
    a = _at(ac, t, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def x0_from_v(x_t, v, t, ac):
    """x̂0 = √ā·x_t − √(1−ā)·v̂ (exact inverse of q_sample + v_target,
    since ā + (1−ā) = 1)."""
    a = _at(ac, t, x_t)
    return a.sqrt() * x_t - (1 - a).sqrt() * v


def eps_from_v(x_t, v, t, ac):
    """ε̂ = √(1−ā)·x_t + √ā·v̂."""
    a = _at(ac, t, x_t)
    return (1 - a).sqrt() * x_t + a.sqrt() * v


# The training loss is plain MSE on v. The official (sat) code instead regresses x0 with weight
# 1/(1−ā); for a fixed x_t, x̂0 − x0 = √(1−ā)·(v − v̂),
# so ‖v − v̂‖² = ‖x̂0 − x0‖²/(1−ā): the same objective.


# ----- timestep sampling for training (§3.3) -----

def explicit_uniform_timesteps(batch_size, rank, world_size, num_steps=1000, generator=None):
    """§3.3 Explicit Uniform Sampling: LongTensor (batch_size,) of timesteps, one per stratum.

    N = world_size·batch_size samples; [0, num_steps) is cut into N strata and sample
    i = rank·batch_size + j draws uniformly inside [⌊i·T/N⌋, ⌊(i+1)·T/N⌋). The paper cuts
    the range by rank ("divide the range into n intervals, where n is the number of ranks; each
    rank samples within its interval"); stratifying every sample of the global batch does that
    and more.

    How training uses it: train.py calls it with rank 0, world_size 1 and batch_size N = the GLOBAL
    batch, from a generator keyed by (seed, step, micro-batch) only, so the draw is the same in
    every process and for any number of ranks. It then shuffles the N strata over the samples (the
    packer orders samples by length; a fixed stratum per slot would tie timesteps to clip length),
    and each rank takes the timesteps of its own slots: that is what lets "DDP on 2 ranks == one
    process" hold to the bit. With world_size > 1 the function returns one rank's slice of that
    same global draw, explicit_uniform_timesteps(b, r, w, g) ==
    explicit_uniform_timesteps(b·w, 0, 1, g)[r·b:(r+1)·b]; training does not call it that way.
    """
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1 (got {batch_size}, {world_size})")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}) (got {rank})")
    n = batch_size * world_size
    if n > num_steps:
        raise ValueError(f"global batch {n} > num_steps {num_steps}: strata would be empty; "
                         "use iid_timesteps")
    u = torch.rand(n, generator=generator, dtype=torch.float64)  # (N,) one per global sample
    i = torch.arange(n, dtype=torch.float64)  # (N,)
    lo = torch.floor(i * num_steps / n)  # (N,) stratum start
    hi = torch.floor((i + 1) * num_steps / n)  # (N,) stratum end (exclusive)
    t = (lo + torch.floor(u * (hi - lo))).long().clamp_(max=num_steps - 1)  # (N,)
    return t[rank * batch_size : (rank + 1) * batch_size]


def mass_strata_timesteps(masses, num_steps=1000, generator=None):
    """§3.3 explicit uniform sampling for a loss that weighs sample j by its mass w_j (its share
    of the batch's tokens): LongTensor (N,) of timesteps, one per sample.

    With count strata (explicit_uniform_timesteps) a clip holding half the batch's tokens gets
    one stratum of width 1/N yet half the loss, so the token-weighted distribution of t in a batch
    is far from uniform. Here the samples, in random order, cover a circle of circumference 1 with
    arcs of length w_j starting at a random offset; sample j draws t uniformly inside its own arc.
    The token mass is then stratified as §3.3 stratifies samples (every arc holds one draw), and
    each t_j alone is uniform on [0, 1) whatever its w_j (the random offset turns the circle), so
    the expected loss is unchanged. Equal masses give §3.3's strata, shifted by a common offset.
    (Precisely: on arcs starting at the offset the weighted CDF is within max_j w_j of uniform;
    on [0, x) within 2·max_j w_j. The per-step token-weighted mean of a function of t varies
    less than with count strata: tests/test_diffusion.py measures it.)"""
    w = torch.as_tensor(masses, dtype=torch.float64)  # (N,)
    n = len(w)
    if n < 1 or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError(f"masses must be >= 0 with a positive sum, got {w.tolist()}")
    w = w / w.sum()
    perm = torch.randperm(n, generator=generator)  # (N,) the order of the arcs
    u = torch.rand(n + 1, generator=generator, dtype=torch.float64)  # (N+1,) offset, then in-arc
    start = torch.cumsum(w[perm], 0) - w[perm] + u[0]  # (N,) arc starts on the circle
    pos = torch.remainder(start + u[1:] * w[perm], 1.0)  # (N,) in [0, 1)
    t = torch.empty(n, dtype=torch.long)
    t[perm] = torch.floor(pos * num_steps).long().clamp_(0, num_steps - 1)
    return t  # (N,)


def iid_timesteps(batch_size, num_steps=1000, generator=None):
    """The common practice §3.3 argues against: every sample draws t ~ U{0..N−1}
    independently."""
    return torch.randint(0, num_steps, (batch_size,), generator=generator)


# ----- samplers: DDIM and DPM++(2M) SDE (§3) -----

def sampling_timesteps(num_steps=50, num_train_steps=1000):
    """"trailing" spacing (Lin et al. 2024, Table 2), as in the released schedulers:
    round(arange(N, 0, −N/n)) − 1.

    For n = 50: 999, 979, …, 19. It always starts at N−1, where zero terminal SNR makes x_t pure
    noise. Rounding is half-to-even, like numpy's (torch.round does the same). The values are
    numpy's arange to the bit, N + i·δ with δ = (N − N/n) − N: torch.arange computes
    N − i·(N/n), which differs in the last bit, and where N/n·i is a half
    (n = 48: 937.5, 687.5, ...) the two round apart: 6 of the 48 timesteps were one off the
    released scheduler's. For some n (61, 103, ...) that arange has n + 1 values, the last t = −1:
    `sample` and the CLI take the first n."""
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}] (got {num_steps})")
    step = -num_train_steps / num_steps
    n = len(torch.arange(num_train_steps, 0, step, dtype=torch.float64))  # numpy's length too
    delta = (num_train_steps + step) - num_train_steps  # numpy's fill: the first gap, rounded
    ts = num_train_steps + torch.arange(n, dtype=torch.float64) * delta  # (n,)
    return torch.round(ts).long() - 1  # (n,)


def _log_snr_half(a):
    """λ = log √(ā/(1−ā)), with the end points made explicit: ā = 0 → −∞ (t = N−1),
    ā = 1 → +∞."""
    if a <= 0.0:
        return -math.inf
    if a >= 1.0:
        return math.inf
    return 0.5 * math.log(a / (1.0 - a))


def _ddim_step(x, v, a_t, a_prev):
    """DDIM, η = 0 (Song et al. 2021): x_prev = √ā_prev·x̂0 + √(1−ā_prev)·ε̂, written
    with the released schedulers' coefficients x_prev = c_x·x_t + c_0·x̂0 (the same thing,
    one multiply fewer)."""
    x0 = math.sqrt(a_t) * x - math.sqrt(1 - a_t) * v  # x̂0 from v̂
    c_x = math.sqrt((1 - a_prev) / (1 - a_t))
    c_0 = math.sqrt(a_prev) - math.sqrt(a_t) * c_x
    return c_x * x + c_0 * x0, x0


def _dpm_step(x, v, a_t, a_prev, a_back, x0_old, noise):
    """DPM-Solver++(2M) SDE step (Lu et al. 2022), as in the released 5B scheduler.

    With λ = log √(ā/(1−ā)) and h = λ_prev − λ_t:
      first order:  x_prev = √((1−ā_prev)/(1−ā_t))·e^{−h}·x_t
                    − (e^{−2h} − 1)·√ā_prev·x̂0 + σ·z
      second order: x̂0 → (1 + 1/2r)·x̂0 − (1/2r)·x̂0_old,  r = h_last / h
                    (multistep correction)
      σ = √(1−ā_prev)·√(1 − e^{−2h}), z fresh Gaussian noise (the "SDE" variant).
    At t = N−1 (ā = 0) λ = −∞ and h = +∞: e^{−h} = 0, so the step is
    x_prev = √ā_prev·x̂0 + √(1−ā_prev)·z — no NaN as long as the infinities are taken
    as limits, which _log_snr_half does explicitly."""
    x0 = math.sqrt(a_t) * x - math.sqrt(1 - a_t) * v  # x̂0 from v̂
    lam, lam_prev = _log_snr_half(a_t), _log_snr_half(a_prev)
    h = lam_prev - lam
    c_x = math.sqrt((1 - a_prev) / (1 - a_t)) * math.exp(-h)
    c_0 = math.expm1(-2 * h) * math.sqrt(a_prev)
    sigma = math.sqrt(1 - a_prev) * math.sqrt(-math.expm1(-2 * h))
    d = x0
    if x0_old is not None and a_back is not None:
        r = (lam - _log_snr_half(a_back)) / h  # h_last / h; +∞ right after t = N−1
        k = 0.0 if not math.isfinite(r) else 1.0 / (2.0 * r)
        d = (1 + k) * x0 - k * x0_old
    out = c_x * x - c_0 * d
    if sigma > 0:
        out = out + sigma * noise
    return out, x0


@torch.no_grad()
def sample(v_fn, x_T, alphas_cumprod, num_steps=50, sampler="ddim", generator=None, progress=False,
           noise=None, draw=None):
    """Integrate from pure noise x_T (B, ...) at t = N−1 down to x̂0 (B, ...).

    v_fn(x_t, t) -> v̂ with t a LongTensor (B,) of integer timesteps; classifier-free guidance
    lives in the v_fn the caller builds (see `guided`). sampler "ddim" (η = 0, deterministic) or
    "dpm" (DPM++(2M) SDE, fresh noise every step). The previous step of t is t − N // n (as
    released; not the next listed timestep when n does not divide N), and a step whose previous
    timestep would be negative goes to ā = 1, i.e. returns x̂0 itself (for n = 50 the last
    step, 19 → −1; for n = 7 the last step is 142 → 0, which still adds a little noise, as
    released).

    DPM++ noise, drawn as the released scheduler draws it, so a seed gives the released video:
    one draw on EVERY step (the last one too, where σ = 0 and it goes unused) and a second draw
    on every second-order step, which replaces the first. draw() -> one noise tensor shaped like
    x (default: torch.randn from `generator`; sample.py draws in the pipeline's own layout).
    `noise`, optional, is a list of num_steps tensors, the noise each step uses (exact replays;
    draws nothing).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use one of {SAMPLERS}")
    n_train = len(alphas_cumprod)
    ts = sampling_timesteps(num_steps, n_train)  # (n,), for some n (n + 1,): the loop takes n
    if noise is not None and len(noise) != num_steps:
        raise ValueError(f"noise must hold one tensor per step ({num_steps}), got {len(noise)}")
    if draw is None:
        draw = lambda: torch.randn(x_T.shape, generator=generator, dtype=x_T.dtype)  # noqa: E731
    ac = alphas_cumprod.double().cpu().tolist()  # python floats: the step coefficients are scalars
    stride = n_train // num_steps
    x, x0_old = x_T, None
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{sampler} sampling", unit="step")
    for i in steps:
        t = int(ts[i])
        a_t = ac[t]
        a_prev = ac[t - stride] if t - stride >= 0 else 1.0  # last step lands on ā = 1 (clean)
        v = v_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))  # (B, ...)
        if sampler == "ddim":
            x, _ = _ddim_step(x, v, a_t, a_prev)
            continue
        # Second order when there is a previous x̂0 and the step does not land on ā = 1 (the
        # released scheduler takes the first-order step onto ā = 1, even with history).
        second = x0_old is not None and t - stride >= 0
        if noise is not None:
            z = noise[i]
        else:
            z = draw()  # (B, ...) every step, as released
            z = draw() if second else z  # a second-order step draws again and uses that draw
        a_back = ac[int(ts[i - 1])] if second else None  # the previous listed (noisier) timestep
        x, x0_old = _dpm_step(x, v, a_t, a_prev, a_back, x0_old, z.to(x.device, x.dtype))
    return x


# ----- classifier-free guidance (§3) -----

def cfg_scale(scale, t, num_steps=50, dynamic=False):
    """Guidance weight w for one sampling step.

    Static: w = scale. Dynamic, as released (CogVideoX pipelines, use_dynamic_cfg):
        w = 1 + scale · (1 − cos(π · ((n − t) / n)^5)) / 2
    with n the number of *sampling* steps and t the timestep *value* (999 … 19), not the step
    index.
    Quirk: (n − t)/n is a large negative number (≈ −19 at t = 999, n = 50), so the cosine does
    not ramp smoothly from 1 to 1 + scale; w oscillates between 1 and 1 + scale from step to step.
    The authors say this is intended (CogVideo issue 267); we reproduce it as released."""
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"guidance scale must be a finite number >= 0 (got {scale}); "
                         "1 means no guidance, the released default is 6")
    if not dynamic:
        return float(scale)
    return 1.0 + scale * (1.0 - math.cos(math.pi * ((num_steps - float(t)) / num_steps) ** 5.0)) / 2


def guided(v_cond_uncond_fn, scale, num_steps=50, dynamic=False, min_t=0, v_cond_fn=None):
    """Wrap a model call into a guided v_fn for `sample`.

    v_cond_uncond_fn(x_t, t) -> (v_cond, v_uncond); the unconditional input is the all-zeros text
    embedding we train with (10% text dropout), or T5("") as the diffusers port does — the caller
    picks. v̂ = v_uncond + w·(v_cond − v_uncond): for a linear parameterisation guiding v equals
    guiding ε. With w = 1 the unconditional call is wasted, so callers may skip it (scale <= 1).

    min_t > 0 (not in the paper or the release, which guide every step): guidance only at
    timesteps t >= min_t, below it v̂ = v_cond, from v_cond_fn(x_t, t) when given (no
    unconditional call) — a guidance interval (Kynkäänniemi et al. 2024). Near the data,
    w·(v_c − v_u) is mostly the model's error, amplified w times: on the shapes demo's 6000-step
    DiT, guidance for t >= 400 only lifted the seen prompts from 68/96 to 86/96 (the squares'
    corners survive)."""

    def v_fn(x, t):
        if int(t[0]) < min_t:
            return v_cond_fn(x, t) if v_cond_fn is not None else v_cond_uncond_fn(x, t)[0]
        v_c, v_u = v_cond_uncond_fn(x, t)
        w = cfg_scale(scale, int(t[0]), num_steps, dynamic)
        return v_u + w * (v_c - v_u)

    return v_fn


# ----- loss weight per timestep (not in the paper: the shapes demo's recipe) -----

def min_snr_weight(t, ac, gamma):
    """Min-SNR-γ weight of a v-prediction loss (Hang et al. 2023):
    w_t = min(SNR_t, γ) / (SNR_t + 1), SNR_t = ā_t / (1 − ā_t). -> (B,) float32 in
    [0, γ/(γ+1)]; t (B,) timesteps, ac ā (N,).

    Not in the paper: CogVideoX (and the release) trains on the plain v-MSE, w = 1. With it the
    nearly-pure-noise steps dominate: at t >= 700, where x_t tells little and v ≈ −x0 is mostly
    unpredictable, the toy DiT's v-MSE is 4-25x that of t < 700 (its log's loss_by_t), while
    what the shapes demo fails on (a square's corners) is decided at moderate noise. w_t scales
    the noisy end by SNR/(SNR+1) (0 at the zero-SNR step) and caps the clean end at γ/(SNR+1),
    so the weight peaks where SNR = γ. Measured on the demo (train.PRESETS["shapes"], γ = 5)."""
    a = ac.to(t.device, torch.float64)[t]                                # (B,) ā_t
    snr = a / (1 - a).clamp(min=1e-12)                                   # (B,) 0 at ā = 0
    return (snr.clamp(max=gamma) / (snr + 1)).float()                    # (B,)


# ----- loss per timestep range (§3.3, Figure 3d) -----

def loss_by_bucket(loss, t, num_buckets=10, num_steps=1000):
    """Mean loss per timestep range, e.g. {"t000-099": 0.31, "t900-999": 0.02}, for the buckets
    present.

    Figure 3d compares training-loss curves; since the loss magnitude depends strongly on t, logging
    it per t-range separates "the model got better" from "this batch drew easier timesteps" — the
    very fluctuation explicit uniform sampling removes. loss (B,) per-sample losses, t (B,) their
    timesteps."""
    loss, t = loss.detach().float().flatten().cpu(), torch.as_tensor(t).flatten().cpu()
    if loss.shape != t.shape:
        raise ValueError(f"loss and t must have one value per sample "
                         f"(got {tuple(loss.shape)} and {tuple(t.shape)})")
    if len(t) and (t.min() < 0 or t.max() >= num_steps):
        raise ValueError(f"timesteps must lie in [0, {num_steps - 1}] "
                         f"(got min {int(t.min())}, max {int(t.max())})")
    if not 1 <= num_buckets <= num_steps:
        raise ValueError(f"num_buckets must be in [1, {num_steps}] (got {num_buckets})")
    width = math.ceil(num_steps / num_buckets)
    idx = (t // width).clamp(max=num_buckets - 1)  # (B,) bucket of each sample
    out = {}
    for b in idx.unique().tolist():
        lo, hi = b * width, min((b + 1) * width, num_steps) - 1
        out[f"t{lo:03d}-{hi:03d}"] = loss[idx == b].mean().item()
    return out


# ----- CLI -----

def main(argv=None):
    p = argparse.ArgumentParser(description="Print the CogVideoX noise schedule at sampling steps.")
    p.add_argument("--shift", type=float, default=1.0, help="SNR shift scale s (2B: 3.0, 5B: 1.0)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (trailing spacing)")
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS, help="shown in the header")
    a = p.parse_args(argv)
    try:  # validate before printing anything: one clear line, not a traceback
        ac = alphas_cumprod(snr_shift_scale=a.shift)  # (N,)
        # the steps `sample` takes: for some n (61, 103, ...) numpy's arange, as released, yields
        # one value more, t = -1, which no sampler runs (ac[-1] would print ā[N-1])
        ts = sampling_timesteps(a.steps, len(ac))[:a.steps]  # (n,)
    except ValueError as e:
        p.error(str(e))
    print(f"schedule: N={len(ac)} shift={a.shift} zero_terminal_snr=True sampler={a.sampler} "
          f"steps={a.steps}")
    print(f"{'step':>4} {'t':>4} {'abar':>10} {'log10 SNR':>10}")
    for i, t in enumerate(ts.tolist()):
        a_t = ac[t].item()
        snr = "-inf" if a_t == 0 else f"{math.log10(a_t / (1 - a_t)):10.3f}"
        print(f"{i:>4} {t:>4} {a_t:>10.6f} {snr:>10}")


if __name__ == "__main__":
    main()
