"""caption.py — dense video captions and the prompt upsampler (paper §3.4, Figure 7, App. B-C).

Web videos come with short, vague or no text, and a text-to-video model follows prompts only as
precisely as its training captions, so CogVideoX re-captions every clip (Figure 7): one frame every
2 s (App. C) -> an image captioner (CogVLM) -> {second: caption} (+ an optional short video caption,
Panda-70M) -> an LLM summary with the App. C prompt (GPT-4, later a fine-tuned Llama 2) -> one dense
caption; later the chain is distilled into one video captioner (CogVLM2-Caption, §3.4). At
inference users type short prompts, so an LLM first "upsamples" them into training-like captions
(App. B, `upsample_prompt`, used by sample.py behind a flag). Frames are read through data.py.

Every model is a LOCAL Hugging Face folder (nothing is downloaded): the frame captioner is any
image-to-text model transformers loads with its processor + `generate` (VisionEncoderDecoder, BLIP,
LLaVA-style chat VLMs); the summariser / upsampler is any causal LM with its tokenizer (its chat
template when it has one). An end-to-end video captioner (e.g. CogVLM2-Caption with its own remote
code) plugs in as a function `fn(path, times, frames) -> caption` (`--video-captioner mod:fn`).
The output is a JSONL manifest that data.py reads (see `caption_videos`).

Run:
  python caption.py clips/ more.mp4 --frame-model DIR --summary-model DIR --out clips/captions.jsonl
  python caption.py clips/ --video-captioner my_cogvlm2:caption --out clips/captions.jsonl
  python caption.py --upsample "a cat plays piano" --summary-model DIR   # App. B, prints the result
  python -m pytest -q tests/test_caption.py

Shape legend:
  N frames picked per video, H x W frame size; a frame is (H, W, 3) uint8 RGB
"""

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import torch
from tqdm import tqdm

import data
from data import BadVideo


# ----- config -----

@dataclass
class CaptionConfig:
    every: float = 2.0  # App. C: "we extract one frame every two seconds for image captioning"
    max_frames: int = 32  # cap per video so a long clip cannot blow up the summary prompt
    # only for chat VLMs (LLaVA-style); VisionEncoderDecoder and BLIP caption unprompted
    frame_prompt: str = "Describe this image in detail."
    frame_tokens: int = 128  # max new tokens per frame caption
    summary_tokens: int = 256  # max new tokens of the summary (the word limit comes after cleaning)
    max_words: int = 100  # App. C: "keep the description of this video within 100 English words"
    batch_size: int = 8  # frames per captioner call, and videos per summariser call
    upsample_tokens: int = 256  # max new tokens of an upsampled prompt (App. B)


PRESETS = {
    "default": CaptionConfig(),
    "tiny": CaptionConfig(max_frames=8, frame_tokens=8, summary_tokens=16, batch_size=4,
                          upsample_tokens=16),
}


def check_config(cfg):
    """Bad CaptionConfig values as one ValueError (the CLI: one line, exit code 2). every <= 0
    would caption one frozen frame over and over, and the resumable output would then skip those
    videos as done."""
    if not (math.isfinite(cfg.every) and cfg.every > 0):  # inf: zero frames, "done"
        raise ValueError(f"--every must be > 0 seconds and finite (App. C: 2), got {cfg.every}")
    for k in ("batch_size", "max_frames", "max_words", "frame_tokens", "summary_tokens",
              "upsample_tokens"):
        if getattr(cfg, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(cfg, k)}")


# ----- prompts (App. B, App. C) -----

# App. C "Prompt for GPT-4 Summary", verbatim apart from layout; the paper's inline "\n" markers are
# real line breaks here. {new_captions} receives the frame captions as a dict {second: caption}.
SUMMARY_PROMPT = (
    "We extracted several frames from this video and described each frame using an image "
    "understanding model, stored in the dictionary variable 'image_captions: Dict[str: str]'. In "
    "'image_captions', the key is the second at which the image appears in the video, and the "
    "value is a detailed description of the image at that moment. Please describe the content of "
    "this video in as much detail as possible, based on the information provided by "
    "'image_captions', including the objects, scenery, animals, characters, and camera movements "
    "within the video.\n"
    "image_captions={new_captions}\n"
    "{short_caption}"
    "You should output your summary directly, and not mention variables like 'image_captions' in "
    "your response. Do not include '\\n' and the word 'video' in your response. Do not use "
    "introductory phrases such as: \"The video presents\", \"The video depicts\", \"This video "
    "showcases\", \"The video captures\" and so on.\n"
    "Please start the description with the video content directly, such as \"A man first sits in a "
    "chair, then stands up and walks to the kitchen....\"\n"
    "Do not use phrases like: \"as the video progressed\" and \"Throughout the video\".\n"
    "Please describe the content of the video and the changes that occur, in chronological order.\n"
    "Please keep the description of this video within 100 English words."
)

