"""train.py's loss weighting and unreadable data: micro-batches and ranks weighted by the tokens they really
read (--accum == one big batch, in one process, DDP and FSDP), unreadable files renormalised away, a batch with
nothing readable skipped (no update, no LR step), a rank with nothing readable still in step (no hang), a file
one rank of an --sp / --cp group cannot read dropped by the whole group, truncated clips counted as bad files.

CPU, tiny presets at 16x16 pixels; torchrun tests with gloo on 2 ranks. Patches: tests/_loss_worker.py.
Run: python -m pytest -q tests/test_loss.py"""
import json
import os

import pytest
import torch

import _loss_worker
import data
import dit
import train
import vae
from _train_runs_worker import launch_args, split_runs

WORKER = os.path.join(os.path.dirname(__file__), "_train_runs_worker.py")


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
    sd = train.read_checkpoint(os.path.join(out, "ckpt", f"step_{step:07d}"))
    return {k[len(part) + 1:]: v for k, v in sd.items() if k.startswith(part + ".")}


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


ACCUM = {"ddp": [], "fsdp": ["--fsdp"]}


@pytest.mark.parametrize("mode", ACCUM)
def test_accum_equals_one_big_batch_two_ranks(two_ranks, big_batch, mode):
    """2 ranks x 1 row x --accum 2 == one process, one batch of the same samples: losses and weights."""
    ref, ref_out = big_batch
    root, out = two_ranks  # the launch's run: *ACC, --rows 1, --accum 2, *ACCUM[mode]
    assert f"world 2 {mode}" in out[f"accum {mode}"]
    two = root / f"accum-{mode}"
    assert [r["loss"] for r in log(two)] == pytest.approx(ref, rel=1e-5, abs=1e-7)
    same(ckpt_weights(ref_out, 4), ckpt_weights(two, 4))


# ----- issue 20.5 / 20.1: unreadable files neither shrink the loss nor stop the run -----

def opt_steps(out, step, part):
    sd = train.read_checkpoint(os.path.join(out, "ckpt", f"step_{step:07d}"), "optim")
    return {int(v) for k, v in sd.items() if k.startswith(part + ".") and k.endswith(".step")}


@pytest.mark.parametrize("stage", ["dit", "vae"])
def test_unreadable_files_change_nothing_but_the_count(assets, tmp_path, monkeypatch, capsys, stage):
    """One clip 4 times, clean, vs the same 4 plus 4 unreadable copies (patched draws: every readable sample
    has the same loss and gradient). Renormalised over what was read, every step equals the clean run's: loss,
    LR, weights. A batch with nothing readable is no step: skipped and logged as such (never as a loss), no
    optimizer update, no LR step; the optimizer counts exactly the run's steps."""
    _loss_worker.apply("same_draws", monkeypatch.setattr)
    e = data.read_manifest(assets["manifest"])[0]  # a 9-frame clip
    data.write_manifest([e] * 4, str(tmp_path / "clean.jsonl"))
    dirty = with_unreadable(tmp_path, [e] * 4, 4)
    if stage == "dit":  # global batches of 2 rows of one clip each
        total, args = 6, lambda m, out: dit_args(assets, out, m, "--steps", "4,2", "--rows", "2",
                                                 "--max-tokens", "24")
    else:  # global batches of 2 clips (the GAN term starts at step 2); --augment fixed: the same
        # crop of the one clip in every slot (a random crop is drawn per sample index)
        total, args = 4, lambda m, out: vae_args(m, out, "--steps", "4", "--batch", "2",
                                                 "--augment", "fixed")
    clean = train.main(args(str(tmp_path / "clean.jsonl"), tmp_path / "clean"))
    res = train.main(args(dirty, tmp_path / "dirty"))
    assert res["step"] == total and res["losses"] == pytest.approx(clean["losses"], rel=1e-5, abs=1e-7)
    recs = log(tmp_path / "dirty")
    trained, skipped = [r for r in recs if "loss" in r], [r for r in recs if "skipped" in r]
    assert len(trained) == total and skipped and all(r["loss"] > 0.01 for r in trained)
    assert [r["lr"] for r in trained] == [r["lr"] for r in log(tmp_path / "clean")]
    before = [0] + [r["bad_files"] for r in recs]
    assert any(r["bad_files"] > b for r, b in zip(recs, before) if "loss" in r)  # a step read only some
    assert "no readable sample on any rank" in capsys.readouterr().err
    same(ckpt_weights(tmp_path / "clean", total, stage), ckpt_weights(tmp_path / "dirty", total, stage))
    assert opt_steps(tmp_path / "dirty", total, stage) == {total}


