"""dit.py: parameter counts, parity with diffusers on random weights, Frame Pack == unpacked, the
I2V input, checkpointing / autocast, save/load, the T5 wrapper.
Run: python -m pytest -q tests/test_dit.py (the compiled FlexAttention test: -m slow -k flex)"""
import json
import os
from dataclasses import asdict, replace

import pytest
import torch

import dit
from dit import DIT_PRESETS, DiTConfig, ExpertDiT

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

@pytest.mark.parametrize("name,count", [("cogvideox-2b", 1_693_783_872),
                                        ("cogvideox-5b", 5_570_283_072),
                                        ("cogvideox-5b-i2v", 5_570_283_072 + 16 * 3072 * 2 * 2)])
def test_parameter_counts(name, count):
    with torch.device("meta"):
        m = ExpertDiT(DIT_PRESETS[name])
    assert sum(p.numel() for p in m.parameters()) == count
    if name == "cogvideox-5b-i2v":   # the learned table: a buffer as released, or a parameter
        with torch.device("meta"):
            m = ExpertDiT(replace(DIT_PRESETS[name], learned_trainable=True))
        assert sum(p.numel() for p in m.parameters()) == count + (226 + 13 * 30 * 45) * 3072


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

def diffusers_model(rope=True, learned=False, seed=0):
    from diffusers import CogVideoXTransformer3DModel
    torch.manual_seed(seed)
    ref = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        time_embed_dim=32, text_embed_dim=16, num_layers=2, max_text_seq_length=5,
        sample_width=8, sample_height=6, sample_frames=9,  # latent 3x6x8
        use_rotary_positional_embeddings=rope, use_learned_positional_embeddings=learned).eval()
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
    assert ours.cfg.pos == "learned" and "pos" in dict(ours.named_buffers())
    print("learned", check_parity(ours, ref, [(3, 6, 8)]))


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
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "patch_size_t": 2}))
    with pytest.raises(ValueError, match="patch_size_t"):
        ExpertDiT.from_diffusers(tmp_path)


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

@pytest.mark.parametrize("pos", ["rope", "sincos", "learned"])
def test_packed_equals_alone(pos):
    m = randomize(ExpertDiT(small(pos=pos))).eval()
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
    print(pos, "packed vs alone", diff)
    assert all(a.shape == b.shape for a, b in zip(out, alone))
    assert diff <= 1e-5


def test_packed_padding_no_nan_and_grads():
    m = randomize(ExpertDiT(small()))
    lat = [torch.randn(8, 1, 8, 8, requires_grad=True), torch.randn(8, 3, 8, 8)]
    text = torch.randn(2, 12, 64)
    # one row: 28 + 60 tokens + 112 padding
    out = m.forward_packed(lat, torch.tensor([10, 900]), text, [0, 0], max_tokens=200)
    loss = sum(o.square().mean() for o in out)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert torch.isfinite(lat[0].grad).all()


def test_pack_mask_block_diagonal():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mk = dit.pack_mask(seg)[0, 0]
    assert mk.shape == (6, 6) and mk[0, 1] and not mk[1, 2] and mk[2, 4]
    assert mk[5, 5] and not mk[5, 0]


def test_packed_flex_blockmask_eager(monkeypatch):
    """The BlockMask path, run with eager flex_attention (the compiled kernel: the slow test)."""
    from torch.nn.attention.flex_attention import flex_attention
    monkeypatch.setattr(dit, "compiled_flex", lambda: flex_attention)
    check_flex()


@pytest.mark.slow
def test_packed_flex_compiled():
    check_flex()


def check_flex():
    import warnings
    m = randomize(ExpertDiT(small())).eval()
    lat = [torch.randn(8, 3, 8, 8), torch.randn(8, 1, 8, 12), torch.randn(8, 2, 8, 8)]
    t, text = torch.tensor([5, 600, 999]), torch.randn(3, 12, 64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = m.forward_packed(lat, t, text, [0, 0, 0], max_tokens=200)
        m.flex = True
        flex = m.forward_packed(lat, t, text, [0, 0, 0], max_tokens=200)
    assert max((a - b).abs().max().item() for a, b in zip(dense, flex)) <= 1e-5


# ----- memory switches -----

def test_checkpointing_same_outputs_and_grads():
    m = randomize(ExpertDiT(small()))
    x, t, text = inputs(m.cfg)
    res = []
    for ck in (False, True):
        m.zero_grad()
        m.checkpointing = ck
        v = m(x, t, text)
        v.square().mean().backward()
        res.append((v.detach(), [p.grad.clone() for p in m.parameters()]))
    assert torch.allclose(res[0][0], res[1][0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(res[0][1], res[1][1]))


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
