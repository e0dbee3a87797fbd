"""caption.py — the dense video caption pipeline (paper §3.4 "Video Caption", Figure 7, App. C)
and the prompt upsampler (App. B).

Why it exists: web videos come with short, vague or no text, and a text-to-video model can only follow
prompts as precise as the captions it was trained on. CogVideoX therefore re-captions every clip
(Figure 7):

    video --(one frame every 2 s, App. C)--> frames --(image captioner: CogVLM)--> {second: caption}
          --(optional short video caption: Panda-70M)--> short caption
          --(LLM summary with the App. C prompt: GPT-4, later a fine-tuned Llama 2)--> one dense caption

and later distils the whole chain into one end-to-end video captioner (CogVLM2-Caption, §3.4). At
inference the mirror problem appears: users type short prompts, so an LLM "upsamples" them into
training-like dense captions first (App. B, `upsample_prompt`, used by sample.py behind a flag).

Every model is a LOCAL Hugging Face folder (nothing is downloaded): the frame captioner is any
image-to-text model transformers loads with its processor + `generate` (VisionEncoderDecoder, BLIP,
LLaVA-style chat VLMs); the summariser / upsampler is any causal LM with its tokenizer (its chat
template when it has one). An end-to-end video captioner (e.g. CogVLM2-Caption with its own remote
code) plugs in as a Python function `fn(path, times, frames) -> caption` (`--video-captioner mod:fn`).

Run:
  python caption.py clips/ more.mp4 --frame-model DIR --summary-model DIR --out clips/captions.jsonl
  python caption.py clips/ --video-captioner my_cogvlm2:caption --out clips/captions.jsonl
  python caption.py --upsample "a cat plays piano" --summary-model DIR      # App. B, prints the result
  python -m pytest -q tests/test_caption.py

Output: JSONL, one line per video, the manifest format data.py reads:
  {"path": ..., "caption": ..., "frame_captions": {"0.0": ..., "2.0": ...}, "short_caption": ...?}
"path" is relative to the output file's folder when the video lies inside that folder (the folder can
then move as a whole), absolute otherwise. Re-running skips videos already in the output (resume);
a video that cannot be decoded, or on which a captioning model raises, is reported on stderr and
skipped (it is retried on the next run). A video longer than max_frames x every seconds is captioned
from its first max_frames frames only, with a warning. Bad input (a missing VIDEOS path, an input
manifest line that is not JSON or has no "path") stops the CLI before any model loads, with a
one-line error naming the file and line (exit code 2).

Shape legend:  N frames picked per video · H, W frame height, width · a frame is (H, W, 3) uint8 RGB
"""

import argparse
import importlib
import json
import os
import re
import sys
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

# ----------------------------------------------------------------------------- config


@dataclass
class CaptionConfig:
    every: float = 2.0  # App. C: "we extract one frame every two seconds for image captioning"
    max_frames: int = 32  # cap per video so a long clip cannot blow up the summary prompt
    frame_prompt: str = "Describe this image in detail."  # only for chat VLMs (LLaVA-style); VED/BLIP caption unprompted
    frame_tokens: int = 128  # max new tokens per frame caption
    summary_tokens: int = 256  # max new tokens of the summary (the word limit is applied after cleaning)
    max_words: int = 100  # App. C: "keep the description of this video within 100 English words"
    batch_size: int = 8  # frames per captioner call, and videos per summariser call
    upsample_tokens: int = 256  # max new tokens of an upsampled prompt (App. B)


PRESETS = {
    "default": CaptionConfig(),
    "tiny": CaptionConfig(max_frames=8, frame_tokens=8, summary_tokens=16, batch_size=4, upsample_tokens=16),
}

VIDEO_EXTS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif", ".mpg", ".mpeg", ".wmv", ".flv", ".ts"}


class BadVideo(ValueError):
    """A video that cannot be decoded (same meaning as data.BadVideo; kept local so caption.py stands alone)."""


# ----------------------------------------------------------------------------- prompts (App. B, App. C)

