"""LoRA (issue 16): the layer (dit.LoRALinear), the file format both ways with diffusers and PEFT
(test-only oracles: our export loads into CogVideoXPipeline.load_lora_weights, files saved by
diffusers / PEFT load into ours, with the same transformer outputs and the same sampled latents),
sample.py --lora, train.py --lora (only the adapters train; one process, DDP, FSDP with offloaded
checkpointing, resume, I2V, a released folder via --init-diffusers), the step simulator's figure,
and (slow) the demo-scale fine-tune that changes what the demo DiT samples.

    python -m pytest -q tests/test_lora.py            # -m slow: the 5B simulation, the demo
"""
import copy
import json
import math
import os
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import data
import dit
import sample
import train
import vae
from dit import ExpertDiT
from _train_runs_worker import launch_args, split_runs
from test_dit import (diffusers_15, diffusers_model, inputs, randomize, run_diffusers,
                      run_diffusers_15, small)
from test_sample import PROMPTS, released  # noqa: F401  (a fixture: the released layout)
from test_train import (PAR, SMALL, assets, ckpt_tensors, dit_args,  # noqa: F401  (a fixture)
                        log)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear",
           "norm2.linear", "proj_out", "patch_embed.proj", "text_proj", "linear_1", "linear_2",
           "norm_out.linear"]  # every Linear of the diffusers transformer, and the patch Conv2d


def fill(params, seed=1, std=0.1):
    """Non-zero adapters (B starts at zero, which would hide every mistake)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def lora_params(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


# ----- the layer -----

def test_layer_starts_as_the_base_and_computes_w_plus_scaled_ba():
    """PEFT's init (B = 0): the adapted Linear is the base Linear at step 0. Then y = W x + b +
    (alpha / r) [B_q A_q x; B_k A_k x; B_v A_v x] for the fused qkv, and merging gives the same."""
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 12)
    m = dit.LoRALinear(base, rank=2, alpha=5, parts=3)
    x = torch.randn(4, 8)
    assert m.weight is base.weight and m.lora_A.shape == (6, 8) and m.lora_B.shape == (12, 2)
    assert torch.equal(m(x), base(x))
    bound = 1 / math.sqrt(8)  # Kaiming-uniform with a = √5 on each A_p (r, in): fan_in = in
    assert 0.5 * bound < m.lora_A.abs().max() <= bound
    fill([m.lora_B])
    A, B = m.lora_A.chunk(3), m.lora_B.chunk(3)
    want = base(x) + 2.5 * torch.cat([x @ a.T @ b.T for a, b in zip(A, B)], -1)
    torch.testing.assert_close(m(x), want)
    torch.testing.assert_close(m.delta(), 2.5 * torch.block_diag(*B) @ torch.cat(A))


def test_add_lora_freezes_the_base_and_merge_is_the_same_function():
    m = randomize(ExpertDiT(small()))
    x, t, text = inputs(m.cfg)
    with torch.no_grad():
        ref = m(x, t, text)
    params = dit.add_lora(m, 4, 8, "attn+mlp")
    assert {n.split(".")[-1] for n, p in m.named_parameters() if p.requires_grad} == {"lora_A",
                                                                                      "lora_B"}
    assert len(params) == 2 * 4 * m.cfg.layers and set(dit.lora_modules(m)) == {
        f"blocks.{i}.{n}" for i in range(2) for n in ("qkv", "proj", "fc1", "fc2")}
    with torch.no_grad():
        assert torch.equal(m(x, t, text), ref)  # B = 0: the base model exactly
        fill(params)
        adapted = m(x, t, text)
        dit.merge_lora(m)
        merged = m(x, t, text)
    assert not dit.lora_modules(m) and (adapted - ref).abs().max() > 0.1
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_offloaded_checkpointing_trains_the_adapters_over_a_frozen_base():
    """Over a frozen base no block input requires grad: plain, checkpointed and offloaded-
    checkpointed blocks must still give the adapters the same (non-zero) gradients."""
    m = randomize(ExpertDiT(small()))
    params = dit.add_lora(m, 4, 4, "attn")
    fill(params)
    x, t, text = inputs(m.cfg)
    grads = []
    for ck, off in ((False, False), (True, False), (True, True)):
        m.zero_grad()
        m.checkpointing, m.offload = ck, off
        m(x, t, text).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), (ck, off)
        grads.append([p.grad.clone() for p in params])
    for g in grads[1:]:
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0], g))


# ----- the file format, both ways -----

def test_our_file_loads_into_cogvideox_pipeline_with_the_same_output(tmp_path):
    """Ours (rank 4, alpha 12: scale 3, carried in the header) -> CogVideoXPipeline.
    load_lora_weights: the pipeline's transformer gives our output, at the native grid and
    another size; the keys are diffusers' module names, one adapter per q / k / v."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline
    ref = diffusers_model()
    ref.save_pretrained(tmp_path / "model" / "transformer")
    ours = ExpertDiT.from_diffusers(tmp_path / "model").eval()
    fill(dit.add_lora(ours, 4, 12, "attn+mlp"))
    path = dit.save_lora(ours, tmp_path / "out")
    assert path.name == "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert "transformer.transformer_blocks.1.attn1.to_k.lora_A.weight" in keys and len(keys) == 24
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 12
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=ref,
                             scheduler=CogVideoXDDIMScheduler())
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert pipe.transformer.peft_config["default_0"].lora_alpha == 12
    for T, h, w in ((3, 6, 8), (2, 10, 6)):
        x, t, text = inputs(ours.cfg, B=2, T=T, h=h, w=w, L=5, seed=T)
        a = run_diffusers(pipe.transformer, x, t, text)
        with torch.no_grad():
            b = ours(x, t, text)
            base = run_diffusers(diffusers_model(), x, t, text)
        assert (a - base).abs().max() > 0.1  # the adapter matters
        assert (a - b).abs().max() <= 1e-4, (a - b).abs().max()


