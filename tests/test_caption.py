"""Tests for caption.py (App. B, App. C): frame timestamps, the summary prompt, the JSONL manifest,
resume, bad videos, missing model folders and the prompt upsampler.

The models are tiny random ones built here and saved to a temp folder (a ViT + GPT-2
VisionEncoderDecoder and a GPT-2 causal LM, sharing a word-level tokenizer trained on the fly).
Random weights would emit BOS/UNK forever (empty captions), so each decoder is rigged to always emit
one chosen word: its final LayerNorm outputs a constant vector equal to that word's (enlarged)
embedding, and the tied output head then scores that word highest.
"""
import json
import os

import av
import numpy as np
import pytest
import torch

import caption
from caption import (PRESETS, SUMMARY_PROMPT, UPSAMPLER_PROMPT, FrameCaptioner, caption_videos,
                     clean_caption, load_llm, read_frames, summary_prompt, upsample_prompt)
import data
from data import BadVideo  # the one BadVideo: caption.py reads frames through data.py

WORDS = ("<pad> <s> </s> <unk> a red blue green circle square moves left right up down the on of "
         "slowly").split()
FPS = 4
CFG = PRESETS["tiny"]


# ----- helpers -----


def write_clip(path, n_frames, fps=FPS, size=32, step=6):
    """A grey clip whose frame i has value step*i: the picked frame is read back from its pixels."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps, options={"qp": "0"})
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(n_frames):
            f = av.VideoFrame.from_ndarray(np.full((size, size, 3), step * i, np.uint8),
                                           format="rgb24")
            for pkt in s.encode(f):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def _rig(gpt2, word):
    """Make a GPT-2 decoder emit `word` at every step (see the module docstring)."""
    wte, ln = gpt2.transformer.wte.weight, gpt2.transformer.ln_f
    with torch.no_grad():
        wte[WORDS.index(word)] *= 5
        ln.weight.zero_()
        ln.bias.copy_(wte[WORDS.index(word)])
    assert gpt2.lm_head.weight.data_ptr() == wte.data_ptr()  # tied head: the rig relies on it


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models as tm, pre_tokenizers
    from transformers import (GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, ViTConfig,
                              ViTImageProcessor, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    root = tmp_path_factory.mktemp("models")
    tok = Tokenizer(tm.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins word tokens with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)

    enc = ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=37)
    dec = GPT2Config(vocab_size=len(WORDS), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                     add_cross_attention=True, is_decoder=True, **ids)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 1, 0, 2
    ved = VisionEncoderDecoderModel(cfg)
    _rig(ved.decoder, "circle")
    frame_dir = root / "frame"
    ved.save_pretrained(frame_dir)
    tokenizer.save_pretrained(frame_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(frame_dir)

    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS), n_positions=1024, n_embd=32, n_layer=1,
                                    n_head=2, **ids))
    _rig(lm, "red")
    llm_dir = root / "llm"
    lm.save_pretrained(llm_dir)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    tokenizer.save_pretrained(llm_dir)
    return frame_dir, llm_dir


class Spy:
    """Wraps an LLM and records every (system, user) turn it is asked to continue."""

    def __init__(self, llm):
        self.llm, self.turns = llm, []

    def generate(self, turns, max_new_tokens=256):
        self.turns += turns
        if self.llm:
            return self.llm.generate(turns, max_new_tokens)
        return ["A red circle moves left."] * len(turns)


def grey_captioner(frames):
    """A stand-in frame captioner whose caption names the frame index encoded in the pixels."""
    return [f"frame {round(float(f.mean()) / 6)}" for f in frames]


# ----- frames every 2 s -----


@pytest.mark.parametrize("n_frames, times", [(40, [0, 2, 4, 6, 8]),  # 10 s clip: 5 frames (App. C)
                                              (42, [0, 2, 4, 6, 8, 10]),  # 10.5 s: a frame at 10 s
                                              (3, [0])])  # shorter than 2 s: the first frame only
def test_frames_every_two_seconds(tmp_path, n_frames, times):
    got_t, frames = read_frames(write_clip(tmp_path / "c.mp4", n_frames), every=2.0)
    assert got_t == [float(t) for t in times]
    # the frame on screen at second s is frame s * FPS: its grey value is 6 * s * FPS
    assert [round(float(f.mean()) / 6) for f in frames] == [t * FPS for t in times]
    assert all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in frames)


def test_max_frames_and_bad_videos(tmp_path, capsys):
    assert read_frames(write_clip(tmp_path / "c.mp4", 40), max_frames=2)[0] == [0.0, 2.0]
    err = capsys.readouterr().err  # a cut video says so: its later content never gets captioned
    assert "c.mp4: captioning its first 2 frames (0-2 s) only" in err and "--max-frames" in err
    # exactly fits, no cap, 0 and 2 s, < 2 s
    for n_frames, cap in [(40, 5), (40, None), (9, 2), (7, 1)]:
        times, _ = read_frames(write_clip(tmp_path / "d.mp4", n_frames), max_frames=cap)
        assert len(times) == (cap or 5) and capsys.readouterr().err == "", (n_frames, cap)
    assert read_frames(tmp_path / "d.mp4", max_frames=1)[0] == [0.0]  # 7 frames = 1.75 s: no cut
    # 9 frames: the frame at 2 s is cut
    assert read_frames(write_clip(tmp_path / "e.mp4", 9), max_frames=1)[0] == [0.0]
    assert "e.mp4: captioning its first 1 frames" in capsys.readouterr().err
    (tmp_path / "bad.mp4").write_bytes(os.urandom(2000))
    with pytest.raises(BadVideo, match="bad.mp4"):
        read_frames(tmp_path / "bad.mp4")


# ----- prompts and cleaning -----


def test_summary_prompt_has_every_caption_in_order():
    caps = {4.0: "a dog runs", 0.0: "a dog sits", 2.0: "a dog stands up"}
    text = summary_prompt(caps)
    where = [text.index(repr(c)) for c in ["a dog sits", "a dog stands up", "a dog runs"]]
    assert where == sorted(where)
    assert "image_captions={0.0: 'a dog sits', 2.0: 'a dog stands up', 4.0: 'a dog runs'}" in text
    assert "within 100 English words" in text and "Do not use introductory phrases" in text
    assert "A video captioning model" not in text  # the short-caption line only when there is one
    assert "'a dog in a park'" in summary_prompt(caps, short_caption="a dog in a park")


def test_clean_caption():
    assert (clean_caption("The video shows a red circle\nmoving left.")
            == "A red circle moving left.")
    assert clean_caption("Throughout the video, a cat naps.") == "A cat naps."
    # no verb: kept
    assert clean_caption("This video of a cat is fine.") == "This video of a cat is fine."
    long = " ".join(["word"] * 150)
    assert len(clean_caption(long).split()) == 100
    sent = "A cat sits. " * 40  # cut at the last whole sentence within 100 words
    out = clean_caption(sent)
    assert out.endswith(".") and len(out.split()) <= 100


def test_clean_caption_cuts_a_filler_with_its_commas():
    # "The cat, in the video, sits." left "The cat, sits."
    assert clean_caption("The cat, in the video, sits.") == "The cat sits."
    assert clean_caption("A cat sits, in the video.") == "A cat sits."
    assert clean_caption("A cat sits in the video, then jumps.") == "A cat sits then jumps."
    assert clean_caption("A dog runs throughout the video, and a cat sits.") == (
        "A dog runs and a cat sits.")


def test_clean_caption_keeps_content_words_and_whole_sentences():
    """The filler phrases go only where they end a phrase: "in the video game" is content (it read
    "A boy plays game world."); no space is left before the punctuation after a stripped phrase
    ("still ."); a sentence ending exactly at the word limit is kept (it was cut with the rest)."""
    assert clean_caption("A boy plays in the video game world.") == (
        "A boy plays in the video game world.")
    assert clean_caption("In the video game Minecraft, a player digs.") == (
        "In the video game Minecraft, a player digs.")
    assert clean_caption("Throughout the video call, she smiles.") == (
        "Throughout the video call, she smiles.")
    assert clean_caption("The cat sits still throughout the video.") == "The cat sits still."
    assert clean_caption("A dog barks in the video!") == "A dog barks!"
    assert clean_caption("In the video a dog barks.") == "A dog barks."
    ten = "A cat sits on the mat near the door now."  # 10 words
    assert clean_caption(" ".join([ten] * 11)) == " ".join([ten] * 10)  # 100 words, all whole


def test_clean_caption_of_a_prefix_only_is_no_caption(tmp_path):
    """A reply of only a boilerplate prefix or punctuation was cleaned to "." and written as the
    video's caption; it is no caption: the video fails (retried on the next run)."""
    for reply in ("The video shows.", "In the video.", ".", "...", " , "):
        assert clean_caption(reply) == "", reply
    assert clean_caption("猫.") == "猫."  # any script's words are content
    write_clip(tmp_path / "a.mp4", 8)
    stats = caption_videos([tmp_path / "a.mp4"], tmp_path / "o.jsonl", CFG, progress=False,
                           video_captioner=lambda path, times, frames: "The video shows.")
    assert stats["written"] == 0 and "returned an empty caption" in stats["failed"][0][1]
    assert (tmp_path / "o.jsonl").read_text() == ""


