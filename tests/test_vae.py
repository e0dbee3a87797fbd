"""Tests for vae.py (paper §2.1): architecture and presets, causality, parity with diffusers'
AutoencoderKLCogVideoX on random weights (whole-sequence at T=1, 9; streaming at T=17, 33; sharded
and fp16 folders), context parallel == one process under torchrun, losses, checkpoints, metrics,
the reconstruct CLI.

  python -m pytest -q tests/test_vae.py        (add -m slow for the 3-rank context-parallel case)
"""
import copy
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import data
import vae
from vae import (VAE_PRESETS, CausalVAE, VAEConfig, cp_sizes, discriminator_loss, flicker,
                 generator_loss, psnr)

HERE = Path(__file__).resolve().parent
# A small config that still has every kind of layer of the released VAE: 4 levels (so a spatial-only
# Down/Up), width changes (1×1×1 shortcuts), two time levels.
DIFFUSERS_CFG = dict(block_out_channels=(8, 16, 16, 16), latent_channels=4, layers_per_block=1,
                     norm_num_groups=4, down_block_types=("CogVideoXDownBlock3D",) * 4,
                     up_block_types=("CogVideoXUpBlock3D",) * 4)


def _max(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A random diffusers AutoencoderKLCogVideoX and its save_pretrained folders (plain, sharded,
    fp16)."""
    from diffusers import AutoencoderKLCogVideoX
    torch.manual_seed(0)
    d = AutoencoderKLCogVideoX(**DIFFUSERS_CFG, scaling_factor=0.7).eval()
    root = tmp_path_factory.mktemp("diffusers_vae")
    d.save_pretrained(root / "plain")
    d.save_pretrained(root / "sharded", max_shard_size="50KB")
    copy.deepcopy(d).half().save_pretrained(root / "fp16", variant="fp16")  # .half() is in place
    return d, root


# ----- architecture -----

def test_presets_param_counts_and_shapes():
    for name in ("cogvideox-2b", "cogvideox-5b"):
        with torch.device("meta"):
            m = CausalVAE(VAE_PRESETS[name])
        assert sum(p.numel() for p in m.parameters()) == 215_583_907, name
    assert VAE_PRESETS["cogvideox-2b"].scaling_factor == 1.15258426
    assert VAE_PRESETS["cogvideox-5b"].scaling_factor == 0.7
    cfg = VAE_PRESETS["cogvideox-2b"]
    assert (cfg.spatial_factor, cfg.temporal_factor) == (8, 4)
    tiny = VAE_PRESETS["tiny"]
    assert (tiny.spatial_factor, tiny.temporal_factor) == (4, 4)
    m = CausalVAE(tiny).eval()
    assert sum(p.numel() for p in m.parameters()) == 652_995  # ~0.65M
    shapes = VAE_PRESETS["shapes"]  # the demo's: the tiny one with 4 latent channels
    assert replace(shapes, latent=8) == tiny
    assert sum(p.numel() for p in CausalVAE(shapes).parameters()) == 638_779
    with torch.no_grad():
        post = m.encode(torch.rand(1, 3, 9, 32, 32) * 2 - 1)
        assert post.mean.shape == post.logvar.shape == (1, 8, 3, 8, 8)
        assert m.decode(post.mean).shape == (1, 3, 9, 32, 32)
        # an image is a 1-frame video
        assert m.decode(post.mean[:, :, :1]).shape == (1, 3, 1, 32, 32)


def test_bad_inputs_are_clear_errors():
    m = CausalVAE(VAE_PRESETS["tiny"])
    with pytest.raises(ValueError, match="4k\\+1"):
        m.encode(torch.zeros(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        m.encode(torch.zeros(1, 3, 9, 30, 32))
    with pytest.raises(ValueError, match="expected"):
        m.decode(torch.zeros(1, 3, 3, 8, 8))
    with pytest.raises(ValueError, match="cannot be split"):
        cp_sizes(11, 2)  # (T-1) must divide by 4·world
    assert cp_sizes(17, 2) == [9, 8] and cp_sizes(5, 1, factor=1) == [5]
    # an image on 2 ranks was [1, 0]: rank 1 then failed inside conv3d, rank 0 on the lost peer
    assert cp_sizes(1, 1) == [1]
    for factor in (4, 1):
        with pytest.raises(ValueError, match="1 frame \\(an image\\) cannot be split over 2"):
            cp_sizes(1, 2, factor)
    with pytest.raises(ValueError, match="groups"):
        CausalVAE(VAEConfig(channels=(16, 24), groups=16))
    # tiles that leave no room (overlap >= tile) blended to 0/0 = NaN, or failed deep in conv3d
    x, z = torch.zeros(1, 3, 5, 32, 40), torch.zeros(1, 8, 2, 8, 10)
    for call, tile, overlap in ((m.encode, 16, 24), (m.decode, 4, 6), (m.decode, 4, 4),
                                (m.decode, -4, 0)):
        with pytest.raises(ValueError, match="need tile > 0 and 0 <= overlap < tile"):
            call(x if call == m.encode else z, tile=tile, overlap=overlap)


def test_stream_count_is_checked():
    """stream=n: a negative, fractional or string count is one ValueError (-1 decoded chunks of -1
    frames: one frame short; 2.5 and "2" ran as 2). False, None and 0 (data.EncodePlan's "whole
    clip") are the whole clip at once."""
    m = CausalVAE(VAE_PRESETS["tiny"]).eval()
    x, z = torch.rand(1, 3, 5, 8, 8) * 2 - 1, torch.randn(1, 8, 2, 2, 2)
    for bad in (-1, -3, 2.5, "2", 1.0):
        for call, v in ((m.encode, x), (m.decode, z)):
            with pytest.raises(ValueError, match=f"stream={bad!r}: pass True .* a whole number n"):
                call(v, stream=bad)
    with torch.no_grad():
        for off in (0, None):
            assert torch.equal(m.decode(z, stream=off), m.decode(z))
            assert torch.equal(m.encode(x, stream=off).mean, m.encode(x).mean)


# ----- causality -----

def test_causality_encoder_and_decoder():
    """Changing frames after the first 1+4k never changes latent frames 0..k; changing latent frames
    after k never changes pixel frames 0..4k. GroupNorm statistics span what is processed together,
    so this is tested per stream chunk (one latent frame per chunk; the encoder's first chunk holds
    latents 0 and 1, hence k >= 1 there)."""
    torch.manual_seed(0)
    m = CausalVAE(VAE_PRESETS["tiny"]).eval()
    x = torch.rand(1, 3, 17, 16, 16) * 2 - 1
    with torch.no_grad():
        z = m.encode(x, stream=1).mean  # (1, 8, 5, 4, 4)
        for k in (1, 2, 3):
            x2 = x.clone()
            x2[:, :, 1 + 4 * k:] = torch.rand_like(x2[:, :, 1 + 4 * k:])
            z2 = m.encode(x2, stream=1).mean
            assert torch.equal(z2[:, :, :k + 1], z[:, :, :k + 1]), k
            # the change does reach later latents
            assert not torch.allclose(z2[:, :, k + 1:], z[:, :, k + 1:])
        # the default (diffusers) chunking: frames after the first chunk (9 frames -> 3 latents)
        z_d = m.encode(x, stream=True).mean
        x2 = x.clone()
        x2[:, :, 9:] = 0
        assert torch.equal(m.encode(x2, stream=True).mean[:, :, :3], z_d[:, :, :3])
        y = m.decode(z, stream=1)  # (1, 3, 17, 16, 16)
        for k in (0, 1, 2, 3):
            z2 = z.clone()
            z2[:, :, k + 1:] = torch.randn_like(z2[:, :, k + 1:])
            y2 = m.decode(z2, stream=1)
            assert torch.equal(y2[:, :, :1 + 4 * k], y[:, :, :1 + 4 * k]), k
            assert not torch.allclose(y2[:, :, 1 + 4 * k:], y[:, :, 1 + 4 * k:])


# ----- parity with diffusers on random weights (float32: every output within 1e-4) -----

@pytest.mark.parametrize("folder", ["plain", "sharded", "fp16"])
def test_from_diffusers_whole_sequence_parity(ref, folder):
    """Whole-sequence mode equals diffusers when one chunk covers the clip: T = 1 and 9."""
    d, root = ref
    ours = CausalVAE.from_diffusers(root / folder).eval()
    assert ours.cfg.scaling_factor == 0.7 and ours.cfg.channels == (8, 16, 16, 16)
    if folder == "fp16":  # compare against the same fp16-rounded weights
        from diffusers import AutoencoderKLCogVideoX
        d = AutoencoderKLCogVideoX(**DIFFUSERS_CFG).eval()
        d.load_state_dict({k: v.half().float() for k, v in ref[0].state_dict().items()})
    torch.manual_seed(1)
    for T in (1, 9):
        x = torch.rand(2, 3, T, 32, 32) * 2 - 1
        with torch.no_grad():
            dist = d.encode(x).latent_dist
            post = ours.encode(x)
            assert _max(post.mean, dist.mean) <= 1e-4 and _max(post.logvar, dist.logvar) <= 1e-4
            assert _max(ours.decode(dist.mean), d.decode(dist.mean).sample) <= 1e-4


def test_15_vae_config_and_image_latent_match_the_i2v_pipeline(tmp_path):
    """CogVideoX 1.5's VAE: the 1.0 weights with scaling_factor 0.7 and invert_scale_latents, which
    makes the I2V image latent z / 0.7 (not z * 0.7). From a folder of that config our image latent
    equals CogVideoXImageToVideoPipeline.prepare_latents' (same generator); a 1.0 folder multiplies."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler,
                           CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel)
    with torch.device("meta"):
        assert sum(p.numel() for p in CausalVAE(VAE_PRESETS["cogvideox1.5-5b"]).parameters()) == \
            215_583_907
    assert VAE_PRESETS["cogvideox1.5-5b"].image_scale == 1 / 0.7
    assert VAE_PRESETS["cogvideox-5b"].image_scale == 0.7
    tr = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=8,
                                     out_channels=4, time_embed_dim=16, ofs_embed_dim=16,
                                     text_embed_dim=16, num_layers=1, patch_size_t=2,
                                     use_rotary_positional_embeddings=True)
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    for invert in (True, False):
        torch.manual_seed(0)
        d = AutoencoderKLCogVideoX(**DIFFUSERS_CFG, scaling_factor=0.7,
                                   invert_scale_latents=invert).eval()
        d.save_pretrained(tmp_path / f"vae{invert}")
        ours = CausalVAE.from_diffusers(tmp_path / f"vae{invert}").eval()
        assert ours.cfg.invert_scale_latents == invert
        pipe = CogVideoXImageToVideoPipeline(None, None, d, tr, CogVideoXDDIMScheduler())
        with torch.no_grad():  # 5 frames: 2 latent frames, a whole temporal patch
            _, ref_img = pipe.prepare_latents(image, 2, 4, 5, 32, 32, torch.float32, "cpu",
                                              torch.Generator().manual_seed(7))
            gen = torch.Generator().manual_seed(7)
            posts = [ours.encode(image[i:i + 1, :, None]) for i in range(2)]  # one at a time
            z = torch.cat([p.sample(eps=torch.randn(p.mean.shape, generator=gen)) for p in posts])
        mine = z * ours.cfg.image_scale  # (B, C, 1, h, w)
        assert _max(mine[:, :, 0], ref_img[:, 0]) <= 1e-5 and (ref_img[:, 1:] == 0).all()
    back = CausalVAE(VAE_PRESETS["tiny"])
    back.cfg = replace(back.cfg, invert_scale_latents=True)
    back.save(tmp_path / "ours")
    assert CausalVAE.load(tmp_path / "ours").cfg.invert_scale_latents


def test_streaming_matches_diffusers_chunking(ref):
    """stream=True copies diffusers' chunks (encoder 8 frames, first 8 + T mod 8; decoder 2 latent
    frames, first 2 + T' mod 2; GroupNorm per chunk; causal-conv cache across chunks)."""
    d, root = ref
    ours = CausalVAE.from_diffusers(root / "plain").eval()
    torch.manual_seed(2)
    for T in (17, 33):
        x = torch.rand(1, 3, T, 16, 16) * 2 - 1
        with torch.no_grad():
            mean = d.encode(x).latent_dist.mean
            z = ours.encode(x, stream=True).mean
            assert z.shape == (1, 4, (T - 1) // 4 + 1, 2, 2)
            assert _max(z, mean) <= 1e-4
            y_ref = d.decode(mean).sample
            y = ours.decode(mean, stream=True)
            assert y.shape == y_ref.shape == (1, 3, T, 16, 16)
            assert _max(y, y_ref) <= 1e-4
            # the whole-sequence mode differs here (statistics over the whole clip), as documented
            assert _max(ours.decode(mean), y_ref) > 1e-3


def test_from_diffusers_key_errors(ref, tmp_path):
    from safetensors.torch import load_file, save_file
    _, root = ref
    sd = load_file(root / "plain" / "diffusion_pytorch_model.safetensors")
    sd.pop("decoder.up_blocks.0.resnets.1.norm2.conv_y.conv.weight")
    sd["encoder.extra.weight"] = torch.zeros(1)
    (tmp_path / "bad").mkdir()
    save_file(sd, tmp_path / "bad" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "bad" / "config.json").write_text((root / "plain" / "config.json").read_text())
    with pytest.raises(ValueError) as e:
        CausalVAE.from_diffusers(tmp_path / "bad")
    assert "decoder.up.0.blocks.1.norm2.conv_y.weight" in str(e.value)
    assert "encoder.extra.weight" in str(e.value)
    with pytest.raises(FileNotFoundError):
        CausalVAE.from_diffusers(tmp_path / "bad", variant="bf16")


def test_from_diffusers_wrong_or_missing_folder(ref, tmp_path):
    """A transformer folder, our own checkpoint or a missing folder: a clear error naming the fix."""
    (tmp_path / "transformer").mkdir()
    config = json.dumps({"_class_name": "CogVideoXTransformer3DModel"})
    (tmp_path / "transformer" / "config.json").write_text(config)
    with pytest.raises(ValueError,
                       match="CogVideoXTransformer3DModel.*not 'AutoencoderKLCogVideoX'.*vae/"):
        CausalVAE.from_diffusers(tmp_path / "transformer")
    CausalVAE(VAE_PRESETS["tiny"]).save(tmp_path / "ours")
    with pytest.raises(ValueError, match="CausalVAE.load"):
        CausalVAE.from_diffusers(tmp_path / "ours")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CausalVAE.from_diffusers(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CausalVAE.load(tmp_path / "empty")
    with pytest.raises(ValueError, match="from_diffusers"):
        CausalVAE.load(ref[1] / "plain")



def test_diffusers_invert_scale_latents_of_a_wrong_type_is_one_line():
    """invert_scale_latents (CogVideoX 1.5: the I2V image latent divided by the scaling factor) as
    a string is named like every other config value of the wrong type; bool() took "false" as
    true, silently inverting the image latent's scale. null is diffusers' default, false."""
    for v in ("false", "true", 1):
        with pytest.raises(ValueError, match=f"invert_scale_latents = {v!r} is not of type bool"):
            vae.diffusers_config({"invert_scale_latents": v}, "vae/config.json")
    assert not vae.diffusers_config({"invert_scale_latents": None}).invert_scale_latents
    assert vae.diffusers_config({"invert_scale_latents": True}).invert_scale_latents


def test_diffusers_temporal_compression_ratio_may_be_a_whole_float():
    """diffusers types the VAE's temporal_compression_ratio float: a config.json saying 4.0 is
    ratio 4 (was refused as 'not a power of 2'); a fraction or a non-power of 2 still is."""
    for v, levels in ((4.0, 2), (8.0, 3), (4, 2)):
        assert vae.diffusers_config({"temporal_compression_ratio": v}).time_levels == levels
    for v in (2.5, 3.0, 3, 0, "4", True):
        with pytest.raises(ValueError, match=f"^vae/config.json: temporal_compression_ratio = "
                                             f"{v!r} is not a power of 2$"):
            vae.diffusers_config({"temporal_compression_ratio": v}, "vae/config.json")


def test_damaged_shard_index_is_one_line_naming_it(ref, tmp_path, capsys):
    """A sharded folder whose index json is torn, is no object, holds no weight_map of file names,
    or lists a shard that is missing: one error naming the index and the fix, and vae.py --ckpt
    exits 2 on it (were a bare 'Expecting ...' line, KeyError / TypeError / AttributeError
    tracebacks, and a missing shard named without its index)."""
    import shutil
    src = ref[1] / "sharded"
    name = "diffusion_pytorch_model.safetensors.index.json"
    good = (src / name).read_text()
    shard = sorted(set(json.loads(good)["weight_map"].values()))[-1]
    clip = tmp_path / "clip.mp4"
    data.write_video(torch.zeros(3, 5, 16, 16), str(clip), fps=8)
    for i, (text, words) in enumerate((
            (good[:len(good) // 2], "is not valid JSON"),
            ("[]", "holds a JSON list"),
            (json.dumps({"metadata": {}}), "no weight_map"),
            (json.dumps({"weight_map": [shard]}), "no weight_map"),
            (good, f"lists {shard}, which is missing"))):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(src, bad)
        (bad / name).write_text(text)
        if i == 4:
            (bad / shard).unlink()
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            CausalVAE.from_diffusers(bad)
        assert str(bad / name) in str(e.value) and words in str(e.value), e.value
        assert "again" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(SystemExit) as e:
            vae.main(["--reconstruct", str(clip), "--ckpt", str(bad), "--device", "cpu",
                      "--out", str(tmp_path / "o.mp4")])
        assert e.value.code == 2
        _one_line_error(capsys.readouterr().err, words)


# ----- context parallel (torchrun, 2 ranks, gloo) -----

def test_context_parallel_equals_one_process(torchrun):
    """Outputs (also sampled by forward from a seeded generator), latents, input gradient and
    parameter gradients of a 2-rank CP run equal the single-process whole-sequence run within
    1e-5 (the worker asserts and exits 1 otherwise)."""
    p = torchrun(HERE / "_vae_cp_worker.py", 9, 32, 2, "check", nproc=2)
    assert p.stdout.count("max abs diff") == 2 and "MISMATCH" not in p.stdout


@pytest.mark.slow
def test_context_parallel_three_ranks(torchrun):
    """3 ranks at T=13: ranks 1 and 2 hold one latent frame each, so rank 2's halo spans two ranks."""
    p = torchrun(HERE / "_vae_cp_worker.py", 13, 32, 1, "check", nproc=3)
    assert p.stdout.count("max abs diff") == 3


# ----- the CPU fast path (speed only) -----

@pytest.mark.parametrize("shape", [(1, 8, 3, 8, 8), (1, 32, 20, 32, 8), (1, 32, 20, 33, 8),
                                   (2, 8, 3, 8, 8), (2, 16, 11, 24, 24)])
def test_onednn_path_is_where_pytorch_goes_generic_and_equals_the_plain_conv(shape):
    """vae._onednn_fits says "PyTorch takes its slow generic kernel here" exactly where conv3d
    does (profiled: one clip of C*T*H <= 20480; a batch of 2 goes to oneDNN by itself), and
    the oneDNN function (_OneDNNConv3d) gives the plain conv's output and gradients."""
    from torch.profiler import profile
    torch.manual_seed(0)
    conv, x = vae.CausalConv3d(shape[1], 4), torch.randn(shape)
    with profile() as prof:
        torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=conv.padding)
    generic = any("slow_conv3d" in e.key for e in prof.key_averages())
    assert vae._onednn_fits(x) == generic
    got = [x.clone().requires_grad_(), conv.weight, conv.bias]
    y = vae._onednn_conv3d(conv, got[0])
    g = torch.randn_like(y)
    y.backward(g)
    ref = [t.detach().double().requires_grad_() for t in got]
    want = torch.nn.functional.conv3d(*ref, padding=conv.padding)
    want.backward(g.double())
    # float32 against float64, relative to each tensor's largest value (a weight gradient sums
    # B*T*H*W products)
    close = lambda a, b: float((a.detach().double() - b.detach()).abs().max()) <= 1e-5 * float(
        b.detach().abs().max())
    assert close(y, want) and all(close(a.grad, b.grad) for a, b in zip(got, ref))


# ----- tiling -----

def test_tiling_blends_exactly():
    x = torch.randn(1, 2, 3, 20, 28)
    # blend weights sum to 1
    assert torch.allclose(vae._tiled(lambda v: v, x, 8, 4, 1), x, atol=1e-6)
    up = lambda v: v.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.allclose(vae._tiled(up, x, 8, 2, 2), up(x), atol=1e-6)
    m = CausalVAE(VAE_PRESETS["tiny"]).eval()
    x = torch.rand(1, 3, 5, 32, 40) * 2 - 1
    with torch.no_grad():
        z = m.encode(x).mean
        assert torch.equal(m.encode(x, tile=64).mean, z)  # one tile covers everything
        assert m.encode(x, tile=24, overlap=8).mean.shape == z.shape
        y = m.decode(z, tile=6, overlap=2)
        assert y.shape == x.shape and torch.isfinite(y).all()


# ----- losses -----

def _lpips_files(tmp_path):
    """A VGG16 file in torchvision naming (.pth, with a classifier key the loader must ignore) and
    an LPIPS linear-layer file (.safetensors) — random values: this tests loading, not LPIPS."""
    from safetensors.torch import save_file
    sd = {k: torch.randn_like(v) * 0.05 for k, v in vae.LPIPS().state_dict().items()}
    vgg = {k: v for k, v in sd.items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(vgg, tmp_path / "vgg16.pth")
    save_file({k: v.abs() for k, v in sd.items() if k.startswith("lin")}, tmp_path / "lin.safetensors")
    return f"{tmp_path / 'vgg16.pth'},{tmp_path / 'lin.safetensors'}", sd


def test_lpips_loading(tmp_path, capsys):
    assert vae.load_lpips(None) is None
    assert "disabled" in capsys.readouterr().out
    paths, sd = _lpips_files(tmp_path)
    net = vae.load_lpips(paths)
    assert torch.equal(net.features[28].weight, sd["features.28.weight"])
    assert not any(p.requires_grad for p in net.parameters())
    # the lpips package's full state dict names the backbone net.sliceK.N
    # slice1 = features 0..3, slice2 = 4..8, ...
    slice_of = lambda n: 1 + sum(n > t for t in net.TAPS)
    rename = lambda k: f"net.slice{slice_of(int(k.split('.')[1]))}." + k.split(".", 1)[1]
    full = {rename(k) if k.startswith("features.") else k: v for k, v in sd.items()}
    torch.save(full, tmp_path / "lpips_full.pth")
    full_net = vae.load_lpips(str(tmp_path / "lpips_full.pth"))
    assert torch.equal(full_net.features[0].weight, sd["features.0.weight"])
    with pytest.raises(ValueError, match="missing"):
        vae.load_lpips(str(tmp_path / "lin.safetensors"))


def test_losses_finite_with_grads_and_gan_start(tmp_path):
    torch.manual_seed(0)
    m = CausalVAE(VAE_PRESETS["tiny"])
    disc = vae.Discriminator3D(ch=8)
    lp = vae.load_lpips(_lpips_files(tmp_path)[0])
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    last = m.decoder.conv_out.weight
    kw = dict(lpips=lp, disc=disc, disc_start=100, last_layer=last, recon="l2")
    for step in (0, 100):
        x_rec, post = m(x)
        loss, parts = generator_loss(x, x_rec, post, step, **kw)
        assert set(parts) >= {"loss", "recon", "perceptual", "kl", "gan", "gan_weight"}
        assert all(torch.isfinite(v) for v in parts.values())
        terms = ["recon", "perceptual", "kl"] + (["gan"] if step >= 100 else [])
        for k in terms:  # every active term reaches the VAE's parameters
            g = torch.autograd.grad(parts[k], list(m.parameters()), retain_graph=True,
                                    allow_unused=True)
            assert any(gi is not None and gi.abs().sum() > 0 for gi in g), k
        if step < 100:
            assert parts["gan"] == 0 and parts["gan_weight"] == 0
        else:
            assert parts["gan_weight"] > 0 and parts["gan"] != 0
        d_loss, d_parts = discriminator_loss(disc, x, x_rec, step, disc_start=100)
        assert torch.isfinite(d_loss) and all(torch.isfinite(v) for v in d_parts.values())
        # a graph-connected zero before the start step, so train.py needn't special-case it
        d_loss.backward()
        gd = [p.grad.abs().sum() for p in disc.parameters() if p.grad is not None]
        assert (sum(gd) > 0) == (step >= 100)
        disc.zero_grad()
    l1, _ = generator_loss(x, x, post, 0)  # perfect reconstruction: only the KL remains
    assert l1.item() == pytest.approx(1e-6 * post.kl().sum().item() / x.numel(), rel=1e-5)
    # the default reconstruction term is L2 (§2.1): a constant error of 0.1 costs 0.01, not 0.1
    recon = lambda **kw: generator_loss(x, x + 0.1, post, **kw)[1]["recon"].item()
    assert recon() == pytest.approx(0.01, rel=1e-4) and recon(recon="l1") == pytest.approx(0.1, rel=1e-4)
    with pytest.raises(ValueError, match="l1"):
        generator_loss(x, x, post, recon="huber")


def test_discriminator_and_lpips_min_size():
    """The smallest frames the GAN's discriminator and LPIPS take (train.py refuses smaller stages
    up front): one pixel fewer fails inside a convolution / max-pool."""
    n = vae.Discriminator3D.min_size()
    assert n == 16
    d = vae.Discriminator3D(ch=8)
    assert d(torch.zeros(1, 3, 1, n, 40)).shape[-2] == 1
    with pytest.raises(RuntimeError):
        d(torch.zeros(1, 3, 1, n - 1, 40))
    lp, m = vae.LPIPS(), vae.LPIPS.MIN_SIZE
    assert lp(torch.zeros(1, 3, m, m), torch.zeros(1, 3, m, m)).shape == (1,)
    with pytest.raises(RuntimeError):
        lp(torch.zeros(1, 3, m - 1, m), torch.zeros(1, 3, m - 1, m))


def test_gaussian(monkeypatch):
    mean, logvar = torch.zeros(2, 4, 3, 2, 2), torch.zeros(2, 4, 3, 2, 2)
    g = vae.Gaussian(mean, logvar)
    assert torch.equal(g.kl(), torch.zeros(2))
    a = g.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a, g.sample(torch.Generator().manual_seed(0))) and a.std() > 0.5
    assert (vae.Gaussian(mean + 1, logvar - 1).kl() > 0).all()
    # given noise (train.py draws its own): mean + exp(logvar / 2)·eps, eps moved to the mean's
    # device and dtype
    g = vae.Gaussian(torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2))
    eps = torch.randn(2, 4, 3, 2, 2, dtype=torch.float64)
    z = g.sample(eps=eps)
    assert z.dtype == torch.float32
    assert torch.equal(z, g.mean + torch.exp(0.5 * g.logvar) * eps.float())
    # the VAE's forward samples the same way: decode(mean + std·eps)
    m = CausalVAE(VAE_PRESETS["tiny"]).eval()
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        post = m.encode(x)
        eps = torch.randn_like(post.mean)
        y, _ = m(x, eps=eps)
        assert torch.equal(y, m.decode(post.mean + torch.exp(0.5 * post.logvar) * eps))
    # the noise is drawn on the generator's device, then moved to the mean's (a CPU generator with
    # a CUDA mean; here a "meta" mean stands in for the other device on a CPU-only machine)
    drawn, randn = [], torch.randn
    monkeypatch.setattr(torch, "randn",
                        lambda *a, **k: drawn.append(k.get("device")) or randn(*a, **k))
    out = vae.Gaussian(mean.to("meta"), logvar.to("meta")).sample(torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and [torch.device(d).type for d in drawn] == ["cpu"]
    out = vae.Gaussian(mean.to("meta"), logvar.to("meta")).sample(eps=torch.randn(2, 4, 3, 2, 2))
    assert out.device.type == "meta"


# ----- checkpoints, metrics, CLI -----

def test_save_load_roundtrip(tmp_path):
    cfg = VAEConfig(channels=(8, 16), layers=1, latent=4, groups=4, time_levels=1, scaling_factor=0.5)
    m = CausalVAE(cfg).eval()
    m.save(tmp_path / "ck")
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors"]
    m2 = CausalVAE.load(tmp_path / "ck")
    assert m2.cfg == cfg
    x = torch.rand(1, 3, 5, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(m.encode(x).mean, m2.encode(x).mean)
    # a given state dict (e.g. a gathered FSDP or EMA state) is written instead of the model's own
    other = {k: torch.randn_like(v) for k, v in m.state_dict().items()}
    m.save(tmp_path / "ema", state_dict=other)
    back = CausalVAE.load(tmp_path / "ema").state_dict()
    assert all(torch.equal(back[k], v) for k, v in other.items())
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**config, "latent": 5}))
    with pytest.raises(ValueError, match="missing .*unexpected .*wrong shape"):
        CausalVAE.load(tmp_path / "ck")


def test_save_is_atomic_and_writes_config_first(tmp_path, monkeypatch):
    """save() writes through data.atomic_write, config.json first; a crash while writing the config
    leaves no temp file and the old pair intact: new weights never sit under the old config."""
    old = CausalVAE(VAEConfig(channels=(8, 16), layers=1, latent=4, groups=4, time_levels=1,
                              scaling_factor=0.5))
    old.save(tmp_path / "ck")
    new = CausalVAE(replace(old.cfg, scaling_factor=0.9))
    torch.nn.init.zeros_(new.encoder.conv_in.weight)
    calls, real = [], data.atomic_write

    def crash_at_config(path, write):
        calls.append(os.path.basename(path))

        def broken(tmp):
            write(tmp)  # half of the job done: the temp file exists
            raise OSError("crash while writing the config")
        return real(path, broken if path.endswith("config.json") else write)
    monkeypatch.setattr(data, "atomic_write", crash_at_config)
    with pytest.raises(OSError, match="crash"):
        new.save(tmp_path / "ck")
    assert calls == ["config.json"]  # the weights were not touched
    back = CausalVAE.load(tmp_path / "ck")
    assert back.cfg.scaling_factor == 0.5
    assert torch.equal(back.encoder.conv_in.weight, old.encoder.conv_in.weight)
    # no temp file left behind
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors"]
    monkeypatch.setattr(data, "atomic_write", lambda path, write: calls.append(
        os.path.basename(path)) or real(path, write))
    new.save(tmp_path / "ck")
    assert calls[1:] == ["config.json", "model.safetensors"]
    assert CausalVAE.load(tmp_path / "ck").cfg.scaling_factor == 0.9


def test_psnr_and_flicker():
    x = torch.rand(1, 3, 5, 8, 8) * 1.6 - 0.8
    assert psnr(x, x + 0.1) == pytest.approx(10 * torch.log10(torch.tensor(400.0)).item(), abs=1e-3)
    # a constant offset does not flicker
    assert flicker(x, x) == 0 and flicker(x, x + 0.1) == pytest.approx(0, abs=1e-4)
    y = x.clone()
    y[:, :, 1::2] += 0.2  # every other frame brighter: flicker
    assert flicker(x, y) > 5


def test_cli_reconstruct(tmp_path):
    torch.manual_seed(0)
    clip = tmp_path / "clip.mp4"
    data.write_video(torch.rand(3, 10, 32, 40) * 2 - 1, str(clip), fps=8)
    CausalVAE(VAE_PRESETS["tiny"]).save(tmp_path / "ck")
    p = subprocess.run([sys.executable, str(HERE.parent / "vae.py"), "--reconstruct", str(clip),
                        "--ckpt", str(tmp_path / "ck"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "psnr" in p.stdout and "flicker" in p.stdout
    out = tmp_path / "clip.recon.mp4"
    v = data.load_video(str(out), 101)  # every frame it has, native size
    assert v.shape == (3, 9, 32, 40)  # 10 frames trimmed to 4k+1




@pytest.mark.parametrize("groups", [0, -4])
def test_cli_config_with_groups_below_one_is_one_line(tmp_path, capsys, groups):
    """A config.json whose GroupNorm groups (ours: groups, diffusers': norm_num_groups) is 0 or
    negative is one line, exit code 2, like every other bad VAEConfig: 0 was a ZeroDivisionError
    traceback in CausalVAE's own 'groups dividing every width' check, and a negative count passed
    it (-4 divides every width) to fail later inside torch."""
    clip = tmp_path / "clip.mp4"
    data.write_video(torch.zeros(3, 5, 16, 16), str(clip), fps=8)
    CausalVAE(VAE_PRESETS["tiny"]).save(tmp_path / "ck")
    good = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**good, "groups": groups}))
    with pytest.raises(SystemExit) as e:
        vae.main(["--reconstruct", str(clip), "--ckpt", str(tmp_path / "ck"), "--device", "cpu"])
    assert e.value.code == 2
    _one_line_error(capsys.readouterr().err, "(>= 1) dividing every width")


def test_cli_trims_to_the_checkpoints_temporal_factor(tmp_path):
    """A VAE that compresses time 8x (time_levels 3; a diffusers temporal_compression_ratio of 8)
    reconstructs a 13-frame clip as its first 9 frames (8k+1). The CLI trimmed to 4k+1 whatever
    the VAE, and encode's 'needs T = 8k+1' ended in a traceback."""
    torch.manual_seed(0)
    clip = tmp_path / "clip.mp4"
    data.write_video(torch.rand(3, 13, 16, 16) * 2 - 1, str(clip), fps=8)
    cfg = replace(VAE_PRESETS["tiny"], channels=(8, 8, 8, 8), groups=4, time_levels=3)
    CausalVAE(cfg).save(tmp_path / "ck")
    vae.main(["--reconstruct", str(clip), "--ckpt", str(tmp_path / "ck"), "--device", "cpu"])
    assert data.load_video(str(tmp_path / "clip.recon.mp4"), 101).shape == (3, 9, 16, 16)


def _write_rotated(path, H=32, W=48, T=5):
    """A landscape clip with a red block top-left, stored with a 90° display rotation (a phone
    clip)."""
    import av
    import numpy as np
    img = np.zeros((H, W, 3), np.uint8)
    img[:8, :8] = (255, 0, 0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.set_display_rotation(90)  # PyAV 18 ignores metadata["rotate"]: set the display matrix
        for _ in range(T):
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())


def test_cli_reads_upright_at_native_size(tmp_path):
    """The CLI reads through data.load_video at native size: a phone clip comes out portrait, and
    the reconstruction keeps that shape and the clip's fps."""
    _write_rotated(tmp_path / "rot.mp4")
    v = data.load_video(str(tmp_path / "rot.mp4"), 101)
    assert v.shape == (3, 5, 48, 32) and data.probe(str(tmp_path / "rot.mp4"))["fps"] == 8
    red = (v[0] > 0.5) & (v[1] < -0.5)  # (T, H, W)
    # 90° counterclockwise: top-left -> bottom-left
    assert red[:, -8:, :8].all() and not red[:, :8, :].any()
    vae.main(["--reconstruct", str(tmp_path / "rot.mp4"), "--device", "cpu"])
    out = str(tmp_path / "rot.recon.mp4")
    assert data.load_video(out, 101).shape == (3, 5, 48, 32) and data.probe(out)["fps"] == 8


def test_cli_out_fps_and_crop(tmp_path, capsys):
    """--out; the clip's fps kept exact (12.5 stays 12.5); a size that is no multiple of the spatial factor is
    cropped with a note saying so; an --out that cannot be written fails before the work (issue 20)."""
    clip = tmp_path / "clip.mp4"
    data.write_video(torch.rand(3, 5, 30, 42) * 2 - 1, str(clip), fps=12.5)
    vae.main(["--reconstruct", str(clip), "--out", str(tmp_path / "r" / "out.mkv"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "30x42 cropped to 28x40" in out and "12.5 fps" in out
    assert data.probe(str(tmp_path / "r" / "out.mkv"))["fps"] == 12.5
    assert data.load_video(str(tmp_path / "r" / "out.mkv"), 101).shape == (3, 5, 28, 40)
    (tmp_path / "adir.mp4").mkdir()
    for o, text in ((tmp_path / "adir.mp4", "adir.mp4 is a folder"), ("/proc/nope/o.mp4", "cannot create files"),
                    (tmp_path / "o.avi", "write a .mp4 or .mkv path")):
        with pytest.raises(SystemExit) as e:
            vae.main(["--reconstruct", str(clip), "--out", str(o), "--device", "cpu"])
        assert e.value.code == 2
        _one_line_error(capsys.readouterr().err, text)


def _one_line_error(err, text):
    """argparse's error: the usage, then one `prog: error: ...` line naming the problem; no
    traceback."""
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and ": error: " in last and text in last, err


def test_cli_bad_input_one_line_errors(tmp_path, capsys):
    p = subprocess.run([sys.executable, str(HERE.parent / "vae.py"), "--reconstruct",
                        "/nonexistent.mp4", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    _one_line_error(p.stderr, "/nonexistent.mp4: no such file")
    clip = tmp_path / "clip.mp4"
    data.write_video(torch.zeros(3, 5, 16, 16), str(clip), fps=8)
    before = clip.read_bytes()
    (tmp_path / "notes.mp4").write_text("not a video\n" * 20)
    cases = [(["--reconstruct", str(tmp_path / "notes.mp4")], "notes.mp4: cannot decode"),
             (["--reconstruct", str(tmp_path / "gone.mp4")], "gone.mp4: no such file"),
             (["--reconstruct", str(tmp_path)], f"{tmp_path}: a folder; pass one video file"),
             (["--reconstruct", str(clip), "--ckpt", str(tmp_path), "--preset", "cogvideox-2b"],
              "--preset picks a random-weight model; --ckpt has its own: drop one"),  # was ignored
             (["--reconstruct", str(clip), "--ckpt", str(tmp_path / "no_ckpt")],
              "no_ckpt does not exist"),
             (["--reconstruct", str(clip), "--tile", "6"], "multiple of the spatial factor 4"),
             (["--reconstruct", str(clip), "--frames", "0"], "--frames"),
             (["--reconstruct", str(clip), "--out", str(clip)], "would overwrite the --reconstruct")]
    # a hand-edited or damaged config.json: a TypeError / ZeroDivisionError traceback before
    ck = tmp_path / "ck"
    CausalVAE(VAE_PRESETS["tiny"]).save(ck)
    good = json.loads((ck / "config.json").read_text())
    for edit, text in (({"channels": 8}, "channels = 8 is not a list of whole numbers"),
                       ({"latent": "four"}, "latent = 'four' is not of type int"),
                       ({"channels": [16, "32", 32]}, "is not a list of whole numbers"),
                       (42, "config.json holds a JSON int, not an object of settings")):
        bad = tmp_path / f"bad{len(cases)}"
        bad.mkdir()
        (bad / "model.safetensors").symlink_to(ck / "model.safetensors")
        (bad / "config.json").write_text(json.dumps({**good, **edit} if isinstance(edit, dict)
                                                    else edit))
        cases.append((["--reconstruct", str(clip), "--ckpt", str(bad)], text))
    for argv, text in cases:
        with pytest.raises(SystemExit) as e:
            vae.main(argv + ["--device", "cpu"])
        assert e.value.code == 2, argv
        _one_line_error(capsys.readouterr().err, text)
    assert clip.read_bytes() == before  # the input kept