# App. C "Prompt for GPT-4 Summary", verbatim apart from layout; the paper's inline "\n" markers are
# real line breaks here. {new_captions} receives the frame captions as a dict {second: caption}.
SUMMARY_PROMPT = (
    "We extracted several frames from this video and described each frame using an image understanding "
    "model, stored in the dictionary variable 'image_captions: Dict[str: str]'. In 'image_captions', the key "
    "is the second at which the image appears in the video, and the value is a detailed description of the "
    "image at that moment. Please describe the content of this video in as much detail as possible, based on "
    "the information provided by 'image_captions', including the objects, scenery, animals, characters, and "
    "camera movements within the video.\n"
    "image_captions={new_captions}\n"
    "{short_caption}"
    "You should output your summary directly, and not mention variables like 'image_captions' in your "
    "response. Do not include '\\n' and the word 'video' in your response. Do not use introductory phrases "
    "such as: \"The video presents\", \"The video depicts\", \"This video showcases\", \"The video captures\" "
    "and so on.\n"
    "Please start the description with the video content directly, such as \"A man first sits in a chair, "
    "then stands up and walks to the kitchen....\"\n"
    "Do not use phrases like: \"as the video progressed\" and \"Throughout the video\".\n"
    "Please describe the content of the video and the changes that occur, in chronological order.\n"
    "Please keep the description of this video within 100 English words."
)

# Figure 7 feeds the Panda-70M short caption into the summary too, but App. C's prompt has no slot for
# it: this line is OUR addition, present only when a short caption exists.
SHORT_CAPTION_LINE = "A video captioning model summarised the whole video as: {short!r}\n"

# App. B "Zero-shot prompt for Text Upsampler", verbatim (the paper's text stops after two rules).
# The paper notes a fine-tuned LLM upsamples better than zero/few-shot; any local LLM folder works here.
UPSAMPLER_PROMPT = (
    "You are part of a team of bots that create videos. You work with an assistant bot that will draw "
    "anything you say in square brackets. For example, outputting \" a beautiful morning in the woods with "
    "the sun peaking through the trees \" will trigger your partner bot to output a video of a forest "
    "morning, as described. You will be prompted by people looking to create detailed, amazing videos. The "
    "way to accomplish this is to take their short prompts and make them extremely detailed and descriptive. "
    "There are a few rules to follow :\n"
    "You will only ever output a single video description per user request.\n"
    "When modifications are requested, you should not simply make the description longer. You should "
    "refactor the entire description to integrate the suggestions."
)


def summary_prompt(frame_captions, short_caption=None):
    """App. C prompt for one video. frame_captions: {second (float): caption}, in time order."""
    captions = {float(t): c for t, c in sorted(frame_captions.items())}  # "{second: caption}", chronological
    short = SHORT_CAPTION_LINE.format(short=short_caption) if short_caption else ""
    return SUMMARY_PROMPT.format(new_captions=repr(captions), short_caption=short)


# The introductory phrases App. C forbids; small LLMs produce them anyway, so they are also stripped.
_INTRO = re.compile(
    r"^(?:(?:the|this) (?:video|clip|footage) (?:shows|presents|depicts|showcases|captures|features|displays|"
    r"begins with|opens with|starts with)(?: that)?|(?:in|throughout) (?:the|this) (?:video|clip|footage))\s*[:,]?\s*",
    re.I)
_FILLER = re.compile(r"\b(?:throughout the video|as the video progress(?:es|ed)|in the video)\s*,?\s*", re.I)


def clean_caption(text, max_words=100):
    """Enforce App. C's output rules on a summary: one line, no "The video shows…", <= max_words words."""
    text = " ".join(text.split()).strip(" \"'")  # no '\n' (App. C), collapse runs of spaces
    text = _FILLER.sub("", _INTRO.sub("", text)).strip()
    words = text.split()
    if len(words) > max_words:  # App. C: "within 100 English words"; cut at the last full sentence if one fits
        text = " ".join(words[:max_words])
        end = max(text.rfind(". "), text.rfind("! "), text.rfind("? "))
        text = text[:end + 1] if end > len(text) // 2 else text
    return text[:1].upper() + text[1:]