# ----- the pipeline and the manifest -----


def test_pipeline_writes_manifest(tmp_path, models, capsys):
    frame_dir, llm_dir = models
    clips = tmp_path / "clips"
    (clips / "sub").mkdir(parents=True)
    write_clip(clips / "a.mp4", 40)  # 10 s
    write_clip(clips / "sub" / "b.mp4", 16)  # 4 s
    (clips / "broken.mp4").write_bytes(os.urandom(3000))
    out = clips / "captions.jsonl"
    stats = caption.main([str(clips), "--frame-model", str(frame_dir), "--summary-model",
                          str(llm_dir), "--out", str(out), "--preset", "tiny"])
    assert stats["written"] == 2 and len(stats["failed"]) == 1
    assert "broken.mp4" in capsys.readouterr().err  # reported, and the run went on
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    # relative to the output folder
    assert [e["path"] for e in lines] == ["a.mp4", os.path.join("sub", "b.mp4")]
    for e in lines:
        assert (clips / e["path"]).is_file()
        assert isinstance(e["caption"], str) and e["caption"] and len(e["caption"].split()) <= 100
        assert set(e) == {"path", "caption", "frame_captions", "hash", *data.META}
        # the rigged VED speaks
        assert all(c.startswith("circle") for c in e["frame_captions"].values())
    assert list(lines[0]["frame_captions"]) == ["0.0", "2.0", "4.0", "6.0", "8.0"]
    assert list(lines[1]["frame_captions"]) == ["0.0", "2.0"]
    assert lines[0]["caption"].startswith("Red red")  # the rigged LLM's reply, cleaned


def test_manifest_readable_by_data(tmp_path):
    import data  # the shared manifest format
    write_clip(tmp_path / "a.mp4", 8)
    out = tmp_path / "m.jsonl"
    caption_videos([tmp_path / "a.mp4"], out, CFG, grey_captioner, Spy(None), progress=False)
    (entry,) = data.read_manifest(out)
    assert os.path.abspath(entry["path"]) == os.path.abspath(tmp_path / "a.mp4")
    assert (entry["caption"] == "A red circle moves left."
            and entry["frame_captions"] == {"0.0": "frame 0"})


def test_summary_prompt_through_pipeline(tmp_path, models):
    """Every frame caption reaches the summariser, in time order, inside the App. C prompt;
    batched across videos."""
    write_clip(tmp_path / "a.mp4", 40)
    write_clip(tmp_path / "b.mp4", 24)
    spy = Spy(load_llm(models[1]))
    stats = caption_videos([tmp_path], tmp_path / "out.jsonl", CFG, grey_captioner, spy,
                           progress=False)
    assert stats["written"] == 2 and len(spy.turns) == 2
    for (system, user), n in zip(spy.turns, [5, 3]):
        assert system == "" and user.startswith(SUMMARY_PROMPT[:60])
        # the frame at second s is frame 4s
        where = [user.index(f"'frame {4 * k}'") for k in range(0, 2 * n, 2)]
        assert where == sorted(where)
        assert f"'frame {4 * 2 * n}'" not in user  # no frame past the end


