"""train.py: DiT / VAE steps in one process and under torchrun, DDP == one process, context-parallel VAE,
FSDP, resume == uninterrupted, overfitting, NaN handling, bad files, bad settings (exit code 2), the demo.

Everything runs on CPU with the tiny presets at 16x16 pixels; run: python -m pytest -q tests/test_train.py"""
import argparse
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import weakref
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import PIL.Image
import torch
from safetensors.torch import load_file

import data
import dit
import sample
import train
import vae
from _train_runs_worker import launch_args, split_runs
from test_sample import PROMPTS, released  # noqa: F401  (a fixture: the released layout)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A small shapes set (clips + stills), a random tiny VAE, a tiny T5, and a shared latent cache."""
    root = tmp_path_factory.mktemp("train")
    manifest = data.make_shapes(str(root / "data"), 8, seed=0, frames=(9,), image_every=4)
    clips = data.make_shapes(str(root / "clips"), 4, seed=1, frames=(9,), image_every=100)  # no stills (CP)
    torch.manual_seed(0)
    ae = vae.CausalVAE(vae.VAE_PRESETS["tiny"])
    with torch.no_grad():  # like a trained VAE: a sharp posterior (random weights give logvar ~ 0, z ~ noise)
        ae.encoder.conv_out.bias[ae.cfg.latent:] = -12.0
    ae.save(str(root / "vae"))
    caps = [e["caption"] for e in data.read_manifest(manifest)] + [p for p, _ in data.eval_prompts()]
    dit.build_tiny_t5(str(root / "t5"), caps, d_model=dit.DIT_PRESETS["tiny"].text_dim)
    return {"root": root, "manifest": manifest, "clips": clips, "vae": str(root / "vae"), "t5": str(root / "t5"),
            "cache": str(root / "cache")}


SMALL = ["--size", "16x16", "--frames", "1,5,9"]  # every stage at 16 px: a few tokens per sample


def dit_args(a, out, *extra):
    return ["--stage", "dit", "--preset", "tiny", "--data", a["manifest"], "--vae", a["vae"], "--text-encoder", a["t5"],
            "--cache", a["cache"], "--out", str(out), *extra]


def vae_args(manifest, out, *extra):
    return ["--stage", "vae", "--preset", "tiny", "--data", manifest, "--out", str(out), *extra]


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def ckpt_tensors(folder, sub="model", prefix="dit."):
    """A checkpoint's full tensors, read in one process (the shards of any number of ranks put together)."""
    return {k[len(prefix):]: v for k, v in train.read_checkpoint(str(folder), sub).items() if k.startswith(prefix)}


def flip(path, n=200):
    """Invert n bytes in the middle of a file (inside the tensor data, past the safetensors header)."""
    b = bytearray(open(path, "rb").read())
    mid = len(b) // 2
    b[mid:mid + n] = bytes(x ^ 0xFF for x in b[mid:mid + n])
    open(path, "wb").write(bytes(b))


def shard(folder, sub="model"):
    return os.path.join(folder, sub, sorted(os.listdir(os.path.join(folder, sub)))[0])


# ----- one process -----

def test_dit_two_progressive_stages_one_process(assets, tmp_path, capsys):
    """Default tiny schedule: stage 0 at 16 px, stage 1 at 32 px (RoPE extrapolates), Frame Pack, logs, export."""
    res = train.main(dit_args(assets, tmp_path, "--steps", "2,2"))
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert len(lines) == 4 and all(" | loss " in ln and " | lr " in ln and " ms | tok/s " in ln for ln in lines)
    assert "stage 1: [(32, 32), (32, 48)]" in out and "Frame Pack rows of" in out
    recs = log(tmp_path)
    assert [r["stage"] for r in recs] == [0, 0, 1, 1]
    assert all(math.isfinite(r["loss"]) and r["loss_by_t"] and 0 < r["packing"] <= 1 for r in recs)
    assert res["losses"] == [r["loss"] for r in recs]
    net = dit.ExpertDiT.load(str(tmp_path / "dit"))  # exported for sample.py, with vae/, text_encoder/, sample.json
    assert net.cfg == dit.DIT_PRESETS["tiny"]
    assert (tmp_path / "vae" / "model.safetensors").exists() and (tmp_path / "text_encoder").is_dir()
    meta, tiny = json.load(open(tmp_path / "sample.json")), sample.PRESETS["tiny"]
    assert meta["height"] == 32 and meta["width"] == 32
    assert (meta["steps"], meta["sampler"], meta["cfg"], meta["cfg_min_t"]) == (20, "ddim", 2.5, 0) == \
        (tiny.steps, tiny.sampler, tiny.cfg, tiny.cfg_min_t)  # the preset the tiny DiT samples with
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_0000004"
    mode = lambda f: os.stat(tmp_path / "dit" / f).st_mode & 0o777  # weights as readable as their config
    assert mode("model.safetensors") == mode("config.json") == 0o666 & ~data.UMASK


def test_sample_json_holds_the_sampling_preset_of_the_dit():
    """sample.json: a released-size DiT's sampling settings, not the toy's (sample.load_ckpt starts from "tiny"); an
    I2V DiT samples as its T2V; the clip and the SNR shift are the last stage's."""
    for preset, want in (("cogvideox-5b-i2v", "cogvideox-5b"), ("cogvideox-2b", "cogvideox-2b"),
                         ("cogvideox1.5-5b-i2v", "cogvideox1.5-5b"), ("shapes", "tiny")):
        tc = train.PRESETS[preset]
        last = tc.dit_stages[-1]
        meta, ref = train.sample_meta(tc, last), sample.PRESETS[want]
        assert (meta["steps"], meta["sampler"], meta["cfg"], meta["cfg_min_t"]) == \
            (ref.steps, ref.sampler, ref.cfg, ref.cfg_min_t), preset
        assert (meta["num_frames"], [meta["height"], meta["width"]], meta["snr_shift_scale"]) == \
            (max(last.frames), list(last.resolutions[0]), tc.snr_shift)
    assert train.sample_meta(train.PRESETS["cogvideox-5b-i2v"], last)["sampler"] == "dpm"
    assert sample.SampleConfig(**train.sample_meta(train.PRESETS["cogvideox-2b"], last)).snr_shift_scale == 3.0


def test_sample_json_holds_the_clips_the_dit_learned(assets, tmp_path):
    """A last stage without fps trains on consecutive frames at the clips' own rate: the export's sample.json
    (what sample.py writes its videos at) carries that rate, not a default 8 fps (24 fps clips played 3x slow).
    Its frame count is the longest clip trained on, not a stage frame count no clip filled (9-frame clips with
    --frames 1,5,9,13 sampled 13 frames by default, a length the DiT never saw)."""
    manifest = data.make_shapes(str(tmp_path / "d24"), 8, seed=0, frames=(9,), image_every=4, fps=24)
    train.main(dit_args(dict(assets, manifest=manifest), tmp_path / "o", *SMALL, "--frames", "1,5,9,13",
                        "--steps", "1"))
    meta = json.load(open(tmp_path / "o" / "sample.json"))
    assert (meta["fps"], meta["num_frames"]) == (24.0, 9)
    assert sample.load_ckpt(str(tmp_path / "o"))[3].fps == 24.0


def test_fine_tune_of_a_released_folder_exports_what_sample_loads(released, assets,  # noqa: F811
                                                                 tmp_path):
    """--init-diffusers without --lora: the export keeps the released VAE folder (diffusers layout)
    and sample.py --ckpt loads it (it refused: "unknown VAEConfig fields"); its text_encoder/ holds
    the released tokenizer and T5 alone (it copied the whole folder, the transformer included)."""
    out = tmp_path / "run"
    train.main(["--stage", "dit", "--preset", "tiny", "--data", assets["manifest"],
                "--init-diffusers", str(released), *SMALL, "--steps", "1,1", "--out", str(out)])
    assert sorted(os.listdir(out / "text_encoder")) == ["text_encoder", "tokenizer"]
    net, ae, text, _ = sample.load_ckpt(str(out))
    ref = vae.CausalVAE.from_diffusers(str(released / "vae"))
    assert ae.cfg == ref.cfg and ae.cfg.scaling_factor == 0.7
    assert all(torch.equal(a, b) for a, b in zip(ae.state_dict().values(),
                                                 ref.state_dict().values()))
    t5 = dit.TextEncoder(str(released), max_length=net.cfg.text_len)
    assert torch.equal(text.encode(PROMPTS[:2]), t5.encode(PROMPTS[:2]))
    sample.main(["--ckpt", str(out), "--prompt", PROMPTS[0], "--out", str(tmp_path / "v.mp4"),
                 "--num-frames", "5", "--height", "16", "--width", "16", "--steps", "2"])
    assert (tmp_path / "v.mp4").exists()


def test_vae_steps_one_process_with_discriminator(assets, tmp_path, capsys):
    """Tiny VAE: 4 steps, the discriminator (own optimizer) switches on at step 2; scaling factor fitted.
    A checkpoint every step (the discriminator's AdamW state written before its first step) changes
    nothing: the same losses."""
    train.main(vae_args(assets["manifest"], tmp_path, "--steps", "4", "--size", "16x16"))
    recs = log(tmp_path)
    train.main(vae_args(assets["manifest"], tmp_path / "ck", "--steps", "4", "--size", "16x16",
                        "--save-every", "1"))
    assert [r["loss"] for r in log(tmp_path / "ck")] == [r["loss"] for r in recs]
    assert len(recs) == 4 and all(math.isfinite(r["loss"]) for r in recs)
    assert recs[0]["gan"] == 0 and "disc" not in recs[0] and "disc" in recs[3]  # disc_start = 2 in "tiny"
    ae = vae.CausalVAE.load(str(tmp_path / "vae"))
    assert ae.cfg.scaling_factor != 1.0 and math.isfinite(ae.cfg.scaling_factor)
    assert "px/s" in capsys.readouterr().out


def test_i2v_and_bucket_modes(assets, tmp_path, capsys):
    """--i2v: the DiT takes [noisy; image] latents (2C channels); --bucket: the released one-shape batches."""
    train.main(dit_args(assets, tmp_path / "i2v", *SMALL, "--steps", "1", "--i2v"))
    net = dit.ExpertDiT.load(str(tmp_path / "i2v" / "dit"))
    assert net.cfg.in_channels == 2 * net.cfg.out_channels
    with pytest.raises(SystemExit) as e:  # resumed without --i2v: other tensor shapes, refused up front
        train.main(dit_args(assets, tmp_path / "i2v", *SMALL, "--steps", "1", "--resume"))
    assert e.value.code == 2 and "holds a run with --i2v; pass the same" in capsys.readouterr().err
    train.main(dit_args(assets, tmp_path / "bucket", *SMALL, "--steps", "1", "--bucket", "--batch", "2",
                        "--grad-checkpoint"))
    assert all("packing" not in r and math.isfinite(r["loss"]) for r in log(tmp_path / "bucket"))


def test_i2v_draws_drop_the_image_condition_5_percent():
    """The released I2V drops the image condition to zeros 5% of the time (noised_image_dropout), drawn after
    the T2V draws so those keep their values."""
    t, drop, sigma, img_drop = train.draws(train.PRESETS["tiny"], 1000, 3, 0, False)
    assert train.PRESETS["cogvideox-5b-i2v"].i2v_drop == 0.05 and 0.03 < img_drop.float().mean() < 0.07
    again = train.draws(train.PRESETS["tiny"], 1000, 3, 0, False)
    assert all(torch.equal(a, b) for a, b in zip((t, drop, sigma, img_drop), again))


def test_i2v_from_a_t2v_init(assets, tmp_path, monkeypatch, capsys):
    """App. A with a learned position table (the 5B-I2V's layout, at tiny size): --init from a T2V model (no
    table) starts the table at zero and trains it; stills are left out (a still's condition is its own
    target); the image condition is dropped to zeros at the configured rate (here 0, then 1)."""
    from dataclasses import replace
    monkeypatch.setitem(dit.DIT_PRESETS, "tiny-i2v", replace(dit.DIT_PRESETS["tiny"], in_channels=16, pos="learned"))
    monkeypatch.setitem(train.PRESETS, "tiny-i2v", replace(train.PRESETS["tiny"], dit="tiny-i2v", i2v_drop=0.0))
    t2v = dit.ExpertDiT(dit.DIT_PRESETS["tiny"])
    t2v.save(str(tmp_path / "t2v"))
    seen, real = [], dit.ExpertDiT.forward_packed

    def spy(self, latents, *a, **k):
        seen.extend(z.detach().clone() for z in latents)
        return real(self, latents, *a, **k)

    monkeypatch.setattr(dit.ExpertDiT, "forward_packed", spy)
    entries = data.read_manifest(assets["manifest"])
    stills = [e for e in entries if e["frames"] == 1]
    data.write_manifest([next(e for e in entries if e["frames"] > 1)] + stills * 3, str(tmp_path / "m.jsonl"))
    a = dict(assets, manifest=str(tmp_path / "m.jsonl"))  # one clip, 6 stills
    i2v = ["--preset", "tiny-i2v", "--i2v", "--init", str(tmp_path / "t2v"), "--size", "32x32",
           "--frames", "1,5,9", "--steps", "1"]
    train.main(dit_args(a, tmp_path / "a", *i2v))
    assert "6 still image(s) left out" in capsys.readouterr().out
    assert seen and all(z.shape[1] > 1 for z in seen)  # no still reached the model
    C = 8
    assert all(z[C:, 0].abs().sum() > 0 and (z[C:, 1:] == 0).all() for z in seen)  # condition in frame 0
    out = weights(tmp_path / "a" / "dit")
    assert out["pos"].abs().sum() > 0  # trained from its zero start
    seen.clear()
    monkeypatch.setitem(train.PRESETS, "tiny-i2v", replace(train.PRESETS["tiny"], dit="tiny-i2v", i2v_drop=1.0))
    train.main(dit_args(a, tmp_path / "b", *i2v))
    assert seen and all((z[C:] == 0).all() for z in seen)  # every condition dropped


def test_released_presets_end_where_the_releases_are():
    """The 1.0 presets' last DiT stage is what the 1.0 models were released for (49 frames 480x720 at
    8 fps, best 20%); the 1.5 presets' stages go 256 -> 480 -> 768 px and 6 s -> 10 s at 16 fps (97 and
    161 frames), the I2V at 81 frames 768x1360; one step count per stage; the 1.5 VAE config."""
    for name in ("cogvideox-2b", "cogvideox-5b", "cogvideox-5b-i2v", "cogvideox1.5-5b", "cogvideox1.5-5b-i2v"):
        tc = train.PRESETS[name]
        assert len(tc.dit_stages) == len(tc.dit_steps), name
        last = tc.dit_stages[-1]
        if "1.5" in name:
            assert last.resolutions[0] == (768, 1360) and last.fps == 16 and tc.vae == "cogvideox1.5-5b"
            assert dit.DIT_PRESETS[tc.dit].patch_t == 2
        else:
            assert (last.resolutions[0], max(last.frames), last.fps) == ((480, 720), 49, 8), name
    st = train.PRESETS["cogvideox1.5-5b"].dit_stages
    assert [s.resolutions[0][0] for s in st] == [256, 480, 768, 768] and st[-1].subset == 0.2
    assert [max(s.frames) for s in st] == [97, 97, 161, 161] and 81 in st[-1].frames
    assert train.PRESETS["cogvideox-2b"].dit_stages[-1].subset == 0.2
    assert train.PRESETS["cogvideox1.5-5b-i2v"].dit_stages[-1].frames == [81]


@pytest.mark.parametrize("name", ["cogvideox-2b", "cogvideox-5b", "cogvideox-5b-i2v", "cogvideox1.5-5b",
                                  "cogvideox1.5-5b-i2v"])
def test_released_presets_train_the_vae_in_the_two_stages_of_the_paper(name):
    """§2.1: short clips, then longer ones (context parallel at scale), at the released VAE's 256 px.
    `--stage vae --preset cogvideox-5b` (or a 1.5 preset) trained on the toy 32x32 default."""
    args = train.parser().parse_args(["--stage", "vae", "--preset", name])
    tc, stages, steps = train.resolve(args)
    assert len(stages) == len(steps) == 2 and min(steps) >= 10_000, (name, steps)
    assert max(stages[0].frames) < max(stages[1].frames), name
    assert all(min(r) >= 256 for st in stages for r in st.resolutions), name