# ----------------------------------------------------------------------------- frames every 2 s (App. C)


def _to_rgb(frame):
    """A decoded av.VideoFrame -> (H, W, 3) uint8, turned upright when the stream carries a display rotation."""
    rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3)
    k = round((getattr(frame, "rotation", 0) or 0) / 90) % 4  # PyAV: degrees counter-clockwise, as ffmpeg displays
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb  # (W, H, 3) after a quarter turn


def read_frames(path, every=2.0, max_frames=None):
    """Decode `path` and return (times, frames): the frame on screen at 0, every, 2*every, ... seconds.

    times: list of floats [0.0, 2.0, ...]; frames: list of N arrays (H, W, 3) uint8. A 10 s clip gives
    5 frames (0..8 s). At most max_frames frames: a longer video is cut there, with a warning on stderr
    (its later content never reaches the caption). Raises BadVideo(reason) when the file cannot be decoded."""
    import av  # local import: the upsampler path (sample.py) must not need PyAV

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise BadVideo(f"{path}: cannot open ({e})") from e
    times, frames = [], []
    with container:
        if not container.streams.video:
            raise BadVideo(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        # every frame is decoded in order: simple and exact (seeking lands on keyframes), and the
        # captioning models cost far more per picked frame than decoding the frames in between
        rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0  # only used when frames lack pts
        half = 0.5 / rate  # timestamps are rounded to the frame grid: accept a frame half a frame early
        start, prev, t, cut = None, None, 0.0, False
        full = lambda: bool(max_frames) and len(times) >= max_frames  # noqa: E731
        try:
            for i, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else i / rate
                start = t if start is None else start
                t -= start  # seconds from the first frame (streams may start at pts != 0)
                # the frame on screen at second s is the last one whose time is <= s; when this frame comes
                # later than the next target, the previous one was on screen then (handles gaps, GIFs)
                while prev is not None and t > len(times) * every + half and not cut:
                    cut = full()  # one more target exists past the cap: the video is cut here
                    if not cut:
                        times.append(len(times) * every)
                        frames.append(_to_rgb(prev))
                if cut:
                    break
                prev = frame
        except av.FFmpegError as e:
            if prev is None:
                raise BadVideo(f"{path}: cannot decode ({e})") from e
            tqdm.write(f"warning: {path}: decoding stopped early ({e})", file=sys.stderr)  # keep what decoded
        if prev is None:
            raise BadVideo(f"{path}: no decodable frames")
        if not cut and t + half >= len(times) * every:  # the last frame is still on screen at the last target
            cut = full()
            if not cut:
                times.append(len(times) * every)
                frames.append(_to_rgb(prev))
    if cut:
        tqdm.write(f"warning: {path}: captioning its first {len(times)} frames (0-{times[-1]:g} s) only; the rest "
                   f"is cut by max_frames={max_frames} (raise --max-frames)", file=sys.stderr)
    return times, frames


def find_videos(inputs):
    """Expand files, folders (recursive, by extension) and JSONL manifests into [(Path, short_caption)].

    A manifest's existing caption becomes the short caption (Figure 7's Panda-70M stage), so an old
    manifest with short captions can be re-captioned densely: `python caption.py old.jsonl ...`."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += [(p, None) for p in sorted(item.rglob("*")) if p.suffix.lower() in VIDEO_EXTS and p.is_file()]
        elif item.suffix == ".jsonl" and item.is_file():
            for n, line in enumerate(item.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:  # a bad line stops the run (naming file and line) rather than silently losing videos
                    e = json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{item}:{n}: not JSON ({err}); one {{\"path\": ...}} object per line") from None
                if not isinstance(e, dict) or not isinstance(e.get("path"), str):
                    raise ValueError(f"{item}:{n}: needs a \"path\" field (the video, relative to the manifest)")
                found.append((item.parent / e["path"], e.get("short_caption") or e.get("caption")))
        elif item.exists():
            found.append((item, None))  # any extension: a non-video file is reported as bad, not ignored
        else:
            raise FileNotFoundError(f"{item} does not exist: pass video files, folders of videos or .jsonl manifests")
    return found


# ----------------------------------------------------------------------------- local Hugging Face models


def _folder(folder, what):
    """Check a local model folder before transformers sees it (so it never tries the hub)."""
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} model folder {path} not found (no config.json): pass a local Hugging Face "
                                f"folder, e.g. one saved with save_pretrained(); caption.py never downloads models")
    return str(path)


def _dtype(name):
    return None if name in (None, "auto") else getattr(torch, name)


def _to(inputs, device, dtype):
    """Move processor outputs to the model's device; floating tensors (pixel_values) also to its dtype."""
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in inputs.items()}


