"""Performance of nano-cogvideox, measured side by side with the diffusers port (issue 9).

A script, not a test (pytest does not collect it: the name does not start with test_). One run, one
machine, the same random weights on both sides (a diffusers model is saved, ours loads that folder with
`from_diffusers`), the two implementations alternated rep by rep, medians quoted. Sections:

  dit     forward+backward time, ours / diffusers, at a small-but-real config and at twice the frames
  mfu     our DiT training step's achieved FLOP/s against a measured fp32 2048^2 matmul rate ("MFU");
          the FLOP count is written out in `dit_flops` (matmuls of projections, MLP and attention, x3)
  pack    Frame Pack (`forward_packed`, §3.1) vs pad-to-longest (the released code's mode): real tokens/s
  attn    Frame Pack attention modes (dit.packed_attention): the dense (M, M) mask vs segments
          (each sample's span alone, the sampler's rows) vs auto (on a CPU: every sample in one
          row, shape after shape: dit.flat_layout), tiny DiT fwd+bwd, at the shapes demo's rows
          and at longer rows; this sets dit.DENSE_MAX_TOKENS and flat_layout (not in the default
          --only)
  vae     encode+decode time (in this process, alternated) and peak memory (one fresh process per
          implementation and size: peak RSS minus RSS after the model is built) of our
          streaming mode vs diffusers' default frame-batched mode, at 17 and 49 frames
  cp      context-parallel VAE training step (encode+decode+backward) on 2 ranks (torchrun, gloo) vs one
          process of the same whole-sequence computation: time and per-rank peak memory
  sim     (not in the default run; ~5-15 min) train.py's step simulator next to the same simulation
          of diffusers' CogVideoXTransformer3DModel (its own gradient checkpointing): one training
          step per rank of 8 fake FSDP2 ranks, bf16, one 49x480x720 clip per rank, 2B and 5B
  loader  decoded clips/s through train.py's DataLoader (persistent workers, prefetch, random
          start and crop) with 0, 1, 2 workers on mp4 / webm / avi clips, and the data wait of a
          150 ms step

Run (about 3-5 minutes on 2 cores; timings are meaningless on a loaded machine, see --max-load):
  python tests/bench.py --out bench.json
  python tests/bench.py --only dit,mfu --reps 15        # a subset
  python tests/bench.py --threads 1                     # what a shared machine can still measure
  python tests/bench.py --only attn --threads 1 --reps 7  # dense / segments / auto (about 3 minutes)
Every number is printed in one table with its target; the JSON holds the same rows plus raw samples.

Legend: ms = milliseconds (median over reps), MB = peak RSS above the post-build RSS, MFU = achieved
FLOP/s / matmul FLOP/s, tok/s = real (unpadded) text + video tokens per second.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the component files live at top level (no package)

# The benchmark DiT (issue 9): 4 layers, 4 heads x 64, 16 latent channels, latent 5x16x16, 32 text tokens.
DIT = dict(layers=4, heads=4, head_dim=64, channels=16, frames=5, size=16, text_len=32, text_dim=4096, time_dim=512)
# A reduced-channel VAE with the released structure (4 levels, 3 blocks each, 2 time levels, 16 latents).
VAE = dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, layers_per_block=3, latent_channels=16)
VAE_SIZE = 64
# The Frame Pack batch: latent frames per sample (1 = image; 3, 5, 9 = 9-, 17-, 33-frame clips).
PACK_FRAMES = [9, 5, 5, 3, 3, 1, 1, 1, 1]
TARGETS = {"dit": 0.9, "vae_time": 1.0, "vae_mem": 1.0, "mfu": 0.40, "pack": 1.3, "cp_mem": 0.65,
           "sim": 0.8}


# ----- helpers -----

def median_time(fn, reps, warmup=1):
    """Median wall time in seconds of fn() over reps calls after warmup calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def alternate(fns, reps, warmup=1, before=None):
    """Time several implementations of the same work, interleaved (a, b, b, a, a, b, ...) so that load
    drifts hit both alike. fns: {name: fn}; before(name) runs untimed before each call. -> {name: [s]}."""
    for name, fn in fns.items():
        for _ in range(warmup):
            before and before(name)
            fn()
    out = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            before and before(name)
            t0 = time.perf_counter()
            fns[name]()
            out[name].append(time.perf_counter() - t0)
    return out


def med(xs):
    return statistics.median(xs)


def status_mb(key):
    """VmRSS / VmHWM of this process in MB (Linux /proc)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def reset_peak():
    """Writing "5" to clear_refs resets VmHWM (peak RSS) to the current RSS, so the peak measured after
    this point is the run's own. Returns the baseline RSS (MB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mb("VmRSS")


def profile_ops(title, fn, before=None, reps=3, rows=14):
    """Where the time goes: torch.profiler self-time per op over reps calls (--profile)."""
    from torch.profiler import profile
    before and before()
    fn()
    with profile() as prof:
        for _ in range(reps):
            before and before()
            fn()
    print(f"\n  profile: {title} ({reps} calls)\n" + prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50), flush=True)


def load():
    return os.getloadavg()[0]


def wait_for_load(max_load, timeout):
    """Timings on a shared machine are noise: wait (bounded) until the 1-minute load is below max_load."""
    t0 = time.time()
    while max_load and load() > max_load and time.time() - t0 < timeout:
        print(f"  load {load():.2f} > {max_load}: waiting", flush=True)
        time.sleep(15)