def test_resume_skips_done_videos(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    write_clip(clips / "a.mp4", 8)
    out = tmp_path / "out" / "captions.jsonl"  # outside the clips folder: absolute paths
    seen = []

    def counting(frames):
        seen.append(len(frames))
        return grey_captioner(frames)

    assert caption_videos([clips], out, CFG, counting, Spy(None), progress=False)["written"] == 1
    write_clip(clips / "b.mp4", 8)
    with open(out, "a") as f:
        f.write('{"path": "/torn/li')  # a crash mid-append leaves a partial last line
    seen.clear()
    stats = caption_videos([clips, clips / "a.mp4"], out, CFG, counting, Spy(None), progress=False)
    # only b.mp4 captioned
    assert stats == {"written": 1, "skipped": 1, "failed": []} and seen == [1]
    paths = [json.loads(l)["path"] for l in out.read_text().splitlines()]
    assert paths == [str((clips / "a.mp4").resolve()), str((clips / "b.mp4").resolve())]
    assert caption_videos([clips], out, CFG, counting, Spy(None), progress=False)["written"] == 0


def test_video_captioner_hook_and_short_captions(tmp_path):
    """An end-to-end captioner replaces both models; a manifest's captions become short captions."""
    write_clip(tmp_path / "a.mp4", 8)
    (tmp_path / "old.jsonl").write_text(json.dumps({"path": "a.mp4", "caption": "a grey square"})
                                        + "\n")
    calls = []

    def e2e(path, times, frames):
        calls.append((os.path.basename(path), times))
        return "The video shows a grey screen."

    caption_videos([tmp_path / "old.jsonl"], tmp_path / "new.jsonl", CFG, video_captioner=e2e,
                   progress=False)
    (entry,) = [json.loads(l) for l in (tmp_path / "new.jsonl").read_text().splitlines()]
    assert calls == [("a.mp4", [0.0])]
    assert entry["caption"] == "A grey screen." and entry["short_caption"] == "a grey square"
    spy = Spy(None)
    caption_videos([tmp_path / "old.jsonl"], tmp_path / "new2.jsonl", CFG, grey_captioner, spy,
                   progress=False)
    assert "'a grey square'" in spy.turns[0][1]  # Figure 7: the short caption joins the summary


def test_a_manifest_with_a_capital_extension_is_a_manifest(tmp_path):
    # OLD.JSONL was taken for a video: decoded, counted bad, its entries never captioned
    write_clip(tmp_path / "a.mp4", 8)
    (tmp_path / "OLD.JSONL").write_text(json.dumps({"path": "a.mp4", "caption": "a square"})
                                        + "\n")
    ((path, short, entry),) = caption.find_videos([tmp_path / "OLD.JSONL"])
    assert (path, short, entry["caption"]) == (tmp_path / "a.mp4", "a square", "a square")


def test_clips_of_one_file_are_captioned_from_their_start(tmp_path, capsys):
    """Manifest entries of one file with different "start"s are different clips: each is captioned
    from its start (they were merged into one, captioned from 0 s), its line keeps "start" and the
    entry's other fields; a clip listed twice is captioned once (and said so); resume is by clip."""
    write_clip(tmp_path / "a.mp4", 24)  # 6 s at 4 fps: frame i at i / 4 s
    m = tmp_path / "clips.jsonl"
    m.write_text("".join(json.dumps(dict(path="a.mp4", caption="", **e)) + "\n" for e in [
        {"start": 0.0, "scene": 1}, {"start": 3.0, "scene": 2},
        {"start": 3, "scene": 3},  # the clip above again
        {"start": 10.0, "scene": 4}]))  # past the end: fails, named
    calls = []

    def e2e(path, times, frames):
        calls.append((times, grey_captioner(frames)))
        return "A grey screen."

    out = tmp_path / "out.jsonl"
    stats = caption_videos([m], out, CFG, video_captioner=e2e, progress=False)
    assert calls == [([0.0, 2.0, 4.0], ["frame 0", "frame 8", "frame 16"]),
                     ([0.0, 2.0], ["frame 12", "frame 20"])]  # from 3 s: frames 12 and 20
    assert stats["written"] == 2 and stats["skipped"] == 0
    assert [r for _, r in stats["failed"]] == [f"{tmp_path / 'a.mp4'}: no frame at start=10s: "
                                               "the video ends at 5.75s"]
    assert "note: 1 inputs repeat a clip (same path and start)" in capsys.readouterr().err
    lines = data.read_manifest(out)
    assert [(e["start"], e["scene"]) for e in lines] == [(0.0, 1), (3.0, 2)]
    assert all(data.has_meta(e) and e["caption"] == "A grey screen." for e in lines)
    calls.clear()
    again = caption_videos([m], out, CFG, video_captioner=e2e, progress=False)
    assert again["written"] == 0 and again["skipped"] == 2 and calls == []


def test_frame_captioner_blip_and_chat_vlm(tmp_path):
    """The two other processor paths: BLIP (unprompted) and a LLaVA-style chat VLM (prompt via chat
    template, echoed prompt stripped): one caption per frame, at most max_new_tokens words each."""
    from tokenizers import Tokenizer, decoders, models as tm, pre_tokenizers
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration,
                              BlipImageProcessor, BlipProcessor, CLIPImageProcessor,
                              CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)

    torch.manual_seed(0)
    frames = list(np.random.default_rng(0).integers(0, 255, (3, 40, 50, 3), dtype=np.uint8))
    vocab = "[PAD] [UNK] [CLS] [SEP] [MASK] a red blue circle square moves left".split()
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    blip = tmp_path / "blip"
    text = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=37, encoder_hidden_size=32, bos_token_id=2, sep_token_id=3,
                pad_token_id=0, max_position_embeddings=64)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                  image_size=32, patch_size=16)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision,
                                            projection_dim=16)).save_pretrained(blip)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}),
                  BertTokenizerFast(str(tmp_path / "vocab.txt"))).save_pretrained(blip)
    caps = FrameCaptioner(blip, max_new_tokens=3)(frames)
    assert len(caps) == 3 and all(isinstance(c, str) and len(c.split()) <= 3 for c in caps)

    words = WORDS + "<image> user assistant describe this image in detail . :".split()
    tok = Tokenizer(tm.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    ft = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                 eos_token="</s>", unk_token="<unk>",
                                 extra_special_tokens={"image_token": "<image>"})
    chat = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    llava = tmp_path / "llava"
    clip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=clip, tokenizer=ft, chat_template=chat, patch_size=16,
                   vision_feature_select_strategy="full", num_additional_image_tokens=1,
                   image_token="<image>").save_pretrained(llava)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37,
                                                     num_hidden_layers=2, num_attention_heads=2,
                                                     image_size=32, patch_size=16),
                      text_config=LlamaConfig(vocab_size=len(words), hidden_size=32,
                                              intermediate_size=37, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=2,
                                              bos_token_id=1, eos_token_id=2, pad_token_id=0),
                      image_token_index=words.index("<image>"),
                      vision_feature_select_strategy="full", vision_feature_layer=-1)
    LlavaForConditionalGeneration(cfg).save_pretrained(llava)
    captioner = FrameCaptioner(llava, max_new_tokens=3)
    assert captioner.processor.chat_template
    caps = captioner(frames)
    # the ~10-word prompt is not echoed
    assert len(caps) == 3 and all(len(c.split()) <= 3 for c in caps)


