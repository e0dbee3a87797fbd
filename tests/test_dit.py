"""dit.py: parameter counts, parity with diffusers on random weights, Frame Pack == unpacked (every
attention mode, forward and backward; no M x M tensor on the default path), the I2V input,
checkpointing / autocast, save/load, the T5 wrapper.
Run: python -m pytest -q tests/test_dit.py (the compiled FlexAttention test: -m slow -k flex)"""
import json
import os
from pathlib import Path
from dataclasses import asdict, replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import data
import dit
import vae
from dit import DIT_PRESETS, ExpertDiT

TINY = DIT_PRESETS["tiny"]


def small(**kw):
    """The tiny preset with two layers: every test below only needs the structure, not depth."""
    return replace(TINY, **{"layers": 2, **kw})


def randomize(model, std=0.1, seed=0):
    """Perturb every parameter (and the learned table): zero-initialised modulation hides bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(cfg, B=2, T=3, h=8, w=8, L=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, T, h, w, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    text = torch.randn(B, L or cfg.text_len, cfg.text_dim, generator=g)
    return x, t, text


# ----- presets -----

# The 5B-I2V's count is the released one (5,625,087,552): 16 more input channels and the learned
# position table over 226 text + 13 x 30 x 45 video tokens, a trained parameter.
@pytest.mark.parametrize("name,count", [("cogvideox-2b", 1_693_783_872),
                                        ("cogvideox-5b", 5_570_283_072),
                                        ("cogvideox-5b-i2v", 5_625_087_552)])
def test_parameter_counts(name, count):
    with torch.device("meta"):
        m = ExpertDiT(DIT_PRESETS[name])
    assert sum(p.numel() for p in m.parameters()) == count
    if name == "cogvideox-5b-i2v":
        assert count == 5_570_283_072 + 16 * 3072 * 2 * 2 + (226 + 13 * 30 * 45) * 3072


def test_shapes_preset_is_tiny_on_four_channels():
    """The demo's DiT is the tiny one on the demo VAE's latents (4 channels), with 8 text tokens:
    the demo's captions and prompts are at most 8 words, the end token included."""
    assert DIT_PRESETS["shapes"] == replace(TINY, in_channels=4, out_channels=4, text_len=8)
    assert max(len(p.split()) + 1 for p, _ in data.eval_prompts()) == 8
    assert DIT_PRESETS["shapes"].in_channels == vae.VAE_PRESETS["shapes"].latent


def test_learned_position_table_trains_from_zero():
    """App. A, as the official I2V config: the table is a Parameter that starts at zero and gets a
    gradient (the T2V model it is fine-tuned from has none)."""
    cfg = replace(TINY, pos="learned")
    m = ExpertDiT(cfg)
    assert "pos" in dict(m.named_parameters()) and m.pos.requires_grad and (m.pos == 0).all()
    randomize(m)
    x, t, text = inputs(cfg)
    m(x, t, text).square().mean().backward()
    assert m.pos.grad is not None and m.pos.grad.abs().sum() > 0


def test_tiny_forward_zero_init_and_num_tokens():
    m = ExpertDiT(TINY)
    x, t, text = inputs(TINY)
    v = m(x, t, text)
    assert v.shape == (2, TINY.out_channels, 3, 8, 8)
    assert v.abs().max() == 0                     # adaLN-Zero: modulation and output start at zero
    v.sum().backward()
    assert m.proj_out.weight.grad.abs().sum() > 0  # ...but the output layer still learns
    assert dit.num_tokens(TINY, 3, 8, 8) == TINY.text_len + 48
    randomize(m)
    assert m(x, t, text).abs().max() > 0


def test_bad_inputs_raise():
    m = ExpertDiT(small())
    x, t, text = inputs(TINY)
    with pytest.raises(ValueError, match="multiples"):
        m(x[..., :7], t, text)
    with pytest.raises(ValueError, match="C="):
        m(x[:, :3], t, text)
    with pytest.raises(ValueError, match="t \\(B,\\)"):
        m(x, t[:1], text)
    with pytest.raises(ValueError, match="max_tokens"):
        m.forward_packed([x[0]], t[:1], text[:1], [0], max_tokens=20)
    with pytest.raises(ValueError, match="row ids"):
        m.forward_packed([x[0], x[1]], t, text, [0])
    with pytest.raises(ValueError, match="pos="):
        ExpertDiT(small(pos="alibi"))


# ----- parity with diffusers (the released port, random weights) -----

def diffusers_model(rope=True, learned=False, seed=0, **kw):
    from diffusers import CogVideoXTransformer3DModel
    torch.manual_seed(seed)
    ref = CogVideoXTransformer3DModel(**{**dict(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        time_embed_dim=32, text_embed_dim=16, num_layers=2, max_text_seq_length=5,
        sample_width=8, sample_height=6, sample_frames=9,  # latent 3x6x8
        use_rotary_positional_embeddings=rope, use_learned_positional_embeddings=learned), **kw}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():   # unit-gain random weights: activations stay O(1)
            z = torch.randn(p.shape, generator=g)
            if "norm_q.weight" in name or "norm_k.weight" in name:
                p.copy_(2 + 0.1 * z)      # sharp attention: positions (RoPE, tables) matter a lot
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * z)
            elif p.dim() > 1:
                p.copy_(z / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * z)
        if learned:
            table = ref.patch_embed.pos_embedding
            table.copy_(torch.randn(table.shape, generator=g))
    return ref