def truncated_clip(tmp_path, frames=9):
    """A clip whose header promises `frames` frames but whose data ends after a few (cut in half)."""
    path = tmp_path / "cut.mkv"
    data.write_video(torch.rand(3, frames, 16, 16) * 2 - 1, str(path), fps=8)
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    return str(path)


def test_vae_batch_1_with_unreadable_and_truncated_files_resumes_exactly(assets, tmp_path, capsys):
    """--batch 1 (the 2B preset's VAE batch): an unreadable file used to be fatal, and --resume met it again.
    Now it is a skipped batch; a truncated clip is one more bad file; stop + --resume == uninterrupted."""
    entries = data.read_manifest(assets["manifest"])[:3]
    dirty = with_unreadable(tmp_path, entries + [{"path": truncated_clip(tmp_path), "caption": "cut"}], 2)
    common = ["--steps", "6", "--batch", "1"]
    full = train.main(vae_args(dirty, tmp_path / "full", *common))
    # stopped after the discriminator's first step (disc_start 2): a checkpoint written before it gives the
    # discriminator's empty AdamW a state (torch's get_optimizer_state_dict), which changes later steps
    part = train.main(vae_args(dirty, tmp_path / "part", *common, "--stop-at", "3"))
    rest = train.main(vae_args(dirty, tmp_path / "part", *common, "--resume"))
    assert part["losses"] + rest["losses"] == full["losses"]
    same(ckpt_weights(tmp_path / "full", 6, "vae"), ckpt_weights(tmp_path / "part", 6, "vae"), atol=0)
    recs = log(tmp_path / "full")
    assert recs[-1]["bad_files"] >= 3 and [r["step"] for r in recs if "skipped" in r][-1] >= 3
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert "truncated: " in capsys.readouterr().err


# ----- issue 13 §2, 20.1: a rank with nothing readable keeps every collective in step -----

@pytest.fixture(scope="module")
def one_clip(assets, tmp_path_factory):
    """A manifest of one 9-frame clip 4 times, and one process training on it with 2 rows x --accum 2 (patched
    draws: every sample has the same loss and gradient, so any subset read gives the same step)."""
    root = tmp_path_factory.mktemp("one_clip")
    data.write_manifest([data.read_manifest(assets["manifest"])[0]] * 4, str(root / "m.jsonl"))
    mp = pytest.MonkeyPatch()
    try:
        _loss_worker.apply("same_draws", mp.setattr)
        res = train.main(dit_args(assets, root / "run", str(root / "m.jsonl"), *DEAF, "--rows", "2"))
    finally:
        mp.undo()
    return str(root / "m.jsonl"), res["losses"], root / "run"


DEAF = ["--steps", "2,1", "--accum", "2"]
# the deaf-rank runs: mode -> (patches, train.py arguments)
DEAF_DIT = {"ddp": ("deaf:1:1", ["--rows", "1"]),
            "fsdp": ("deaf:1:1", ["--rows", "1", "--fsdp"]),
            "sp": ("deaf:2:3", ["--rows", "2", "--sp", "2"])}
DEAF_VAE = {"ddp": ("deaf:0:1", ["--batch", "1"]),
            "cp": ("deaf:2:3", ["--batch", "2", "--cp", "2"])}


def vae_case(assets, mode, folder):
    """The deaf-rank VAE runs' manifest and arguments (cp: a manifest of the clips, written into
    folder)."""
    if mode != "cp":
        return assets["manifest"], ["--steps", "4"]
    # clips only: a CP group leaves stills out, one process would not
    manifest = str(folder / "clips.jsonl")
    clips = [e for e in data.read_manifest(assets["manifest"]) if e["frames"] > 1]
    data.write_manifest(clips, manifest)
    return manifest, ["--steps", "2", "--frames", "9"]


@pytest.fixture(scope="module")
def two_ranks(assets, one_clip, tmp_path_factory, torchrun):
    """ONE torchrun launch on 2 ranks for the module's 2-rank runs (the launch costs more than
    these runs), each with its patches (tests/_loss_worker.py) and into its own folder under the
    returned root: the --accum runs (accum-<mode>, ACCUM), the deaf-rank DiT runs on one_clip's
    manifest (deaf-<mode>, DEAF_DIT) and VAE runs (vae-<mode>/two, DEAF_VAE);
    -> (root, {run: its stdout})."""
    root = tmp_path_factory.mktemp("two_ranks")
    runs = {f"accum {m}": ("same_draws", dit_args(assets, root / f"accum-{m}", None, *ACC, "--rows",
                                                  "1", "--accum", "2", *extra))
            for m, extra in ACCUM.items()}
    for m, (deaf, extra) in DEAF_DIT.items():
        runs[f"deaf {m}"] = ("same_draws," + deaf,
                             dit_args(assets, root / f"deaf-{m}", one_clip[0], *DEAF, *extra))
    for m, (deaf, extra) in DEAF_VAE.items():
        (root / f"vae-{m}").mkdir()
        manifest, common = vae_case(assets, m, root / f"vae-{m}")
        runs[f"vae {m}"] = (deaf, vae_args(manifest, root / f"vae-{m}" / "two", *common, *extra))
    p = torchrun(WORKER, *launch_args(*runs.values()), timeout=900)
    return root, dict(zip(runs, split_runs(p.stdout, len(runs))))