def test_15_temporal_patch_trains_with_frame_pack_t2v_and_i2v(assets, tmp_path, monkeypatch, capsys):
    """A CogVideoX-1.5-shaped tiny DiT (temporal patch 2, RoPE), stills and 9-frame clips = 1 and 3 latent
    frames: Frame Pack rows of several samples; an odd latent count is padded in front before the noise
    (every DiT input has whole temporal patches, as the release's trainers pad); each sample counts
    ceil(T'/2) token frames. Then --i2v from that T2V (--init): the ofs embedding is added, the image
    latent sits in (padding) frame 0 only, times vae.image_scale (with the 1.5 VAE config
    invert_scale_latents: z / scaling factor, so the condition is 1/sf^2 of the plain VAE's)."""
    from dataclasses import replace
    monkeypatch.setitem(dit.DIT_PRESETS, "tiny15", replace(dit.DIT_PRESETS["tiny"], layers=2, patch_t=2))
    monkeypatch.setitem(train.PRESETS, "tiny15", replace(train.PRESETS["tiny"], dit="tiny15", i2v_drop=0.0,
                                                         i2v_noise=(-30.0, 0.0)))
    seen, real = [], dit.ExpertDiT.forward_packed

    def spy(self, latents, t, text, rows, *a, **k):
        seen.append(([z.detach().clone() for z in latents], list(rows)))
        return real(self, latents, t, text, rows, *a, **k)

    monkeypatch.setattr(dit.ExpertDiT, "forward_packed", spy)
    run = ["--preset", "tiny15", "--size", "16x16", "--frames", "1,5,9", "--rows", "2", "--max-tokens", "40"]
    res = train.main(dit_args(assets, tmp_path / "t2v", *run, "--steps", "2,1"))
    assert all(math.isfinite(x) for x in res["losses"])
    net = dit.ExpertDiT.load(str(tmp_path / "t2v" / "dit"))
    assert net.cfg.patch_t == 2 and net.cfg.ofs_dim == 0
    lats = [z for zs, _ in seen for z in zs]
    assert {z.shape[1] for z in lats} == {2, 4}  # stills 1 -> 2, 9-frame clips 3 -> 4: whole patches
    assert any(len(rows) > len(set(rows)) for _, rows in seen)  # a row holds several samples
    assert "Frame Pack rows of" in capsys.readouterr().out
    # --i2v from the 1.5 T2V, with a VAE whose I2V image latent is z / sf (1.5) or z * sf (1.0)
    ae = vae.CausalVAE.load(assets["vae"])
    conds = {}
    for inv in (False, True):
        ae.cfg = replace(ae.cfg, scaling_factor=0.5, invert_scale_latents=inv)
        ae.save(str(tmp_path / f"vae{inv}"))
        seen.clear()
        a = dict(assets, vae=str(tmp_path / f"vae{inv}"), cache=str(tmp_path / f"cache{inv}"))
        train.main(dit_args(a, tmp_path / f"i2v{inv}", *run, "--steps", "1", "--i2v", "--init",
                            str(tmp_path / "t2v" / "dit")))
        net = dit.ExpertDiT.load(str(tmp_path / f"i2v{inv}" / "dit"))
        assert (net.cfg.in_channels, net.cfg.ofs_dim, net.cfg.patch_t) == (16, net.cfg.time_dim, 2)
        zs = seen[0][0]
        assert all(z.shape[1] % 2 == 0 and z[8:, 0].abs().sum() > 0 and (z[8:, 1:] == 0).all() for z in zs)
        conds[inv] = torch.stack([z[8:, 0] for z in zs])
    assert torch.allclose(conds[True], conds[False] / 0.5 ** 2, rtol=1e-4, atol=1e-6)
    # both export for sample.py and sample end to end (9 frames: an odd latent count, padded in front)
    import sample
    from PIL import Image
    Image.new("RGB", (16, 16), (200, 40, 40)).save(tmp_path / "first.png")
    for out, extra in (("t2v", []), ("i2vTrue", ["--image", str(tmp_path / "first.png")])):
        sample.main(["--ckpt", str(tmp_path / out), "--prompt", "a red circle moves to the left", "--out",
                     str(tmp_path / f"{out}.mp4"), "--num-frames", "9", "--steps", "2", *extra])
        import av
        with av.open(str(tmp_path / f"{out}.mp4")) as f:
            assert sum(1 for _ in f.decode(video=0)) == 9
    # LoRA on the 1.5 T2V (Frame Pack rows, padded latents): only adapters train and export
    res = train.main(dit_args(assets, tmp_path / "lora", *run, "--steps", "2", "--lora", "4",
                              "--init", str(tmp_path / "t2v" / "dit")))
    assert all(math.isfinite(x) for x in res["losses"])
    lora = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora and all(".lora_" in k for k in lora) and any(v.abs().sum() > 0 for k, v in
                                                          lora.items() if "lora_B" in k)


def test_overfitting_one_batch_lowers_the_loss(assets, tmp_path):
    """The same clip 4 times (one global batch, stratified t): the loss must fall well below its start.
    40 steps: each step's loss moves with its 4 timesteps, and at 25 the last-4 mean sat near the line
    (0.47-0.50 of the first-4 mean, depending on the strata's draws); at 40 it is 0.32."""
    e = data.read_manifest(assets["clips"])[0]
    data.write_manifest([e] * 4, str(tmp_path / "one.jsonl"))
    a = dict(assets, manifest=str(tmp_path / "one.jsonl"))
    res = train.main(dit_args(a, tmp_path / "run", "--size", "16x16", "--frames", "9", "--steps", "40,1",
                              "--rows", "1", "--max-tokens", "96", "--lr", "3e-3"))
    first, last = sum(res["losses"][:4]) / 4, sum(res["losses"][-5:-1]) / 4
    assert last < 0.5 * first, res["losses"]


@pytest.mark.parametrize("i2v", [False, True])
def test_dit_loss_noises_each_sample_as_one_at_a_time(assets, tmp_path, monkeypatch, i2v):
    """dit_loss noises the samples of one latent shape together (speed): the model's inputs and the
    v-targets must be, bit for bit, what each sample alone gives (its own noise, timestep and, with
    --i2v, its image latent, noise level and dropout), on batches of several shapes."""
    import diffusion
    seen, real_loss, real_predict = [], train.dit_loss, train.dit_predict

    def one_at_a_time(job, batch, step, micro):  # the per-sample reference
        tc, items = job.tc, batch["items"]
        t_all, _, sigma_all, img_drop = train.draws(tc, items[0]["n_global"], step, micro,
                                                    job.args.iid_timesteps, batch.get("masses"))
        xs, vs = [], []
        for it in items:
            s = max(it["slot"], 0)
            key, t = (tc.seed, step, micro, s), t_all[s:s + 1]
            post = vae.Gaussian(it["mean"], it["logvar"])
            z = post.sample(eps=train.noise(post.mean.shape, *key, 1)) * job.ae.cfg.scaling_factor
            z = dit.pad_frames(z, job.cfg.patch_t)
            e = train.noise(z.shape, *key, 2)
            x = diffusion.q_sample(z[None], t, e[None], job.ac)
            vs.append(diffusion.v_target(z[None], e[None], t, job.ac)[0])
            if i2v:
                img = vae.Gaussian(it["img_mean"], it["img_logvar"])
                img = img.sample(eps=train.noise(img.mean.shape, *key, 4)) * job.ae.cfg.image_scale
                img = img + sigma_all[s] * train.noise(img.shape, *key, 3)
                img = img * (~img_drop[s]).float()
                x = dit.i2v_input(x, img[None])
            xs.append(x[0])
        return xs, vs

    def predict(job, net, zt, *a):
        v = real_predict(job, net, zt, *a)
        seen[-1]["zt"], seen[-1]["v"] = zt, [u.detach() for u in v]
        return v

    def loss(job, net, batch, step, micro, max_tokens):
        seen.append({"ref": one_at_a_time(job, batch, step, micro)})
        out, st = real_loss(job, net, batch, step, micro, max_tokens)
        seen[-1]["mse"] = st["mse"]
        return out, st
    monkeypatch.setattr(train, "dit_predict", predict)
    monkeypatch.setattr(train, "dit_loss", loss)
    train.main(dit_args(assets, tmp_path / "run", *SMALL, "--steps", "2,1", "--rows", "3",
                        "--max-tokens", "96", *["--i2v"] * i2v))
    shapes = set()
    for s in seen:
        (xs, vs), zt = s["ref"], s["zt"]
        shapes |= {tuple(x.shape) for x in xs}
        assert len(zt) == len(xs) and all(torch.equal(a, b) for a, b in zip(zt, xs))
        mse = torch.stack([(a - b).pow(2).mean() for a, b in zip(s["v"], vs)])  # (S,)
        assert torch.equal(s["mse"], mse)
    # several samples of a shape; of several shapes (--i2v: videos only, of one shape here)
    assert len(seen) == 3 and min(len(s["zt"]) for s in seen) > len(shapes) >= 2 - i2v


def test_min_snr_weights_each_sample(assets, tmp_path, monkeypatch):
    """--min-snr γ: the DiT's loss is Σ_j n_j·w_j·mse_j, w_j = min(SNR, γ) / (SNR + 1) at sample j's
    timestep (computed here from ā); the per-sample v-MSE (loss_by_t's) is the plain one. The first
    step of a run with and one without: the same draws and MSEs, only the weights differ."""
    seen, real = {}, train.dit_loss

    def spy(job, *a, **k):
        out, st = real(job, *a, **k)
        seen.setdefault(job.tc.min_snr, (float(out.detach()), st["mse"], st["t"], st["n_j"], job.ac))
        return out, st
    monkeypatch.setattr(train, "dit_loss", spy)
    for g in ("0", "5"):
        train.main(dit_args(assets, tmp_path / g, *SMALL, "--steps", "1,1", "--min-snr", g))
    (l0, m0, t0, n0, ac), (l5, m5, t5, n5, _) = seen[0.0], seen[5.0]
    assert torch.equal(t0, t5) and torch.equal(n0, n5) and torch.equal(m0, m5)
    snr = ac[t0] / (1 - ac[t0])  # (S,) float64
    w = torch.clamp(snr, max=5.0) / (snr + 1)
    assert 0 < w.min() and w.max() < 5 / 6 + 1e-9  # no timestep of this draw has weight 1 or 0
    assert l0 == pytest.approx(float((n0 * m0).sum()), rel=1e-6)
    assert l5 == pytest.approx(float((n0 * w * m0).sum()), rel=1e-6)


def test_attn_modes_reach_the_model_and_agree(assets, tmp_path, monkeypatch):
    """--attn picks how Frame Pack rows attend (dit.packed_attention): dense and segments train
    alike; flex gets rows padded to --max-tokens (one shape: one compile). FlexAttention has no
    backward on CPU, so flex runs here with a recording stand-in computing the dense mask."""
    modes, real = [], dit.packed_attention
    monkeypatch.setattr(dit, "packed_attention", lambda mode, seg, spans: modes.append(
        (mode, seg.shape[1])) or real(mode, seg, spans))
    common = [*SMALL, "--steps", "1,1", "--max-tokens", "64"]
    losses = {}
    for mode in ("dense", "segments"):
        modes.clear()
        run = train.main(dit_args(assets, tmp_path / mode, *common, "--attn", mode))
        losses[mode] = run["losses"]
        assert {m for m, _ in modes} == {mode}
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses["dense"], losses["segments"]))

    class Flex:  # the dense mask in FlexPlan's place, recording the row shape
        def __init__(self, seg):
            shapes.append(tuple(seg.shape))
            self.mask = dit.pack_mask(seg)

        def __call__(self, q, k, v):
            return dit.attention(q, k, v, self.mask)

    shapes, check = [], train.check
    monkeypatch.setattr(dit, "FlexPlan", Flex)
    # past the "flex needs a GPU" check
    monkeypatch.setattr(train, "check", lambda args, *a: check(argparse.Namespace(
        **{**vars(args), "attn": "segments"}), *a))
    flex = train.main(dit_args(assets, tmp_path / "flex", *common, "--attn", "flex"))["losses"]
    assert shapes and {M for _, M in shapes} == {64}  # every row padded to --max-tokens
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(flex, losses["dense"]))


# ----- resume -----

def test_resume_equals_uninterrupted(assets, tmp_path, capsys):
    """Stop after step 4 (inside stage 1, as on SIGTERM), --resume (with --stop-at its last step,
    which just finishes): steps 5-6 and the final EMA weights are exact.
    A copy whose newest checkpoint has 200 flipped bytes in its weights resumes from the one before (step 2), with
    a warning naming both, and exactly; its log then holds each step once."""
    common = [*SMALL, "--steps", "3,3", "--ema", "0.5", "--save-every", "2"]
    full = train.main(dit_args(assets, tmp_path / "full", *common))
    part = train.main(dit_args(assets, tmp_path / "part", *common, "--stop-at", "4"))
    assert part["step"] == 4 and part["stopped"] and part["losses"] == full["losses"][:4]
    assert train.exit_code(part) == train.EXIT_STOPPED and train.exit_code(full) == 0
    assert not (tmp_path / "part" / "dit").exists()  # not finished: nothing exported yet
    shutil.copytree(tmp_path / "part", tmp_path / "bad")
    capsys.readouterr()
    # --stop-at the last step: the run finishes (exported, exit code 0), no "stopped ... --resume"
    rest = train.main(dit_args(assets, tmp_path / "part", *common, "--resume", "--stop-at", "6"))
    assert not rest["stopped"] and "stopped at" not in capsys.readouterr().out
    assert rest["losses"] == full["losses"][4:]  # bit-exact
    a, b = weights(tmp_path / "full" / "dit"), weights(tmp_path / "part" / "dit")
    assert all(torch.equal(a[k], b[k]) for k in a)
    flip(shard(tmp_path / "bad" / "ckpt" / "step_0000004"))
    capsys.readouterr()
    rest = train.main(dit_args(assets, tmp_path / "bad", *common, "--resume"))
    err = capsys.readouterr().err
    assert "checkpoint step_0000004 is damaged (model/" in err and "resuming from step_0000002 instead" in err
    assert rest["losses"] == full["losses"][2:]
    assert [r["step"] for r in log(tmp_path / "bad")] == [1, 2, 3, 4, 5, 6]  # steps 3-4 of the first run: gone
    b = weights(tmp_path / "bad" / "dit")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_global_batch_or_seed_warns(assets, tmp_path, capsys):
    """The data position counts batches of the checkpoint's global batch: a resume with another
    (e.g. on fewer ranks with the same --rows) or another --seed continues in other batches, with
    a warning saying so; the same ones resume silently."""
    common = [*SMALL, "--steps", "2,1"]
    train.main(dit_args(assets, tmp_path, *common, "--rows", "2", "--stop-at", "1"))
    capsys.readouterr()
    train.main(dit_args(assets, tmp_path, *common, "--rows", "2", "--resume", "--stop-at", "2"))
    assert "data order" not in capsys.readouterr().err
    train.main(dit_args(assets, tmp_path, *common, "--rows", "1", "--seed", "5", "--resume"))
    err = capsys.readouterr().err
    assert "global batch 1 and seed 5, the checkpoint's 2 and 0: the data order differs" in err


def test_resume_with_other_data_warns(assets, three_ckpts, tmp_path, capsys):
    """The data position counts batches of the run's samples: a resume with another --data (a sample dropped)
    continued in other batches without a word. It warns; the same samples under another manifest resume
    silently."""
    out = tmp_path / "run"
    shutil.copytree(three_ckpts / "ckpt", out / "ckpt")
    entries = data.read_manifest(assets["manifest"])
    same = data.write_manifest(entries, str(tmp_path / "same.jsonl"))
    fewer = data.write_manifest(entries[:-1], str(tmp_path / "fewer.jsonl"))
    for manifest, steps in ((same, "2,2"), (fewer, "2,3")):
        argv = dit_args(assets, out, *SMALL, "--steps", steps, "--resume")
        argv[argv.index("--data") + 1] = manifest
        capsys.readouterr()
        train.main(argv)
        warned = "warning: --resume: --data lists other samples than the checkpoint's run" in \
            capsys.readouterr().err
        assert warned == (manifest == fewer)


def test_a_bad_file_is_warned_about_once_a_run(assets, tmp_path, capsys):
    """Every stage plans the manifest again: a missing file was warned about once a stage."""
    entries = data.read_manifest(assets["manifest"])
    gone = str(tmp_path / "gone.mkv")
    manifest = data.write_manifest(entries + [{"path": gone, "caption": "a red circle"}],
                                   str(tmp_path / "m.jsonl"))
    train.main(["--stage", "dit", "--preset", "tiny", "--data", manifest, "--vae", assets["vae"],
                "--text-encoder", assets["t5"], "--out", str(tmp_path / "d"), *SMALL,
                "--steps", "1,1"])
    assert capsys.readouterr().err.count(f"skipping {gone}") == 1