def test_a_model_raising_on_one_video_does_not_stop_the_run(tmp_path, capsys):
    """Any exception on one video (not only BadVideo) fails that video alone: reported, skipped,
    the rest written."""
    # frames at 0 s | 0, 2 s | 0, 2, 4 s
    for name, n in [("a.mp4", 8), ("b.mp4", 12), ("c.mp4", 20)]:
        write_clip(tmp_path / name, n)

    def e2e(path, times, frames):
        if path.name == "b.mp4":
            raise RuntimeError("CUDA out of memory")
        return "A grey screen."
    stats = caption_videos([tmp_path], tmp_path / "o1.jsonl", CFG, video_captioner=e2e,
                           progress=False)
    assert stats["written"] == 2 and [os.path.basename(p) for p, _ in stats["failed"]] == ["b.mp4"]
    assert ("b.mp4: the video captioner raised RuntimeError: CUDA out of memory"
            in capsys.readouterr().err)

    calls = []

    # batched across videos: the batch with c.mp4's frame 16 (at 4 s) breaks
    def frames_fail_on_c(frames):
        calls.append(len(frames))
        if any(round(float(f.mean()) / 6) == 16 for f in frames):
            raise ValueError("bad frame")
        return grey_captioner(frames)
    stats = caption_videos([tmp_path], tmp_path / "o2.jsonl", CFG, frames_fail_on_c, Spy(None),
                           progress=False)
    assert stats["written"] == 2 and [os.path.basename(p) for p, _ in stats["failed"]] == ["c.mp4"]
    assert calls[:2] == [4, 2] and ("c.mp4: the frame captioner raised ValueError: bad frame"
                                    in capsys.readouterr().err)
    lines = [json.loads(l) for l in (tmp_path / "o2.jsonl").read_text().splitlines()]
    assert [l["path"] for l in lines] == ["a.mp4", "b.mp4"] and lines[1]["frame_captions"] == {
        "0.0": "frame 0", "2.0": "frame 8"}

    class FailingLLM:
        def generate(self, turns, max_new_tokens=256):
            if any("'frame 8'" in u for _, u in turns):
                raise KeyError("tokenizer")
            return ["A red circle."] * len(turns)
    stats = caption_videos([tmp_path], tmp_path / "o3.jsonl", CFG, grey_captioner, FailingLLM(),
                           progress=False)
    assert stats["written"] == 1 and sorted(os.path.basename(p) for p, _ in stats["failed"]) == [
        "b.mp4", "c.mp4"]


def test_a_model_or_hook_returning_no_text_fails_its_videos(tmp_path):
    """A --video-captioner returning None wrote the caption "None" (and counted the video done); a
    frame captioner returning fewer captions than frames shifted captions onto the next video's
    frames; a summariser returning fewer replies crashed the run (KeyError). Each fails its
    videos, named, and they are retried on the next run."""
    write_clip(tmp_path / "a.mp4", 8)  # 1 frame (0 s)
    write_clip(tmp_path / "b.mp4", 12)  # 2 frames (0, 2 s)
    out = tmp_path / "out.jsonl"
    stats = caption_videos([tmp_path / "a.mp4", tmp_path / "b.mp4"], out, CFG,
                           video_captioner=lambda path, times, frames: None, progress=False)
    assert stats["written"] == 0 and not out.read_text()
    assert [r.split(": ", 1)[1] for _, r in stats["failed"]] == [
        "the video captioner raised TypeError: returned NoneType, not a caption (str)"] * 2
    one_per_call = lambda frames: ["a red circle"]  # noqa: E731 - 1 caption for N frames
    stats = caption_videos([tmp_path / "a.mp4", tmp_path / "b.mp4"], out, CFG, one_per_call,
                           Spy(None), progress=False)
    (line,) = [json.loads(l) for l in out.read_text().splitlines()]
    assert line["path"] == "a.mp4" and line["frame_captions"] == {"0.0": "a red circle"}
    assert [os.path.basename(p) for p, _ in stats["failed"]] == ["b.mp4"]
    assert "returned 1 of type str, not 2 frame captions" in stats["failed"][0][1]

    class Mute:  # replies to no prompt
        def generate(self, turns, max_new_tokens=256):
            return []
    stats = caption_videos([tmp_path / "b.mp4"], out, CFG, grey_captioner, Mute(), progress=False)
    assert stats["written"] == 0 and "the summariser raised TypeError: returned 0" in (
        stats["failed"][0][1])


