"""train.py's loss weighting and unreadable data: micro-batches and ranks weighted by the tokens they really
read (--accum == one big batch, in one process, DDP and FSDP), unreadable files renormalised away, a batch with
nothing readable skipped (no update, no LR step), a rank with nothing readable still in step (no hang), truncated
clips counted as bad files.

CPU, tiny presets at 16x16 pixels; torchrun tests with gloo on 2 ranks. Patches: tests/_loss_worker.py.
Run: python -m pytest -q tests/test_loss.py"""
import json
import math
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import _loss_worker
import data
import dit
import train
import vae

WORKER = os.path.join(os.path.dirname(__file__), "_loss_worker.py")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Shapes clips and stills, a random tiny VAE with a sharp posterior, a tiny T5, a shared latent cache."""
    root = tmp_path_factory.mktemp("loss")
    manifest = data.make_shapes(str(root / "data"), 8, seed=0, frames=(9,), image_every=4)
    torch.manual_seed(0)
    ae = vae.CausalVAE(vae.VAE_PRESETS["tiny"])
    with torch.no_grad():
        ae.encoder.conv_out.bias[ae.cfg.latent:] = -12.0
    ae.save(str(root / "vae"))
    caps = [e["caption"] for e in data.read_manifest(manifest)]
    dit.build_tiny_t5(str(root / "t5"), caps, d_model=dit.DIT_PRESETS["tiny"].text_dim)
    return {"root": root, "manifest": manifest, "vae": str(root / "vae"), "t5": str(root / "t5"),
            "cache": str(root / "cache")}


SMALL = ["--size", "16x16", "--frames", "1,5,9"]


def dit_args(a, out, manifest=None, *extra):
    return ["--stage", "dit", "--preset", "tiny", "--data", manifest or a["manifest"], "--vae", a["vae"],
            "--text-encoder", a["t5"], "--cache", a["cache"], "--out", str(out), *SMALL, *extra]


def vae_args(manifest, out, *extra):
    return ["--stage", "vae", "--preset", "tiny", "--data", manifest, "--out", str(out), *SMALL, *extra]


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def ckpt_weights(out, step, part="dit"):
    return load_file(os.path.join(out, "ckpt", f"step_{step:07d}", part, "model.safetensors"))


def same(a, b, atol=2e-5):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.allclose(a[k], b[k], atol=atol)]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[0]}: {(a[bad[0]] - b[bad[0]]).abs().max()}"


def with_unreadable(tmp_path, entries, n_bad, name="m.jsonl"):
    """entries + n_bad copies of entries[0] whose files are empty: planned from the manifest's fields (the
    sampler counts them in), unreadable when training reaches them."""
    out = list(entries)
    for k in range(n_bad):
        bad = tmp_path / f"broken{k}.mkv"
        bad.write_bytes(b"")
        out.append(dict(entries[0], path=str(bad)))
    data.write_manifest(out, str(tmp_path / name))
    return str(tmp_path / name)


# ----- issue 18.3: --accum weighs micro-batches by their tokens -----

# Frame Pack rows of 32 tokens: a clip (12 text + 12 video tokens) or two stills (12 + 4 each). The sampler's
# global batches then hold 24, 24 | 20, 12 | 20, 24 | ... video tokens: micro-batches of unequal weight.
ACC = ["--steps", "3,1", "--max-tokens", "32"]


@pytest.fixture(scope="module")
def big_batch(assets, tmp_path_factory):
    """The reference: one process, each step ONE batch holding the samples of two consecutive sampler batches
    of 2 rows (patched draws: a sample's loss depends on its content only)."""
    out = tmp_path_factory.mktemp("big")
    mp = pytest.MonkeyPatch()
    try:
        _loss_worker.apply("same_draws,merged", mp.setattr)
        res = train.main(dit_args(assets, out, None, *ACC, "--rows", "2"))
    finally:
        mp.undo()
    return res["losses"], out


def test_accum_equals_one_big_batch_one_process(assets, tmp_path, monkeypatch, big_batch):
    """--accum 2: the step's two micro-batches hold different token counts (clips of 12 video tokens, stills of
    4); weighted by tokens over the whole step, the losses and weights equal one batch of all the samples."""
    ref, ref_out = big_batch
    _loss_worker.apply("same_draws", monkeypatch.setattr)
    res = train.main(dit_args(assets, tmp_path, None, *ACC, "--rows", "2", "--accum", "2"))
    assert res["losses"] == pytest.approx(ref, rel=1e-5, abs=1e-7)
    same(ckpt_weights(ref_out, 4), ckpt_weights(tmp_path, 4))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_accum_equals_one_big_batch_two_ranks(assets, tmp_path, torchrun, big_batch, mode):
    """2 ranks x 1 row x --accum 2 == one process, one batch of the same samples: losses and weights."""
    ref, ref_out = big_batch
    extra = ["--fsdp"] if mode == "fsdp" else []
    p = torchrun(WORKER, "same_draws", "--",
                 *dit_args(assets, tmp_path, None, *ACC, "--rows", "1", "--accum", "2", *extra))
    assert f"world 2 {mode}" in p.stdout
    assert [r["loss"] for r in log(tmp_path)] == pytest.approx(ref, rel=1e-5, abs=1e-7)
    same(ckpt_weights(ref_out, 4), ckpt_weights(tmp_path, 4))
