"""sample.py — text/image-to-video generation with CogVideoX
(paper Figure 1, §3, App. A, App. B).

The inference pipeline of Figure 1, run backwards from noise:
    prompt --(App. B upsampler, optional)--> T5 --> text tokens (B, L, D)
    noise (B, C, T', h, w) --(expert DiT: v-prediction, CFG, DDIM or DPM++)--> latent
    latent / scaling_factor --(3D causal VAE decoder)--> video (B, 3, T, H, W) in [-1, 1]
Smallest piece first: SampleConfig and PRESETS (every sampling default, in this one place;
train.py's demo reads PRESETS["tiny"]), classifier-free guidance, `generate` (the library
function: `net, ae, text, cfg = load_ckpt(folder)`, then `generate(net, ae, text, prompts, cfg)`),
the loaders, the CLI, which writes an .mp4 and a PNG contact sheet per prompt through data.py
(write_video, contact_sheet). Image-to-video (App. A): the first frame's VAE latent fills latent
frame 0 of extra input channels (dit.i2v_input), as the I2V model was fine-tuned.

Two sources of weights: --ckpt DIR, our checkpoint folder as train.py exports it (dit/, vae/,
text_encoder/, sample.json); --model-dir DIR, a released CogVideoX folder in diffusers layout
(transformer/, vae/, text_encoder/, tokenizer/, scheduler/), read with OUR loaders (nothing from
diffusers is imported); its scheduler_config.json picks the sampler (DDIM / DPM++) and SNR shift.

Run:
  python train.py                      # the shapes demo; it writes the checkpoint out/shapes/dit
  python sample.py --ckpt out/shapes/dit --prompt "a red circle moves to the left" --out red.mp4
  python sample.py --ckpt out/shapes/dit --prompts-file prompts.txt --out my_samples/ --sampler dpm
  python sample.py --model-dir CogVideoX-2b --prompt "a panda playing guitar" --out panda.mp4 \\
        --device cuda --bf16 --offload          # released 2B: 49 frames 480x720 at 8 fps
  python sample.py --model-dir CogVideoX-5b-I2V --image first.png --prompt "..." --out i2v.mp4 \\
        --device cuda --bf16
  python sample.py --model-dir CogVideoX-5b --lora runs/lora/pytorch_lora_weights.safetensors \\
        --lora-scale 0.8 --lora-merge --prompt "..." --out lora.mp4 --device cuda --bf16
  python sample.py --model-dir CogVideoX1.5-5B --prompt "..." --out a.mp4 --device cuda --bf16 \\
        --offload --stream                       # 1.5: 81 frames 768x1360 at 16 fps
  torchrun --standalone --nproc_per_node 4 sample.py --sp 4 --model-dir CogVideoX-5b ...
        # sequence parallel: 4 GPUs share every DiT row (dit.py), rank 0 writes the same video
  python -m pytest -q tests/test_sample.py

Shape legend:
  B batch (prompts)   C latent channels   T frames, T' = (T-1)/4 + 1 latent frames   H, W pixels
  k padding latent frames in front (CogVideoX 1.5: T' + k a multiple of the temporal patch)
  h, w = H/8, W/8 latent grid (8 = the released VAE's spatial factor; the tiny one has 4)
  L text tokens   D text width
"""
import argparse
import contextlib
import math
import os
import sys
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from safetensors import SafetensorError

import data
import diffusion
import dit as ditlib
import vae as vaelib


# ----- sampling defaults, in one place (§3) -----

@dataclass(frozen=True)
class SampleConfig:
    num_frames: int = 9  # pixel frames, 4k+1 (the causal VAE keeps frame 0 alone)
    height: int = 32
    width: int = 32
    fps: float = 8.0  # playback rate of the written .mp4 (the clips' sampling rate in training)
    steps: int = 50  # §3 sampling steps ("trailing" spacing, see diffusion.sampling_timesteps)
    sampler: str = "ddim"  # "ddim" (eta 0) or "dpm" (DPM++ 2M SDE as released)
    cfg: float = 6.0  # classifier-free guidance scale w; 1 turns guidance off
    dynamic_cfg: bool = False  # the released cosine schedule of w (diffusion.cfg_scale)
    # guidance only at timesteps >= cfg_min_t (diffusion.guided); 0: every step, as released
    cfg_min_t: int = 0
    # unconditional text: "zeros" (the paper's text-dropout input) or "empty" (T5(""), diffusers)
    uncond: str = "zeros"
    snr_shift_scale: float = 1.0  # §3 SNR shift of the noise schedule the DiT was trained with


def _rate_ok(fps):
    try:  # the check write_video makes (a rate that rounds to 0 too)
        return bool(data.video_rate(fps))
    except ValueError:
        return False


UNCONDS = ("zeros", "empty")  # SampleConfig.uncond's names (embed_prompts: what each means)

# The valid values of SampleConfig's fields, in one place: field -> (test, what it must be).
# sample.json (check_sample_json), the flags (check_args) and check_sample read them, each naming
# its own source; what needs the models (4k+1 frames, sizes, the DiT's steps) is check_sample's.
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
RULES = {"num_frames": AT_LEAST_1, "height": AT_LEAST_1, "width": AT_LEAST_1,
         "fps": (_rate_ok, "a frame rate > 0, e.g. 8"),
         # (our checkpoints sample on the default 1000-step schedule, diffusion.alphas_cumprod)
         "steps": (lambda v: 1 <= v <= 1000, "in [1, 1000], e.g. 50"),
         "sampler": (lambda v: v in diffusion.SAMPLERS, f"one of {diffusion.SAMPLERS}"),
         # diffusers' pipelines also run unguided for any w <= 1; refused so no run silently differs
         "cfg": (lambda v: math.isfinite(v) and v >= 1,
                 "a number >= 1 (1 = no guidance, released 6)"),
         "cfg_min_t": (lambda v: 0 <= v <= 1000, "in [0, 1000] (0 = guide every step)"),
         "uncond": (lambda v: v in UNCONDS, " or ".join(f'"{u}"' for u in UNCONDS)),
         "snr_shift_scale": (lambda v: math.isfinite(v) and v > 0, "a number > 0 (1.0 = no shift)")}