# Figure 7 feeds the Panda-70M short caption into the summary too, but App. C's prompt has no slot
# for it: this line is OUR addition, present only when a short caption exists.
SHORT_CAPTION_LINE = "A video captioning model summarised the whole video as: {short!r}\n"

# App. B "Zero-shot prompt for Text Upsampler", verbatim (the paper's text stops after two rules).
# The paper notes a fine-tuned LLM upsamples better than zero/few-shot; any local LLM folder works.
UPSAMPLER_PROMPT = (
    "You are part of a team of bots that create videos. You work with an assistant bot that will "
    "draw anything you say in square brackets. For example, outputting \" a beautiful morning in "
    "the woods with the sun peaking through the trees \" will trigger your partner bot to output a "
    "video of a forest morning, as described. You will be prompted by people looking to create "
    "detailed, "
    "amazing videos. The way to accomplish this is to take their short prompts and make them "
    "extremely detailed and descriptive. There are a few rules to follow :\n"
    "You will only ever output a single video description per user request.\n"
    "When modifications are requested, you should not simply make the description longer. You "
    "should refactor the entire description to integrate the suggestions."
)


def summary_prompt(frame_captions, short_caption=None):
    """App. C prompt for one video. frame_captions: {second (float): caption}, in time order."""
    captions = {float(t): c for t, c in sorted(frame_captions.items())}  # chronological
    short = SHORT_CAPTION_LINE.format(short=short_caption) if short_caption else ""
    return SUMMARY_PROMPT.format(new_captions=repr(captions), short_caption=short)


# The introductory phrases App. C forbids; small LLMs produce them anyway, so they are stripped.
# "in / throughout the video" only where it ends its phrase (punctuation, the end, or a word that
# cannot continue a noun after "video"): "in the video game" or "throughout the video call" is
# content, and stripping it turned "A boy plays in the video game world." into "A boy plays game
# world.".
_ENDS = (r"(?=\s*[,.;:!?]|\s*$|\s+(?:the|a|an|he|she|it|they|we|you|his|her|its|their|this|that|"
         r"these|those|there|and|while|as|then|when|where|with|is|are|was|were|at)\b)")
_INTRO = re.compile(
    r"^(?:(?:the|this) (?:video|clip|footage) (?:shows|presents|depicts|showcases|captures|"
    r"features|displays|begins with|opens with|starts with)(?: that)?|(?:in|throughout) "
    r"(?:the|this) (?:video|clip|footage)" + _ENDS + r")\s*[:,]?\s*", re.I)
_FILLER = re.compile(r"(?:,\s*)?\b(?:(?:throughout|in) the video" + _ENDS + r"|as the video "
                     r"progress(?:es|ed))\s*,?\s*", re.I)  # with its commas: "A, in the video, B"


def clean_caption(text, max_words=100):
    """Enforce App. C's output rules on a summary: one line, no "The video shows…",
    <= max_words. "" when no word is left (the caller fails the video)."""
    text = " ".join(text.split()).strip(" \"'")  # no '\n' (App. C), collapse runs of spaces
    text = " ".join(_FILLER.sub(" ", _INTRO.sub("", text)).split())
    text = re.sub(r"\s+(?=[.;:!?])", "", text)  # "sits still throughout the video." left "still ."
    words = text.split()
    if len(words) > max_words:  # App. C: "within 100 English words"; cut at the last full sentence
        text = " ".join(words[:max_words])
        # (+ " ": a sentence ending at the last word kept counts; it was dropped with the cut)
        end = max((text + " ").rfind(". "), (text + " ").rfind("! "), (text + " ").rfind("? "))
        text = text[:end + 1] if end > len(text) // 2 else text
    if not re.search(r"\w", text):  # "The video shows." left "." : no caption (the video fails)
        return ""
    return text[:1].upper() + text[1:]


# ----- frames every 2 s (App. C) -----

def read_frames(path, every=2.0, max_frames=None, start=None):
    """The frames of `path` on screen at 0, every, 2 * every, ... seconds -> (times, frames).

    times: floats [0.0, 2.0, ...]; frames: N arrays (H, W, 3) uint8, native size and upright
    (data.frames_every). A 10 s clip gives 5 frames (0..8 s). start: the clip begins that many
    seconds into the file (a manifest entry's "start"; times count from it). At most max_frames: a
    longer video is cut there, with a warning on stderr (its later content never reaches the
    caption). Raises BadVideo("path: reason") when the file cannot be decoded."""
    try:  # one frame more than max_frames tells whether the video is cut
        stop = max_frames + 1 if max_frames else None
        picked = list(islice(data.frames_every(path, every, start or 0.0), stop))  # [(s, frame)]
    except BadVideo as e:
        raise BadVideo(f"{path}: {e}") from None
    if max_frames and len(picked) > max_frames:
        picked = picked[:max_frames]
        tqdm.write(f"warning: {path}: captioning its first {max_frames} frames "
                   f"(0-{picked[-1][0]:g} s) only; the rest is cut by max_frames={max_frames} "
                   "(raise --max-frames)", file=sys.stderr)
    return [t for t, _ in picked], [f for _, f in picked]