def test_lora_on_a_15_i2v_model_loads_into_the_pipeline_with_the_same_output(tmp_path):
    """CogVideoX 1.5 (temporal patch 2, ofs, odd latent frames padded): our adapters on a tiny
    1.5-I2V DiT -> CogVideoXImageToVideoPipeline.load_lora_weights, the same transformer output."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline
    ref = diffusers_15(i2v=True)
    ref.save_pretrained(tmp_path / "model" / "transformer")
    ours = ExpertDiT.from_diffusers(tmp_path / "model").eval()
    fill(dit.add_lora(ours, 4, 8, "attn+mlp"))
    dit.save_lora(ours, tmp_path / "out")
    pipe = CogVideoXImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=None,
                                         transformer=ref, scheduler=CogVideoXDDIMScheduler())
    pipe.load_lora_weights(str(tmp_path / "out"))
    for T in (4, 3):  # 3: padded to 4 latent frames, as the 1.5 pipelines pad
        x, t, text = inputs(ours.cfg, B=2, T=T, h=6, w=8, L=5, seed=T)
        a = run_diffusers_15(pipe.transformer, x, t, text)
        with torch.no_grad():
            b = ours(x, t, text)
            base = run_diffusers_15(diffusers_15(i2v=True), x, t, text)
        assert (a - base).abs().max() > 0.1  # the adapter matters
        assert (a - b).abs().max() <= 1e-4, (a - b).abs().max()


def test_15_patch_adapter_round_trips_through_our_exporter(tmp_path):
    """CogVideoX 1.5's patch_embed.proj is a Linear (1.0: a Conv2d): a diffusers adapter on it
    loads into ours, and our re-export keeps the Linear's shapes, so diffusers reads it back."""
    from diffusers import CogVideoXPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    base = diffusers_15()
    base.save_pretrained(tmp_path / "model" / "transformer")
    ref = copy.deepcopy(base)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["patch_embed.proj", "to_q"]))
    fill(lora_params(ref))
    CogVideoXPipeline.save_lora_weights(tmp_path / "lora", get_peft_model_state_dict(ref),
                                        transformer_lora_adapter_metadata=ref.peft_config["default"].to_dict())
    ours = ExpertDiT.from_diffusers(tmp_path / "model").eval()
    assert dit.load_lora(ours, tmp_path / "lora") == 2 + 1  # to_q per block, the patch
    x, t, text = inputs(ours.cfg, B=1, T=4, h=6, w=8, L=5)
    with torch.no_grad():
        got = ours(x, t, text)
    assert (run_diffusers_15(ref, x, t, text) - got).abs().max() <= 1e-4
    dit.save_lora(ours, tmp_path / "again")
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None,
                             transformer=copy.deepcopy(base), scheduler=None)
    pipe.load_lora_weights(str(tmp_path / "again"))  # raised a size mismatch: (r, C, p, p)
    assert (run_diffusers_15(pipe.transformer, x, t, text) - got).abs().max() <= 1e-4


def test_fp32_adapters_run_over_a_bf16_base_without_autocast():
    """add_lora's fp32 adapters over a bf16 base: the input is cast in and the update back out
    (as PEFT does), the output stays bf16 and the adapters' gradients float32."""
    torch.manual_seed(0)
    m = ExpertDiT(small()).to(torch.bfloat16)
    fill(dit.add_lora(m, 4))
    x, t, text = inputs(m.cfg, B=1, T=2, h=4, w=4, L=5)
    out = m(x.bfloat16(), t, text.bfloat16())
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_params(m))