def test_a_stage_faster_than_its_clips_warns(assets, tmp_path, capsys, monkeypatch):
    """A stage fps above a clip's own rate repeats its frames: one warning line with the count."""
    tc = train.PRESETS["tiny"]
    monkeypatch.setitem(train.PRESETS, "tiny", replace(
        tc, vae_stages=[replace(st, fps=16) for st in tc.vae_stages]))
    train.main(vae_args(assets["manifest"], tmp_path / "v", "--steps", "1"))
    clips = sum(e["frames"] > 1 for e in data.read_manifest(assets["manifest"]))
    assert f"warning: stage 0: {clips} clip(s) recorded at under the stage's 16 fps" \
        in capsys.readouterr().err


def test_vae_resumed_at_its_end_before_the_statistics_window_exports(assets, tmp_path, capsys):
    """The scaling factor is fitted on the last 20% of the steps: a VAE run stopped before them and
    resumed with --steps ending there exports with the preset's factor and a warning (it divided
    by zero)."""
    out = tmp_path / "v"
    assert train.main(vae_args(assets["manifest"], out, "--stop-at", "2"))["stopped"]
    capsys.readouterr()
    assert train.main(vae_args(assets["manifest"], out, "--resume", "--steps", "2"))["step"] == 2
    assert "no latent statistics" in capsys.readouterr().err
    cfg = json.loads((out / "vae" / "config.json").read_text())
    assert cfg["scaling_factor"] == vae.VAE_PRESETS["tiny"].scaling_factor


def test_vae_extended_by_resume_fits_its_scale_on_the_new_window_only(assets, tmp_path):
    """The scaling factor is fitted on the latents of the last 20% of the steps. A finished 1-step run (its
    window: step 1) extended to 5 by --resume --steps 5 kept step 1's statistics and added those of step 5, the
    new window: latents of older weights in the factor. It fits on the new window only, as a 5-step run: one
    step's latents (single frames, full batches: every step holds as many)."""
    out = tmp_path / "v"
    count = lambda step: json.load(open(out / "ckpt" / f"step_{step:07d}" / "train.json"))["zstat"][0]
    train.main(vae_args(assets["manifest"], out, "--frames", "1", "--steps", "1"))
    one = count(1)
    train.main(vae_args(assets["manifest"], out, "--frames", "1", "--steps", "5", "--resume"))
    assert count(5) == one > 0


@pytest.fixture(scope="module")
def three_ckpts(assets, tmp_path_factory):
    """A finished 3-step DiT run with a checkpoint every step (keep 2: step_2 and step_3 stay)."""
    out = tmp_path_factory.mktemp("three") / "run"
    train.main(dit_args(assets, out, *SMALL, "--steps", "2,1", "--save-every", "1"))
    assert sorted(os.listdir(out / "ckpt")) == ["latest", "step_0000002", "step_0000003"]
    return out


def truncate(path, frac):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * frac))