def test_cli_bad_input_one_line_errors(tmp_path, capsys):
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "caption.py")
    p = subprocess.run([sys.executable, script, "/nonexistent.mp4", "--out", str(tmp_path / "o.jsonl"),
                        "--video-captioner", "no_such_module:fn"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert ("Traceback" not in p.stderr
            and ": error: /nonexistent.mp4 does not exist" in last), p.stderr
    write_clip(tmp_path / "a.mp4", 8)
    (tmp_path / "notjson.jsonl").write_text(json.dumps({"path": "a.mp4"}) + "\n{oops\n")
    (tmp_path / "nopath.jsonl").write_text(json.dumps({"caption": "x"}) + "\n")
    (tmp_path / "done.jsonl").write_text('["a list"]\n')
    (tmp_path / "none").mkdir()  # nothing to caption is no success (it was exit code 0)
    (tmp_path / "empty.jsonl").write_text("")
    cases = [([str(tmp_path / "none")], "no videos in"),
             ([str(tmp_path / "empty.jsonl")], "no videos in"),
             ([str(tmp_path / "notjson.jsonl")], "notjson.jsonl:2: not JSON"),
             ([str(tmp_path / "nopath.jsonl")], 'nopath.jsonl:1: needs a "path"'),
             ([str(tmp_path / "a.mp4"), "--video-captioner", "no_such_module:fn"],
              "no_such_module"),
             ([str(tmp_path / "a.mp4"), "--video-captioner", "nocolon"], "module:function")]
    for argv, text in cases:
        with pytest.raises(SystemExit) as e:
            caption.main(argv + ["--out", str(tmp_path / "o.jsonl")])
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and text in err.strip().splitlines()[-1], (argv, err)
    assert not (tmp_path / "o.jsonl").exists()  # refused before any output
    with pytest.raises(SystemExit):  # an --out file that is not a manifest: named with its line
        caption.main([str(tmp_path / "a.mp4"), "--out", str(tmp_path / "done.jsonl"),
                      "--video-captioner", "x:y"])
    assert "done.jsonl:1 is not a manifest line" in capsys.readouterr().err


def grey_video(path, times, frames):  # a --video-captioner for the CLI (test_caption:grey_video)
    return "The video shows a grey screen."


def test_cli_out_that_is_an_input_is_refused(tmp_path, capsys):
    """An input manifest given as --out read as captioned: every entry skipped, "wrote 0", exit 0
    with nothing done; a video given as --out: a UnicodeDecodeError line. Both one line naming
    --out, exit code 2, the input kept."""
    write_clip(tmp_path / "a.mp4", 8)
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"path": "a.mp4", "caption": ""}) + "\n")
    for src in (m, tmp_path / "a.mp4"):
        before = src.read_bytes()
        with pytest.raises(SystemExit) as e:
            caption.main([str(src), "--out", str(src), "--video-captioner",
                          "test_caption:grey_video"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and "would overwrite the VIDEOS input; pass another --out" in \
            err[-1], err
        assert src.read_bytes() == before
    caption.main([str(m), "--out", str(tmp_path / "o.jsonl"), "--video-captioner",
                  "test_caption:grey_video"])  # the hook works: another --out is captioned
    assert json.loads((tmp_path / "o.jsonl").read_text())["caption"] == "A grey screen."


def test_done_reads_and_rewrites_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """Lines are written as UTF-8; the resume check read (and rewrote) them in the locale's
    encoding: a non-ASCII caption under an ASCII locale crashed it, others could mangle it."""
    import io
    line = json.dumps({"path": "a.mp4", "caption": "café, 猫"}, ensure_ascii=False) + "\n"
    out = tmp_path / "o.jsonl"
    out.write_bytes((line + '{"path": "b').encode("utf-8"))  # + a torn last line
    monkeypatch.setattr(io, "text_encoding", lambda enc, stacklevel=2: enc or "ascii")
    assert caption._done(out) == {(str(tmp_path / "a.mp4"), 0.0)}
    assert out.read_bytes() == line.encode("utf-8")


def test_done_reads_captions_holding_unicode_line_separators(tmp_path):
    """A caption (an LLM's reply) holding U+2028, U+2029 or U+0085 is written as is (ensure_ascii=False), and
    data.read_manifest reads the line; the resume check split lines with str.splitlines(), which breaks there,
    and refused the run's own output ("is not a manifest line: fix or delete it")."""
    out = tmp_path / "o.jsonl"
    lines = [json.dumps({"path": f"{c}.mp4", "caption": f"one{s}two"}, ensure_ascii=False) + "\n"
             for c, s in (("a", "\u2028"), ("b", "\u2029"), ("c", "\x85"))]
    out.write_text("".join(lines), encoding="utf-8")
    assert caption._done(out) == {(str(tmp_path / f"{c}.mp4"), 0.0) for c in "abc"}
    assert [e["caption"] for e in data.read_manifest(str(out))] == ["one\u2028two", "one\u2029two", "one\x85two"]


def test_torn_line_rewrite_uses_a_unique_temp_file(tmp_path, monkeypatch):
    out = tmp_path / "o.jsonl"
    out.write_text(json.dumps({"path": "a.mp4", "caption": "x"}) + '\n{"path": "b')
    renamed, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renamed.append(str(a)) or replace(a, b))
    assert caption._done(out) == {(str(tmp_path / "a.mp4"), 0.0)}
    assert (len(renamed) == 1 and f".tmp{os.getpid()}_" in renamed[0]
            and sorted(os.listdir(tmp_path)) == ["o.jsonl"])


# ----- local models only -----


def test_missing_model_folder_is_a_clear_error(tmp_path, models):
    with pytest.raises(FileNotFoundError,
                       match="frame captioner model folder .*nope.* never downloads"):
        FrameCaptioner(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="LLM model folder"):
        load_llm(tmp_path / "empty_dir_without_config")
    with pytest.raises(ValueError, match="frame captioner and a summariser"):
        caption_videos([tmp_path], tmp_path / "o.jsonl", CFG)
    with pytest.raises(SystemExit):
        caption.main([str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--frame-model",
                      str(models[0])])



def test_cli_bad_device_dtype_or_model_kind_is_one_line(tmp_path, models, capsys, monkeypatch):
    """An unusable --device, an unknown --dtype (before any model loads) or model folders of the
    wrong kind (--frame-model and --summary-model swapped): one line, exit code 2, no traceback."""
    write_clip(tmp_path / "a.mp4", 8)
    frame, llm = map(str, models)
    run = [str(tmp_path / "a.mp4"), "--out", str(tmp_path / "o.jsonl")]
    swapped = run + ["--frame-model", llm, "--summary-model", frame]
    cases = [(run + ["--frame-model", frame, "--summary-model", llm], ["--device", "cuda:99"],
              "--device cuda:99"),
             (["--upsample", "a cat", "--summary-model", llm], ["--device", "cuda:99"],
              "--device cuda:99"),
             (run + ["--video-captioner", "x:y"], ["--device", "nonsense"], "is not a device"),
             (run + ["--frame-model", frame, "--summary-model", llm], ["--dtype", "bf16"],
              "invalid choice: 'bf16'")]
    real = caption.FrameCaptioner, caption.load_llm
    monkeypatch.setattr(caption, "FrameCaptioner", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(caption, "load_llm", lambda *a, **k: pytest.fail("model loaded"))
    for argv, extra, text in cases + [(swapped, [], "--frame-model " + llm + ": cannot load")]:
        if not extra:  # the swapped folders: loading is what fails
            caption.FrameCaptioner, caption.load_llm = real
        with pytest.raises(SystemExit) as e:
            caption.main(argv + extra)
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert e.value.code == 2 and "Traceback" not in err and ": error: " in last, (argv, err)
        assert text in last, (argv, err)
    assert not (tmp_path / "o.jsonl").exists()


# ----- prompt upsampler (App. B) -----


def test_model_config_of_a_wrong_type_is_one_line(tmp_path, models, capsys):
    """A config.json value of the wrong type: transformers raises huggingface_hub's strict-dataclass
    error (no ValueError): one line naming the flag, exit code 2 (was a traceback)."""
    import shutil
    bad = tmp_path / "llm"
    shutil.copytree(models[1], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, n_embd="x")))
    write_clip(tmp_path / "a.mp4", 8)
    for argv in (["--upsample", "a cat", "--summary-model", str(bad)],
                 [str(tmp_path / "a.mp4"), "--out", str(tmp_path / "o.jsonl"), "--frame-model",
                  str(models[0]), "--summary-model", str(bad)]):
        with pytest.raises(SystemExit) as e:
            caption.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err, err
        assert "n_embd" in err.strip().splitlines()[-1], err