@pytest.mark.parametrize("mode", DEAF_DIT)
def test_a_rank_with_nothing_readable_stays_in_step(two_ranks, one_clip, mode):
    """Rank 1's files are all unreadable (each of its micro-batches, --accum 2). It runs a zero-weight dummy
    sample through the wrapped model, so no DDP / FSDP collective waits for it (before: FSDP failed with "mixed
    torch.Tensor and DTensor" / hung), and the ranks agree on N: the loss is rank 0's alone, not halved (before,
    under DDP). Every sample is the same clip here, so the run equals one process reading them all.
    sp: one --sp 2 group, both ranks holding both rows; rank 1 alone fails on row 1 (deaf:2:3), which rank 0
    reads. The group drops it on both ranks (before: their rows differed and gloo failed with "collective
    mismatch"), and the bad file is counted once, not 1/2."""
    manifest, ref, ref_out = one_clip
    out = two_ranks[0] / f"deaf-{mode}"  # the launch's run of DEAF_DIT[mode] on manifest
    recs = log(out)
    assert [r["loss"] for r in recs] == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert recs[-1]["bad_files"] == 6  # one sample of every micro-batch
    same(ckpt_weights(ref_out, 3), ckpt_weights(out, 3))


@pytest.mark.parametrize("mode", DEAF_VAE)
def test_vae_rank_with_nothing_readable_stays_in_step(assets, tmp_path, two_ranks, monkeypatch,
                                                      mode):
    """The VAE under DDP, rank 1 reading nothing: a dummy clip keeps the VAE's and the discriminator's DDP in
    step (the GAN step gives it weight 0). Before: "stack expects a non-empty TensorList" on rank 1. Equals one
    process with the same files unreadable, the discriminator steps included.
    cp: one --cp 2 group on 9-frame clips, both ranks holding both clips of a batch; rank 1 alone fails on the
    second (deaf:2:3). The group drops it on both ranks (before: their time splits differed and gloo failed
    with "collective mismatch"), counted as one bad file. 2 steps: the GAN's weight differs under CP by
    design."""
    manifest, common = vae_case(assets, mode, tmp_path)
    with monkeypatch.context() as mp:
        _loss_worker.apply("deaf:0:1", mp.setattr)  # one process, batch 2: the second sample unreadable
        one = train.main(vae_args(manifest, tmp_path / "one", *common, "--batch", "2"))
    two = two_ranks[0] / f"vae-{mode}" / "two"  # the launch's run of DEAF_VAE[mode], the same data
    recs, steps = log(two), len(one["losses"])
    assert [r["loss"] for r in recs] == pytest.approx(one["losses"], rel=1e-5, abs=1e-7)
    assert recs[-1]["bad_files"] == log(tmp_path / "one")[-1]["bad_files"] == steps  # one a step
    same(ckpt_weights(tmp_path / "one", steps, "vae"), ckpt_weights(two, steps, "vae"))
    if mode == "ddp":
        assert "disc" in recs[-1] and recs[-1]["disc"] == pytest.approx(log(tmp_path / "one")[-1]["disc"],
                                                                        rel=1e-5)
        same(ckpt_weights(tmp_path / "one", 4, "disc"), ckpt_weights(two, 4, "disc"))


def test_nothing_readable_at_all_stops_with_exit_code_2(assets, tmp_path, capsys):
    """Files planned from the manifest that all fail when read: after a whole epoch of batches with nothing
    readable the run stops with one line and exit code 2 (before: "stack expects a non-empty TensorList")."""
    entries = data.read_manifest(assets["manifest"])[:1]
    manifest = with_unreadable(tmp_path, entries, 3)
    data.write_manifest(data.read_manifest(manifest)[1:], manifest)  # only the 3 unreadable copies
    with pytest.raises(SystemExit) as e:
        train.main(vae_args(manifest, tmp_path / "run", "--steps", "2", "--batch", "1"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "a whole epoch without one readable sample" in err.splitlines()[-1]
    assert err.count("no readable sample on any rank") == 4  # the first batch + one epoch of 3
    assert not any("loss" in r for r in log(tmp_path / "run"))