@pytest.mark.parametrize("damage, words", [
    (lambda c: truncate(shard(c), 0.5), "model/shard-00001-model-00001-of-00001.safetensors does not match its sha256"),
    (lambda c: truncate(shard(c), 0), "does not match its sha256"),
    (lambda c: truncate(shard(c, "optim"), 0.7), "optim/shard-00001-model-00001-of-00001.safetensors does not match"),
    (lambda c: truncate(c / "train.json", 0.5), "train.json unreadable (JSONDecodeError)"),
    (lambda c: flip(shard(c)), "model/shard-00001-model-00001-of-00001.safetensors does not match its sha256"),
    (lambda c: (c / "train.json").write_text((c / "train.json").read_text().replace('"step": 3', '"step": 9')),
     "train.json does not match its checksum"),
    (lambda c: os.remove(shard(c, "optim")), "optim/shard-00001-model-00001-of-00001.safetensors missing"),
])
def test_damaged_latest_checkpoint_falls_back(three_ckpts, tmp_path, capsys, damage, words):
    """Each kind of damage to the newest checkpoint is found by its checksums; --resume then takes the previous
    one, with one warning line naming both (and why)."""
    out = tmp_path / "run"
    shutil.copytree(three_ckpts / "ckpt", out / "ckpt")
    damage(out / "ckpt" / "step_0000003")
    args = SimpleNamespace(out=str(out), resume=True, stage="dit", preset="tiny")
    assert train.find_checkpoint(args, [3], print) == str(out / "ckpt" / "step_0000002")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: checkpoint step_0000003 is damaged (")
    assert words in err[0] and err[0].endswith("; resuming from step_0000002 instead")


@pytest.mark.parametrize("latest, words", [("", "latest is empty"), ("step_12\x00\x01", "latest is garbled"),
                                           (None, "latest is missing")])
def test_empty_or_garbled_latest_takes_the_newest_intact(three_ckpts, tmp_path, capsys, latest, words):
    out = tmp_path / "run"
    shutil.copytree(three_ckpts / "ckpt", out / "ckpt")
    if latest is None:
        os.remove(out / "ckpt" / "latest")
    else:
        (out / "ckpt" / "latest").write_text(latest)
    truncate(shard(out / "ckpt" / "step_0000003"), 0.5)  # ... and the newest is damaged too
    args = SimpleNamespace(out=str(out), resume=True, stage="dit", preset="tiny")
    assert train.find_checkpoint(args, [3], print) == str(out / "ckpt" / "step_0000002")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "checkpoint step_0000003 is damaged" in err[0]
    truncate(shard(out / "ckpt" / "step_0000002"), 0.5)  # nothing intact: one line, exit 2 (via main)
    with pytest.raises(train.SettingsError, match="no intact checkpoint in .*step_0000003.*step_0000002"):
        train.find_checkpoint(args, [3], print)


def test_a_save_cut_between_its_renames_resumes_from_the_old_name(assets, three_ckpts, tmp_path,
                                                                   capsys):
    """A same-step save killed after moving step_N aside (step_N.old) and before putting the new
    one in place: `latest` names a missing folder. --resume took the older step_2 (a step lost);
    it takes step_N.old, and the next save removes that leftover."""
    out = tmp_path / "run"
    shutil.copytree(three_ckpts / "ckpt", out / "ckpt")
    os.replace(out / "ckpt" / "step_0000003", out / "ckpt" / "step_0000003.old")
    args = SimpleNamespace(out=str(out), resume=True, stage="dit", preset="tiny")
    assert train.find_checkpoint(args, [2, 1], print) == str(out / "ckpt" / "step_0000003.old")
    err = capsys.readouterr().err
    assert "the save of step_0000003 was cut off between its renames; resuming from " \
           "step_0000003.old instead" in err
    assert train.main(dit_args(assets, out, *SMALL, "--steps", "2,2", "--save-every", "1",
                               "--resume"))["step"] == 4
    assert sorted(os.listdir(out / "ckpt")) == ["latest", "step_0000002", "step_0000004"]


@pytest.mark.parametrize("extra, words", [
    ([], "already holds a run (checkpoints up to step_0000003): add --resume to continue it, or pick another --out"),
    (["--resume", "--steps", "1"], "the checkpoint is at step 3, past the 2 steps asked for; pass "
                                   "--steps adding up to at least 3 (as many re-exports its model)"),
    (["--resume", "--i2v"], "holds a run without --i2v; pass the same (or another --out)"),
    # the run's batches, crops and timesteps: a resume with other modes is another run
    (["--resume", "--bucket"], "holds a run trained with --augment fixed, not --augment fixed --bucket: "
                               "pass the same (or another --out)"),
    (["--resume", "--iid-timesteps"], "trained with --augment fixed, not --augment fixed --iid-timesteps"),
    (["--resume", "--steps", "3", "--stop-at", "3"], "--stop-at 3 is not after the checkpoint's step 3"),
    # a longer first stage would take the stage-1 checkpoint back to stage 0's data (it trained on silently)
    (["--resume", "--steps", "4,1"], "the checkpoint (step 3) is in stage 1, but --steps 4,1 puts its step in "
                                     "stage 0: the run would go back to stage 0; pass --steps whose first 1 "
                                     "stage(s) end by step 3 (the run's own: 2,1)"),
])
def test_rerun_refusals_keep_the_run(assets, three_ckpts, capsys, extra, words):
    """A second run into the same --out without --resume, or a --resume with fewer steps than done (or a
    --stop-at already passed, or stages that put its step in an earlier stage): one line, exit 2, before any model
    is loaded, and nothing in --out is touched."""
    before = {f: os.stat(f).st_mtime_ns for f in three_ckpts.rglob("*")}
    with pytest.raises(SystemExit) as e:
        train.main(dit_args(assets, three_ckpts, *SMALL, *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1] and len(err) == 1
    assert {f: os.stat(f).st_mtime_ns for f in three_ckpts.rglob("*")} == before


def test_resume_keeps_the_runs_modes(assets, tmp_path, capsys):
    """--bucket and --iid-timesteps (the DiT) and --augment decide the batches, crops and timesteps,
    and no TrainConfig field holds them: a --resume that leaves one out went on as another run,
    silently. Now refused in one line (exit 2), naming the run's; with the same it continues."""
    out, modes = tmp_path / "run", ["--bucket", "--iid-timesteps"]
    train.main(dit_args(assets, out, *SMALL, "--steps", "1,1", "--save-every", "1", *modes))
    with pytest.raises(SystemExit) as e:
        train.main(dit_args(assets, out, *SMALL, "--steps", "1,2", "--resume", "--bucket"))
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith(
        "holds a run trained with --augment fixed --bucket --iid-timesteps, not --augment fixed "
        "--bucket: pass the same (or another --out)")
    assert train.main(dit_args(assets, out, *SMALL, "--steps", "1,2", "--resume", *modes))["step"] == 3


def test_fused_cpu_adamw_is_the_foreach_update_and_takes_its_state():
    """train.adamw(fused=True) (what a CPU run without FSDP steps with: speed only) makes the
    foreach optimizer's updates to float rounding, and continues from a foreach optimizer's state
    (a checkpoint written before it)."""
    torch.manual_seed(0)
    model = dit.ExpertDiT(dit.DIT_PRESETS["tiny"])
    a, b = ([p.detach().clone().requires_grad_() for p in model.parameters()] for _ in range(2))
    tc, cpu = train.PRESETS["shapes"], torch.device("cpu")
    fused, foreach = train.adamw(a, 1e-2, tc, cpu, fused=True), train.adamw(b, 1e-2, tc, cpu)
    assert fused.defaults["fused"] and not foreach.defaults["fused"]
    for step in range(4):
        if step == 2:  # the fused one goes on from the foreach one's moments
            fused.load_state_dict(copy.deepcopy(foreach.state_dict()))  # as read from disk
            for p, q in zip(a, b):
                p.data.copy_(q)
        for p, q in zip(a, b):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        foreach.step()
    assert all(torch.allclose(p, q, rtol=1e-6, atol=1e-7) for p, q in zip(a, b))


@pytest.mark.parametrize("drop, extra, words", [
    (["ckpt"], [], "already holds a run's dit/ and vae/ and log.jsonl: pick another --out, or remove them"),
    (["ckpt"], ["--resume"], "ckpt holds no checkpoint to continue from, and starting again would overwrite the "
                             "exported dit/ and vae/ in "),
    (["ckpt", "dit", "vae"], [], "already holds a run's log.jsonl: pick another --out, or remove them"),
    (["ckpt", "dit", "vae", "log.jsonl"], ["--lora", "2"], f"already holds a run's {dit.LORA_FILE}: pick"),
])
def test_a_finished_run_without_checkpoints_is_not_started_over(assets, three_ckpts, tmp_path, monkeypatch,
                                                                 capsys, drop, extra, words):
    """A finished run whose checkpoints were deleted (to save space) was taken for an empty --out, with or without
    --resume: the new run overwrote its exported model and emptied its log.jsonl. Refused: one line, exit 2, before
    any model is built, --out untouched. A --resume into a log alone (a run killed before its first checkpoint)
    starts again, as before."""
    out = tmp_path / "run"
    shutil.copytree(three_ckpts, out)
    for f in drop:
        shutil.rmtree(out / f) if (out / f).is_dir() else os.remove(out / f)
    if "--lora" in extra:
        (out / dit.LORA_FILE).write_bytes(b"adapters")
    before = {f: os.stat(f).st_mtime_ns for f in out.rglob("*")}
    monkeypatch.setattr(train, "build_dit", lambda job: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as e:
        train.main(dit_args(assets, out, *SMALL, "--steps", "2,1", *extra))
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("warning: --lora")]
    assert e.value.code == 2 and len(err) == 1 and words in err[0], err
    assert {f: os.stat(f).st_mtime_ns for f in out.rglob("*")} == before
    if drop == ["ckpt", "dit", "vae"]:
        class Built(Exception):
            pass

        def built(job):
            raise Built
        monkeypatch.setattr(train, "build_dit", built)
        with pytest.raises(Built):
            train.main(dit_args(assets, out, *SMALL, "--steps", "2,1", "--resume"))
        assert "no checkpoint in " in capsys.readouterr().out


def test_resume_refuses_the_runs_settings_left_out_and_notes_those_changed(assets, three_ckpts, tmp_path,
                                                                           monkeypatch, capsys):
    """A --resume without an override the run was started with (--steps, --lr, ...) went on with the preset's value,
    silently: the preset's 3,3 steps (its cosine stretched over them) for the run's 2,1. Refused, one line naming
    the run's values; a value given again continues, and one given anew (a lower --lr, more --steps) is noted."""
    out = tmp_path / "run"
    shutil.copytree(three_ckpts / "ckpt", out / "ckpt")
    st_path = out / "ckpt" / "step_0000003" / "train.json"
    st = json.loads(st_path.read_text())  # as if the run had been given --lr 0.005
    st["config"]["lr"] = 0.005
    st["check"] = train.digest(st)
    st_path.write_text(json.dumps(st))
    monkeypatch.setattr(train, "build_dit", lambda job: pytest.fail("a model was loaded"))
    for extra, words in (([], "the run in --out was trained with --steps 2,1 --lr 0.005, not the preset's 3,3 "
                              "and 0.001: give them again to continue it (other values to change them)"),
                         (["--steps", "2,1"], "with --lr 0.005, not the preset's 0.001: give it again")):
        with pytest.raises(SystemExit) as e:
            train.main(dit_args(assets, out, *SMALL, *extra, "--resume"))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], err
    monkeypatch.undo()
    assert train.main(dit_args(assets, out, *SMALL, "--steps", "2,2", "--lr", "0.002", "--resume"))["step"] == 4
    assert "note: --resume: --steps 2,2 (the run's: 2,1), --lr 0.002 (the run's: 0.005)" in capsys.readouterr().out


def test_resume_of_a_dit_needs_the_vae_and_t5_it_learned_from(assets, three_ckpts, tmp_path, monkeypatch,
                                                               capsys):
    """A DiT learns the latents of its --vae and the embeddings of its --text-encoder: a resume with another VAE
    (or T5) went on in another latent space, silently. Refused in one line, before any model is loaded; the same
    weights moved or copied continue."""
    out = tmp_path / "run"
    shutil.copytree(three_ckpts / "ckpt", out / "ckpt")
    torch.manual_seed(1)
    vae.CausalVAE(vae.VAE_PRESETS["tiny"]).save(str(tmp_path / "other_vae"))
    shutil.copytree(assets["t5"], tmp_path / "other_t5")
    weights_file = next(f for f in os.listdir(tmp_path / "other_t5") if f.endswith(".safetensors"))
    flip(tmp_path / "other_t5" / weights_file)  # another T5 of the same shapes
    shutil.copytree(assets["vae"], tmp_path / "moved_vae", copy_function=shutil.copy)

    class Built(Exception):
        pass

    def built(job):
        raise Built
    monkeypatch.setattr(train, "build_dit", built)
    args = lambda *extra: dit_args(assets, out, *SMALL, "--steps", "2,2", "--resume", *extra)
    for flag, other in (("--vae", tmp_path / "other_vae"), ("--text-encoder", tmp_path / "other_t5")):
        argv = args()
        argv[argv.index(flag) + 1] = str(other)
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert f"holds a DiT trained with {flag} " in err[0] and f"{other} holds other weights" in err[0], err
    argv = args()
    argv[argv.index("--vae") + 1] = str(tmp_path / "moved_vae")
    with pytest.raises(Built):
        train.main(argv)


def test_resume_with_the_wrong_stage_names_the_checkpoints(assets, three_ckpts, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(vae_args(assets["manifest"], three_ckpts, "--resume"))
    assert e.value.code == 2 and "holds a --stage dit --preset tiny run" in capsys.readouterr().err


def test_resume_of_a_lora_run_needs_the_same_base(assets, tmp_path, capsys):
    """A LoRA checkpoint holds the adapters only; the frozen base is read from --init at each start. A resume
    without it, with another base, or with its files changed since: one line, exit code 2; with the same: on."""
    def save(folder, seed):  # explicit seeds: the global generator's state is other tests' (train.main seeds it)
        m = dit.ExpertDiT(dit.DIT_PRESETS["tiny"])
        m.init_weights(seed)
        m.save(str(folder))
    for seed, name in enumerate(("base", "other")):
        save(tmp_path / name, seed)
    lora = [*SMALL, "--steps", "1", "--lora", "2"]
    out, base = tmp_path / "run", str(tmp_path / "base")
    assert train.main(dit_args(assets, out, *lora, "--init", base, "--stop-at", "1"))["stopped"]
    capsys.readouterr()
    for extra, words in (([], f"holds LoRA adapters trained on --init {base}; pass the same"),
                         (["--init", str(tmp_path / "other")], f"trained on --init {base}; pass"),
                         (["--init", base], f"trained on --init {base} (its weights have changed since)")):
        if extra == ["--init", base]:  # the same folder, its weights written again
            save(base, 2)
        with pytest.raises(SystemExit) as e:
            train.main(dit_args(assets, out, *lora, *extra, "--resume"))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and words in err[-1], err
    st = json.load(open(out / "ckpt" / "step_0000001" / "train.json"))
    old = dict(st)  # a checkpoint written before bases were recorded: resumes, with a warning
    del old["lora_base"]
    old["check"] = train.digest(old)
    shutil.copytree(out, tmp_path / "old")
    (tmp_path / "old" / "ckpt" / "step_0000001" / "train.json").write_text(json.dumps(old))
    assert train.main(dit_args(assets, tmp_path / "old", *lora, "--init", base, "--resume"))["step"] == 2
    assert "does not record its LoRA base" in capsys.readouterr().err
    st["lora_base"][2] = data.model_fingerprint(base)  # as if written with today's base
    st["check"] = train.digest(st)
    (out / "ckpt" / "step_0000001" / "train.json").write_text(json.dumps(st))
    moved = str(tmp_path / "moved")  # the same weights elsewhere (a plain copy: new file times)
    shutil.copytree(base, moved, copy_function=shutil.copy)
    shutil.rmtree(base)
    assert train.main(dit_args(assets, out, *lora, "--init", moved, "--resume"))["step"] == 2
    assert f"the LoRA base --init {base} is now --init {moved} (the same weights)" in capsys.readouterr().out


def test_pruning_never_removes_the_new_checkpoint(tmp_path):
    """Old higher-numbered folders (another run's) stay as they are; the checkpoint just written is kept and
    `latest` names it; older ones are pruned to keep - 1."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters())
    for d in ("step_0000001", "step_0000002", "step_0000009"):
        (tmp_path / "ckpt" / d).mkdir(parents=True)
    train.save_checkpoint(str(tmp_path), 3, 0, {"m": lin}, {"m": opt}, None, {"step": 3}, keep=2)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["latest", "step_0000002", "step_0000003", "step_0000009"]
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_0000003"
    st = json.load(open(tmp_path / "ckpt" / "step_0000003" / "train.json"))
    assert sorted(st["files"]) == ["model/shard-00001-model-00001-of-00001.safetensors",
                                   "optim/shard-00001-model-00001-of-00001.safetensors"]
    assert ckpt_tensors(tmp_path / "ckpt" / "step_0000003", prefix="m.")["weight"].equal(lin.weight.detach())


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """A full disk during a save: the error is raised, the temp folder removed, `latest` still names the previous
    checkpoint, which stays intact."""
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters())
    train.save_checkpoint(str(tmp_path), 1, 0, {"m": lin}, {"m": opt}, None, {"step": 1}, keep=2)

    def full_disk(path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train, "sha256", full_disk)
    with pytest.raises(OSError):
        train.save_checkpoint(str(tmp_path), 2, 0, {"m": lin}, {"m": opt}, None, {"step": 2}, keep=2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["latest", "step_0000001"]
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_0000001"
    assert train.verify(str(tmp_path / "ckpt" / "step_0000001")) is None


def test_sigterm_writes_a_checkpoint_and_stops(assets, tmp_path):
    """SIGTERM mid-run: the step finishes, a checkpoint is written atomically, the process exits with
    EXIT_STOPPED (not 0: `train && sample` must not go on without an exported model). The signal
    is acknowledged at once on stderr (a long step or cache fill would otherwise look ignored)."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(train.__file__), PYTHONUNBUFFERED="1")
    err = open(tmp_path / "stderr.txt", "w")
    p = subprocess.Popen([sys.executable, train.__file__, *dit_args(assets, tmp_path, *SMALL, "--steps", "5000")],
                         stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith("step 2/"):
            p.send_signal(signal.SIGTERM)
            break
    rest, _ = p.communicate(timeout=120)
    assert p.returncode == train.EXIT_STOPPED == 75, rest
    stopped = int(rest.split("stopped at step ")[1].split()[0])
    assert stopped >= 2 and "signal 15" in rest
    err.close()
    assert "train.py: SIGTERM: the run stops after this step with a checkpoint" in \
        (tmp_path / "stderr.txt").read_text()
    latest = (tmp_path / "ckpt" / "latest").read_text()
    assert json.load(open(tmp_path / "ckpt" / latest / "train.json"))["step"] == stopped
    assert not list((tmp_path / "ckpt").glob(".tmp*"))


# ----- faults and bad input -----

@pytest.mark.parametrize("extra, words", [
    (["--frames", "1,10"], "4k+1"),
    (["--size", "20x20"], "multiple of 8"),
    (["--size", "32x32,64x64"], "32x32 and 64x64 have one aspect ratio; a sample goes to"),
    (["--data", "/nonexistent/manifest.jsonl"], "not found"),
    (["--preset", "nope"], "invalid choice"),
    (["--steps", "1,2,3"], "one or 2"),
    (["--attn", "flex"], "needs a GPU"),
])
def test_bad_settings_exit_code_2(assets, tmp_path, capsys, extra, words):
    args = dit_args(assets, tmp_path, *extra)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1]


@pytest.mark.parametrize("extra, words", [
    (["--size", "32"], "--size '32': write HxW"),
    (["--steps", "abc"], "--steps 'abc': write whole numbers"),
    (["--frames", "a,b"], "--frames 'a,b': write whole numbers"),
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--rows", "0"], "--rows must be >= 1, got 0"),
    (["--accum", "0"], "--accum must be >= 1, got 0"),
    (["--mlp-chunks", "0"], "--mlp-chunks must be >= 1 (1 = off), got 0"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--max-tokens", "1"], "--max-tokens 1: a stage-0 sample can need"),
    (["--data", "{clip}"], "is a video or image; pass a manifest .jsonl"),
    (["--data", "{tmp}/bad.jsonl"], "bad.jsonl:2: not JSON"),
    (["--out", "{tmp}/afile"], "afile is a file; pass a folder"),
    (["--out", "/proc/nope/run"], "cannot create files in /proc"),  # /proc: nothing can be created there
    (["--cache", "/proc/nope/cache"], "--cache /proc/nope/cache: cannot create files in /proc"),
    (["--steps", "-5"], "--steps each stage needs >= 1 step (got [-5, -5])"),
    (["--steps", "0"], "--steps each stage needs >= 1 step"),
    (["--ema", "2"], "--ema is a decay in [0, 1)"),
    (["--save-every", "-1"], "--save-every must be >= 0"),
    (["--min-snr", "-1"], "--min-snr is a gamma >= 0 (0 = off; e.g. 5), got -1.0"),
    (["--warmup", "-1"], "--warmup is a number of steps >= 0 (0 = none), got -1"),
    (["--vae", "{vae8}", "--size", "24x24"], "24x24 is not a positive multiple of 16"),  # the --vae given decides
    (["--vae", "{vae16}"], "--vae has 16 latent channels, the tiny DiT 8"),
    # a hand-edited config: a TypeError mid-training (after writing OUT/log.jsonl), an AttributeError
    (["--vae", "{vaestr}"], "vaestr/config.json: scaling_factor = 'x' is not of type float"),
    (["--init", "{initlist}", "--lora", "2"], "initlist/config.json holds a JSON list, not an object"),
    (["--sp", "0"], "--sp must be >= 1, got 0"),
    (["--sp", "3"], "--sp 3: the tiny DiT's 4 attention heads do not divide by it"),
    (["--sp", "2"], "--sp 2 needs a multiple of 2 ranks, got 1"),
    (["--stop-at", "0"], "--stop-at is a step >= 1, got 0"),  # it would never fire
    # options a --stage run ignored: --quick ran every step, not a few
    (["--quick"], "--quick: options of the shapes demo (train.py without --stage)"),
    (["--quick", "--demo-scale", "0.1"], "--quick, --demo-scale: options of the shapes demo"),
    (["--fp32", "--peak-tflops", "500"], "--fp32, --peak-tflops: options of --simulate N, which a "
                                         "training run ignores"),
    (["--real"], "--real: options of --simulate N"),
    # a released folder's scheduler number of the wrong type (a None shift: a TypeError traceback)
    (["--init-diffusers", "{tmp}/rel"], "--init-diffusers: {tmp}/rel/scheduler/scheduler_config.json: "
                                        "snr_shift_scale = None is not of type float"),
    # a folder whose schedule is not the one training noises on (it would be fine-tuned on another)
    (["--init-diffusers", "{tmp}/relsnr"], "--init-diffusers: {tmp}/relsnr/scheduler/scheduler_config.json: "
     "num_train_timesteps 1000, betas 0.00085-0.012, rescale_betas_zero_snr false: training implements the "
     "released schedule only (1000, 0.00085-0.012, true)"),
    (["--init-diffusers", "{tmp}/relbeta"], "relbeta/scheduler/scheduler_config.json: num_train_timesteps 1000, "
     "betas 0.0001-0.02, rescale_betas_zero_snr true"),
    (["--init-diffusers", "{tmp}/releps"], "releps/scheduler/scheduler_config.json: prediction_type='epsilon' "
     "is not supported"),  # as sampling refuses it
    (["--simulate", "0"], "--simulate N is a number of ranks >= 1, got 0"),
    (["--simulate", "-1"], "--simulate N is a number of ranks >= 1, got -1"),
    (["--simulate", "1", "--peak-tflops", "0"], "--peak-tflops must be > 0 (e.g. 989, an H100's dense bf16), got 0.0"),
    (["--simulate", "1", "--peak-tflops", "-5"], "--peak-tflops must be > 0"),
    (["--simulate", "1", "--peak-tflops", "inf"], "--peak-tflops must be > 0"),
    (["--simulate", "3", "--sp", "2"], "--simulate 3: --sp 2 needs a multiple of 2 ranks; simulate 4"),
    (["--simulate", "2", "--real"], "--simulate 2 --real runs on 1 real rank(s): launch 2 ranks (torchrun"),
    (["--cp", "2"], "--cp is the VAE's context parallel; for the DiT use --sp"),  # not a frame count
    (["--stage", "vae", "--init-diffusers", "{tmp}/relempty"],
     "--init-diffusers {tmp}/relempty: cannot read its config.json (No such file or directory)"),
    *((["--stage", "vae", "--frames", f, "--simulate", n, "--cp", cp],
      f"--simulate {n}: --cp {cp} does not divide the {n} ranks")
      for f, n, cp in (("13", "2", "3"), ("9", "1", "2"), ("9", "3", "2"))),
    # another stage's options: the run ignored them (--min-snr on the VAE; a broken --lpips file)
    (["--stage", "vae", "--min-snr", "5", "--rows", "2"], "--min-snr, --rows: options of --stage "
                                                          "dit, which a --stage vae run ignores"),
    (["--stage", "vae", "--cache", "{tmp}/c"], "--cache: an option of --stage dit"),
    (["--stage", "vae", "--encode-memory", "4"], "--encode-memory: an option of --stage dit"),
    (["--lpips", "{tmp}/afile"], "--lpips: an option of --stage vae, which a --stage dit run ignores"),
    (["--recon", "l1", "--batch", "2"], "--recon, --batch: options of --stage vae"),
    # frames the GAN's discriminator (from step disc_start) or LPIPS cannot take: a conv3d / max-pool
    # traceback at the tiny preset's third step, after the training before it
    (["--stage", "vae", "--size", "12x12", "--frames", "9"], "stage 0: 12x12 frames are too small for "
     "the 3D discriminator (§2.1 GAN, from step 3), which needs 16 pixels a side; use --size 16x16"),
    (["--stage", "vae", "--size", "16x8", "--simulate", "1"], "use --size 16x16 or larger"),
    # an image split over ranks: an estimate of a run that cannot happen (exit 0), now refused
    (["--stage", "vae", "--frames", "1", "--simulate", "2", "--cp", "2"], "--simulate --cp 2: the "
     "simulated clip is 1 frame (an image), which context parallel cannot split; simulate --frames 9"),
    # a stage of stills under --cp: every sample was filtered out, and the line blamed the data
    (["--stage", "vae", "--frames", "1", "--cp", "2"], "stage 0: frames [1] are images, which context "
     "parallel cannot split (--cp 2 trains clips of 8k+1 frames); use --frames 9 or more, or drop --cp"),
    (["--stage", "vae", "--size", "8x32", "--steps", "2", "--lpips", "{tmp}/afile"],  # GAN not reached
     "stage 0: 8x32 frames are too small for LPIPS (--lpips), which needs 16 pixels a side; use --size "
     "16x32"),
    # a training run's options, which the simulator ignored (exit 0, as if they had been simulated)
    (["--simulate", "1", "--data", "{tmp}/afile", "--steps", "5"], "--data, --steps: options of "
     "a training run, which --simulate N ignores (one step on synthetic data): drop them"),
    (["--simulate", "1", "--resume"], "--resume: an option of a training run, which --simulate N "
                                      "ignores"),
    (["--simulate", "2", "--out", "{tmp}/o", "--bucket", "--batch", "2"], "--out, --bucket: "
     "options of a training run"),
    (["--simulate", "1", "--encode-memory", "4"], "--encode-memory: an option of a training run"),
])
def test_bad_values_exit_2_before_any_model(assets, tmp_path, monkeypatch, capsys, extra, words):
    """Each bad value: one line naming the fix, exit code 2, before any model is loaded (issue 20)."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bad.jsonl").write_text('{"path": "a.mkv"}\nnot json\n')
    for name, cfg in (("vae8", vae.VAEConfig(channels=(8, 8, 8, 8), layers=1, latent=8, groups=4)),
                      ("vae16", vae.VAEConfig(channels=(8, 8, 8), layers=1, latent=16, groups=4))):
        vae.CausalVAE(cfg).save(str(tmp_path / name))
    shutil.copytree(assets["vae"], tmp_path / "vaestr")
    cfg = json.loads((tmp_path / "vaestr" / "config.json").read_text())
    (tmp_path / "vaestr" / "config.json").write_text(json.dumps(dict(cfg, scaling_factor="x")))
    (tmp_path / "initlist").mkdir()
    (tmp_path / "initlist" / "config.json").write_text("[3]")
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / "rel" / sub).mkdir(parents=True)
    (tmp_path / "rel" / "scheduler" / "scheduler_config.json").write_text('{"snr_shift_scale": null}')
    (tmp_path / "rel" / "transformer" / "config.json").write_text("{}")  # (read after the scheduler)
    released_2b = dict(_class_name="CogVideoXDDIMScheduler", beta_start=0.00085, beta_end=0.012,
                       beta_schedule="scaled_linear", prediction_type="v_prediction", set_alpha_to_one=True,
                       rescale_betas_zero_snr=True, snr_shift_scale=3.0, timestep_spacing="trailing")
    for name, change in (("relsnr", dict(rescale_betas_zero_snr=False)),
                         ("relbeta", dict(beta_start=0.0001, beta_end=0.02)),
                         ("releps", dict(prediction_type="epsilon"))):
        shutil.copytree(tmp_path / "rel", tmp_path / name)
        (tmp_path / name / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(released_2b, **change)))
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / "relempty" / sub).mkdir(parents=True)  # the layout, no config file
    clip = next(e["path"] for e in data.read_manifest(assets["manifest"]) if e["path"].endswith(".mkv"))
    for phase in ("build_dit", "build_vae"):
        monkeypatch.setattr(train, phase, lambda job: pytest.fail("a model was loaded"))
    fmt = dict(tmp=tmp_path, clip=clip, vae8=tmp_path / "vae8", vae16=tmp_path / "vae16",
               vaestr=tmp_path / "vaestr", initlist=tmp_path / "initlist")
    argv = [v.format(**fmt) for v in extra]
    if "--simulate" in extra:  # a simulation reads no data and writes no run: only what it reads
        argv = ["--stage", "dit", "--preset", "tiny", *argv]  # (a VAE case's --stage vae wins)
    elif "vae" in extra:  # a VAE case: no DiT options (--vae, --text-encoder, --cache)
        argv = vae_args(assets["manifest"], tmp_path / "run", *argv)
    else:
        argv = dit_args(assets, tmp_path / "run", *argv)
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "Traceback" not in "".join(err) and words.format(tmp=tmp_path) in err[-1], err


def test_warmup_sets_each_stages_lr_ramp_and_a_stage_inside_it_is_warned(assets, tmp_path, capsys):
    """--warmup overrides the preset's (a full-scale preset's 1000 steps would hold a 500-step fine-tune
    under half its lr, never decaying); a stage that ends inside its warmup is named on stderr."""
    train.main(dit_args(assets, tmp_path / "w2", *SMALL, "--steps", "1,3", "--warmup", "2", "--lr", "1e-3"))
    err = capsys.readouterr().err
    assert "warning: stage 0: its 1 step(s) end inside the 2-step lr warmup: the lr rises to 50% of its " \
           "value and never decays (set --warmup)" in err and "stage 1: its" not in err, err
    lrs = [r["lr"] for r in log(tmp_path / "w2")]  # each stage restarts the ramp: 1/2, then 1/2, 1, cosine
    assert lrs == pytest.approx([5e-4, 5e-4, 1e-3, 1e-3])
    train.main(dit_args(assets, tmp_path / "w0", *SMALL, "--steps", "1,3", "--warmup", "0", "--lr", "1e-3"))
    assert "warning: stage" not in capsys.readouterr().err
    assert [r["lr"] for r in log(tmp_path / "w0")][:2] == pytest.approx([1e-3, 1e-3])  # no ramp


def test_model_folders_and_lpips_files_are_checked_first(assets, tmp_path, monkeypatch, capsys):
    """--vae / --init without the model's files (e.g. a run's --out for its exported model) and a missing --lpips
    file: one line naming the folder to pass, exit code 2, before any model is loaded (not a bare errno line)."""
    for phase in ("build_dit", "build_vae"):
        monkeypatch.setattr(train, phase, lambda job: pytest.fail("a model was loaded"))
    shutil.copytree(assets["vae"], tmp_path / "vaerun" / "vae")  # a VAE run's --out: its model in vae/
    (tmp_path / "empty").mkdir()
    run, empty = str(tmp_path / "vaerun"), str(tmp_path / "empty")
    cases = [(dit_args(assets, tmp_path / "d", "--vae", run), f"--vae {run} holds no config.json: pass the "
              f"exported model folder, e.g. {run}/vae"),
             (dit_args(assets, tmp_path / "d", "--init", empty), f"--init {empty} holds no config.json: pass the "
              f"exported model folder, e.g. runs/dit/dit"),
             (vae_args(assets["manifest"], tmp_path / "v", "--init", run), f"--init {run} holds no "
              f"model.safetensors: pass the exported model folder, e.g. {run}/vae"),
             (vae_args(assets["manifest"], tmp_path / "v", "--lpips", "/nonexistent.pth"),
              "--lpips /nonexistent.pth not found: pass local VGG16 / LPIPS weight file(s)")]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {words}"), err


def test_read_only_out_and_i2v_settings(assets, tmp_path, monkeypatch, capsys):
    """--out on a read-only disk, simulated by os.access (tests run as root: chmod would not stop a write);
    --i2v or --ema (it would be ignored) for the VAE; an image-conditioned preset without --i2v."""
    for phase in ("build_dit", "build_vae"):
        monkeypatch.setattr(train, phase, lambda job: pytest.fail("a model was loaded"))
    cases = [(vae_args(assets["manifest"], tmp_path / "v", "--i2v"), "--i2v fine-tunes the DiT"),
             (vae_args(assets["manifest"], tmp_path / "v", "--ema", "0.9"), "the VAE stage has none: drop --ema"),
             (dit_args(assets, tmp_path / "d", "--preset", "cogvideox-5b-i2v", "--vae", str(tmp_path / "v16")),
              "the cogvideox-5b-i2v DiT takes an image condition: add --i2v")]
    vae.CausalVAE(vae.VAEConfig(channels=(8, 8, 8, 8), layers=1, latent=16, groups=4)).save(str(tmp_path / "v16"))
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p).startswith(str(tmp_path / "ro")) else real(p, m))
    (tmp_path / "ro").mkdir()
    with pytest.raises(SystemExit) as e:
        train.main(dit_args(assets, tmp_path / "ro" / "run"))
    assert e.value.code == 2 and f"--out {tmp_path / 'ro' / 'run'}: cannot create files in" in capsys.readouterr().err


def test_resume_into_a_read_only_checkpoint_folder_is_refused_first(assets, three_ckpts, tmp_path, monkeypatch,
                                                                      capsys):
    """--out writable, its ckpt/ not (a run copied or made by another user; os.access stands in, tests run as
    root): the resumed run trained to its first save and died there with a traceback, the steps lost. One line,
    exit code 2, before any model is loaded."""
    out = tmp_path / "run"
    shutil.copytree(three_ckpts / "ckpt", out / "ckpt")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p).startswith(str(out / "ckpt")) else real(p, m))
    monkeypatch.setattr(train, "build_dit", lambda job: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        train.main(dit_args(assets, out, *SMALL, "--steps", "2,2", "--resume"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"cannot create files in {out / 'ckpt'}" in err[0], err


def test_dit_needs_vae_and_text_encoder(assets, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "dit", "--data", assets["manifest"], "--out", str(tmp_path)])
    assert e.value.code == 2 and "--vae" in capsys.readouterr().err


@pytest.mark.parametrize("case, words", [
    ("vae-init-dit", "pass a --stage vae model folder of the tiny preset"),
    ("vae-truncated", "model.safetensors: not a readable safetensors file"),
    ("init-truncated", "(SafetensorError: "),
    ("t5-truncated", "copy or export it again"),
    # a config value of the wrong type: transformers' StrictDataclassError, a traceback before
    ("t5-config-type", "Validation error for field 'd_model'"),
    ("lpips-not-torch", "(UnpicklingError: "),
])
def test_damaged_or_wrong_model_files_exit_2(assets, tmp_path, capsys, case, words):
    """A truncated or wrong model file (--vae, --init, --text-encoder, --lpips): one line naming the option,
    the folder and the fix, exit code 2, no traceback."""
    def cut(src):  # a copy of the model folder src with its model.safetensors cut to half
        shutil.copytree(src, tmp_path / "cut")
        truncate(tmp_path / "cut" / "model.safetensors", 0.5)
        return str(tmp_path / "cut")
    dit.ExpertDiT(dit.DIT_PRESETS["tiny"]).save(str(tmp_path / "dit"))
    (tmp_path / "notes.pth").write_text("not a weight file\n")
    if case == "vae-init-dit":
        flag, path = "--init", str(tmp_path / "dit")
        argv = vae_args(assets["manifest"], tmp_path / "run", "--init", path)
    elif case == "lpips-not-torch":
        flag, path = "--lpips", str(tmp_path / "notes.pth")
        argv = vae_args(assets["manifest"], tmp_path / "run", "--lpips", path)
    elif case == "t5-config-type":
        flag, path = "--text-encoder", str(tmp_path / "t5")
        shutil.copytree(assets["t5"], path)
        cfg = json.loads((tmp_path / "t5" / "config.json").read_text())
        (tmp_path / "t5" / "config.json").write_text(json.dumps(dict(cfg, d_model="x")))
        argv = dit_args(assets, tmp_path / "run", *SMALL, "--steps", "1", "--cache", str(tmp_path / "cache"),
                        flag, path)
    else:
        flag, src = {"vae-truncated": ("--vae", assets["vae"]), "init-truncated": ("--init", tmp_path / "dit"),
                     "t5-truncated": ("--text-encoder", assets["t5"])}[case]
        path = cut(src)
        argv = dit_args(assets, tmp_path / "run", *SMALL, "--steps", "1", "--cache", str(tmp_path / "cache"),
                        flag, path)
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"error: {flag} {path} does not load (") and words in err[0], err


def test_cache_without_text_encoder_uses_the_t5_it_records(assets, tmp_path, capsys):
    """A run with --text-encoder and --cache records that T5 in the cache; a later run on the same cache may leave
    --text-encoder out (its captions' embeddings are keyed by the T5's id). A cache that records no T5, or lacks a
    caption's embedding: one line naming --text-encoder, exit code 2."""
    cache = str(tmp_path / "cache")
    no_t5 = lambda argv: [a for i, a in enumerate(argv) if "--text-encoder" not in argv[max(0, i - 1):i + 1]]
    with pytest.raises(SystemExit) as e:  # an empty cache: nothing recorded
        train.main(no_t5(dit_args(assets, tmp_path / "a", *SMALL, "--steps", "1", "--cache", cache)))
    assert e.value.code == 2 and "names no text encoder" in capsys.readouterr().err.strip().splitlines()[-1]
    train.main(dit_args(assets, tmp_path / "b", *SMALL, "--steps", "1", "--cache", cache))
    res = train.main(no_t5(dit_args(assets, tmp_path / "c", *SMALL, "--steps", "1", "--cache", cache)))
    assert res["step"] == 2 and all(math.isfinite(v) for v in res["losses"])
    # its export holds the recorded T5 beside the DiT, so sample.py can encode prompts (it had none)
    assert sorted(os.listdir(tmp_path / "c" / "text_encoder")) == sorted(os.listdir(assets["t5"]))
    assert sample.load_ckpt(str(tmp_path / "c"))[2] is not None
    entries = data.read_manifest(assets["manifest"])
    entries[0]["caption"] = "a caption never embedded"
    data.write_manifest(entries, str(tmp_path / "m.jsonl"))
    with pytest.raises(SystemExit) as e:
        train.main(no_t5(dit_args(dict(assets, manifest=str(tmp_path / "m.jsonl")), tmp_path / "d", *SMALL,
                                  "--steps", "1", "--cache", cache)))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "holds no text embedding of 1 caption(s) (e.g. 'a caption never" in err[-1], err


def test_nan_loss_skips_the_step_then_stops(assets, tmp_path, monkeypatch, capsys):
    real = train.dit_loss

    def nan(out):  # a NaN loss, for backward and for the log
        return out[0] * float("nan"), dict(out[1], loss=float("nan"))

    def flaky(*a, **k):  # step index 1 (the 2nd step) gives NaN
        out = real(*a, **k)
        return nan(out) if a[3] == 1 else out

    monkeypatch.setattr(train, "dit_loss", flaky)
    res = train.main(dit_args(assets, tmp_path / "a", *SMALL, "--steps", "2"))
    assert res["step"] == 4 and math.isnan(res["losses"][1]) and all(math.isfinite(v) for v in res["losses"][2:])
    assert "update skipped (1 in a row)" in capsys.readouterr().err
    monkeypatch.setattr(train, "dit_loss", lambda *a, **k: nan(real(*a, **k)))
    with pytest.raises(SystemExit) as e:  # stops with one line naming the fix, exit code 2
        train.main(dit_args(assets, tmp_path / "b", *SMALL, "--steps", "3", "--max-bad-steps", "2"))
    assert e.value.code == 2 and "2 non-finite losses in a row" in capsys.readouterr().err


def test_a_skipped_vae_step_leaves_the_scaling_factor_finite(assets, tmp_path, monkeypatch, capsys):
    """A non-finite VAE step inside the scaling factor's window (the last 20%: steps 8 and 9 of 10) is skipped,
    and so are its latent statistics: the factor is 1 / std of step 8's latents alone (it was NaN, exported
    with exit code 0: every DiT trained on that VAE would see NaN latents)."""
    real_fwd, real_loss, seen = train.vae_forward, train.vae_loss, {}

    def overflow(job, net, x, eps):  # step 9's encoder overflows: NaN latents and reconstruction
        rec, post = real_fwd(job, net, x, eps)
        if seen.get("step") == 9:
            post, rec = vae.Gaussian(post.mean * float("nan"), post.logvar), rec * float("nan")
        return rec, post

    def spy(job, net, batch, step, micro):
        seen["step"] = step
        out = real_loss(job, net, batch, step, micro)
        seen[step] = out[1]["zstat"]
        return out
    monkeypatch.setattr(train, "vae_forward", overflow)
    monkeypatch.setattr(train, "vae_loss", spy)
    res = train.main(vae_args(assets["manifest"], tmp_path, *SMALL, "--steps", "10", "--batch", "1"))
    assert res["step"] == 10 and math.isnan(res["losses"][9]) and "update skipped" in capsys.readouterr().err
    n, s1, s2, var = seen[8].tolist()
    factor = json.load(open(tmp_path / "vae" / "config.json"))["scaling_factor"]
    assert factor == pytest.approx(1 / math.sqrt(s2 / n - (s1 / n) ** 2 + var / n), rel=1e-6)


def test_no_readable_data_is_a_clear_error_not_a_hang(tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text('{"path": "missing.mkv", "caption": "a red circle"}\n')
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "vae", "--preset", "tiny", "--data", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "no readable sample" in capsys.readouterr().err


def test_bad_files_are_skipped_and_counted(assets, tmp_path):
    entries = data.read_manifest(assets["manifest"])
    bad = tmp_path / "broken.mkv"
    bad.write_bytes(b"")  # zero bytes: data.BadVideo("zero-byte file")
    entries.append(dict(entries[0], path=str(bad)))
    data.write_manifest(entries, str(tmp_path / "m.jsonl"))
    a = dict(assets, manifest=str(tmp_path / "m.jsonl"))
    res = train.main(dit_args(a, tmp_path / "run", *SMALL, "--steps", "8"))  # > one epoch per stage
    assert res["step"] == 16 and all(math.isfinite(v) for v in res["losses"])
    assert log(tmp_path / "run")[-1]["bad_files"] >= 1


# ----- start-up memory: meta-device DiT, shards filled alone, T5 released, FSDP mixed precision -----

def tiny_dit_args(*extra):
    return train.parser().parse_args(["--stage", "dit", "--preset", "tiny", *extra])


def test_fsdp_rank_fills_only_its_shard_with_the_one_process_values():
    """make_dit builds on the meta device; under FSDP (2 ranks of PyTorch's in-process "fake" backend) each
    parameter is asked for this rank's rows only, so the rank never holds the whole model, and those rows equal
    the one-process initial weights (a generator per tensor, seeded by (seed, name))."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    args, cpu = tiny_dit_args(), torch.device("cpu")
    alone = train.make_dit(args, train.PRESETS["tiny"], cpu)
    assert all(p.is_meta for p in alone.parameters())
    train.wrap(alone, False, cpu, fill=train.dit_source(args, alone, seed=0))
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        model = train.make_dit(args, train.PRESETS["tiny"], cpu)
        src, asked = train.dit_source(args, model, seed=0), []
        train.wrap(model, True, cpu, fill=lambda name, index: asked.append(index) or src(name, index))
        rows = [idx[0] for idx in asked]  # FSDP shards dim 0: rank 0 of 2 asks for the first half of every tensor
        full = dict(alone.named_parameters())
        assert all(r.start == 0 and r.stop == (len(full[n]) + 1) // 2 for r, n in zip(rows, full))
        held = sum(p.to_local().numel() for p in model.parameters())
        assert held == sum((len(p) + 1) // 2 * p[0].numel() for p in full.values()) < 0.51 * sum(
            p.numel() for p in full.values())
        assert all(torch.equal(p.to_local(), full[n].detach()[:len(p.to_local())]) for n, p in model.named_parameters())
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_mixed_precision_policy():
    """On GPU, FSDP2 gathers and computes in bf16 and reduces gradients in fp32; on CPU nothing changes. Built here
    for real on a 1-rank gloo group with the GPU policy forced: inside the forward the weights are bf16, the
    sharded weights and their gradients stay fp32."""
    assert train.mixed_precision(torch.device("cpu")) is None
    mp = train.mixed_precision(torch.device("cuda"))
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        args, cpu = tiny_dit_args(), torch.device("cpu")
        model = train.make_dit(args, train.PRESETS["tiny"], cpu)
        # bf16=True: the GPU policy (the simulator's switch), here on CPU
        net = train.wrap(model, True, cpu, fill=train.dit_source(args, model, seed=0), bf16=True)
        seen = net(lambda m, x: (m.patch.weight.dtype, m.patch(x).float().sum()), torch.ones(2, 32))
        assert seen[0] == torch.bfloat16
        seen[1].backward()
        assert model.patch.weight.dtype == model.patch.weight.grad.dtype == torch.float32
    finally:
        torch.distributed.destroy_process_group()


def test_init_reads_slices_and_grows_t2v_into_i2v(tmp_path):
    """--init from our folder: each tensor (or an FSDP shard of it) is read with get_slice; T2V weights into the
    I2V DiT (App. A): the patch embedding gains zero image channels, everything else is the file's."""
    torch.manual_seed(0)
    t2v = dit.ExpertDiT(dit.DIT_PRESETS["tiny"])
    t2v.save(str(tmp_path / "t2v"))
    args = tiny_dit_args("--i2v", "--init", str(tmp_path / "t2v"))
    model = train.make_dit(args, train.PRESETS["tiny"], torch.device("cpu"))
    fill = train.dit_source(args, model, seed=0)
    w = t2v.blocks[1].fc1.weight.detach()
    assert torch.equal(fill("blocks.1.fc1.weight", (slice(3, 7), slice(0, w.shape[1]))), w[3:7])
    train.wrap(model, False, torch.device("cpu"), fill=fill)
    C, D = t2v.cfg.in_channels, t2v.cfg.dim
    grown = model.patch.weight.detach().view(D, 2 * C, 4)
    assert torch.equal(grown[:, :C], t2v.patch.weight.detach().view(D, C, 4)) and not grown[:, C:].any()
    theirs = t2v.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items() if k != "patch.weight")
    from dataclasses import replace
    dit.ExpertDiT(replace(dit.DIT_PRESETS["tiny"], layers=5)).save(str(tmp_path / "five"))
    other = tiny_dit_args("--init", str(tmp_path / "five"))
    with pytest.raises(train.SettingsError, match=r"blocks.4.\S+ \(.*\) does not fit this DiT \(no such tensor\)"):
        train.dit_source(other, train.make_dit(other, train.PRESETS["tiny"], torch.device("cpu")), seed=0)


def test_init_from_a_released_diffusers_folder(tmp_path):
    """--init also takes a released (diffusers) transformer folder: the values are dit.ExpertDiT.from_diffusers'."""
    from diffusers import CogVideoXTransformer3DModel
    c = dit.DIT_PRESETS["tiny"]
    torch.manual_seed(0)
    CogVideoXTransformer3DModel(num_attention_heads=c.heads, attention_head_dim=c.head_dim, in_channels=c.in_channels,
                                out_channels=c.out_channels, time_embed_dim=c.time_dim, text_embed_dim=c.text_dim,
                                num_layers=c.layers, max_text_seq_length=c.text_len, sample_width=8, sample_height=8,
                                sample_frames=9).save_pretrained(tmp_path / "released")
    args = tiny_dit_args("--init", str(tmp_path / "released"))
    model = train.make_dit(args, train.PRESETS["tiny"], torch.device("cpu"))
    train.wrap(model, False, torch.device("cpu"), fill=train.dit_source(args, model, seed=0))
    ref = dit.ExpertDiT.from_diffusers(str(tmp_path / "released")).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_init_holding_another_dit_config_is_refused(assets, tmp_path, monkeypatch, capsys):
    """--init DIR's own config against the DiT being built: a sin-cos checkpoint of ours, one with
    another RoPE base, or a released sin-cos folder under the RoPE tiny preset is one line, exit
    code 2, before any model (they trained with the preset's positions and exported pos='rope').
    A T2V -> I2V start (--i2v into a learned-table preset) still passes."""
    from diffusers import CogVideoXTransformer3DModel
    monkeypatch.setattr(train, "build_dit", lambda job: pytest.fail("a model was loaded"))
    c = dit.DIT_PRESETS["tiny"]
    dit.ExpertDiT(replace(c, pos="sincos")).save(str(tmp_path / "sincos"))
    dit.ExpertDiT(replace(c, rope_theta=500.0)).save(str(tmp_path / "theta"))
    CogVideoXTransformer3DModel(num_attention_heads=c.heads, attention_head_dim=c.head_dim,
                                in_channels=c.in_channels, out_channels=c.out_channels,
                                time_embed_dim=c.time_dim, text_embed_dim=c.text_dim,
                                num_layers=c.layers, max_text_seq_length=c.text_len, sample_width=8,
                                sample_height=8, sample_frames=9).save_pretrained(tmp_path / "rel")
    for name, words in (("sincos", "pos='sincos', the tiny preset's has pos='rope'"),
                        ("theta", "rope_theta=500.0, the tiny preset's has rope_theta=10000.0"),
                        ("rel", "pos='sincos', the tiny preset's has pos='rope'")):
        with pytest.raises(SystemExit) as e:
            train.main(dit_args(assets, tmp_path / "run", "--init", str(tmp_path / name)))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and f"--init {tmp_path / name} holds a DiT with {words}" in err[-1]
    dit.ExpertDiT(c).save(str(tmp_path / "t2v"))
    monkeypatch.setitem(dit.DIT_PRESETS, "tiny-i2v", replace(c, in_channels=16, pos="learned"))
    monkeypatch.setitem(train.PRESETS, "tiny-i2v", replace(train.PRESETS["tiny"], dit="tiny-i2v"))
    args = train.parser().parse_args(dit_args(assets, tmp_path / "run", "--preset", "tiny-i2v",
                                              "--i2v", "--init", str(tmp_path / "t2v")))
    train.check_init(args, train.PRESETS["tiny-i2v"])  # grows: input channels, learned table


def test_t5_is_released_once_every_caption_is_cached(assets, tmp_path):
    args = train.parser().parse_args(dit_args(assets, tmp_path / "out", "--cache", str(tmp_path / "cache")))
    job = SimpleNamespace(args=args, tc=train.PRESETS["tiny"], device=torch.device("cpu"), rank=0, world=1,
                          say=print, text=None, sp=None, entries=data.read_manifest(assets["manifest"]))
    real = dit.TextEncoder
    made = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dit, "TextEncoder", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
        train.build_dit(job)
    t5 = weakref.ref(made.pop())
    import gc
    gc.collect()
    assert job.text is None and t5() is None  # no reference left: its memory is free
    cache = data.LatentCache(str(tmp_path / "cache"))
    assert all(cache.get(cache.text_key(e["caption"], job.ids[1])) is not None for e in job.entries)


def test_timeout_reaches_the_process_group(monkeypatch, capsys):
    import datetime
    seen = {}

    def init(backend, **kw):
        seen.update(kw, backend=backend)
        raise RuntimeError("stop here")
    monkeypatch.setattr(train.dist, "init_process_group", init)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="stop here"):
        train.setup("cpu", 1, train.parser().parse_args(["--timeout-min", "90"]).timeout_min)
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(minutes=90)}
    with pytest.raises(train.SettingsError, match="--timeout-min 0"):
        train.setup("cpu", 1, 0)


