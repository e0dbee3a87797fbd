"""diffusion.py: the schedule, v-prediction identities, explicit uniform sampling (§3.3), and the
samplers against diffusers' CogVideoX schedulers (the oracle) on a fixed v_fn and the same noise."""


import pytest
import torch

import diffusion as D

# Reference values of ā for the released schedule (LDM betas 0.00085..0.012, SNR shift s, zero terminal
# SNR), checked against the public code: s = 3 is the released 2B, s = 1 the 5B.
REF = {
    3.0: {0: 0.997454, 250: 0.389054, 500: 0.0953281, 750: 0.0108389, 999: 0.0},
    1.0: {0: 0.99915, 250: 0.652457, 500: 0.241019, 750: 0.0327991},
}


@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_schedule_reference_values(shift):
    ac = D.alphas_cumprod(snr_shift_scale=shift)
    assert ac.dtype == torch.float64 and ac.shape == (1000,)
    for t, ref in REF[shift].items():
        assert ac[t].item() == pytest.approx(ref, rel=2e-6, abs=1e-7), (shift, t)
    assert ac[-1].item() == 0.0  # zero terminal SNR, exactly
    assert torch.all(ac[1:] < ac[:-1])  # monotone: more noise at every step


def _diffusers_sched(kind, shift, steps):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    cls = CogVideoXDDIMScheduler if kind == "ddim" else CogVideoXDPMScheduler
    s = cls(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
            snr_shift_scale=shift, clip_sample=False, set_alpha_to_one=True, beta_schedule="scaled_linear",
            beta_start=0.00085, beta_end=0.012)
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_schedule_equals_diffusers(shift):
    s = _diffusers_sched("ddim", shift, 50)
    ours = D.alphas_cumprod(snr_shift_scale=shift)
    assert torch.equal(ours, s.alphas_cumprod.double())
    assert torch.equal(D.sampling_timesteps(50), s.timesteps)  # 999, 979, …, 19
    for n in (7, 13, 50, 1000):
        assert torch.equal(D.sampling_timesteps(n), _diffusers_sched("ddim", shift, n).timesteps), n


def test_sampling_timesteps_equal_diffusers_for_every_step_count():
    """Every n in 1..N, for N = 1000 and the odd N = 999: the released trailing timesteps to the
    integer (numpy's arange rounds apart from torch's where N/n·i is a half: n = 48, 96, ...)."""
    for N in (1000, 999):
        s = _diffusers_sched("ddim", 1.0, 1)
        s.register_to_config(num_train_timesteps=N)
        off = []
        for n in range(1, N + 1):
            s.set_timesteps(n)
            if not torch.equal(D.sampling_timesteps(n, N), s.timesteps):
                off.append(n)
        assert not off, (N, off[:10], len(off))


def test_v_prediction_identities():
    g = torch.Generator().manual_seed(0)
    ac = D.alphas_cumprod(snr_shift_scale=3.0)
    x0 = torch.randn(6, 4, 3, 5, 5, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    xt = D.q_sample(x0, t, eps, ac)
    v = D.v_target(x0, eps, t, ac)
    torch.testing.assert_close(D.x0_from_v(xt, v, t, ac), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(D.eps_from_v(xt, v, t, ac), eps, atol=1e-5, rtol=0)
    # at t = 999 (ā = 0) x_t is pure noise and v = −x0: nothing to divide by zero
    torch.testing.assert_close(xt[-1], eps[-1])
    torch.testing.assert_close(v[-1], -x0[-1])
    # MSE on v equals the official x0 loss weighted by 1/(1−ā) (for t < 999; there both are ‖x0‖²-like)
    v_hat = v + 0.1 * torch.randn(v.shape, generator=g)
    x0_hat = D.x0_from_v(xt, v_hat, t, ac)
    a = ac[t].float().view(-1, 1, 1, 1, 1)
    lhs = ((v_hat - v) ** 2).mean(dim=(1, 2, 3, 4))
    rhs = (((x0_hat - x0) ** 2) / (1 - a)).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-6)


def test_bad_arguments_raise_clear_errors():
    ac = D.alphas_cumprod()
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="timesteps must lie"):
        D.q_sample(x, torch.tensor([0, 1000]), x, ac)
    with pytest.raises(ValueError, match="unknown sampler"):
        D.sample(lambda x, t: x, x, ac, sampler="euler")
    with pytest.raises(ValueError, match="num_steps must be in"):
        D.sample(lambda x, t: x, x, ac, num_steps=0)
    with pytest.raises(ValueError, match="rank must be"):
        D.explicit_uniform_timesteps(2, 3, 2)
    with pytest.raises(ValueError, match="strata would be empty"):
        D.explicit_uniform_timesteps(8, 0, 200)
    for bad in (0, float("nan"), float("inf")):  # NaN and inf would pass a `<= 0` test
        with pytest.raises(ValueError, match="snr_shift_scale"):
            D.alphas_cumprod(snr_shift_scale=bad)