def matmul_rate(reps=7, n=2048):
    """Measured fp32 matmul FLOP/s on this machine with this thread count: the MFU denominator."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    s, _ = median_time(lambda: a @ b, reps, warmup=2)
    return 2 * n ** 3 / s


# ----- DiT: the same weights in both implementations -----

def dit_pair(folder, frames):
    """A random diffusers CogVideoXTransformer3DModel (perturbed so nothing is zero), saved; ours loaded from it."""
    from diffusers import CogVideoXTransformer3DModel

    import dit
    torch.manual_seed(0)
    ref = CogVideoXTransformer3DModel(
        num_attention_heads=DIT["heads"], attention_head_dim=DIT["head_dim"], in_channels=DIT["channels"],
        out_channels=DIT["channels"], time_embed_dim=DIT["time_dim"], text_embed_dim=DIT["text_dim"],
        num_layers=DIT["layers"], sample_width=DIT["size"], sample_height=DIT["size"],
        sample_frames=4 * (frames - 1) + 1, max_text_seq_length=DIT["text_len"],
        use_rotary_positional_embeddings=True)
    with torch.no_grad():
        for p in ref.parameters():   # zero-initialised modulation would make some grads trivially zero
            p.add_(torch.randn_like(p) * 0.02)
    ref.save_pretrained(folder)
    return dit.ExpertDiT.from_diffusers(folder), ref


def dit_inputs(T, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, DIT["channels"], T, DIT["size"], DIT["size"], generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    text = torch.randn(B, DIT["text_len"], DIT["text_dim"], generator=g)
    return x, t, text


def dit_flops(cfg, rows, video_tokens, text_tokens):
    """Forward FLOPs of the DiT (multiply-add = 2 FLOPs), matmuls only; backward is twice the forward.
    rows: token count of each attention row; video_tokens / text_tokens: totals over the batch."""
    D, N = cfg.dim, sum(rows)
    per_layer = (2 * N * D * 3 * D          # fused q, k, v projection
                 + 2 * N * D * D            # attention output projection
                 + 2 * N * D * 4 * D * 2    # MLP: D -> 4D -> D
                 + sum(2 * 2 * n * n * D for n in rows))  # attention: q k^T and (softmax) v, full rows
    embed = (2 * video_tokens * cfg.in_channels * cfg.patch ** 2 * D       # patch embedding
             + 2 * text_tokens * cfg.text_dim * D                           # text projection
             + 2 * video_tokens * D * cfg.patch ** 2 * cfg.out_channels)    # output projection
    # (the timestep MLP and the per-sample modulation Linears act on one vector per sample: negligible)
    return cfg.layers * per_layer + embed


def rope_for(T):
    """diffusers expects the caller's RoPE; crop ((0, 0), (gh, gw)) = integer positions = ours."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    g = DIT["size"] // 2
    return get_3d_rotary_pos_embed(DIT["head_dim"], ((0, 0), (g, g)), (g, g), T)


