"""sample.py: the videos it writes (through data.py), generation (T2V, I2V, CFG), the CLI on our
checkpoints and on a released-layout folder, and latents equal to diffusers' CogVideoXPipeline on
the same tiny weights and noise.

    python -m pytest -q tests/test_sample.py
"""
import json
import os
from dataclasses import replace

import av
import numpy as np
import pytest
import torch
from PIL import Image

import _sp_worker
import data
import dit
import sample
import vae
from sample import SampleConfig

PROMPTS = ["a red circle moves to the left", "a blue square moves up", "a green triangle stays still"]
C = 4  # latent channels of every tiny model here


# ----- helpers -----

def read_mp4(path):
    """-> (frames (T, H, W, 3) uint8, fps as a Fraction, frame count from the header)."""
    with av.open(str(path)) as f:
        s = f.streams.video[0]
        rate, n = s.average_rate, s.frames
        frames = np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])
    return frames, rate, n


def to_uint8(video):
    """(3, T, H, W) in [-1, 1] -> numpy (T, H, W, 3) uint8, the rounding the writers use."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, T, H, W)
    return x.permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)


def randomize(model, seed=0, std=0.2):
    """Our init zero-initialises the modulation and output projection (v == 0): give every weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def make_ckpt(root, i2v=False, fps=6):
    """Our checkpoint layout (dit/, vae/, text_encoder/, sample.json) with tiny random models."""
    ae = randomize(vae.CausalVAE(vae.VAEConfig(channels=(8, 16, 16), layers=1, latent=C, groups=4,
                                               scaling_factor=0.8)), 1, 0.1).eval()
    net = randomize(dit.ExpertDiT(dit.DiTConfig(in_channels=2 * C if i2v else C, out_channels=C, layers=1, heads=2,
                                                head_dim=16, time_dim=16, text_dim=16, text_len=8, base_frames=2,
                                                base_height=4, base_width=4)), 2).eval()
    dit.build_tiny_t5(str(root / "text_encoder"), PROMPTS, d_model=16, heads=2, d_ff=32)
    net.save(str(root / "dit"))
    ae.save(str(root / "vae"))
    (root / "sample.json").write_text(json.dumps(dict(num_frames=5, height=16, width=16, fps=fps, steps=3, cfg=4.0)))
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A CogVideoX folder in the released diffusers layout, saved by diffusers/transformers from tiny random
    models: transformer/, vae/, text_encoder/, tokenizer/, scheduler/ (+ model_index.json)."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5EncoderModel, T5Tokenizer

    root = tmp_path_factory.mktemp("released")
    t5 = dit.build_tiny_t5(str(root / "t5"), PROMPTS, d_model=16, heads=2, d_ff=32)
    torch.manual_seed(0)
    tr = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=C, out_channels=C,
                                     time_embed_dim=16, text_embed_dim=16, num_layers=1, sample_width=4,
                                     sample_height=4, sample_frames=9, max_text_seq_length=8,
                                     use_rotary_positional_embeddings=True).eval()
    ae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 3,
                                up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 16, 16),
                                latent_channels=C, layers_per_block=1, norm_num_groups=4,
                                scaling_factor=0.7).eval()
    # The released 2B scheduler config (DDIM, SNR shift 3, zero terminal SNR, trailing spacing).
    sched = CogVideoXDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   clip_sample=False, set_alpha_to_one=True, prediction_type="v_prediction",
                                   rescale_betas_zero_snr=True, snr_shift_scale=3.0, timestep_spacing="trailing")
    pipe = CogVideoXPipeline(tokenizer=T5Tokenizer.from_pretrained(t5), text_encoder=T5EncoderModel.from_pretrained(t5),
                             vae=ae, transformer=tr, scheduler=sched)
    pipe.save_pretrained(str(root / "model"))
    return root / "model"


# ----- the files the CLI writes (data.write_video, data.contact_sheet) -----

def test_write_mp4_and_contact_sheet(tmp_path):
    g = torch.Generator().manual_seed(0)
    video = torch.rand(3, 9, 24, 40, generator=g) * 2 - 1  # (3, T, H, W)
    data.write_video(video, str(tmp_path / "v.mp4"), fps=12)
    frames, rate, n = read_mp4(tmp_path / "v.mp4")
    assert frames.shape == (9, 24, 40, 3) and n == 9 and rate == 12
    smooth = torch.linspace(-1, 1, 40).expand(3, 5, 24, 40).contiguous()  # a ramp survives H.264 almost intact
    data.write_video(smooth, str(tmp_path / "s.mp4"), fps=7.5)
    frames, rate, _ = read_mp4(tmp_path / "s.mp4")
    assert rate == 7.5 and np.abs(frames.astype(float) - to_uint8(smooth)).max() < 12
    data.write_video(video[:, :3, :23, :39], str(tmp_path / "odd.mp4"), fps=8)  # odd sides padded to even
    assert read_mp4(tmp_path / "odd.mp4")[0].shape == (3, 24, 40, 3)
    # The contact sheet: frames row-major with white gaps, decoded by an independent PNG decoder (FFmpeg).
    data.contact_sheet(video, str(tmp_path / "v.png"), cols=4, gap=2)
    with av.open(str(tmp_path / "v.png")) as f:
        sheet = next(f.decode(video=0)).to_ndarray(format="rgb24")
    ref = to_uint8(video)  # (T, H, W, 3)
    assert sheet.shape == (3 * 24 + 4, 4 * 40 + 6, 3)
    assert np.array_equal(sheet[:24, :40], ref[0]) and np.array_equal(sheet[26:50, 42:82], ref[5])
    assert np.array_equal(sheet[52:, 0:40], ref[8]) and (sheet[24:26] == 255).all() and (sheet[52:, 42:] == 255).all()
    long = torch.rand(3, 49, 8, 300, generator=g) * 2 - 1  # many wide frames: 16 evenly spaced, shrunk
    data.contact_sheet(long, str(tmp_path / "long.png"))
    with av.open(str(tmp_path / "long.png")) as f:
        sheet = next(f.decode(video=0)).to_ndarray(format="rgb24")
    assert sheet.shape[0] == 2 * 6 + 2 and 2000 < sheet.shape[1] <= 2048 + 8 * 2  # 2 rows of 9 frames 6 px high (8 * 2048 / 2700)
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temp files


# ----- generation -----