PRESETS = {
    # The toy DiTs (the shapes demo's sample.json sets its last stage's clip: 9 frames of 24x24 at
    # 8 fps): 20 DDIM steps (a toy model needs fewer steps and less guidance than the released 50 /
    # 6). Guidance can be kept to t >= cfg_min_t (diffusion.guided: near the data w * (v_c - v_u)
    # is mostly the model's error; on a 32 px DiT, CFG 4 at every step passed 68/96 seen, for t >=
    # 400 86/96), but at CFG 2.5 the demo's DiT needs no cut-off: on its 150 + 850-step DiT (32
    # prompts x 16 seeds), CFG 2.5 at every step was picked on seeds 0-15 from CFG 2 / 2.5 / 3 /
    # 3.5 / 4.5 / 6, t >= 0 / 100 / 200 and 40 sampling steps instead of 20, and confirmed on seeds
    # 16-31: 377/384 seen and 124/128 held-out, against 372 and 117 with CFG 3 for t >= 200 (the
    # setting before; the README has the rest).
    # A checkpoint's sample.json overrides these (train.py writes its family's preset and clip).
    "tiny": SampleConfig(num_frames=9, height=32, width=32, fps=8.0, steps=20, cfg=2.5),
    # Released models: 6 s at 8 fps + 1 frame, 480x720, 50 steps, w = 6; the 2B samples with DDIM on
    # an SNR shift of 3, the 5B with DPM++ and no shift. Loading with --model-dir, the folder's
    # scheduler_config.json decides sampler and shift instead; --preset gives its sampler again
    # (the shift always stays the model's: it is the schedule the DiT was trained on).
    "cogvideox-2b": SampleConfig(num_frames=49, height=480, width=720, snr_shift_scale=3.0),
    "cogvideox-5b": SampleConfig(num_frames=49, height=480, width=720, sampler="dpm"),
    # CogVideoX 1.5 (model card, cli_demo.py, the SAT config): 5 s at 16 fps + 1 frame (161 for
    # 10 s), 768x1360 (the I2V model also takes widths 768..1360 in steps of 16 at height 768),
    # DPM++ 50 steps, w = 6, no SNR shift.
    "cogvideox1.5-5b": SampleConfig(num_frames=81, height=768, width=1360, fps=16.0,
                                    sampler="dpm"),
}


# ----- classifier-free guidance (§3) -----