def bench_dit(args, res, tmp):
    """Forward+backward of one batch-1 sample, ours vs diffusers, at the base frames and at 2x."""
    ours, ref = dit_pair(os.path.join(tmp, "dit"), DIT["frames"])
    ours.train(), ref.train()
    for T in (DIT["frames"], 2 * DIT["frames"]):
        x, t, text = dit_inputs(T)
        rope = rope_for(T)
        with torch.no_grad():
            diff = (ours(x, t, text) - ref(x.permute(0, 2, 1, 3, 4), text, t, image_rotary_emb=rope)
                    .sample.permute(0, 2, 1, 3, 4)).abs().max().item()
        fns = {"ours": lambda: ours(x, t, text).square().mean().backward(),
               "diffusers": lambda: ref(x.permute(0, 2, 1, 3, 4), text, t, image_rotary_emb=rope)
               .sample.square().mean().backward()}
        models = {"ours": ours, "diffusers": ref}
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        # a matmul timed in the same rotation: the MFU denominator under the same machine state
        s = alternate({**fns, "matmul": lambda: a @ b}, args.reps, warmup=2,
                      before=lambda k: k in models and models[k].zero_grad(set_to_none=True))
        mm = 2 * 2048 ** 3 / med(s.pop("matmul"))
        n = T * (DIT["size"] // 2) ** 2
        fl = 3 * dit_flops(ours.cfg, [n + DIT["text_len"]], n, DIT["text_len"])
        row = dict(ours_ms=1e3 * med(s["ours"]), diffusers_ms=1e3 * med(s["diffusers"]),
                   ratio=med(s["ours"]) / med(s["diffusers"]), tokens=n + DIT["text_len"], flops=fl,
                   max_abs_diff=diff, samples=s)
        row["ours_mfu"], row["diffusers_mfu"] = fl / med(s["ours"]) / mm, fl / med(s["diffusers"]) / mm
        res[f"dit_T{T}"] = row
        if args.profile and T == DIT["frames"]:
            for k in fns:
                profile_ops(f"DiT fwd+bwd {k}", fns[k], lambda: models[k].zero_grad(set_to_none=True))
        print(f"  dit T'={T}: ours {row['ours_ms']:.1f} ms, diffusers {row['diffusers_ms']:.1f} ms, "
              f"ratio {row['ratio']:.3f} (outputs differ by {diff:.1e})", flush=True)


def bench_mfu(args, res, tmp):
    """One full training step (forward, v-MSE, backward, AdamW) of our DiT at the benchmark config."""
    import dit
    folder = os.path.join(tmp, "dit")
    if not os.path.exists(os.path.join(folder, "config.json")):
        dit_pair(folder, DIT["frames"])
    model = dit.ExpertDiT.from_diffusers(folder).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # fused: one kernel for all params
    x, t, text = dit_inputs(DIT["frames"])
    target = torch.randn_like(x)

    def step():
        F.mse_loss(model(x, t, text), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    # the matmul reference is timed interleaved with the steps, so both see the same machine state
    ts = alternate({"step": step, "matmul": lambda: a @ b}, args.reps, warmup=2)
    s, mm = med(ts["step"]), 2 * 2048 ** 3 / med(ts["matmul"])
    n = DIT["frames"] * (DIT["size"] // 2) ** 2
    fl = 3 * dit_flops(model.cfg, [n + DIT["text_len"]], n, DIT["text_len"])
    res["mfu"] = dict(step_ms=1e3 * s, flops=fl, achieved_flops=fl / s, matmul_flops=mm, mfu=fl / s / mm, samples=ts)
    print(f"  mfu: step {1e3 * s:.1f} ms, {fl / 1e9:.2f} GFLOP -> {fl / s / 1e9:.1f} GFLOP/s = "
          f"{100 * res['mfu']['mfu']:.1f}% of matmul", flush=True)


def bench_pack(args, res, tmp):
    """A mixed batch (images and 9/17/33-frame clips): Frame Pack rows vs padding every clip to the
    longest by repeating its last frame (the released code's mode). Forward+backward, real tokens/s."""
    import dit
    folder = os.path.join(tmp, "dit")
    if not os.path.exists(os.path.join(folder, "config.json")):
        dit_pair(folder, DIT["frames"])
    model = dit.ExpertDiT.from_diffusers(folder).train()
    S, L, C, hw = len(PACK_FRAMES), DIT["text_len"], DIT["channels"], DIT["size"]
    g = torch.Generator().manual_seed(0)
    lat = [torch.randn(C, T, hw, hw, generator=g) for T in PACK_FRAMES]
    t = torch.randint(0, 1000, (S,), generator=g)
    text = torch.randn(S, L, DIT["text_dim"], generator=g)
    Tmax = max(PACK_FRAMES)
    padded = torch.stack([torch.cat([z, z[:, -1:].expand(-1, Tmax - z.shape[1], -1, -1)], 1) for z in lat])  # (S, C, Tmax, h, w)
    sizes = [dit.num_tokens(model.cfg, T, hw, hw) for T in PACK_FRAMES]
    real, max_tokens = sum(sizes), max(sizes)
    rows, used = [], []  # first fit into rows of max_tokens (what data.FramePackSampler does)
    for n in sizes:
        r = next((r for r, u in enumerate(used) if u + n <= max_tokens), len(used))
        used += [0] * (r == len(used))
        used[r] += n
        rows.append(r)

    def packed():
        sum(o.square().mean() for o in model.forward_packed(lat, t, text, rows)).backward()

    def pad():
        model(padded, t, text).square().mean().backward()

    s = alternate({"packed": packed, "padded": pad}, max(3, args.reps // 2), warmup=1,
                  before=lambda k: model.zero_grad(set_to_none=True))
    row = dict(real_tokens=real, padded_tokens=S * max_tokens, max_tokens=max_tokens,
               packed_ms=1e3 * med(s["packed"]), padded_ms=1e3 * med(s["padded"]),
               packed_tok_s=real / med(s["packed"]), padded_tok_s=real / med(s["padded"]), samples=s)
    row["ratio"] = row["packed_tok_s"] / row["padded_tok_s"]
    res["pack"] = row
    print(f"  pack: {real} real tokens; packed {row['packed_ms']:.0f} ms, padded ({S * max_tokens} tokens) "
          f"{row['padded_ms']:.0f} ms -> {row['ratio']:.2f}x", flush=True)


# ----- VAE -----

def vae_folder(tmp):
    """A random diffusers AutoencoderKLCogVideoX (reduced channels), saved once; both sides load it."""
    folder = os.path.join(tmp, "vae")
    if not os.path.exists(os.path.join(folder, "config.json")):
        from diffusers import AutoencoderKLCogVideoX
        torch.manual_seed(0)
        d = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 4,
                                   up_block_types=("CogVideoXUpBlock3D",) * 4,
                                   block_out_channels=VAE["block_out_channels"], norm_num_groups=VAE["norm_num_groups"],
                                   layers_per_block=VAE["layers_per_block"], latent_channels=VAE["latent_channels"],
                                   sample_height=VAE_SIZE, sample_width=VAE_SIZE)
        d.save_pretrained(folder)
    return folder


def vae_models(folder, which="both"):
    from diffusers import AutoencoderKLCogVideoX

    from vae import CausalVAE
    ours = CausalVAE.from_diffusers(folder).eval() if which in ("both", "ours") else None
    ref = (AutoencoderKLCogVideoX.from_pretrained(folder, low_cpu_mem_usage=False).eval()  # (no accelerate here)
           if which in ("both", "diffusers") else None)
    return ours, ref


def vae_fns(ours, ref, x):
    """encode+decode: ours streaming with the causal cache, diffusers' default (frame-batched) mode."""
    def run_ours():
        with torch.no_grad():
            return ours.decode(ours.encode(x, stream=True).mean, stream=True)

    def run_ref():
        with torch.no_grad():
            return ref.decode(ref.encode(x).latent_dist.mean).sample
    return {"ours": run_ours, "diffusers": run_ref}


def vae_clip(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, T, VAE_SIZE, VAE_SIZE, generator=g) * 2 - 1


def worker_vae_mem(impl, T, folder, threads):
    """Fresh process: build one implementation, reset the peak, encode+decode once, report peak - baseline."""
    torch.set_num_threads(threads)
    ours, ref = vae_models(folder, which=impl)   # only the measured model is built
    fn = vae_fns(ours, ref, vae_clip(T))[impl]
    base = reset_peak()
    t0 = time.perf_counter()
    fn()
    print(json.dumps(dict(impl=impl, T=T, peak_mb=status_mb("VmHWM") - base, s=time.perf_counter() - t0)))


# Memory children use a fixed glibc mmap threshold: every large tensor is mmapped and returned to the OS
# when freed, so peak RSS tracks live tensors instead of heap caching (without it the same run varies by
# +-20%); applied to both implementations alike.
MEM_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_json(cmd, env=None, timeout=600):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                       env=dict(os.environ, **MEM_ENV, **(env or {})))
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def bench_attn(args, res, tmp):
    """The Frame Pack attention modes on the tiny DiT (forward+backward): the shapes demo's rows
    (12 rows of 96 / 168 tokens as train.py's "shapes" preset packs its two stages, and of 256,
    first-fit packed by data.FramePackSampler from the stage's clip lengths and sizes), then 2 rows
    of 4 samples at 512 and 1024 tokens. -> res["attn_M"] = dense, segments and auto ms per
    batch."""
    import random
    import data
    import dit
    model = dit.ExpertDiT(dit.DIT_PRESETS["tiny"]).train()
    cfg, g = model.cfg, torch.Generator().manual_seed(0)
    cases = []
    for M, res_hw, frames in ((96, [(16, 16), (16, 24)], [1, 5, 9]),
                              (168, [(24, 24), (24, 32)], [1, 9]),
                              (256, [(32, 32), (32, 48)], [1, 9])):
        rnd = random.Random(0)  # pixel (T, H, W) shapes; the tiny VAE: 4x in time and space
        shapes = [(rnd.choice(frames), *rnd.choice(res_hw)) for _ in range(200)]
        smp = data.FramePackSampler(shapes, M, rows=12, text_len=cfg.text_len, tf=4, sf=4, p=2)
        keys = next(iter(smp))
        lat = [(shapes[k[0]][0] // 4 + 1, shapes[k[0]][1] // 4, shapes[k[0]][2] // 4) for k in keys]
        cases.append((M, lat, [k[1] for k in keys]))
    for M in (512, 1024):  # 2 rows of 4 samples of 32x32-pixel clips filling the row
        T = (M // 4 - cfg.text_len) // 16
        cases.append((M, [(T, 8, 8)] * 8, [i // 4 for i in range(8)]))
    for M, grids, rows in cases:
        S = len(grids)
        lat = [torch.randn(cfg.in_channels, *grid, generator=g) for grid in grids]
        t = torch.randint(0, 1000, (S,), generator=g)
        text = torch.randn(S, cfg.text_len, cfg.text_dim, generator=g)

        def step(mode):
            model.packed_attention = mode
            out = model.forward_packed(lat, t, text, rows, max_tokens=M)
            sum(o.square().mean() for o in out).backward()

        s = alternate({m: (lambda m=m: step(m)) for m in ("dense", "segments", "auto")},
                      args.reps, before=lambda k: model.zero_grad(set_to_none=True))
        row = dict(samples=S, rows=len(set(rows)), times=s,
                   **{f"{m}_ms": 1e3 * med(s[m]) for m in ("dense", "segments", "auto")})
        row["ratio"] = row["segments_ms"] / row["dense_ms"]
        row["auto_ratio"] = row["auto_ms"] / row["dense_ms"]
        res[f"attn_{M}"] = row
        print(f"  attn: {row['rows']} rows of {M} tokens, {S / row['rows']:.1f} samples per row: "
              f"dense {row['dense_ms']:.0f} ms, segments {row['segments_ms']:.0f} ms, auto (one "
              f"row) {row['auto_ms']:.0f} ms (/ dense {row['ratio']:.2f}, "
              f"{row['auto_ratio']:.2f})", flush=True)


def bench_vae(args, res, tmp):
    folder = vae_folder(tmp)
    ours, ref = vae_models(folder)
    for T in (17, 49):
        x = vae_clip(T)
        fns = vae_fns(ours, ref, x)
        diff = (fns["ours"]() - fns["diffusers"]()).abs().max().item()
        s = alternate(fns, args.vae_reps if T > 17 else args.vae_reps + 2, warmup=0)
        mem = {"ours": [], "diffusers": []}
        for _ in range(args.mem_reps):
            for impl in mem:   # one fresh process each: a used heap under-reports the next run
                mem[impl].append(run_json([sys.executable, __file__, "--worker", "vae", impl, str(T), folder,
                                           "--threads", str(args.threads)])[0]["peak_mb"])
        mem = {k: med(v) for k, v in mem.items()}
        row = dict(ours_ms=1e3 * med(s["ours"]), diffusers_ms=1e3 * med(s["diffusers"]),
                   time_ratio=med(s["ours"]) / med(s["diffusers"]), ours_mb=mem["ours"], diffusers_mb=mem["diffusers"],
                   mem_ratio=mem["ours"] / mem["diffusers"], max_abs_diff=diff, samples=s)
        res[f"vae_T{T}"] = row
        if args.profile and T == 17:
            for k in fns:
                profile_ops(f"VAE encode+decode {k}, {T} frames", fns[k], reps=1)
        print(f"  vae T={T}: ours {row['ours_ms']:.0f} ms / {mem['ours']:.0f} MB, diffusers {row['diffusers_ms']:.0f} ms"
              f" / {mem['diffusers']:.0f} MB (outputs differ by {diff:.1e})", flush=True)


# ----- context-parallel VAE -----

def worker_cp(T, folder, reps):
    """Under torchrun: one VAE training step (encode, sample-free decode of the mean, loss, backward) on
    this rank's share of the clip (world > 1) or on the whole clip (world 1, no process group needed)."""
    import torch.distributed as dist

    from vae import CausalVAE, cp_split
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    vae = CausalVAE.from_diffusers(folder).train()
    x = vae_clip(T)
    group = dist.group.WORLD if world > 1 else None
    if group is not None:
        x = cp_split(x, group, vae.cfg.temporal_factor).contiguous()   # (1, 3, T_local, H, W)

    def step():
        post = vae.encode(x, cp_group=group)
        y = vae.decode(post.mean, cp_group=group)
        (y.square().mean() + 1e-6 * post.kl().sum()).backward()
        vae.zero_grad(set_to_none=True)

    base = reset_peak()
    step()                              # the first step sets the peak (a reused heap would hide it)
    peak = status_mb("VmHWM") - base
    ts = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    print(json.dumps(dict(rank=rank, world=world, frames=x.shape[2], peak_mb=peak, s=med(ts), samples=ts)))
    dist.destroy_process_group()


def bench_cp(args, res, tmp):
    folder = vae_folder(tmp)
    T = args.cp_frames
    runs = {}
    # Same cores on both sides: 2 ranks x threads/2, or one process x threads.
    for name, nproc, threads in (("single", 1, args.threads), ("cp", 2, max(1, args.threads // 2))):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               __file__, "--worker", "cp", str(T), folder, "--cp-reps", str(args.cp_reps)]
        runs[name] = run_json(cmd, env={"OMP_NUM_THREADS": str(threads)})
    one, cp = runs["single"][0], runs["cp"]
    row = dict(frames=T, single_ms=1e3 * one["s"], single_mb=one["peak_mb"], cp_ms=1e3 * max(r["s"] for r in cp),
               cp_mb_per_rank=[r["peak_mb"] for r in sorted(cp, key=lambda r: r["rank"])],
               samples={"single": one["samples"], "cp": [r["samples"] for r in cp]})
    row["time_ratio"] = row["cp_ms"] / row["single_ms"]
    row["mem_ratio"] = max(row["cp_mb_per_rank"]) / row["single_mb"]
    res["cp"] = row
    print(f"  cp T={T}: one process {row['single_ms']:.0f} ms / {row['single_mb']:.0f} MB, 2 ranks "
          f"{row['cp_ms']:.0f} ms / {max(row['cp_mb_per_rank']):.0f} MB per rank", flush=True)


# ----- report -----

# ----- the step simulator, ours vs diffusers' transformer (train.py --simulate) -----

SIM = dict(ranks=8, frames=49, size="480x720", presets=("cogvideox-2b", "cogvideox-5b"))


def worker_sim_diffusers(preset, ranks, frames, size):
    """Fresh process: diffusers' CogVideoXTransformer3DModel in train.py's simulation: fake tensors,
    a fake process group of `ranks`, FSDP2 per block + root with bf16 gathers / fp32 reductions,
    bf16 autocast, its own gradient checkpointing, AdamW state present, one step measured by
    train.MemTracker and printed by train.report, as ours is."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import dit
    import train
    import vae
    c, vc = dit.DIT_PRESETS[preset], vae.VAE_PRESETS[preset]
    H, W = map(int, size.split("x"))
    T, h, w = (frames - 1) // 4 + 1, H // vc.spatial_factor, W // vc.spatial_factor
    dist.init_process_group("fake", rank=0, world_size=ranks, store=FakeStore())
    mesh = init_device_mesh("cpu", (ranks,))
    track = train.MemTracker()
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = CogVideoXTransformer3DModel(
            num_attention_heads=c.heads, attention_head_dim=c.head_dim, in_channels=c.in_channels,
            num_layers=c.layers, use_rotary_positional_embeddings=c.pos != "sincos",
            use_learned_positional_embeddings=c.pos == "learned")
        model.enable_gradient_checkpointing()
        for b in model.transformer_blocks:
            fully_shard(b, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = train.adamw(params, 1e-4, train.PRESETS[preset], torch.device("cpu"))
        for p in params:  # AdamW's state as after a first step, as in train.simulate_dit
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    x, text = torch.randn(1, T, c.in_channels, h, w), torch.randn(1, c.text_len, c.text_dim)
    target, t = torch.randn(1, T, c.out_channels, h, w), torch.tensor([500])
    rot = get_3d_rotary_pos_embed(c.head_dim, ((0, 0), (h // 2, w // 2)), (h // 2, w // 2), T) \
        if c.pos != "sincos" else None
    tokens = c.text_len + T * (h // 2) * (w // 2)
    track.info = {"what": f"diffusers {preset} transformer, 1 clip of {frames}x{H}x{W} ({tokens} "
                          f"tokens)", "tokens": tokens, "row": tokens, "params": params, "opt": opt}
    with track, mode:  # the step in fake mode: every buffer FSDP allocates is fake too
        for p in params:
            track.add(p, "param")
            p.register_post_accumulate_grad_hook(lambda p: track.retag(p.grad, "grad"))
        for v in opt.state.values():
            for s in v.values():
                track.add(s, "opt")
        track.phase = "fwd"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = model(x, text, t, image_rotary_emb=rot, return_dict=False)[0]
        loss = (v.float() - target).pow(2).mean()
        track.phase = "bwd"
        loss.backward()
        track.grads = train.storage_bytes([p.grad for p in params if p.grad is not None])
        track.phase = "step"
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    args = SimpleNamespace(stage="dit", fsdp=True, grad_checkpoint=True, fp32=False, fake=True,
                           peak_tflops=989.0)
    r = train.report(args, track)
    print(json.dumps({"impl": "diffusers", "preset": preset, **{k: v for k, v in r.items()}}))


def sim_ours(preset, ranks, frames, size):
    cmd = [sys.executable, str(ROOT / "train.py"), "--stage", "dit", "--preset", preset, "--simulate",
           str(ranks), "--fsdp", "--grad-checkpoint", "--frames", str(frames), "--size", size,
           "--ema", "0"]  # like for like: the diffusers run keeps no EMA copy of the weights
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=str(ROOT))
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    row = next(ln for ln in p.stdout.splitlines() if ln.startswith("0.."))
    last = p.stdout.strip().splitlines()[-1]
    return {"peak": float(last.split("peak ")[1].split()[0]) * 2**30, "row": row, "last": last}


def bench_sim(args, res, tmp):
    for preset in SIM["presets"]:
        t0 = time.time()
        ours = sim_ours(preset, SIM["ranks"], SIM["frames"], SIM["size"])
        t1 = time.time()
        theirs = run_json([sys.executable, __file__, "--worker", "sim", preset, str(SIM["ranks"]),
                           str(SIM["frames"]), SIM["size"]], timeout=3600)[-1]
        r = {"ours_gib": ours["peak"] / 2**30, "diffusers_gib": theirs["peak"] / 2**30,
             "ours_s": t1 - t0, "diffusers_s": time.time() - t1, "ours_last": ours["last"]}
        r["ratio"] = r["ours_gib"] / r["diffusers_gib"]
        res[f"sim_{preset}"] = r
        print(f"  sim {preset}: peak {r['ours_gib']:.2f} GiB vs diffusers {r['diffusers_gib']:.2f} GiB "
              f"-> {r['ratio']:.2f} ({r['ours_s']:.0f} s + {r['diffusers_s']:.0f} s)", flush=True)


LOADER = dict(clips=12, frames=33, size=(240, 360), stage_frames=[17], stage_size=(240, 352),
              step_ms=150, steps=12)


def loader_clips(tmp):
    """Clips in real formats (H.264 mp4, VP9 webm, MPEG-4 avi, 8 fps, 240x360, 33 frames), each
    a moving gradient (so the codecs have real work), written once."""
    import av
    import numpy as np
    folder = os.path.join(tmp, "loader")
    os.makedirs(folder, exist_ok=True)
    codecs = {".mp4": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4"}
    H, W = LOADER["size"]
    yy, xx = np.mgrid[:H, :W]
    entries = []
    for i in range(LOADER["clips"]):
        ext = list(codecs)[i % 3]
        path = os.path.join(folder, f"{i:02d}{ext}")
        with av.open(path, "w") as c:
            st = c.add_stream(codecs[ext], rate=8)
            st.height, st.width, st.pix_fmt = H, W, "yuv420p"
            for t in range(LOADER["frames"]):
                img = np.stack([(xx + 4 * t + 9 * i) % 256, (yy * 2 + t) % 256,
                                (xx + yy + 7 * t) % 256], -1).astype(np.uint8)
                for pk in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(pk)
            for pk in st.encode():
                c.mux(pk)
        entries.append({"path": path, "caption": f"clip {i}"})
    return entries


def bench_loader(args, res, tmp):
    """Decoded clips per second through train.py's loader (data.make_loader over data.Requests:
    persistent workers, prefetch 2, random start and crop) with 0, 1 and 2 decoding workers; and
    the data wait of a training step that computes for LOADER["step_ms"] (a sleep: the CPU is
    free for the workers, as it is while a GPU computes)."""
    import data
    entries, _ = data.probe_entries(loader_clips(tmp), 2)
    stage = data.Stage([LOADER["stage_size"]], LOADER["stage_frames"], fps=8)
    ds = data.VideoDataset(entries, stage, augment="random", seed=0)
    sampler = data.BucketSampler(ds.shapes, 2, seed=0)
    per = len(sampler.global_batches(0))
    for workers in (0, 1, 2):
        req = data.Requests(sampler, {"epoch": 0, "batch": 0})
        loader = data.make_loader(ds, req, workers, prefetch=2)
        it = iter(loader)
        next(it)  # the workers started, the first batch is out
        n, t0 = 0, time.perf_counter()
        for _ in range(2 * per):
            n += len(next(it)["items"])
        rate = n / (time.perf_counter() - t0)
        waits = []
        for _ in range(LOADER["steps"]):
            time.sleep(LOADER["step_ms"] / 1000)  # the step's compute
            t1 = time.perf_counter()
            next(it)
            waits.append(1000 * (time.perf_counter() - t1))
        del it, loader
        r = {"clips_s": rate, "wait_ms": med(waits), "step_ms": LOADER["step_ms"]}
        res[f"loader_w{workers}"] = r
        print(f"  loader, {workers} worker(s): {rate:.1f} clips/s; a {LOADER['step_ms']} ms step "
              f"waits {r['wait_ms']:.0f} ms for its batch of 2", flush=True)


def table(res):
    rows = []   # (what, ours, baseline, ratio, target, ok)
    for T in (DIT["frames"], 2 * DIT["frames"]):
        r = res.get(f"dit_T{T}")
        if r:
            rows.append((f"DiT fwd+bwd, latent {T}x{DIT['size']}x{DIT['size']} ({r['tokens']} tok)",
                         f"{r['ours_ms']:.1f} ms", f"{r['diffusers_ms']:.1f} ms", r["ratio"], f"<= {TARGETS['dit']}",
                         r["ratio"] <= TARGETS["dit"]))
    if "mfu" in res:
        r = res["mfu"]
        rows.append(("DiT train step MFU (fwd+bwd+AdamW)", f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s",
                     f"{r['matmul_flops'] / 1e9:.1f} GFLOP/s (matmul)", r["mfu"], f">= {TARGETS['mfu']}",
                     r["mfu"] >= TARGETS["mfu"]))
    for T in (DIT["frames"], 2 * DIT["frames"]):
        r = res.get(f"dit_T{T}")
        if r:
            rows.append((f"  fwd+bwd MFU at T'={T}, ours vs diffusers", f"{100 * r['ours_mfu']:.1f}%",
                         f"{100 * r['diffusers_mfu']:.1f}%", None, "", None))
    if "pack" in res:
        r = res["pack"]
        rows.append((f"Frame Pack vs pad-to-longest ({r['real_tokens']} real tok)", f"{r['packed_tok_s']:.0f} tok/s",
                     f"{r['padded_tok_s']:.0f} tok/s", r["ratio"], f">= {TARGETS['pack']}",
                     r["ratio"] >= TARGETS["pack"]))
    for k in sorted((k for k in res if k.startswith("attn_")), key=lambda k: int(k[5:])):
        r = res[k]
        rows.append((f"Frame Pack attention, {r['rows']} rows of {k[5:]} tok: segments vs dense",
                     f"{r['segments_ms']:.0f} ms", f"{r['dense_ms']:.0f} ms (dense mask)",
                     r["ratio"], "", None))
        if "auto_ms" in r:
            rows.append((f"Frame Pack attention, {r['rows']} rows of {k[5:]} tok: auto (one row) "
                         f"vs dense", f"{r['auto_ms']:.0f} ms", f"{r['dense_ms']:.0f} ms (dense "
                         f"mask)", r["auto_ratio"], "", None))
    for T in (17, 49):
        r = res.get(f"vae_T{T}")
        if r:
            strict = T == 49    # the targets are set at 49 frames
            rows.append((f"VAE enc+dec time, {T}x{VAE_SIZE}x{VAE_SIZE} (stream vs default)", f"{r['ours_ms']:.0f} ms",
                         f"{r['diffusers_ms']:.0f} ms", r["time_ratio"], f"<= {TARGETS['vae_time']}" if strict else "",
                         r["time_ratio"] <= TARGETS["vae_time"] if strict else None))
            rows.append((f"VAE enc+dec peak memory, {T} frames", f"{r['ours_mb']:.0f} MB", f"{r['diffusers_mb']:.0f} MB",
                         r["mem_ratio"], f"<= {TARGETS['vae_mem']}" if strict else "",
                         r["mem_ratio"] <= TARGETS["vae_mem"] if strict else None))
    if "cp" in res:
        r = res["cp"]
        rows.append((f"CP VAE train step, 2 ranks vs 1 process, {r['frames']} fr: time", f"{r['cp_ms']:.0f} ms",
                     f"{r['single_ms']:.0f} ms", r["time_ratio"], "", None))
        rows.append(("CP VAE per-rank peak memory", f"{max(r['cp_mb_per_rank']):.0f} MB", f"{r['single_mb']:.0f} MB",
                     r["mem_ratio"], f"<= {TARGETS['cp_mem']}", r["mem_ratio"] <= TARGETS["cp_mem"]))
    for preset in SIM["presets"]:
        r = res.get(f"sim_{preset}")
        if r:
            rows.append((f"simulated peak per rank, {preset}, 8 FSDP ranks, 49x480x720",
                         f"{r['ours_gib']:.2f} GiB", f"{r['diffusers_gib']:.2f} GiB (diffusers)",
                         r["ratio"], f"<= {TARGETS['sim']}", r["ratio"] <= TARGETS["sim"]))
    for workers in (0, 1, 2):
        r = res.get(f"loader_w{workers}")
        if r:
            T, (H, W) = LOADER["stage_frames"][0], LOADER["stage_size"]
            rows.append((f"decoded {T}x{H}x{W} clips/s (mp4/webm/avi), {workers} loader workers",
                         f"{r['clips_s']:.1f} clips/s", f"data wait {r['wait_ms']:.0f} ms/step",
                         None, "", None))
    w = max(len(r[0]) for r in rows) if rows else 10
    lines = [f"| {'measurement':<{w}} | {'ours':>18} | {'baseline':>26} | {'ratio':>6} | {'target':>7} | ok  |",
             f"|{'-' * (w + 2)}|{'-' * 20}|{'-' * 28}|{'-' * 8}|{'-' * 9}|-----|"]
    for what, a, b, ratio, target, ok in rows:
        rs = f"{ratio:.2f}" if ratio is not None else ""
        oks = "" if ok is None else ("yes" if ok else "NO")
        lines.append(f"| {what:<{w}} | {a:>18} | {b:>26} | {rs:>6} | {target:>7} | {oks:<3} |")
    return "\n".join(lines)


SECTIONS = {"dit": bench_dit, "mfu": bench_mfu, "pack": bench_pack, "attn": bench_attn,
            "vae": bench_vae, "cp": bench_cp, "sim": bench_sim, "loader": bench_loader}


def main():
    ap = argparse.ArgumentParser(description="nano-cogvideox vs diffusers: DiT, MFU, Frame Pack, VAE, context parallel")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, the same for both sides")
    ap.add_argument("--reps", type=int, default=9, help="timed repetitions per implementation (DiT)")
    ap.add_argument("--vae-reps", type=int, default=3, help="timed repetitions per implementation (VAE, 49 frames)")
    ap.add_argument("--mem-reps", type=int, default=2, help="fresh processes per VAE memory measurement (median)")
    ap.add_argument("--cp-frames", type=int, default=33, help="clip length of the context-parallel step")
    ap.add_argument("--cp-reps", type=int, default=2,
                    help="timed repetitions per side (context-parallel VAE step)")
    ap.add_argument("--only", default="dit,mfu,pack,vae,cp,loader",
                    help=f"comma-separated sections, of {','.join(SECTIONS)}")
    ap.add_argument("--max-load", type=float, default=None, help="wait (up to 10 min) for the 1-min load to drop below this")
    ap.add_argument("--profile", action="store_true", help="print where the time goes (torch.profiler) per section")
    ap.add_argument("--device", default="cpu", help="only cpu: the targets are CPU targets")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)   # internal: child processes
    args = ap.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "vae":
            return worker_vae_mem(rest[0], int(rest[1]), rest[2], args.threads)
        if kind == "sim":
            return worker_sim_diffusers(rest[0], int(rest[1]), int(rest[2]), rest[3])
        return worker_cp(int(rest[0]), rest[1], args.cp_reps)
    sections = args.only.split(",")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:  # a typo ran no section: an empty table, exit 0
        ap.error(f"--only: no section {','.join(unknown)}; the sections are {','.join(SECTIONS)}")
    if args.out:  # now, not after minutes of measuring (a missing folder lost every number)
        import data
        try:
            data.check_writable(args.out, "--out")
        except ValueError as e:
            ap.error(str(e))
    try:  # the device's type: cpu:0 is the CPU too (a string compare refused it)
        cpu = torch.device(args.device).type == "cpu"
    except RuntimeError:  # no device at all
        cpu = False
    if not cpu:
        ap.error(f"--device {args.device}: bench.py measures the CPU targets of issue 9; use "
                 "--device cpu")
    torch.set_num_threads(args.threads)
    wait_for_load(args.max_load, 600)
    t_start, load0 = time.time(), load()
    print(f"torch {torch.__version__}, {args.threads} threads, load {load0:.2f}", flush=True)
    res = {"threads": args.threads, "torch": torch.__version__, "load_start": load0}
    with tempfile.TemporaryDirectory() as tmp:
        res["matmul_flops"] = matmul_rate()
        print(f"  fp32 matmul 2048^2: {res['matmul_flops'] / 1e9:.1f} GFLOP/s", flush=True)
        for name, fn in SECTIONS.items():  # in this order, whatever the order of --only
            if name in sections:
                fn(args, res, tmp)
        res["matmul_flops_end"] = matmul_rate()   # a drift between start and end means the load changed
    res["load_end"], res["seconds"] = load(), time.time() - t_start
    print(f"\nthreads {args.threads} | load {load0:.2f} -> {res['load_end']:.2f} | matmul "
          f"{res['matmul_flops'] / 1e9:.1f} -> {res['matmul_flops_end'] / 1e9:.1f} GFLOP/s | {res['seconds']:.0f} s")
    print(table(res))
    if args.out:  # (data was imported for the check above)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        data.atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(res, indent=1)))


if __name__ == "__main__":
    main()