def find_videos(inputs):
    """Expand files, folders (recursive, by extension) and JSONL manifests into
    [(Path, short, entry)]: entry is the manifest entry (None for a file), carried into the output.

    A manifest's existing caption becomes the short caption (Figure 7's Panda-70M stage), so an old
    manifest with short captions can be re-captioned densely: `python caption.py old.jsonl ...`.
    An entry's "start" (seconds) makes it a clip of its file: captioned from there, and told apart
    from other clips of the same file. A bad manifest line stops the run (ValueError naming file and
    line): no video is lost silently."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += [(p, None, None) for p in sorted(item.rglob("*"))
                      if p.suffix.lower() in data.VIDEO_EXTS and p.is_file()]
        elif item.suffix.lower() == ".jsonl" and item.is_file():  # X.JSONL too: not a video
            for e in data.read_manifest(item):  # (which checks "start")
                found.append((Path(e["path"]), e.get("short_caption") or e["caption"] or None, e))
        elif item.exists():
            found.append((item, None, None))  # any extension: a non-video file is reported as bad
        else:
            raise FileNotFoundError(f"{item} does not exist: pass video files, folders of videos "
                                    "or .jsonl manifests")
    return found


def _key(path, start):
    """What names one clip, for resuming and de-duplicating: (absolute path, start in seconds)."""
    return os.path.abspath(path), float(start or 0)


def _meta(path):
    """A captioned video's data.META fields (one probe; its frames were just read, so it is
    readable), or {} when the probe fails anyway (training then probes it)."""
    try:
        return data.media_info(path)
    except (data.BadVideo, OSError):
        return {}


# ----- local Hugging Face models -----

def _folder(folder, what):
    """Check a local model folder before transformers sees it (so it never tries the hub)."""
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} model folder {path} not found (no config.json): pass a "
                                "local Hugging Face folder, e.g. one saved with save_pretrained(); "
                                "caption.py never downloads models")
    return str(path)


def _dtype(name):
    return None if name in (None, "auto") else getattr(torch, name)


def _to(inputs, device, dtype):
    """Processor outputs to the model's device; floating ones (pixel_values) also to its dtype."""
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
            if torch.is_tensor(v) else v for k, v in inputs.items()}


class FrameCaptioner:
    """Any local image-to-text model: __call__(frames: N (H, W, 3) uint8) -> N captions.

    The paper uses CogVLM (the recaptioner of SD3 / CogView3); any model with processor + generate
    stands in. VisionEncoderDecoder folders have no joint processor (an image processor + a
    tokenizer); BLIP-style processors caption unprompted; processors with a chat template
    (LLaVA-style) get cfg.frame_prompt as a user turn with the image."""

    def __init__(self, folder, frame_prompt=PRESETS["default"].frame_prompt, max_new_tokens=128,
                 device="cpu", dtype=None):
        from transformers import (AutoConfig, AutoImageProcessor, AutoModelForImageTextToText,
                                  AutoProcessor, AutoTokenizer)

        folder = _folder(folder, "frame captioner")
        local = dict(local_files_only=True)
        kind = AutoConfig.from_pretrained(folder, **local).model_type
        self.model = AutoModelForImageTextToText.from_pretrained(folder, dtype=_dtype(dtype),
                                                                 **local)
        self.model.to(device).eval()
        if kind == "vision-encoder-decoder":  # image processor + tokenizer, no joint processor
            self.images = AutoImageProcessor.from_pretrained(folder, **local)
            self.tokenizer = AutoTokenizer.from_pretrained(folder, **local)
            self.processor = None
        else:
            self.processor = AutoProcessor.from_pretrained(folder, **local)
            self.tokenizer = self.processor.tokenizer
            self.tokenizer.padding_side = "left"  # decoder-only VLMs continue the prompt: pad left
        self.prompt, self.max_new_tokens, self.device = frame_prompt, max_new_tokens, device

    @torch.no_grad()
    def __call__(self, frames):
        if self.processor is None:
            inputs = self.images(images=frames, return_tensors="pt")  # pixel_values (N, 3, h, w)
        elif getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}, {"type": "text", "text": self.prompt}]
            text = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True)
            inputs = self.processor(images=frames, text=[text] * len(frames), return_tensors="pt",
                                    padding=True)
        else:
            inputs = self.processor(images=frames, return_tensors="pt")
        inputs = _to(inputs, self.device, self.model.dtype)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        prompt = inputs.get("input_ids")  # out: (N, L)
        if (prompt is not None and out.shape[1] >= prompt.shape[1]
                and torch.equal(out[:, :prompt.shape[1]], prompt)):
            out = out[:, prompt.shape[1]:]  # decoder-only models echo the prompt: drop it
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