# ----- explicit uniform sampling (§3.3) -----


def test_every_sample_in_its_own_stratum():
    T = 1000
    for world in range(1, 17):
        for batch in range(1, 9):
            n = world * batch
            g = torch.Generator().manual_seed(world * 100 + batch)
            for rank in range(world):
                t = D.explicit_uniform_timesteps(batch, rank, world, T, generator=g)
                assert t.shape == (batch,) and t.dtype == torch.long
                for j, tj in enumerate(t.tolist()):
                    i = rank * batch + j
                    assert (i * T) // n <= tj < ((i + 1) * T) // n, (world, batch, rank, j, tj)


def test_rank_slices_equal_the_global_draw():
    # rank r's share is its slice of the one global draw (train.py draws the global batch with
    # world_size 1 and each rank takes its own slots, so DDP on w ranks == one process)
    for world, batch in [(2, 3), (4, 1), (3, 5)]:
        full = D.explicit_uniform_timesteps(world * batch, 0, 1, generator=torch.Generator().manual_seed(7))
        parts = [D.explicit_uniform_timesteps(batch, r, world, generator=torch.Generator().manual_seed(7))
                 for r in range(world)]
        assert torch.equal(torch.cat(parts), full)


def test_explicit_uniform_steadies_the_per_step_mean():
    # §3.3's claim: the loss magnitude depends on t, so an uneven draw of t makes the per-step loss jump.
    # Proxy for the loss magnitude: the official x0-loss weight's scale is set by ā; we measure the
    # per-step mean of t and of ā over 8 ranks × 1 sample, explicit vs i.i.d.
    g = torch.Generator().manual_seed(0)
    ac = D.alphas_cumprod(snr_shift_scale=3.0)
    steps, world = 2000, 8
    exp_t = torch.stack([torch.cat([D.explicit_uniform_timesteps(1, r, world, generator=g) for r in range(world)])
                         for _ in range(steps)])  # (steps, world)
    iid_t = torch.stack([D.iid_timesteps(world, generator=g) for _ in range(steps)])  # (steps, world)
    for f in (lambda t: t.double(), lambda t: ac[t]):
        s_exp = f(exp_t).mean(1).std().item()
        s_iid = f(iid_t).mean(1).std().item()
        assert s_exp < 0.25 * s_iid, (s_exp, s_iid)
    # both are unbiased: the overall mean of t is (T−1)/2
    assert exp_t.double().mean().item() == pytest.approx(499.5, abs=3)


# ----- samplers vs diffusers (§3) -----


def _v_fn(x, t):
    # a fixed, nonlinear, t-dependent stand-in for the model
    return torch.tanh(0.7 * x + 0.3 * x.roll(1, dims=-1)) * (0.5 + t.float().view(-1, *[1] * (x.dim() - 1)) / 1000)