class FrameCaptioner:
    """Any local image-to-text model: __call__(frames: list of (H, W, 3) uint8) -> list[str] (one caption each).

    The paper uses CogVLM (the recaptioner of SD3 / CogView3); any model with processor + generate
    stands in. VisionEncoderDecoder folders have no joint processor (an image processor + a tokenizer);
    BLIP-style processors caption unprompted; processors with a chat template (LLaVA-style) get
    cfg.frame_prompt as a user turn with the image."""

    def __init__(self, folder, frame_prompt=PRESETS["default"].frame_prompt, max_new_tokens=128,
                 device="cpu", dtype=None):
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        folder = _folder(folder, "frame captioner")
        kind = AutoConfig.from_pretrained(folder, local_files_only=True).model_type
        self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=_dtype(dtype))
        self.model.to(device).eval()
        if kind == "vision-encoder-decoder":  # image processor + tokenizer, no joint processor
            self.images, self.tokenizer = (AutoImageProcessor.from_pretrained(folder, local_files_only=True),
                                           AutoTokenizer.from_pretrained(folder, local_files_only=True))
            self.processor = None
        else:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.tokenizer = self.processor.tokenizer
            self.tokenizer.padding_side = "left"  # decoder-only VLMs continue the prompt: pad on the left
        self.prompt, self.max_new_tokens, self.device = frame_prompt, max_new_tokens, device

    @torch.no_grad()
    def __call__(self, frames):
        dtype = self.model.dtype
        if self.processor is None:
            inputs = self.images(images=frames, return_tensors="pt")  # pixel_values (N, 3, h, w)
        elif getattr(self.processor, "chat_template", None):
            turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            text = self.processor.apply_chat_template(turn, add_generation_prompt=True)
            inputs = self.processor(images=frames, text=[text] * len(frames), return_tensors="pt", padding=True)
        else:
            inputs = self.processor(images=frames, return_tensors="pt")
        inputs = _to(inputs, self.device, dtype)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)  # (N, L)
        prompt = inputs.get("input_ids")
        if prompt is not None and out.shape[1] >= prompt.shape[1] and torch.equal(out[:, :prompt.shape[1]], prompt):
            out = out[:, prompt.shape[1]:]  # decoder-only models echo the prompt: keep the new tokens only
        return [" ".join(s.split()) for s in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class LLM:
    """Any local causal LM + tokenizer: generate(list of (system, user)) -> list of replies (greedy).

    The summariser of App. C (GPT-4 in the paper, then a Llama 2 fine-tuned on 50k GPT-4 summaries)
    and the upsampler of App. B (GPT-4 zero-shot or a fine-tuned LLM). With a chat template the
    system text goes in a system turn (merged into the user turn if the template refuses one);
    without, system and user text are joined as plain text."""

    def __init__(self, folder, device="cpu", dtype=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = _folder(folder, "LLM")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.tokenizer.padding_side = "left"  # batched generation continues every row from its last token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=_dtype(dtype))
        self.model.to(device).eval()
        self.device = device

    def _text(self, system, user):
        if not self.tokenizer.chat_template:
            return f"{system}\n\n{user}\n\n" if system else f"{user}\n\n"
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        try:
            return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception:  # e.g. templates that raise on a system role: fold it into the user turn
            merged = [{"role": "user", "content": f"{system}\n\n{user}" if system else user}]
            return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def generate(self, turns, max_new_tokens=256):
        texts = [self._text(s, u) for s, u in turns]
        # a chat template already writes BOS and friends; plain text gets the tokenizer's specials
        enc = self.tokenizer(texts, return_tensors="pt", padding=True,
                             add_special_tokens=not self.tokenizer.chat_template)  # (B, L), left-padded
        enc = _to(enc, self.device, None)
        out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)  # (B, L + new)
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def load_llm(folder, device="cpu", dtype=None):
    """The upsampler / summariser LLM from a local folder (sample.py: `--upsample-model DIR`)."""
    return LLM(folder, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- prompt upsampler (App. B)


def upsample_prompt(prompt, llm, max_new_tokens=256):
    """App. B: rewrite a short user prompt into a detailed, training-like caption with an LLM.

    Returns one line of text; the bot is told its partner draws "anything you say in square brackets",
    so a bracketed reply is unwrapped. An empty reply falls back to the user's prompt unchanged."""
    reply = llm.generate([(UPSAMPLER_PROMPT, prompt)], max_new_tokens=max_new_tokens)[0]
    inside = re.findall(r"\[([^\]]+)\]", reply)
    text = " ".join((max(inside, key=len) if inside else reply).split()).strip(" \"'")
    return text or prompt


# ----------------------------------------------------------------------------- the dense caption pipeline (Figure 7)


def _failed(path, what, e):
    """A failure reason for the report: the file, the stage that failed and the error, on one line."""
    return path, " ".join(f"{path}: {what} raised {type(e).__name__}: {e}".split())


def _isolate(group, fn, what, failures):
    """fn(group) runs batched across videos; if it raises, rerun one video at a time, so only the
    video(s) that break the model fail (reported) and the rest of the group is still captioned.
    -> the videos that succeeded."""
    try:
        fn(group)
        return group
    except Exception:  # noqa: BLE001 - any model error: find the culprit below
        ok = []
        for g in group:
            try:
                fn([g])
                ok.append(g)
            except Exception as e:  # noqa: BLE001 - report and skip this video, the run goes on
                failures.append(_failed(g["path"], what, e))
        return ok


def caption_batch(videos, cfg, frame_captioner=None, summariser=None, video_captioner=None, short_captioner=None):
    """Caption a group of videos; returns (entries, failures).

    videos: [(path, short_caption or None)]. entries: dicts without "path" normalisation, one per
    good video, in order: {"path", "caption", "frame_captions", "short_caption"?}. failures: [(path, reason)].
    frame_captioner(frames) -> captions and summariser.generate(turns, max_new_tokens) -> replies are
    duck-typed (FrameCaptioner / LLM above); video_captioner(path, times, frames) -> caption replaces
    both (the paper's CogVLM2-Caption stage); short_captioner(path, times, frames) -> short caption
    stands in for Panda-70M when a video has no short caption. Any exception on one video (decoding or
    a model) fails that video only: it is listed in failures and the others go on."""
    good, failures = [], []
    for path, short in videos:
        try:
            times, frames = read_frames(path, cfg.every, cfg.max_frames)  # App. C: one frame every 2 s
            if short is None and short_captioner is not None:
                short = short_captioner(path, times, frames)  # Figure 7: Panda-70M short video caption
        except BadVideo as e:
            failures.append((path, str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - e.g. a decoder crash or the short captioner raising
            failures.append(_failed(path, "reading / short captioning", e))
            continue
        good.append(dict(path=path, short=short, times=times, frames=frames))

    def frame_captions(gs):  # Figure 7: dense image caption per frame, batched across the videos
        flat, caps = [f for g in gs for f in g["frames"]], []
        for i in range(0, len(flat), cfg.batch_size):
            caps += frame_captioner(flat[i:i + cfg.batch_size])
        for g in gs:
            n = len(g["frames"])
            g["frame_captions"], caps = dict(zip(g["times"], caps[:n])), caps[n:]  # {second: caption}

    def summaries(gs):  # App. C prompt as the user turn, batched across the videos
        turns = [("", summary_prompt(g["frame_captions"], g["short"])) for g in gs]
        for i in range(0, len(turns), cfg.batch_size):
            replies = summariser.generate(turns[i:i + cfg.batch_size], max_new_tokens=cfg.summary_tokens)
            for g, r in zip(gs[i:i + cfg.batch_size], replies):
                g["caption"] = r

    def end_to_end(gs):  # §3.4: one video captioner replaces frame captions + summary
        for g in gs:
            g["caption"], g["frame_captions"] = video_captioner(g["path"], g["times"], g["frames"]), {}

    if video_captioner is not None:
        good = _isolate(good, end_to_end, "the video captioner", failures)
    else:
        good = _isolate(good, frame_captions, "the frame captioner", failures)
        good = _isolate(good, summaries, "the summariser", failures)
    entries = []
    for g in good:
        caption = clean_caption(str(g["caption"]), cfg.max_words)
        if not caption:  # never write an empty caption into a training manifest
            failures.append((g["path"], f"{g['path']}: the captioner returned an empty caption"))
            continue
        e = {"path": g["path"], "caption": caption, "frame_captions": {str(float(t)): c for t, c in g["frame_captions"].items()}}
        if g["short"]:
            e["short_caption"] = g["short"]
        entries.append(e)
    return entries, failures


def _done(out):
    """Absolute paths already captioned in `out`; a torn last line (a crash mid-write) is dropped first."""
    if not out.exists():
        return set()
    text = out.read_text()
    if text and not text.endswith("\n"):  # crash mid-append: rewrite without the partial line (atomically)
        text = text[:text.rfind("\n") + 1]
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}_{uuid.uuid4().hex[:8]}")  # unique: no two runs share it
        try:
            tmp.write_text(text)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    done = set()
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                done.add(os.path.abspath(out.parent / json.loads(line)["path"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{out}:{n} is not a manifest line ({e}): fix or delete it, then re-run") from e
    return done


def caption_videos(inputs, out, cfg=None, frame_captioner=None, summariser=None, video_captioner=None,
                   short_captioner=None, progress=True):
    """Caption every video in `inputs` (files, folders, manifests) into the JSONL manifest `out`.

    Resumable: videos already in `out` are skipped. Each finished line is appended with one write +
    fsync, so an interrupted run leaves only whole lines (a torn one is dropped on the next run).
    Returns {"written": n, "skipped": n, "failed": [(path, reason)]}."""
    cfg = cfg or PRESETS["default"]
    if video_captioner is None and (frame_captioner is None or summariser is None):
        raise ValueError("need a frame captioner and a summariser (--frame-model, --summary-model), "
                         "or an end-to-end --video-captioner")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done, videos = _done(out), find_videos(inputs)
    todo, seen = [], set(done)
    for p, short in videos:  # resume: skip captioned videos (and a video listed twice)
        if os.path.abspath(p) not in seen:
            seen.add(os.path.abspath(p))
            todo.append((p, short))
    stats = {"written": 0, "skipped": len({os.path.abspath(p) for p, _ in videos} & done), "failed": []}
    root = os.path.abspath(out.parent)
    bar = tqdm(total=len(todo), desc="caption", unit="video", disable=not progress)
    with open(out, "a", encoding="utf-8") as f:
        for i in range(0, len(todo), cfg.batch_size):
            group = todo[i:i + cfg.batch_size]
            entries, failures = caption_batch(group, cfg, frame_captioner, summariser, video_captioner, short_captioner)
            for e in entries:
                p = os.path.abspath(e["path"])
                e["path"] = os.path.relpath(p, root) if p.startswith(root + os.sep) else p  # see the module docstring
                f.write(json.dumps(e, ensure_ascii=False) + "\n")  # one write per line: whole lines only
                f.flush()
                os.fsync(f.fileno())
            for path, reason in failures:
                tqdm.write(f"skipped {reason}", file=sys.stderr)  # reported (the reason names the file); the run goes on
            stats["written"] += len(entries)
            stats["failed"] += failures
            bar.update(len(group))
    bar.close()
    return stats


# ----------------------------------------------------------------------------- CLI


def _import_fn(spec):
    """'module:function' -> the function (the user's own code, e.g. a CogVLM2-Caption wrapper)."""
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--video/short-captioner expects module:function, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    return getattr(importlib.import_module(module), name)


def main(argv=None):
    p = argparse.ArgumentParser(description="Dense video captions (CogVideoX App. C) and prompt upsampling (App. B).")
    p.add_argument("videos", nargs="*", help="video files, folders of videos (recursive) or .jsonl manifests")
    p.add_argument("--out", help="output JSONL manifest (appended to; videos already in it are skipped)")
    p.add_argument("--frame-model", help="local HF image-to-text folder (the frame captioner)")
    p.add_argument("--summary-model", help="local HF causal LM folder (the summariser; also the --upsample LLM)")
    p.add_argument("--video-captioner", help="module:function(path, times, frames) -> caption; replaces both models")
    p.add_argument("--short-captioner", help="module:function(path, times, frames) -> short caption (Panda-70M stage)")
    p.add_argument("--upsample", metavar="PROMPT", help="print the App. B upsampled PROMPT and exit")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--every", type=float, help="seconds between captioned frames (App. C: 2)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-frames", type=int)
    p.add_argument("--max-words", type=int)
    p.add_argument("--frame-prompt")
    p.add_argument("--frame-tokens", type=int)
    p.add_argument("--summary-tokens", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the folder's)")
    a = p.parse_args(argv)
    over = {k: getattr(a, k) for k in ("every", "batch_size", "max_frames", "max_words", "frame_prompt",
                                       "frame_tokens", "summary_tokens") if getattr(a, k) is not None}
    cfg = replace(PRESETS[a.preset], **over)
    if a.upsample is not None:
        if not a.summary_model:
            p.error("--upsample needs --summary-model DIR (the LLM)")
        print(upsample_prompt(a.upsample, load_llm(a.summary_model, a.device, a.dtype), cfg.upsample_tokens))
        return None
    if not a.videos or not a.out:
        p.error("give VIDEOS and --out (or --upsample PROMPT)")
    try:  # bad input: one line (exit code 2) before any model loads, never a traceback
        find_videos(a.videos)  # a missing path, a manifest line that is not JSON or has no "path"
        _done(Path(a.out))  # an --out file whose lines are not manifest lines
        video_fn = _import_fn(a.video_captioner) if a.video_captioner else None
        short_fn = _import_fn(a.short_captioner) if a.short_captioner else None
    except (OSError, ValueError, ImportError, AttributeError) as e:
        p.error(" ".join(str(e).split()))
    if video_fn is None and not (a.frame_model and a.summary_model):
        p.error("give --frame-model DIR and --summary-model DIR, or --video-captioner module:function")
    try:
        frames = FrameCaptioner(a.frame_model, cfg.frame_prompt, cfg.frame_tokens, a.device, a.dtype) if video_fn is None else None
        llm = load_llm(a.summary_model, a.device, a.dtype) if video_fn is None else None
    except FileNotFoundError as e:
        p.error(str(e))  # one line, not a traceback
    stats = caption_videos(a.videos, a.out, cfg, frames, llm, video_fn, short_fn)
    print(f"wrote {stats['written']} | skipped {stats['skipped']} already done | failed {len(stats['failed'])} -> {a.out}")
    return stats


if __name__ == "__main__":
    main()