def test_generate_t2v_seed_cfg_and_uncond(ckpt):
    net, ae, text, cfg = sample.load_ckpt(str(ckpt))
    assert (cfg.num_frames, cfg.height, cfg.fps, cfg.steps) == (5, 16, 6, 3)  # sample.json overrides the preset
    sc = SampleConfig(num_frames=5, height=16, width=16, steps=3, cfg=4.0)
    kw = dict(progress=False)
    a = sample.generate(net, ae, text, PROMPTS[:2], sc, seed=1, **kw)
    assert a.shape == (2, 3, 5, 16, 16) and a.abs().max() <= 1 and a.std() > 0.01
    assert torch.equal(a, sample.generate(net, ae, text, PROMPTS[:2], sc, seed=1, **kw))  # per seed
    assert not torch.allclose(a, sample.generate(net, ae, text, PROMPTS[:2], sc, seed=2, **kw))
    z = sample.generate(net, ae, text, PROMPTS[:2], sc, seed=1, return_latents=True, **kw)
    assert z.shape == (2, C, 2, 4, 4)
    assert torch.allclose(ae.decode(z / ae.cfg.scaling_factor).clamp(-1, 1), a, atol=1e-5)  # decode divides by sf
    # CFG on one batch [uncond; cond] == guiding by hand from two separate unguided calls.
    emb = text.encode(PROMPTS[:2])
    def v_of(x, t, txt):
        return net(x, t, txt)
    x = torch.randn(2, C, 2, 4, 4)
    t = torch.full((2,), 500)
    v = sample.guided(net, emb, torch.zeros_like(emb), 4.0, 3)(x, t)
    v_c, v_u = v_of(x, t, emb), v_of(x, t, torch.zeros_like(emb))
    assert torch.allclose(v, v_u + 4.0 * (v_c - v_u), atol=1e-5)
    # dynamic CFG: the released cosine weight at the timestep value (oscillates; not a smooth ramp)
    vd = sample.guided(net, emb, torch.zeros_like(emb), 4.0, 3, dynamic=True)(x, t)
    w = 1 + 4.0 * (1 - np.cos(np.pi * ((3 - 500) / 3) ** 5)) / 2
    assert torch.allclose(vd, v_u + w * (v_c - v_u), atol=1e-4)
    # unconditional input: zeros (paper) vs T5("") (diffusers) vs no guidance -- three different results
    e = sample.generate(net, ae, text, PROMPTS[:2], replace(sc, uncond="empty"), seed=1,
                        return_latents=True, **kw)
    n = sample.generate(net, ae, text, PROMPTS[:2], replace(sc, cfg=1.0), seed=1, return_latents=True,
                        **kw)
    assert not torch.allclose(z, e) and not torch.allclose(z, n)
    # guidance interval: none of the 3 steps guided == no guidance; guided from t = 0 == always
    g = lambda t: sample.generate(net, ae, text, PROMPTS[:2], replace(sc, cfg_min_t=t), seed=1,  # noqa: E731
                                  return_latents=True, **kw)
    assert torch.allclose(g(1000), n, atol=1e-5) and torch.equal(g(0), z)
    assert not torch.allclose(g(500), z) and not torch.allclose(g(500), n)  # steps 999, 666 only
    # precomputed embeddings instead of an encoder give the same result
    assert torch.equal(z, sample.generate(net, ae, emb, PROMPTS[:2], sc, seed=1, return_latents=True,
                                          **kw))
    with pytest.raises(ValueError, match="4k\\+1"):
        sample.generate(net, ae, text, PROMPTS[:1], replace(sc, num_frames=6), **kw)
    with pytest.raises(ValueError, match="multiples of 8"):
        sample.generate(net, ae, text, PROMPTS[:1], replace(sc, height=12), **kw)
    with pytest.raises(ValueError, match="image-to-video"):
        sample.generate(net, ae, text, PROMPTS[:1], sc, image=torch.zeros(3, 16, 16), **kw)
    with pytest.raises(ValueError, match="needs a text encoder"):
        sample.generate(net, ae, emb, PROMPTS[:2], replace(sc, uncond="empty"), **kw)


def test_cli_on_our_checkpoint(ckpt, tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text(f"# the demo's prompts\n{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    out = tmp_path / "out"
    sample.main(["--ckpt", str(ckpt), "--prompts-file", str(pf), "--out", str(out), "--seed", "3",
                 "--sampler", "dpm", "--dynamic-cfg", "--stream", "--offload"])
    mp4s = sorted(out.glob("*.mp4"))
    assert [p.name[:4] for p in mp4s] == ["000_", "001_"] and "red_circle" in mp4s[0].name
    for p in mp4s:
        frames, rate, n = read_mp4(p)
        assert frames.shape == (5, 16, 16, 3) and n == 5 and rate == 6  # the checkpoint's clip length and fps
        assert p.with_suffix(".png").stat().st_size > 0
    one = tmp_path / "one.mp4"
    sample.main(["--ckpt", str(ckpt), "--prompt", PROMPTS[2], "--out", str(one), "--num-frames", "9",
                 "--height", "24", "--width", "32", "--fps", "10", "--steps", "2"])
    frames, rate, n = read_mp4(one)
    assert frames.shape == (9, 24, 32, 3) and n == 9 and rate == 10 and one.with_suffix(".png").exists()
    with pytest.raises(ValueError, match="no dit/ folder"):  # the loader names the fix ...
        sample.load_ckpt(str(tmp_path))
    with pytest.raises(SystemExit) as e:  # ... and the CLI turns it into one line with exit code 2
        sample.main(["--ckpt", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "x.mp4")])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        sample.main(["--help"])


def test_i2v(tmp_path, capsys):
    root = make_ckpt(tmp_path / "i2v", i2v=True)
    net, ae, text, _ = sample.load_ckpt(str(root))
    img = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    seen = []
    hook = net.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    sc = SampleConfig(num_frames=9, height=16, width=16, steps=2, cfg=3.0)
    kw = dict(progress=False, return_latents=True)
    z = sample.generate(net, ae, text, PROMPTS[:1], sc, image=img, seed=7, **kw)
    hook.remove()
    # App. A: channels [noisy C | image C]; the image latent is a VAE sample x scaling factor in latent frame 0
    x = seen[0]
    assert x.shape == (2, 2 * C, 3, 4, 4) and (x[:, C:, 1:] == 0).all()
    post = ae.encode(img[None, :, None])
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))  # the first draw of the seed
    expect = (post.mean + (0.5 * post.logvar).exp() * eps) * ae.cfg.scaling_factor  # (1, C, 1, h, w)
    assert torch.allclose(x[0, C:, :1], expect[0], atol=1e-5) and torch.equal(x[0, C:], x[1, C:])  # same for uncond
    other = sample.generate(net, ae, text, PROMPTS[:1], sc, image=-img, seed=7, **kw)
    assert not torch.allclose(z, other)  # the image conditions the result
    with pytest.raises(ValueError, match="needs --image"):
        sample.generate(net, ae, text, PROMPTS[:1], sc, seed=7, **kw)
    # CLI: --image reads a PNG (any size: resized to cover, center-cropped, the way data.py reads
    # training images) and writes the video
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "first.png")
    assert torch.allclose(data.load_video(str(tmp_path / "first.png"), 1, 16, 16)[:, 0],
                          torch.full((3, 16, 16), 200 / 127.5 - 1))
    sample.main(["--ckpt", str(root), "--image", str(tmp_path / "first.png"), "--prompt", PROMPTS[0],
                 "--out", str(tmp_path / "i2v.mp4"), "--num-frames", "9"])
    assert read_mp4(tmp_path / "i2v.mp4")[2] == 9 and (tmp_path / "i2v.png").exists()
    with pytest.raises(SystemExit) as e:  # a missing or unreadable image: one line, exit code 2
        sample.main(["--ckpt", str(root), "--image", str(tmp_path / "missing.png"), "--prompt", "x",
                     "--out", str(tmp_path / "x.mp4")])
    assert e.value.code == 2 and "cannot read image" in capsys.readouterr().err


# ----- released diffusers layout -----