# ----- torchrun, 2 ranks -----

PAR = [*SMALL, "--steps", "2,1"]


@pytest.fixture(scope="module")
def one_process(assets, tmp_path_factory):
    """The reference for the 2-rank runs: one process with both ranks' rows (= their combined global batch)."""
    out = tmp_path_factory.mktemp("one")
    return train.main(dit_args(assets, out, *PAR, "--rows", "2")), out


WORKER = os.path.join(os.path.dirname(__file__), "_train_runs_worker.py")
FSDP = [*PAR, "--rows", "1", "--fsdp", "--ema", "0.5"]
VDDP = ["--steps", "10", "--size", "16x16", "--frames", "1,5"]
CPV = ["--steps", "3", "--size", "16x16", "--frames", "9", "--batch", "1", "--save-every", "2"]
LAG = "lag:500"  # ms: see two_ranks


@pytest.fixture(scope="module")
def two_ranks(assets, tmp_path_factory, torchrun):
    """ONE torchrun launch on 2 ranks for the module's 2-rank runs (a launch costs more than these
    runs), each in its own folder under the returned root; -> (root, {run: its stdout}).

    ddp/: DDP: the uninterrupted run; a run from its export (--init); a run stopped after step 2,
    then resumed; a VAE run, and one stopped inside its statistics window (its last 2 steps), then
    resumed. Rank 0 finishes each of their checkpoints and exports 0.5 s late (LAG): the next run
    must find them on every rank (without the barrier that ends train.export, rank 1's --init
    finds no folder there, also with 0.1 s).
    fsdp/: FSDP: the uninterrupted run; a run stopped after step 2, then resumed; another stopped
    there (`alone`, which a test resumes in one process); and the resume of a checkpoint written by
    one process (`back`, written here before the launch).
    offload/: FSDP with offloaded activation checkpointing. cp/: the VAE with --cp 2. Then the
    --simulate 2 --fsdp --real step."""
    root = tmp_path_factory.mktemp("two_ranks")
    d, f, ddp = root / "ddp", root / "fsdp", [*PAR, "--rows", "1"]
    train.main(dit_args(assets, f / "back", *PAR, "--rows", "2", "--stop-at", "2"))  # 1 process
    runs = {"ddp": (LAG, dit_args(assets, d / "full", *ddp)),
            "ddp init": (LAG, dit_args(assets, d / "init", *ddp, "--init", d / "full" / "dit")),
            "ddp stop": (LAG, dit_args(assets, d / "part", *ddp, "--stop-at", "2")),
            "ddp resume": (LAG, dit_args(assets, d / "part", *ddp, "--resume")),
            **{name: (LAG, vae_args(assets["manifest"], d / out, *VDDP, *extra))
               for name, out, extra in (("vae", "vfull", []),
                                        ("vae stop", "vpart", ["--stop-at", "9"]),
                                        ("vae resume", "vpart", ["--resume"]))},
            "fsdp": dit_args(assets, f / "full", *FSDP),
            "fsdp stop": dit_args(assets, f / "part", *FSDP, "--stop-at", "2"),
            "fsdp alone": dit_args(assets, f / "alone", *FSDP, "--stop-at", "2"),
            "fsdp resume": dit_args(assets, f / "part", *FSDP, "--resume"),
            "fsdp back": dit_args(assets, f / "back", *FSDP, "--resume"),
            "offload": dit_args(assets, root / "offload", *PAR, "--rows", "1", "--fsdp",
                                "--grad-checkpoint", "--offload-activations"),
            "cp": vae_args(assets["clips"], root / "cp", *CPV, "--cp", "2"),
            "simulate": [*SIM, "--simulate", "2", "--fsdp", "--real"]}
    p = torchrun(WORKER, *launch_args(*runs.values()), timeout=900)
    return root, dict(zip(runs, split_runs(p.stdout, len(runs))))


