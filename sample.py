"""sample.py -- text-to-video and image-to-video generation with CogVideoX (paper Figure 1, §3, App. A, App. B).

The whole inference pipeline of Figure 1, run backwards from noise:
    prompt --(App. B upsampler, optional)--> T5 --> text tokens (B, L, text_dim)
    noise (B, C, T', h, w) --(expert DiT v-prediction, classifier-free guidance, DDIM or DPM++)--> latent
    latent / scaling_factor --(3D causal VAE decoder)--> video (B, 3, T, H, W) in [-1, 1] --> .mp4 + PNG sheet
Image-to-video (App. A): the first frame goes through the VAE encoder and its latent is concatenated with the
noisy latent along channels, exactly as the I2V model was fine-tuned.

Two sources of weights:
  --ckpt DIR       our checkpoint folder as train.py exports it (dit/, vae/, text_encoder/, sample.json)
  --model-dir DIR  a released CogVideoX folder in diffusers layout (transformer/, vae/, text_encoder/,
                   tokenizer/, scheduler/), read with OUR loaders; its scheduler_config.json picks the
                   sampler (DDIM / DPM++) and the SNR shift.

Run:
  python sample.py --ckpt out/shapes/dit --prompt "a red circle moves to the left" --out red.mp4   # after `python train.py`
  python sample.py --ckpt out/shapes/dit --prompts-file prompts.txt --out my_samples/ --seed 1 --sampler dpm
  python sample.py --model-dir CogVideoX-2b --prompt "a panda playing guitar" --out panda.mp4 \\
        --device cuda --bf16 --offload          # released 2B: 49 frames 480x720 at 8 fps
  python sample.py --model-dir CogVideoX-5b-I2V --image first.png --prompt "..." --out i2v.mp4 --device cuda --bf16
  python sample.py --help

Library use (train.py's demo calls this):
  videos = generate(dit, vae, text_encoder, prompts, num_frames, height, width, steps=25, cfg=5.0, seed=0)

Shape legend:
  B batch (prompts)   C latent channels   T frames, T' = (T-1)/4 + 1 latent frames   H, W pixels
  h, w = H/8, W/8 latent grid (8 = the released VAE's spatial factor; the tiny one has 4)   L text tokens
  D text width
"""
import argparse
import contextlib
import json
import math
import os
import struct
import sys
import zlib
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import torch

import diffusion


# ----------------------------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class SampleConfig:
    num_frames: int = 9          # pixel frames, 4k+1 (the causal VAE keeps frame 0 alone)
    height: int = 32
    width: int = 32
    fps: float = 8.0             # playback rate of the written .mp4 (the clips' sampling rate in training)
    steps: int = 50              # §3 sampling steps ("trailing" spacing, see diffusion.sampling_timesteps)
    sampler: str = "ddim"        # "ddim" (eta 0) or "dpm" (DPM++ 2M SDE as released)
    cfg: float = 6.0             # classifier-free guidance scale w; 1 turns guidance off
    dynamic_cfg: bool = False    # the released cosine schedule of w (diffusion.cfg_scale)
    uncond: str = "zeros"        # unconditional text: "zeros" (the paper's dropout input) or "empty" (T5(""))
    snr_shift_scale: float = 1.0  # §3 SNR shift of the noise schedule the DiT was trained with


_D = diffusion.PRESETS  # steps, guidance, sampler and shift come from diffusion.py's presets (one source)
PRESETS = {
    # The shapes demo: 9 frames 32x32 (train.py's last stage); a toy model needs fewer steps and less guidance.
    # A checkpoint's sample.json (train.py writes it) overrides the clip fields.
    "tiny": SampleConfig(steps=_D["tiny"].sample_steps, cfg=_D["tiny"].cfg_scale),
    # Released models: 6 s at 8 fps + 1 frame, 480x720. Loading with --model-dir, the folder's
    # scheduler_config.json decides sampler and shift instead.
    "cogvideox-2b": SampleConfig(num_frames=49, height=480, width=720, sampler=_D["cogvideox-2b"].sampler,
                                 snr_shift_scale=_D["cogvideox-2b"].snr_shift_scale),
    "cogvideox-5b": SampleConfig(num_frames=49, height=480, width=720, sampler=_D["cogvideox-5b"].sampler,
                                 snr_shift_scale=_D["cogvideox-5b"].snr_shift_scale),
}