class LLM:
    """Any local causal LM + tokenizer: generate([(system, user)]) -> list of replies (greedy).

    The summariser of App. C (GPT-4 in the paper, then a Llama 2 fine-tuned on 50k GPT-4 summaries)
    and the upsampler of App. B (GPT-4 zero-shot or a fine-tuned LLM). With a chat template the
    system text goes in a system turn (merged into the user turn if the template refuses one);
    without, system and user text are joined as plain text."""

    def __init__(self, folder, device="cpu", dtype=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = _folder(folder, "LLM")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.tokenizer.padding_side = "left"  # batched generation continues every row from its end
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                          dtype=_dtype(dtype))
        self.model.to(device).eval()
        self.device = device
        self.context = _context(self.model.config, self.tokenizer)  # tokens, or None: unknown

    def fits(self, turn, max_new_tokens):
        """Does the (system, user) turn leave room for max_new_tokens in the model's context? (A
        longer input makes a learned-position model fail with "index out of range".)"""
        if self.context is None:
            return True
        ids = self.tokenizer(self._text(*turn), add_special_tokens=not self.tokenizer.chat_template)
        return len(ids["input_ids"]) + max_new_tokens <= self.context

    def _text(self, system, user):
        if not self.tokenizer.chat_template:
            return f"{system}\n\n{user}\n\n" if system else f"{user}\n\n"
        turns = [{"role": "system", "content": system}] if system else []
        turns.append({"role": "user", "content": user})
        chat = lambda t: self.tokenizer.apply_chat_template(t, tokenize=False,  # noqa: E731
                                                            add_generation_prompt=True)
        try:
            return chat(turns)
        except Exception:  # e.g. templates that raise on a system role: fold it into the user turn
            return chat([{"role": "user", "content": f"{system}\n\n{user}" if system else user}])

    @torch.no_grad()
    def generate(self, turns, max_new_tokens=256):
        texts = [self._text(s, u) for s, u in turns]
        # a chat template already writes BOS and friends; plain text gets the tokenizer's specials
        enc = self.tokenizer(texts, return_tensors="pt", padding=True,
                             add_special_tokens=not self.tokenizer.chat_template)  # (B, L) left-pad
        enc = _to(enc, self.device, None)
        out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)  # (B, L + new)
        new = out[:, enc["input_ids"].shape[1]:]  # (B, new)
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