@pytest.fixture(scope="module")
def ddp(two_ranks):
    """The DDP runs of the 2-rank launch (two_ranks): their folder."""
    root, out = two_ranks
    assert "world 2 ddp" in out["ddp"] and "stopped at step 2 (--stop-at)" in out["ddp stop"]
    assert (root / "ddp" / "init" / "dit" / "model.safetensors").exists()
    return root / "ddp"


@pytest.fixture(scope="module")
def fsdp(two_ranks):
    """The FSDP runs of the 2-rank launch (two_ranks): their folder."""
    root, out = two_ranks
    assert "world 2 fsdp" in out["fsdp"] and "stopped at step 2 (--stop-at)" in out["fsdp stop"]
    assert "written by 1 rank(s)" in out["fsdp back"]
    return root / "fsdp"


def test_ddp_two_ranks_equals_one_process(ddp, one_process):
    """2 ranks x 1 Frame Pack row == 1 process x 2 rows (the same global batch): same losses, same weights."""
    one, ref = one_process
    two = [r["loss"] for r in log(ddp / "full")]
    assert two == pytest.approx(one["losses"], rel=1e-5, abs=1e-7)
    a, b = weights(ref / "dit"), weights(ddp / "full" / "dit")
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)


def test_fsdp_two_ranks_equals_one_process(fsdp, one_process):
    """--fsdp (FSDP2 fully_shard on gloo): the same update as one process; the sharded checkpoint reads back whole."""
    one, ref = one_process
    full = fsdp / "full"
    assert [r["loss"] for r in log(full)] == pytest.approx(one["losses"], rel=1e-5, abs=1e-7)
    raw = lambda out: ckpt_tensors(out / "ckpt" / "step_0000003")  # the checkpoint keeps the raw weights
    a, b = raw(ref), raw(full)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)
    names = os.listdir(full / "ckpt" / "step_0000003" / "model")  # each rank wrote its shard
    assert sorted(names) == [f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]
    ema = ckpt_tensors(full / "ckpt" / "step_0000003", "ema", prefix="")  # the sharded EMA, whole
    params = {k for k, _ in dit.ExpertDiT(dit.DIT_PRESETS["tiny"]).named_parameters()}
    assert params and ema.keys() == params and all(ema[k].shape == b[k].shape for k in ema)  # every parameter
    assert torch.equal(weights(full / "dit")["patch.weight"], ema["patch.weight"])  # export = EMA


def test_ddp_resume_equals_uninterrupted(ddp):
    """DDP on 2 ranks, stopped after step 2 and resumed: the losses and the exported weights are exact."""
    assert [r["loss"] for r in log(ddp / "part")] == [r["loss"] for r in log(ddp / "full")]  # bit-exact
    a, b = weights(ddp / "full" / "dit"), weights(ddp / "part" / "dit")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_vae_resume_exports_the_same_scaling_factor(ddp):
    """The VAE's latent statistics are per rank: a checkpoint keeps their sum over the ranks, which
    one rank takes back on resume, so the exported scaling factor is the uninterrupted run's."""
    assert [r["loss"] for r in log(ddp / "vpart")] == [r["loss"] for r in log(ddp / "vfull")]
    a, b = (json.loads((ddp / o / "vae" / "config.json").read_text()) for o in ("vfull", "vpart"))
    assert a["scaling_factor"] != vae.VAE_PRESETS["tiny"].scaling_factor
    assert a["scaling_factor"] == pytest.approx(b["scaling_factor"], rel=1e-9)


def test_fsdp_resume_equals_uninterrupted(fsdp):
    """FSDP on 2 ranks, stopped after step 2 and resumed on 2 ranks: losses, weights and EMA are exact."""
    assert [r["loss"] for r in log(fsdp / "part")] == [r["loss"] for r in log(fsdp / "full")]
    for sub, pre in (("model", "dit."), ("ema", "")):
        a, b = (ckpt_tensors(o / "ckpt" / "step_0000003", sub, pre) for o in (fsdp / "full", fsdp / "part"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_on_another_number_of_ranks(assets, fsdp, one_process):
    """FSDP's 2-rank checkpoint resumed in one process (2 rows = the same global batch), and a one-process
    checkpoint resumed under FSDP on 2 ranks: both continue the one-process run (to float rounding: the sums are
    reduced in another order)."""
    one, ref = one_process
    rest = train.main(dit_args(assets, fsdp / "alone", *PAR, "--rows", "2", "--ema", "0.5", "--resume"))
    assert rest["losses"] == pytest.approx(one["losses"][2:], rel=1e-5, abs=1e-7)
    assert [r["loss"] for r in log(fsdp / "back")] == pytest.approx(one["losses"], rel=1e-5, abs=1e-7)
    for out in (fsdp / "alone", fsdp / "back"):
        a, b = (ckpt_tensors(o / "ckpt" / "step_0000003") for o in (ref, out))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)


def test_fsdp_offloaded_checkpointing_equals_one_process(two_ranks, one_process):
    """--fsdp --grad-checkpoint --offload-activations: FSDP2 around the offloading checkpoint
    (its backward recomputes each block and runs FSDP's gathers and reductions) gives the same
    update as one plain process."""
    one, ref = one_process
    out = two_ranks[0] / "offload"
    assert "world 2 fsdp" in two_ranks[1]["offload"]
    assert [r["loss"] for r in log(out)] == pytest.approx(one["losses"], rel=1e-5, abs=1e-7)
    a, b = weights(ref / "dit"), weights(out / "dit")
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)


def test_context_parallel_vae_two_ranks_equals_one_process(assets, tmp_path, two_ranks):
    """--cp 2: both ranks share each 9-frame clip (split in time). The losses and the VAE weights equal one
    process, before the GAN starts (disc_start = 2) and after: the adaptive GAN weight sums the ranks' parts of
    the last layer's gradient (it was a fixed weight under CP: a step-3 loss of 1.0157 against 0.9957). The
    first discriminator step (its own optimizer, DDP over the ranks) sees the same clips and reconstructions:
    the same discriminator loss, parts and weights."""
    one = train.main(vae_args(assets["clips"], tmp_path / "one", *CPV))
    assert "(cp 2)" in two_ranks[1]["cp"]
    cp = two_ranks[0] / "cp"  # the 2-rank run, of the same arguments and --cp 2
    two, ref = log(cp), log(tmp_path / "one")
    assert [r["loss"] for r in two] == pytest.approx(one["losses"], rel=1e-5)  # the GAN from step 3
    for k in ("disc", "recon", "kl", "gan", "gan_weight"):  # step 3: the discriminator step, the parts
        assert two[2][k] == pytest.approx(ref[2][k], rel=1e-4, abs=1e-6), k
    ck = lambda out, step, part: ckpt_tensors(out / "ckpt" / f"step_{step:07d}", prefix=part + ".")
    for step, part in ((2, "vae"), (3, "vae"), (3, "disc")):
        a, b = ck(tmp_path / "one", step, part), ck(cp, step, part)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=2e-5) for k in a), (step, part)
    assert (cp / "vae" / "model.safetensors").exists()