@pytest.mark.parametrize("how", ["diffusers+metadata", "diffusers", "peft"])
def test_diffusers_and_peft_files_load_into_ours_with_the_same_output(tmp_path, how):
    """An adapter on every Linear and the patch Conv2d, to_k at rank 2 (rank_pattern: our qkv pads
    it) and ff.net.2 at alpha 3 (alpha_pattern: folded into B), saved three ways: diffusers'
    save_lora_weights with the LoraConfig in the header, the same without it (as diffusers'
    CogVideoX script writes: alpha = r when read back), PEFT's save_pretrained. Ours loads each and
    gives what diffusers gives with that file."""
    from diffusers import CogVideoXPipeline
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    base = diffusers_model()
    base.save_pretrained(tmp_path / "model" / "transformer")
    conf = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"attn1.to_k": 2},
                      alpha_pattern={"ff.net.2": 3})
    x, t, text = inputs(ExpertDiT.from_diffusers(tmp_path / "model").cfg, B=2, T=3, h=6, w=8, L=5)
    if how == "peft":
        pm = get_peft_model(copy.deepcopy(base), conf)
        fill(lora_params(pm))
        want = run_diffusers(pm.base_model.model, x, t, text)
        pm.save_pretrained(str(tmp_path / "lora"))
        assert (tmp_path / "lora" / "adapter_config.json").exists()
    else:
        ref = copy.deepcopy(base)
        ref.add_adapter(conf)
        fill(lora_params(ref))
        meta = ref.peft_config["default"].to_dict() if how == "diffusers+metadata" else None
        CogVideoXPipeline.save_lora_weights(tmp_path / "lora", get_peft_model_state_dict(ref),
                                            transformer_lora_adapter_metadata=meta)
        # what diffusers itself makes of the file (without metadata: alpha = r, scale 1)
        pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None,
                                 transformer=copy.deepcopy(base), scheduler=None)
        pipe.load_lora_weights(str(tmp_path / "lora"))
        want = run_diffusers(pipe.transformer, x, t, text)
        if meta:
            assert torch.allclose(want, run_diffusers(ref, x, t, text), atol=1e-5)
    ours = ExpertDiT.from_diffusers(tmp_path / "model").eval()
    assert dit.load_lora(ours, tmp_path / "lora") == 2 * 8 + 6  # 8 per block, 6 outside
    with torch.no_grad():
        got = ours(x, t, text)
    assert (want - run_diffusers(base, x, t, text)).abs().max() > 0.1
    assert (want - got).abs().max() <= 1e-4, (want - got).abs().max()
    # and back out through our exporter: diffusers reads our re-export as the same adapter
    dit.save_lora(ours, tmp_path / "again")
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None,
                             transformer=copy.deepcopy(base), scheduler=None)
    pipe.load_lora_weights(str(tmp_path / "again"))
    assert (run_diffusers(pipe.transformer, x, t, text) - got).abs().max() <= 1e-4


def test_a_zero_alpha_loads_as_peft_reads_it(tmp_path):
    """lora_alpha 0 for to_q alone (alpha_pattern: that adapter switched off) or for every module:
    PEFT's scale 0, what diffusers gives with the file. The fused qkv took to_q's scale as its own
    and divided the others by it: a ZeroDivisionError traceback."""
    from diffusers import CogVideoXPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    base = diffusers_model()
    base.save_pretrained(tmp_path / "model" / "transformer")
    x, t, text = inputs(ExpertDiT.from_diffusers(tmp_path / "model").cfg, B=1, T=3, h=6, w=8, L=5)
    for name, kw in (("q_off", dict(lora_alpha=8, alpha_pattern={"to_q": 0})),
                     ("all_off", dict(lora_alpha=0))):
        ref = copy.deepcopy(base)
        ref.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], **kw))
        fill(lora_params(ref))
        CogVideoXPipeline.save_lora_weights(
            tmp_path / name, get_peft_model_state_dict(ref),
            transformer_lora_adapter_metadata=ref.peft_config["default"].to_dict())
        ours = ExpertDiT.from_diffusers(tmp_path / "model").eval()
        dit.load_lora(ours, tmp_path / name)
        with torch.no_grad():
            got = ours(x, t, text)
        assert (run_diffusers(ref, x, t, text) - got).abs().max() <= 1e-4, name