def guided(dit, cond, uncond, scale, steps, dynamic=False, image=None, min_t=0):
    """v_fn(x_t, t) for diffusion.sample with classifier-free guidance v = v_u + w (v_c - v_u).

    Conditional and unconditional inputs run as ONE batch [uncond; cond] (as the released pipeline
    does: one weight read per step, the batch dimension is nearly free). w is static, or the
    released dynamic schedule (diffusion.cfg_scale documents its quirk: with the timestep VALUE in
    the formula w oscillates between 1 and 1 + scale from step to step; the authors say this is
    intended, CogVideo issue 267 -- we keep it). With scale <= 1 the unconditional half would be
    wasted, so only the conditional batch runs. `image` (B, C, 1, h, w) is the I2V image latent
    (App. A), the same for both halves (the image is never dropped). min_t: guidance only at
    timesteps >= min_t; below, the conditional batch alone runs (diffusion.guided).
    """
    use_cfg = scale > 1.0
    both = torch.cat([uncond, cond]) if use_cfg else cond  # (2B or B, L, D)
    dtype = next(dit.parameters()).dtype  # bf16 weights take bf16 inputs; v comes back in float32

    def run(x, t, text=both):
        if image is not None:  # App. A: [noisy latent | image latent in frame 0] along channels
            imgs = image.repeat(len(x) // len(image), 1, 1, 1, 1)  # (2B or B, C, 1, h, w)
            x = ditlib.i2v_input(x, imgs)  # (2B or B, 2C, T', h, w)
        return dit(x.to(dtype), t, text).float()  # (2B or B, C, T', h, w)

    if not use_cfg:
        return run
    v_cond = lambda x, t: run(x, t, cond)  # noqa: E731  (B, C, T', h, w): no unconditional half

    def v_cond_uncond(x, t):
        v_u, v_c = run(torch.cat([x, x]), torch.cat([t, t])).chunk(2)  # (B, C, T', h, w) each
        return v_c, v_u

    # §3 CFG, w: diffusion.cfg_scale
    return diffusion.guided(v_cond_uncond, scale, steps, dynamic, min_t, v_cond)


# ----- generation: Figure 1 read backwards (§3, App. A) -----

def randn(shape, g):
    """torch.randn(shape) on the CPU from generator g, or, g a list of one generator per row (per
    prompt), row i from g[i] alone (diffusers' randn_tensor): a prompt's noise is then its own
    seed's whatever the batch it is sampled in."""
    if isinstance(g, torch.Generator):
        return torch.randn(shape, generator=g)
    return torch.cat([torch.randn((1, *shape[1:]), generator=gi) for gi in g])  # (B, ...)


@contextlib.contextmanager
def on(module, device, offload):
    """Runs a stage with `module` on `device`; with offload it goes back to the CPU afterwards, so a
    big model only ever holds one of T5 / DiT / VAE in accelerator memory (the diffusers pipeline's
    CPU offload order)."""
    def move(dev):
        if isinstance(module, torch.nn.Module):
            module.to(dev)
        elif module is not None:  # dit.TextEncoder: a plain object holding a T5 module + its device
            module.model.to(dev)
            module.device = torch.device(dev)

    move(device)
    try:
        yield module
    finally:
        if offload and torch.device(device).type != "cpu":
            move("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def embed_prompts(text, prompts, uncond, device):
    """Returns (cond, uncond) text tokens, each (B, L, D).

    text: an encoder with .encode(list[str]) (dit.TextEncoder) or precomputed cond embeddings
    (B, L, D). uncond: "zeros" -- §3: the text is dropped to an all-zeros embedding in training, so
    zeros are the model's unconditional input (also what the official sampling code passes);
    "empty" -- T5(""), what the diffusers port uses; or a tensor (B, L, D) given directly.
    """
    cond = text.encode(list(prompts)) if hasattr(text, "encode") else text  # (B, L, D)
    if len(cond) != len(prompts):
        raise ValueError(f"got {len(cond)} text embeddings for {len(prompts)} prompts; "
                         "pass one per prompt")
    if torch.is_tensor(uncond):
        neg = uncond
    elif uncond == "zeros":
        neg = torch.zeros_like(cond)  # (B, L, D)
    elif uncond == "empty":
        if not hasattr(text, "encode"):
            raise ValueError('uncond="empty" needs a text encoder; pass one or use uncond="zeros"')
        neg = text.encode([""] * len(prompts))  # (B, L, D)
    else:
        raise ValueError(f'uncond must be "zeros", "empty" or a tensor, not {uncond!r}')
    return cond.to(device), neg.to(device=device, dtype=cond.dtype)


def check_sample(cfg, vae_cfg, dit_cfg, image=False, num_train=1000):
    """A SampleConfig against the models' configs: one ValueError naming the fix. generate runs it
    on the loaded models; the CLI on their config files alone, before any weights load (the 5B
    and T5-XXL take minutes). image: an image is given (I2V); num_train: the DiT's training
    timesteps."""
    sf, tf, patch = vae_cfg.spatial_factor, vae_cfg.temporal_factor, dit_cfg.patch
    T, H, W = cfg.num_frames, cfg.height, cfg.width
    for k in ("num_frames", "height", "width", "sampler", "cfg"):  # (steps: the DiT's own bound)
        if not RULES[k][0](getattr(cfg, k)):
            raise ValueError(f"{k} must be {RULES[k][1]}, got {getattr(cfg, k)!r}")
    if (T - 1) % tf:
        lo = (T - 1) // tf * tf + 1
        raise ValueError(f"num_frames must be {tf}k+1 for this VAE (e.g. {lo} or {lo + tf})")
    if H % (sf * patch) or W % (sf * patch):
        raise ValueError(f"height and width must be multiples of {sf * patch} "
                         "(VAE factor x patch size)")
    if dit_cfg.pos == "learned":  # the 5B-I2V (App. A): its table covers the native grid only
        (h, w), longest = ditlib.learned_cover(dit_cfg, sf, tf)
        if (H, W) != (h, w) or T > longest:
            raise ValueError(f"this DiT's learned position table covers {h}x{w} and up to "
                             f"{longest} frames: sample at height {h}, width {w} and num_frames "
                             f"<= {longest}")
    if image != (dit_cfg.in_channels == 2 * dit_cfg.out_channels):
        raise ValueError("--image needs an image-to-video model and an I2V model needs --image")
    if not 1 <= cfg.steps <= num_train:
        raise ValueError(f"steps must be in [1, {num_train}] (the DiT's training timesteps), "
                         f"got {cfg.steps}")


@torch.no_grad()
def generate(dit, vae, text, prompts, cfg=SampleConfig(), *, seed=0, image=None, ac=None,
             device=None, offload=False, stream=False, progress=True, generator=None,
             return_latents=False):
    """Prompts -> videos (B, 3, T, H, W) in [-1, 1] (Figure 1 read backwards).

    dit: ExpertDiT (in_channels = 2C for an I2V model); vae: CausalVAE; text: TextEncoder or cond
    embeddings (B, L, D); cfg: SampleConfig (frames, size, steps, sampler, guidance, uncond);
    image: first frames (B, 3, H, W) or (3, H, W) in [-1, 1] for I2V; ac: alphas_cumprod the DiT
    was trained with (default: diffusion.alphas_cumprod with cfg.snr_shift_scale); device: where
    to run (default: where the DiT is); offload: keep each model on the CPU except during its own
    stage (big models on one accelerator); stream: chunked VAE decode (low memory). `generator` (a
    CPU torch.Generator, or a list of one per prompt) overrides `seed`. Random draws follow the
    diffusers pipeline (image latent, then the initial noise as (B, T', C, h, w), then the
    sampler's noise), so the same generator gives the same latents (DPM++ too: diffusion.sample
    draws as the released scheduler); with a list, prompt i draws its rows from generator i alone
    (as the pipeline given a list), so its video does not depend on the prompts batched with it.
    return_latents: the final DiT-space latent (B, C, T', h, w) instead of the video.
    A DiT with a temporal patch (CogVideoX 1.5) denoises T' + k latent frames, k padding frames in
    front making whole patches, and drops them at the end, as the 1.5 pipelines do; for I2V the
    image latent sits in (padding) frame 0, times vae.cfg.image_scale (z / 0.7 for 1.5).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts: pass at least one")
    ac = diffusion.alphas_cumprod(snr_shift_scale=cfg.snr_shift_scale) if ac is None else ac
    check_sample(cfg, vae.cfg, dit.cfg, image is not None, len(ac))
    cfgv = vae.cfg
    sf, tf = cfgv.spatial_factor, cfgv.temporal_factor
    T, H, W = cfg.num_frames, cfg.height, cfg.width
    if image is not None and image.dim() == 4 and len(image) not in (1, len(prompts)):
        raise ValueError(f"got {len(image)} images for {len(prompts)} prompts; "
                         "pass one image or one per prompt")
    if isinstance(generator, (list, tuple)) and len(generator) != len(prompts):
        raise ValueError(f"got {len(generator)} generators for {len(prompts)} prompts; "
                         "pass one generator or one per prompt")
    device = torch.device(device) if device is not None else next(dit.parameters()).device
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    B, C = len(prompts), dit.cfg.out_channels
    k = -((T - 1) // tf + 1) % dit.cfg.patch_t  # 1.5: padding latent frames (dit.pad_frames)
    shape = (B, (T - 1) // tf + 1 + k, C, H // sf, W // sf)  # (B, T' + k, C, h, w)

    with on(text if hasattr(text, "encode") else None, device, offload):  # stage 1: T5
        cond, neg = embed_prompts(text, prompts, cfg.uncond, device)  # (B, L, D) each

    img = None
    if image is not None:  # App. A: the image latent is a VAE *sample* x scaling factor
        image = image[None] if image.dim() == 3 else image  # (B, 3, H, W)
        image = image.expand(B, -1, -1, -1) if len(image) == 1 else image
        with on(vae, device, offload):  # one image at a time, drawing in the pipeline's order
            x = image[:, :, None].to(device, next(vae.parameters()).dtype)  # (B, 3, 1, H, W)
            post = [vae.encode(x[i:i + 1]) for i in range(B)]
            # eps drawn on the CPU generator, so a CUDA run gets the same numbers
            one = isinstance(g, torch.Generator)  # else image i draws from generator i
            z0 = torch.cat([p.sample(eps=randn(p.mean.shape, g if one else g[i:i + 1]))
                            for i, p in enumerate(post)])  # (B, C, 1, h, w)
        img = z0.float() * cfgv.image_scale  # (B, C, 1, h, w); 1.5: z / scaling factor (vae.py)

    # The released pipeline draws (B, T', C, h, w) and permutes; drawing this shape keeps the same
    # noise per seed. All draws use the CPU generator and move, so a seed means the same video on
    # any device.
    x_T = randn(shape, g).permute(0, 2, 1, 3, 4).to(device)  # (B, C, T', h, w)
    with on(dit, device, offload):  # stage 2: the denoising loop, §3
        dtype = next(dit.parameters()).dtype
        v_fn = guided(dit, cond.to(dtype), neg.to(dtype), cfg.cfg, cfg.steps, cfg.dynamic_cfg, img,
                      cfg.cfg_min_t)
        # DPM++ noise in the pipeline's layout too: (B, T', C, h, w) drawn, then permuted
        draw = lambda: randn(shape, g).permute(0, 2, 1, 3, 4)  # noqa: E731
        z = diffusion.sample(v_fn, x_T, ac, cfg.steps, cfg.sampler, progress=progress, draw=draw)
    z = z[:, :, k:]  # (B, C, T', h, w): the padding frames in front dropped (1.5)
    if return_latents:
        return z  # (B, C, T', h, w), scaled like the DiT sees it

    with on(vae, device, offload):  # stage 3: §2.1 decode; the DiT space is z * scaling_factor
        zin = (z / cfgv.scaling_factor).to(next(vae.parameters()).dtype)  # (B, C, T', h, w)
        video = vae.decode(zin, stream=True) if stream else vae.decode(zin)  # (B, 3, T, H, W)
    return video.float().clamp(-1, 1).cpu()


# ----- loading: our checkpoints and the released diffusers layout -----

def _text_encoder(folder, device, dtype, max_length):
    """dit.TextEncoder, with a truncated or corrupt T5 file as one line naming the folder."""
    try:
        return ditlib.TextEncoder(folder, device, dtype, max_length=max_length)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError,
            *data.hf_config_errors()) as e:  # (ValueError: e.g. a torn tokenizer.json)
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{folder}: cannot load the T5 text encoder ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); a file is truncated or "
                         "corrupt: copy or export it again") from None


def ckpt_sample_config(folder):
    """Our checkpoint folder -> its SampleConfig: PRESETS["tiny"] overridden by sample.json (no
    weights read). Refuses a folder that is not one of our checkpoints."""
    for sub in ("dit", "vae", "text_encoder"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise ValueError(f"{folder!r} has no {sub}/ folder: pass a checkpoint written by "
                             "train.py (or a released diffusers folder with --model-dir)")
    cfg = PRESETS["tiny"]
    meta = os.path.join(folder, "sample.json")
    if os.path.exists(meta):
        known = SampleConfig.__dataclass_fields__
        given = {k: v for k, v in data.json_object(meta).items() if k in known}
        cfg = data.config_from(SampleConfig, {**asdict(cfg), **given}, meta)
        check_sample_json(cfg, given, meta)
    return cfg


def check_sample_json(cfg, given, path):
    """sample.json's values (a hand edit) as one ValueError naming the file, the key and the fix,
    when it is read: generate would only refuse an unknown uncond after the models load, and
    write_video a bad fps after the whole sampling run. given: the keys the file sets; the frame
    count and size against the VAE and DiT stay check_sample's (it needs their configs)."""
    for k, (ok, what) in RULES.items():
        if k in given and not ok(getattr(cfg, k)):
            raise ValueError(f"{path}: {k} = {given[k]!r} must be {what}; fix it, or copy or "
                             "export the checkpoint again")


def load_ckpt(folder, device="cpu", dtype=None):
    """Our checkpoint folder -> (dit, vae, text_encoder, SampleConfig).

    Layout (train.py writes it): dit/ and vae/ (config.json + model.safetensors each, safetensors
    only), text_encoder/ (a T5 folder for dit.TextEncoder) and optionally sample.json (SampleConfig
    fields: the DiT family's sampling preset with the resolution, frame count, fps and noise
    schedule it was trained with; train.sample_meta), which overrides PRESETS["tiny"].
    """
    cfg = ckpt_sample_config(folder)
    net = ditlib.ExpertDiT.load(os.path.join(folder, "dit"), device, dtype).eval()
    ae = vaelib.CausalVAE.load_folder(os.path.join(folder, "vae"), device).to(dtype=dtype).eval()
    text = _text_encoder(os.path.join(folder, "text_encoder"), device, dtype, net.cfg.text_len)
    return net, ae, text, cfg


# The released scheduler classes, and what they mean for diffusion.sample.
SCHEDULERS = {"CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm"}


@dataclass(frozen=True)
class SchedulerNumbers:
    """What diffusion.alphas_cumprod reads of a scheduler_config.json (absent: diffusers'
    CogVideoX defaults), each of its type (data.config_from)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_shift_scale: float = 3.0
    rescale_betas_zero_snr: bool = False


def scheduler_numbers(path):
    """scheduler_config.json -> its SchedulerNumbers, each value of its type (or one ValueError)."""
    known = SchedulerNumbers.__dataclass_fields__
    sc = data.json_object(path)
    return data.config_from(SchedulerNumbers, {k: v for k, v in sc.items() if k in known}, path)


def schedule_from_diffusers(path):
    """scheduler_config.json -> (sampler, alphas_cumprod). The class name picks DDIM or DPM++,
    snr_shift_scale the §3 SNR shift (2B: 3.0, 5B: 1.0), rescale_betas_zero_snr the zero terminal
    SNR."""
    sc = data.json_object(path)
    name = sc.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(f"{path}: scheduler {name!r} is not supported; "
                         f"expected one of {sorted(SCHEDULERS)}")
    # What diffusion.py implements, the released setting; a missing key means diffusers' default
    # (epsilon, leading spacing), which is refused too rather than sampled on the wrong schedule
    # (clip_sample is read by neither CogVideoX scheduler's step; steps_offset not with trailing)
    need = {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
            "beta_schedule": "scaled_linear", "set_alpha_to_one": True, "trained_betas": None}
    default = {"prediction_type": "epsilon", "timestep_spacing": "leading",
               "beta_schedule": "scaled_linear", "set_alpha_to_one": True, "trained_betas": None}
    for k, v in need.items():
        if sc.get(k, default[k]) != v:
            raise ValueError(f"{path}: {k}={sc.get(k, default[k])!r} is not supported (need "
                             f"{v!r}, CogVideoX's released setting)")
    n = scheduler_numbers(path)
    ac = diffusion.alphas_cumprod(n.num_train_timesteps, n.beta_start, n.beta_end,
                                  n.snr_shift_scale, n.rescale_betas_zero_snr)
    return SCHEDULERS[name], ac


def load_released(folder, device="cpu", dtype=None):
    """A released CogVideoX folder (diffusers layout) ->
    (dit, vae, text_encoder, SampleConfig, alphas_cumprod).

    Every weight goes through our own loaders (nothing from diffusers is imported here)."""
    cfg, ac = released_sample_config(folder)
    net = ditlib.ExpertDiT.from_diffusers(os.path.join(folder, "transformer"), device,
                                          dtype or torch.float32).eval()
    ae = vaelib.CausalVAE.from_diffusers(os.path.join(folder, "vae"), device=device)
    ae = ae.to(dtype=dtype).eval()
    text = _text_encoder(folder, device, dtype, net.cfg.text_len)  # tokenizer/ + T5
    return net, ae, text, cfg, ac


def released_sample_config(folder):
    """A released CogVideoX folder -> (its SampleConfig, alphas_cumprod), from the config files
    alone (no weights read). Refuses a folder that is not in diffusers layout."""
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise ValueError(f"{folder!r} has no {sub}/ folder: pass a CogVideoX folder in "
                             "diffusers layout (or one of our checkpoints with --ckpt)")
    sched = os.path.join(folder, "scheduler", "scheduler_config.json")
    sampler, ac = schedule_from_diffusers(sched)  # (its numbers checked: a shift read below)
    ditlib.diffusers_folder_config(folder)  # its values checked: some are read below
    tc = data.json_object(os.path.join(folder, "transformer", "config.json"))
    sf = vaelib.diffusers_folder_config(os.path.join(folder, "vae")).spatial_factor
    patch_t = tc.get("patch_size_t") or 1
    # The released defaults: the transformer's training size (49 frames at 8 fps, 480x720), 50
    # steps, w = 6. Unconditional input T5(""), as the diffusers pipeline (the test checks we
    # reproduce it); the original code passes zeros (--uncond zeros).
    h, w, fps = tc.get("sample_height", 60) * sf, tc.get("sample_width", 90) * sf, 8
    if patch_t > 1:
        # CogVideoX 1.5: sample_frames 81 at 16 fps. Its sample_height = sample_width = 300 bound
        # the RoPE grid (150 x 150 patches), not a size: the diffusers pipeline would default to
        # 2400x2400 from them. The size is the release's 768x1360 (model card).
        rel = PRESETS["cogvideox1.5-5b"]
        h, w, fps = rel.height, rel.width, rel.fps
    cfg = SampleConfig(num_frames=tc.get("sample_frames", 49), height=h, width=w, fps=fps,
                       steps=50, sampler=sampler, uncond="empty",
                       snr_shift_scale=scheduler_numbers(sched).snr_shift_scale)
    return cfg, ac


def apply_lora(net, path, scale=1.0, merge=False, say=print):
    """LoRA adapters (dit.load_lora: ours, diffusers' or PEFT's file) on the DiT, times `scale`;
    merge: folded into the weights (dit.merge_lora), so sampling costs what the base costs.
    say: the CLI's printer (--sp: rank 0's alone; every rank loads the LoRA)."""
    n = ditlib.load_lora(net, path, scale)
    if merge:
        ditlib.merge_lora(net)
    say(f"LoRA {path}: {n} adapted modules x {scale:g}{', merged' if merge else ''}")
    return net


# ----- CLI -----

def out_paths(out, n, prompts, seed=0):
    """Where prompt i goes: `out` itself for one prompt ending in .mp4, else numbered files named
    by their draw's seed SEED = seed + i (NAME_NNN_sSEED.mp4 beside NAME.mp4, or in folder `out`
    NNN_prompt_sSEED.mp4): a run with another --seed keeps the earlier files."""
    if out.lower().endswith(".mp4"):
        if n == 1:
            return [out]
        return [f"{out[:-4]}_{i:03d}_s{seed + i}.mp4" for i in range(n)]
    slugs = ["".join(c if c.isalnum() else "_" for c in p.lower())[:40].strip("_") for p in prompts]
    return [os.path.join(out, f"{i:03d}_{s + '_' if s else ''}s{seed + i}.mp4")
            for i, s in enumerate(slugs)]


def check_args(a, n=1):
    """Bad command-line values as one ValueError naming the fix, before any model is loaded.
    n: the number of prompts (prompt i is drawn with seed + i)."""
    # steps' top bound is the DiT's own (check_sample, from its config); batch_size is the CLI's
    rules = {**RULES, "steps": AT_LEAST_1, "batch_size": AT_LEAST_1}
    for k in ("num_frames", "height", "width", "steps", "batch_size", "cfg", "cfg_min_t"):
        v = getattr(a, k)
        if v is not None and not rules[k][0](v):
            raise ValueError(f"--{k.replace('_', '-')} must be {rules[k][1]}, got {v}")
    # fps: RULES' test is data.video_rate, whose own message is the more precise (a rate of 0
    # would print the fps given and write a 24 fps file)
    if a.fps is not None:
        try:
            data.video_rate(a.fps)
        except ValueError as e:
            raise ValueError(f"--{e}") from None
    if not -2**63 <= a.seed <= 2**64 - n:  # torch.Generator.manual_seed's range
        raise ValueError(f"--seed {a.seed}: prompt i uses seed + i, which must lie in "
                         f"[-2**63, 2**64 - 1]; pass a smaller seed")
    data.check_device(a.device)
    # another video or image suffix was taken for a folder name (out.mkv/000_x.mp4)
    if a.out.lower().endswith(data.VIDEO_EXTS + data.IMAGE_EXTS) and \
            not a.out.lower().endswith(".mp4"):
        raise ValueError(f"--out {a.out}: sample.py writes .mp4 videos (and .png contact sheets); "
                         f"pass NAME.mp4 or a folder")
    data.check_writable(a.out, "--out", folder=not a.out.lower().endswith(".mp4"))
    if a.image and not os.path.isfile(a.image):
        raise ValueError(f"cannot read image {a.image!r}: no such file; pass a PNG or JPEG")
    if a.lora and not os.path.exists(a.lora):
        raise ValueError(f"--lora {a.lora!r}: no such file or folder; pass a "
                         f"{ditlib.LORA_FILE} (ours, diffusers' or PEFT's) or its folder")
    if not math.isfinite(a.lora_scale):
        raise ValueError(f"--lora-scale must be a finite number (1 = as trained), got "
                         f"{a.lora_scale}")
    if (a.lora_scale != 1.0 or a.lora_merge) and not a.lora:
        raise ValueError("--lora-scale / --lora-merge apply a LoRA: add --lora FILE")
    check_sp(a)


def check_outputs(paths, a):
    """No output (.mp4 or its .png contact sheet) may overwrite an input file: e.g. --image
    cat.png --out cat.mp4 would replace the image with the sheet. Nor may a name be too long for
    the file system (--out's a_000.mp4 adds to its name): refused now, not at the write."""
    for p in paths:
        data.check_name_length(p, "--out")
    data.check_not_input([f for p in paths for f in (p, p[:-4] + ".png")],
                         {a.image: "--image", a.prompts_file: "--prompts-file"})


def plan(a):
    """-> (SampleConfig, alphas_cumprod or None, DiTConfig, VAEConfig) of the --ckpt / --model-dir
    folder, from its config files alone, with --preset and the flags applied: the settings are
    checked against the models (check_sample, and the --lora file) before any weights load."""
    if a.ckpt:  # ac None: generate builds the schedule from cfg.snr_shift_scale
        cfg, ac = ckpt_sample_config(a.ckpt), None
        dcfg = ditlib.load_config(os.path.join(a.ckpt, "dit"))
        vcfg = vaelib.folder_config(os.path.join(a.ckpt, "vae"))
    else:
        cfg, ac = released_sample_config(a.model_dir)
        dcfg = ditlib.diffusers_folder_config(a.model_dir)[1]
        vcfg = vaelib.diffusers_folder_config(os.path.join(a.model_dir, "vae"))
    if a.preset:  # the preset's settings, but the noise schedule and the unconditional input the
        # DiT was trained with
        cfg = replace(PRESETS[a.preset], snr_shift_scale=cfg.snr_shift_scale, uncond=cfg.uncond)
    over = dict(num_frames=a.num_frames, height=a.height, width=a.width, fps=a.fps, steps=a.steps,
                sampler=a.sampler, cfg=a.cfg, uncond=a.uncond, cfg_min_t=a.cfg_min_t)
    cfg = replace(cfg, **{k: v for k, v in over.items() if v is not None},
                  dynamic_cfg=a.dynamic_cfg or cfg.dynamic_cfg)
    check_sample(cfg, vcfg, dcfg, a.image is not None, len(ac) if ac is not None else 1000)
    if a.lora:  # the file against this DiT's shapes on the meta device (no weights): a torn or
        # another model's LoRA was named only once the DiT, VAE and T5 had loaded
        with torch.device("meta"):
            net = ditlib.ExpertDiT(dcfg)
        ditlib.load_lora(net, a.lora)
    return cfg, ac, dcfg, vcfg


def check_sp(a):
    """--sp N: N processes (torchrun) share each DiT row; each takes whole heads, so the DiT's head
    count must divide by N. Read from the folder's config, before any model is loaded."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if a.sp < 1:
        raise ValueError(f"--sp must be >= 1, got {a.sp}")
    if world != a.sp:  # (under torchrun without --sp every process would write the same files)
        raise ValueError(f"--sp {a.sp} with {world} process(es): launch N processes for --sp N, "
                         f"torchrun --nproc_per_node N sample.py --sp N ...")
    cfg, key = ((a.ckpt, "dit"), "heads") if a.ckpt else ((a.model_dir, "transformer"),
                                                             "num_attention_heads")
    path = os.path.join(*cfg, "config.json")
    heads = data.json_object(path).get(key) if os.path.isfile(path) else None
    # (a missing config, or a count that is no number: plan's loading names it)
    if isinstance(heads, int) and heads and heads % a.sp:
        ok = [g for g in range(1, heads + 1) if heads % g == 0]
        raise ValueError(f"--sp {a.sp}: the DiT's {heads} attention heads do not divide by it "
                         f"(each process takes whole heads); use one of {ok}")


def sp_start(a):
    """--sp N under torchrun: the process group, this process's device (cuda: one GPU per process)
    -> rank. Every rank samples the same draws (CPU generator); the DiT splits each row over the
    ranks and returns the whole output on each, so T5, the sampler and the VAE run unchanged."""
    if a.sp == 1:
        return 0
    cuda = torch.device(a.device).type == "cuda"
    if cuda:
        a.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(a.device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def main(argv=None):
    p = argparse.ArgumentParser(description="CogVideoX text/image-to-video sampling (.mp4 + .png).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="our checkpoint (dit/, vae/, text_encoder/, sample.json)")
    src.add_argument("--model-dir", help="released CogVideoX folder in diffusers layout")
    p.add_argument("--prompt", action="append", default=[], help="text prompt (repeat for several)")
    p.add_argument("--prompts-file", help="one prompt per line (blank lines and #comments skipped)")
    p.add_argument("--out", default="samples", help="output .mp4 (one prompt; several: "
                   "NAME_000_sSEED.mp4, ...) or folder (NNN_prompt_sSEED.mp4)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="sampling defaults (else the ckpt's)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i (whatever "
                   "--batch-size)")
    p.add_argument("--num-frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--fps", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler", choices=diffusion.SAMPLERS)
    p.add_argument("--cfg", type=float, help="guidance scale (1 = no guidance)")
    p.add_argument("--dynamic-cfg", action="store_true", help="the released cosine schedule of w")
    p.add_argument("--cfg-min-t", type=int, help="guidance only at timesteps >= this (0 = every "
                   "step, as released, and the tiny preset)")
    p.add_argument("--uncond", choices=UNCONDS, help='unconditional text: 0s or T5("")')
    p.add_argument("--image", help="first frame (PNG/JPEG) for an image-to-video model (App. A); "
                   "any size: resized to cover the video and centre-cropped, as in training")
    p.add_argument("--upsample-model", help="local LLM folder: rewrite each prompt first (App. B)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per DiT batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 models (the released precision)")
    p.add_argument("--offload", action="store_true", help="models wait on the CPU")
    p.add_argument("--stream", action="store_true", help="decode the latent in chunks (low memory)")
    p.add_argument("--lora", help="LoRA adapters for the DiT: a pytorch_lora_weights.safetensors "
                   "(train.py --lora, diffusers' save_lora_weights) or PEFT adapter, or its folder")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA update "
                   "(diffusers' set_adapters weight; 0 = the base model)")
    p.add_argument("--lora-merge", action="store_true", help="fold the LoRA into the weights "
                   "before sampling (no adapter cost per step)")
    p.add_argument("--sp", type=int, default=1, help="under torchrun: N processes share every DiT "
                   "row (sequence parallel, Ulysses); the DiT's heads must divide by N")
    a = p.parse_args(argv)
    # Bad input (missing folder, wrong frame count or size, non-I2V model with --image): one line,
    # exit code 2.
    try:
        run(a, p)
    except (ValueError, OSError, *data.hf_config_errors()) as e:  # (the last: --upsample-model's)
        p.error(str(e).splitlines()[0] if str(e) else type(e).__name__)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(a, p):
    """The CLI body: load, optionally upsample the prompts (App. B), generate in batches, write."""
    prompts = list(a.prompt)
    if a.prompts_file:
        try:  # a folder, a missing or non-UTF-8 file: named with the flag (not a bare errno line)
            # utf-8-sig: a "UTF-8 with BOM" file's first line is no "\ufeff# comment" prompt
            with open(a.prompts_file, encoding="utf-8-sig") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else f"not UTF-8 text ({e.reason})"
            raise ValueError(f"--prompts-file {a.prompts_file}: {why}; pass a UTF-8 text file, "
                             "one prompt per line") from None
        prompts += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts and a.prompts_file:  # only blank and # comment lines: say so, not "give one"
        p.error(f"--prompts-file {a.prompts_file} holds no prompt (only blank or # comment "
                "lines): add one prompt per line")
    if not prompts:
        p.error("give a prompt: --prompt TEXT or --prompts-file FILE")
    check_args(a, len(prompts))
    cfg, ac, _, _ = plan(a)  # every setting checked against the models' configs, nothing loaded
    image, notes = None, []
    if a.image:  # resized to cover and center-cropped exactly as training images (1-frame videos);
        # read now: a corrupt file is refused before the models load, not after
        try:
            image = data.load_video(a.image, 1, cfg.height, cfg.width)[:, 0]  # (3, H, W)
            info = data.probe(a.image)
        except data.BadVideo as e:
            raise ValueError(f"cannot read image {a.image!r}: {e}; pass a PNG or JPEG") from None
        h, w, n = info["height"], info["width"], info["frames"]
        if h * cfg.width != w * cfg.height:  # another aspect: the crop is silent loss, say so
            cut = 1 - cfg.height * cfg.width / (h * w * max(cfg.height / h, cfg.width / w) ** 2)
            notes.append(f"--image {a.image}: {w}x{h} (width x height) is resized to cover "
                         f"{cfg.width}x{cfg.height} and centre-cropped: {cut:.0%} of it cut")
        if n > 1:  # an animated GIF / WebP or a video
            notes.append(f"--image {a.image}: its first frame (of {n})")
    rank = sp_start(a)  # --sp: the process group; only rank 0 prints and writes
    say = print if rank == 0 else (lambda *a, **k: None)
    for note in notes:
        say(note)
    if a.upsample_model and rank == 0:  # App. B: an LLM rewrites short prompts like training's
        import caption

        llm = caption.load_llm(a.upsample_model, device=a.device)
        prompts = [caption.upsample_prompt(q, llm) for q in prompts]
        del llm  # free it before the video models load
    if a.upsample_model and a.sp > 1:  # every rank samples rank 0's prompts
        box = [prompts]
        dist.broadcast_object_list(box, src=0)
        prompts = box[0]
    dtype = torch.bfloat16 if a.bf16 else None
    load_dev = "cpu" if a.offload else a.device  # offload: everything starts (and rests) on the CPU
    paths = out_paths(a.out, len(prompts), prompts, a.seed)
    check_outputs(paths, a)
    net, ae, text = (load_ckpt(a.ckpt, load_dev, dtype) if a.ckpt
                     else load_released(a.model_dir, load_dev, dtype))[:3]
    if a.lora:
        apply_lora(net, a.lora, a.lora_scale, a.lora_merge, say)
    if a.sp > 1:  # the DiT's sequence-parallel group: every rank (dit.py)
        net.sp = ditlib.sp_group(dist.group.WORLD)
    say(f"sampling {len(prompts)} prompt(s): {cfg.num_frames}x{cfg.height}x{cfg.width} | "
          f"{cfg.sampler} {cfg.steps} steps | cfg {cfg.cfg}"
          f"{' dynamic' if cfg.dynamic_cfg else ''}"
          f"{f' for t >= {cfg.cfg_min_t}' if cfg.cfg_min_t and cfg.cfg > 1 else ''}"
          f" | uncond {cfg.uncond}")
    for i in range(0, len(prompts), a.batch_size):
        chunk = prompts[i:i + a.batch_size]
        # prompt j draws from seed + j alone: the same video whatever --batch-size
        gens = [torch.Generator().manual_seed(a.seed + i + j) for j in range(len(chunk))]
        videos = generate(net, ae, text, chunk, cfg, generator=gens, ac=ac, image=image,
                          device=a.device, offload=a.offload, stream=a.stream,
                          progress=rank == 0)  # (b, 3, T, H, W), the same on every rank
        for j, video in enumerate(videos if rank == 0 else []):  # rank 0 writes
            path = paths[i + j]
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            data.write_video(video, path, cfg.fps)
            data.contact_sheet(video, path[:-4] + ".png")
            print(f"wrote {path} ({video.shape[1]} frames at {cfg.fps:g} fps) + .png | "
                  f"{chunk[j][:70]}")


if __name__ == "__main__":
    main(sys.argv[1:])