def test_upsample_prompt(models, capsys):
    class Fixed:
        def __init__(self, reply):
            self.reply, self.turns = reply, []

        def generate(self, turns, max_new_tokens=256):
            self.turns += turns
            return [self.reply]

    llm = Fixed('Sure! [ A red circle glides slowly\n to the left across a black floor. ]')
    assert (upsample_prompt("a red circle moves left", llm)
            == "A red circle glides slowly to the left across a black floor.")
    # App. B system prompt + the user's prompt
    assert llm.turns == [(UPSAMPLER_PROMPT, "a red circle moves left")]
    assert "square brackets" in UPSAMPLER_PROMPT and "single video description" in UPSAMPLER_PROMPT
    assert upsample_prompt("a cat", Fixed("  ")) == "a cat"  # empty reply: keep the user's prompt
    real = load_llm(models[1])
    assert upsample_prompt("a blue square", real, max_new_tokens=4) == "red red red red"
    text = real._text(UPSAMPLER_PROMPT, "a blue square")  # the tokenizer's chat template is used
    assert (text.startswith("system: You are part of a team")
            and text.endswith("user: a blue square\nassistant:"))
    caption.main(["--upsample", "a blue square", "--summary-model", str(models[1]), "--preset",
                  "tiny"])
    assert capsys.readouterr().out.strip() == "red " * 15 + "red"  # the tiny preset's token budget


def test_upsample_takes_a_bracketed_span_only_when_it_is_the_description():
    """A short bracketed tag inside a description was returned alone ("oil painting" for the whole
    reply); a reply cut by max_new_tokens before its "]" kept the "["."""
    class Fixed:
        def __init__(self, reply):
            self.reply = reply

        def generate(self, turns, max_new_tokens=256):
            return [self.reply]

    tagged = "A knight rides through a misty forest at dawn, painted as [oil painting] in gold."
    assert upsample_prompt("a knight", Fixed(tagged)) == (
        "A knight rides through a misty forest at dawn, painted as oil painting in gold.")
    assert upsample_prompt("a cat", Fixed("[A cat plays a grand piano in a sunlit")) == (
        "A cat plays a grand piano in a sunlit")
    wrapped = "Here it is: [A red circle glides to the left across a black floor.] Enjoy!"
    assert upsample_prompt("a circle", Fixed(wrapped)) == (
        "A red circle glides to the left across a black floor.")


# ----- a summariser / upsampler with a short context window -----