def test_released_layout_cli_and_scheduler(released, tmp_path):
    from diffusers import CogVideoXDPMScheduler

    sampler, ac = sample.schedule_from_diffusers(str(released / "scheduler" / "scheduler_config.json"))
    assert sampler == "ddim" and torch.allclose(ac, sample.diffusion.alphas_cumprod(snr_shift_scale=3.0))
    # a scheduler config this sampler does not implement is refused, not sampled on another schedule
    base = json.loads((released / "scheduler" / "scheduler_config.json").read_text())
    for k, v in (("beta_schedule", "linear"), ("beta_schedule", "squaredcos_cap_v2"),
                 ("set_alpha_to_one", False), ("prediction_type", None),
                 ("timestep_spacing", None), ("trained_betas", [0.1] * 1000)):
        bad = dict(base, **{k: v}) if v is not None else {x: y for x, y in base.items() if x != k}
        (tmp_path / "s.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=f"{k}=.* is not supported"):
            sample.schedule_from_diffusers(str(tmp_path / "s.json"))
    # a number of the wrong type: one line naming it (were TypeErrors inside alphas_cumprod)
    for k, v in (("snr_shift_scale", "3"), ("beta_end", None), ("num_train_timesteps", 1000.5)):
        (tmp_path / "s.json").write_text(json.dumps(dict(base, **{k: v})))
        with pytest.raises(ValueError, match=f"s.json: {k} = .* is not of type"):
            sample.schedule_from_diffusers(str(tmp_path / "s.json"))
    import shutil  # the CLI: the transformer's values read before they were checked (a TypeError)
    shutil.copytree(released, tmp_path / "rb")
    tcfg = json.loads((tmp_path / "rb" / "transformer" / "config.json").read_text())
    (tmp_path / "rb" / "transformer" / "config.json").write_text(json.dumps(dict(tcfg, patch_size_t="2")))
    with pytest.raises(SystemExit) as e:
        sample.main(["--model-dir", str(tmp_path / "rb"), "--prompt", "x", "--out", str(tmp_path / "x.mp4")])
    assert e.value.code == 2
    net, ae, text, cfg, _ = sample.load_released(str(released))
    assert (cfg.num_frames, cfg.height, cfg.width, cfg.sampler, cfg.snr_shift_scale) == (9, 16, 16, "ddim", 3.0)
    assert ae.cfg.scaling_factor == 0.7 and text.max_length == 8
    out = tmp_path / "rel.mp4"
    sample.main(["--model-dir", str(released), "--prompt", PROMPTS[0], "--out", str(out), "--steps", "3"])
    frames, rate, n = read_mp4(out)
    assert frames.shape == (9, 16, 16, 3) and n == 9 and rate == 8 and out.with_suffix(".png").exists()
    # a DPM scheduler folder (the 5B's) with no shift: the class name picks DPM++, snr_shift_scale the shift
    dpm = CogVideoXDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                rescale_betas_zero_snr=True, snr_shift_scale=1.0, timestep_spacing="trailing")
    dpm.save_pretrained(str(tmp_path / "dpm"))
    sampler, ac = sample.schedule_from_diffusers(str(tmp_path / "dpm" / "scheduler_config.json"))
    assert sampler == "dpm" and torch.allclose(ac, sample.diffusion.alphas_cumprod(snr_shift_scale=1.0))
    (tmp_path / "bad.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler"}))
    with pytest.raises(ValueError, match="not supported"):
        sample.schedule_from_diffusers(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="no transformer/ folder"):
        sample.load_released(str(tmp_path))


@pytest.mark.parametrize("dynamic", [False, True])
def test_matches_diffusers_pipeline(released, dynamic):
    """Our loaders + generate() == CogVideoXPipeline on the same folder and noise: the latents before decode
    (output_type="latent"), DDIM, T5("") as the unconditional input (what the pipeline uses)."""
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(str(released))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS[:2], num_frames=9, height=16, width=16, num_inference_steps=4, guidance_scale=5.0,
               use_dynamic_cfg=dynamic, generator=torch.Generator().manual_seed(11), output_type="latent",
               max_sequence_length=8).frames  # (B, T', C, h, w)
    net, ae, text, cfg, ac = sample.load_released(str(released))
    sc = SampleConfig(num_frames=9, height=16, width=16, steps=4, sampler=cfg.sampler, cfg=5.0,
                      dynamic_cfg=dynamic, uncond="empty")
    ours = sample.generate(net, ae, text, PROMPTS[:2], sc, seed=11, ac=ac, progress=False,
                           return_latents=True)  # (B, C, T', h, w)
    ref = ref.permute(0, 2, 1, 3, 4)
    assert ref.abs().mean() > 0.1
    # diffusers builds the schedule in float32, we in float64: agreement to float32 rounding, not bit-exact
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()
    if not dynamic:  # and the decoded video (9 frames = one VAE chunk, where whole-clip decoding equals diffusers)
        ref = pipe(PROMPTS[:1], num_frames=9, height=16, width=16, num_inference_steps=4, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(11), output_type="pt", max_sequence_length=8).frames
        ours = sample.generate(net, ae, text, PROMPTS[:1], replace(sc, sampler="ddim"), seed=11, ac=ac,
                               progress=False)  # (1, 3, T, H, W) in [-1, 1]
        assert torch.allclose((ours.permute(0, 2, 1, 3, 4) + 1) / 2, ref, atol=1e-4)  # theirs (1, T, 3, H, W) in [0, 1]


@pytest.fixture(scope="module")
def released_dpm(released, tmp_path_factory):
    """The released folder with the 5B's scheduler: CogVideoXDPMScheduler, no SNR shift."""
    from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline

    root = tmp_path_factory.mktemp("released_dpm") / "model"
    dpm = CogVideoXDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False,
                                set_alpha_to_one=True, rescale_betas_zero_snr=True, snr_shift_scale=1.0,
                                timestep_spacing="trailing")
    CogVideoXPipeline.from_pretrained(str(released), scheduler=dpm).save_pretrained(str(root))
    return root


@pytest.mark.parametrize("steps", [4, 7])
def test_dpm_matches_diffusers_pipeline(released_dpm, steps):
    """A DPM scheduler folder (the released 5B's sampler): same seed -> the same latents as
    CogVideoXPipeline. Its scheduler draws noise on every step, the last included, and twice on the
    second-order steps (the first draw discarded), in the pipeline's (B, T', C, h, w) layout; with 7
    steps the last step (142 -> 0) is second order too."""
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(str(released_dpm))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS[:2], num_frames=9, height=16, width=16, num_inference_steps=steps, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(11), output_type="latent",
               max_sequence_length=8).frames.permute(0, 2, 1, 3, 4)  # (B, C, T', h, w)
    net, ae, text, cfg, ac = sample.load_released(str(released_dpm))
    assert cfg.sampler == "dpm"
    sc = replace(cfg, num_frames=9, height=16, width=16, steps=steps, cfg=5.0)
    ours = sample.generate(net, ae, text, PROMPTS[:2], sc, seed=11, ac=ac, progress=False,
                           return_latents=True)  # (B, C, T', h, w)
    assert ref.abs().mean() > 0.1
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def test_i2v_matches_diffusers_pipeline(released, tmp_path):
    """The 5B-I2V path (App. A; RoPE + learned position table, 2C input channels) against
    CogVideoXImageToVideoPipeline: same folder layout, same image and seed -> the same latents."""
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(1)
    tr = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=2 * C, out_channels=C,
                                     time_embed_dim=16, text_embed_dim=16, num_layers=1, sample_width=4,
                                     sample_height=4, sample_frames=9, max_text_seq_length=8,
                                     use_rotary_positional_embeddings=True,
                                     use_learned_positional_embeddings=True).eval()
    base = CogVideoXImageToVideoPipeline.from_pretrained(str(released), transformer=tr)
    base.save_pretrained(str(tmp_path / "i2v"))
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(str(tmp_path / "i2v"))
    pipe.set_progress_bar_config(disable=True)
    img = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1  # (3, H, W) in [-1, 1]
    ref = pipe(image=img[None], prompt=PROMPTS[1], num_frames=9, height=16, width=16, num_inference_steps=3,
               guidance_scale=4.0, generator=torch.Generator().manual_seed(4), output_type="latent",
               max_sequence_length=8).frames.permute(0, 2, 1, 3, 4)  # (1, C, T', h, w)
    net, ae, text, cfg, ac = sample.load_released(str(tmp_path / "i2v"))
    assert net.cfg.pos == "learned" and net.cfg.in_channels == 2 * C
    sc = SampleConfig(num_frames=9, height=16, width=16, steps=3, cfg=4.0, uncond="empty")
    ours = sample.generate(net, ae, text, PROMPTS[1:2], sc, seed=4, ac=ac, image=img, progress=False,
                           return_latents=True)
    assert ref.abs().mean() > 0.1 and torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


