"""torchrun worker for tests/test_vae.py: context-parallel VAE == one process (§2.1, Fig. 2b).

  torchrun --standalone --nproc_per_node 2 tests/_vae_cp_worker.py [T H B [MODE]]

MODE "check" (default): every rank builds the same tiny VAE and clip (seeded), runs the whole clip
in one process, then its own share with cp_group, and checks that the latents (mean, logvar), the
reconstruction (also with forward's own sampling from a seeded generator) and every parameter
gradient (summed over ranks) equal the single-process run within 1e-5 absolute (CP is exact up
to float rounding: same GroupNorm statistics, same halo frames, halo gradients sent back), and
the input gradient, whose entries are tiny (the loss weights are divided by the clip size),
within 1e-5 absolute AND 1e-5 of its largest entry (an absolute bound alone would pass any error
at that scale). Exits 1 on a mismatch.
MODE "cp" / "single": run only that forward+backward and print this process's peak memory: the
peak RSS (VmHWM) above the RSS before the run, the memory the run itself adds; run "single" with
--nproc_per_node 1. Separate processes, because a process that already ran once reuses its freed
heap and under-reports the second run.
"""
import os
import sys

import torch
import torch.distributed as dist

# the project files live at the repo root (no package): found when run by hand from anywhere
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vae import VAE_PRESETS, CausalVAE, cp_gather, cp_split  # noqa: E402

TOL = 1e-5


def _status(key):  # MB from /proc/self/status
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024


def _peak_mb(fn):
    """Run fn and return (result, peak RSS above the RSS at the start, in MB)."""
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets this process's peak RSS (VmHWM)
        f.write("5")
    base = _status("VmRSS")
    out = fn()
    return out, _status("VmHWM") - base


def _loss(vae, x, wx, wz, group):
    """A loss that touches every output: weighted sums of the reconstruction, the latent mean and
    the KL."""
    post = vae.encode(x, cp_group=group)
    y = vae.decode(post.mean, cp_group=group)
    return (y * wx).sum() + (post.mean * wz).sum() + 1e-2 * post.kl().sum(), post, y


def main():
    args = sys.argv[1:] + ["9", "32", "1", "check"][len(sys.argv) - 1:]
    T, H, B, mode = int(args[0]), int(args[1]), int(args[2]), args[3]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))  # a non-default group: exercises the rank mapping
    torch.manual_seed(0)
    vae = CausalVAE(VAE_PRESETS["tiny"])
    params = list(vae.parameters())
    sf, tf = vae.cfg.spatial_factor, vae.cfg.temporal_factor
    x = torch.randn(B, 3, T, H, H)
    wx = torch.randn_like(x) / x.numel()  # keeps gradients O(1)
    wz = torch.randn(B, vae.cfg.latent, (T - 1) // tf + 1, H // sf, H // sf) / x.numel()

    def single():
        xs = x.clone().requires_grad_()
        loss, post, y = _loss(vae, xs, wx, wz, None)
        outs = [t.detach() for t in (post.mean, post.logvar, y)]
        return outs, torch.autograd.grad(loss, params + [xs])

    def parallel():
        xl = cp_split(x, group, tf).clone().requires_grad_()
        loss, post, y = _loss(vae, xl, cp_split(wx, group, tf), cp_split(wz, group, 1), group)
        outs = [t.detach() for t in (post.mean, post.logvar, y)]
        return outs, torch.autograd.grad(loss, params + [xl])

    if mode in ("cp", "single"):
        _, mb = _peak_mb(parallel if mode == "cp" else single)
        frames = cp_split(x, group, tf).shape[2]
        print(f"rank {rank}/{world} {mode} T={T} H=W={H} B={B} frames {frames} | peak MB {mb:.1f}",
              flush=True)
        dist.destroy_process_group()
        return

    (cp_out, cp_grads), (ref_out, ref_grads) = parallel(), single()
    pg = torch.cat([g.flatten() for g in cp_grads[:-1]])
    dist.all_reduce(pg, group=group)  # each rank holds its share of every parameter's gradient
    pairs = {  # name: (ours under CP, the same part of the single-process run)
        "mean": (cp_out[0], cp_split(ref_out[0], group, 1)),
        "logvar": (cp_out[1], cp_split(ref_out[1], group, 1)),
        "recon": (cp_out[2], cp_split(ref_out[2], group, tf)),
        "recon_gathered": (cp_gather(cp_out[2], group), ref_out[2]),
        "input_grad": (cp_grads[-1], cp_split(ref_grads[-1], group, tf)),
        "param_grad": (pg, torch.cat([g.flatten() for g in ref_grads[:-1]])),
    }
    with torch.no_grad():  # forward's own sampling: one draw of the clip's noise, split
        y1, _ = vae(x, generator=torch.Generator().manual_seed(3))
        yc, _ = vae(cp_split(x, group, tf), group, generator=torch.Generator().manual_seed(3))
    pairs["sampled_recon"] = (yc, cp_split(y1, group, tf))
    diff = {k: (a - b).abs().max().item() for k, (a, b) in pairs.items()}
    g_max = pairs["input_grad"][1].abs().max().item()  # the reference input gradient's maximum
    limit = {k: TOL * min(1.0, g_max) if k == "input_grad" else TOL for k in pairs}
    print(f"rank {rank}/{world} T={T} H=W={H} B={B} frames {cp_split(x, group, tf).shape[2]} | "
          f"max abs diff " + " ".join(f"{k} {v:.1e}" for k, v in diff.items())
          + f" | input_grad max {g_max:.1e}", flush=True)
    bad = {k: v for k, v in diff.items() if not v <= limit[k]}
    dist.destroy_process_group()
    if bad:
        print(f"rank {rank}: MISMATCH {bad}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()  # (a mismatch exits 1 in main)
    # Leave as train.leave does, past the interpreter's teardown: collectives ran inside
    # backward(), and gloo's threads freeing their records then can abort a finished worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