def run_diffusers(ref, x, t, text, rope_crop=None):
    """diffusers takes (B, T, C, h, w) and needs the caller's RoPE; crop ((0, 0), (gh, gw)) =
    integer positions."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    kw = {}
    if ref.config.use_rotary_positional_embeddings:
        T, gh, gw = x.shape[2], x.shape[3] // 2, x.shape[4] // 2
        crop = rope_crop or ((0, 0), (gh, gw))
        d = ref.config.attention_head_dim
        kw["image_rotary_emb"] = get_3d_rotary_pos_embed(d, crop, (gh, gw), T)
    with torch.no_grad():
        return ref(x.permute(0, 2, 1, 3, 4), text, t, **kw).sample.permute(0, 2, 1, 3, 4)


def check_parity(ours, ref, grids, L=5, rope_crop=None):
    diffs = []
    for T, h, w in grids:
        x, t, text = inputs(ours.cfg, B=2, T=T, h=h, w=w, L=L, seed=T + h)
        t = torch.tensor([999, 3])                # the extremes of the sinusoid
        a = run_diffusers(ref, x, t, text, rope_crop(h // 2, w // 2) if rope_crop else None)
        with torch.no_grad():
            b = ours(x, t, text)
        assert a.abs().max() > 1                  # non-trivial outputs
        diffs.append((a - b).abs().max().item())
    assert max(diffs) <= 1e-4, diffs
    return diffs


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "sincos"])
def test_from_diffusers_parity_sharded(tmp_path, rope):
    ref = diffusers_model(rope=rope)
    ref.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = ExpertDiT.from_diffusers(tmp_path).eval()
    assert ours.cfg.pos == ("rope" if rope else "sincos") and ours.cfg.base_frames == 3
    # the native grid and another size
    print("parity", ours.cfg.pos, check_parity(ours, ref, [(3, 6, 8), (2, 10, 6)]))


def test_from_diffusers_fp16_pipeline_folder_and_interpolation(tmp_path):
    ref = diffusers_model(rope=True).half().float()     # values that survive an fp16 round trip
    ref.half().save_pretrained(tmp_path / "transformer", variant="fp16")
    ref.float()
    ours = ExpertDiT.from_diffusers(tmp_path).eval()    # pipeline root -> transformer/
    print("fp16 folder", check_parity(ours, ref, [(3, 6, 8)]))
    # The pipeline's RoPE (resize-crop region + linspace) = our interpolation option, at a
    # non-native size.
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    interp = ExpertDiT.from_diffusers(tmp_path, rope_interp=True).eval()
    crop = lambda gh, gw: get_resize_crop_region_for_grid((gh, gw), 4, 3)  # native grid 3 x 4
    print("interp", check_parity(interp, ref, [(2, 10, 6), (1, 4, 12)], rope_crop=crop))
    x, t, text = inputs(ours.cfg, T=2, h=10, w=6, L=5)
    with torch.no_grad():
        assert (ours(x, t, text) - interp(x, t, text)).abs().max() > 0.1  # extrapolation differs


def test_from_diffusers_learned_i2v_style(tmp_path):
    ref = diffusers_model(rope=True, learned=True)
    ref.save_pretrained(tmp_path)
    ours = ExpertDiT.from_diffusers(tmp_path).eval()
    assert ours.cfg.pos == "learned" and "pos" in dict(ours.named_parameters())
    print("learned", check_parity(ours, ref, [(3, 6, 8)]))


# ----- CogVideoX 1.5: temporal patch 2, RoPE over the patched grid, the ofs embedding -----

# The released transformer configs of CogVideoX1.5-5B and -5B-I2V (diffusers' conversion script
# scripts/convert_cogvideox_to_diffusers.py --version 1.5 writes these; the -I2V adds the last line).
RELEASED_15 = dict(
    activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=64, dropout=0.0,
    flip_sin_to_cos=True, freq_shift=0, in_channels=16, max_text_seq_length=226,
    norm_elementwise_affine=True, norm_eps=1e-05, num_attention_heads=48, num_layers=42,
    out_channels=16, patch_bias=False, patch_size=2, patch_size_t=2, sample_frames=81,
    sample_height=300, sample_width=300, spatial_interpolation_scale=1.875,
    temporal_compression_ratio=4, temporal_interpolation_scale=1.0, text_embed_dim=4096,
    time_embed_dim=512, timestep_activation_fn="silu", use_learned_positional_embeddings=False,
    use_rotary_positional_embeddings=True)
RELEASED_15_I2V = dict(RELEASED_15, in_channels=32, ofs_embed_dim=512)


@pytest.mark.parametrize("name,released", [("cogvideox1.5-5b", RELEASED_15),
                                           ("cogvideox1.5-5b-i2v", RELEASED_15_I2V)])
def test_15_parameter_counts_equal_diffusers(name, released, tmp_path):
    """The 1.5 presets == diffusers' model built on meta from the released config, and that config
    read by from_diffusers gives the preset."""
    from diffusers import CogVideoXTransformer3DModel
    with torch.device("meta"):
        ours, ref = ExpertDiT(DIT_PRESETS[name]), CogVideoXTransformer3DModel(**released)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    assert n == {"cogvideox1.5-5b": 5_570_676_352, "cogvideox1.5-5b-i2v": 5_571_594_880}[name]
    assert dit._config(dit._diffusers_config(released)) == DIT_PRESETS[name]


def test_diffusers_temporal_compression_ratio_may_be_a_whole_float(tmp_path):
    """A transformer config.json saying temporal_compression_ratio 4.0 (the VAE's is typed float
    in diffusers) reads as 4 (was refused naming base_frames, a field not in the file); a
    fraction or a non-power of 2 is the VAE's one line naming the file."""
    assert dit._diffusers_config(dict(RELEASED_15, temporal_compression_ratio=4.0)) == \
        dit._diffusers_config(RELEASED_15)
    for v in (2.5, 3):
        (tmp_path / "config.json").write_text(json.dumps(dict(
            RELEASED_15, _class_name="CogVideoXTransformer3DModel", temporal_compression_ratio=v)))
        msg = f"config.json: temporal_compression_ratio = {v!r} is not a power of 2$"
        with pytest.raises(ValueError, match=msg):
            dit.diffusers_folder_config(tmp_path)


def diffusers_15(i2v=False, seed=0):
    """A tiny 1.5-shaped diffusers transformer: temporal patch 2, the release's patch_bias=False and
    300 x 300 RoPE bound, and for I2V twice the input channels and the ofs embedding."""
    return diffusers_model(seed=seed, patch_size_t=2, patch_bias=False, sample_height=300,
                           sample_width=300, sample_frames=81,
                           **(dict(in_channels=8, ofs_embed_dim=32) if i2v else {}))