def _context(config, tokenizer):
    """The context window in tokens: the model's position limit, else the tokenizer's (when it
    is a real number, not transformers' "unlimited" placeholder), else None."""
    for k in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length",
              "seq_length"):
        v = getattr(config, k, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    return v if isinstance(v, int) and 0 < v < 10**8 else None


def load_llm(folder, device="cpu", dtype=None):
    """The upsampler / summariser LLM from a local folder (sample.py: `--upsample-model DIR`)."""
    return LLM(folder, device=device, dtype=dtype)


# ----- prompt upsampler (App. B) -----

def upsample_prompt(prompt, llm, max_new_tokens=256):
    """App. B: rewrite a short user prompt into a detailed, training-like caption with an LLM.

    Returns one line of text; the bot is told its partner draws "anything you say in square
    brackets", so a bracketed description is unwrapped (a short bracketed tag inside a longer
    reply is not taken for it: the reply is kept, without the brackets). An empty reply falls back
    to the user's prompt.
    An LLM whose context cannot hold the App. B prompt and the reply raises a one-line ValueError;
    a user prompt too long to fit next to it is returned as it is, with a warning (a prompt that
    long needs no upsampling)."""
    fits = getattr(llm, "fits", None)  # LLM knows its context; a duck-typed stand-in may not
    if fits and not fits((UPSAMPLER_PROMPT, ""), max_new_tokens):
        raise ValueError(f"the upsampler LLM's context ({llm.context} tokens) cannot hold the "
                         f"App. B prompt plus a {max_new_tokens}-token reply: use an LLM with a "
                         "longer context")
    if fits and not fits((UPSAMPLER_PROMPT, prompt), max_new_tokens):
        tqdm.write(f"warning: a {len(prompt.split())}-word prompt does not fit the upsampler's "
                   f"context ({llm.context} tokens) next to the App. B prompt: used as it is, not "
                   "upsampled", file=sys.stderr)
        return prompt
    reply = llm.generate([(UPSAMPLER_PROMPT, prompt)], max_new_tokens=max_new_tokens)[0]
    # the bracketed span when it is the description (more words than the rest: "Sure: [...]"); a
    # short one inside a description ("painted as [oil painting] with ...") is a tag of it, and a
    # reply cut by max_new_tokens has no "]": the brackets go, the words stay
    best = max(re.findall(r"\[([^\]]+)\]", reply), key=len, default="")
    rest = re.sub(r"\[[^\]]*\]", " ", reply)
    wrapped = best and len(best.split()) >= len(rest.split())
    text = best if wrapped else re.sub(r"[\[\]]", " ", reply)
    text = " ".join(text.split()).strip(" \"'")
    return text or prompt


# ----- fitting the App. C prompt to the summariser's context -----

MIN_WORDS = 8  # frame captions are never cut shorter than this: fewer frames are kept instead


def _largest(lo, hi, ok):
    """The largest k in [lo, hi] with ok(k), for ok true up to some k (binary search), or None."""
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def fit_summary_prompt(frame_captions, short_caption, fits):
    """The App. C prompt for one video, fitted to the summariser -> (prompt, note or None).

    fits(prompt) says whether the prompt leaves room for the reply. When the whole prompt does not
    fit, every frame caption is cut to the same number of words, as many as fit (at least
    MIN_WORDS); when even that is too long, an evenly spaced subset of the frames is kept (the
    first and last among them), cut to MIN_WORDS. note says what was done (for a warning). Raises
    ValueError when not even one frame caption fits."""
    caps = {float(t): c for t, c in sorted(frame_captions.items())}
    prompt = lambda c: summary_prompt(c, short_caption)  # noqa: E731
    if fits(prompt(caps)):
        return prompt(caps), None
    longest = max((len(c.split()) for c in caps.values()), default=0)

    def cut(c, k):  # every caption to at most k words
        return {t: " ".join(v.split()[:k]) + (" ..." if len(v.split()) > k else "")
                for t, v in c.items()}

    k = _largest(MIN_WORDS, longest - 1, lambda k: fits(prompt(cut(caps, k))))
    if k is not None:
        return prompt(cut(caps, k)), f"its frame captions cut to {k} words (of up to {longest})"
    times = list(caps)

    def subset(n):  # n evenly spaced frames (first and last included), captions cut
        keep = sorted({times[round(i * (len(times) - 1) / max(1, n - 1))] for i in range(n)})
        return cut({t: caps[t] for t in keep}, MIN_WORDS)

    n = _largest(1, len(times) - 1, lambda n: fits(prompt(subset(n))))
    if n is None:
        raise ValueError("the App. C prompt does not fit even with one frame caption")
    return (prompt(subset(n)), f"{len(subset(n))} of its {len(times)} frame captions (evenly "
            f"spaced), cut to {MIN_WORDS} words")


# ----- the dense caption pipeline (Figure 7) -----

def _failed(path, what, e):
    """A failure reason for the report: the file, the stage that failed and the error, one line."""
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


def _texts(out, n, what):
    """A model's or hook's output checked: n strings, else a TypeError (_isolate then fails the
    videos, named). A hook returning None wrote the caption "None" (and the video counted as
    done); fewer captions than frames shifted the rest onto the next video's frames."""
    out = list(out) if isinstance(out, (list, tuple)) else out
    if not isinstance(out, list) or len(out) != n or not all(isinstance(t, str) for t in out):
        got = (f"{len(out)} of type {'/'.join(sorted({type(t).__name__ for t in out}))}"
               if isinstance(out, list) else type(out).__name__)
        raise TypeError(f"returned {got}, not {n} {what} (str)")
    return out


def caption_batch(videos, cfg, frame_captioner=None, summariser=None, video_captioner=None,
                  short_captioner=None):
    """Caption a group of videos; returns (entries, failures).

    videos: [(path, short_caption or None, start in seconds or None)]. entries: one dict per good
    video, in order, paths as given: {"path", "caption", "frame_captions", "short_caption"?,
    "start"?}. failures: [(path, reason)].
    frame_captioner(frames) -> captions and summariser.generate(turns, max_new_tokens) -> replies
    are duck-typed (FrameCaptioner / LLM above); video_captioner(path, times, frames) -> caption
    replaces both (the paper's CogVLM2-Caption stage); short_captioner(path, times, frames) -> short
    caption stands in for Panda-70M when a video has none. Any exception on one video (decoding or
    a model) fails that video only: it is listed in failures and the others go on."""
    good, failures = [], []
    for path, short, start in videos:
        try:
            times, frames = read_frames(path, cfg.every, cfg.max_frames, start)  # App. C: every 2 s
            if short is None and short_captioner is not None:
                short = short_captioner(path, times, frames)  # Figure 7: Panda-70M short caption
                if short is not None and not isinstance(short, str):  # json.dumps would crash
                    raise TypeError(f"returned {type(short).__name__}, not a short caption (str)")
            short = short if short and short.strip() else None  # blank: no short caption at all
        except BadVideo as e:
            failures.append((path, str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - e.g. a decoder crash or the short captioner raising
            failures.append(_failed(path, "reading / short captioning", e))
            continue
        good.append(dict(path=path, short=short, start=start, times=times, frames=frames))

    def frame_captions(gs):  # Figure 7: dense image caption per frame, batched across the videos
        flat, caps = [f for g in gs for f in g["frames"]], []
        for i in range(0, len(flat), cfg.batch_size):
            part = flat[i:i + cfg.batch_size]
            caps += _texts(frame_captioner(part), len(part), "frame captions")
        for g in gs:
            n = len(g["frames"])
            g["frame_captions"], caps = dict(zip(g["times"], caps[:n])), caps[n:]  # {second: cap}

    def summaries(gs):  # App. C prompt as the user turn, batched across the videos
        turns = [("", g["prompt"]) for g in gs]
        for i in range(0, len(turns), cfg.batch_size):
            part = slice(i, i + cfg.batch_size)
            replies = summariser.generate(turns[part], max_new_tokens=cfg.summary_tokens)
            for g, r in zip(gs[part], _texts(replies, len(turns[part]), "replies")):
                g["caption"] = r

    def end_to_end(gs):  # §3.4: one video captioner replaces frame captions + summary
        for g in gs:
            caption = video_captioner(g["path"], g["times"], g["frames"])
            if not isinstance(caption, str):
                raise TypeError(f"returned {type(caption).__name__}, not a caption (str)")
            g["caption"] = caption
            g["frame_captions"] = {}

    if video_captioner is not None:
        good = _isolate(good, end_to_end, "the video captioner", failures)
    else:
        good = _isolate(good, frame_captions, "the frame captioner", failures)
        good = [g for g in good if _described(g, failures)]
        good = [g for g in good if _prompt(g, cfg, summariser, failures)]
        good = _isolate(good, summaries, "the summariser", failures)
    entries = []
    for g in good:
        caption = clean_caption(str(g["caption"]), cfg.max_words)
        if not caption:  # never write an empty caption into a training manifest
            failures.append((g["path"], f"{g['path']}: the captioner returned an empty caption "
                             "(or one with no words but 'The video shows'-style boilerplate)"))
            continue
        frame_captions = {str(float(t)): c for t, c in g["frame_captions"].items()}
        entries.append({"path": g["path"], "caption": caption, "frame_captions": frame_captions,
                        **({"short_caption": g["short"]} if g["short"] else {}),
                        **({"start": g["start"]} if g["start"] is not None else {})})
    return entries, failures


def _described(g, failures):
    """False, with the video in failures, when the frame captioner gave none of its frames any
    text: the summariser would invent a caption from the bare App. C prompt."""
    if any(c.strip() for c in g["frame_captions"].values()):
        return True
    failures.append((g["path"], f"{g['path']}: the frame captioner returned no text for any "
                     "frame"))
    return False


def _prompt(g, cfg, summariser, failures):
    """g["prompt"]: the App. C prompt of one video, fitted to the summariser's context (a warning
    says what was cut) -> False, with the video in failures, when it cannot fit."""
    fits = getattr(summariser, "fits", None)  # LLM knows its context; a stand-in may not
    if fits is None:
        g["prompt"] = summary_prompt(g["frame_captions"], g["short"])
        return True
    try:
        g["prompt"], note = fit_summary_prompt(g["frame_captions"], g["short"],
                                               lambda p: fits(("", p), cfg.summary_tokens))
    except ValueError as e:
        failures.append((g["path"], f"{g['path']}: {e} in the summariser's context "
                         f"({summariser.context} tokens, {cfg.summary_tokens} for the reply)"))
        return False
    if note:
        tqdm.write(f"warning: {g['path']}: the summariser's context ({summariser.context} tokens) "
                   f"holds the App. C prompt only with {note}", file=sys.stderr)
    return True


def _done(out):
    """The clips already captioned in `out`, as _key (absolute path, start); a torn last line (a
    crash mid-write) is dropped first, a whole one missing its newline gets it (the file is
    rewritten atomically)."""
    if not out.exists():
        return set()
    raw = out.read_bytes()  # bytes: a tear can cut a UTF-8 character, which would not decode
    if raw and not raw.endswith(b"\n"):  # crash mid-append: rewrite without the partial line
        cut = raw.rfind(b"\n") + 1
        try:  # a whole entry (another tool's file without the final newline) is kept: a JSON
            whole = isinstance(json.loads(raw[cut:]), dict)  # object ends only at its "}"
        except ValueError:
            whole = False
        raw = raw + b"\n" if whole else raw[:cut]
        data.atomic_write(out, lambda tmp: Path(tmp).write_bytes(raw))
    # as written, whatever the locale; -sig: a "UTF-8 with BOM" save, as data.read_manifest reads
    text = raw.decode("utf-8-sig")
    done = set()
    # split at "\n" only, as the lines were written: splitlines() also breaks at U+2028, U+2029
    # and U+0085, which json.dumps(ensure_ascii=False) leaves in a caption
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                e = json.loads(line)
                done.add(_key(out.parent / e["path"], e.get("start")))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{out}:{n} is not a manifest line ({e}): fix or delete it, then "
                                 "re-run") from e
    return done


def caption_videos(inputs, out, cfg=None, frame_captioner=None, summariser=None,
                   video_captioner=None, short_captioner=None, progress=True):
    """Caption every video in `inputs` (files, folders, manifests) into the JSONL manifest `out`.

    One line per video, the manifest format data.py reads: {"path", "caption", "frame_captions":
    {"0.0": ..., "2.0": ...}, "short_caption"?, "start"?} + data.META ("height", "width", "frames",
    "fps", "duration") and "hash", carried from an input manifest or probed; an input manifest
    entry's other fields are carried too. A manifest entry with a "start" is a clip of its file:
    captioned from there, apart from other clips of the file. "path" is relative to the output
    file's folder when the video lies inside it (the folder can then move as a whole), absolute
    otherwise. Resumable: clips (path and start) already in `out` are skipped. Each finished line
    is appended with one write + fsync, so an interrupted run leaves only whole lines (a torn one
    is dropped on the next run).
    A video that cannot be decoded, or on which a model raises or returns no text, is reported on
    stderr and skipped (retried on the next run).
    Returns {"written": n, "skipped": n, "failed": [(path, reason)]}."""
    cfg = cfg or PRESETS["default"]
    if video_captioner is None and (frame_captioner is None or summariser is None):
        raise ValueError("need a frame captioner and a summariser (--frame-model, "
                         "--summary-model), or an end-to-end --video-captioner")
    check_config(cfg)
    fits = getattr(summariser, "fits", None) if video_captioner is None else None
    one = summary_prompt({0.0: " ".join(["word"] * MIN_WORDS)})  # the least a video needs
    if fits and not fits(("", one), cfg.summary_tokens):
        raise ValueError(f"the summariser's context ({summariser.context} tokens) cannot hold the "
                         f"App. C prompt and a {cfg.summary_tokens}-token reply: use an LLM with a "
                         "longer context or lower --summary-tokens")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done, videos = _done(out), find_videos(inputs)
    keys = [_key(p, (e or {}).get("start")) for p, _, e in videos]  # clips of one file differ
    todo, seen, given = [], set(done), {}  # given: the input manifest's entry of each clip
    for k, (p, short, e) in zip(keys, videos):  # resume: skip captioned clips (and repeats)
        if k not in seen:
            seen.add(k)
            todo.append((p, short, (e or {}).get("start")))
            given[k] = e or {}
    if len(keys) > len(set(keys)):
        tqdm.write(f"note: {len(keys) - len(set(keys))} inputs repeat a clip (same path and start) "
                   "listed before; each clip is captioned once", file=sys.stderr)
    stats = {"written": 0, "skipped": len(set(keys) & done), "failed": []}
    root = os.path.abspath(out.parent)
    bar = tqdm(total=len(todo), desc="caption", unit="video", disable=not progress)
    with open(out, "a", encoding="utf-8") as f:
        for i in range(0, len(todo), cfg.batch_size):
            group = todo[i:i + cfg.batch_size]
            entries, failures = caption_batch(group, cfg, frame_captioner, summariser,
                                              video_captioner, short_captioner)
            for e in entries:
                p = os.path.abspath(e["path"])
                # the input entry's other fields (its data.META among them) are carried; a clip
                # read just now is not "unreadable"
                e.update({f: v for f, v in given[_key(p, e.get("start"))].items()
                          if f not in e and f != "unreadable"})
                if not data.has_meta(e):
                    e.update(_meta(p))  # so training never probes (data.META)
                e["path"] = os.path.relpath(p, root) if p.startswith(root + os.sep) else p
                f.write(json.dumps(e, ensure_ascii=False) + "\n")  # one write per line: whole lines
                f.flush()
                os.fsync(f.fileno())
            for path, reason in failures:  # reported (the reason names the file); the run goes on
                tqdm.write(f"skipped {reason}", file=sys.stderr)
            stats["written"] += len(entries)
            stats["failed"] += failures
            bar.update(len(group))
    bar.close()
    return stats


# ----- command line -----

CAPTION_ONLY = ("every", "batch_size", "max_frames", "max_words", "frame_prompt", "frame_tokens",
                "summary_tokens")  # CaptionConfig fields set by flags that --upsample never reads


def check_combination(a):
    """Options the run would silently ignore -> one ValueError naming them: --upsample prints one
    prompt and exits 0 without captioning the VIDEOS given; --video-captioner replaces the models
    (a missing --frame-model folder went unnoticed)."""
    def given(*pairs):
        return ", ".join(flag for flag, v in pairs if v not in (None, []))
    if a.upsample is not None:
        extra = given(("VIDEOS", a.videos), ("--out", a.out), ("--frame-model", a.frame_model),
                      ("--video-captioner", a.video_captioner),
                      ("--short-captioner", a.short_captioner),
                      # captioning's settings: the reply's budget is the preset's upsample_tokens
                      # (--summary-tokens is the summary's), and it is never cut to --max-words
                      *((f"--{k.replace('_', '-')}", getattr(a, k)) for k in CAPTION_ONLY))
        if extra:
            raise ValueError(f"--upsample PROMPT prints one upsampled prompt and exits, captioning "
                             f"nothing: drop {extra} (or drop --upsample to caption)")
    elif a.video_captioner:
        extra = given(("--frame-model", a.frame_model), ("--summary-model", a.summary_model),
                      ("--frame-prompt", a.frame_prompt), ("--frame-tokens", a.frame_tokens),
                      ("--summary-tokens", a.summary_tokens), ("--dtype", a.dtype))
        if extra:
            raise ValueError(f"--video-captioner replaces both models, which {extra} would set: "
                             f"drop them (or drop --video-captioner)")


def main(argv=None):
    p = argparse.ArgumentParser(description="Dense video captions (CogVideoX App. C) and prompt "
                                            "upsampling (App. B).")
    p.add_argument("videos", nargs="*", help="video files, folders of videos (recursive) or .jsonl "
                                             "manifests")
    p.add_argument("--out", help="output JSONL manifest (appended to; videos in it are skipped)")
    p.add_argument("--frame-model", help="local HF image-to-text folder (the frame captioner)")
    p.add_argument("--summary-model", help="local HF causal LM folder (the summariser; also the "
                                           "--upsample LLM)")
    p.add_argument("--video-captioner", help="module:function(path, times, frames) -> caption; "
                                             "replaces both models (their options are refused "
                                             "with it)")
    p.add_argument("--short-captioner", help="module:function(path, times, frames) -> short "
                                             "caption (Panda-70M stage)")
    p.add_argument("--upsample", metavar="PROMPT", help="print PROMPT upsampled (App. B) "
                   "with --summary-model, exit (no VIDEOS, --out, captioner or captioning option)")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--every", type=float, help="seconds between captioned frames (App. C: 2)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-frames", type=int)
    p.add_argument("--max-words", type=int)
    p.add_argument("--frame-prompt")
    p.add_argument("--frame-tokens", type=int)
    p.add_argument("--summary-tokens", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help="default: the folder's")
    a = p.parse_args(argv)
    over = {k: getattr(a, k) for k in CAPTION_ONLY if getattr(a, k) is not None}
    cfg = replace(PRESETS[a.preset], **over)
    try:  # torch would only fail at the first .to(), with a traceback
        check_config(cfg)
        check_combination(a)
        data.check_device(a.device)
    except ValueError as e:
        p.error(str(e))
    if a.upsample is not None:
        if not a.summary_model:
            p.error("--upsample needs --summary-model DIR (the LLM)")
        try:
            print(upsample_prompt(a.upsample, load_llm(a.summary_model, a.device, a.dtype),
                                  cfg.upsample_tokens))
        except (OSError, ValueError, *data.hf_config_errors()) as e:
            p.error(" ".join(str(e).split()))
        return None
    if not a.videos or not a.out:
        p.error("give VIDEOS and --out (or --upsample PROMPT)")
    try:  # bad input: one line (exit code 2) before any model loads, never a traceback
        data.check_writable(a.out, "--out")  # a folder or a read-only disk: now, not at the end
        # an input manifest as --out: its entries read as captioned, every one skipped, exit 0
        data.check_not_input([a.out], {v: "VIDEOS" for v in a.videos})
        # a missing path, a manifest line that is not JSON or has no "path"; nothing to caption
        if not find_videos(a.videos):
            raise ValueError(f"no videos in {' '.join(a.videos)}: pass video files, folders of "
                             "videos or .jsonl manifests with entries")
        _done(Path(a.out))  # an --out file whose lines are not manifest lines
        video_fn = (data.import_fn(a.video_captioner, "--video-captioner")
                    if a.video_captioner else None)
        short_fn = (data.import_fn(a.short_captioner, "--short-captioner")
                    if a.short_captioner else None)
    except (OSError, ValueError) as e:
        p.error(" ".join(str(e).split()))
    if video_fn is None and not (a.frame_model and a.summary_model):
        p.error("give --frame-model DIR and --summary-model DIR, or --video-captioner "
                "module:function")
    where, frames, llm = None, None, None  # where: the flag and folder being loaded
    try:
        if video_fn is None:
            where = f"--frame-model {a.frame_model}"
            frames = FrameCaptioner(a.frame_model, cfg.frame_prompt, cfg.frame_tokens, a.device,
                                    a.dtype)
            where = f"--summary-model {a.summary_model}"
            llm = load_llm(a.summary_model, a.device, a.dtype)
    except FileNotFoundError as e:
        p.error(str(e))  # one line, not a traceback
    # e.g. a folder of the wrong kind (the two swapped), a config value of the wrong type
    except (OSError, ValueError, *data.hf_config_errors()) as e:
        why = re.split(r"(?<=\.)\s", " ".join(str(e).split()))[0]  # transformers: a long list next
        p.error(f"{where}: cannot load it ({why}); pass an "
                "image-to-text model folder as --frame-model and a causal LM as --summary-model")
    try:
        stats = caption_videos(a.videos, a.out, cfg, frames, llm, video_fn, short_fn)
    except ValueError as e:  # e.g. a summariser whose context cannot hold the App. C prompt
        p.error(" ".join(str(e).split()))
    print(f"wrote {stats['written']} | skipped {stats['skipped']} already done | failed "
          f"{len(stats['failed'])} -> {a.out}")
    if stats["failed"] and not stats["written"]:  # nothing done is not a success
        print(f"error: every one of the {len(stats['failed'])} videos failed (reasons above)",
              file=sys.stderr)
        sys.exit(1)
    return stats


if __name__ == "__main__":
    main()