# ----------------------------------------------------------------------------------------------------------------
# Writing videos and contact sheets (no PIL needed: PyAV for the .mp4, zlib for the PNG)
# ----------------------------------------------------------------------------------------------------------------

def to_uint8(video):
    """(3, T, H, W) in [-1, 1] -> numpy (T, H, W, 3) uint8."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, T, H, W)
    return x.permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, 3)


def write_png(rgb, path):
    """Writes an (H, W, 3) uint8 array as an 8-bit RGB PNG, atomically. The format is 4 chunks; no library."""
    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))  # filter type 0 ("none") on every row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b""))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def contact_sheet(video, path, cols=None, gap=2, max_frames=16, max_width=2048):
    """Saves one video (3, T, H, W) in [-1, 1] as a PNG grid of its frames (row-major, `cols` a row, white gaps).

    A 49-frame 480x720 video at full size would be a ~90 MB sheet: beyond `max_frames` frames an evenly spaced
    subset is shown (first and last kept), and frames shrink so the sheet is about `max_width` pixels wide at most."""
    t = video.shape[1]
    idx = torch.linspace(0, t - 1, min(t, max_frames)).round().long()  # (n,) frames shown
    cols = cols or min(len(idx), 9)
    x = video[:, idx].float().transpose(0, 1)  # (n, 3, H, W)
    if cols * x.shape[-1] > max_width:
        s = max_width / (cols * x.shape[-1])
        x = torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear", antialias=True)  # (n, 3, h, w)
    frames = to_uint8(x.transpose(0, 1))  # (n, h, w, 3)
    n, h, w, _ = frames.shape
    rows = math.ceil(n / cols)
    sheet = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)  # white gaps
    for i in range(n):
        r, c = divmod(i, cols)
        sheet[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = frames[i]
    write_png(sheet, path)


def write_mp4(video, path, fps=8):
    """Encodes one video (3, T, H, W) in [-1, 1] as H.264 .mp4 at `fps`, atomically (temp file + rename)."""
    import av  # only needed when writing

    frames = to_uint8(video)  # (T, H, W, 3)
    _, h, w, _ = frames.shape
    # yuv420p stores colour at half resolution, so libx264 needs even sides: pad by repeating the edge.
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    tmp = f"{path}.tmp{os.getpid()}"
    with av.open(tmp, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
        stream.options = {"crf": "17"}  # near-lossless: the shapes checker may be run on the file
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())  # flush the encoder's delayed frames
    os.replace(tmp, path)


def read_image(path, height, width):
    """First frame for I2V: an image file -> (3, H, W) in [-1, 1], resized to cover and center-cropped exactly
    as data.py prepares training images (1-frame videos; EXIF orientation applied)."""
    import data

    try:
        return data.load_video(path, 1, height, width)[:, 0]  # (3, H, W)
    except data.BadVideo as e:
        raise ValueError(f"cannot read image {path!r}: {e}; pass a PNG or JPEG file") from None


# ----------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------

def guided(dit, cond, uncond, scale, steps, dynamic=False, image=None):
    """Builds v_fn(x_t, t) for diffusion.sample with classifier-free guidance v = v_u + w (v_c - v_u).

    Conditional and unconditional inputs run as ONE batch [uncond; cond] (as the released pipeline does: one
    weight read per step, the batch dimension is nearly free). w is static, or the released dynamic schedule
    (diffusion.cfg_scale documents its quirk: with the timestep VALUE in the formula w oscillates from step to
    step between 1 and 1 + scale; the authors say this is intended, CogVideo issue 267 -- we keep it).
    With scale <= 1 the unconditional half would be wasted, so only the conditional batch runs.
    `image` (B, C, T', h, w) is the I2V condition (App. A), the same for both halves (the image is never dropped).
    """
    use_cfg = scale > 1.0
    text = torch.cat([uncond, cond]) if use_cfg else cond  # (2B or B, L, D)
    dtype = next(dit.parameters()).dtype  # bf16 weights take bf16 inputs; v comes back in float32

    def run(x, t):
        if image is not None:  # App. A: image latent concatenated with the noisy latent along channels
            x = torch.cat([x, torch.cat([image] * (len(x) // len(image)))], dim=1)  # (2B or B, 2C, T', h, w)
        return dit(x.to(dtype), t, text).float()  # (2B or B, C, T', h, w)

    if not use_cfg:
        return run

    def v_cond_uncond(x, t):
        v_u, v_c = run(torch.cat([x, x]), torch.cat([t, t])).chunk(2)  # (B, C, T', h, w) each
        return v_c, v_u

    return diffusion.guided(v_cond_uncond, scale, steps, dynamic)  # §3 CFG, w from diffusion.cfg_scale


# ----------------------------------------------------------------------------------------------------------------
# Generation (the library function)
# ----------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def on(module, device, offload):
    """Runs a stage with `module` on `device`; with offload it goes back to the CPU afterwards, so a big model
    only ever holds one of T5 / DiT / VAE in accelerator memory (the diffusers pipeline's CPU offload order)."""
    def move(dev):
        if isinstance(module, torch.nn.Module):
            module.to(dev)
        elif module is not None:  # dit.TextEncoder: a plain object holding a T5 module and its device
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

    text: an encoder with .encode(list[str]) (dit.TextEncoder) or precomputed cond embeddings (B, L, D).
    uncond: "zeros" -- §3: the text is dropped to an all-zeros embedding in training, so zeros are the model's
    unconditional input (also what the official sampling code passes); "empty" -- T5(""), what the diffusers port
    uses; or a tensor (B, L, D) given directly.
    """
    cond = text.encode(list(prompts)) if hasattr(text, "encode") else text  # (B, L, D)
    if len(cond) != len(prompts):
        raise ValueError(f"got {len(cond)} text embeddings for {len(prompts)} prompts; pass one per prompt")
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


@torch.no_grad()
def generate(dit, vae, text, prompts, num_frames, height, width, steps=50, sampler="ddim", cfg=6.0,
             dynamic_cfg=False, uncond="zeros", seed=0, ac=None, image=None, progress=True, device=None,
             offload=False, stream=False, generator=None, return_latents=False):
    """Prompts -> videos (B, 3, T, H, W) in [-1, 1] (Figure 1 read backwards).

    dit: ExpertDiT (in_channels = 2C for an I2V model); vae: CausalVAE; text: TextEncoder or cond embeddings
    (B, L, D); ac: alphas_cumprod the DiT was trained with (default: diffusion.alphas_cumprod()); image: first
    frames (B, 3, H, W) or (3, H, W) in [-1, 1] for I2V; stream: chunked VAE decode (low memory);
    device: where to run (default: where the DiT is); offload: keep each model on the CPU except during its own
    stage (for big models on one accelerator). `generator` (a CPU torch.Generator) overrides `seed`.
    Random draws follow the diffusers pipeline (image latent, then the initial noise as (B, T', C, h, w), then
    the sampler's noise) so the same generator gives the same latents. return_latents: the final DiT-space latent
    (B, C, T', h, w) instead of decoded video.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    cfgv = vae.cfg
    sf, tf = cfgv.spatial_factor, cfgv.temporal_factor
    patch = dit.cfg.patch
    if (num_frames - 1) % tf:
        raise ValueError(f"num_frames must be {tf}k+1 for this VAE (e.g. {tf * ((num_frames - 1) // tf) + 1})")
    if height % (sf * patch) or width % (sf * patch):
        raise ValueError(f"height and width must be multiples of {sf * patch} (VAE factor x patch size)")
    if (image is not None) != (dit.cfg.in_channels == 2 * dit.cfg.out_channels):
        raise ValueError("--image needs an image-to-video model and an I2V model needs --image")
    if sampler not in ("ddim", "dpm"):
        raise ValueError(f'sampler must be "ddim" or "dpm", not {sampler!r}')
    if image is not None and image.dim() == 4 and len(image) not in (1, len(prompts)):
        raise ValueError(f"got {len(image)} images for {len(prompts)} prompts; pass one image or one per prompt")
    device = torch.device(device) if device is not None else next(dit.parameters()).device
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    ac = diffusion.alphas_cumprod() if ac is None else ac
    B, C = len(prompts), dit.cfg.out_channels
    shape = (B, (num_frames - 1) // tf + 1, C, height // sf, width // sf)  # (B, T', C, h, w)

    with on(text if hasattr(text, "encode") else None, device, offload):  # stage 1: T5
        cond, neg = embed_prompts(text, prompts, uncond, device)  # (B, L, D) each

    img = None
    if image is not None:  # App. A: the image latent is a VAE *sample* x scaling factor in latent frame 0
        image = image[None] if image.dim() == 3 else image  # (B, 3, H, W)
        image = image.expand(B, -1, -1, -1) if len(image) == 1 else image
        with on(vae, device, offload):  # one image at a time, drawing in the pipeline's order
            x = image[:, :, None].to(device, next(vae.parameters()).dtype)  # (B, 3, 1, H, W)
            post = [vae.encode(x[i:i + 1]) for i in range(B)]
            # mean + std * eps with eps drawn on the CPU generator, so a CUDA run gets the same numbers
            z0 = torch.cat([p.mean + (0.5 * p.logvar).exp() * torch.randn(p.mean.shape, generator=g).to(p.mean)
                            for p in post])  # (B, C, 1, h, w)
        img = torch.zeros(B, C, shape[1], shape[3], shape[4], device=device)  # (B, C, T', h, w)
        img[:, :, :1] = z0.float() * cfgv.scaling_factor  # frame 0 holds the image, the rest stay zero

    # The released pipeline draws (B, T', C, h, w) and permutes; drawing this shape keeps the same noise per seed.
    # All draws use the CPU generator and move, so a seed means the same video on any device.
    x_T = torch.randn(shape, generator=g).permute(0, 2, 1, 3, 4).to(device)  # (B, C, T', h, w)
    with on(dit, device, offload):  # stage 2: the denoising loop, §3
        v_fn = guided(dit, cond.to(next(dit.parameters()).dtype), neg.to(next(dit.parameters()).dtype),
                      cfg, steps, dynamic_cfg, img)
        z = diffusion.sample(v_fn, x_T, ac, num_steps=steps, sampler=sampler, generator=g, progress=progress)
    if return_latents:
        return z  # (B, C, T', h, w), scaled like the DiT sees it

    with on(vae, device, offload):  # stage 3: §2.1 decode; the DiT space is z * scaling_factor
        zin = (z / cfgv.scaling_factor).to(next(vae.parameters()).dtype)  # (B, C, T', h, w)
        video = vae.decode(zin, stream=True) if stream else vae.decode(zin)  # (B, 3, T, H, W)
    return video.float().clamp(-1, 1).cpu()


# ----------------------------------------------------------------------------------------------------------------
# Loading: our checkpoints and the released diffusers layout
# ----------------------------------------------------------------------------------------------------------------

def _json(path):
    with open(path) as f:
        return json.load(f)


def load_ckpt(folder, device="cpu", dtype=None):
    """Our checkpoint folder -> (dit, vae, text_encoder, SampleConfig).

    Layout (train.py writes it): dit/ and vae/ (config.json + model.safetensors each, safetensors only),
    text_encoder/ (a T5 folder for dit.TextEncoder) and optionally sample.json (SampleConfig fields: the
    resolution, frame count, fps and noise schedule the DiT was trained with).
    """
    import dit as ditlib
    import vae as vaelib

    for sub in ("dit", "vae", "text_encoder"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise ValueError(f"{folder!r} has no {sub}/ folder: pass a checkpoint written by train.py "
                             "(or a released diffusers folder with --model-dir)")
    cfg = PRESETS["tiny"]
    meta = os.path.join(folder, "sample.json")
    if os.path.exists(meta):
        known = SampleConfig.__dataclass_fields__
        cfg = replace(cfg, **{k: v for k, v in _json(meta).items() if k in known})
    net = ditlib.ExpertDiT.load(os.path.join(folder, "dit"), device, dtype).eval()
    ae = vaelib.CausalVAE.load(os.path.join(folder, "vae"), device).to(dtype=dtype).eval()
    text = ditlib.TextEncoder(os.path.join(folder, "text_encoder"), device, dtype, max_length=net.cfg.text_len)
    return net, ae, text, cfg


# The released scheduler classes, and what they mean for diffusion.sample.
SCHEDULERS = {"CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm"}


def schedule_from_diffusers(path):
    """scheduler_config.json -> (sampler, alphas_cumprod). The class name picks DDIM or DPM++, snr_shift_scale
    the §3 SNR shift (2B: 3.0, 5B: 1.0), rescale_betas_zero_snr the zero terminal SNR."""
    sc = _json(path)
    name = sc.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(f"{path}: scheduler {name!r} is not supported; expected one of {sorted(SCHEDULERS)}")
    if sc.get("prediction_type", "v_prediction") != "v_prediction" or sc.get("timestep_spacing") not in (None, "trailing"):
        raise ValueError(f"{path}: only v_prediction with trailing spacing is supported (CogVideoX's released setting)")
    ac = diffusion.alphas_cumprod(sc.get("num_train_timesteps", 1000), sc.get("beta_start", 0.00085),
                                  sc.get("beta_end", 0.012), sc.get("snr_shift_scale", 3.0),
                                  sc.get("rescale_betas_zero_snr", False))
    return SCHEDULERS[name], ac


def load_released(folder, device="cpu", dtype=None):
    """A released CogVideoX folder (diffusers layout) -> (dit, vae, text_encoder, SampleConfig, alphas_cumprod).

    Every weight goes through our own loaders (nothing from diffusers is imported here)."""
    import dit as ditlib
    import vae as vaelib

    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise ValueError(f"{folder!r} has no {sub}/ folder: pass a CogVideoX folder in diffusers layout "
                             "(or one of our checkpoints with --ckpt)")
    sampler, ac = schedule_from_diffusers(os.path.join(folder, "scheduler", "scheduler_config.json"))
    net = ditlib.ExpertDiT.from_diffusers(os.path.join(folder, "transformer"), device, dtype or torch.float32).eval()
    ae = vaelib.CausalVAE.from_diffusers(os.path.join(folder, "vae"), device=device).to(dtype=dtype).eval()
    text = ditlib.TextEncoder(folder, device, dtype, max_length=net.cfg.text_len)  # reads tokenizer/ + text_encoder/
    tc = _json(os.path.join(folder, "transformer", "config.json"))
    sf = ae.cfg.spatial_factor
    # The released defaults: the transformer's training size (49 frames at 8 fps, 480x720), 50 steps, w = 6.
    # Unconditional input T5(""), as the diffusers pipeline (the test checks we reproduce it); the original
    # code passes zeros (--uncond zeros).
    cfg = SampleConfig(num_frames=tc.get("sample_frames", 49), height=tc.get("sample_height", 60) * sf,
                       width=tc.get("sample_width", 90) * sf, fps=8, steps=50, sampler=sampler, uncond="empty",
                       snr_shift_scale=_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
                       .get("snr_shift_scale", 3.0))
    return net, ae, text, cfg, ac


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def out_paths(out, n, prompts):
    """Where prompt i goes: `out` itself for one prompt ending in .mp4, else numbered files (in folder `out`)."""
    if out.endswith(".mp4"):
        if n == 1:
            return [out]
        return [f"{out[:-4]}_{i:03d}.mp4" for i in range(n)]
    slug = lambda p: "".join(c if c.isalnum() else "_" for c in p.lower())[:40].strip("_")  # noqa: E731
    return [os.path.join(out, f"{i:03d}_{slug(p)}.mp4") for i, p in enumerate(prompts)]


def main(argv=None):
    p = argparse.ArgumentParser(description="CogVideoX text/image-to-video sampling (writes .mp4 + PNG sheet).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="our checkpoint folder (dit/, vae/, text_encoder/, sample.json)")
    src.add_argument("--model-dir", help="released CogVideoX folder in diffusers layout")
    p.add_argument("--prompt", action="append", default=[], help="text prompt (repeat for several)")
    p.add_argument("--prompts-file", help="one prompt per line (blank lines and #comments skipped)")
    p.add_argument("--out", default="samples", help="output .mp4 (one prompt) or folder")
    p.add_argument("--preset", choices=sorted(PRESETS), help="sampling defaults (else the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="the batch starting at prompt i uses seed + i")
    p.add_argument("--num-frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--fps", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler", choices=["ddim", "dpm"])
    p.add_argument("--cfg", type=float, help="guidance scale (1 = no guidance)")
    p.add_argument("--dynamic-cfg", action="store_true", help="the released cosine guidance schedule")
    p.add_argument("--uncond", choices=["zeros", "empty"], help='unconditional text: zeros (paper) or T5("")')
    p.add_argument("--image", help="first frame (PNG/JPEG) for an image-to-video model (App. A)")
    p.add_argument("--upsample-model", help="local LLM folder: rewrite each prompt first (App. B)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per DiT batch (same seed per batch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="run the models in bfloat16 (the released precision)")
    p.add_argument("--offload", action="store_true", help="keep models on the CPU except during their stage")
    p.add_argument("--stream", action="store_true", help="decode the latent in chunks (low memory)")
    a = p.parse_args(argv)
    try:  # bad input (missing folder, wrong frame count or size, non-I2V model with --image): one line, exit 2
        run(a, p)
    except (ValueError, OSError) as e:
        p.error(str(e).splitlines()[0] if str(e) else type(e).__name__)


def run(a, p):
    """The CLI body: load, optionally upsample the prompts, generate in batches, write .mp4 + .png."""
    prompts = list(a.prompt)
    if a.prompts_file:
        with open(a.prompts_file) as f:
            prompts += [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        p.error("give a prompt: --prompt TEXT or --prompts-file FILE")
    dtype = torch.bfloat16 if a.bf16 else None
    load_dev = "cpu" if a.offload else a.device  # offload: everything starts (and rests) on the CPU
    if a.ckpt:
        net, ae, text, cfg = load_ckpt(a.ckpt, load_dev, dtype)
        ac = diffusion.alphas_cumprod(snr_shift_scale=cfg.snr_shift_scale)
    else:
        net, ae, text, cfg, ac = load_released(a.model_dir, load_dev, dtype)
    if a.preset:  # the preset's look (frames, size, steps, ...) but keep the checkpoint's noise schedule
        cfg = replace(PRESETS[a.preset], snr_shift_scale=cfg.snr_shift_scale, sampler=cfg.sampler, uncond=cfg.uncond)
    over = dict(num_frames=a.num_frames, height=a.height, width=a.width, fps=a.fps, steps=a.steps,
                sampler=a.sampler, cfg=a.cfg, uncond=a.uncond)
    cfg = replace(cfg, **{k: v for k, v in over.items() if v is not None}, dynamic_cfg=a.dynamic_cfg or cfg.dynamic_cfg)

    if a.upsample_model:  # App. B: an LLM rewrites short user prompts into the long captions the model saw
        import caption

        llm = caption.load_llm(a.upsample_model, device=a.device)
        prompts = [caption.upsample_prompt(q, llm) for q in prompts]
        del llm  # free it before the video models run
    image = read_image(a.image, cfg.height, cfg.width) if a.image else None
    paths = out_paths(a.out, len(prompts), prompts)
    print(f"sampling {len(prompts)} prompt(s): {cfg.num_frames}x{cfg.height}x{cfg.width} | {cfg.sampler} "
          f"{cfg.steps} steps | cfg {cfg.cfg}{' dynamic' if cfg.dynamic_cfg else ''} | uncond {cfg.uncond}")
    for i in range(0, len(prompts), a.batch_size):
        chunk = prompts[i:i + a.batch_size]
        videos = generate(net, ae, text, chunk, cfg.num_frames, cfg.height, cfg.width, steps=cfg.steps,
                          sampler=cfg.sampler, cfg=cfg.cfg, dynamic_cfg=cfg.dynamic_cfg, uncond=cfg.uncond,
                          seed=a.seed + i, ac=ac, image=image, device=a.device, offload=a.offload,
                          stream=a.stream)  # (b, 3, T, H, W)
        for j, video in enumerate(videos):
            path = paths[i + j]
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write_mp4(video, path, cfg.fps)
            contact_sheet(video, path[:-4] + ".png")
            print(f"wrote {path} ({video.shape[1]} frames at {cfg.fps:g} fps) + .png | {chunk[j][:70]}")


if __name__ == "__main__":
    main(sys.argv[1:])