# ----- every released configuration against the diffusers pipelines -----
# 2B: sin-cos positions, VAE scaling factor 1.15258426, DDIM with SNR shift 3 (below);
# 5B: RoPE, DPM, no shift (test_dpm_matches_diffusers_pipeline, test_matches_diffusers_pipeline);
# 5B-I2V: RoPE + the learned table, 2C inputs, DPM, no shift (below; DDIM: test_i2v_matches_...);
# 1.5-5B and 1.5-5B-I2V: the test_15_* tests further down (DDIM and DPM each).

def release_folder(released, root, name):
    """A tiny folder with one 1.0 release's switches, from the `released` folder's T5 and tokenizer."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler,
                           CogVideoXImageToVideoPipeline, CogVideoXPipeline, CogVideoXTransformer3DModel)
    i2v = name == "5b-i2v"
    torch.manual_seed(7)
    tr = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=2 * C if i2v else C,
                                     out_channels=C, time_embed_dim=16, text_embed_dim=16, num_layers=1,
                                     sample_width=4, sample_height=4, sample_frames=9, max_text_seq_length=8,
                                     use_rotary_positional_embeddings=name != "2b",
                                     use_learned_positional_embeddings=i2v).eval()
    ae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 3,
                                up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 16, 16),
                                latent_channels=C, layers_per_block=1, norm_num_groups=4,
                                scaling_factor=1.15258426 if name == "2b" else 0.7).eval()
    kw = dict(beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=True,
              rescale_betas_zero_snr=True, timestep_spacing="trailing")
    sched = (CogVideoXDDIMScheduler(snr_shift_scale=3.0, **kw) if name == "2b"
             else CogVideoXDPMScheduler(snr_shift_scale=1.0, **kw))
    Pipe = CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline
    Pipe.from_pretrained(str(released), transformer=tr, vae=ae, scheduler=sched).save_pretrained(str(root / name))
    return Pipe, root / name


@pytest.mark.parametrize("name", ["2b", "5b-i2v"])
def test_release_matches_diffusers_pipeline(released, tmp_path, name):
    """A tiny folder with the 2B's switches (sin-cos positions, its VAE factor, DDIM with SNR shift 3) or
    the 5B-I2V's (RoPE + learned table, 2C inputs, DPM without shift): our loaders + generate() == the
    diffusers pipeline's latents, same seed (and image)."""
    Pipe, folder = release_folder(released, tmp_path, name)
    pipe = Pipe.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    img = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1 if name == "5b-i2v" else None
    kw = dict(image=img[None]) if img is not None else {}
    ref = pipe(prompt=PROMPTS[:1], num_frames=9, height=16, width=16, num_inference_steps=4, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(4), output_type="latent", max_sequence_length=8,
               **kw).frames.permute(0, 2, 1, 3, 4)  # (1, C, T', h, w)
    net, ae, text, cfg, ac = sample.load_released(str(folder))
    assert (net.cfg.pos, cfg.sampler, cfg.snr_shift_scale, ae.cfg.scaling_factor) == \
        (("sincos", "ddim", 3.0, 1.15258426) if name == "2b" else ("learned", "dpm", 1.0, 0.7))
    sc = replace(cfg, num_frames=9, height=16, width=16, steps=4, cfg=5.0)
    ours = sample.generate(net, ae, text, PROMPTS[:1], sc, seed=4, ac=ac, image=img, progress=False,
                           return_latents=True)  # (1, C, T', h, w)
    assert ref.abs().mean() > 0.1 and torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()
    # one generator per prompt (what the CLI passes: prompt i from seed + i) == the pipeline given
    # a list of generators: the image latents, the initial noise and DPM++'s noise row by row
    gens = lambda: [torch.Generator().manual_seed(s) for s in (4, 9)]  # noqa: E731
    imgs = torch.stack([img, -img]) if img is not None else None  # (2, 3, H, W)
    kw = dict(image=imgs) if img is not None else {}
    ref = pipe(prompt=PROMPTS[:2], num_frames=9, height=16, width=16, num_inference_steps=4,
               guidance_scale=5.0, generator=gens(), output_type="latent", max_sequence_length=8,
               **kw).frames.permute(0, 2, 1, 3, 4)  # (2, C, T', h, w)
    ours = sample.generate(net, ae, text, PROMPTS[:2], sc, generator=gens(), ac=ac, image=imgs,
                           progress=False, return_latents=True)  # (2, C, T', h, w)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("extra", [["--num-frames", "13"], ["--height", "32"]])