def short_llm(models, folder, n_positions):
    """The rigged GPT-2 LLM with only n_positions positions (the App. C prompt alone is ~260 tokens here)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS), n_positions=n_positions, n_embd=32, n_layer=1,
                                    n_head=2, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    _rig(lm, "red")
    lm.save_pretrained(folder)
    AutoTokenizer.from_pretrained(models[1]).save_pretrained(folder)
    return folder


def test_short_context_summariser_cuts_frame_captions(tmp_path, models, capsys):
    """A summariser whose context (400 tokens) is shorter than the App. C prompt plus five 40-word frame captions:
    the captions are cut to fit, with a warning, instead of every video failing on "index out of range"."""
    short = short_llm(models, tmp_path / "short", 400)
    clips = tmp_path / "clips"
    clips.mkdir()
    write_clip(clips / "a.mp4", 40)  # 5 frames
    write_clip(clips / "b.mp4", 24)  # 3 frames
    stats = caption.main([str(clips), "--frame-model", str(models[0]), "--summary-model", str(short),
                          "--out", str(tmp_path / "o.jsonl"), "--preset", "tiny", "--frame-tokens", "40"])
    err = capsys.readouterr().err
    assert stats["written"] == 2 and not stats["failed"], err
    assert "a.mp4: the summariser's context (400 tokens) holds the App. C prompt only with its frame captions " \
           "cut to" in err
    lines = [json.loads(l) for l in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert all(len(c.split()) == 40 for c in lines[0]["frame_captions"].values())  # the manifest keeps them whole


def test_short_context_keeps_fewer_frames_or_fails_clearly(tmp_path, models, capsys):
    write_clip(tmp_path / "a.mp4", 40)  # frames at 0, 2, 4, 6, 8 s
    llm = load_llm(short_llm(models, tmp_path / "short", 400))
    spy = Spy(llm)
    spy.fits = llm.fits  # the spy passes on what the LLM knows of its context
    spy.context = llm.context = 300  # room for about one frame caption next to the prompt and the 16-token reply
    long = lambda frames: [f"frame {round(float(f.mean()) / 6)} " + "red " * 30 for f in frames]  # noqa: E731
    stats = caption_videos([tmp_path / "a.mp4"], tmp_path / "o.jsonl", CFG, long, spy, progress=False)
    err = capsys.readouterr().err
    assert stats["written"] == 1 and "frame captions (evenly spaced), cut to 8 words" in err, err
    (user,) = [u for _, u in spy.turns]
    assert "'frame 0 red red red red red red ...'" in user and llm.fits(("", user), CFG.summary_tokens)
    spy.context = llm.context = 260  # not even the prompt and the reply: one clear error before any video is read
    with pytest.raises(ValueError, match=r"summariser's context \(260 tokens\) cannot hold the App. C prompt"):
        caption_videos([tmp_path / "a.mp4"], tmp_path / "o2.jsonl", CFG, long, spy, progress=False)
    tiny = short_llm(models, tmp_path / "tiny", 260)
    with pytest.raises(SystemExit) as e:
        caption.main([str(tmp_path / "a.mp4"), "--frame-model", str(models[0]), "--summary-model", str(tiny),
                      "--out", str(tmp_path / "o3.jsonl"), "--preset", "tiny"])
    assert e.value.code == 2 and "cannot hold the App. C prompt" in capsys.readouterr().err.splitlines()[-1]


def test_a_run_where_every_video_fails_exits_non_zero(tmp_path, models, capsys):
    (tmp_path / "broken.mp4").write_bytes(os.urandom(3000))
    with pytest.raises(SystemExit) as e:
        caption.main([str(tmp_path / "broken.mp4"), "--frame-model", str(models[0]), "--summary-model",
                      str(models[1]), "--out", str(tmp_path / "o.jsonl"), "--preset", "tiny"])
    assert e.value.code == 1 and "every one of the 1 videos failed" in capsys.readouterr().err


def test_short_context_upsampler(tmp_path, models, capsys):
    llm = load_llm(short_llm(models, tmp_path / "short", 400))
    assert upsample_prompt("a blue square", llm, max_new_tokens=4) == "red red red red"
    long = "a blue square moves left " * 400  # 2000 words: no room next to the App. B prompt
    assert upsample_prompt(long, llm, max_new_tokens=4) == long
    assert "2000-word prompt does not fit the upsampler's context (400 tokens)" in capsys.readouterr().err
    llm.context = 150  # the App. B prompt alone is ~150 tokens here
    with pytest.raises(ValueError, match=r"upsampler LLM's context \(150 tokens\) cannot hold the App. B prompt"):
        upsample_prompt("a blue square", llm, max_new_tokens=4)


@pytest.mark.parametrize("extra, text", [
    (["--every", "0"], "--every must be > 0 seconds"),  # would caption one frozen frame, then skip it as done
    (["--every", "-2"], "--every must be > 0 seconds"),
    (["--every", "inf"], "--every must be > 0 seconds and finite"),  # zero frames, then "done"
    (["--every", "nan"], "--every must be > 0 seconds and finite"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-frames", "0"], "--max-frames must be >= 1"),
    (["--out", "{tmp}"], "is a folder; pass a file path"),
    (["--out", "/proc/nope/o.jsonl"], "cannot create files in /proc"),  # /proc: no file can be created there
    # ignored before: the models (even a missing folder) by the hook, the videos by --upsample
    (["--frame-model", "/nonexistent"], "--video-captioner replaces both models, which --frame-model "
                                        "would set: drop them"),
    (["--dtype", "float16", "--frame-tokens", "9"], "which --frame-tokens, --dtype would set"),
    (["--upsample", "a cat"], "--upsample PROMPT prints one upsampled prompt and exits, captioning "
                              "nothing: drop VIDEOS, --out, --video-captioner"),
])
def test_cli_bad_values_before_any_work(tmp_path, capsys, monkeypatch, extra, text):
    write_clip(tmp_path / "a.mp4", 8)
    with pytest.raises(ValueError, match="--every"):  # the library function refuses it too
        caption_videos([tmp_path / "a.mp4"], tmp_path / "o.jsonl", caption.replace(CFG, every=0),
                       video_captioner=lambda *a: "x", progress=False)
    monkeypatch.setattr(caption, "caption_videos", lambda *a, **k: pytest.fail("work started"))
    argv = [str(tmp_path / "a.mp4"), "--video-captioner", "x:y", "--out", str(tmp_path / "o.jsonl")]
    with pytest.raises(SystemExit) as e:
        caption.main(argv + [v.format(tmp=tmp_path) for v in extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and text in err[-1], err


@pytest.mark.parametrize("extra", [["--summary-tokens", "512"], ["--max-words", "20"],
                                   ["--every", "1"], ["--frame-prompt", "x"]])
def test_upsample_refuses_the_captioning_options(tmp_path, capsys, monkeypatch, extra):
    """--upsample PROMPT uses the preset's upsample_tokens and prints the reply as it is: a
    --summary-tokens 512 (the budget of the --summary-model's other job), --max-words, --every,
    ... were silently ignored (exit 0). Refused in one line naming them, before the LLM loads."""
    monkeypatch.setattr(caption, "load_llm", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as e:
        caption.main(["--upsample", "a cat", "--summary-model", str(tmp_path)] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "--upsample PROMPT" in err[-1] and extra[0] in err[-1], err


def test_manifest_carries_the_metadata_training_plans_with(tmp_path):
    """Issue 17: every written entry has data.META (+ "hash"), probed from the video or carried
    from an input manifest as it is (never probed again), so training never has to probe."""
    write_clip(tmp_path / "a.mp4", 8)
    out = tmp_path / "m.jsonl"
    caption_videos([tmp_path / "a.mp4"], out, CFG, grey_captioner, Spy(None), progress=False)
    (entry,) = data.read_manifest(out)
    assert data.has_meta(entry) and len(entry["hash"]) == 32
    assert (entry["height"], entry["width"], entry["frames"], entry["fps"]) == (32, 32, 8, FPS)
    assert entry["duration"] == pytest.approx(8 / FPS, abs=1 / FPS)
    # an input manifest's fields are carried, not re-probed (a marker value shows which)
    meta = dict(height=32, width=32, frames=8, fps=FPS, duration=99.0, hash="x" * 32)
    (tmp_path / "old.jsonl").write_text(json.dumps({"path": "a.mp4", "caption": "a", **meta})
                                        + "\n")
    caption_videos([tmp_path / "old.jsonl"], tmp_path / "n.jsonl", CFG, grey_captioner,
                   Spy(None), progress=False)
    (entry,) = data.read_manifest(tmp_path / "n.jsonl")
    assert {k: entry[k] for k in meta} == meta


def test_a_frame_captioner_giving_no_frame_text_fails_its_video(tmp_path):
    """A frame captioner returning blank captions (a VLM emitting only special tokens decodes to
    "") gave the summariser an App. C prompt with nothing in it: it invented a caption, written
    as the video's (frame_captions all ""). The video fails, named, and is retried next run."""
    write_clip(tmp_path / "a.mp4", 12)  # 2 frames
    write_clip(tmp_path / "b.mp4", 8)  # 1 frame
    blank_a = lambda frames: [" " if len(frames) == 3 and i < 2 else "frame"  # noqa: E731
                              for i in range(len(frames))]  # a's two frames come first
    out = tmp_path / "o.jsonl"
    stats = caption_videos([tmp_path / "a.mp4", tmp_path / "b.mp4"], out, CFG, blank_a,
                           Spy(None), progress=False)
    assert stats["written"] == 1 and [os.path.basename(p) for p, _ in stats["failed"]] == [
        "a.mp4"] and "frame captioner returned no text" in stats["failed"][0][1]
    assert [e["path"] for e in map(json.loads, out.read_text().splitlines())] == ["b.mp4"]


def test_short_captioner_returning_blank_or_no_string(tmp_path):
    """The Panda-70M hook's reply was used as it came: whitespace became a "short_caption" of
    spaces in the manifest and a blank short-caption line in the App. C prompt; a non-string
    (a list, an object) reached the manifest or crashed json.dumps mid-batch (the run stopped,
    the batch's other videos unwritten). Blank counts as no short caption; a non-string fails
    its video, named, and the run goes on."""
    write_clip(tmp_path / "a.mp4", 8)
    write_clip(tmp_path / "b.mp4", 8)
    spy, out = Spy(None), tmp_path / "o.jsonl"
    stats = caption_videos([tmp_path / "a.mp4"], out, CFG, grey_captioner, spy,
                           short_captioner=lambda path, times, frames: " \n ", progress=False)
    (entry,) = data.read_manifest(out)
    assert stats["written"] == 1 and "short_caption" not in entry
    assert "A video captioning model" not in spy.turns[0][1]
    hook = lambda path, times, frames: object() if path.name == "a.mp4" else "grey"  # noqa: E731
    stats = caption_videos([tmp_path / "a.mp4", tmp_path / "b.mp4"], tmp_path / "o2.jsonl", CFG,
                           grey_captioner, Spy(None), short_captioner=hook, progress=False)
    assert stats["written"] == 1 and [os.path.basename(p) for p, _ in stats["failed"]] == ["a.mp4"]
    assert "returned object, not a short caption (str)" in stats["failed"][0][1]
    (entry,) = data.read_manifest(tmp_path / "o2.jsonl")
    assert entry["short_caption"] == "grey"


def test_done_drops_a_torn_line_cut_inside_a_utf8_character(tmp_path):
    """A crash (or a full disk) mid-append tears the last line at any byte, inside a multi-byte
    character too: the resume check decoded the whole file first and raised UnicodeDecodeError,
    so no run could resume until the file was fixed by hand."""
    line = json.dumps({"path": "a.mp4", "caption": "猫"}, ensure_ascii=False) + "\n"
    out = tmp_path / "o.jsonl"
    out.write_bytes(line.encode() + '{"path": "b.mp4", "caption": "猫'.encode()[:-1])
    assert caption._done(out) == {(str(tmp_path / "a.mp4"), 0.0)}
    assert out.read_bytes() == line.encode()


def test_done_reads_a_manifest_starting_with_a_byte_order_mark(tmp_path):
    """A "UTF-8 with BOM" --out (an editor's save) is read by data.read_manifest, but the resume
    check refused it: "o.jsonl:1 is not a manifest line (Unexpected UTF-8 BOM)"."""
    bom, line = b"\xef\xbb\xbf", json.dumps({"path": "a.mp4", "caption": "x"}).encode()
    out = tmp_path / "o.jsonl"
    for raw, kept in [(line + b"\n", line + b"\n"), (line + b'\n{"path": "b', line + b"\n"),
                      (line, line + b"\n")]:  # whole, a torn tail dropped, a newline added
        out.write_bytes(bom + raw)
        assert caption._done(out) == {(str(tmp_path / "a.mp4"), 0.0)}
        assert out.read_bytes() == bom + kept
        assert [e["caption"] for e in data.read_manifest(out)] == ["x"]


def test_done_keeps_a_whole_last_line_without_a_newline(tmp_path):
    """An --out manifest written by another tool may lack the final newline: its last line, a
    whole entry, was taken for a torn one and deleted from the file (an entry of a video not in
    this run was lost for good). It is kept; the next line starts on its own line."""
    write_clip(tmp_path / "b.mp4", 8)
    out = tmp_path / "o.jsonl"
    out.write_text(json.dumps({"path": "a.mp4", "caption": "kept"}))  # no "\n"
    stats = caption_videos([tmp_path / "b.mp4"], out, CFG, grey_captioner, Spy(None),
                           progress=False)
    assert stats["written"] == 1
    assert [(os.path.basename(e["path"]), e["caption"]) for e in data.read_manifest(out)] == [
        ("a.mp4", "kept"), ("b.mp4", "A red circle moves left.")]