@pytest.mark.parametrize("shift,steps", [(3.0, 50), (1.0, 50), (3.0, 7)])
def test_ddim_matches_diffusers(shift, steps):
    ac = D.alphas_cumprod(snr_shift_scale=shift)
    x_T = torch.randn(2, 4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    ours = D.sample(_v_fn, x_T.clone(), ac, num_steps=steps, sampler="ddim")
    s = _diffusers_sched("ddim", shift, steps)
    x = x_T.clone()
    for t in s.timesteps:
        x = s.step(_v_fn(x, t.repeat(x.shape[0])), t, x, return_dict=False)[0]
    assert torch.isfinite(ours).all()
    assert (ours - x).abs().max().item() <= 1e-5


@pytest.mark.parametrize("shift,steps", [(1.0, 50), (3.0, 50), (1.0, 7)])
def test_dpm_matches_diffusers_with_the_same_noise(shift, steps):
    ac = D.alphas_cumprod(snr_shift_scale=shift)
    x_T = torch.randn(2, 4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    s = _diffusers_sched("dpm", shift, steps)
    # diffusers' loop (as in CogVideoXPipeline), drawing from a seeded generator
    g = torch.Generator().manual_seed(123)
    x, old = x_T.clone(), None
    for i, t in enumerate(s.timesteps):
        back = s.timesteps[i - 1] if i > 0 else None
        x, old = s.step(_v_fn(x, t.repeat(x.shape[0])), old, t, back, x, generator=g, return_dict=False)
    # replay the scheduler's draw order: one draw per step, two on the second-order steps (i > 0 and a
    # previous timestep t − 1000//n >= 0; the first draw is discarded). With n = 7 the last t is 142 and
    # its previous step is t = 0, so even the last step is second order there.
    g = torch.Generator().manual_seed(123)
    noise = []
    for i, t in enumerate(s.timesteps.tolist()):
        z = torch.randn(x_T.shape, generator=g)
        if i > 0 and t - 1000 // steps >= 0:
            z = torch.randn(x_T.shape, generator=g)
        noise.append(z)
    ours = D.sample(_v_fn, x_T.clone(), ac, num_steps=steps, sampler="dpm", noise=noise)
    assert torch.isfinite(ours).all()
    assert (ours - x).abs().max().item() <= 1e-5
    # and drawing from the same seeded generator itself: the sampler keeps the released draw order
    ours = D.sample(_v_fn, x_T.clone(), ac, num_steps=steps, sampler="dpm",
                    generator=torch.Generator().manual_seed(123))
    assert (ours - x).abs().max().item() <= 1e-5


def test_samplers_are_finite_for_one_and_two_steps_and_seeded():
    ac = D.alphas_cumprod()
    x_T = torch.randn(1, 2, 4)
    for sampler in D.SAMPLERS:
        for n in (1, 2):
            assert torch.isfinite(D.sample(_v_fn, x_T, ac, num_steps=n, sampler=sampler)).all()
    a = D.sample(_v_fn, x_T, ac, 5, "dpm", generator=torch.Generator().manual_seed(3))
    b = D.sample(_v_fn, x_T, ac, 5, "dpm", generator=torch.Generator().manual_seed(3))
    c = D.sample(_v_fn, x_T, ac, 5, "dpm", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddim_recovers_x0_for_the_oracle_v():
    # if the model knows x0 exactly, v̂(x_t, t) = (√ā x_t − x0)/√(1−ā) and every sampler must land on x0
    ac = D.alphas_cumprod(snr_shift_scale=3.0)
    x0 = torch.rand(3, 2, 5) * 2 - 1

    def oracle(x, t):
        a = ac[t].float().view(-1, 1, 1)
        return (a.sqrt() * x - x0) / (1 - a).sqrt()

    for sampler in D.SAMPLERS:
        out = D.sample(oracle, torch.randn(x0.shape), ac, num_steps=10, sampler=sampler, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


# ----- guidance and loss buckets (§3, Figure 3d) -----


def test_cfg_static_and_dynamic():
    assert D.cfg_scale(6.0, 999) == 6.0
    ts = D.sampling_timesteps(50).tolist()
    w = [D.cfg_scale(6.0, t, 50, dynamic=True) for t in ts]
    assert all(1.0 - 1e-9 <= x <= 7.0 + 1e-9 for x in w)
    # the released quirk: w oscillates instead of ramping monotonically
    diffs = [b - a for a, b in zip(w, w[1:])]
    assert any(d > 0.1 for d in diffs) and any(d < -0.1 for d in diffs)
    # reference values of the released expression (CogVideoXPipeline, use_dynamic_cfg), computed once in
    # float64: ((50 − t)/50)^5 is −2,463,094.3 at t = 999, −2,214,259.7 at t = 979 and −5.0049 at t = 119
    for t, ref in [(999, 2.291487), (979, 2.543503), (119, 6.999645)]:
        assert D.cfg_scale(6.0, t, 50, True) == pytest.approx(ref, abs=2e-3), t
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance scale"):
            D.cfg_scale(bad, 999)
    vc, vu = torch.ones(2, 3), torch.zeros(2, 3)
    v = D.guided(lambda x, t: (vc, vu), 6.0)(torch.zeros(2, 3), torch.tensor([999, 999]))
    torch.testing.assert_close(v, torch.full((2, 3), 6.0))


def test_guidance_interval():
    """min_t: guided at t >= min_t, below it the conditional prediction alone, taken from
    v_cond_fn when given (the unconditional model never runs there)."""
    vc, vu, x = torch.ones(2, 3), torch.zeros(2, 3), torch.zeros(2, 3)
    calls = []
    both = lambda x, t: calls.append("both") or (vc, vu)  # noqa: E731
    cond = lambda x, t: calls.append("cond") or 2 * vc  # noqa: E731
    at = lambda t: torch.tensor([t, t])  # noqa: E731
    torch.testing.assert_close(D.guided(both, 6.0, min_t=400)(x, at(400)), torch.full((2, 3), 6.0))
    torch.testing.assert_close(D.guided(both, 6.0, min_t=400)(x, at(399)), vc)
    assert calls == ["both", "both"]
    calls.clear()
    torch.testing.assert_close(D.guided(both, 6.0, min_t=400, v_cond_fn=cond)(x, at(399)), 2 * vc)
    torch.testing.assert_close(D.guided(both, 6.0, min_t=400, v_cond_fn=cond)(x, at(999)),
                               torch.full((2, 3), 6.0))
    assert calls == ["cond", "both"]


def test_min_snr_weight():
    """min(SNR, γ) / (SNR + 1) per sample, from the schedule's ā: 0 at the zero-SNR step,
    SNR / (SNR + 1) on the noisy side, γ / (SNR + 1) on the clean side, γ / (γ + 1) at most."""
    ac = D.alphas_cumprod()
    t = torch.tensor([0, 250, 500, 999])
    w = D.min_snr_weight(t, ac, 5.0)
    assert w.shape == (4,) and w.dtype == torch.float32
    snr = {k: REF[1.0][k] / (1 - REF[1.0][k]) for k in (0, 250, 500)}  # 1175.5, 1.88, 0.318
    assert w[0].item() == pytest.approx(5 / (snr[0] + 1), rel=1e-5)        # clean: capped
    assert w[1].item() == pytest.approx(snr[250] / (snr[250] + 1), rel=1e-5)  # SNR < γ
    assert w[2].item() == pytest.approx(snr[500] / (snr[500] + 1), rel=1e-5)
    assert w[3].item() == 0.0
    every = D.min_snr_weight(torch.arange(1000), ac, 5.0)
    assert every.max().item() <= 5 / 6 + 1e-6 and every.min().item() >= 0.0
    cross = int((ac / (1 - ac) >= 5).sum())  # the first step with SNR < γ
    assert every.argmax().item() in (cross - 1, cross)  # the peak: one of the two around SNR = γ


def test_loss_by_bucket():
    loss = torch.tensor([1.0, 3.0, 10.0, 0.5])
    t = torch.tensor([5, 99, 100, 999])
    out = D.loss_by_bucket(loss, t, num_buckets=10)
    assert out == {"t000-099": 2.0, "t100-199": 10.0, "t900-999": 0.5}
    with pytest.raises(ValueError, match="one value per sample"):
        D.loss_by_bucket(loss, t[:2])
    with pytest.raises(ValueError, match="timesteps must lie"):
        D.loss_by_bucket(loss, torch.tensor([5, 99, 100, 1000]))


def test_cli_prints_the_schedule_and_rejects_bad_arguments(capsys):
    """`python diffusion.py` (a real process: its exit code and output) prints the 2B schedule; bad
    values are one `error:` line and exit code 2, no traceback (main() in this process: a traceback
    would be an exception other than SystemExit)."""
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "diffusion.py", "--shift", "3.0", "--steps", "5"],  # the 2B
                        capture_output=True, text=True, cwd=D.__file__.rsplit("/", 1)[0])
    assert ok.returncode == 0 and " 999 " in ok.stdout and "0.000000" in ok.stdout
    for bad in (["--steps", "0"], ["--shift", "-1"], ["--shift", "nan"], ["--shift", "inf"]):
        with pytest.raises(SystemExit) as e:
            D.main(bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err and "error:" in err, bad


@pytest.mark.parametrize("steps", [61, 103, 50])
def test_cli_prints_the_steps_the_sampler_takes(steps, capsys):
    """`--steps n` prints n rows, the timesteps `sample` runs: for n = 61, 103, ... numpy's
    arange (sampling_timesteps, as released) yields one value more, t = -1, and the table printed
    a step n at t = -1 with ā[-1] = ā[999] = 0 that no sampler takes."""
    D.main(["--steps", str(steps)])
    rows = capsys.readouterr().out.splitlines()[2:]
    ts = [int(r.split()[1]) for r in rows]
    assert len(ts) == steps and min(ts) >= 0, ts[-3:]
    assert ts == D.sampling_timesteps(steps)[:steps].tolist()


def test_mass_strata_hold_for_a_token_weighted_loss():
    """Issue 17: the DiT's loss weighs each sample by its tokens, so §3.3's strata are laid over
    token mass (mass_strata_timesteps). Each sample's t alone stays uniform (the expected loss is
    unchanged); the weighted mass of t is stratified (within 2·max w of uniform on every [0, x));
    and the per-step token-weighted mean of ā(t), the loss-scale proxy of the test above, varies
    less than with count strata (and i.i.d. draws) on a mix of clips and images."""
    ac = D.alphas_cumprod(snr_shift_scale=3.0).double()
    w = torch.tensor([21.0, 13, 13, 5, 5, 5] + [1] * 10, dtype=torch.float64)  # latent frames
    w, n = w / w.sum(), len(w)
    g = torch.Generator().manual_seed(0)
    mass, count, iid, ts = [], [], [], []
    for _ in range(3000):
        t = D.mass_strata_timesteps(w, generator=g)
        assert t.shape == (n,) and t.dtype == torch.long and 0 <= t.min() and t.max() < 1000
        o = torch.argsort(t)
        cdf, x = torch.cumsum(w[o], 0), t[o].double() / 1000
        assert ((cdf - w[o] - x).abs().max() <= 2 * w.max() + 1e-3
                and (cdf - x - 1e-3).abs().max() <= 2 * w.max() + 1e-3)
        ts.append(t)
        mass.append((w * ac[t]).sum())
        t = D.explicit_uniform_timesteps(n, 0, 1, generator=g)[torch.randperm(n, generator=g)]
        count.append((w * ac[t]).sum())
        iid.append((w * ac[D.iid_timesteps(n, generator=g)]).sum())
    ts = torch.stack(ts)  # (3000, n)
    for j in (0, n - 1):  # the heaviest and a lightest sample: each uniform on its own
        hist = torch.bincount(ts[:, j] // 100, minlength=10).double() / len(ts)
        assert (hist - 0.1).abs().max() < 0.025, hist
    std = lambda v: torch.stack(v).std().item()
    assert std(mass) < 0.85 * std(count) < 0.85 * std(iid), (std(mass), std(count), std(iid))
    assert abs(torch.stack(mass).mean() - ac.mean()) < 0.01  # unbiased
    eq = D.mass_strata_timesteps([1.0] * 8, generator=torch.Generator().manual_seed(1))
    gaps = torch.diff(torch.sort(eq).values)  # equal masses: §3.3's strata, one offset
    assert (gaps - 125).abs().max() <= 125
    with pytest.raises(ValueError, match="masses"):
        D.mass_strata_timesteps([0.0, 0.0])