def test_learned_table_bounds_checked_before_loading(released, tmp_path, monkeypatch, capsys,
                                                     extra):
    """A 5B-I2V folder (learned position table: its native grid only) at another size or with more
    frames is one line naming the settings it covers, before any weights load (it loaded the 5B
    and T5-XXL first, then named latent shapes)."""
    _, folder = release_folder(released, tmp_path, "5b-i2v")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "first.png")
    monkeypatch.setattr(sample, "load_released", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["--model-dir", str(folder), "--prompt", "x", "--image", str(tmp_path / "first.png"),
            "--out", str(tmp_path / "o.mp4"), "--height", "16", "--width", "16",
            "--num-frames", "9"]
    with pytest.raises(SystemExit) as e:
        sample.main(argv + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "learned position table covers 16x16 and up to 9 frames: sample " \
        "at height 16, width 16 and num_frames <= 9" in err[-1], err


# ----- CogVideoX 1.5 folders (temporal patch 2; the I2V's ofs and inverted image-latent scale) -----

def tiny_15_transformer(i2v, seed):
    """A tiny 1.5-shaped transformer with the released 1.5 config's particular values: temporal
    patch 2, patch_bias false, sample_frames 81, a 300 x 300 RoPE bound; I2V: 2C inputs, ofs."""
    from diffusers import CogVideoXTransformer3DModel
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=2 * C if i2v else C, out_channels=C,
        time_embed_dim=16, text_embed_dim=16, num_layers=1, sample_width=300, sample_height=300,
        sample_frames=81, max_text_seq_length=8, patch_size_t=2, patch_bias=False,
        ofs_embed_dim=16 if i2v else None, use_rotary_positional_embeddings=True).eval()


@pytest.fixture(scope="module")
def released15(released, tmp_path_factory):
    """Tiny CogVideoX1.5-5B and -5B-I2V folders in the released layout, each with the DDIM scheduler
    (as the conversion script writes it) and with the DPM one; the I2V's VAE has the 1.5 VAE config
    (scaling_factor 0.7, invert_scale_latents)."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline,
                           CogVideoXPipeline)
    root = tmp_path_factory.mktemp("released15")
    dpm = CogVideoXDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False,
                                set_alpha_to_one=True, rescale_betas_zero_snr=True, snr_shift_scale=1.0,
                                timestep_spacing="trailing")
    torch.manual_seed(5)
    ae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 3,
                                up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 16, 16),
                                latent_channels=C, layers_per_block=1, norm_num_groups=4, scaling_factor=0.7,
                                invert_scale_latents=True).eval()
    t2v = CogVideoXPipeline.from_pretrained(str(released), transformer=tiny_15_transformer(False, 3))
    i2v = CogVideoXImageToVideoPipeline.from_pretrained(str(released), transformer=tiny_15_transformer(True, 4),
                                                        vae=ae)
    for name, pipe in (("t2v", t2v), ("i2v", i2v)):
        pipe.save_pretrained(str(root / f"{name}_ddim"))
        type(pipe).from_pretrained(str(root / f"{name}_ddim"), scheduler=dpm).save_pretrained(str(root / f"{name}_dpm"))
    return root


@pytest.mark.parametrize("sched", ["ddim", "dpm"])
@pytest.mark.parametrize("frames", [9, 13], ids=["odd_latents", "even_latents"])
def test_15_t2v_matches_diffusers_pipeline(released15, sched, frames):
    """A 1.5 folder: our loaders + generate() == CogVideoXPipeline, same seed. 9 frames are 3 latent
    frames, padded to 4 (the pipeline samples one more frame in front and drops it); 13 are 4."""
    from diffusers import CogVideoXPipeline

    folder = released15 / f"t2v_{sched}"
    pipe = CogVideoXPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS[:2], num_frames=frames, height=16, width=16, num_inference_steps=4, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(11), output_type="latent",
               max_sequence_length=8).frames.permute(0, 2, 1, 3, 4)  # (B, C, T' + k, h, w), uncropped
    net, ae, text, cfg, ac = sample.load_released(str(folder))
    assert (net.cfg.patch_t, cfg.sampler) == (2, sched)
    sc = replace(cfg, num_frames=frames, height=16, width=16, steps=4, cfg=5.0)
    ours = sample.generate(net, ae, text, PROMPTS[:2], sc, seed=11, ac=ac, progress=False,
                           return_latents=True)  # (B, C, T', h, w)
    T_lat = (frames - 1) // 4 + 1
    assert ours.shape[2] == T_lat and ref.shape[2] == T_lat + T_lat % 2
    ref = ref[:, :, T_lat % 2:]  # the pipeline's crop before decoding
    assert ref.abs().mean() > 0.1
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("sched", ["ddim", "dpm"])
def test_15_i2v_matches_diffusers_pipeline(released15, sched):
    """A 1.5-I2V folder: ofs embedding, image latent / 0.7 (invert_scale_latents) in padding frame 0,
    odd latent count (9 frames: 3 latent frames + 1) == CogVideoXImageToVideoPipeline."""
    from diffusers import CogVideoXImageToVideoPipeline

    folder = released15 / f"i2v_{sched}"
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    img = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1  # (3, H, W) in [-1, 1]
    ref = pipe(image=img[None], prompt=PROMPTS[1], num_frames=9, height=16, width=16, num_inference_steps=3,
               guidance_scale=4.0, generator=torch.Generator().manual_seed(4), output_type="latent",
               max_sequence_length=8).frames.permute(0, 2, 1, 3, 4)[:, :, 1:]  # (1, C, T', h, w)
    net, ae, text, cfg, ac = sample.load_released(str(folder))
    assert (net.cfg.ofs_dim, net.cfg.in_channels, ae.cfg.invert_scale_latents) == (16, 2 * C, True)
    sc = replace(cfg, num_frames=9, height=16, width=16, steps=3, cfg=4.0)
    ours = sample.generate(net, ae, text, PROMPTS[1:2], sc, seed=4, ac=ac, image=img, progress=False,
                           return_latents=True)
    assert ref.abs().mean() > 0.1 and torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def test_15_folder_defaults_and_cli(released15, tmp_path):
    """A 1.5 folder's defaults come from its configs and the release (81 frames = sample_frames, 16 fps,
    768x1360, the scheduler's sampler and shift), and the CLI samples it end to end: T2V, and I2V with
    --image (here at 16x16 to stay fast on a CPU)."""
    _, _, _, cfg, _ = sample.load_released(str(released15 / "t2v_dpm"))
    assert (cfg.num_frames, cfg.height, cfg.width, cfg.fps, cfg.sampler, cfg.snr_shift_scale) == \
        (81, 768, 1360, 16, "dpm", 1.0)
    out = tmp_path / "t2v.mp4"
    sample.main(["--model-dir", str(released15 / "t2v_dpm"), "--prompt", PROMPTS[0], "--out", str(out),
                 "--height", "16", "--width", "16", "--steps", "2"])
    frames, rate, n = read_mp4(out)
    assert frames.shape == (81, 16, 16, 3) and n == 81 and rate == 16 and out.with_suffix(".png").exists()
    Image.fromarray(np.full((16, 24, 3), 90, np.uint8)).save(tmp_path / "first.png")
    sample.main(["--model-dir", str(released15 / "i2v_ddim"), "--image", str(tmp_path / "first.png"),
                 "--prompt", PROMPTS[1], "--out", str(tmp_path / "i2v.mp4"), "--height", "16", "--width", "16",
                 "--num-frames", "17", "--steps", "2"])
    frames, rate, n = read_mp4(tmp_path / "i2v.mp4")
    assert frames.shape == (17, 16, 16, 3) and rate == 16


def test_cli_upsample_model(ckpt, tmp_path, monkeypatch):
    """--upsample-model DIR: each prompt goes through caption.upsample_prompt (App. B) with the LLM loaded from
    DIR before T5. The LLM here is a stand-in with a fixed reply (caption.py's tests run a real tiny one)."""
    import caption

    calls = []

    class Fixed:
        def generate(self, turns, max_new_tokens=256):
            calls.append(turns[0][1])
            return ["[A red circle glides to the left]"]  # the upsampler unwraps the bracketed reply

    monkeypatch.setattr(caption, "load_llm", lambda folder, device="cpu", dtype=None: calls.append(folder) or Fixed())
    sample.main(["--ckpt", str(ckpt), "--prompt", "red circle", "--out", str(tmp_path / "up"),
                 "--upsample-model", str(tmp_path / "llm"), "--steps", "1"])
    assert calls == [str(tmp_path / "llm"), "red circle"]
    assert [p.name for p in (tmp_path / "up").glob("*.mp4")] == ["000_a_red_circle_glides_to_the_left_s0.mp4"]


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    """A missing --ckpt / --model-dir folder: one `error:` line and exit code 2, no traceback; once
    as a real `python sample.py` process (its exit code), once through main() in this process (a
    traceback would be an exception other than SystemExit)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--ckpt", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "a.mp4")]
    r = subprocess.run([sys.executable, "sample.py", *args], capture_output=True, text=True,
                       cwd=root)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "error:" in r.stderr, r.stderr
    with pytest.raises(SystemExit) as e:
        sample.main(["--model-dir", str(tmp_path / "nope"), *args[2:]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and "error:" in err, err[-500:]


# ----- bad values: one line naming the fix, exit code 2, before any model is loaded (issue 20) -----

@pytest.mark.parametrize("extra, words", [
    (["--height", "0"], "--height must be >= 1, got 0"),
    (["--width", "-16"], "--width must be >= 1, got -16"),
    (["--num-frames", "-3"], "--num-frames must be >= 1, got -3"),
    (["--num-frames", "0"], "--num-frames must be >= 1, got 0"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--fps", "0"], "--fps must be a finite number > 0, got 0.0"),
    (["--fps", "1e-9"], "--fps 1e-09 rounds to a frame rate of 0"),  # would write 24 fps
    (["--cfg", "-1"], "--cfg must be a number >= 1"),
    (["--cfg", "0.5"], "--cfg must be a number >= 1"),  # would run unguided, as 1
    (["--cfg", "nan"], "--cfg must be a number >= 1"),  # would run unguided, printing "cfg nan"
    (["--cfg", "inf"], "--cfg must be a number >= 1"),  # would write an all-black video
    (["--seed", str(2**64 - 1)], "--seed 18446744073709551615: prompt i uses seed + i"),
    # checked against the models' config files, before their weights load
    (["--steps", "2000"], "steps must be in [1, 1000]"),
    (["--num-frames", "6"], "num_frames must be 4k+1 for this VAE (e.g. 5 or 9)"),
    (["--height", "20"], "height and width must be multiples of 8"),
    (["--image", "{tmp}/first.png"], "--image needs an image-to-video model"),
    (["--cfg-min-t", "1001"], "--cfg-min-t must be in [0, 1000]"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--out", "{tmp}/adir.mp4"], "adir.mp4 is a folder; pass a file path"),
    (["--out", "{tmp}/afile"], "afile is a file; pass a folder"),
    (["--out", "/proc/nope/x.mp4"], "cannot create files in /proc"),  # /proc: no file can be created there
    (["--image", "{tmp}/missing.png"], "cannot read image"),
    # taken for a folder name: out.mkv/000_x.mp4
    (["--out", "{tmp}/v.mkv"], "--out {tmp}/v.mkv: sample.py writes .mp4 videos"),
    (["--out", "{tmp}/v.PNG"], "sample.py writes .mp4 videos (and .png contact sheets)"),
    # were "[Errno 21] Is a directory: ..." and "'utf-8' codec can't decode ...", no flag named
    (["--prompts-file", "{tmp}/adir.mp4"], "--prompts-file {tmp}/adir.mp4: Is a directory; pass a "
                                           "UTF-8 text file, one prompt per line"),
    (["--prompts-file", "{tmp}/latin1.txt"], "--prompts-file {tmp}/latin1.txt: not UTF-8 text"),
])
def test_cli_bad_values_exit_2_before_loading(ckpt, tmp_path, monkeypatch, capsys, extra, words):
    (tmp_path / "adir.mp4").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "first.png")
    monkeypatch.setattr(sample, "load_ckpt", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["--ckpt", str(ckpt), "--prompt", "x", "--prompt", "y", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        sample.main(argv + [v.format(tmp=tmp_path) for v in extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and words.format(tmp=tmp_path) in err[-1], err


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_batch_size_does_not_change_a_prompts_video(ckpt, tmp_path, monkeypatch, sampler):
    """--seed S: prompt i's video is drawn from seed S + i alone, whatever --batch-size (a batch
    of 2 drew both prompts from S: prompt 1's video changed, and with DPM++ prompt 0's too), and it
    is generate(prompt i alone, seed=S + i)."""
    got = {}
    monkeypatch.setattr(sample.data, "write_video", lambda v, path, fps: got.setdefault(
        (bs, os.path.basename(path)), v.clone()))
    monkeypatch.setattr(sample.data, "contact_sheet", lambda *a, **k: None)
    for bs in (1, 2, 3):
        sample.main(["--ckpt", str(ckpt), *sum([["--prompt", q] for q in PROMPTS], []), "--out",
                     str(tmp_path / "o"), "--seed", "5", "--sampler", sampler,
                     "--batch-size", str(bs)])
    net, ae, text, cfg = sample.load_ckpt(str(ckpt))
    names = sorted(n for b, n in got if b == 1)
    assert len(names) == 3 and len(got) == 9
    for i, name in enumerate(names):
        alone = sample.generate(net, ae, text, PROMPTS[i:i + 1], replace(cfg, sampler=sampler),
                                seed=5 + i, progress=False)[0]
        for bs in (1, 2, 3):
            assert torch.allclose(got[bs, name], alone, atol=1e-5), (bs, name)
    with pytest.raises(ValueError, match="one per prompt"):
        sample.generate(net, ae, text, PROMPTS[:2], cfg, generator=[torch.Generator()],
                        progress=False)


def test_out_suffix_in_any_case_is_a_file(ckpt, tmp_path, monkeypatch):
    """--out clip.MP4 is the file clip.MP4 (it was a folder named clip.MP4 holding 000_x.mp4);
    for several prompts b_NNN_sSEED.mp4 (b_NNN.mp4 was overwritten by a run with another --seed)."""
    monkeypatch.setattr(sample, "generate", lambda net, ae, text, prompts, cfg, **kw: torch.zeros(
        len(prompts), 3, cfg.num_frames, cfg.height, cfg.width))
    sample.main(["--ckpt", str(ckpt), "--prompt", "x", "--out", str(tmp_path / "clip.MP4")])
    assert (tmp_path / "clip.MP4").is_file() and (tmp_path / "clip.png").is_file()
    two = ["--ckpt", str(ckpt), "--prompt", "x", "--prompt", "y", "--out", str(tmp_path / "b.Mp4")]
    sample.main(two)
    sample.main([*two, "--seed", "7"])  # named by their seeds: the first run's files stay
    assert sorted(p.name for p in tmp_path.glob("b_*")) == sorted(
        f"b_{i:03d}_s{s + i}.{x}" for s in (0, 7) for i in range(2) for x in ("mp4", "png"))


def test_prompts_file_with_a_byte_order_mark(ckpt, tmp_path, monkeypatch):
    """A --prompts-file saved as "UTF-8 with BOM" (Windows editors, PowerShell's Out-File): its
    first line, a #comment, was sampled as a prompt ("\ufeff# my prompts": a wasted video, and
    every later file renumbered); a first prompt would carry the BOM into T5."""
    seen = []
    monkeypatch.setattr(sample, "generate", lambda net, ae, text, prompts, cfg, **kw: (
        seen.extend(prompts), torch.zeros(len(prompts), 3, cfg.num_frames, cfg.height,
                                          cfg.width))[1])
    for first in ("# my prompts\n", ""):
        (tmp_path / "p.txt").write_bytes(f"\ufeff{first}a red circle\n".encode("utf-8"))
        sample.main(["--ckpt", str(ckpt), "--prompts-file", str(tmp_path / "p.txt"), "--out",
                     str(tmp_path / "o")])
    assert seen == ["a red circle", "a red circle"]


def test_prompts_file_of_comments_only_is_named(ckpt, tmp_path, capsys):
    """A --prompts-file with only blank and # comment lines: one line naming the file, exit 2
    (it said "give a prompt: --prompt TEXT or --prompts-file FILE", as if none was given)."""
    (tmp_path / "p.txt").write_text("# my prompts\n\n   \n")
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(ckpt), "--prompts-file", str(tmp_path / "p.txt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].endswith(f"--prompts-file {tmp_path / 'p.txt'} holds no prompt "
                                                  "(only blank or # comment lines): add one prompt per line")


def test_outputs_never_overwrite_inputs(tmp_path, capsys):
    """--image cat.png --out cat.mp4 would write the contact sheet over the image: refused, the
    image kept; so is an output over the prompts file."""
    root = make_ckpt(tmp_path / "i2v", i2v=True)
    img = tmp_path / "cat.png"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(img)
    before = img.read_bytes()
    for argv in (["--image", str(img), "--prompt", "x", "--out", str(tmp_path / "cat.mp4")],
                 ["--image", str(img), "--prompts-file", str(tmp_path / "p.png"),
                  "--out", str(tmp_path / "p.mp4")]):
        (tmp_path / "p.png").write_text("a red circle\n")
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", str(root), *argv])
        assert e.value.code == 2 and "would overwrite the" in capsys.readouterr().err
    assert img.read_bytes() == before and not (tmp_path / "cat.mp4").exists()


def test_preset_sets_the_sampler(ckpt, tmp_path, monkeypatch):
    """--preset gives every sampling setting but the DiT's noise schedule and unconditional input:
    the 5B preset samples with DPM++ on a checkpoint whose sample.json says nothing of it."""
    seen = []

    def fake(net, ae, text, prompts, cfg, **kw):
        seen.append(cfg)
        return torch.zeros(len(prompts), 3, cfg.num_frames, cfg.height, cfg.width)

    monkeypatch.setattr(sample, "generate", fake)
    small = ["--num-frames", "5", "--height", "16", "--width", "16"]
    sample.main(["--ckpt", str(ckpt), "--prompt", "x", "--out", str(tmp_path / "a.mp4"), *small,
                 "--preset", "cogvideox-5b"])
    sample.main(["--ckpt", str(ckpt), "--prompt", "x", "--out", str(tmp_path / "b.mp4"), *small,
                 "--preset", "cogvideox-5b", "--sampler", "ddim"])
    five = sample.PRESETS["cogvideox-5b"]
    assert seen[0].sampler == "dpm" == five.sampler and seen[0].steps == five.steps
    assert seen[0].snr_shift_scale == sample.PRESETS["tiny"].snr_shift_scale  # the checkpoint's
    assert seen[1].sampler == "ddim"  # a flag still wins


def test_read_only_out_folder(ckpt, tmp_path, monkeypatch, capsys):
    """A read-only disk, simulated by os.access (tests run as root, where chmod does not stop writes)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p).startswith(str(tmp_path)) else real(p, m))
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(ckpt), "--prompt", "x", "--out", str(tmp_path / "sub" / "o.mp4")])
    assert e.value.code == 2 and f"cannot create files in {tmp_path}" in capsys.readouterr().err