def test_sigterm_to_one_rank_with_loader_workers_writes_a_checkpoint(assets, tmp_path):
    """SIGTERM to rank 1's process group alone, as torchrun sends it to each rank's: the rank's
    DataLoader worker (--workers 1) is in a group of its own, so it lives on; both ranks finish the
    step, write the checkpoint and exit with EXIT_STOPPED, and rank 0 names rank 1's signal."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(train.__file__), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           train.__file__, *dit_args(assets, tmp_path, *SMALL, "--steps", "5000", "--rows", "1",
                                     "--workers", "1")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    try:
        for line in p.stdout:
            if line.startswith("step 2/"):
                kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                      text=True).stdout.split()
                envs = {int(k): open(f"/proc/{k}/environ", "rb").read().split(b"\0") for k in kids}
                os.killpg(next(k for k, e in envs.items() if b"RANK=1" in e), signal.SIGTERM)
                break
        rest, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert "DataLoader worker" not in rest and rest.count("exitcode  : 75") == 2, rest[-3000:]
    stopped = int(rest.split("stopped at step ")[1].split()[0])
    assert stopped >= 2 and "(signal 15)" in rest  # printed by rank 0, which got none
    latest = (tmp_path / "ckpt" / "latest").read_text()
    assert json.load(open(tmp_path / "ckpt" / latest / "train.json"))["step"] == stopped


def test_a_torchrun_worker_leaves_without_teardown(torchrun, monkeypatch):
    """train.leave(): after a DDP step, a barrier and destroy_process_group (which leaves DDP's gloo group and
    its worker threads alive), a torchrun worker ends with os._exit: its exit code, its unflushed output
    flushed, and no interpreter teardown (an atexit handler would print), so the gloo worker threads cannot
    abort it mid-teardown (CI: rank 1 "terminate called without an active exception" after a finished run).
    The control (no DDP) ending as Python does runs the teardown. Outside torchrun leave() is sys.exit."""
    worker = os.path.join(os.path.dirname(__file__), "_exit_worker.py")
    out = {m: torchrun(worker, m).stdout for m in ("leave", "plain")}
    for m, text in out.items():
        assert all(f"rank {r}: done" in text for r in (0, 1)), (m, text)
    assert "teardown" not in out["leave"] and out["plain"].count("interpreter teardown") == 2
    monkeypatch.delenv("RANK", raising=False)
    for code in (0, 2, None):
        with pytest.raises(SystemExit) as e:
            train.leave(code)
        assert e.value.code == (code or 0)


def test_torchrun_workers_import_without_pythonpath(tmp_path):
    """The tests' torchrun workers run by hand (`torchrun ... tests/_vae_cp_worker.py`) from any
    folder without PYTHONPATH=.: each puts the repo root on sys.path itself (it was a
    ModuleNotFoundError for train / vae / data). Imported as `python tests/_x.py` sees them: the
    script's folder first, no PYTHONPATH, another working directory."""
    tests = os.path.dirname(os.path.abspath(__file__))
    names = sorted(f[:-3] for f in os.listdir(tests)
                   if f.startswith("_") and f.endswith("_worker.py"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = f"import sys; sys.path[0] = {tests!r}; import {', '.join(names)}"
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert len(names) == 5 and p.returncode == 0, p.stderr[-2000:]


# ----- the shapes demo (issue 8) -----

def test_demo_gate_judges_clips_of_the_sampled_length(tmp_path, monkeypatch):
    """The VAE gate reconstructs clips as long as the DiT will sample (the last stage's longest), not a
    fixed 9 frames: a preset whose stages train and sample 5-frame clips is gated on 5 frames."""
    short = replace(train.PRESETS["shapes"], dit_stages=[data.Stage([(32, 32)], [1, 5])])
    monkeypatch.setitem(train.PRESETS, "shapes", short)
    monkeypatch.setattr(train, "train", lambda args: {"stopped": False})  # no VAE training
    seen = {}

    def gate(folder, manifest, frames, n=48):
        seen["frames"] = frames
        raise KeyboardInterrupt  # (stops the demo here)
    monkeypatch.setattr(train, "vae_gate", gate)
    with pytest.raises(KeyboardInterrupt):
        train.demo(train.parser().parse_args(["--quick", "--out", str(tmp_path)]))
    assert seen["frames"] == 5


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    """`python train.py --quick`: the whole pipeline in a few steps: the matmul yardstick, the VAE
    gate, DEMO_SEEDS checked videos per prompt named NN_[held_]<prompt>_s<seed>, one grid."""
    res = train.main(["--quick", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "warning: stage" not in err, err  # --quick scales the warmup with the steps
    prompts = data.eval_prompts()
    n_seen, seeds = sum(not h for _, h in prompts), len(train.DEMO_SEEDS)
    assert "2048^2 fp32 matmul" in out
    assert "demo: VAE gate: reconstructions of training clips" in out
    assert f"seen prompts x {seeds} seeds: " in out and "minutes per phase" in out
    assert res["seen"]["n"] == n_seen * seeds
    assert res["held"]["n"] == (len(prompts) - n_seen) * seeds
    assert 0 < res["vae_gate"][1] and res["matmul_gflops"][0] > 0
    videos = sorted(p.name for p in (tmp_path / "samples").glob("*.mp4"))
    assert len(videos) == len(prompts) * seeds
    assert "00_a_red_circle_moves_to_the_left_s0.mp4" in videos
    held = next(i for i, (_, h) in enumerate(prompts) if h)
    name = f"{held:02d}_held_{prompts[held][0].replace(' ', '_')}_s{seeds - 1}.mp4"
    assert name in videos
    grid = PIL.Image.open(tmp_path / "samples" / "grid.png")
    assert grid.height >= len(prompts) * 32  # one row per prompt
    # the file's seed is the one sample.py takes: the same prompt and seed give the same video
    # (--steps 4: the quick demo's; the others from the checkpoint's sample.json). Up to float
    # rounding: a batch of 32 prompts and a batch of one multiply in different blockings, and
    # after 8-bit + H.264 pixels may differ by a few levels; another seed's noise, everywhere.
    for seed, same in ((seeds - 1, True), (seeds, False)):
        sample.main(["--ckpt", str(tmp_path / "dit"), "--prompt", prompts[held][0], "--steps",
                     "4", "--seed", str(seed), "--out", str(tmp_path / f"again{seed}.mp4")])
        a, b = (data.load_video(str(f), 9) for f in (tmp_path / "samples" / name,
                                                      tmp_path / f"again{seed}.mp4"))
        # measured: the same seed 0 or (1 run in 3) mean 0.0018; the next seed's noise 0.23
        assert ((a - b).abs().mean() < 0.02) == same


def test_training_options_without_stage_do_not_start_the_demo(tmp_path, monkeypatch, capsys):
    """Without --stage train.py runs the shapes demo, which reads only --out, --device, --quick, --demo-scale,
    --resume and --max-bad-steps: any other option is refused (one line, exit code 2), not ignored for 15
    minutes. A stopped demo names the command that continues it, with its --out."""
    monkeypatch.setattr(train, "demo_threads", lambda: 69.0)
    monkeypatch.setattr(data, "make_shapes", lambda *a, **k: None)
    monkeypatch.setattr(train, "train", lambda args: {"stopped": True})  # as if stopped by a signal
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "tiny", "--data", "D", "--steps", "1", "--lora", "4", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["error: --data, --lora, --preset, --steps: add --stage vae|dit (without "
                                         "it train.py runs the shapes demo)"], err
    assert train.main(["--out", str(tmp_path), "--quick", "--device", "cpu"]) == {}
    out = capsys.readouterr().out
    assert f"stopped during VAE training; `python train.py --out {tmp_path} --quick --resume` continues" in out


@pytest.mark.parametrize("scale", ["inf", "nan", "-1", "0"])
def test_demo_scale_must_be_positive(tmp_path, monkeypatch, capsys, scale):
    """--demo-scale inf / nan ended in an OverflowError / ValueError traceback (after writing the 400-clip data
    set), -1 silently trained 2 steps a stage, 0 the full demo: one line, exit code 2, before any work."""
    monkeypatch.setattr(train, "demo_threads", lambda: pytest.fail("the demo started"))
    monkeypatch.setattr(data, "make_shapes", lambda *a, **k: pytest.fail("the demo started"))
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path), "--demo-scale", scale])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"error: --demo-scale must be > 0 (e.g. 0.1 for a tenth of the steps), "
                                         f"got {float(scale)}"], err