def test_sampled_latents_equal_the_pipeline_with_the_lora(released, tmp_path):  # noqa: F811
    """End to end: our sample.py path (load_released + --lora) and CogVideoXPipeline with
    load_lora_weights + set_adapters(scale) draw the same latents from the same seed."""
    from diffusers import CogVideoXPipeline
    net, ae, text, cfg, ac = sample.load_released(str(released))
    fill(dit.add_lora(net, 4, 8, "attn+mlp"), std=0.3)
    dit.save_lora(net, tmp_path)
    net, ae, text, cfg, ac = sample.load_released(str(released))
    sample.apply_lora(net, str(tmp_path), scale=0.7)
    sc = replace(cfg, num_frames=9, height=16, width=16, steps=4, cfg=5.0)
    ours = sample.generate(net, ae, text, PROMPTS[:2], sc, seed=11, ac=ac, progress=False,
                           return_latents=True)  # (B, C, T', h, w)
    pipe = CogVideoXPipeline.from_pretrained(str(released))
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(PROMPTS[:2], num_frames=9, height=16, width=16,  # noqa: E731
                       num_inference_steps=4, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(11),
                       output_type="latent", max_sequence_length=8).frames.permute(0, 2, 1, 3, 4)
    plain = run()
    pipe.load_lora_weights(str(tmp_path), adapter_name="ours")
    pipe.set_adapters(["ours"], [0.7])
    ref = run()
    assert (ref - plain).abs().max() > 0.05
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def test_bad_lora_files_are_one_line(tmp_path):
    m = ExpertDiT(small())
    with pytest.raises(FileNotFoundError, match="no pytorch_lora_weights"):
        dit.load_lora(m, tmp_path)
    (tmp_path / "torn.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        dit.load_lora(m, tmp_path / "torn.safetensors")
    from safetensors.torch import save_file
    save_file({"transformer.transformer_blocks.0.attn1.to_q.weight": torch.zeros(1)},
              str(tmp_path / "full.safetensors"))
    with pytest.raises(ValueError, match="not a PEFT LoRA weight"):
        dit.load_lora(m, tmp_path / "full.safetensors")
    save_file({f"transformer.transformer_blocks.7.attn1.to_q.lora_{ab}.weight": torch.zeros(2, 2)
               for ab in "AB"}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="another model's LoRA"):
        dit.load_lora(m, tmp_path / "other.safetensors")
    save_file({f"transformer.transformer_blocks.0.attn1.to_q.lora_{ab}.weight": torch.zeros(2, 5)
               for ab in "AB"}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match="this model needs"):
        dit.load_lora(m, tmp_path / "shape.safetensors")



def test_lora_config_of_a_wrong_type_is_one_line(tmp_path):
    """The LoraConfig a LoRA file carries (diffusers' header, PEFT's adapter_config.json) torn, no
    object, or with lora_alpha / alpha_pattern / use_rslora of another type: one ValueError naming
    the file (sample.py --lora prints it as one line, exit code 2). Were a bare 'Expecting ...'
    line, and TypeError / AttributeError tracebacks after the DiT had loaded."""
    from safetensors.torch import save_file
    m = ExpertDiT(small())
    tr = {"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, m.cfg.dim),
          "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(m.cfg.dim, 4)}
    bad = ['{"transformer.r": 4,', "3", '["transformer.r"]',
           json.dumps({"transformer.lora_alpha": "8"}), json.dumps({"lora_alpha": None}),
           json.dumps({"transformer.alpha_pattern": ["to_q"]}),
           json.dumps({"transformer.alpha_pattern": {"to_q": "8"}}),
           json.dumps({"transformer.use_rslora": "no"})]
    for i, meta in enumerate(bad):
        f = tmp_path / f"bad{i}.safetensors"
        save_file(tr, str(f), metadata={"format": "pt", "lora_adapter_metadata": meta})
        with pytest.raises(ValueError) as e:
            dit.load_lora(copy.deepcopy(m), f)
        assert str(f) in str(e.value) and "\n" not in str(e.value), (meta, e.value)
    peft = tmp_path / "peft"
    peft.mkdir()
    save_file({k.replace("transformer.", "base_model.model."): v for k, v in tr.items()},
              str(peft / "adapter_model.safetensors"))
    for cfg in ({"lora_alpha": "8", "r": 4}, {"lora_alpha": 8, "alpha_pattern": [1]}):
        (peft / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="adapter_config.json"):
            dit.load_lora(copy.deepcopy(m), peft)
    (peft / "adapter_config.json").write_text(json.dumps({"lora_alpha": 8, "r": 4}))
    assert dit.load_lora(copy.deepcopy(m), peft) == 1  # a good config still loads


def test_text_encoder_adapters_are_refused_and_other_components_headers_ignored(tmp_path):
    """A diffusers-layout file that also adapts the text encoder (text_encoder.* tensors) is one
    line naming them (it was "not modules of this ... transformer (another model's LoRA?)"; the
    transformer's half alone would sample another model than the one trained). A header that
    describes other components only gives the transformer nothing: alpha = r, as a file without a
    header (it read text_encoder's LoraConfig as the transformer's: lora_alpha defaulted to 8)."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    m = ExpertDiT(small())
    A, B = torch.randn(4, m.cfg.dim), torch.randn(m.cfg.dim, 4)
    tr = {"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": A,
          "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": B}
    te = {f"text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_{ab}.weight":
          torch.zeros(4, 4) for ab in "AB"}
    head = {"format": "pt", "lora_adapter_metadata": json.dumps({"text_encoder.r": 4,
                                                                 "text_encoder.lora_alpha": 4})}
    save_file({**tr, **te}, str(tmp_path / "both.safetensors"), metadata=head)
    with pytest.raises(ValueError, match="2 tensors adapt the text encoder") as e:
        dit.load_lora(copy.deepcopy(m), tmp_path / "both.safetensors")
    assert "\n" not in str(e.value)
    save_file(tr, str(tmp_path / "plain.safetensors"))
    save_file(tr, str(tmp_path / "te_head.safetensors"), metadata=head)
    x, t, text = inputs(m.cfg, B=1, T=2, h=4, w=4, L=5)
    outs = []
    for name in ("plain", "te_head"):
        net = copy.deepcopy(m).eval()
        dit.load_lora(net, tmp_path / f"{name}.safetensors")
        assert net.blocks[0].qkv.scale == 1.0
        with torch.no_grad():
            outs.append(net(x, t, text))
    assert torch.equal(*outs)


# ----- sample.py --lora -----

def test_sample_cli_lora_scale_and_merge(tmp_path, capsys):
    """--lora-scale 0 is the base model, --lora-merge the same video as the adapter unmerged;
    a missing file is one line and exit code 2 before any model loads."""
    from test_sample import make_ckpt
    ck = make_ckpt(tmp_path / "ck")
    net, ae, text, cfg = sample.load_ckpt(str(ck))
    fill(dit.add_lora(net, 2, 2, "attn"), std=0.5)
    lora = dit.save_lora(net, tmp_path / "l.safetensors")
    for name, extra in (("zero", ["--lora-scale", "0"]), ("merged", ["--lora-merge"])):
        sample.main(["--ckpt", str(ck), "--prompt", PROMPTS[0], "--out",
                     str(tmp_path / f"{name}.mp4"), "--steps", "3", "--lora", str(lora), *extra])
        assert (tmp_path / f"{name}.mp4").exists()
    out = capsys.readouterr().out
    assert "adapted modules x 0\n" in out and "adapted modules x 1, merged" in out
    # the samples themselves through the library (the .mp4 files are lossy)
    gen = {}
    for name, (scale, merge) in {"zero": (0.0, False), "lora": (1.0, False),
                                 "merged": (1.0, True)}.items():
        net, ae, text, cfg = sample.load_ckpt(str(ck))
        sample.apply_lora(net, str(lora), scale, merge)
        gen[name] = sample.generate(net, ae, text, PROMPTS[:1], replace(cfg, steps=3),
                                    progress=False, return_latents=True)
    net, ae, text, cfg = sample.load_ckpt(str(ck))
    base = sample.generate(net, ae, text, PROMPTS[:1], replace(cfg, steps=3), progress=False,
                           return_latents=True)
    assert torch.equal(gen["zero"], base) and (gen["lora"] - base).abs().max() > 0.05
    torch.testing.assert_close(gen["merged"], gen["lora"], atol=1e-4, rtol=1e-4)
    for bad, words in ((["--lora", str(tmp_path / "missing.safetensors")], "no such file"),
                       (["--lora-scale", "0.5"], "add --lora FILE")):
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", str(ck), "--prompt", "x", "--out", str(tmp_path / "x.mp4"),
                         *bad])
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_sample_cli_lora_line_is_rank_0s(tmp_path, capsys, monkeypatch):
    """Under --sp every rank loads the LoRA, but only rank 0 prints (as the rest of sample.py's
    output): another rank (sp_start, which torchrun's --sp runs go through, saying rank 1) prints
    nothing. Every rank printed its 'LoRA ...: n adapted modules' line."""
    from test_sample import make_ckpt
    ck = make_ckpt(tmp_path / "ck")
    net = sample.load_ckpt(str(ck))[0]
    fill(dit.add_lora(net, 2, 2, "attn"), std=0.5)
    lora = dit.save_lora(net, tmp_path / "l.safetensors")
    monkeypatch.setattr(sample, "sp_start", lambda a: 1)
    sample.main(["--ckpt", str(ck), "--prompt", PROMPTS[0], "--out", str(tmp_path / "o.mp4"),
                 "--steps", "1", "--lora", str(lora)])
    assert capsys.readouterr().out == "" and not (tmp_path / "o.mp4").exists()


def test_sample_cli_checks_the_lora_file_before_any_model_loads(tmp_path, monkeypatch, capsys):
    """A --lora file of another model, with another shape, or torn: one line, exit code 2, from
    the file and the DiT's config.json alone (checked on the meta device). They were named only
    once the DiT, VAE and T5 had loaded (for the 5B and T5-XXL: minutes and tens of GB)."""
    from safetensors.torch import save_file
    from test_sample import make_ckpt
    ck = make_ckpt(tmp_path / "ck")
    D = dit.load_config(ck / "dit").dim
    bad = {"other": ({f"transformer.transformer_blocks.7.attn1.to_q.lora_{ab}.weight":
                      torch.zeros(2, D) if ab == "A" else torch.zeros(D, 2) for ab in "AB"},
                     "another model's LoRA"),
           "shape": ({f"transformer.transformer_blocks.0.attn1.to_q.lora_{ab}.weight":
                      torch.zeros(2, 5) for ab in "AB"}, "this model needs")}
    for name, (tensors, _) in bad.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / "torn.safetensors").write_bytes(b"\x10\x00\x00")
    bad["torn"] = (None, "not a readable safetensors")
    monkeypatch.setattr(sample, "load_ckpt", lambda *a, **k: pytest.fail("a model was loaded"))
    for name, (_, words) in bad.items():
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", str(ck), "--prompt", PROMPTS[0], "--out",
                         str(tmp_path / "x.mp4"), "--lora", str(tmp_path / f"{name}.safetensors")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and words in err[-1], (name, err)


# ----- train.py --lora -----

def base_dit(folder, i2v=False):
    """A tiny DiT with non-zero weights everywhere, saved as an --init folder. (The fresh init's
    zero modulation and output projection would give every adapter a zero gradient.)"""
    cfg = replace(dit.DIT_PRESETS["tiny"], in_channels=16) if i2v else dit.DIT_PRESETS["tiny"]
    m = randomize(ExpertDiT(cfg), std=0.05, seed=3)
    m.save(str(folder))
    return m


def ckpt_dir(out, step):
    return out / "ckpt" / f"step_{step:07d}"


def test_ema_of_a_lora_does_not_linger_at_its_zero_start(assets, tmp_path):  # noqa: F811
    """The presets' EMA 0.9999 over a LoRA: the export holds the EMA's adapters, whose B starts at
    zero; with a fixed decay they would stay ~0.9999^n of the way there (B ~0.0004x the trained
    one after 4 steps). train.ema_decay ramps the decay as (1 + n) / (10 + n)."""
    assert [round(train.ema_decay(0.9999, n), 4) for n in (0, 1, 90, 10**6)] == \
        [0.1, 0.1818, 0.91, 0.9999]
    assert train.ema_decay(0.5, 10**6) == 0.5
    base_dit(tmp_path / "base")
    train.main(dit_args(assets, tmp_path / "run", *SMALL, "--steps", "2,2", "--ema", "0.9999",
                        "--init", str(tmp_path / "base"), "--lora", "4"))
    trained = ckpt_tensors(ckpt_dir(tmp_path / "run", 4))
    exported = load_file(tmp_path / "run" / dit.LORA_FILE)
    # sum of squares of every B (the export splits qkv's B into to_q / to_k / to_v rows)
    sq = lambda sd, end: sum(float(v.square().sum()) for k, v in sd.items() if k.endswith(end))
    assert sq(exported, "lora_B.weight") > 0.4 ** 2 * sq(trained, "lora_B") > 0


def test_train_lora_trains_and_stores_only_the_adapters(assets, tmp_path, capsys):  # noqa: F811
    """--lora 4 --lora-targets attn+mlp over a frozen --init base, with the EMA: the optimizer
    state, the EMA and the checkpoint hold the adapters only; the export is the EMA adapters in
    the diffusers layout; the adapters moved; a resumed run equals the uninterrupted one."""
    base = base_dit(tmp_path / "base")
    common = [*SMALL, "--steps", "2,2", "--ema", "0.5", "--init", str(tmp_path / "base"),
              "--lora", "4", "--lora-alpha", "8", "--lora-targets", "attn+mlp"]
    full = train.main(dit_args(assets, tmp_path / "full", *common))
    out = capsys.readouterr().out
    ck = ckpt_dir(tmp_path / "full", 4)
    adapters = {f"blocks.{i}.{n}.lora_{ab}" for i in range(base.cfg.layers)
                for n in ("qkv", "proj", "fc1", "fc2") for ab in "AB"}
    sd = ckpt_tensors(ck)
    assert set(sd) == adapters  # no frozen weight in the checkpoint
    n = sum(v.numel() for v in sd.values())
    assert f"LoRA rank 4 (alpha 8.0) on attn+mlp: {n:,} trainable parameters" in out
    ema = ckpt_tensors(ck, "ema", "")
    assert set(ema) == adapters
    st = ckpt_tensors(ck, "optim")  # "<param>.exp_avg", "<param>.exp_avg_sq", "<param>.step"
    assert {k.rpartition(".")[0] for k in st} == adapters
    assert not (tmp_path / "full" / "dit").exists()  # no full model export: the adapters alone
    assert all(sd[k].abs().max() > 0 for k in adapters if k.endswith("lora_B"))  # B left 0
    # the export: the EMA adapters, read back onto the base
    m = ExpertDiT.load(str(tmp_path / "base"))
    assert dit.load_lora(m, tmp_path / "full" / dit.LORA_FILE) == 4 * base.cfg.layers + \
        2 * base.cfg.layers
    got = {k: v for k, v in m.state_dict().items() if "lora_" in k}
    assert got.keys() == adapters and all(torch.allclose(got[k], ema[k]) for k in adapters)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in m.state_dict().items()
               if "lora_" not in k)
    # stop after step 3, resume: the same losses and the same exported adapters
    part = train.main(dit_args(assets, tmp_path / "part", *common, "--stop-at", "3"))
    rest = train.main(dit_args(assets, tmp_path / "part", *common, "--resume"))
    assert part["losses"] + rest["losses"] == full["losses"]
    a, b = (load_file(tmp_path / r / dit.LORA_FILE) for r in ("full", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a LoRA run resumed without --lora or with another rank: refused in one line, exit code 2
    plain = [a for a in common if a not in ("--lora", "4", "--lora-alpha", "8", "--lora-targets",
                                            "attn+mlp")]
    for args, words in ((plain, "with --lora 4 --lora-alpha 8 --lora-targets attn+mlp"),
                        ([*common[:-6], "--lora", "8"], "with --lora 4")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            train.main(dit_args(assets, tmp_path / "part", *args, "--resume"))
        assert e.value.code == 2 and words in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def lora_i2v_one(assets, tmp_path_factory):  # noqa: F811
    """The reference of the 2-rank LoRA runs: an I2V base, one process with both ranks' rows."""
    root = tmp_path_factory.mktemp("lora_i2v")
    base_dit(root / "base", i2v=True)
    common = [*PAR, "--i2v", "--init", str(root / "base"), "--lora", "4", "--ema", "0.5"]
    return root, common, train.main(dit_args(assets, root / "one", *common, "--rows", "2"))


TWO = {"fsdp-offload": ["--fsdp", "--grad-checkpoint", "--offload-activations"],
       "ddp-ckpt": ["--grad-checkpoint"]}


@pytest.fixture(scope="module")
def lora_i2v_two(assets, lora_i2v_one, torchrun):  # noqa: F811
    """ONE torchrun launch on 2 ranks (the launch costs more than the runs): lora_i2v_one's runs
    with 1 row per rank, with each of TWO's settings (into <root>/two-<name>);
    -> {name: its stdout}."""
    root, common, _ = lora_i2v_one
    runs = {name: dit_args(assets, root / f"two-{name}", *common, "--rows", "1", *mode)
            for name, mode in TWO.items()}
    worker = os.path.join(os.path.dirname(__file__), "_train_runs_worker.py")
    p = torchrun(worker, *launch_args(*runs.values()), timeout=900)
    return dict(zip(runs, split_runs(p.stdout, len(runs))))


@pytest.mark.parametrize("mode", TWO)
def test_train_lora_two_ranks_i2v_equals_one_process(lora_i2v_one, lora_i2v_two, mode):
    """LoRA on an image-to-video base (App. A) with Frame Pack rows: 2 ranks (FSDP2 with
    offloaded activation checkpointing, or DDP with checkpointing) == one process with both
    ranks' rows (the same global batch): the same losses and the same exported adapters."""
    root, common, one = lora_i2v_one
    two, out = root / f"two-{mode}", lora_i2v_two[mode]  # the launch's run with TWO[mode]
    assert f"world 2 {'fsdp' if '--fsdp' in TWO[mode] else 'ddp'}" in out
    assert "Frame Pack rows" in out
    assert [r["loss"] for r in log(two)] == pytest.approx(one["losses"], rel=1e-5, abs=1e-7)
    a, b = (load_file(d / dit.LORA_FILE) for d in (root / "one", two))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)
    assert max(v.abs().max() for k, v in a.items() if "lora_B" in k) > 0
    ck = ckpt_tensors(ckpt_dir(two, 3))
    assert ck and all(".lora_" in k for k in ck)  # (FSDP: gathered from the shards) adapters only


def test_train_lora_from_a_released_folder_then_sample(released, assets, tmp_path,  # noqa: F811
                                                        capsys):
    """--init-diffusers: a released folder (diffusers layout) supplies the transformer, the VAE,
    the T5 and the noise schedule; the exported file then samples with sample.py --model-dir
    --lora, as it would for CogVideoX-5B."""
    res = train.main(["--stage", "dit", "--preset", "tiny", "--data", assets["manifest"],
                      "--init-diffusers", str(released), "--lora", "2", *SMALL, "--steps", "1,1",
                      "--lr", "1e-2", "--out", str(tmp_path / "run")])
    assert res["step"] == 2 and all(math.isfinite(x) for x in res["losses"])
    out = capsys.readouterr().out
    assert "LoRA rank 2 (alpha 2) on attn" in out
    # rows planned with the released DiT's text length (8), not the preset's (12)
    rel = dit.diffusers_folder_config(str(released))[1]
    assert rel.text_len == 8 != dit.DIT_PRESETS["tiny"].text_len
    sf = vae.diffusers_folder_config(str(released / "vae")).spatial_factor
    assert f"Frame Pack rows of {data.num_tokens(9, 16, 16, 8, 4, sf, rel.patch)} tokens" in out
    lora = tmp_path / "run" / dit.LORA_FILE
    ref = ExpertDiT.from_diffusers(released)
    assert dit.load_lora(ref, lora) == 4 * ref.cfg.layers  # to_q, to_k, to_v, to_out.0
    sample.main(["--model-dir", str(released), "--lora", str(lora), "--prompt", PROMPTS[0],
                 "--out", str(tmp_path / "v.mp4"), "--num-frames", "5", "--height", "16",
                 "--width", "16", "--steps", "2"])
    assert (tmp_path / "v.mp4").exists()



@pytest.mark.parametrize("extra, words", [
    (["--lora", "0"], "--lora RANK must be >= 1"),
    (["--lora", "4", "--lora-alpha", "-1"], "--lora-alpha must be > 0"),
    (["--lora-alpha", "8"], "shape a LoRA: add --lora RANK"),
    (["--lora-targets", "attn"], "shape a LoRA: add --lora RANK"),
    (["--lora", "4", "--i2v", "--init", "{t2v}"], "a T2V -> I2V fine-tune trains the new input"),
    (["--init-diffusers", "{tmp}"], "is not a released CogVideoX folder"),
    (["--init-diffusers", "{tmp}/none"], "--init-diffusers"),
])
def test_bad_lora_settings_exit_2_before_any_model(assets, tmp_path, monkeypatch, capsys,  # noqa
                                                    extra, words):
    ExpertDiT(dit.DIT_PRESETS["tiny"]).save(str(tmp_path / "t2v"))
    monkeypatch.setattr(train, "build_dit", lambda job: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        train.main(dit_args(assets, tmp_path / "run", *SMALL,
                            *[v.format(tmp=tmp_path, t2v=tmp_path / "t2v") for v in extra]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "Traceback" not in "".join(err) and words in err[-1], err


def test_lora_i2v_from_a_t2v_pipeline_folder_is_refused(assets, tmp_path, monkeypatch,  # noqa
                                                         capsys):
    """--lora --i2v --init of a released T2V model given as its pipeline folder (transformer/
    inside, as --init reads its weights) is refused as its transformer/ is: the LoRA would train
    with the grown image channels frozen at 0 (check_lora read DIR/config.json only, so the
    pipeline folder passed). An I2V preset: its own config has the I2V input channels."""
    monkeypatch.setattr(train, "build_dit", lambda job: pytest.fail("a model was loaded"))
    c = dit.DIT_PRESETS["tiny"]
    monkeypatch.setitem(dit.DIT_PRESETS, "tiny-i2v", replace(c, in_channels=16, pos="learned"))
    monkeypatch.setitem(train.PRESETS, "tiny-i2v", replace(train.PRESETS["tiny"], dit="tiny-i2v"))
    (tmp_path / "t2v" / "transformer").mkdir(parents=True)  # the released layout, config only
    (tmp_path / "t2v" / "transformer" / "config.json").write_text(json.dumps({
        "_class_name": "CogVideoXTransformer3DModel", "in_channels": c.in_channels,
        "out_channels": c.out_channels, "num_layers": c.layers, "num_attention_heads": c.heads,
        "attention_head_dim": c.head_dim, "time_embed_dim": c.time_dim,
        "text_embed_dim": c.text_dim, "max_text_seq_length": c.text_len, "sample_frames": 9,
        "sample_height": 8, "sample_width": 8, "use_rotary_positional_embeddings": True}))
    for init in (tmp_path / "t2v", tmp_path / "t2v" / "transformer"):
        with pytest.raises(SystemExit) as e:
            train.main(dit_args(assets, tmp_path / "run", "--size", "32x32", "--frames", "9",
                                "--preset", "tiny-i2v", "--i2v", "--lora", "4", "--init",
                                str(init)))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and "a T2V -> I2V fine-tune trains the new input" in err[-1], err

# ----- at the demo's scale -----

def test_lora_fine_tune_changes_what_the_tiny_dit_samples(assets, tmp_path):  # noqa: F811
    """The README's demo: a LoRA fine-tune (rank 16, attn+mlp) of a frozen tiny DiT on one clip,
    then its caption sampled with the adapters (sample.py --ckpt BASE --lora FILE) and without.
    The adapters move the sampled latents toward the clip's own latent: at most 0.7x the base's
    distance, for two seeds. Fails if the adapters do not train, are not exported, or are not
    applied. (At this scale, random VAE and seconds of training, the samples get closer to every
    clip of the set alike: the test claims a change toward the data, not a copy of the clip.)"""
    import shutil
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and much faster when busy
    try:
        base = tmp_path / "base"
        base_dit(base / "dit")
        shutil.copytree(assets["vae"], base / "vae")
        shutil.copytree(assets["t5"], base / "text_encoder")
        (base / "sample.json").write_text(json.dumps({"num_frames": 9, "height": 16, "width": 16}))
        clip = data.read_manifest(assets["clips"])[0]
        data.write_manifest([clip] * 4, str(tmp_path / "one.jsonl"))
        a = dict(assets, manifest=str(tmp_path / "one.jsonl"))
        train.main(dit_args(a, tmp_path / "lora", "--init", str(base / "dit"), "--lora", "16",
                            "--lora-targets", "attn+mlp", "--size", "16x16", "--frames", "9",
                            "--steps", "40,1", "--rows", "1", "--max-tokens", "96", "--lr", "1e-2"))
        net, ae, text, cfg = sample.load_ckpt(str(base))
        with torch.no_grad():  # the clip's latent in the DiT's space: (1, C, T', h, w)
            x = data.load_video(clip["path"], 9, 16, 16)[None]
            z = ae.encode(x).mean * ae.cfg.scaling_factor
        sc = replace(cfg, steps=10, cfg=1.0)
        ac = train.diffusion.alphas_cumprod(snr_shift_scale=train.PRESETS["tiny"].snr_shift)
        run = lambda m: torch.cat([sample.generate(  # noqa: E731  (2 seeds: (2, C, T', h, w))
            m, ae, text, [clip["caption"]], sc, seed=s, progress=False, return_latents=True,
            ac=ac) for s in (5, 6)])
        before = run(net)
        sample.apply_lora(net, str(tmp_path / "lora" / dit.LORA_FILE))
        after = run(net)
    finally:
        torch.set_num_threads(threads)
    d0, d1 = ((s - z).flatten(1).norm(dim=1) for s in (before, after))
    assert (d1 < 0.7 * d0).all(), (d0, d1)


# ----- memory: the step simulator -----

def test_simulated_lora_step_holds_gradients_and_adamw_for_the_adapters_only():
    """--simulate with --lora (fp32, tiny): gradients and AdamW state are the adapters' bytes,
    the parameters the frozen base plus the adapters."""
    r = train.main(["--stage", "dit", "--preset", "tiny", "--simulate", "1", "--fp32", "--lora",
                    "4", "--frames", "9", "--size", "32x32"])
    m = ExpertDiT(dit.DIT_PRESETS["tiny"])
    base = sum(p.numel() for p in m.parameters()) * 4
    ad = dit.add_lora(m, 4)
    size = sum(p.numel() for p in ad) * 4
    assert r["params"] == base + size and r["grads_total"] == size
    assert r["optimizer"] == 2 * size + 4 * len(ad)  # exp_avg, exp_avg_sq, a 4-byte step each


@pytest.mark.slow
def test_5b_lora_fits_16_gib_on_one_gpu(capsys):
    """The README's figure: CogVideoX-5B, LoRA rank 64 on attention, one 49x480x720 clip, one GPU
    (bf16 frozen base, bf16 autocast, checkpointing with the block inputs in host memory): the
    step's peak <= 16 GiB (cogvideox-factory ~20 GB, the official guide 24 GB)."""
    r = train.main(["--stage", "dit", "--preset", "cogvideox-5b", "--simulate", "1", "--lora",
                    "64", "--grad-checkpoint", "--offload-activations", "--frames", "49",
                    "--size", "480x720"])
    assert r["tokens"] == 17776 and r["peak"] <= 16 * 2**30, r["peak"] / 2**30
    assert r["params"] < 11 * 2**30  # the base in bf16 (5.57 G parameters), adapters fp32