def run_diffusers_15(ref, x, t, text):
    """What the 1.5 pipelines do around the transformer: pad an odd latent frame count (frame 0
    repeated in front), RoPE over the patched grid at integer positions (grid_type "slice"), ofs
    2.0 for I2V; the padded frame dropped after."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    T, gh, gw = x.shape[2], x.shape[3] // 2, x.shape[4] // 2
    xp = dit.pad_frames(x, 2)
    rot = get_3d_rotary_pos_embed(ref.config.attention_head_dim, None, (gh, gw), xp.shape[2] // 2,
                                  grid_type="slice", max_size=(150, 150))
    ofs = x.new_full((1,), 2.0) if ref.config.ofs_embed_dim else None
    with torch.no_grad():
        v = ref(xp.permute(0, 2, 1, 3, 4), text, t, ofs=ofs, image_rotary_emb=rot).sample
    return v.permute(0, 2, 1, 3, 4)[:, :, -T:]


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_from_diffusers_15_parity_odd_frames(tmp_path, i2v):
    """1.5-shaped tiny transformers, T2V and I2V (ofs): even latent frame counts, and odd ones
    (an image too) that need padding, at two sizes."""
    ref = diffusers_15(i2v)
    ref.save_pretrained(tmp_path)
    ours = ExpertDiT.from_diffusers(tmp_path).eval()
    assert (ours.cfg.patch_t, ours.cfg.ofs_dim, ours.cfg.in_channels) == (2, 32 * i2v, 4 + 4 * i2v)
    diffs = []
    for T, h, w in [(4, 6, 8), (3, 6, 8), (1, 10, 6), (5, 10, 6)]:
        x, t, text = inputs(ours.cfg, B=2, T=T, h=h, w=w, L=5, seed=T + h)
        t = torch.tensor([999, 3])
        a = run_diffusers_15(ref, x, t, text)
        with torch.no_grad():
            b = ours(x, t, text)
        assert a.shape == b.shape == (2, 4, T, h, w) and a.abs().max() > 1
        diffs.append((a - b).abs().max().item())
    print("1.5", "i2v" if i2v else "t2v", diffs)
    assert max(diffs) <= 1e-4, diffs
    if i2v:  # the ofs embedding matters: another value gives another v
        x, t, text = inputs(ours.cfg, T=4, h=6, w=8, L=5)
        other = ExpertDiT.from_diffusers(tmp_path, ofs=1.0).eval()
        with torch.no_grad():
            assert (ours(x, t, text) - other(x, t, text)).abs().max() > 1e-2


def test_pad_frames_and_tokens():
    x = torch.arange(3.0).view(1, 1, 3, 1, 1).expand(2, 4, 3, 2, 2)   # frames 0, 1, 2
    assert dit.pad_frames(x, 2)[0, 0, :, 0, 0].tolist() == [0, 0, 1, 2]  # frame 0 repeated in front
    y = x[0]
    assert dit.pad_frames(x, 1) is x and dit.pad_frames(y, 3) is y  # whole patches: no copy
    cfg = small(patch_t=2)
    assert dit.num_tokens(cfg, 3, 8, 8) == dit.num_tokens(cfg, 4, 8, 8) == 12 + 2 * 16
    assert dit.num_tokens(cfg, 1, 8, 8) == 12 + 16
    with pytest.raises(ValueError, match="pos='rope'"):
        ExpertDiT(small(patch_t=2, pos="sincos"))
    with pytest.raises(ValueError, match="ofs_dim"):
        ExpertDiT(small(ofs_dim=64))


def test_packed_equals_alone_patch_t(eager_flex):
    """Frame Pack with a temporal patch: odd clips and images are padded per sample, tokens are
    counted per pair of latent frames, and data.FramePackSampler's budget counts the same."""
    import data
    m = randomize(ExpertDiT(small(patch_t=2, in_channels=16, ofs_dim=128))).eval()
    shapes, rows = [(3, 8, 8), (1, 8, 12), (4, 8, 8), (5, 8, 12), (2, 8, 8)], [1, 0, 1, 0, 1]
    # tokens 12 + {32, 24, 32, 72, 16}: data's count (pixels: x4 in space, 4k+1 frames) agrees
    tok = [dit.num_tokens(m.cfg, *s) for s in shapes]
    pix = [(4 * (T - 1) + 1, 4 * h, 4 * w) for T, h, w in shapes]
    assert tok == [data.num_tokens(*s, 12, 4, 4, 2, pt=2) for s in pix] == [44, 36, 44, 84, 28]
    sampler = data.FramePackSampler(pix, 120, 2, 12, 4, 4, 2, pt=2)
    assert sampler.tokens == dict(enumerate(tok))
    g = torch.Generator().manual_seed(1)
    lat = [torch.randn(16, *s, generator=g) for s in shapes]
    t = torch.tensor([999, 0, 500, 250, 742])
    text = torch.randn(5, 12, 64, generator=g)
    for mode in MODES:
        m.packed_attention = mode
        with torch.no_grad():
            out = m.forward_packed(lat, t, text, rows, max_tokens=120)  # rows of 116 and 120
            alone = [m(z[None], t[i:i + 1], text[i:i + 1])[0] for i, z in enumerate(lat)]
        assert [o.shape for o in out] == [(8, *s) for s in shapes]
        diff = max((a - b).abs().max().item() for a, b in zip(out, alone))
        assert diff <= 1e-5, (mode, diff)
    # several samples of one odd and one even shape across rows: each shape's samples are
    # embedded and un-patched as one batch
    lat = [torch.randn(16, *s, generator=g) for s in [(3, 8, 8), (4, 8, 12), (3, 8, 8), (4, 8, 12)]]
    m.packed_attention = "auto"
    with torch.no_grad():
        out = m.forward_packed(lat, t[:4], text[:4], [0, 1, 1, 0], max_tokens=120)
        alone = [m(z[None], t[i:i + 1], text[i:i + 1])[0] for i, z in enumerate(lat)]
    assert [o.shape for o in out] == [(8, *z.shape[1:]) for z in lat]
    assert max((a - b).abs().max().item() for a, b in zip(out, alone)) <= 1e-5


def test_from_diffusers_key_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    diffusers_model().save_pretrained(tmp_path)
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    sd.pop("transformer_blocks.1.attn1.to_k.weight")
    sd["transformer_blocks.2.norm1.linear.weight"] = torch.zeros(1)
    save_file(sd, f)
    msg = r"missing \['blocks.1.qkv.weight'\].*transformer_blocks.2.norm1"
    with pytest.raises(ValueError, match=msg):
        ExpertDiT.from_diffusers(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "activation_fn": "swiglu"}))
    with pytest.raises(ValueError, match="activation_fn"):
        ExpertDiT.from_diffusers(tmp_path)
    # a value of another type, a required key missing: one ValueError naming the file (were a
    # TypeError / KeyError from the conversion, or from the model's construction)
    for edit, msg in (({"sample_frames": "49"}, r"config.json: not a CogVideoXTransformer3DModel "
                                                r"config \(TypeError"),
                      ({"num_layers": None}, "layers = None is not of type int"),
                      ({"in_channels": None, "out_channels": 4}, "in_channels = None is not of"),
                      ({"num_attention_heads": "2"}, "heads = '2' is not of type int")):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **edit}))
        with pytest.raises(ValueError, match=msg):
            ExpertDiT.from_diffusers(tmp_path)
    d = {k: v for k, v in cfg.items() if k != "text_embed_dim"}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"\(KeyError: 'text_embed_dim'\)"):
        ExpertDiT.from_diffusers(tmp_path)
    # 1.0 weights under a 1.5 config (temporal patch 2): the patch shapes are named
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "patch_size_t": 2}))
    sd.pop("transformer_blocks.2.norm1.linear.weight")
    sd["transformer_blocks.1.attn1.to_k.weight"] = sd["transformer_blocks.1.attn1.to_q.weight"].clone()
    save_file(sd, f)
    with pytest.raises(ValueError, match=r"shape mismatch \['patch.weight', 'proj_out.bias'"):
        ExpertDiT.from_diffusers(tmp_path)



def test_position_flags_of_a_wrong_type_are_one_error(tmp_path):
    """use_rotary_positional_embeddings / use_learned_positional_embeddings as strings: one
    ValueError naming the file. Their truth value was taken: "false" gave a 2B (sin-cos, no
    tensor of its own) RoPE, loading without a word and sampling another model."""
    diffusers_model(rope=False).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for k in ("use_rotary_positional_embeddings", "use_learned_positional_embeddings"):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, k: "false"}))
        with pytest.raises(ValueError, match=f"config.json: .*{k} = 'false' is not true or false"):
            dit.diffusers_folder_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "use_learned_positional_embeddings":
                                                      None}))
    assert dit.diffusers_folder_config(tmp_path)[1].pos == "sincos"  # null: diffusers' default