def test_demo_refuses_an_out_made_with_other_settings(tmp_path, monkeypatch, capsys):
    """The demo reuses the data set and VAE it finds in --out: `python train.py` after `python train.py --quick`
    (both out/shapes by default) took the quick run's 60 clips and few-step VAE, and with --resume its DiT, without
    a word. Now refused (one line, exit code 2); the same settings go on as before."""
    def shapes(folder, n, seed=0, **set_):
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, "manifest.jsonl"), "w").write("")
    monkeypatch.setattr(train, "demo_threads", lambda: 69.0)
    monkeypatch.setattr(data, "make_shapes", shapes)
    monkeypatch.setattr(train, "train", lambda args: {"stopped": True})  # as if stopped by a signal
    assert train.main(["--out", str(tmp_path), "--quick", "--device", "cpu"]) == {}
    capsys.readouterr()
    for argv, now in (([], "the full demo (no --quick)"),
                      (["--quick", "--demo-scale", "0.5"], "--quick --demo-scale 0.5")):
        with pytest.raises(SystemExit) as e:
            train.main(["--out", str(tmp_path), "--resume", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err == [f"error: --out {tmp_path} holds a demo made with --quick, not {now}: pass "
                                             f"the same options (and --resume), or another --out"], err
    assert train.main(["--out", str(tmp_path), "--quick", "--resume", "--device", "cpu"]) == {}


def test_demo_refuses_an_out_made_on_another_shapes_set(tmp_path, monkeypatch, capsys):
    """An out/shapes left by an earlier version's demo (its 32 px set, no "set" in demo.json) was reused as
    it was: its data and VAE under the new preset. Now refused (one line, exit code 2), before any work."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.jsonl").write_text("")
    (tmp_path / "demo.json").write_text(json.dumps({"quick": False, "scale": 1.0}))
    monkeypatch.setattr(train, "demo_threads", lambda: pytest.fail("the demo started"))
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"error: --out {tmp_path} holds a demo made on another shapes set (an "
                                         f"earlier version's: train.DEMO_SET changed): pass another --out"], err


def test_demo_threads_keeps_the_faster(monkeypatch):
    """The demo times small operations at its thread count and at one thread and keeps one thread
    only when it is clearly faster (a busy machine), else all of them; the user's OMP_NUM_THREADS
    always. The yardstick (2048^2 matmul) is measured at the count it keeps."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    n = torch.get_num_threads()
    calls = []

    def rate(n=2048, reps=5):
        calls.append(("rate", n, torch.get_num_threads()))
        return 1e9 * (150 if torch.get_num_threads() == 1 else 290)

    def stand_in(one, many):  # seconds of the small operations at one / more threads
        def probe():
            calls.append(("probe", torch.get_num_threads()))
            return one if torch.get_num_threads() == 1 else many
        return probe

    busy, idle, close = stand_in(0.07, 0.24), stand_in(0.07, 0.05), stand_in(0.063, 0.065)
    try:
        torch.set_num_threads(2)
        assert train.demo_threads(rate, busy) == 150 and torch.get_num_threads() == 1
        assert calls == [("probe", 2), ("probe", 1), ("rate", 2048, 1)]
        torch.set_num_threads(2)
        assert train.demo_threads(rate, idle) == 290 and torch.get_num_threads() == 2
        # one thread a few % faster (a slow moment of an idle VM): two threads lose little
        assert train.demo_threads(rate, close) == 290 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stands
        calls.clear()
        assert train.demo_threads(rate, busy) == 290 and torch.get_num_threads() == 2
        assert calls == [("rate", 2048, 2)]
    finally:
        torch.set_num_threads(n)


def test_small_ops_probe_times_its_operations(monkeypatch):
    """small_ops_seconds: the median of its repetitions, each n operations, after a warm-up."""
    ops = []
    real = torch.nn.functional.gelu
    monkeypatch.setattr(torch.nn.functional, "gelu", lambda x: ops.append(x.shape) or real(x))
    s = train.small_ops_seconds(n=7, reps=3)
    assert ops == [(2016, 128)] * 7 * 4 and 0 < s < 5


def test_demo_sample_names_and_grid(tmp_path):
    # NN_[held_]<prompt with underscores>_s<seed>; the grid: one row per video, PASS / FAIL marked
    assert train.sample_name(3, "a red circle moves up", True, 2) == \
        "03_held_a_red_circle_moves_up_s2"
    assert train.sample_name(12, "a blue square moves down", False, 0) == \
        "12_a_blue_square_moves_down_s0"
    red = torch.from_numpy(data.shapes_clip(32, 32, "red", "square", "left", 9, 20.0, 16.0, 7.0))
    red = red.permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, T, H, W) in [-1, 1]
    data.shapes_grid([red, red], ["seen: a", "held-out: b"], [True, False], str(tmp_path / "g.png"))
    g = torch.from_numpy(np.array(PIL.Image.open(tmp_path / "g.png").convert("RGB"))).int()
    assert g.shape[0] == 2 * 64 + 2 and g.shape[1] == 300 + 9 * (64 + 2)  # 2 rows, 9 frames at 2x
    label = g[:, :300]
    green = (label[..., 1] > 100) & (label[..., 0] < 60)  # PASS in green in row 0 only
    red_text = (label[..., 0] > 150) & (label[..., 1] < 60)  # FAIL in red in row 1 only
    assert green[:64].any() and not green[66:].any()
    assert red_text[66:].any() and not red_text[:64].any()
    assert (g[:64, 300:300 + 64] == torch.tensor([255, 0, 0], dtype=torch.int32)).all(-1).any()


def test_i2v_condition_is_the_first_frame_encoded_alone():
    # App. A: the image condition is encode(first frame), what sample.py feeds at inference — not latent frame 0
    # of the whole clip, whose GroupNorm statistics also see the later frames
    ae = vae.CausalVAE(vae.VAE_PRESETS["tiny"]).eval()
    x = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    prep = data.LatentEncoder(ae)  # the main process's encoder (the loader's workers hold no model)
    with torch.no_grad():
        post = prep.posteriors(x)
        alone = ae.encode(x[:, :, :1])
    assert post["img_mean"].shape == (2, 8, 1, 8, 8) and post["mean"].shape == (2, 8, 3, 8, 8)
    torch.testing.assert_close(post["img_mean"], alone.mean)
    torch.testing.assert_close(post["img_logvar"], alone.logvar)
    assert (post["img_mean"] - post["mean"][:, :, :1]).abs().max() > 1e-4


# ----- the step simulator (issue: full-scale training that fits) -----

SIM = ["--stage", "dit", "--preset", "tiny", "--frames", "17", "--size", "64x64", "--rows", "2",
       "--fp32", "--grad-checkpoint"]
ROLES = ("params", "grads", "optimizer", "activations", "temporaries", "peak")


def sim_row(stdout):
    """The numbers of the table row `0..N-1  params grads ... peak` of a --simulate report."""
    row = next(ln for ln in stdout.splitlines() if ln.startswith("0.."))
    return dict(zip(ROLES, map(float, row.split()[1:])))


def test_simulated_step_equals_the_real_step_one_process(capsys):
    """The same step on fake tensors and on real ones, through the same accounting: every role's
    bytes at the peak, the FLOPs and the roofline time agree (the validation the full-size numbers
    rest on; the time once counted the fake tensors' own metadata queries: 1.9x the real one's)."""
    fake = train.main([*SIM, "--simulate", "1"])
    real = train.main([*SIM, "--simulate", "1", "--real"])
    for k in ("params", "grads", "optimizer", "activations", "temporaries", "peak", "flops",
              "seconds"):
        assert fake[k] == pytest.approx(real[k], rel=0.10), k
    assert fake["peak"] > fake["params"] + fake["optimizer"] > 0 and fake["activations"] > 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("simulate: peak ") and out[-1].endswith(" tokens per row")


def test_simulated_row_is_the_presets_last_stage_row(capsys):
    """The shapes preset packs its last stage in rows of 168 tokens (max_tokens=[96, 168]); the simulator read
    --max-tokens only and simulated rows of one clip (35 tokens), a fifth of the step training runs."""
    r = train.main(["--stage", "dit", "--preset", "shapes", "--simulate", "1"])
    assert r["row"] == train.PRESETS["shapes"].max_tokens[-1] == 168
    assert train.main(["--stage", "dit", "--preset", "shapes", "--simulate", "1", "--max-tokens", "120"])["row"] == 120


def test_simulated_dit_step_uses_the_vae_given(tmp_path):
    """--simulate --vae DIR: the latent grid is that VAE's (it was the preset's VAE, while the
    checks read --vae's factors): a VAE of spatial factor 8, not the tiny preset's 4, makes a
    9x32x32 clip a 3x4x4 latent."""
    cfg = vae.VAEConfig(channels=(8, 8, 8, 8), layers=1, latent=8, groups=4)
    vae.CausalVAE(cfg).save(str(tmp_path / "v8"))
    r = train.main(["--stage", "dit", "--preset", "tiny", "--simulate", "1", "--frames", "9",
                    "--size", "32x32", "--vae", str(tmp_path / "v8")])
    assert r["row"] == dit.num_tokens(dit.DIT_PRESETS[train.PRESETS["tiny"].dit], 3, 4, 4)


def test_simulated_fsdp_step_equals_two_real_ranks(two_ranks, capsys):
    """FSDP2 on 2 real gloo ranks vs the fake 2-rank process group: the same table."""
    real = sim_row(two_ranks[1]["simulate"])  # the 2-rank launch's --simulate 2 --fsdp --real
    train.main([*SIM, "--simulate", "2", "--fsdp"])
    fake = sim_row(capsys.readouterr().out)
    assert all(fake[k] == pytest.approx(real[k], rel=0.10, abs=0.01) for k in ROLES), (fake, real)


SIM_CP = ["--stage", "vae", "--preset", "tiny", "--frames", "9", "--size", "32x32", "--batch", "1",
          "--simulate", "4", "--cp", "2"]


def test_simulated_cp_vae_step_equals_four_real_ranks(four_ranks, capsys):
    """--stage vae --cp 2 on 4 real gloo ranks (2 context-parallel groups) vs the fake 4-rank
    process group: every rank runs the step in its own group (ranks 2 and 3 were given the
    group of ranks 0 and 1 and failed), and rank 0 prints the fake table."""
    real = sim_row(four_ranks[1]["simulate"])  # the 4-rank launch's SIM_CP --real
    train.main(SIM_CP)
    fake = sim_row(capsys.readouterr().out)
    assert all(fake[k] == pytest.approx(real[k], rel=0.10, abs=0.01) for k in ROLES), (fake, real)


def test_simulated_shards_are_the_analytic_bytes():
    """FSDP2 on 4 fake ranks, fp32 AdamW: parameter, gradient and optimizer bytes per rank are the
    parameters' bytes / 4 (each parameter's dim 0 padded to a multiple of 4, as FSDP2 shards)."""
    r = train.main(["--stage", "dit", "--preset", "tiny", "--simulate", "4", "--fsdp", "--fp32",
                    "--frames", "9", "--size", "32x32"])
    with torch.device("meta"):
        model = dit.ExpertDiT(dit.DIT_PRESETS["tiny"])
    shard = sum(-(-p.shape[0] // 4) * p[0].numel() * 4 for p in model.parameters())
    n = len(list(model.parameters()))
    assert r["params"] == shard and r["grads_total"] == shard
    assert r["optimizer"] == 2 * shard + 4 * n  # exp_avg, exp_avg_sq, and a 4-byte step each
    # --ema (the full presets keep one: 0.9999): training's float32 copy of the weights, sharded
    # as they are, counted with the optimizer (it was left out: the 5B on 8 ranks, 2.6 GiB a rank)
    e = train.main(["--stage", "dit", "--preset", "tiny", "--simulate", "4", "--fsdp", "--fp32",
                    "--frames", "9", "--size", "32x32", "--ema", "0.999"])
    assert e["optimizer"] == r["optimizer"] + shard and e["peak"] >= r["peak"] + shard
    assert e["params"] == r["params"] and e["activations"] == r["activations"]


def test_simulated_activations_grow_linearly_with_the_row():
    """Frame Pack rows without an M x M tensor: a row of 2 clips costs at most 2.2x the
    activation memory (everything above parameters, gradients and optimizer state) of a row of 1
    (the dense mask would make it ~4x at real sizes; here the clips are 2,316 tokens)."""
    args = ["--stage", "dit", "--preset", "tiny", "--simulate", "1", "--frames", "33",
            "--size", "128x128", "--rows", "1", "--grad-checkpoint", "--fp32"]
    one = train.main(args + ["--max-tokens", "2316"])
    two = train.main(args + ["--max-tokens", "4632"])
    act = lambda r: r["working"]  # the step's own peak: activations + temporaries
    assert two["tokens"] == 2 * one["tokens"]
    assert act(two) <= 2.2 * act(one), (act(one), act(two))


def test_simulated_mlp_chunks_lower_the_working_peak():
    """--mlp-chunks 4: each block's MLP backward one token slice at a time; the simulated step's
    working memory (all but parameters, gradients and optimizer state) falls."""
    args = ["--stage", "dit", "--preset", "tiny", "--simulate", "1", "--frames", "33", "--size",
            "128x128", "--grad-checkpoint", "--fp32"]
    one, four = train.main(args), train.main(args + ["--mlp-chunks", "4"])
    assert four["working"] < 0.9 * one["working"], (one["working"], four["working"])


# ----- sequence parallel (--sp): 4 ranks = 2 data-parallel groups x 2 ranks sharing each row -----

ODD = ["--size", "24x24", "--frames", "1,5,9", "--steps", "2,1"]  # 21, 30 and 39 tokens per sample


@pytest.fixture(scope="module")
def one_process_odd(assets, tmp_path_factory):
    """The reference for the --sp runs: one process, 2 rows per step (the 4-rank runs' global batch: 2 data-parallel
    ranks x 1 row), at 24x24 pixels, where samples are 21 or 39 tokens (not a multiple of 2)."""
    out = tmp_path_factory.mktemp("one_odd")
    return train.main(dit_args(assets, out, *ODD, "--rows", "2")), out


SP = {"ddp": [], "fsdp-checkpointing": ["--fsdp", "--grad-checkpoint"]}


@pytest.fixture(scope="module")
def four_ranks(assets, tmp_path_factory, torchrun):
    """ONE torchrun launch on 4 ranks for the module's 4-rank runs: --sp 2 with each of SP's
    settings (into <root>/<name>), then the VAE's --simulate 4 --cp 2 --real step;
    -> (root, {run: its stdout})."""
    root = tmp_path_factory.mktemp("four_ranks")
    runs = {**{name: dit_args(assets, root / name, *ODD, "--rows", "1", "--sp", "2", *extra)
               for name, extra in SP.items()},
            "simulate": [*SIM_CP, "--real"]}
    p = torchrun(WORKER, *launch_args(*runs.values()), nproc=4, timeout=900)
    return root, dict(zip(runs, split_runs(p.stdout, len(runs))))


@pytest.mark.parametrize("mode", SP)
def test_sp_dp2_x_sp2_equals_one_process(four_ranks, one_process_odd, mode):
    """--sp 2 on 4 ranks, DDP or FSDP2 (+ activation checkpointing): each row's tokens split over 2 ranks, 2
    data-parallel groups; the same losses and weights as one process running the combined batch, every random
    draw the same (the loss depends on them), each sample counted once in the normalisation."""
    one, ref = one_process_odd
    out = four_ranks[0] / mode  # the 4-rank launch's run: *ODD, --rows 1, --sp 2, *SP[mode]
    assert f"world 4 (sp 2) {'fsdp' if SP[mode] else 'ddp'}" in four_ranks[1][mode]
    assert [r["loss"] for r in log(out)] == pytest.approx(one["losses"], rel=1e-5, abs=1e-7)
    a, b = weights(ref / "dit"), weights(out / "dit")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)
    assert [r["tok_s"] * r["ms"] for r in log(out)] == pytest.approx([r["tok_s"] * r["ms"] for r in log(ref)])


def test_simulated_ddp_holds_its_gradient_buckets_through_the_step():
    """DDP's gradients are views into its buckets, which zero_grad(set_to_none=True) keeps: a
    simulated DDP rank holds the full gradients at its peak (in the forward), one process none."""
    args = ["--stage", "dit", "--preset", "tiny", "--fp32", "--frames", "17", "--size", "64x64"]
    one, two = (train.main([*args, "--simulate", n]) for n in ("1", "2"))
    assert one["grads"] == 0 and two["grads"] == two["grads_total"] == one["grads_total"] > 0
    assert two["peak"] == pytest.approx(one["peak"] + two["grads_total"], rel=1e-4)


def sim_sp(sp, *extra):
    return train.main(["--stage", "dit", "--preset", "tiny", "--simulate", "4", "--sp", str(sp),
                       "--frames", "17", "--size", "128x128", "--rows", "1", "--grad-checkpoint",
                       "--fp32", *extra])


def test_simulated_sequence_parallel_divides_the_activations():
    """--sp N in the simulator: each rank holds 1/N of the row's tokens, so the step's working memory
    (activations + temporaries above the weights and optimizer state) falls by about 1/N."""
    one, two, four = sim_sp(1), sim_sp(2), sim_sp(4)
    assert (one["tokens"], two["tokens"], four["tokens"]) == (1292, 646, 323)
    assert two["working"] <= 0.6 * one["working"], (one["working"], two["working"])
    assert four["working"] <= 0.35 * one["working"], (one["working"], four["working"])


@pytest.mark.slow
def test_simulated_5b_largest_stage_fits_with_sp4():
    """The 5B at 81x768x1360 (85,906 tokens), 8 ranks, FSDP, checkpointing, bf16, sp 4: within 80 GB
    per rank (measured 20.08 GiB with the preset's EMA; 17.48 without it, 41.97 without SP and
    EMA). ~1.5 min."""
    r = train.main(["--stage", "dit", "--preset", "cogvideox-5b", "--simulate", "8", "--fsdp",
                    "--grad-checkpoint", "--frames", "81", "--size", "768x1360", "--sp", "4"])
    assert r["peak"] <= 80e9 and r["tokens"] == 85906 // 4 + 1, r["peak"] / 2**30


# ----- issue 17: the data path -----

def test_every_stage_checked_before_the_first_step(assets, tmp_path, monkeypatch, capsys):
    """A later stage that cannot run fails before any model is built (exit 2, naming the stage):
    a subset stage without "quality" in the manifest, a stage whose sizes no sample fits, an
    encode that fits no --encode-memory."""
    for phase in ("build_dit", "build_vae"):
        monkeypatch.setattr(train, phase, lambda job: pytest.fail("a model was loaded"))
    tiny = train.PRESETS["tiny"]
    low = data.Stage([(16, 16)], [1, 5, 9])
    cases = [([low, data.Stage([(16, 16)], [1, 9], subset=0.2)], [], "stage 1: Stage.subset "
              "needs a 'quality' score per entry: run `python data.py filter` first"),
             ([low, low], ["--encode-memory", "1e-6"], "stage 0: encoding one"),
             ([low, low], ["--i2v", "--data", "{stills}"], "stage 0: no readable sample")]
    stills = data.write_manifest([e for e in data.read_manifest(assets["manifest"])
                                  if e["frames"] == 1], tmp_path / "stills.jsonl")
    for stages, extra, words in cases:
        monkeypatch.setitem(train.PRESETS, "tiny", train.replace(tiny, dit_stages=stages))
        argv = dit_args(assets, tmp_path / "run", "--steps", "1", "--max-tokens", "64",
                        *[v.format(stills=stills) for v in extra])
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and words in err[-1], err


def test_a_manifest_without_metadata_is_probed_once_in_parallel(assets, tmp_path, monkeypatch,
                                                                capsys):
    """Training on a manifest without data.META probes every entry once (a pool of threads
    per rank), says so, and plans every stage from that (no probe per stage)."""
    bare = data.write_manifest([{"path": e["path"], "caption": e["caption"]}
                                for e in data.read_manifest(assets["manifest"])],
                               tmp_path / "bare.jsonl")
    calls = []
    real = data.probe_entries
    monkeypatch.setattr(data, "probe_entries", lambda es, w, **k: calls.append((len(es), w))
                        or real(es, w, **k))
    # planning's probes run in the main thread; the probing pool's in its worker threads
    import threading
    planning, probe = [], data.probe
    monkeypatch.setattr(data, "probe", lambda p: (threading.current_thread() is threading.main_thread()
                                                  and planning.append(p)) or probe(p))
    monkeypatch.setattr(train, "build_dit", lambda job: (_ for _ in ()).throw(
        train.SettingsError("stop here")))
    with pytest.raises(SystemExit):
        train.main(dit_args(assets, tmp_path / "run", *SMALL, "--steps", "1,1",
                            "--data", bare))
    out = capsys.readouterr().out
    assert calls == [(8, os.cpu_count() or 1)] and planning == []
    assert "8 of 8 entries lack height, width, frames, fps, duration: probing them once" in out
    assert "thread(s) per rank" in out  # probe_entries' pool is of threads


def test_simulated_vae_encode_of_the_largest_clip_fits_12_gib():
    """The DiT data path's encode (`--stage vae --simulate 1 --encode`): the released VAE on one
    49x480x720 clip in bf16, in the mode data.LatentEncoder picks for 12 GiB (streamed), peaks
    within 12 GiB on fake tensors, and within the plan's estimate."""
    r = train.main(["--stage", "vae", "--preset", "cogvideox-5b", "--simulate", "1", "--encode",
                    "--frames", "49", "--size", "480x720"])
    assert r["peak"] <= 12 * 2**30 and r["flops"] > 1e14
    cfg = vae.VAE_PRESETS["cogvideox-5b"]
    plan = data.encode_plan(cfg, (49, 480, 720), 12 * 2**30, itemsize=2)
    one = data.encode_bytes(cfg, (49, 480, 720), plan, 2)
    assert plan.batch == 1 and r["peak"] - r["params"] <= one, (r["peak"] / 2**30, one / 2**30)


def test_simulated_offloaded_step_runs_on_real_tensors():
    """--offload-activations under --simulate 1 --real: the simulator's host (meta) keeps no data,
    so the recompute once copied from it and crashed ("Cannot copy out of meta tensor"); it now
    recomputes on a tensor of the shape, and fake and real tensors give the same table."""
    args = [*SIM, "--offload-activations", "--simulate", "1"]
    fake, real = train.main(args), train.main([*args, "--real"])
    for k in ROLES + ("flops",):
        assert fake[k] == pytest.approx(real[k], rel=0.10), k


def test_simulated_accum_runs_every_micro_batch():
    """--accum 2: the step runs two micro-batches, the second forward with the first's gradients
    held (the simulator once ran one and ignored --accum): twice the FLOPs and tokens, and the
    peak grows by the gradients."""
    args = ["--stage", "dit", "--preset", "tiny", "--fp32", "--frames", "17", "--size", "64x64",
            "--simulate", "1"]
    one, two = train.main(args), train.main([*args, "--accum", "2"])
    assert two["flops"] == pytest.approx(2 * one["flops"], rel=1e-3)
    assert two["tokens"] == 2 * one["tokens"]
    assert one["grads"] == 0 and two["grads"] == two["grads_total"] > 0
    assert two["peak"] == pytest.approx(one["peak"] + two["grads_total"], rel=1e-4)


def test_simulated_vae_accum_runs_every_micro_batch():
    """--stage vae --accum 2 (as the DiT's, above): it simulated one micro-batch."""
    args = ["--stage", "vae", "--preset", "tiny", "--fp32", "--frames", "9", "--size", "32x32",
            "--simulate", "1"]
    one, two = train.main(args), train.main([*args, "--accum", "2"])
    assert two["tokens"] == 2 * one["tokens"]
    # the generator's forward and backward twice, the discriminator's step once
    assert 1.7 * one["flops"] < two["flops"] < 2 * one["flops"]
    assert two["grads"] == two["grads_total"] > one["grads"]  # held through the second forward
    assert two["peak"] == one["peak"] + two["grads_total"] - one["grads"]