@pytest.mark.parametrize("part", ["dit/model.safetensors", "vae/model.safetensors", "text_encoder/model.safetensors",
                                  "dit/config.json"])
def test_truncated_model_file_is_one_line(ckpt, tmp_path, capsys, part):
    import shutil
    root = tmp_path / "ck"
    shutil.copytree(ckpt, root)
    f = root / part
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(root), "--prompt", "x", "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "Traceback" not in "".join(err) and part.split("/")[0] in err[-1], err


@pytest.mark.parametrize("part, edit, words", [
    ("dit/config.json", dict(heads="2"), "heads = '2' is not of type int"),  # --sp's check: a TypeError
    ("vae/config.json", dict(channels=8), "channels = 8 is not a list of whole numbers"),
    ("sample.json", dict(steps="3"), "steps = '3' is not of type int"),
    ("sample.json", dict(fps=None), "fps = None is not of type float"),
    ("sample.json", ["a list"], "sample.json holds a JSON list, not an object"),
    ("dit/config.json", 42, "config.json holds a JSON int, not an object"),
])
def test_config_of_a_wrong_type_is_one_line(ckpt, tmp_path, monkeypatch, capsys, part, edit, words):
    """A hand-edited or damaged config file (a value of another type, JSON that is no object): one
    line naming the file and the field, exit code 2, before any weights load (was a TypeError or
    AttributeError traceback)."""
    import shutil
    root = tmp_path / "ck"
    shutil.copytree(ckpt, root)
    f = root / part
    new = {**json.loads(f.read_text()), **edit} if isinstance(edit, dict) else edit
    f.write_text(json.dumps(new))
    monkeypatch.setattr(sample, "load_ckpt", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(root), "--prompt", "x", "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and str(f) in err[-1] and words in err[-1], err


@pytest.mark.parametrize("edit, words", [
    (dict(fps=0), "fps = 0 must be a frame rate > 0"),  # was refused by write_video, after sampling
    (dict(uncond="none"), "uncond = 'none' must be \"zeros\" or \"empty\""),  # after loading
    (dict(steps=0), "steps = 0 must be in [1, 1000]"),  # was named without the file
    (dict(cfg=float("nan")), "cfg = nan must be a number >= 1"),
    (dict(sampler="euler"), "sampler = 'euler' must be one of ('ddim', 'dpm')"),
    (dict(cfg_min_t=-5), "cfg_min_t = -5 must be in [0, 1000]"),
    (dict(snr_shift_scale=0), "snr_shift_scale = 0 must be a number > 0"),
])
def test_sample_json_bad_value_is_one_line_before_loading(ckpt, tmp_path, monkeypatch, capsys, edit,
                                                          words):
    """A hand-edited sample.json value the sampler cannot use: one line naming the file, the key and
    the fix, exit code 2, when the file is read (before any model loads)."""
    import shutil
    root = tmp_path / "ck"
    shutil.copytree(ckpt, root)
    f = root / "sample.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **edit}))
    monkeypatch.setattr(sample, "load_ckpt", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(root), "--prompt", "x", "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and f"{f}: {words}" in err[-1], err
    with pytest.raises(ValueError, match="fix it"):  # the library loader too
        sample.ckpt_sample_config(str(root))


def test_flags_and_sample_json_refuse_the_same_values(tmp_path):
    """--num-frames ... --cfg-min-t (check_args) and sample.json's keys (check_sample_json) read
    one table, sample.RULES: each refuses exactly the values the other does (steps differ by
    design: the flag's top bound is the DiT's own, check_sample's)."""
    import argparse

    def refused(check, *args):
        try:
            check(*args)
        except ValueError:
            return True
        return False

    flags = dict(num_frames=None, height=None, width=None, steps=None, batch_size=1, fps=None,
                 cfg=None, cfg_min_t=None, seed=0, device="cpu", out=str(tmp_path / "o.mp4"),
                 image=None, lora=None, lora_scale=1.0, lora_merge=False, sp=1,
                 ckpt=str(tmp_path), model_dir=None)
    probes = [-1, 0, 1e-9, 0.5, 1, 8, 29.97, 1000, 1001, float("nan"), float("inf")]
    for k in ("num_frames", "height", "width", "fps", "cfg", "cfg_min_t"):
        cli = [refused(sample.check_args, argparse.Namespace(**{**flags, k: v})) for v in probes]
        js = [refused(sample.check_sample_json, replace(sample.PRESETS["tiny"], **{k: v}), {k: v},
                      "sample.json") for v in probes]
        assert cli == js and any(cli) and not all(cli), (k, cli, js)


@pytest.mark.parametrize("part, text, words", [
    ("text_encoder/tokenizer.json", "", "(JSONDecodeError: "),  # was the bare "Expecting value: ..."
    ("text_encoder/config.json", None, "(StrictDataclassFieldValidationError: "),  # a traceback
])
def test_damaged_t5_file_is_one_line_naming_the_folder(ckpt, tmp_path, capsys, part, text, words):
    import shutil
    root = tmp_path / "ck"
    shutil.copytree(ckpt, root)
    f = root / part
    f.write_text(text if text is not None else json.dumps(dict(json.loads(f.read_text()), d_model="x")))
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(root), "--prompt", "x", "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "Traceback" not in "".join(err), err
    assert f"{root / 'text_encoder'}: cannot load the T5 text encoder {words}" in err[-1], err


def test_num_frames_suggestion(ckpt):
    net, ae, text, _ = sample.load_ckpt(str(ckpt))
    for n, hint in ((6, "e.g. 5 or 9"), (2, "e.g. 1 or 5")):
        with pytest.raises(ValueError, match=hint):
            sample.generate(net, ae, text, ["x"], SampleConfig(num_frames=n, height=16, width=16), progress=False)


def test_long_prompt_cut_with_a_warning(ckpt, capsys):
    """The text encoder keeps text_len tokens (8 here, 226 released): a longer prompt is cut, with a warning."""
    _, _, text, _ = sample.load_ckpt(str(ckpt))
    long = " ".join([PROMPTS[0]] * 400)  # 2800 words
    a, b = text.encode([long]), text.encode([PROMPTS[0] + " " + PROMPTS[1]])
    assert a.shape == (1, 8, 16) and torch.equal(a, b)  # only the first 8 tokens count
    assert "a 2800-word prompt is 2801 tokens; the text encoder keeps its first 8" in capsys.readouterr().err
    text.encode([PROMPTS[0]])
    assert "warning" not in capsys.readouterr().err


# ----- sequence parallel sampling: torchrun --nproc_per_node 2 sample.py --sp 2 -----

def sp_argv(src, folder):
    return [f"--{src}", str(folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
            "--batch-size", "2", "--seed", "5", "--steps", "3", "--num-frames", "9",
            "--height", "24", "--width", "24", "--cfg", "4"]


@pytest.fixture(scope="module")
def sp_two(ckpt, released, tmp_path_factory, torchrun):
    """ONE torchrun launch on 2 ranks (the launch costs more than the runs): sample.py --sp 2 from
    our checkpoint and from the released layout, into <root>/<src>; -> (root, {src: its stdout})."""
    root = tmp_path_factory.mktemp("sp_two")
    runs = {src: [*sp_argv(src, folder), "--out", str(root / src), "--sp", "2"]
            for src, folder in (("ckpt", ckpt), ("model-dir", released))}
    worker = os.path.join(os.path.dirname(__file__), "_sp_worker.py")
    p = torchrun(worker, "sample", "--", *[a for i, argv in enumerate(runs.values())
                                           for a in (["---"] if i else []) + argv])
    before, *parts = p.stdout.split("=== run ")
    assert len(parts) == 2 and "wrote " not in before, p.stdout[-2000:]
    return root, dict(zip(runs, parts))


@pytest.mark.parametrize("src", ["ckpt", "model-dir"])
def test_sequence_parallel_sampling_equals_one_process(src, ckpt, released, tmp_path, sp_two,
                                                       monkeypatch):
    """2 gloo ranks share every DiT row (35 tokens: 8 text + 3x3x3 video, padded to 36) through the whole
    sampler, with CFG (a batch of 2 prompts x [uncond; cond]): the decoded frames equal one process's within
    1e-4, and only rank 0 writes (the .mp4, the .png and the float copy the worker saves)."""
    _sp_worker.write(monkeypatch.setattr)  # data.write_video also saves the float video
    folder = ckpt if src == "ckpt" else released
    sample.main([*sp_argv(src, folder), "--out", str(tmp_path / "one")])
    root, out = sp_two  # the launch's run of the same arguments with --sp 2
    assert out[src].count("wrote ") == 2  # rank 0's lines only
    # the DiT ran split: 2 all-to-alls per block (1 layer) per DiT call (3 steps; DDIM: 1 call each)
    assert "ALL_TO_ALL 6" in out[src], out[src][-2000:]
    one, two = sorted((tmp_path / "one").iterdir()), sorted((root / src).iterdir())
    assert [f.name for f in one] == [f.name for f in two] and len(one) == 6  # 2 x (.mp4, .png, .rank0.pt)
    for a, b in zip(one, two):
        if a.suffix == ".pt":
            va, vb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            assert va.shape == (3, 9, 24, 24) and va.std() > 0.05
            assert (va - vb).abs().max() <= 1e-4, float((va - vb).abs().max())


def test_sequence_parallel_sampling_bad_settings_exit_2(ckpt, tmp_path, monkeypatch, capsys):
    """--sp without torchrun's processes, or heads that do not divide: one line, exit 2, nothing loaded."""
    monkeypatch.setattr(sample, "load_ckpt", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["--ckpt", str(ckpt), "--prompt", "x", "--out", str(tmp_path / "o.mp4")]
    for extra, env, words in ((["--sp", "2"], "1", "--sp 2 with 1 process(es)"),
                              ([], "2", "--sp 1 with 2 process(es)"),
                              (["--sp", "0"], "1", "--sp must be >= 1"),
                              (["--sp", "4"], "4", "the DiT's 2 attention heads do not divide by it")):
        monkeypatch.setenv("WORLD_SIZE", env)
        with pytest.raises(SystemExit) as e:
            sample.main(argv + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and words in err[-1], err


def test_corrupt_image_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """A corrupt or truncated --image was read only once the DiT, VAE and T5 had loaded (minutes
    for the 5B): now one line, exit 2, before any model loads, nothing written."""
    root = make_ckpt(tmp_path / "i2v", i2v=True)
    good = tmp_path / "good.png"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(good)
    (tmp_path / "torn.png").write_bytes(good.read_bytes()[:60])
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    monkeypatch.setattr(sample, "load_ckpt", lambda *a, **k: pytest.fail("a model was loaded"))
    for bad in ("torn.png", "junk.jpg"):
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", str(root), "--image", str(tmp_path / bad), "--prompt", "x",
                         "--out", str(tmp_path / "o.mp4")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and f"cannot read image {str(tmp_path / bad)!r}" in err[-1], err
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "o.png").exists()


def test_long_out_names(ckpt, tmp_path, monkeypatch, capsys):
    """A legal --out name of 250 bytes failed at the very end, its temp file's name (+ .tmpPID_x)
    being too long; a name over the 255-byte limit (itself, or the _000 suffix of several
    prompts) was refused only at that write, once every model had loaded and sampled."""
    fake = lambda net, ae, text, prompts, cfg, **kw: torch.zeros(  # noqa: E731
        len(prompts), 3, cfg.num_frames, cfg.height, cfg.width)
    monkeypatch.setattr(sample, "generate", fake)
    ok = tmp_path / ("é" * 123 + ".mp4")  # 250 bytes
    sample.main(["--ckpt", str(ckpt), "--prompt", "x", "--out", str(ok)])
    assert ok.is_file() and ok.with_suffix(".png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ok.name, ok.stem + ".png"])
    monkeypatch.setattr(sample, "load_ckpt", lambda *a, **k: pytest.fail("a model was loaded"))
    for out, n in ((tmp_path / ("a" * 252 + ".mp4"), 2), (tmp_path / ("a" * 300) / "o", 1)):
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", str(ckpt), *["--prompt", "x"] * n, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and "bytes, over the 255 a file system takes" in err[-1], err


def test_folder_names_hold_the_seed(ckpt, tmp_path, monkeypatch):
    """Into a folder, files were named by prompt alone: a second run with another --seed (a seed
    sweep) silently overwrote the first's videos. Each name holds its draw's seed (seed + i)."""
    monkeypatch.setattr(sample, "generate", lambda net, ae, text, prompts, cfg, **kw: torch.full(
        (len(prompts), 3, cfg.num_frames, cfg.height, cfg.width), kw["generator"][0].initial_seed()
        / 10 - 1))
    for seed in (1, 2):
        sample.main(["--ckpt", str(ckpt), "--prompt", "a red circle", "--prompt", "?!", "--out",
                     str(tmp_path / "o"), "--seed", str(seed)])
    names = sorted(p.name for p in (tmp_path / "o").glob("*.mp4"))
    assert names == ["000_a_red_circle_s1.mp4", "000_a_red_circle_s2.mp4", "001_s2.mp4",
                     "001_s3.mp4"]
    for name in names:  # each file holds its own seed's video
        seed = int(name[-5])
        assert abs(int(read_mp4(tmp_path / "o" / name)[0].mean()) - round(seed * 12.75)) <= 2


def test_image_of_another_shape_is_named(tmp_path, monkeypatch, capsys):
    """An --image of another aspect than the video (a portrait photo, a landscape clip) is
    resized to cover and centre-cropped, as training images: it said nothing of the part cut
    away; nor that an animated GIF gives its first frame alone. One note line each now."""
    root = make_ckpt(tmp_path / "i2v", i2v=True)
    monkeypatch.setattr(sample, "generate", lambda net, ae, text, prompts, cfg, **kw: torch.zeros(
        len(prompts), 3, cfg.num_frames, cfg.height, cfg.width))
    Image.fromarray(np.zeros((40, 20, 3), np.uint8)).save(tmp_path / "tall.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "square.png")
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (30, 220)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    notes = {}
    for name in ("tall.png", "square.png", "anim.gif"):
        sample.main(["--ckpt", str(root), "--image", str(tmp_path / name), "--prompt", "x",
                     "--out", str(tmp_path / f"o_{name[:-4]}.mp4")])
        notes[name] = [ln for ln in capsys.readouterr().out.splitlines() if "--image" in ln]
    assert notes["tall.png"] == [f"--image {tmp_path / 'tall.png'}: 20x40 (width x height) is "
                                 "resized to cover 16x16 and centre-cropped: 50% of it cut"]
    assert notes["square.png"] == []  # the same aspect: resized alone
    assert notes["anim.gif"] == [f"--image {tmp_path / 'anim.gif'}: its first frame (of 2)"]