def test_damaged_shard_index_is_one_error_naming_it(tmp_path):
    """A sharded diffusers folder whose index json is torn, is no object, holds no weight_map of
    file names, or lists a shard that is missing: one error naming the index and the fix (the CLIs
    print it as one line; were a bare 'Expecting ...' JSONDecodeError, KeyError / TypeError /
    AttributeError tracebacks, and a missing shard named without its index)."""
    diffusers_model().save_pretrained(tmp_path, max_shard_size="60KB")
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    good = index.read_text()
    shard = sorted(set(json.loads(good)["weight_map"].values()))[-1]
    for text, words in ((good[:len(good) // 2], "is not valid JSON"),
                        ("[]", "holds a JSON list"),
                        (json.dumps({"metadata": {}}), "no weight_map"),
                        (json.dumps({"weight_map": [shard]}), "no weight_map")):
        index.write_text(text)
        with pytest.raises(ValueError) as e:
            ExpertDiT.from_diffusers(tmp_path)
        assert str(index) in str(e.value) and words in str(e.value) and "again" in str(e.value)
    index.write_text(good)
    (tmp_path / shard).rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError) as e:
        ExpertDiT.from_diffusers(tmp_path)
    assert str(index) in str(e.value) and f"lists {shard}, which is missing" in str(e.value)


def test_save_load_roundtrip(tmp_path, monkeypatch):
    import data
    order, write = [], data.atomic_write
    log = lambda path, fn: (order.append(os.path.basename(path)), write(path, fn))
    monkeypatch.setattr(data, "atomic_write", log)
    m = randomize(ExpertDiT(small(pos="learned")))
    m.save(tmp_path / "ck")
    assert order == ["config.json", "model.safetensors"]  # config first, both through atomic_write
    # no temp files left
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors"]
    m2 = ExpertDiT.load(tmp_path / "ck")
    assert m2.cfg == m.cfg
    x, t, text = inputs(m.cfg)
    with torch.no_grad():
        assert torch.equal(m(x, t, text), m2(x, t, text))
    other = ExpertDiT(small(layers=1))
    other.save(tmp_path / "one")
    # weights of 1 layer, config of 2
    (tmp_path / "one" / "config.json").write_text(json.dumps(asdict(small())))
    with pytest.raises(ValueError, match="missing"):
        ExpertDiT.load(tmp_path / "one")
    # a given state dict (e.g. gathered FSDP or EMA weights) is what gets written
    ema = {k: torch.full_like(v, 0.5) for k, v in m.state_dict().items()}
    m.save(tmp_path / "ema", state_dict=ema)
    back = ExpertDiT.load(tmp_path / "ema").state_dict()
    assert all(torch.equal(back[k], v) for k, v in ema.items())


# ----- image-to-video input (App. A) -----

def test_i2v_input():
    g = torch.Generator().manual_seed(0)
    z, image = torch.randn(2, 8, 3, 4, 6, generator=g), torch.randn(2, 8, 1, 4, 6, generator=g)
    x = dit.i2v_input(z, image)
    assert x.shape == (2, 16, 3, 4, 6)
    assert torch.equal(x[:, :8], z)                  # [noisy latent; ...]
    assert torch.equal(x[:, 8:, :1], image)          # the image latent in latent frame 0
    assert x[:, 8:, 1:].abs().sum() == 0             # zeros in the other frames
    assert dit.i2v_input(z.bfloat16(), image).dtype == torch.bfloat16  # the latent's dtype
    m = ExpertDiT(small(in_channels=16))             # an I2V DiT takes it directly
    assert m(x, torch.tensor([1, 2]), torch.randn(2, 12, 64)).shape == (2, 8, 3, 4, 6)


# ----- Frame Pack (§3.1) -----

MODES = ["dense", "segments", "auto", "flex"]


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexPlan with eager flex_attention (forward only on CPU; compiled: the slow test)."""
    import warnings
    from torch.nn.attention.flex_attention import flex_attention
    monkeypatch.setattr(dit, "compiled_flex", lambda: flex_attention)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pos", ["rope", "sincos", "learned"])
def test_packed_equals_alone(pos, mode, eager_flex):
    m = randomize(ExpertDiT(small(pos=pos))).eval()
    m.packed_attention = mode
    # Row ids as a sampler hands them over: interleaved in the list, with gaps (an empty row).
    if pos == "learned":   # the table covers the native 3x8x8 grid only; tokens 60, 28, 44, 28
        shapes, rows = [(3, 8, 8), (1, 8, 8), (2, 8, 8), (1, 8, 8)], [1, 0, 0, 1]
    else:                  # images (T=1) and clips, two resolutions; tokens 60, 36, 28, 84, 44
        shapes, rows = [(3, 8, 8), (1, 8, 12), (1, 8, 8), (3, 8, 12), (2, 8, 8)], [5, 2, 5, 2, 0]
    g = torch.Generator().manual_seed(1)
    lat = [torch.randn(8, *s, generator=g) for s in shapes]
    t = torch.tensor([999, 0, 500, 250, 742][:len(lat)])
    text = torch.randn(len(lat), m.cfg.text_len, m.cfg.text_dim, generator=g)
    with torch.no_grad():
        out = m.forward_packed(lat, t, text, rows, max_tokens=130)  # several rows, all with padding
        alone = [m(z[None], t[i:i + 1], text[i:i + 1])[0] for i, z in enumerate(lat)]
        longest = m.forward_packed(lat, t, text, torch.tensor(rows))  # padded to the longest row
    diff = max((a - b).abs().max().item() for a, b in zip(out + longest, alone + alone))
    print(pos, mode, "packed vs alone", diff)
    assert all(a.shape == b.shape for a, b in zip(out, alone))
    assert diff <= 1e-5


# Row layouts (latent shapes, row ids, max_tokens); "mixed": samples of 60, 36, 28, 84, 44 tokens
LAYOUTS = {
    # several samples in a row, a row of one sample, padding, empty rows (ids 1, 3, 4)
    "mixed": ([(3, 8, 8), (1, 8, 12), (1, 8, 8), (3, 8, 12), (2, 8, 8)], [5, 2, 5, 2, 0], 130),
    # one sample per row, each filling its row exactly (plain SDPA, no mask, in every mode)
    "full": ([(3, 8, 8), (3, 8, 8)], [1, 0], None),
    # one sample per row, padded to a fixed length
    "padded": ([(3, 8, 8), (1, 8, 12)], [0, 1], 96),
    # samples of one shape in several rows, interleaved with another shape (forward_packed embeds
    # and un-patches each shape's samples as one batch): rows of 88, 88 and 60 tokens
    "shared": ([(3, 8, 8), (1, 8, 8), (3, 8, 8), (1, 8, 8), (3, 8, 8)], [0, 1, 1, 0, 2], 100),
}


def grads_of(m, lat, t, text, run):
    """Outputs of run(lat, text) and the gradients of a weighted sum of them w.r.t. the inputs
    (latents, text) and every parameter."""
    lat = [z.clone().requires_grad_() for z in lat]
    text = text.clone().requires_grad_()
    out = run(lat, text)
    w = torch.Generator().manual_seed(5)
    sum((o * torch.randn(o.shape, generator=w)).sum() for o in out).backward()
    return [o.detach() for o in out] + [z.grad for z in lat] + [text.grad] + \
        [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["dense", "segments", "auto"])
def test_packed_modes_forward_backward_equal_alone(mode, layout):
    """Every exact mode equals each sample run alone: outputs, input and parameter gradients.
    (FlexAttention has no backward on CPU: flex is checked forward-only above.)"""
    m = randomize(ExpertDiT(small()))
    shapes, rows, max_tokens = LAYOUTS[layout]
    g = torch.Generator().manual_seed(2)
    lat = [torch.randn(8, *s, generator=g) for s in shapes]
    t = torch.tensor([999, 0, 500, 250, 742][:len(lat)])
    text = torch.randn(len(lat), 12, 64, generator=g)
    m.packed_attention = mode
    m.zero_grad()
    packed = grads_of(m, lat, t, text,
                      lambda z, txt: m.forward_packed(z, t, txt, rows, max_tokens=max_tokens))
    m.zero_grad()
    alone = grads_of(m, lat, t, text, lambda z, txt: [
        m(zi[None], t[i:i + 1], txt[i:i + 1])[0] for i, zi in enumerate(z)])
    rel = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
              for a, b in zip(packed, alone))
    print(mode, layout, "max relative difference", rel)
    assert rel <= 1e-5


@pytest.mark.parametrize("mode", ["dense", "segments"])
def test_packed_padding_no_nan_and_grads(mode):
    m = randomize(ExpertDiT(small()))
    m.packed_attention = mode
    lat = [torch.randn(8, 1, 8, 8, requires_grad=True), torch.randn(8, 3, 8, 8)]
    text = torch.randn(2, 12, 64)
    # one row: 28 + 60 tokens + 112 padding
    out = m.forward_packed(lat, torch.tensor([10, 900]), text, [0, 0], max_tokens=200)
    loss = sum(o.square().mean() for o in out)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert torch.isfinite(lat[0].grad).all()


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in tree_leaves(out):
            if isinstance(o, torch.Tensor):
                self.seen.add(tuple(o.shape))
        return out


def square(shapes, n):
    """The shapes with two dimensions equal to n (an (M, M) mask or score matrix)."""
    return [s for s in shapes if sum(d == n for d in s) >= 2]


@pytest.mark.parametrize("ck", [False, True], ids=["plain", "checkpointed"])
def test_segments_never_make_an_m_by_m_tensor(ck):
    """The GPU-default path (segments) on rows of several samples with padding: forward and backward
    make nothing (M, M) or (n_i, n_i); the dense reference does (the check can fail)."""
    m = randomize(ExpertDiT(small()))
    m.checkpointing = ck
    shapes, rows, M = LAYOUTS["mixed"]
    lat = [torch.randn(8, *s) for s in shapes]
    t, text = torch.tensor([999, 0, 500, 250, 742]), torch.randn(5, 12, 64)
    sizes = [12 + T * h * w // 4 for T, h, w in shapes]               # 60, 36, 28, 84, 44
    for mode in ("dense", "segments"):
        m.packed_attention = mode
        with Shapes() as rec:
            sum(o.sum() for o in m.forward_packed(lat, t, text, rows, max_tokens=M)).backward()
        big = square(rec.seen, M) + [s for n in sizes for s in square(rec.seen, n)]
        assert bool(big) == (mode == "dense"), (mode, big)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("mode", ["segments", "auto"])
def test_packed_on_fake_tensors_linear_memory(mode, flat, monkeypatch):
    """What a step simulator runs (dit.FLAT off; on: a CPU run's one row): forward_packed +
    backward on fake CPU tensors (shapes only, so no host read of a tensor's values) with the
    checkpointed blocks; two clips of 780 tokens in a row make nothing (M, M) or (n, n)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(dit, "FLAT", flat)
    with FakeTensorMode():
        m = ExpertDiT(small())
        m.packed_attention, m.checkpointing = mode, True
        lat, text = [torch.randn(8, 3, 32, 32) for _ in range(2)], torch.randn(2, 12, 64)
        with Shapes() as rec:
            out = m.forward_packed(lat, torch.tensor([3, 700]), text, [0, 0])
            sum(o.sum() for o in out).backward()
    assert out[1].shape == (8, 3, 32, 32)
    assert not square(rec.seen, 2 * 780) and not square(rec.seen, 780)


def test_auto_picks_segments_on_gpu_and_for_long_rows():
    from torch._subclasses.fake_tensor import FakeTensorMode
    one = [(0, 0, 60), (1, 0, 36)]                # one sample per row, with padding
    two = [(0, 0, 60), (0, 60, 36)]               # two samples in a row
    for spans, R in ((one, 2), (two, 1)):
        with FakeTensorMode():                    # a "cuda" tensor without a GPU
            seg = torch.zeros(R, 100, dtype=torch.long, device="cuda")
            assert isinstance(dit.packed_attention("auto", seg, spans), dit.Segments)
        M = dit.DENSE_MAX_TOKENS + 4              # CPU: long rows
        assert isinstance(dit.packed_attention("auto", torch.zeros(R, M, dtype=torch.long),
                                               spans), dit.Segments)
    # CPU, short rows of several samples: the dense mask (faster there, tests/bench.py --only attn)
    assert dit.packed_attention("auto", torch.zeros(1, 100, dtype=torch.long), two).shape == \
        (1, 1, 100, 100)
    assert isinstance(dit.packed_attention("auto", torch.zeros(2, 100, dtype=torch.long), one),
                      dit.Segments)              # one sample per row: no mask even on CPU
    with pytest.raises(ValueError, match="packed attention"):
        dit.packed_attention("varlen", torch.zeros(1, 100, dtype=torch.long), two)


def test_auto_lays_cpu_samples_out_in_one_row(monkeypatch):
    """auto on a CPU: every sample in ONE row, shape after shape, no padding, and Segments attends
    each shape's samples in one SDPA call (speed only: the values in this layout are checked by
    test_packed_modes_forward_backward_equal_alone). The step simulator (dit.FLAT off), sequence
    parallel and the other modes keep the sampler's rows."""
    m = randomize(ExpertDiT(small())).eval()
    shapes, rows, max_tokens = LAYOUTS["shared"]  # clips 0, 2, 4 (60 tokens), images 1, 3 (28)
    g = torch.Generator().manual_seed(2)
    lat = [torch.randn(8, *s, generator=g) for s in shapes]
    t, text = torch.tensor([999, 0, 500, 250, 742]), torch.randn(5, 12, 64, generator=g)
    plans, real = [], dit.packed_attention
    monkeypatch.setattr(dit, "packed_attention", lambda *a: plans.append(real(*a)) or plans[-1])
    calls, sdpa = [], dit.F.scaled_dot_product_attention
    monkeypatch.setattr(dit.F, "scaled_dot_product_attention",
                        lambda q, *a, **k: calls.append(tuple(q.shape)) or sdpa(q, *a, **k))
    with torch.no_grad():
        m.forward_packed(lat, t, text, rows, max_tokens)
        assert isinstance(plans[-1], dit.Segments)
        assert plans[-1].rows == [[[0, 3, 60], [180, 2, 28]]]  # one row: 3 clips, then 2 images
        assert plans[-1].cuts == [[0, 180, 0, 56, 0]]           # no gap, no padding
        assert calls == [(3, 4, 60, 32), (2, 4, 28, 32)] * 2    # per layer: one call per shape
        monkeypatch.setattr(dit, "FLAT", False)
        m.forward_packed(lat, t, text, rows, max_tokens)
        assert plans[-1].shape == (3, 1, 100, 100)              # the sampler's 3 rows, dense
        monkeypatch.setattr(dit, "FLAT", True)
        m.packed_attention = "segments"
        m.forward_packed(lat, t, text, rows, max_tokens)
        assert [len(r) for r in plans[-1].rows] == [2, 2, 1]    # rows 0 and 1: a clip, an image


def test_segments_equal_the_dense_rule_with_gaps():
    """Segments on rows with equal-length neighbours (one call), a gap no sample holds and
    padding: the dense mask's values and gradients on every sample's slots, 0 elsewhere."""
    R, M, H, d = 2, 40, 2, 8
    # row 0: two samples of 10 tokens, a gap, a third of 10 (not in their run), padding
    spans = [(0, 0, 10), (0, 10, 10), (0, 25, 10), (1, 0, 7), (1, 7, 7), (1, 14, 7)]
    seg = torch.full((R, M), -1)
    for i, (r, a, n) in enumerate(spans):
        seg[r, a:a + n] = i
    plan = dit.Segments(spans, R, M, "cpu")
    assert plan.rows == [[[0, 2, 10], [25, 1, 10]], [[0, 3, 7]]]
    assert plan.cuts == [[0, 20, 5, 10, 5], [0, 21, 19]]
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(R, M, H, d, generator=g, requires_grad=True) for _ in range(3)]
    w = torch.randn(R, M, H, d, generator=g) * (seg >= 0)[..., None, None]  # samples' slots only
    outs = []
    for run in (plan, lambda *z: dit.attention(*z, dit.pack_mask(seg))):
        o = run(*qkv)
        outs.append([o.detach()] + list(torch.autograd.grad((o * w).sum(), qkv)))
    held = (seg >= 0)[..., None, None]
    assert (outs[0][0] * ~held).abs().max() == 0                    # gap and padding: 0
    assert torch.allclose(outs[0][0] * held, outs[1][0] * held, atol=1e-6)
    for a, b in zip(outs[0][1:], outs[1][1:]):                      # gradients: 0 off the samples
        assert torch.allclose(a, b, atol=1e-6)


def test_flat_layout_only_on_a_cpu_with_shared_rows(monkeypatch):
    """flat_layout: a CPU whose rows hold several samples; never on a GPU, under sequence parallel,
    for rows of one sample each, nor with dit.FLAT off (the step simulator)."""
    cpu, gpu, sp = torch.device("cpu"), torch.device("cuda"), object()
    assert dit.flat_layout(cpu, None, [[0, 1], [2]])
    assert not dit.flat_layout(gpu, None, [[0, 1], [2]])
    assert not dit.flat_layout(cpu, sp, [[0, 1], [2]])
    assert not dit.flat_layout(cpu, None, [[0], [1], [2]])
    monkeypatch.setattr(dit, "FLAT", False)
    assert not dit.flat_layout(cpu, None, [[0, 1], [2]])


@pytest.mark.parametrize("layout", ["full", "padded"])
@pytest.mark.parametrize("mode", MODES)
def test_one_sample_rows_use_sdpa_without_a_mask(mode, layout, monkeypatch, eager_flex):
    """Rows of one sample: plain SDPA, no mask (full rows in every mode; padded rows unless the
    mode is the dense reference or flex)."""
    calls, sdpa = [], dit.F.scaled_dot_product_attention
    spy = lambda q, k, v, attn_mask=None, **kw: calls.append(attn_mask) or sdpa(q, k, v, attn_mask,
                                                                                 **kw)
    monkeypatch.setattr(dit.F, "scaled_dot_product_attention", spy)
    m = randomize(ExpertDiT(small())).eval()
    m.packed_attention = mode
    shapes, rows, max_tokens = LAYOUTS[layout]
    lat = [torch.randn(8, *s) for s in shapes]
    with torch.no_grad():
        m.forward_packed(lat, torch.tensor([1, 2]), torch.randn(2, 12, 64), rows, max_tokens)
    if layout == "full" or mode in ("segments", "auto"):
        assert calls and all(c is None for c in calls)
        assert len(calls) == 2 * (1 if layout == "full" else len(shapes))  # 2 layers x groups
    else:                                       # padded rows: the dense mask, or the flex kernel
        assert all(c is not None for c in calls) and bool(calls) == (mode == "dense")


def test_pack_mask_block_diagonal():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mk = dit.pack_mask(seg)[0, 0]
    assert mk.shape == (6, 6) and mk[0, 1] and not mk[1, 2] and mk[2, 4]
    assert mk[5, 5] and not mk[5, 0]


def test_flex_block_mask_matches_the_rule_without_m_by_m():
    """FlexPlan's BlockMask (built from per-tile id ranges) equals create_block_mask on the rule,
    block for block, and building it makes nothing (M, M)."""
    from torch.nn.attention.flex_attention import create_block_mask
    # rows of 300 slots (3 tiles of 128, the last one partial): samples of 100, 200 / 20, 140, 60
    # / 250 tokens, and padding
    seg = torch.full((3, 300), -1)
    for r, sizes in enumerate([[100, 200], [20, 140, 60], [250]]):
        at = 0
        for s, n in enumerate(sizes):
            seg[r, at:at + n] = 10 * r + s
            at += n
    with Shapes() as rec:
        ours = dit.FlexPlan(seg).mask
    assert not square(rec.seen, 300)
    ref = create_block_mask(lambda b, h, q, k: seg[b, q] == seg[b, k], 3, None, 300, 300,
                            device="cpu")
    assert torch.equal(ours.to_dense(), ref.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)


@pytest.mark.slow
def test_packed_flex_compiled_once():
    """The compiled FlexAttention kernel equals the dense mask, and a second batch with other rows
    but the same (R, M) (train.py pads rows to max_tokens) reuses the compiled kernel."""
    import warnings
    from torch._dynamo.utils import counters
    m = randomize(ExpertDiT(small())).eval()
    g = torch.Generator().manual_seed(3)
    graphs = []
    for shapes, rows in (([(3, 8, 8), (1, 8, 12), (2, 8, 8)], [0, 0, 1]),
                         ([(1, 8, 8), (1, 8, 8), (3, 8, 12), (1, 8, 8)], [1, 0, 1, 1])):
        lat = [torch.randn(8, *s, generator=g) for s in shapes]
        t, text = torch.randint(0, 1000, (len(lat),), generator=g), torch.randn(len(lat), 12, 64)
        out = {}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for mode in ("dense", "flex"):
                m.packed_attention = mode
                out[mode] = m.forward_packed(lat, t, text, rows, max_tokens=200)
        graphs.append(counters["stats"]["unique_graphs"])
        assert max((a - b).abs().max().item() for a, b in zip(out["dense"], out["flex"])) <= 1e-5
    assert graphs[0] >= 1 and graphs[1] == graphs[0], graphs     # compiled once, not twice


# ----- memory switches -----

def test_checkpointing_same_outputs_and_grads():
    """Plain, checkpointed, checkpointed with the block inputs offloaded (dit.offloaded), and the
    MLP in 3 checkpointed token slices (dit.chunked_mlp; 3 does not divide the tokens evenly): the
    same outputs and gradients (parameters and input)."""
    m = randomize(ExpertDiT(small()))
    x, t, text = inputs(m.cfg)
    x.requires_grad_()
    res = []
    for ck, off, k in ((False, False, 1), (True, False, 1), (True, True, 1), (False, False, 3),
                       (True, True, 3)):
        m.zero_grad()
        x.grad = None
        m.checkpointing, m.offload = ck, off
        for blk in m.blocks:
            blk.mlp_chunks = k
        v = m(x, t, text)
        v.square().mean().backward()
        res.append((v.detach(), [p.grad.clone() for p in m.parameters()] + [x.grad.clone()]))
    for r in res[1:]:
        assert torch.allclose(res[0][0], r[0], atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(res[0][1], r[1]))


def test_bf16_autocast_close():
    m = randomize(ExpertDiT(small())).eval()
    x, t, text = inputs(m.cfg)
    with torch.no_grad():
        ref = m(x, t, text)
        m.autocast = torch.bfloat16
        low = m(x, t, text)
        packed = m.forward_packed([x[0], x[1]], t, text, [0, 0], max_tokens=200)
    assert low.dtype == torch.float32
    err = (low - ref).abs().max() / ref.abs().max()
    print("bf16 relative error", err.item())
    assert 0 < err < 0.05, err                    # bf16 really ran, and stayed close
    assert (torch.stack(packed) - ref).abs().max() / ref.abs().max() < 0.05


# ----- T5 text encoder -----

CAPTIONS = [f"a {c} {s} moves {d}" for c in ("red", "green", "blue", "yellow")
            for s in ("circle", "square")
            for d in ("left", "right", "up", "down")]


def test_tiny_t5_word_level_and_text_encoder(tmp_path):
    from transformers import T5Tokenizer
    dit.build_tiny_t5(tmp_path / "t5", CAPTIONS, d_model=64)
    tok = T5Tokenizer.from_pretrained(str(tmp_path / "t5"))
    ids = [tuple(tok(c).input_ids) for c in CAPTIONS]
    assert len(set(ids)) == len(CAPTIONS)           # distinct captions stay distinct (no collapse)
    assert len(ids[0]) == 6                         # word level: 5 words + </s>
    enc = dit.TextEncoder(tmp_path / "t5", max_length=16)
    e = enc.encode(["a red circle moves left", "a blue square moves up"])
    assert e.shape == (2, 16, 64) and enc.dim == 64
    assert (e[0] - e[1]).abs().max() > 1e-3 and torch.isfinite(e).all()
    assert torch.equal(enc.encode(["a red circle moves left"])[0], e[0])  # deterministic
    assert enc.zeros(3).shape == (3, 16, 64) and enc.zeros(1).abs().sum() == 0
    m = ExpertDiT(small())                          # the tiny DiT consumes it directly
    x, t, _ = inputs(m.cfg)
    assert m(x, t, enc.encode(["a", "b"])).shape == x.shape


def test_text_encoder_is_offline_and_names_a_missing_folder(tmp_path):
    # a repo-id-like string or a typo must be a clear local error, never a hub lookup
    for bad in (tmp_path / "nope", "google/t5-v1_1-xxl"):
        with pytest.raises(FileNotFoundError, match="text encoder folder"):
            dit.TextEncoder(bad)
    dit.build_tiny_t5(tmp_path / "t5", CAPTIONS, d_model=64)
    (tmp_path / "t5" / "spiece.model").unlink()  # encoder present, tokenizer gone
    (tmp_path / "t5" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        dit.TextEncoder(tmp_path / "t5")



def test_text_encoder_with_a_missing_or_extra_weight_is_refused(tmp_path):
    """A T5 file lacking a weight of its config, or holding one the config has no place for (a
    damaged export, another model's file): one ValueError naming the folder and the key.
    transformers only logs a load report and fills a missing weight with random numbers, so the
    DiT was conditioned on a partly random T5 with no error."""
    from safetensors.torch import load_file, save_file
    dit.build_tiny_t5(tmp_path / "t5", CAPTIONS, d_model=16, heads=2, d_ff=32)
    f = tmp_path / "t5" / "model.safetensors"
    good = load_file(f)
    gone = "encoder.block.1.layer.0.SelfAttention.k.weight"
    for sd, key in (({k: v for k, v in good.items() if k != gone}, gone),
                    ({**good, "encoder.block.2.layer.1.DenseReluDense.wo.weight":
                      torch.zeros(16, 32)}, "encoder.block.2.layer.1.DenseReluDense.wo.weight")):
        save_file(sd, f, metadata={"format": "pt"})
        with pytest.raises(ValueError, match=f"{tmp_path / 't5'}.*{key}"):
            dit.TextEncoder(tmp_path / "t5")
    # a whole T5's other half (decoder, an untied LM head, as t5-v1_1-xxl has) is no error
    save_file({**good, "lm_head.weight": torch.zeros(256, 16),
               "decoder.final_layer_norm.weight": torch.ones(16)}, f, metadata={"format": "pt"})
    assert dit.TextEncoder(tmp_path / "t5").encode(["a"]).shape == (1, 226, 16)


def test_text_encoder_in_half_precision_files_loads_as_float32_unless_asked(tmp_path):
    """A T5 stored in bf16 (as released T5s are stored in half precision) loads as float32 when
    no dtype is given, whatever transformers' own default (5.x: the stored precision, which on an
    AVX2 CPU runs ~400x slower), and in bf16 when asked (sample.py --bf16)."""
    from transformers import T5EncoderModel
    dit.build_tiny_t5(tmp_path / "t5", CAPTIONS, d_model=16, heads=2, d_ff=32)
    m = T5EncoderModel.from_pretrained(tmp_path / "t5", dtype=torch.float32)
    m.to(torch.bfloat16).save_pretrained(tmp_path / "t5")
    assert dit.TextEncoder(tmp_path / "t5").model.dtype == torch.float32
    half = dit.TextEncoder(tmp_path / "t5", dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16 and half.encode(["a"]).dtype == torch.bfloat16


def test_build_tiny_t5_is_all_or_nothing(tmp_path, monkeypatch):
    """A kill while the tiny T5 is written (save_pretrained: config.json first, then the weights)
    left a folder with a config and no weights, which the demo's --resume took for its T5 and
    refused on every later run; now nothing is in place until the whole folder is; a rebuild
    replaces it."""
    from transformers import T5EncoderModel

    def killed(self, folder, **kw):
        (Path(folder) / "config.json").write_text("{}")
        raise KeyboardInterrupt
    real = T5EncoderModel.save_pretrained
    monkeypatch.setattr(T5EncoderModel, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        dit.build_tiny_t5(tmp_path / "t5", CAPTIONS, d_model=16, heads=2, d_ff=32)
    assert not (tmp_path / "t5").exists()
    monkeypatch.setattr(T5EncoderModel, "save_pretrained", real)
    for d in (16, 32):  # a build, then a rebuild over it
        assert dit.build_tiny_t5(tmp_path / "t5", CAPTIONS, d_model=d, heads=2, d_ff=32) == tmp_path / "t5"
        assert dit.TextEncoder(tmp_path / "t5").dim == d and not (tmp_path / "t5.part").exists()


def test_text_encoder_of_a_release_takes_the_tokenizer_beside_it(tmp_path):
    """A released folder keeps T5 in text_encoder/ and its tokenizer in tokenizer/: the folder,
    or its text_encoder/ alone (was: "tokenizer not found"), loads the same T5."""
    import shutil
    dit.build_tiny_t5(tmp_path / "t5", CAPTIONS, d_model=64)
    rel = tmp_path / "CogVideoX-5b"
    shutil.copytree(tmp_path / "t5", rel / "tokenizer")
    shutil.copytree(tmp_path / "t5", rel / "text_encoder")
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
        (rel / "text_encoder" / name).unlink()
    a, b = (dit.TextEncoder(f, max_length=8).encode(CAPTIONS[:2])
            for f in (rel, rel / "text_encoder"))
    assert torch.equal(a, b)


def test_cli_bad_values_one_line(capsys):
    cases = [(["--batch", "0"], "--batch must be >= 1, got 0"), (["--device", "tpu"], "not a device")]
    if not torch.cuda.is_available():  # the docstring's own --device cuda, on a CPU machine
        cases.append((["--device", "cuda"], "--device cuda: not available here; use cpu"))
    for argv, text in cases:
        with pytest.raises(SystemExit) as e:
            dit.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and text in err[-1], err
    dit.main(["--preset", "shapes", "--batch", "1"])  # the demo's DiT is small: a timed step too
    assert "forward+backward" in capsys.readouterr().out


def test_cli_full_preset_on_cpu_refuses_the_step_options(capsys):
    """A full preset on the CPU only counts parameters (meta device): --batch, --bf16 and
    --checkpointing, which set the timed step it never runs, were silently ignored (exit 0)."""
    for extra, named in [(["--bf16"], "--bf16"), (["--batch", "8"], "--batch"),
                         (["--checkpointing", "--bf16"], "--bf16, --checkpointing")]:
        with pytest.raises(SystemExit) as e:
            dit.main(["--preset", "cogvideox-2b", *extra])
        out, err = capsys.readouterr()
        assert e.value.code == 2 and not out, (extra, out)
        assert f"drop {named}" in err.strip().splitlines()[-1], err
    dit.main(["--preset", "cogvideox-2b"])  # the parameter count, as before
    assert "parameters (meta device" in capsys.readouterr().out


def test_cli_full_preset_on_cpu_by_any_name_counts_on_meta(capsys, monkeypatch):
    """--device cpu:0 is the CPU too: a full preset is counted on the meta device (the string was
    compared to "cpu", so cpu:0 built the real 5B in memory) and the step options are refused."""
    real = dit.ExpertDiT

    def only_on_meta(cfg):
        if torch.empty(0).device.type != "meta":
            pytest.fail("the full-size model was built in memory")
        return real(cfg)
    monkeypatch.setattr(dit, "ExpertDiT", only_on_meta)
    dit.main(["--preset", "cogvideox-5b", "--device", "cpu:0"])
    assert "parameters (meta device" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        dit.main(["--preset", "cogvideox-5b", "--device", "cpu:0", "--bf16"])
    assert e.value.code == 2 and "drop --bf16" in capsys.readouterr().err


def test_wrong_folder_kind_is_one_line(tmp_path):
    """A diffusers vae/ given as the transformer, or a diffusers transformer to our loader: named."""
    from diffusers import AutoencoderKLCogVideoX
    AutoencoderKLCogVideoX(block_out_channels=(8,), down_block_types=("CogVideoXDownBlock3D",),
                           up_block_types=("CogVideoXUpBlock3D",), norm_num_groups=4,
                           latent_channels=4).save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="'AutoencoderKLCogVideoX', not 'CogVideoXTransformer3DModel'"):
        ExpertDiT.from_diffusers(tmp_path / "vae")
    diffusers_model().save_pretrained(tmp_path / "transformer")
    with pytest.raises(ValueError, match="load it with ExpertDiT.from_diffusers"):
        ExpertDiT.load(tmp_path / "transformer")


def test_pipeline_folder_whose_transformer_lost_its_config_names_that_file(tmp_path):
    """A released folder copied part way (transformer/ without its config.json): the error names
    transformer/config.json (it named the pipeline folder's own config.json, which no release
    has, so sample.py --model-dir pointed the user at the wrong file)."""
    diffusers_model().save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "transformer" / "config.json").unlink()
    for load in (dit.diffusers_folder_config, ExpertDiT.from_diffusers):
        with pytest.raises(FileNotFoundError) as e:
            load(tmp_path)
        assert str(tmp_path / "transformer" / "config.json") in str(e.value), e.value


# ----- sequence parallel (Ulysses): 2 gloo ranks share every row -----

def test_sequence_parallel_two_ranks_equals_one_process(torchrun):
    """--sp 2: each rank runs half of every row's slots (text and video together, rows of 39 and 53
    tokens padded to an even count), all-to-all around attention. Unpacked and Frame Pack (dense and
    Segments), RoPE, sin-cos and 1.5 (temporal patch, ofs), with and without checkpointing (once
    with offloaded block inputs): outputs, input gradients and parameter gradients (averaged over
    the group, as DDP / FSDP do) equal one process."""
    worker = os.path.join(os.path.dirname(__file__), "_sp_worker.py")
    line = next(x for x in torchrun(worker, "dit").stdout.splitlines() if x.startswith("SPDIFF "))
    report = json.loads(line[len("SPDIFF "):])
    assert len(report) == 17 and "rope/packed/segments/offload" in report, sorted(report)
    assert "1.5/unpacked/auto" in report and "1.5/packed/segments/checkpointing" in report
    for case, r in report.items():
        assert min(r["scale"]) > 1e-2, (case, r)  # gradients that mean something
        assert max(r["out"], r["input_grad"], r["param_grad"]) <= 1e-5, (case, r)


def test_sequence_parallel_heads_must_divide():
    """A group size that does not divide the head count: one clear error before any collective."""
    m = ExpertDiT(small())                          # 4 heads
    m.sp = dit.SPGroup(group=None, size=3, rank=0)
    x, t, text = inputs(m.cfg)
    with pytest.raises(ValueError, match=r"4 attention heads do not divide by 3; use a group "
                                         r"size in \[1, 2, 4\]"):
        m(x, t, text)
