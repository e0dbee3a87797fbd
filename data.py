"""data.py — video I/O, Frame Pack, progressive stages and data filters (paper §3, §3.1-§3.4).

Smallest piece first: the one video reader (`load_video`: any file -> (3, T, H, W) in [-1, 1], one
rotation rule, images are 1-frame videos as in §3) and writer (`write_video`, `contact_sheet`,
`atomic_write`); manifests; `VideoDataset`, which plans each sample's shape for a §3.2 `Stage`; the
§3.1 Frame Pack and bucket samplers, which number the GLOBAL batch; the §3.4 filters (cheap,
explainable scores in place of the paper's Video-LLaMA classifiers, plus a hook for a learned one);
`LatentCache` and `Prepared`, the DiT's dataset (cached VAE posterior + T5 text); the synthetic
shapes set the demo trains on ("a red circle moves to the left") and its checker `shapes_follow`.
The released code pads short clips to one length (pad_last_frame): that is mode="bucket" here.

How train.py uses it (every rank builds the same objects): VideoDataset(read_manifest(...), stage)
plans the shapes; FramePackSampler (or BucketSampler) yields this rank's keys (index, row, slot,
weight, n_global): slot numbers the global batch (0..n_global-1, -1 for a weight-0 filler), row is
the Frame Pack row that dit.forward_packed uses as is. The loader is make_loader(Prepared(...),
Requests(sampler, position)): one DataLoader per stage whose workers decode (no model in them);
LatentEncoder then VAE-encodes in the main process, on the training device, in batches.
train.draws draws every per-sample random quantity (timesteps laid over the slots' token mass,
diffusion.mass_strata_timesteps(slot_masses(...)); text dropout; the App. A condition noise) for
the whole global batch from a generator seeded by (seed, step, micro-batch), and each rank takes
its slots; noise tensors come from a generator keyed by (seed, step, micro-batch, slot, kind).
The loss weighs each sample that was actually read by its video tokens over the whole optimizer
step (train.dit_loss), so 2 DDP ranks equal one process on the combined batch (tested);
`weight` > 0 marks a real sample.

Run:
  python data.py shapes  --out shapes --n 400              # the toy set the demo trains on
  python data.py inspect shapes/manifest.jsonl --height 32 --width 32 --frames 9
  python data.py inspect raw.jsonl --write meta.jsonl   # + height, width, frames, fps, duration
  python data.py filter  shapes/manifest.jsonl --out shapes/kept.jsonl  # + .top20, .dropped.tsv
  python -m pytest -q tests/test_data.py
Everything runs on the CPU (no --device; under torchrun, train.py gives the samplers its rank).
Bad input (a missing manifest, a frame count that is not 4k+1, ...) is one line, exit code 2.

Shape legend:
  T frames (4k+1, an image is T = 1), H x W pixels, (3, T, H, W) one video in [-1, 1]
  T' = (T - 1) // tf + 1 latent frames, h = H // (sf * p), w = W // (sf * p), C latent channels
  L text tokens, D text width, R rows per rank, M = max_tokens per row, S samples on this rank
"""
import argparse
import hashlib
import importlib
import itertools
import json
import math
import os
import random
import re
import sys
import uuid
from collections import Counter, deque
from contextlib import closing
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# .mts/.m2ts: camcorders' AVCHD (MPEG-TS); .3gp: phones (MP4 family); ffmpeg reads all of them
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".gif", ".m4v", ".mpg", ".mpeg", ".wmv",
              ".flv", ".ts", ".mts", ".m2ts", ".3gp")


# ----- config: progressive stages (§3.2) and filter thresholds (§3.4) -----

@dataclass
class Stage:
    """One stage of §3.2 progressive training: what shapes the loader produces.

    resolutions: (H, W) buckets; each sample goes to the one nearest its aspect ratio
    frames:      allowed 4k+1 frame counts for clips (a clip gets the largest that it can fill)
    fps:         sampling rate in frames per second; None = every decoded frame (native rate)
    subset:      None, or a fraction: keep only the top fraction by the filters' "quality" score
                 (§3.2 "high-quality fine-tuning" on the best 20%)
    """
    resolutions: list
    frames: list
    fps: float = None
    subset: float = None


# Progressive schedules. "shapes" is the CPU demo (tiny VAE spatial factor 4 x patch 2 = 8, so every
# side is a multiple of 8). "cogvideox": §3.2's low -> high resolution, 256 px (the first-stage
# grid the released 2B's sin-cos table is scaled to: 480 / 1.875; §3.2 gives no sizes) -> 480, then
# the best 20%, ending at what the 1.0 models were released for: 49 frames (6 s at 8 fps, §1),
# 480x720. "cogvideox1.5": the later paper text (arXiv v2+: 10 s at 16 fps, 768x1360):
# 256 -> 480 -> 768 px with 6 s clips growing to 10 s, then the best 20% at 768x1360 and 10 s.
# At 16 fps 6 s is 97 frames and 10 s 161; 81 (5 s) is what the 1.5 release samples by default.
# The text gives sizes and durations only; the frame counts below them, the aspect buckets and
# the 16 fps of the early stages are ours (the 1.5 release runs at 16 fps).
_R10 = [(480, 720), (480, 480), (720, 480)]
_R15 = [(768, 1360), (768, 768), (1360, 768)]
STAGES = {
    "shapes": [Stage([(16, 16), (16, 24)], [1, 5, 9]), Stage([(32, 32), (32, 48)], [1, 9, 13, 17])],
    "cogvideox": [Stage([(256, 384), (256, 256), (384, 256)], [1, 17, 33, 49], fps=8),
                  Stage(_R10, [1, 17, 33, 49], fps=8),
                  Stage(_R10, [1, 17, 33, 49], fps=8, subset=0.2)],
    "cogvideox1.5": [Stage([(256, 448), (256, 256), (448, 256)], [1, 17, 33, 49, 81, 97], fps=16),
                     Stage([(480, 848), (480, 480), (848, 480)], [1, 17, 33, 49, 81, 97], fps=16),
                     Stage(_R15, [1, 49, 81, 97, 161], fps=16),
                     Stage(_R15, [1, 49, 81, 97, 161], fps=16, subset=0.2)],
}


@dataclass
class FilterConfig:
    """Thresholds of the explainable filters (each score is kept in the manifest: re-tune freely).

    Scores are computed on frames sampled at `fps`, center-cropped to size x size, at most
    max_frames (4k+1). Units: frame differences and brightness in [0, 1]."""
    fps: float = 4.0
    size: int = 64
    max_frames: int = 65
    # mean |frame difference| below this = "no motion" (lecture-like)
    min_motion: float = 0.002
    # a frame pair closer than this is a near-duplicate; more such pairs than max_static = frozen
    static_eps: float = 0.0005
    max_static: float = 0.5
    # a colour-histogram jump above this = scene cut (the paper's "lack of motion connectivity")
    max_cut: float = 0.4
    # nothing brighter than this (98th pct of max(R,G,B)) = too dark; nothing darker than
    # max_shadow (2nd pct of luma) = blown out
    min_highlight: float = 0.15
    max_shadow: float = 0.94
    min_seconds: float = 1.0
    # a learned classifier's negative-label probability above this drops the clip
    max_negative: float = 0.5


# ----- atomic writes and manifests -----

UMASK = os.umask(0o022)  # read the process's umask (only settable), then put it back
os.umask(UMASK)


NAME_MAX = 255  # the longest file name in bytes on ext4, xfs, btrfs, ZFS


def atomic_write(path, write, durable=True):
    """write(tmp), then rename tmp over path: readers see the old file or the new one, never half.

    The temp name is unique per process and call (two ranks or runs writing the same file never
    share one) and the temp file is removed if writing fails. Its bytes are fsynced before the
    rename and the folder after it: without the first, a power loss can leave the renamed file
    empty (ext4, xfs: the rename reaches the disk before the data); without the second, the old
    file. durable=False skips both (~5 ms a write here): for files made again when lost or torn
    (the latent cache's entries)."""
    suffix = f".tmp{os.getpid()}_{uuid.uuid4().hex[:8]}"
    tmp = f"{path}{suffix}"
    if len(os.fsencode(os.path.basename(tmp))) > NAME_MAX:  # a legal name near the limit has no
        # room for the suffix (it failed once the work was done): the temp file is the suffix
        tmp = os.path.join(os.path.dirname(path), suffix)
    try:
        write(tmp)
        # the permissions open() gives (0644 under the usual umask): safetensors writes owner-only
        os.chmod(tmp, 0o666 & ~UMASK)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:  # after a failure only: a replaced temp file no longer exists
        if os.path.exists(tmp):
            os.remove(tmp)
    if not durable:
        return
    try:  # (a folder cannot be opened or fsynced everywhere, e.g. on Windows: then skipped)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_not_input(outs, inputs, flag="--out"):
    """No output path may be an input file (a contact sheet over sample.py's --image, a
    reconstruction over vae.py's video): one ValueError naming both. inputs: {path: its flag}."""
    named = {os.path.realpath(p): f for p, f in inputs.items() if p}
    for out in outs:
        if os.path.realpath(out) in named:
            raise ValueError(f"{out} would overwrite the {named[os.path.realpath(out)]} input; "
                             f"pass another {flag}")


def check_name_length(path, flag):
    """Every name along `path` fits the file system (NAME_MAX bytes): one ValueError naming
    `flag`, before any work (the write at the end failed with "File name too long")."""
    for name in os.path.abspath(path).split(os.sep):
        n = len(os.fsencode(name))
        if n > NAME_MAX:
            raise ValueError(f"{flag} {path}: the name {name[:20]}... is {n} bytes, over the "
                             f"{NAME_MAX} a file system takes; pass a shorter one")


def check_writable(path, flag, folder=False):
    """Before any work: can `path` (a file, or a folder when folder=True) be written? Raises a
    one-line ValueError naming `flag` when it is a folder where a file is wanted (or the reverse),
    or when files cannot be created where it goes (a read-only disk, a missing permission, a
    parent that is a file). A probe file is created and removed in the nearest existing folder;
    nothing else is created. A name longer than NAME_MAX bytes is refused too."""
    check_name_length(path, flag)
    path = os.path.abspath(path)
    if os.path.isdir(path) and not folder:
        raise ValueError(f"{flag} {path} is a folder; pass a file path")
    if os.path.exists(path) and folder and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file; pass a folder (or a new path)")
    where = path if folder else os.path.dirname(path)
    while not os.path.exists(where):
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise ValueError(f"{flag} {path}: {where} is a file, not a folder; pass another path")
    probe = os.path.join(where, f".write_probe{os.getpid()}_{uuid.uuid4().hex[:8]}")
    try:
        if not os.access(where, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
        open(probe, "x").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create files in {where} ({e.strerror}); pass a "
                         f"writable location") from None


def json_object(path):
    """A config file (a model's config.json, sample.json, a scheduler's) -> its dict. Torn JSON,
    or JSON that is no object (a list, a number), is one ValueError naming the file and the fix;
    a missing file: FileNotFoundError."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); copy or export it again") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a JSON {type(d).__name__}, not an object of settings; "
                         "copy or export it again")
    return d


def index_shards(path):
    """A sharded safetensors model's index json -> the shard file names its weight_map lists (in
    the index's folder), sorted. Torn JSON, no weight_map of file names or a listed shard that is
    missing is one error naming the index and the fix (were KeyError / TypeError tracebacks or a
    bare JSON message). The index reader of dit.py and vae.py."""
    wm = json_object(path).get("weight_map")
    if not (isinstance(wm, dict) and all(isinstance(v, str) for v in wm.values())):
        raise ValueError(f"{path} has no weight_map of tensor -> shard file names; copy or export "
                         "the model again")
    shards = sorted(set(wm.values()))
    gone = [s for s in shards if not os.path.isfile(os.path.join(os.path.dirname(path), s))]
    if gone:  # a copy that stopped part way: the folder is incomplete, not the index wrong
        raise FileNotFoundError(f"{path} lists {gone[0]}, which is missing ({len(gone)} of "
                                f"{len(shards)} shards); copy the whole folder again")
    return shards


def hf_config_errors():
    """What transformers' from_pretrained raises for a config.json value of the wrong type besides
    ValueError: huggingface_hub's strict-dataclass error (hub 1.x; a plain Exception), which the
    CLIs' loaders catch next to OSError / ValueError; () with an older hub."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


def temporal_ratio(d, path):
    """A diffusers config's temporal_compression_ratio (default 4) as an int power of 2, or one
    ValueError naming the file. diffusers types the VAE's as float, so a released 4.0 is 4. The one
    reader of vae.py and dit.py."""
    r = d.get("temporal_compression_ratio", 4)
    if isinstance(r, float) and r.is_integer():
        r = int(r)
    if not (type(r) is int and r >= 1 and r & (r - 1) == 0):
        raise ValueError(f"{path}: temporal_compression_ratio = "
                         f"{d['temporal_compression_ratio']!r} is not a power of 2")
    return r


def config_from(cls, d, path):
    """A config file's dict -> cls(**d), every value of its dataclass field's type (a float field
    takes an int; a tuple field a list of ints): a hand-edited or damaged value is one ValueError
    naming the field and the file, not a TypeError deep in a model's construction or a string
    scaling factor failing mid-training."""
    ok = {bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          tuple: lambda v: isinstance(v, (list, tuple)) and all(
              isinstance(x, int) and not isinstance(x, bool) for x in v)}
    for f in fields(cls):
        if f.name in d and not ok[f.type](d[f.name]):
            kind = "a list of whole numbers" if f.type is tuple else f"of type {f.type.__name__}"
            raise ValueError(f"{path}: {f.name} = {d[f.name]!r} is not {kind}; fix it, or copy "
                             "or export the file again")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def check_device(name, flag="--device"):
    """A --device value the CLIs can run on -> torch.device, or a one-line ValueError naming the
    fix (before any model is loaded; torch would only fail at the first .to())."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{flag} {name!r} is not a device: use cpu, cuda or cuda:N") from None
    ok = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not ok.get(dev.type, False):
        why = "not supported" if dev.type not in ok else "not available"
        raise ValueError(f"{flag} {name}: {why} here; use {'cuda or ' if ok['cuda'] else ''}cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{flag} {name}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev


def _write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _is_image(path):
    return str(path).lower().endswith(IMAGE_EXTS)


def read_manifest(path):
    """JSONL manifest or a folder -> list of dicts: absolute "path", "caption", any extra fields.

    JSONL: one {"path": ..., "caption": ...} per line, paths relative to the manifest's folder.
    Folder: every video/image file, its caption in the same-named .txt beside it (missing -> "")."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        out = []
        for root, _, files in sorted(os.walk(path)):
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTS + VIDEO_EXTS):
                    p = os.path.join(root, name)
                    txt = os.path.splitext(p)[0] + ".txt"
                    try:  # utf-8-sig: a BOM (a "UTF-8 with BOM" save) is no caption text
                        caption = (Path(txt).read_text(encoding="utf-8-sig")
                                   if os.path.exists(txt) else "")
                    except UnicodeDecodeError:
                        raise ValueError(f"caption file {txt} is not UTF-8 text; save it as "
                                         "UTF-8") from None
                    out.append({"path": p, "caption": caption.strip()})
        return out
    if not os.path.exists(path):
        raise ValueError(f"manifest {path} does not exist; pass a .jsonl file or a video folder")
    base, out = os.path.dirname(path), []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named with its number
        for n, line in enumerate(f, 1):
            try:  # utf-8-sig on line 1: a "UTF-8 with BOM" file's first object is JSON too
                line = line.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{n}: not UTF-8 text; pass a UTF-8 JSONL manifest (one "
                                 "{\"path\", \"caption\"} object per line) or a folder of "
                                 "videos") from None
            if not line.strip():
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err}); one {{\"path\", \"caption\"}} "
                                 "object per line") from None
            if not isinstance(e, dict) or "path" not in e:
                raise ValueError(f"{path}:{n}: needs a \"path\" field")
            if e.get("caption") is None:  # none, or an uncaptioned video (pandas writes null)
                e["caption"] = ""
            for k in ("path", "caption"):
                if not isinstance(e[k], str):
                    raise ValueError(f"{path}:{n}: \"{k}\" must be a string, got "
                                     f"{json.dumps(e[k])}")
            start = e.get("start")  # a clip of a longer file (load_video, caption.py)
            # finite: json reads Infinity, which planning and the seek cannot convert to frames
            if start is not None and (isinstance(start, bool) or not isinstance(
                    start, (int, float)) or not 0 <= start < math.inf):
                raise ValueError(f"{path}:{n}: \"start\" must be seconds >= 0, got "
                                 f"{json.dumps(start)}")
            e["path"] = os.path.normpath(os.path.join(base, e["path"]))
            out.append(e)
    return out


def write_manifest(entries, path):
    """Atomic JSONL write; paths relative to the manifest's folder, so the set can move."""
    path = os.path.abspath(path)
    base = os.path.dirname(path)
    os.makedirs(base, exist_ok=True)
    _write_text(path, "".join(json.dumps(dict(e, path=os.path.relpath(e["path"], base))) + "\n"
                              for e in entries))
    return path


# ----- reading video: one decoder, one rotation rule -----

class BadVideo(Exception):
    """A file that cannot give frames; str(e) is the one-line reason ("zero-byte file", ...)."""


def _bad(what, e):
    return BadVideo(f"{what} ({type(e).__name__}: {e})".replace("\n", " "))


def _check_file(path):
    if not os.path.exists(path):
        raise BadVideo("missing file")
    if os.path.getsize(path) == 0:
        raise BadVideo("zero-byte file")


def _open(path):
    _check_file(path)
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        raise _bad("cannot open", e) from None
    if not any(_moving(s) for s in container.streams.video):
        # an .mp4 / .m4a song: its one "video" stream is the album cover (a 1-frame still that
        # was trained as a clip and reported as truncated, its fps the 90 kHz time base)
        cover = " (only a cover picture)" if container.streams.video else ""
        container.close()
        raise BadVideo("no video stream" + cover)
    return container


def _moving(stream):
    return not stream.disposition & av.stream.Disposition.attached_pic


def _video(container):
    """The video stream that is read: the first that is not a cover picture (see _open)."""
    return next(s for s in container.streams.video if _moving(s))


def _frames(path, start=None):
    """The one decoder: path -> (frame rate, iterator of (seconds, av.VideoFrame, its pixel aspect
    ratio: the `sar` of _rgb)), in order.

    Seconds count from the stream's start; a frame without a timestamp gets its place on the rate
    grid. start: seek there first (to the keyframe before it: the caller drops what it does not
    need); when the seek lands later than start (MPEG-TS has no index and lands on the keyframe
    AFTER it, or past the end), seek 1, 2, 4, ... 16 s earlier, and only then decode from the
    beginning. Open and decode errors raise BadVideo."""
    container = _open(path)
    stream = _video(container)
    stream.thread_type = "AUTO"
    tb = stream.time_base
    rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
    sar = _sar(stream)
    t0 = float(stream.start_time * tb) if stream.start_time is not None else 0.0

    def reopen():
        nonlocal container
        container.close()
        container = _open(path)
        _video(container).thread_type = "AUTO"
        return _video(container)

    def frames():
        s, decoded = stream, None
        try:
            for back in (0, 1, 2, 4, 8, 16) if start else ():
                if start - back <= 0:
                    break
                container.seek(int((t0 + start - back) / tb), stream=s, backward=True)
                it = container.decode(s)
                first = next(it, None)
                # a clip must not silently begin up to a GOP late: check where the seek landed
                if first is not None and first.time is not None and \
                        first.time - t0 <= start + 0.5 / rate:
                    decoded = itertools.chain([first], it)
                    break
                s = reopen()
            if decoded is None:  # no start, or no seek landed early enough: from the beginning
                decoded = container.decode(s)
            for k, frame in enumerate(decoded):
                yield (frame.time if frame.time is not None else t0 + k / rate) - t0, frame, sar
        # OverflowError: a start too large to seek to (a manifest's 1e300) is a bad clip too
        except (av.FFmpegError, OSError, ValueError, RuntimeError, OverflowError) as e:
            raise _bad("decode error", e) from None
        finally:
            container.close()
    return rate, frames()


def _sar(stream):
    """A stream's sample (pixel) aspect ratio: 1 unless its pixels are not square (anamorphic DV,
    HDV, DVD). A ratio beyond 1/4..4 is a broken header, not a picture: ignored."""
    sar = stream.sample_aspect_ratio
    return sar if sar and 0.25 <= sar <= 4 else 1


def _rgb(frame, sar=1):
    """The one rotation rule: av.VideoFrame -> (3, h, w) uint8, upright, square pixels.

    The display matrix says "rotate counterclockwise by k*90" (phones store landscape pixels and a
    rotation); torch.rot90 over (h, w) turns counterclockwise too. sar (_sar): the width is scaled
    by it, as a player shows the frame (HDV's 1440x1080 is 1920x1080 on screen: it was planned and
    trained 4:3, squashed)."""
    w = max(1, round(frame.width * sar))
    try:
        # FFV1 of the shapes set: skip swscale, ~400x faster
        if frame.format.name == "bgr0" and w == frame.width:
            plane = frame.planes[0]
            rgb = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size // 4, 4)
            rgb = rgb[:, :frame.width, 2::-1]  # (h, w, 3) BGRx -> RGB
        else:
            rgb = frame.to_ndarray(format="rgb24", width=w)  # (h, w, 3)
    except (av.FFmpegError, ValueError) as e:
        raise _bad("decode error", e) from None
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)  # (3, h, w) uint8
    k = round((frame.rotation or 0) / 90) % 4
    return torch.rot90(x, k, dims=(1, 2)) if k else x  # (3, w, h) when k is odd


def _load_image(path):
    """png/jpg -> (3, h, w) uint8; EXIF orientation applied like the rotation of videos."""
    _check_file(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I"):  # 16-bit greyscale (I;16, older Pillow: I): convert
                # ("RGB") clips at 255 (mid-grey read as white); scale 0..65535 to 0..255 instead
                g = (np.asarray(im, np.float64) / 257).round().clip(0, 255)  # (h, w)
                im = Image.fromarray(g.astype(np.uint8))
            if im.mode == "P" and "transparency" in im.info:  # its palette's colours via RGBA:
                # straight to RGB, PIL prints a 2-line "should be converted to RGBA" warning
                im = im.convert("RGBA")
            im = im.convert("RGB")
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)  # (3, h, w)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, ...)
        raise _bad("unreadable image", e) from None


def _cover_crop(x, height, width, crop=None):
    """(3, h, w) uint8 -> (3, H, W) float 0..255: resize to cover (aspect kept), then crop.
    A side given as None keeps its native size. crop: None = the centre; (fy, fx) in [0, 1) = the
    crop's place along each side's slack s (offset floor(f * (s + 1)): every offset equally likely
    for a uniform f; the release's random crop, resize_for_rectangle_crop)."""
    _, h, w = x.shape
    height, width = height or h, width or w
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    x = x.float()
    if (nh, nw) != (h, w):
        # antialias: downscaling without it aliases thin edges (and flicker between frames)
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=True,
                          align_corners=False)[0]  # (3, nh, nw)
    if crop is None:
        top, left = (nh - height) // 2, (nw - width) // 2
    else:
        top, left = (min(s, int(f * (s + 1))) for f, s in zip(crop, (nh - height, nw - width)))
    return x[:, top:top + height, left:left + width]  # (3, H, W)


def _decode(path, num_frames, height, width, fps, start, crop=None):
    """Decode only the frames needed -> list of (3, H, W) tensors (possibly fewer than num_frames).

    fps=None: consecutive frames from `start`. fps given: target times start + i / fps, each filled
    by the decoded frame nearest in time (timestamps, so variable frame rate works); decoding stops
    after the last target. Past the last frame, it covers half a frame interval after its time."""
    rate, frames = _frames(path, start)
    begin, out = start or 0.0, []
    targets = [begin + i / fps for i in range(num_frames)] if fps else None
    prev = None  # [time, frame, sar, tensor or None]: the latest frame before the next target

    def conv(c):  # convert a decoded frame at most once, even when it fills several targets
        nonlocal height, width
        if c[3] is None:
            x = _rgb(c[1], c[2])  # (3, h, w)
            # native size is the first frame's: a stream whose size changes midway (a joined
            # .ts, a browser's adaptive recording) gave frames torch.stack could not stack
            height, width = height or x.shape[1], width or x.shape[2]
            c[3] = _cover_crop(x, height, width, crop)
        return c[3]

    with closing(frames):
        for t, frame, sar in frames:
            cur = [t, frame, sar, None]
            if targets is None and t >= begin - 1e-6:
                out.append(conv(cur))
            while targets and len(out) < num_frames and t >= targets[len(out)] - 1e-6:
                want = targets[len(out)]
                # nearest frame in time: the previous one or this one
                out.append(conv(prev if prev is not None and want - prev[0] < t - want else cur))
            if len(out) == num_frames:
                break
            prev = cur
        # targets past the last frame: it covers half a frame interval after its time
        while (targets and prev is not None and len(out) < num_frames
               and targets[len(out)] <= prev[0] + 0.5 / rate):
            out.append(conv(prev))
    return out


def load_video(path, num_frames, height=None, width=None, fps=None, start=None, pad="nearest",
               min_frames=None, crop=None):
    """Decode one clip (or image) as training sees it -> (3, T, H, W) float in [-1, 1].

    num_frames: 4k+1 frames wanted (§3: the causal VAE maps 4k+1 frames to k+1 latents).
    height, width: resize to cover, then crop; None keeps the native size (the first frame's,
                upright).
    crop:       None = centre crop; (fy, fx) in [0, 1) = where the crop sits (see _cover_crop).
    fps:        sampling rate; frames are spread in time at this rate (None = native, every frame).
    start:      seconds from the beginning of the clip (seek; only what is needed is decoded).
    pad:        a clip too short for num_frames gives T = the largest 4k+1 it can fill ("nearest",
                Frame Pack keeps its real duration), or its last frame repeated up to num_frames
                ("repeat", the released code's pad_last_frame - repeating, not black frames, so no
                fake cut appears).
    min_frames: fewer decoded frames than this raise BadVideo("truncated: ...") before any padding
                (a file shorter than its header says; VideoDataset).
    Images are 1-frame videos (T = 1) whatever num_frames is. Bad files raise BadVideo(reason)."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k+1 (1, 5, 9, 13, ...), got {num_frames}")
    if pad not in ("nearest", "repeat"):
        raise ValueError(f"pad must be 'nearest' or 'repeat', got {pad!r}")
    if _is_image(path):
        frames = [_cover_crop(_load_image(path), height, width, crop)]
    else:
        frames = _decode(path, num_frames, height, width, fps, start, crop)
        if not frames:
            raise BadVideo("no frames decoded" + (f" after start={start}s" if start else ""))
        if min_frames and len(frames) < min_frames:
            raise BadVideo(f"truncated: {len(frames)} frames decode, {min_frames} or more "
                           f"expected from its header")
        if len(frames) < num_frames:
            frames = (frames[:nearest_4k1(len(frames))] if pad == "nearest"
                      else frames + [frames[-1]] * (num_frames - len(frames)))
    video = torch.stack(frames, dim=1)  # (3, T, H, W) 0..255 (antialiased bilinear: no overshoot)
    return video.div_(127.5).sub_(1)  # (3, T, H, W) in [-1, 1]


def frames_every(path, every=2.0, start=0.0):
    """Yield (second, (H, W, 3) uint8) for the frame on screen at 0, every, 2 * every, ... seconds.

    Native size, upright, square pixels (the decoder and rotation rule of load_video); caption.py's
    App. C frames.
    The frame on screen at second s is the last one whose time is <= s (half a frame early counts:
    timestamps are rounded to the frame grid), so gaps and GIFs work; seconds count from the first
    frame, or from `start` seconds into the stream as load_video counts them (a clip of a longer
    file: a manifest entry's "start"; seeked to, then every frame from the keyframe before it is
    decoded in order: exact, and a captioning model costs far more per picked frame). A decode
    error after the first frame ends the video there (a warning on stderr); a file with no
    decodable frame, or none at start, raises BadVideo."""
    rate, frames = _frames(path, start)  # seeks: only what a clip late in a file needs is decoded
    half, n, first, prev, t = 0.5 / rate, 0, None, None, 0.0
    rgb = lambda f: np.ascontiguousarray(_rgb(*f).permute(1, 2, 0).numpy())  # (H, W, 3)
    with closing(frames):
        try:
            for t, *frame in frames:  # frame: [av.VideoFrame, sar]
                # (after a seek the first frame is a keyframe before start: count from 0)
                first = (0.0 if start else t) if first is None else first
                t -= first + start  # < 0 before start: only kept as the frame on screen there
                # when this frame comes later than the next target, the previous one was on screen
                while prev is not None and t > n * every + half:
                    yield n * every, rgb(prev)
                    n += 1
                prev = frame
        except BadVideo as e:
            if prev is None:
                raise
            tqdm.write(f"warning: {path}: decoding stopped early: {e}", file=sys.stderr)
    if prev is None:
        raise BadVideo("no frames decoded")
    if t + half >= n * every:  # the last frame is still on screen at the next target
        yield n * every, rgb(prev)
    elif not n:
        raise BadVideo(f"no frame at start={start:g}s: the video ends at {t + start:.2f}s")


def probe(path):
    """Header facts without decoding a clip: {"height", "width", "frames", "fps", "seconds"}.

    Height and width after rotation. webm/mkv store no frame count (stream.frames == 0): it is
    estimated from the video stream's own duration x rate (see _video_seconds), as it is when the
    count is more than a frame above that estimate (an mp4 edit list)."""
    if _is_image(path):
        x = _load_image(path)  # (3, h, w)
        return {"height": x.shape[1], "width": x.shape[2], "frames": 1, "fps": None, "seconds": 0.0}
    with _open(path) as container:
        s = _video(container)
        rate = float(s.average_rate or s.guessed_rate or 0)
        try:
            first = next(container.decode(s))  # one frame: its rotation (phone clips) and true size
        except (StopIteration, av.FFmpegError) as e:
            raise BadVideo(f"no frames decoded ({e})") from None
        _, h, w = _rgb(first, _sar(s)).shape
        seconds, counted = _video_seconds(path, container)
        est = max(1, round(seconds * rate))
        # an mp4 edit list (a phone's trim, `ffmpeg -ss 1 -c copy`) hides the frames before its
        # start from the decoder but not from the sample count: 40 samples, 28 frames shown
        # (its duration), and the clip was dropped as truncated
        frames = est if rate and seconds and s.frames > est + 1 else s.frames or counted or est
        return {"height": h, "width": w, "frames": frames, "fps": rate or None, "seconds": seconds}


def _video_seconds(path, container):
    """The video stream's own length -> (seconds, frames counted or 0): its duration, else the
    DURATION tag mkv / webm muxers write per stream, else the container's when it holds nothing
    else, else its packets are read (demuxed, not decoded) and counted: a file written without a
    duration (a live or browser recording) was planned as a 1-frame still. A longer audio track
    sets the container's duration (a 47-frame webm with 0.5 s more audio was planned as 59
    frames, then dropped as truncated)."""
    s = _video(container)
    if s.duration is not None:
        return float(s.duration * s.time_base), 0
    tag = s.metadata.get("DURATION", "")  # "HH:MM:SS.nnnnnnnnn"
    try:
        hms = [float(v) for v in tag.split(":")]
        if len(hms) == 3 and all(math.isfinite(v) and v >= 0 for v in hms) and any(hms):
            return hms[0] * 3600 + hms[1] * 60 + hms[2], 0
    except ValueError:
        pass
    if container.duration and len(container.streams) == 1:
        return container.duration / av.time_base, 0
    n, end, t0 = 0, None, s.start_time or 0
    try:
        with _open(path) as c:
            v = _video(c)
            tb = v.time_base
            for p in c.demux(v):
                if p.size and p.pts is not None:  # (the demuxer's final packet is empty)
                    n += 1
                    end = max(end or 0, p.pts + (p.duration or 0))
    except av.FFmpegError:  # a damaged tail: what was read so far
        pass
    return (float((end - t0) * tb) if end is not None else 0.0), n


# ----- metadata in the manifest: probed once, in parallel -----

# What planning a stage needs of a file (VideoDataset): with these in the manifest no rank ever
# opens a file to plan (`python data.py inspect MANIFEST --write OUT` records them).
META = ("height", "width", "frames", "fps", "duration")


def has_meta(entry):
    """Does the entry hold META that can plan it? Sizes and frame count whole numbers > 0, fps a
    number > 0 or None (a still, or a rate its header does not give), as probe records them. A
    manifest from another tool may hold null, 0 or strings there (a webm's frame count 0 planned
    a clip as a 1-frame still; null was a TypeError): such an entry is probed like one without."""
    if not all(k in entry for k in META):
        return False
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
    fps = entry["fps"]
    return all(whole(entry[k]) for k in ("height", "width", "frames")) and (fps is None or (
        isinstance(fps, (int, float)) and not isinstance(fps, bool) and 0 < fps < math.inf))


def content_hash(path, sample=1 << 16):
    """A cheap content hash (32 hex digits): sha256 of the size and three 64 KiB samples (start,
    middle, end), not of the whole file, so recording it costs ~200 KiB of reading per file. A
    replaced, re-encoded or truncated file changes it; an edit that keeps the size and touches no
    sample does not (mtime and size, which the latent cache keys on, catch that one)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for at in sorted({0, max(0, size // 2 - sample // 2), max(0, size - sample)}):
            f.seek(at)
            h.update(f.read(sample))
    return h.hexdigest()[:32]


def media_info(path):
    """One file's manifest metadata: {"height", "width", "frames", "fps", "duration", "hash"}
    (probe: the header and one decoded frame; duration in seconds). Raises BadVideo."""
    m = probe(path)
    return {"height": m["height"], "width": m["width"], "frames": m["frames"], "fps": m["fps"],
            "duration": round(m["seconds"], 6), "hash": content_hash(path)}


def _info_job(path):
    """A probing worker's job: never raises, so one bad file cannot stop the pool."""
    try:
        return media_info(path), None
    except BadVideo as e:
        return None, str(e)
    except OSError as e:  # e.g. removed between the probe and the hash
        return None, f"unreadable ({e.strerror})"


def probe_entries(entries, workers=0, force=False, progress=False):
    """Record META (+ "hash") in every entry that lacks them (all of them with force=True), in
    `workers` threads -> (new entries, {path: reason} of the unreadable ones).

    An unreadable entry comes back with "unreadable": reason and no metadata (VideoDataset skips
    it, warned once with the reason). Entries that have META are returned as they are."""
    todo = [i for i, e in enumerate(entries) if force or not has_meta(e)]
    paths = [entries[i]["path"] for i in todo]
    bar = dict(total=len(paths), desc="probe", unit="file", disable=not progress or not paths)
    if workers > 1 and len(paths) > 1:
        # threads, not forked processes: a probe is mostly PyAV's decoder and file reads, which
        # release the GIL, and a fork of a multi-threaded training process (OpenMP, gloo) can hang
        from multiprocessing.pool import ThreadPool
        workers = min(workers, len(paths))  # no idle threads (--workers 100000: "can't start")
        chunk = max(1, min(64, len(paths) // (4 * workers)))
        with ThreadPool(workers) as pool:
            results = list(tqdm(pool.imap(_info_job, paths, chunksize=chunk), **bar))
    else:
        results = [_info_job(p) for p in tqdm(paths, **bar)]
    out, bad = list(entries), {}
    for i, (meta, why) in zip(todo, results):
        e = {k: v for k, v in entries[i].items() if k != "unreadable"}
        out[i] = dict(e, **meta) if meta else dict(e, unreadable=why)
        if why:
            bad[e["path"]] = why
    return out, bad


# ----- writing video -----

def to_uint8(video):
    """(3, T, H, W) in [-1, 1] -> numpy (T, H, W, 3) uint8."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, T, H, W)
    return x.permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, 3)


def video_rate(fps):
    """fps -> the exact frame rate a written file carries (a Fraction, denominator <= 1001), or one
    ValueError: a rate of 0 would be written as the encoder's default (24 fps)."""
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0, got {fps}")
    # NTSC rates given as 29.97, 23.976, 59.94 mean n * 1000/1001 exactly
    ntsc = Fraction(round(fps * 1.001) * 1000, 1001)
    rate = ntsc if ntsc and abs(ntsc - fps) < 1e-4 else Fraction(fps).limit_denominator(1001)
    if rate == 0:  # below 1/2002 fps
        raise ValueError(f"fps {fps:g} rounds to a frame rate of 0; pass at least 1/1001")
    return rate


def write_video(video, path, fps=8):
    """Write one video (3, T, H, W) in [-1, 1] atomically; the extension picks the format.

    .mp4: H.264 yuv420p, crf 17 (near-lossless: the shapes checker may run on the file); yuv420p
          stores colour at half resolution, so odd sides are padded by repeating the edge.
    .mkv: lossless FFV1 in bgr0 (no chroma subsampling: colours survive exactly; the shapes set).
    fps is kept exact as a fraction, never rounded: 12.5 stays 25/2, 29.97 becomes 30000/1001."""
    mp4 = str(path).lower().endswith(".mp4")
    if not mp4 and not str(path).lower().endswith(".mkv"):
        raise ValueError(f"write_video writes .mp4 or .mkv, got {str(path)!r}")
    rate = video_rate(fps)
    frames = to_uint8(video)  # (T, H, W, 3)
    if mp4:
        _, h, w, _ = frames.shape
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")

    def write(tmp):
        with av.open(tmp, "w", format="mp4" if mp4 else "matroska") as c:
            s = c.add_stream("libx264" if mp4 else "ffv1", rate=rate)
            s.height, s.width, s.pix_fmt = *frames.shape[1:3], "yuv420p" if mp4 else "bgr0"
            if mp4:
                s.options = {"crf": "17"}
            for f in frames:
                c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
            c.mux(s.encode())  # flush the encoder's delayed frames
    atomic_write(path, write)


def contact_sheet(video, path, cols=None, gap=2, max_frames=16, max_width=2048):
    """Save one video (3, T, H, W) in [-1, 1] as a PNG grid of its frames, atomically.

    Row-major, `cols` frames a row, white gaps. A 49-frame 480x720 video at full size would be a
    ~90 MB sheet: beyond max_frames an evenly spaced subset is shown (first and last kept), and
    frames shrink so the sheet is about max_width pixels wide at most."""
    t = video.shape[1]
    idx = torch.linspace(0, t - 1, min(t, max_frames)).round().long()  # (n,) frames shown
    cols = cols or min(len(idx), 9)
    x = video[:, idx].float().transpose(0, 1)  # (n, 3, H, W)
    if cols * x.shape[-1] > max_width:
        s = max_width / (cols * x.shape[-1])
        x = F.interpolate(x, scale_factor=s, mode="bilinear", antialias=True)  # (n, 3, h, w)
    frames = to_uint8(x.transpose(0, 1))  # (n, h, w, 3)
    n, h, w, _ = frames.shape
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * (w + gap) - gap, rows * (h + gap) - gap), "white")
    for i, f in enumerate(frames):
        r, c = divmod(i, cols)
        sheet.paste(Image.fromarray(f), (c * (w + gap), r * (h + gap)))
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


# ----- per-sample shapes for a stage (§3.2) -----

def nearest_4k1(n):
    """Largest 4k+1 <= n (n >= 1)."""
    return (n - 1) // 4 * 4 + 1


class VideoDataset(torch.utils.data.Dataset):
    """Manifest entries seen through one Stage: each sample's planned (T, H, W) and its decoding.

    mode="pack":   a clip gets the largest stage frame count it can fill (its real duration, §3.1);
    mode="bucket": every clip gets max(stage.frames), short ones padded by repeating the last frame
                   (the released code's simple mode). Images are T = 1 in both.
    augment="random": each sample's temporal start and crop are drawn per (seed, epoch, index),
                   as the release draws them (sat/data_video.py: a random start frame; its
                   resize_for_rectangle_crop has a random mode); "fixed": the entry's own "start"
                   (or 0) and the centre crop, the same every epoch (what the latent cache holds).
    Planning uses the manifest fields height/width/frames/fps (make_shapes and `data.py inspect
    --write` record them; train.py probes a manifest without them once, up front), else reads the
    file header (probe). `shapes[i]` is None for a file that failed: samplers skip it. ds[key]
    decodes; a bad file gives None (collate drops it), is counted in .skipped and warned once. A
    truncated file (it decodes fewer frames than its header promised) is a bad file too: silently
    repeating its last frame would teach frozen video. One missing frame is allowed (header frame
    counts estimated from duration x rate are often one off) and padded. bad: {path: reason}
    of files already warned about (a dict shared by a run's stages: each file warned once)."""

    def __init__(self, entries, stage, mode="pack", augment="fixed", seed=0, bad=None):
        if mode not in ("pack", "bucket"):
            raise ValueError(f"mode must be 'pack' or 'bucket', got {mode!r}")
        if augment not in ("fixed", "random"):
            raise ValueError(f"augment must be 'fixed' or 'random', got {augment!r}")
        if stage.subset is not None:  # §3.2 high-quality fine-tune: the best by filter score
            if any("quality" not in e for e in entries):
                raise ValueError("Stage.subset needs a 'quality' score per entry: run "
                                 "`python data.py filter` first")
            entries = top_quality(entries, stage.subset)
        self.entries, self.stage, self.mode, self.skipped = list(entries), stage, mode, 0
        self.bad = {} if bad is None else bad
        self.augment, self.seed = augment, seed
        self.slow = 0  # clips recorded at fewer fps than the stage's: their frames repeat
        plans = [self._plan(e) for e in self.entries]
        # shapes[i]: the planned (T, H, W); frames[i]: the frames its header promises at that T;
        # avail[i]: frames the clip has at the stage's rate (a random start can move over the rest)
        self.shapes, self.frames, self.avail = ([p and p[k] for p in plans] for k in range(3))

    def _plan(self, e):
        """-> ((T, H, W), frames the header promises of those T, frames at the stage rate), or
        None for a bad file."""
        if "unreadable" in e:  # probed before (probe_entries) and found bad
            self._warn(e["path"], e["unreadable"])
            return None
        try:  # partial metadata (no fps) would skip the rate conversion below: probe instead
            meta = e if has_meta(e) else probe(e["path"])
        except BadVideo as err:
            self._warn(e["path"], str(err))
            return None
        h, w, n = meta["height"], meta["width"], meta["frames"]
        # nearest aspect bucket (in log space, so 2:1 and 1:2 are equally far from 1:1)
        H, W = min(self.stage.resolutions,
                   key=lambda r: abs(math.log(r[1] / r[0]) - math.log(w / h)))
        if n <= 1 or _is_image(e["path"]):
            return (1, H, W), 1, 1
        if e.get("start") and meta.get("fps"):  # decoding begins at the entry's start
            n = max(1, n - math.ceil(e["start"] * meta["fps"] - 1e-6))
        if self.stage.fps and meta.get("fps"):  # frames available at the stage rate
            n = int((n - 1) * self.stage.fps / meta["fps"] + 1e-6) + 1
            self.slow += meta["fps"] < self.stage.fps * (1 - 1e-3)
        # a stage of stills only (frames [1]): a clip gives one frame, as the stage asks (it was
        # planned at its whole length in pack mode and failed in bucket mode)
        clip_frames = [f for f in self.stage.frames if f > 1] or [1]
        if self.mode == "bucket":  # short clips are padded on purpose (released pad_last_frame)
            return (max(clip_frames), H, W), min(n, max(clip_frames)), n
        fits = [f for f in clip_frames if f <= n]
        T = max(fits) if fits else nearest_4k1(n)
        return (T, H, W), T, n

    def augmentation(self, index, epoch=0):
        """-> (start in seconds or None, crop (fy, fx) or None = centre) of sample `index` in
        `epoch`: a pure function of (seed, epoch, index), so any worker, rank or resumed run
        draws the same. The start moves over the frames the clip has beyond its planned T."""
        e, shape = self.entries[index], self.shapes[index]
        if self.augment == "fixed" or shape is None:
            return e.get("start"), None
        # str seeds go through sha512: the same numbers in every process (hash() is salted)
        rng = random.Random(f"augment|{self.seed}|{epoch}|{index}")
        u_t, u_y, u_x = rng.random(), rng.random(), rng.random()
        slack = self.avail[index] - shape[0]  # frames at the stage rate beyond the planned T
        rate = self.stage.fps or e.get("fps")
        start = e.get("start")
        if shape[0] > 1 and slack > 0 and rate:
            k = min(slack, int(u_t * (slack + 1)))  # frames to skip, each of 0..slack alike
            # at the native rate (no stage fps) half a frame early, so frame k (time k / rate,
            # rounded by the container) is the first one decoded
            start = (start or 0.0) + (k - (0.0 if self.stage.fps else 0.5)) / rate if k else start
        return start, (u_y, u_x)

    def _warn(self, path, reason):
        self.skipped += 1
        if path not in self.bad:
            self.bad[path] = reason
            print(f"warning: skipping {path}: {reason}", file=sys.stderr)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, key):
        """key: an index, a sampler key (index, row, slot, weight, n_global), or a loader request
        (the key + its epoch, see Requests): the epoch picks the random start and crop."""
        index, *rest = key if isinstance(key, tuple) else (key,)
        e, shape = self.entries[index], self.shapes[index]
        if shape is None:
            return None
        start, crop = self.augmentation(index, rest[4] if len(rest) > 4 else 0)
        try:
            # pad="repeat": the sampler counted T frames, so a clip one frame short of its header
            # still fits the plan (bucket mode pads short clips by design); more is truncation
            video = load_video(e["path"], *shape, self.stage.fps, start, pad="repeat",
                               min_frames=self.frames[index] - 1, crop=crop)
        except BadVideo as err:
            self._warn(e["path"], str(err))
            return None
        return {"video": video, "caption": e["caption"], "index": index, "start": start,
                "crop": crop, **dict(zip(("row", "slot", "weight", "n_global"), rest))}


# ----- Frame Pack (§3.1) and bucket batch samplers -----

def num_tokens(T, H, W, text_len, tf=4, sf=8, p=2, pt=1):
    """Tokens of one sample in the packed DiT: text + T' x h x w video patches (time is not
    patchified, §2.2; CogVideoX 1.5 patchifies pt = 2 latent frames per token, an odd T' padded:
    ceil(T' / pt), the count of dit.num_tokens)."""
    return text_len + video_tokens(T, H, W, tf, sf, p, pt)


def video_tokens(T, H, W, tf=4, sf=8, p=2, pt=1):
    if H % (sf * p) or W % (sf * p):
        raise ValueError(f"{H}x{W} is not a multiple of VAE spatial factor x patch = {sf * p}; "
                         "fix Stage.resolutions")
    return -(-((T - 1) // tf + 1) // pt) * (H // (sf * p)) * (W // (sf * p))


class _GlobalBatchSampler:
    """Shared by both samplers: build the epoch's GLOBAL batches from (seed, epoch), yield this
    rank's slice.

    A global batch is a list of slots; slot j is one real sample with its planned weight
    (tokens_j / sum over the global batch). This rank's keys are (index, row, slot, weight,
    n_global). train.py weighs by the tokens of the samples actually read, over all micro-batches
    and ranks of a step (an unreadable file does not shrink the others); weight 0 marks a filler.
    A rank whose slice would be empty (only in the last batch) gets one copy of a real sample with
    weight 0 and slot -1, so every rank runs the same number of steps and DDP never stalls.
    drop_last=True leaves out the epoch's partial batches instead (see each _full)."""

    def __init__(self, shapes, seed, rank, world_size, drop_last=False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.shapes, self.seed, self.rank, self.world_size = shapes, seed, rank, world_size
        self.epoch, self.drop_last = 0, drop_last
        self.valid = [i for i, s in enumerate(shapes) if s is not None]
        self._cache = {}

    def set_epoch(self, epoch):
        """Like DistributedSampler.set_epoch: a new deterministic order for each epoch."""
        self.epoch = epoch

    def global_batches(self, epoch=None):
        """-> list of global batches; each a list over ranks of lists of keys."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._cache:
            order = list(self.valid)
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            built = self._build(order, epoch)
            if self.drop_last:
                # like DataLoader's drop_last: a step on a nearly empty tail batch is a noisy,
                # wasted step (a small dataset's last Frame Pack batch can be 5% full); the dropped
                # samples are seen in other epochs (each epoch reshuffles). Never drop everything.
                built = [b for b in built if self._full(b)] or built
            self._cache = {epoch: [self._split(b) for b in built]}
        return self._cache[epoch]

    def _keys(self, groups):
        """groups: list over rows of lists of dataset indices -> list over rows of keys."""
        real = [i for g in groups for i in g]
        tok = [video_tokens(*self.shapes[i], *self._factors) for i in real]
        slot = iter(range(len(real)))  # slots number the samples in row order
        return [[(i, r, j, tok[j] / sum(tok), len(real)) for i, j in zip(g, slot)]
                for r, g in enumerate(groups)]

    def __iter__(self):
        return (batch[self.rank] for batch in self.global_batches())

    def __len__(self):
        return len(self.global_batches())

    def epoch_samples(self, epoch=None):
        """Dataset indices with weight > 0 this rank sees in the epoch (for tests and logs)."""
        return [k[0] for b in self.global_batches(epoch) for k in b[self.rank] if k[3] > 0]

    def dropped(self, epoch=None):
        """Readable samples that no rank sees in the epoch: what drop_last left out (0 without
        it). Counted so a run says so (train.py) rather than losing them silently."""
        seen = sum(k[3] > 0 for b in self.global_batches(epoch) for ks in b for k in ks)
        return len(self.valid) - seen


def slot_masses(global_batch):
    """A global batch (a list over ranks of keys) -> the planned weight of every slot, in slot
    order: each sample's share of the batch's video tokens (pixels for the VAE). The same list on
    every rank; train.draws lays the §3.3 timestep strata over it (see
    diffusion.mass_strata_timesteps)."""
    keys = [k for ks in global_batch for k in ks if k[2] >= 0]
    out = [0.0] * len(keys)
    for k in keys:
        out[k[2]] = k[3]
    return out


class FramePackSampler(_GlobalBatchSampler):
    """§3.1 Frame Pack: samples of any duration (images too) and size share rows of max_tokens.

    Each rank gets `rows` rows; the global batch has rows * world_size rows. The rows are decided
    here, once: each key carries its row (local to the rank) and dit.forward_packed lays the
    samples out in exactly these rows. Per-sample tokens: text_len + T' * h * w with the VAE
    factors tf (time), sf (space) and patch p passed in (ceil(T' / pt) * h * w with a temporal
    patch pt, CogVideoX 1.5).

    balance=None: rows filled greedily (first fit) from the shuffled epoch; a sample that fits no
    row waits (it starts the next batch); after `lookahead` such misses, or when no row can take
    even the smallest sample, the batch is closed.
    balance=tol (e.g. 0.05): rows of equal COST, so no rank waits for another (not in the paper).
    A sample of n tokens (text + video, one attention span) costs n² + linear_cost·n: attention
    is ~Σnᵢ² (4·D·n² FLOPs per layer), the projections and MLP ~Σnᵢ (24·D²·n), so
    linear_cost = 6·D for hidden width D. One row of an 81-frame clip costs several times a row
    of short clips with the same tokens, so token-filled rows leave most ranks idle. Here the
    shuffled epoch is cut into pools of `pool` global batches' worth of tokens; each pool is
    sorted by cost (ties keep the shuffled order) and each batch takes the largest samples first,
    each into the row of least cost that has room, then fills the rows' gaps with the pool's
    smallest samples. A batch whose rows' costs differ by more than tol is put back into the
    next pool (where its samples meet others of their size); the last pool's leftovers close the
    epoch as its final batches (unbalanced; drop_last leaves them out). The other batches are
    shuffled. Rows are built over all rows * world_size at once and slots number them in that
    order, so N ranks still run exactly one process's global batch; the rows then go to the
    ranks by longest-first (each rank `rows` of them, the least loaded next).

    Planned weight of sample j = its video tokens / all video tokens of the global batch: the mean
    over real tokens, as if the global batch were one long sequence (train.py takes that mean over
    the tokens actually read in the whole optimizer step)."""

    def __init__(self, shapes, max_tokens, rows=1, text_len=226, tf=4, sf=8, p=2, seed=0, rank=0,
                 world_size=1, lookahead=16, drop_last=False, pt=1, balance=None,
                 linear_cost=0.0, pool=64):
        super().__init__(shapes, seed, rank, world_size, drop_last)
        if lookahead < 1:  # 0: no sample is ever admitted, so the batches would never end
            raise ValueError(f"lookahead must be >= 1 (samples that may wait for a later "
                             f"batch), got {lookahead}")
        self.max_tokens, self.rows, self.lookahead = max_tokens, rows, lookahead
        self.balance, self.pool = balance, pool
        self._factors = (tf, sf, p, pt)  # pt: latent frames per token (CogVideoX 1.5: 2)
        self.tokens = {i: num_tokens(*shapes[i], text_len, tf, sf, p, pt) for i in self.valid}
        self.cost = {i: n * n + linear_cost * n for i, n in self.tokens.items()}
        big = [i for i in self.valid if self.tokens[i] > max_tokens]
        if big:
            raise ValueError(f"{len(big)} samples (e.g. index {big[0]}, shape {shapes[big[0]]}, "
                             f"{self.tokens[big[0]]} tokens) exceed max_tokens={max_tokens}; raise "
                             "max_tokens or lower the stage's resolutions / frames")

    def _build(self, order, epoch):
        if self.balance is None:
            return self._first_fit(order)
        n_rows, M = self.rows * self.world_size, self.max_tokens
        pools, cur, mass = [], [], 0
        for i in order:  # pools of `pool` global batches' worth of tokens
            cur.append(i)
            mass += self.tokens[i]
            if mass >= self.pool * n_rows * M:
                pools.append(cur)
                cur, mass = [], 0
        pools += [cur] if cur else []
        batches, tail, left = [], [], []
        for k, chunk in enumerate(pools):
            pending = deque(sorted(left + chunk, key=lambda i: -self.cost[i]))  # (stable)
            left = []
            while pending:
                groups = self._fill(pending)
                if self._balanced(groups):
                    batches.append(groups)
                elif k + 1 < len(pools):
                    left += [i for g in groups for i in g]  # into the next pool
                else:
                    tail.append(groups)
        random.Random(self.seed * 1_000_003 + epoch + 2).shuffle(batches)
        return batches + tail

    def _fill(self, pending):
        """One balanced global batch from `pending` (sorted by cost, largest first) -> rows."""
        n_rows, M = self.rows * self.world_size, self.max_tokens
        used, cost, groups, waiting = [0] * n_rows, [0.0] * n_rows, [[] for _ in range(n_rows)], []

        def place(i):  # into the row of least cost that has room
            rows = [r for r in range(n_rows) if used[r] + self.tokens[i] <= M]
            if not rows:
                return False
            r = min(rows, key=lambda r: (cost[r], r))
            used[r], cost[r] = used[r] + self.tokens[i], cost[r] + self.cost[i]
            groups[r].append(i)
            return True

        while pending and len(waiting) < self.lookahead:  # the largest samples first
            i = pending.popleft()
            if not place(i):
                waiting.append(i)
        pending.extendleft(reversed(waiting))
        while pending and place(pending[-1]):  # then the gaps, with the smallest
            pending.pop()
        return groups

    def _balanced(self, groups):
        costs = [sum(self.cost[i] for i in g) for g in groups]
        return max(costs) <= (1 + self.balance) * min(costs)

    def _first_fit(self, order):
        n_rows, M = self.rows * self.world_size, self.max_tokens
        smallest = min(self.tokens.values(), default=0)
        pending, batches = deque(order), []
        while pending:
            used, groups, waiting = [0] * n_rows, [[] for _ in range(n_rows)], []
            while pending and len(waiting) < self.lookahead and M - min(used) >= smallest:
                i = pending.popleft()
                r = next((r for r in range(n_rows) if used[r] + self.tokens[i] <= M), None)
                if r is None:
                    waiting.append(i)
                else:
                    used[r] += self.tokens[i]
                    groups[r].append(i)
            pending.extendleft(reversed(waiting))  # the waiting samples open the next batch
            batches.append(groups)
        return batches

    def _full(self, groups):
        """drop_last keeps a global batch whose rows are at least half full and, with balance,
        whose rows' costs are within the tolerance: mostly all but the tail, but a batch in the
        middle of an epoch that misses either is dropped too (its samples come in other epochs)."""
        used = sum(self.tokens[i] for g in groups for i in g)
        full = 2 * used >= self.rows * self.world_size * self.max_tokens
        return full and (self.balance is None or self._balanced(groups))

    def _split(self, groups):
        R = self.rows
        rows = self._keys(groups)  # slots number the global rows in order (any world size)
        if self.balance is None:  # rank r owns global rows [r*R, (r+1)*R)
            owner = [(g // R, g % R) for g in range(len(rows))]
        else:  # longest-first: each row to the least loaded rank that has a row free
            load, owner = [0.0] * self.world_size, [None] * len(rows)
            free = [R] * self.world_size
            for g in sorted(range(len(rows)), key=lambda g: -sum(self.cost[i] for i in groups[g])):
                r = min((r for r in range(self.world_size) if free[r]), key=lambda r: (load[r], r))
                owner[g] = (r, R - free[r])
                free[r] -= 1
                load[r] += sum(self.cost[i] for i in groups[g])
        out = [[[] for _ in range(R)] for _ in range(self.world_size)]
        for g, keys in enumerate(rows):
            r, local = owner[g]
            out[r][local] = [(i, local, *rest) for i, _, *rest in keys]
        first = next(k for keys in rows for k in keys)
        for rank_rows in out:
            if not any(rank_rows):  # a last, nearly empty batch: a weight-0 filler keeps DDP going
                rank_rows[0] = [(first[0], 0, -1, 0.0, first[4])]
        return [[k for row in rank_rows for k in row] for rank_rows in out]

    def rank_costs(self, epoch=None):
        """Per global batch of the epoch, each rank's cost (Σ n² + linear_cost·n of its real
        samples): what the balance is measured on."""
        return [[sum(self.cost[k[0]] for k in ks if k[3] > 0) for ks in b]
                for b in self.global_batches(epoch)]

    def efficiency(self, epoch=None):
        """Real tokens / row tokens over the epoch (what padding costs; 1.0 is perfect packing)."""
        batches = self.global_batches(epoch)
        real = sum(self.tokens[k[0]] for b in batches for ks in b for k in ks if k[3] > 0)
        return real / max(1, len(batches) * self.rows * self.world_size * self.max_tokens)


class BucketSampler(_GlobalBatchSampler):
    """The simple mode: every batch has one shape (T, H, W), so it stacks into (B, 3, T, H, W).

    A global batch holds batch_size * world_size samples of one bucket (its last batch fewer);
    rank r takes the contiguous slots [r * batch_size, (r + 1) * batch_size)."""

    def __init__(self, shapes, batch_size, seed=0, rank=0, world_size=1, drop_last=False):
        super().__init__(shapes, seed, rank, world_size, drop_last)
        self.batch_size, self._factors = batch_size, (1, 1, 1)

    def _build(self, order, epoch):
        buckets, G = {}, self.batch_size * self.world_size
        for i in order:  # the shuffled order, grouped by shape
            buckets.setdefault(tuple(self.shapes[i]), []).append(i)
        batches = [b[k:k + G] for b in buckets.values() for k in range(0, len(b), G)]
        random.Random(self.seed * 1_000_003 + epoch + 1).shuffle(batches)  # interleave the buckets
        return batches

    def _full(self, batch):
        """drop_last keeps only full global batches (each bucket's remainder is dropped)."""
        return len(batch) == self.batch_size * self.world_size

    def _split(self, batch):
        keys = [k for row in self._keys([[i] for i in batch]) for k in row]
        B, world = self.batch_size, self.world_size
        # full batches: batch_size per rank; the last one: as even as possible, fillers where empty
        cuts = ([r * B for r in range(world + 1)] if len(keys) >= B * world
                else np.linspace(0, len(keys), world + 1).round().astype(int))
        out = [keys[cuts[r]:cuts[r + 1]] for r in range(world)]
        return [ks if ks else [(batch[0], 0, -1, 0.0, len(keys))] for ks in out]


# ----- the loader: decoding in worker processes, one DataLoader per stage -----

class Requests:
    """The training loader's batch_sampler: this rank's batches from a data position {"epoch",
    "batch"} on, epoch after epoch without end, so one DataLoader (and its persistent workers)
    serves a whole stage. A request is a sampler key plus its epoch, (index, row, slot, weight,
    n_global, epoch): the dataset draws the random start and crop from (seed, epoch, index), so
    a worker needs no set_epoch. The loader runs ahead of training (prefetch) but returns batches
    in order; `given` holds (epoch, batch, batches in the epoch, slot_masses) of every batch
    handed out, and the consumer pops one per batch it receives to know its data position."""

    def __init__(self, sampler, pos):
        self.sampler, self.pos, self.given = sampler, dict(pos), deque()

    def __iter__(self):
        epoch, start = self.pos["epoch"], self.pos["batch"]
        while True:
            gbs = self.sampler.global_batches(epoch)
            if not gbs:  # nothing readable at this stage's sizes: stop instead of spinning
                raise ValueError("no readable sample fits this stage (see the skipped files "
                                 "above); check the data with `python data.py inspect`")
            for b in range(start, len(gbs)):
                self.given.append((epoch, b, len(gbs), slot_masses(gbs[b])))
                yield [k + (epoch,) for k in gbs[b][self.sampler.rank]]
            epoch, start = epoch + 1, 0


def make_loader(dataset, requests, workers=0, pin=False, prefetch=2):
    """The DataLoader of a stage: `workers` processes decode (the dataset holds no model: the
    main process encodes, see LatentEncoder), persistent, each `prefetch` batches ahead, batches
    in page-locked memory when pin (a GPU run: the copy to the device can overlap)."""
    more = dict(persistent_workers=True, prefetch_factor=prefetch,
                worker_init_fn=_own_group) if workers else {}
    return torch.utils.data.DataLoader(dataset, batch_sampler=requests, collate_fn=collate,
                                       num_workers=workers, pin_memory=pin, **more)


def _own_group(_):
    """A loader worker leaves its rank's process group: torchrun's SIGTERM / SIGINT (sent to the
    whole group) and a terminal's Ctrl-C reach the training process alone, which finishes the
    step, checkpoints and shuts its workers down (a worker also ends when its parent does)."""
    os.setpgrp()


# ----- filters (§3.4) -----

def clip_scores(video, cfg=FilterConfig()):
    """(3, T, H, W) in [-1, 1] -> explainable scores, each a cheap stand-in for one of §3.4's
    negative labels.

    motion:     mean |x_t+1 - x_t| (0..1)  - "lecture type" / no dynamics have almost none
    static:     fraction of near-duplicate consecutive frames - frozen clips, slideshows
    cut:        largest colour-histogram jump between consecutive frames - "lack of motion
                connectivity"
    highlight:  98th percentile of max(R, G, B) - too dark when low ("low quality"); a percentile,
                not the mean, so a small bright object on black (the shapes set) is not "dark"
    shadow:     2nd percentile of luma - blown out when high
    contrast:   luma std - blank frames"""
    x = (video.float() + 1) / 2  # (3, T, H, W) in [0, 1]
    luma = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]  # (T, H, W)
    s = {"highlight": x.amax(0).flatten().quantile(0.98).item(),
         "shadow": luma.flatten().quantile(0.02).item(),
         "contrast": luma.std().item() if luma.numel() > 1 else 0.0}
    T = x.shape[1]
    if T > 1:
        diff = (x[:, 1:] - x[:, :-1]).abs().mean(dim=(0, 2, 3))  # (T-1,)
        hist = torch.stack([torch.stack([torch.histc(x[c, t], 16, 0, 1) for c in range(3)])
                            for t in range(T)])  # (T, 3, 16)
        hist = hist / hist.sum(-1, keepdim=True)
        jump = 0.5 * (hist[1:] - hist[:-1]).abs().sum(-1).mean(-1)  # (T-1,) in [0, 1]
        s.update(motion=diff.mean().item(), static=(diff < cfg.static_eps).float().mean().item(),
                 cut=jump.max().item())
    return s


def score_entry(entry, cfg=FilterConfig(), classifier=None):
    """-> (scores, reasons): one manifest entry's scores and the reasons to drop it (empty = keep).

    classifier: the hook for learned filters (the paper's Video-LLaMA negative-label classifiers):
    a callable (3, T, H, W) -> {label: probability of that negative label}; each becomes a score and
    drops the clip above cfg.max_negative."""
    meta = probe(entry["path"])
    clip, start = not _is_image(entry["path"]), entry.get("start")
    # an entry's "start" makes it a clip of its file: scored from there, as training decodes it
    video = load_video(entry["path"], cfg.max_frames, cfg.size, cfg.size, fps=cfg.fps, start=start)
    if clip and video.shape[1] < 5:  # too short to sample at cfg.fps: score every frame instead
        video = load_video(entry["path"], cfg.max_frames, cfg.size, cfg.size, start=start)
    s = clip_scores(video, cfg)
    s["seconds"] = max(0.0, (meta["seconds"] or (meta["frames"] - 1) / (meta["fps"] or cfg.fps))
                       - (start or 0.0))
    why = []
    if s["highlight"] < cfg.min_highlight:
        why.append(f"too dark (highlight {s['highlight']:.3f} < {cfg.min_highlight})")
    if s["shadow"] > cfg.max_shadow:
        why.append(f"too bright (shadow {s['shadow']:.3f} > {cfg.max_shadow})")
    if clip and s["seconds"] < cfg.min_seconds:
        why.append(f"too short ({s['seconds']:.2f}s < {cfg.min_seconds}s)")
    if "motion" in s:  # clips of 2+ frames only: a 1-frame video (an image) has no dynamics
        if s["cut"] > cfg.max_cut:
            why.append(f"scene cut (histogram jump {s['cut']:.2f} > {cfg.max_cut})")
        if s["static"] > cfg.max_static:
            why.append(f"static frames ({s['static']:.0%} near-duplicates > {cfg.max_static:.0%})")
        elif s["motion"] < cfg.min_motion:
            why.append(f"no motion (frame difference {s['motion']:.4f} < {cfg.min_motion})")
        # quality for the §3.2 fine-tune subset: enough motion, no frozen frames, no cut; each 0..1
        motion = min(s["motion"] / (4 * cfg.min_motion), 1.0)
        s["quality"] = motion * (1 - s["static"]) * (1 - s["cut"])
    else:  # images: a blank frame is the only cheap sign of a bad one
        s["quality"] = min(s["contrast"] / 0.25, 1.0) if not clip else 0.0
    if classifier is not None:
        try:
            neg = {k: float(v) for k, v in classifier(video).items()}
        except Exception as e:  # the hook failed on this clip: dropped and named, the run goes on
            return s, why + [f"classifier failed ({type(e).__name__}: {' '.join(str(e).split())})"]
        s.update({f"p_{k}": v for k, v in neg.items()})
        why += [f"classifier: {k} {v:.2f} > {cfg.max_negative}" for k, v in neg.items()
                if v > cfg.max_negative]
        s["quality"] *= 1 - max(neg.values(), default=0.0)
    return s, why


def top_quality(entries, fraction):
    """The best `fraction` of clips and, separately, of images, by the "quality" score (§3.2)."""
    out = []
    for kind in (False, True):
        group = sorted((e for e in entries if _is_image(e["path"]) == kind),
                       key=lambda e: -e["quality"])
        # less a float's rounding: 0.07 * 100 = 7.000000000000001 kept 8 of 100
        out += group[:max(1, math.ceil(fraction * len(group) - 1e-9))] if group else []
    return out


def filter_manifest(manifest, out, cfg=FilterConfig(), top=0.2, classifier=None, progress=False):
    """Score every entry; write the kept subset (entry["scores"], entry["quality"], and META
    when the entry lacked it) to `out`, the
    best `top` fraction to <out>.top20.jsonl and the drops to <out>.dropped.tsv.
    Returns (kept, dropped [(path, reasons)])."""
    kept, dropped = [], []
    for e in tqdm(read_manifest(manifest), desc="filter", unit="clip", disable=not progress):
        try:
            s, why = score_entry(e, cfg, classifier)
            # the metadata training plans with (META): carried when present, else recorded now
            e = e if has_meta(e) or why else dict(e, **media_info(e["path"]))
        except BadVideo as err:
            s, why = {}, [f"unreadable ({err})"]
        if why:
            dropped.append((e["path"], why))
        else:
            # scores nested (no clash with a manifest's own fields); quality on top for Stage.subset
            kept.append(dict(e, scores={k: round(v, 5) for k, v in s.items()},
                             quality=round(s["quality"], 5)))
    out, top_out, drop_out = filter_outputs(out, top)
    write_manifest(kept, out)
    write_manifest(top_quality(kept, top) if kept else [], top_out)
    _write_text(drop_out,
                "path\treasons\n" + "".join(f"{p}\t{'; '.join(w)}\n" for p, w in dropped))
    return kept, dropped


def filter_outputs(out, top):
    """The three files filter_manifest writes: out, its top fraction, its drop table."""
    stem = os.path.splitext(os.path.abspath(out))[0]
    return out, f"{stem}.top{round(top * 100)}.jsonl", stem + ".dropped.tsv"


# ----- latent and text cache, the DiT's dataset (§3) -----

class LatentCache:
    """Encode once, reuse every epoch: one safetensors file per (content, model) key.

    The key hashes the file's absolute path, mtime, size, every decoding parameter (shape, fps,
    start, pad mode), what is stored (the posterior, its mean, or one sample) and the model id, so
    an edited file, a new stage, another VAE or another use never reuses a stale latent. Captions
    are keyed by their text and the text encoder's id. safetensors never unpickles anything."""

    def __init__(self, folder, keep=0):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.hits = self.misses = 0
        # speed (not in the paper): up to `keep` bytes of entries stay in memory once read, first
        # come first kept, so a data set that fits is read from disk once a run, not every epoch
        # (the demo's: ~10% of a DiT step). An entry's key names its content, so a kept entry is
        # never stale; callers never write into what get returns.
        self.keep, self.kept, self.mem = keep, 0, {}

    def key(self, path, shape, model_id, fps=None, start=None, pad="repeat", latent="posterior",
            crop=None, mode=None):
        """shape (T, H, W), fps, start, pad and crop as passed to load_video (the defaults are
        VideoDataset's for a stage without fps); latent: "posterior" (mean + logvar), "mean",
        "sample", or "posterior+frame0" (also the first frame's own posterior: Prepared's App. A
        image condition); mode: how the VAE ran (LatentEncoder: streaming, tiles, dtype all
        change the latents a little)."""
        kinds = ("posterior", "posterior+frame0", "mean", "sample")
        if latent not in kinds:
            raise ValueError(f"latent must be one of {kinds}, got {latent!r}")
        st = os.stat(path)
        fps, start = (None if v is None else float(v) for v in (fps, start))  # 8 == 8.0 here
        crop = None if crop is None else tuple(float(v) for v in crop)
        raw = (f"{os.path.abspath(path)}|{st.st_mtime_ns}|{st.st_size}|{tuple(shape)}|fps={fps}|"
               f"start={start}|pad={pad}|{latent}|{model_id}|crop={crop}|mode={mode}")
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def text_key(self, caption, model_id):
        return hashlib.sha256(f"text|{caption}|{model_id}".encode()).hexdigest()[:32]

    def _file(self, key):
        return os.path.join(self.folder, key[:2], key + ".safetensors")

    def has(self, key):
        return os.path.exists(self._file(key))

    def get(self, key):
        """-> dict of tensors, or None when not cached. A file that does not load (cut short by a
        full disk, a crash outside atomic_write, ...) is a miss: warned, deleted, encoded
        again."""
        if key in self.mem:
            return dict(self.mem[key])
        f = self._file(key)
        if not os.path.exists(f):
            return None
        try:
            out = load_file(f)
            size = sum(v.nbytes for v in out.values())
            if self.kept + size <= self.keep:
                self.mem[key], self.kept = out, self.kept + size
            return dict(out)
        except (SafetensorError, OSError) as e:
            # a torn file (every truncation is a SafetensorError) is deleted; a read error (EIO,
            # too many open files) says nothing of the file, which is kept for the next read
            torn = isinstance(e, SafetensorError)
            print(f"warning: latent cache file {f} is unreadable ({e}); "
                  f"{'deleted, it is ' if torn else ''}encoded again", file=sys.stderr)
            try:
                if torn:
                    os.remove(f)
            except OSError:  # another worker or rank deleted it first; a read-only cache keeps it
                pass
            return None

    def put(self, key, tensors):
        f = self._file(key)
        os.makedirs(os.path.dirname(f), exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        # a crash never leaves half a latent behind; no fsync: a lost or torn entry is a miss
        atomic_write(f, lambda tmp: save_file(sd, tmp), durable=False)

    def get_or_make(self, key, make):
        """make() -> dict of tensors, called only on a miss."""
        out = self.get(key)
        if out is None:
            self.misses += 1
            out = make()
            self.put(key, out)
        else:
            self.hits += 1
        return out


def model_id(folder):
    """Cache key part naming a model folder's exact weights (path, size, mtime of its files,
    subfolders too: a pipeline folder keeps them in text_encoder/, tokenizer/, ...): a retrained
    VAE or another T5 never reuses stale latents / embeddings from the cache. Hidden files and
    folders are left out; a flat folder gives the same id as before subfolders were walked."""
    folder = os.path.abspath(folder)
    st = [(f, os.stat(os.path.join(folder, f))) for f in _model_files(folder)]
    return "|".join(f"{folder}/{f}:{s.st_size}:{s.st_mtime_ns}" for f, s in st)


def model_fingerprint(folder):
    """A model folder's content, not its place or file times (32 hex digits): sha256 of each
    file's relative name and content_hash (its size and three samples, the weights' values
    among them). The same weights moved or copied give the same value; another model of the same
    shapes (a fine-tune) another. train.py checks a LoRA run's frozen base with it on resume."""
    h = hashlib.sha256()
    for f in _model_files(folder):
        h.update(f"{f}:{content_hash(os.path.join(folder, f))}|".encode())
    return h.hexdigest()[:32]


def _model_files(folder):
    """A model folder's files, relative, sorted, subfolders included, hidden ones left out."""
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d[0] != ".")
        files += [os.path.relpath(os.path.join(root, f), folder) for f in sorted(names)
                  if f[0] != "."]
    return files


class Prepared(torch.utils.data.Dataset):
    """The DiT's dataset, as the loader's worker processes see it: no model in it.

    A request (a sampler key, + its epoch) -> {"index", "row", "slot", "weight", "n_global",
    "caption"} + the clip's cached posterior "mean", "logvar" (C, T', h, w) and its first frame's
    "img_mean", "img_logvar" (C, 1, h, w) (App. A), or, on a cache miss or without a cache, the
    decoded "video" (3, T, H, W) and its "cache_key", for the main process to encode
    (LatentEncoder.complete); + the caption's cached T5 embedding "text" (L, D) when there is one.
    None for a bad file. The cache key names the decoding (shape, fps, start, crop) and how the
    VAE ran (mode), so a latent is reused only for exactly the pixels and encoder it came from."""

    def __init__(self, ds, cache=None, ids=("", ""), mode=None):
        self.ds, self.cache, self.ids, self.mode = ds, cache, ids, mode

    def key(self, index, start=None, crop=None):
        # "+frame0": the entry also holds the first frame's own posterior (App. A's image condition)
        return self.cache.key(self.ds.entries[index]["path"], self.ds.shapes[index], self.ids[0],
                              fps=self.ds.stage.fps, start=start, latent="posterior+frame0",
                              crop=crop, mode=self.mode)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        index, *rest = key if isinstance(key, tuple) else (key,)
        e = self.ds.entries[index]
        if self.ds.shapes[index] is None:
            return None
        item = {"index": index, **dict(zip(("row", "slot", "weight", "n_global"), rest)),
                "caption": e["caption"]}
        try:
            ck = self.key(index, *self.ds.augmentation(index, rest[4] if len(rest) > 4 else 0)) \
                if self.cache else None
            post = self.cache.get(ck) if ck else None
        except OSError:  # a missing file: counted by collate, as VideoDataset would
            self.ds._warn(e["path"], "missing file")
            return None
        if post is None:
            got = self.ds[key]  # decoded here, in the worker; encoded in the main process
            if got is None:
                return None
            item.update(video=got["video"], cache_key=ck)
        else:
            item.update(post)
        text = (self.cache.get(self.cache.text_key(e["caption"], self.ids[1])) if self.cache
                else None)
        return dict(item, **(text or {}))


@dataclass(frozen=True)
class EncodePlan:
    """How the frozen VAE encodes one shape (CausalVAE.encode): stream = latent frames per chunk
    with the causal cache (0 = the whole clip at once), tile = spatial tiles of that many pixels
    (0 = whole frames), batch = clips per call; peak = the estimated bytes of one call."""
    stream: int = 0
    tile: int = 0
    batch: int = 1
    peak: int = 0

    def __str__(self):
        return ((f"stream{self.stream}" if self.stream else "whole")
                + (f"+tile{self.tile}" if self.tile else ""))


def encode_bytes(cfg, shape, plan, itemsize=4, clips=1):
    """Estimated peak bytes of CausalVAE.encode (no grad) on `clips` clips of shape (T, H, W)
    under `plan`, weights not included (not in the paper: a planning aid).

    The widest activation is the first level's: cfg.channels[0] channels at full size, over
    the frames of one piece (the whole clip, or the first stream chunk: chunk + T mod chunk) plus
    the causal conv's 2 frames of padding. A ResBlock holds its input, the padded copy and the
    conv's output at once, and the fused norm / SiLU a transient more: ENCODE_PEAK of those
    (calibrated on the step simulator: python train.py --stage vae --simulate 1 --encode).
    Streaming keeps each causal conv's last 2 input frames from chunk to chunk. The clip itself
    arrives in float32 (the loader) and is cast to the VAE's dtype once."""
    T, H0, W0 = shape
    H, W = (min(H0, plan.tile), min(W0, plan.tile)) if plan.tile else (H0, W0)
    chunk = plan.stream * cfg.temporal_factor
    t = chunk + T % chunk if plan.stream and T >= chunk else T  # frames of the first piece
    widest = cache = 0
    for i, c in enumerate(cfg.channels):
        h, w = H >> i, W >> i
        widest = max(widest, c * (t + 2) * h * w)
        convs = 2 * cfg.layers + (5 if i == len(cfg.channels) - 1 else 0)  # + mid blocks, conv_out
        cache += 2 * h * w * (c * convs + (3 if i == 0 else 0)) if plan.stream else 0
        t = 1 + (t - 1) // 2 if i < cfg.time_levels else t
    clip = 3 * T * H0 * W0 * (4 + itemsize)
    return clips * (itemsize * (ENCODE_PEAK * widest + cache) + clip)


# peak / widest activation of an encode, measured by the step simulator on the released VAE
# (4.5 streamed at 49x480x720 and streamed + tiled at 81x768x1360, bf16), rounded up
ENCODE_PEAK = 5.0
TILES = (512, 384, 256, 192, 128, 96, 64)


def encode_plan(cfg, shape, budget, weights=0, itemsize=4, max_batch=16, mode=None, also=()):
    """The least approximate way to encode a clip of `shape` within `budget` bytes (weights
    included) -> EncodePlan with as many clips per call as fit (<= max_batch). also: other shapes
    one clip of which must fit the plan too (a stage's: LatentEncoder.set_stage).

    In order: the whole clip (GroupNorm statistics over the clip, as VAE training saw it); chunks
    of cfg.stream_latents latent frames (what the diffusers port always does); those chunks on
    spatial tiles, largest first. mode (an EncodePlan) fixes stream and tile and only sizes the
    batch. Raises ValueError when nothing fits. Context parallel (vae.cp_split) is not a choice
    here: it is exact but ties cp ranks to one clip in lockstep, while streaming reaches any
    length at a constant memory on one rank."""
    sf = cfg.spatial_factor
    tiles = [t for t in TILES if t % sf == 0 and t < max(max(s[1:]) for s in (shape, *also))]
    options = [mode] if mode else [EncodePlan(), EncodePlan(stream=cfg.stream_latents)] + [
        EncodePlan(stream=cfg.stream_latents, tile=t) for t in tiles]
    for p in options:
        one = encode_bytes(cfg, shape, p, itemsize)
        # streaming shrinks a long clip, not a short wide one (its first chunk is all of it)
        if weights + max([one] + [encode_bytes(cfg, s, p, itemsize) for s in also]) <= budget:
            n = max(1, min(max_batch, int((budget - weights) // one)))
            return replace(p, batch=n, peak=weights + encode_bytes(cfg, shape, p, itemsize, n))
    shape = max((shape, *also), key=lambda s: encode_bytes(cfg, s, options[-1], itemsize))
    least = weights + encode_bytes(cfg, shape, options[-1], itemsize)  # (the one that fits least)
    raise ValueError(f"encoding one {'x'.join(map(str, shape))} clip needs about "
                     f"{least / 2**30:.1f} GiB even as {options[-1]}, over the {budget / 2**30:.1f}"
                     f" GiB budget: raise --encode-memory or lower the stage's sizes")


class LatentEncoder:
    """The main process's half of the DiT's data path, on the training device: completes what
    the loader's workers decoded - the VAE posterior of every decoded clip (batched by shape) and
    the T5 embedding of every caption without one - and writes both to the cache.

    ae: the frozen VAE, already on its device and in its dtype (bf16 on a GPU); text: the text
    encoder (None: every caption must be cached); cache: a LatentCache or None; ids: (VAE id, text
    encoder id), the model parts of the cache keys (see model_id); budget: bytes one encode call
    may use. set_stage picks the stage's mode (stream / tile) from its largest clip; every clip of
    the stage is then encoded that way, so a stage's latents all come from one encoder setting."""

    def __init__(self, ae, text=None, cache=None, ids=("", ""), budget=12 * 2**30, max_batch=16):
        self.ae, self.text, self.cache, self.ids = ae, text, cache, ids
        self.budget, self.max_batch, self.mode, self.plans = budget, max_batch, EncodePlan(), {}
        p = next(ae.parameters())
        self.dtype = p.dtype
        self.weights = sum(q.numel() * q.element_size() for q in ae.encoder.parameters())

    def set_stage(self, shapes):
        """The mode for a stage whose clips have these (T, H, W): the least approximate one its
        largest clip needs that every other shape fits too. -> the mode's name for the cache
        keys. Raises ValueError when no mode fits them all."""
        size = lambda s: encode_bytes(self.ae.cfg, s, EncodePlan())
        distinct = {tuple(s) for s in shapes if s}
        largest = max(distinct, key=size, default=(1, 8, 8))
        # a mode every shape fits: plan(shape) would raise mid-stage on one the mode leaves over
        self.mode, self.plans = self._plan(largest, also=sorted(distinct)), {}
        return self.name()

    def name(self):
        return f"{self.mode}/{str(self.dtype).split('.')[-1]}"

    def _plan(self, shape, mode=None, also=()):
        return encode_plan(self.ae.cfg, shape, self.budget, self.weights,
                           self.dtype.itemsize, self.max_batch, mode, also)

    def plan(self, shape):
        """This stage's mode, with as many clips of `shape` per call as fit the budget."""
        shape = tuple(shape)
        if shape not in self.plans:
            self.plans[shape] = self._plan(shape, replace(self.mode, batch=1, peak=0))
        return self.plans[shape]

    @torch.no_grad()
    def posteriors(self, x, plan=None):
        """x (B, 3, T, H, W) -> the clip's posterior and the first frame's own, each
        (B, C, T' or 1, h, w), float32.

        The I2V condition (App. A) is encode(first frame), exactly what sample.py feeds at
        inference. It is not latent frame 0 of the whole clip: the whole-clip GroupNorm statistics
        see the later frames."""
        plan = plan or self.mode
        p = next(self.ae.parameters())
        x = x.to(p.device, p.dtype, non_blocking=True)  # (B, 3, T, H, W)
        post = self.ae.encode(x, stream=plan.stream, tile=plan.tile or None)
        img = self.ae.encode(x[:, :, :1], tile=plan.tile or None)
        return {"mean": post.mean.float(), "logvar": post.logvar.float(),
                "img_mean": img.mean.float(), "img_logvar": img.logvar.float()}

    def text_of(self, caption):
        """The caption's T5 embedding {"text": (L, D)} (cached when there is a cache)."""
        def embed():  # only when not cached (or the cached file was unreadable)
            if self.text is None:
                raise ValueError(f"no text encoder and no cached embedding of {caption!r}: pass "
                                 "--text-encoder")
            return {"text": self.text.encode([caption])[0].float()}  # (L, D)
        return embed() if self.cache is None else self.cache.get_or_make(
            self.cache.text_key(caption, self.ids[1]), embed)

    @torch.no_grad()
    def complete(self, batch):
        """A collated batch from the loader -> the same batch, every item with its posterior
        and text: the decoded clips are encoded here, grouped by shape, plan(shape).batch at a
        time (GroupNorm is per sample: the same latents as one by one, up to rounding)."""
        groups = {}
        for it in batch["items"]:
            if "video" in it:
                groups.setdefault(tuple(it["video"].shape[1:]), []).append(it)
        for shape, group in groups.items():
            n = self.plan(shape).batch
            for j in range(0, len(group), n):
                part = group[j:j + n]
                post = self.posteriors(torch.stack([it.pop("video") for it in part]))
                for k, it in enumerate(part):
                    it.update({name: v[k] for name, v in post.items()})
                    key = it.pop("cache_key", None)
                    if self.cache is not None and key:
                        self.cache.put(key, {name: v[k] for name, v in post.items()})
        for it in batch["items"]:
            if "text" not in it:
                it.update(self.text_of(it["caption"]))
        return batch

    def fill(self, prepared, indices, workers=0, bar=True, stage=0, chunk=16):
        """Encode the cache misses among `indices` up front: decoded by `workers` loader
        processes in groups of one shape (<= chunk), encoded here (complete); then embed their
        captions. The cache holds the fixed augmentation only (start and crop are part of the
        key, see train.py's --augment)."""
        todo = {}  # shape -> [index] of the misses
        for i in indices:
            try:
                if not self.cache.has(prepared.key(i, *prepared.ds.augmentation(i))):
                    todo.setdefault(tuple(prepared.ds.shapes[i]), []).append(i)
            except OSError:
                continue  # a missing file: skipped (and counted) when training reaches it
        requests = [[(i, 0, -1, 0.0, 1) for i in g[j:j + chunk]]
                    for g in todo.values() for j in range(0, len(g), chunk)]
        loader = make_loader(prepared, requests, workers) if requests else []
        for b in tqdm(loader, f"caching latents (stage {stage})", total=len(requests),
                      disable=not bar, leave=False):
            self.complete(b)
        for caption in dict.fromkeys(prepared.ds.entries[i]["caption"] for i in indices):
            self.text_of(caption)  # the T5 embedding of each distinct caption, once


def collate(items):
    """The training loader's collate_fn: keep the good samples, count the bad ones (None; the
    dataset warned with the reason) -> {"items": [...], "bad": n}."""
    good = [it for it in items if it is not None]
    return {"items": good, "bad": len(items) - len(good)}


# ----- the shapes set -----

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SHAPES = ("circle", "square")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y down
# Held out of training: one motion per colour and one colour per motion, so every word is still
# seen in training but these pairings never are; eval_prompts() asks for them to test composition.
HELD_OUT = [("red", "up"), ("green", "left"), ("blue", "down"), ("yellow", "right")]
# The set's speed: this fraction of the frame's shorter side a frame (1 px a frame at 32).
SPEED = 1 / 32


def caption_of(colour, shape, motion=None):
    if motion is None:
        return f"a {colour} {shape}"
    way = "to the " if motion in ("left", "right") else ""
    return f"a {colour} {shape} moves {way}{motion}"


def eval_prompts():
    """-> [(prompt, is_held_out)] every colour x shape x motion, held-out pairings included."""
    return [(caption_of(c, s, m), (c, m) in HELD_OUT)
            for c in COLOURS for s in SHAPES for m in MOTIONS]


def draw_shape(H, W, colour, shape, cx, cy, r):
    """(H, W, 3) uint8: one hard-edged shape on black (hard edges keep colours pure)."""
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    if shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    else:
        mask = (np.abs(xx - cx) <= r * 0.9) & (np.abs(yy - cy) <= r * 0.9)
    img = np.zeros((H, W, 3), np.uint8)
    img[mask] = COLOURS[colour]
    return img


def shapes_clip(H, W, colour, shape, motion, T, cx, cy, r, speed=None):
    """(T, H, W, 3) uint8: the shape starting at (cx, cy), moving `speed` pixels a frame (default
    SPEED x min(H, W), the set's speed) the motion's way; motion None: it stays put."""
    dx, dy = MOTIONS[motion] if motion else (0, 0)
    step = min(H, W) * SPEED if speed is None else speed
    return np.stack([draw_shape(H, W, colour, shape, cx + dx * step * t, cy + dy * step * t, r)
                     for t in range(T)])  # (T, H, W, 3)


def shapes_start(rng, H, W, r, motion, T):
    """A clip's start (cx, cy), drawn from `rng` so the shape of radius r stays in the frame over
    its T frames at the set's speed (motion None: anywhere it fits)."""
    dx, dy = MOTIONS[motion] if motion else (0, 0)
    span = min(H, W) * SPEED * (T - 1)  # total travel along the motion axis
    lo_x, hi_x = r + 1 + max(0, -dx) * span, W - r - 1 - max(0, dx) * span
    lo_y, hi_y = r + 1 + max(0, -dy) * span, H - r - 1 - max(0, dy) * span
    return rng.uniform(lo_x, max(lo_x, hi_x)), rng.uniform(lo_y, max(lo_y, hi_y))


def make_shapes(out, n, seed=0, sizes=((32, 32), (32, 48)), frames=(9, 13, 17), fps=8,
                image_every=5, radius=(0.18, 0.24), progress=False):
    """Write n captioned samples to `out` (clips: lossless .mkv, stills: .png) and
    out/manifest.jsonl; returns the manifest's path.

    Every image_every-th sample is a still image ("a red circle"); clips cycle through the training
    (colour, shape, motion) combinations (HELD_OUT excluded) in a seeded order, each with a random
    duration from `frames`, size from `sizes`, start position and radius. The shape moves
    size/32 pixels per frame so it never leaves the frame. Deterministic from seed."""
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    combos = [(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS if (c, m) not in HELD_OUT]
    entries, queue = [], []
    for i in tqdm(range(n), desc="shapes", unit="clip", disable=not progress):
        H, W = rng.choice(sizes)
        # ~6-8 px at 32: big enough to learn (with small shapes, ~7% of the pixels, a VAE
        # trained with L1 first learns an all-black frame)
        r = min(H, W) * rng.uniform(*radius)
        if i % image_every == image_every - 1:
            colour, shape, motion, T = rng.choice(list(COLOURS)), rng.choice(SHAPES), None, 1
            cx, cy = rng.uniform(r + 1, W - r - 1), rng.uniform(r + 1, H - r - 1)
            path = os.path.join(out, f"{i:05d}.png")
            Image.fromarray(draw_shape(H, W, colour, shape, cx, cy, r)).save(path)
        else:
            if not queue:
                queue = rng.sample(combos, len(combos))
            colour, shape, motion = queue.pop()
            T = rng.choice(frames)
            cx, cy = shapes_start(rng, H, W, r, motion, T)
            clip = shapes_clip(H, W, colour, shape, motion, T, cx, cy, r)  # (T, H, W, 3)
            path = os.path.join(out, f"{i:05d}.mkv")
            # uint8 -> [-1, 1] -> uint8 is exact, so the FFV1 file holds exactly these pixels
            write_video(torch.from_numpy(clip).permute(3, 0, 1, 2) / 127.5 - 1, path, fps)
        entries.append({"path": path, "caption": caption_of(colour, shape, motion),
                        "colour": colour, "shape": shape, "motion": motion, "frames": T,
                        "height": H, "width": W, "fps": fps if T > 1 else None,
                        "duration": T / fps if T > 1 else 0.0})
    return write_manifest(entries, os.path.join(out, "manifest.jsonl"))


# ----- the shapes checker: does a video follow its caption? -----
# Each threshold comes from the set's geometry, not from tuning on samples:
BRIGHT = 0.5       # object pixel: brightest channel above half (hard edges blur around 0.5)
DIM = 0.1          # above this a pixel is lit at all: object plus its blurred halo
LIT = 0.25         # a second object this bright is plainly visible (a dim one is still one)
CORNER = 0.5       # the box's corners (outside its inscribed ellipse, 21% of it): a disc fills
                   # none of them, a square all: the midpoint (the set's digital discs: <= 0.5)
FILL_MIN = 0.64    # a triangle or a 45-degree square fills 0.5 of its box, a disc 0.785
ASPECT = 0.8       # the box's sides within 0.8-1.25x of each other (the set's are equal, +-1 px)
HULL = 0.9         # the object covers >= 90% of its convex hull (a ring, an outline, a plus, a
                   # notched or slotted disc do not; a digital disc or square covers all of it)
SHAPE_FRAMES = 0.75  # the shape holds in >= 3/4 of the judged frames (not only in their median)
COLOUR_SHARE = 0.8   # >= 80% of the object's pixels in the prompted colour (not a two-colour one)
STEADY = 0.75      # every frame vs the first: area 0.75-1.33x, sharpness, brightness >= 0.75x
JUMP = 4           # a frame's step along the motion at most 4x the set's (a teleport), none back
                   # more than one set step
MIN_SIDE = 8       # shape is judged on objects at least this many pixels a side (make_shapes'
                   # defaults: 11-15; the demo's set, train.DEMO_SET: 12-16)
# Colours no caption names: a pixel nearest to one of these is no palette colour (white and greys
# would pass as yellow, magenta as red, cyan as green or blue). Hues between two palette colours
# (orange, purple) go to the nearer one: the demo VAE's yellow has 18% of its pixels nearer an
# orange (255, 128, 0) than yellow.
OTHER_COLOURS = {"white": (255, 255, 255), "magenta": (255, 0, 255), "cyan": (0, 255, 255)}


def _grow(seed, mask):
    """Flood fill: the pixels of `mask` (T, H, W) bool 8-connected to `seed` (T, H, W) values > 0;
    a seed value spreads as the max of its neighbours' (labels: each group ends at its max)."""
    x = seed.float() * mask
    while True:
        y = torch.nn.functional.max_pool2d(x[:, None], 3, 1, 1)[:, 0] * mask  # (T, H, W)
        if torch.equal(y, x):
            return x
        x = y


def _hull_and_corners(obj):
    """(hull, corner) for one frame's object mask (H, W) bool: hull = its pixels / the pixel
    centres inside the convex hull of its pixel centres (1 for a digital disc or square, lower for
    a plus, a notch, a slot); corner = the share of its bounding box's pixels outside the box's
    inscribed ellipse (21% of the box) that it covers (0 for a large disc; the set's digital
    discs 0-0.5, median 0.09; 1 for a square)."""
    ys, xs = np.nonzero(obj.numpy())
    if len(ys) < 3:
        return 1.0, 0.0
    pts = sorted(set(zip(xs.tolist(), ys.tolist())))
    cross = lambda o, a, b: (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
    lower, upper = [], []  # Andrew's monotone chain, counter-clockwise
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1], np.float64)  # (V, 2) x, y
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    gy, gx = np.mgrid[y0:y1 + 1, x0:x1 + 1]  # the bounding box's pixel centres
    if len(hull) >= 3:  # inside every edge (a line of points: the box is the hull)
        e = np.roll(hull, -1, 0) - hull  # (V, 2) edge vectors
        c = e[:, 0, None, None] * (gy - hull[:, 1, None, None]) \
            - e[:, 1, None, None] * (gx - hull[:, 0, None, None])  # (V, h, w)
        inside = (c >= -1e-9).all(0).sum()
    else:
        inside = gy.size
    a, b = (y1 - y0 + 1) / 2, (x1 - x0 + 1) / 2
    out = ((gy - (y0 + y1) / 2) / a) ** 2 + ((gx - (x0 + x1) / 2) / b) ** 2 > 1  # (h, w)
    box = obj.numpy()[y0:y1 + 1, x0:x1 + 1]
    return len(ys) / max(inside, 1), float(box[out].mean()) if out.any() else 0.0


def shapes_measure(video):
    """Per-frame measurements of the object in a (3, T, H, W) video in [-1, 1] -> dict of (T,)
    tensors. The object is the largest 8-connected group of bright pixels. stray: the largest
    group of lit (LIT) pixels not touching it (a second object, dim ones too); area (its
    pixels), colour (index of the palette colour most of them are nearest to, -1 for an unnamed
    colour), colour_frac (its share of them), fill (area / bounding-box area), side, aspect (the
    box's shorter side, and shorter / longer), hull, corner (see _hull_and_corners), cx, cy
    (centroid), sharp (bright pixels / lit pixels: 1 for a hard edge, lower with a blurred
    halo), bright (mean brightness of the object) and edge (the box touches the frame border)."""
    x = (video.float().clamp(-1, 1) + 1) / 2  # (3, T, H, W) in [0, 1]
    _, T, H, W = x.shape
    b = x.amax(0)  # (T, H, W) brightness
    bright = b > BRIGHT  # (T, H, W)
    # the largest connected group: label each pixel by its flat index, spread the max per group
    labels = _grow(torch.arange(1, H * W + 1).float().view(1, H, W), bright)  # (T, H, W)
    obj = torch.zeros_like(bright)
    for t in range(T):
        ids, sizes = labels[t][bright[t]].unique(return_counts=True)
        if len(ids):
            obj[t] = labels[t] == ids[sizes.argmax()]
    named = {**COLOURS, **OTHER_COLOURS}
    palette = torch.tensor(list(named.values()), dtype=torch.float32) / 255  # (K, 3)
    near = ((x.permute(1, 2, 3, 0)[..., None, :] - palette) ** 2).sum(-1).argmin(-1)  # (T, H, W)
    votes = torch.stack([(obj & (near == k)).sum((1, 2)) for k in range(len(palette))], -1)
    best = votes.argmax(-1)  # (T,) over the palette and the unnamed colours
    area = obj.sum((1, 2)).float()  # (T,)
    safe = area.clamp(min=1)
    rows, cols = obj.any(2), obj.any(1)  # (T, H), (T, W): rows / columns the object touches
    # first..last touched row (column): the bounding box's sides; 0 for an empty frame
    side = lambda m: (m.shape[1] - m.flip(1).float().argmax(1) - m.float().argmax(1)) * m.any(1)
    box_h, box_w = side(rows), side(cols)  # (T,) bounding-box sides
    ys, xs = torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32)
    # a second object, dim ones too: the largest lit group that does not touch the object
    lit = b > LIT
    lab = _grow(torch.arange(1, H * W + 1).float().view(1, H, W), lit)  # (T, H, W)
    stray = torch.zeros(T)
    hull, corner = torch.ones(T), torch.zeros(T)
    for t in range(T):
        mine = lab[t][obj[t]].unique()
        other = lit[t] & ~torch.isin(lab[t], mine)
        if other.any():
            stray[t] = lab[t][other].unique(return_counts=True)[1].max()
        hull[t], corner[t] = _hull_and_corners(obj[t])
    return {"area": area, "stray": stray, "hull": hull, "corner": corner,
            "colour": torch.where(best < len(COLOURS), best, -1),
            "colour_frac": votes.amax(-1) / safe,
            "fill": area / (box_h * box_w).clamp(min=1), "side": torch.minimum(box_h, box_w),
            "aspect": torch.minimum(box_h, box_w) / torch.maximum(box_h, box_w).clamp(min=1),
            "cx": (obj.sum(1) * xs).sum(-1) / safe, "cy": (obj.sum(2) * ys).sum(-1) / safe,
            "sharp": bright.sum((1, 2)) / (b > DIM).sum((1, 2)).clamp(min=1),
            "bright": (b * obj).sum((1, 2)) / safe,
            "edge": rows[:, 0] | rows[:, -1] | cols[:, 0] | cols[:, -1]}


def shapes_check(video, caption, min_area=0.015):
    """Does a (3, T, H, W) video in [-1, 1] follow a shapes caption? -> {"colour", "shape",
    "motion", "steady": bool, "pass": all four, "fill", "corner" (medians over the judged
    frames), "travel", "across": measured values}.

    colour: in EVERY frame one object (the largest group of bright pixels) of >= min_area of the
            frame (and >= 3 pixels), >= COLOUR_SHARE of its pixels nearest to the prompted
            palette colour (not another, nor an unnamed one: white, orange, ...), and no second
            group of lit pixels that large (a second object, a two-colour, recoloured or
            vanished one fails).
    shape:  judged on the frames where the object's box is clear of the border and >= MIN_SIDE
            a side; in >= SHAPE_FRAMES of them: the box's corners (outside its inscribed
            ellipse) filled at most CORNER for a circle (and the whole box above FILL_MIN),
            more for a square, the box's sides within ASPECT of each other and the object >=
            HULL of its convex hull (a ring, a plus, a triangle, a 45-degree square, an ellipse,
            a rectangle fail); no such frame fails (a shape too small to tell is not followed).
    motion: a line fitted to the centroid over time travels, along the prompted axis and way, at
            least half the set's speed (SPEED x min(H, W) pixels a frame), at most half as fast
            across it, and the centroid strays across by at most half that travel; no frame's
            step along it is more than JUMP set steps forward or one back (a teleport, a
            zig-zag). A caption without a motion: the centroid stays within half that travel.
    steady: every frame's object is as large (0.75-1.33x the area), as sharp and as bright
            (>= 0.75x) as the first two frames' (smearing, shrinking and fading fail, also in
            the middle of a clip)."""
    # letter runs, so no punctuation hides a word ('left!' kept no motion: a still then passed)
    words = re.findall(r"[a-z]+", caption.lower())
    colour = next((w for w in words if w in COLOURS), None)
    if colour is None:
        raise ValueError(f"caption {caption!r} names none of the colours {list(COLOURS)}")
    shape = next((w for w in words if w in SHAPES), None)
    motion = next((w for w in words if w in MOTIONS), None)
    m = shapes_measure(video)
    _, T, H, W = video.shape
    res = {"fill": float("nan"), "corner": float("nan"), "travel": 0.0, "across": 0.0}
    # colour: every frame holds one object, mostly in the prompted colour
    big = max(3.0, min_area * H * W)  # an object's least size, a second one's too
    present = (m["area"] >= big) & (m["colour_frac"] >= COLOUR_SHARE) & (m["stray"] < big)
    res["colour"] = bool((present & (m["colour"] == list(COLOURS).index(colour))).all())
    # shape: on frames where the box is clear of the border (a cut disc fills its corners) and
    # at least MIN_SIDE pixels a side (a digital disc of radius 3 fills 24 of its 25 box pixels:
    # too small to tell), frame by frame
    clear = ~m["edge"] & present & (m["side"] >= MIN_SIDE)
    if clear.any():
        res["fill"], res["corner"] = float(m["fill"][clear].median()), \
            float(m["corner"][clear].median())
    square = m["corner"] > CORNER  # (T,) frame by frame
    right = square if shape == "square" else ~square & (m["fill"] > FILL_MIN)
    right = right & (m["aspect"] >= ASPECT) & (m["hull"] >= HULL)
    told = bool(clear.any()) and float(right[clear].float().mean()) >= SHAPE_FRAMES
    res["shape"] = shape is None or told
    # motion: least-squares slope of the centroid, in pixels over the clip
    step = min(H, W) * SPEED  # the set's step a frame
    speed = 0.5 * step * (T - 1)  # half the training travel over T frames
    if T > 1 and present.sum() >= 2:
        t = torch.arange(T, dtype=torch.float32)[present]
        tc = t - t.mean()
        cx, cy = m["cx"][present], m["cy"][present]
        slope = lambda c: float((tc * (c - c.mean())).sum() / (tc * tc).sum())
        tx, ty = slope(cx) * (T - 1), slope(cy) * (T - 1)
        if motion is None:
            res["motion"] = max(float(cx.max() - cx.min()), float(cy.max() - cy.min())) < speed
        else:
            dx, dy = MOTIONS[motion]
            along, side = (cx * dx, cy) if dx else (cy * dy, cx)
            res["travel"] = tx * dx if dx else ty * dy
            res["across"] = float(side.max() - side.min())  # strays, not only a fitted slope
            steps = (along[1:] - along[:-1]) / (t[1:] - t[:-1])  # per frame along the motion
            slant = abs(ty if dx else tx)  # the fitted line's travel across the motion
            # float32 centroids: an exact one-pixel step back can read -1.000001 (1e-3 px slack)
            res["motion"] = res["travel"] >= speed and res["across"] <= speed \
                and slant <= 0.5 * res["travel"] \
                and bool(((steps <= JUMP * step + 1e-3) & (steps >= -step - 1e-3)).all())
    else:  # a single frame (or an object in fewer than two frames) shows no motion
        res["motion"] = motion is None and bool(present.any())
    # steady: every frame against the clip's start
    k = min(2, T)
    ratio = lambda key: m[key] / m[key][:k].mean().clamp(min=1e-6)  # (T,)
    area_r = ratio("area")
    res["steady"] = bool(present.all() and ((STEADY <= area_r) & (area_r <= 1 / STEADY)
                                            & (ratio("sharp") >= STEADY)
                                            & (ratio("bright") >= STEADY)).all())
    res["pass"] = res["colour"] and res["shape"] and res["motion"] and res["steady"]
    return res


def shapes_follow(video, caption, **kw):
    """True when `video` passes all four checks of shapes_check (colour, shape, motion, steady)."""
    return shapes_check(video, caption, **kw)["pass"]


def shapes_grid(videos, labels, passed, path, scale=2, gap=2, label_width=300):
    """One PNG, row i = videos[i] (3, T, H, W) in [-1, 1], frames left to right at `scale`x, after
    a label column: labels[i] and PASS (green) or FAIL (red) from passed[i]. Written atomically."""
    from PIL import ImageDraw
    rows = [to_uint8(v) for v in videos]  # (T, H, W, 3) each
    T, H, W = max(r.shape[0] for r in rows), *rows[0].shape[1:3]
    h, w = H * scale, W * scale
    sheet = Image.new("RGB", (label_width + T * (w + gap), len(rows) * (h + gap) - gap), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (frames, label, ok) in enumerate(zip(rows, labels, passed)):
        y = i * (h + gap)
        draw.text((4, y + h // 2 - 12), label, fill="black")
        draw.text((4, y + h // 2 + 2), "PASS" if ok else "FAIL",
                  fill=(0, 140, 0) if ok else (200, 0, 0))
        for t, f in enumerate(frames):
            big = Image.fromarray(f).resize((w, h), Image.NEAREST)
            sheet.paste(big, (label_width + t * (w + gap), y))
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


# ----- command line -----

FILTER_ARGS = ("min_motion", "max_cut", "max_static", "min_seconds")  # FilterConfig, on the CLI
# the tiny VAE's spatial factor (4) x the DiT patch (2): the smallest multiple any stage size needs
# (the released VAE needs 16); checked on the command line only, the functions accept any size
SIZE_MULTIPLE = 8


def _record(entries, args):
    """inspect --write: the metadata of every entry, probed in --workers threads."""
    got, bad = probe_entries(entries, args.workers, force=True, progress=True)
    write_manifest(got, args.write)
    print(f"{len(got) - len(bad)} ok, {len(bad)} unreadable (kept, marked \"unreadable\") "
          f"-> {args.write}")
    for path, why in list(bad.items())[:20]:
        print(f"{path}: skip: {why}")
    if len(bad) == len(got):  # nothing usable: not a silent success
        _nothing_readable(len(got))


def _nothing_readable(n):
    """Every entry unreadable: an error line and exit code 1, as caption.py when all videos fail."""
    print(f"error: every one of the {n} entries is unreadable (reasons above)", file=sys.stderr)
    sys.exit(1)


def _inspect(entries, args):
    if args.write:
        return _record(entries, args)
    ok = 0
    for e in entries:
        try:
            v = load_video(e["path"], args.frames, args.height, args.width, args.fps,
                           e.get("start"), pad=args.pad)
            print(f"{e['path']}: ok {tuple(v.shape)}")
            ok += 1
        except BadVideo as err:
            print(f"{e['path']}: skip: {err}")
    print(f"{ok} ok, {len(entries) - ok} skipped")
    if not ok:
        _nothing_readable(len(entries))


def _filter(args, classifier):
    cfg = FilterConfig(**{k: getattr(args, k) for k in FILTER_ARGS})
    kept, dropped = filter_manifest(args.manifest, args.out, cfg, args.top, classifier, True)
    reasons = Counter(w.split(" (")[0] for _, ws in dropped for w in ws)
    print(f"kept {len(kept)}, dropped {len(dropped)} -> {args.out}")
    print("\n".join(f"{r:<28}{c:>6}" for r, c in [("reason", "clips"), *reasons.most_common()]))
    failed = ("unreadable", "classifier failed")  # not one clip judged: no silent success
    if not kept and all(w.startswith(failed) for _, ws in dropped for w in ws):
        if reasons["unreadable"] == len(dropped):
            _nothing_readable(len(dropped))
        print(f"error: every one of the {len(dropped)} clips is unreadable or failed the "
              f"--classifier (reasons in {filter_outputs(args.out, args.top)[2]})", file=sys.stderr)
        sys.exit(1)


def import_fn(spec, flag):
    """'module:function' given as `flag`, imported from the current directory -> the function.
    Anything wrong is a one-line ValueError naming the flag (caption.py's hooks use it too)."""
    mod, _, fn = spec.partition(":")
    if not (mod and fn):
        raise ValueError(f"{flag} expects module:function, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{flag} {spec}: {e}") from None


def _check_args(args):
    """Every bad argument as one line (ValueError) before any work starts."""
    def frames_ok(f, what, clip=False):
        if f < 1 or (f - 1) % 4 or (clip and f == 1):
            raise ValueError(f"{what} must be 4k+1 frames ({'5, 9, 13' if clip else '1, 5, 9'}, "
                             f"...), got {f}: the causal VAE maps 4k+1 frames to k+1 latents")

    def size_ok(h, w, what):
        if h <= 0 or w <= 0 or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ValueError(f"{what} {h}x{w}: height and width must be positive multiples of "
                             f"{SIZE_MULTIPLE} (VAE spatial factor x patch)")
    if args.cmd == "shapes":
        try:
            args.sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
            args.frames = [int(f) for f in args.frames.split(",")]
        except ValueError:
            raise ValueError(f"--sizes is a list like 32x32,32x48 and --frames like 9,13,17; got "
                             f"{args.sizes!r}, {args.frames!r}") from None
        for hw in args.sizes:
            if len(hw) != 2:
                raise ValueError(f"--sizes entries are HxW, got {'x'.join(map(str, hw))}")
            size_ok(*hw, "--sizes")
        for f in args.frames:
            frames_ok(f, "--frames", clip=True)
        if args.n < 1 or args.fps < 1:
            raise ValueError(f"--n and --fps must be >= 1, got {args.n}, {args.fps}")
        check_writable(args.out, "--out", folder=True)  # now, not after writing every clip
        if os.path.isdir(args.out) and os.listdir(args.out):  # e.g. a folder of one's own clips
            raise ValueError(f"--out {args.out} is not empty: the set's 00000.mkv, ... and "
                             f"manifest.jsonl would replace files there; pass a new folder")
        return
    if args.cmd == "inspect":  # each mode's own options: the other mode ignored them
        decode = [f"--{k}" for k in ("height", "width", "frames", "fps", "pad")
                  if getattr(args, k) is not None]
        if args.write and decode:
            raise ValueError(f"--write records each entry's metadata and decodes nothing: drop "
                             f"{', '.join(decode)} (or --write, to decode every entry)")
        if not args.write and args.workers is not None:
            raise ValueError("--workers sets --write's probing threads: add --write OUT, or "
                             "drop --workers")
        args.workers = (os.cpu_count() or 1) if args.workers is None else args.workers
        args.pad = args.pad or "nearest"
    if args.cmd == "inspect" and args.write:
        if args.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {args.workers}")
        check_writable(args.write, "--write")  # now, not after probing every file
    elif args.cmd == "inspect":
        if None in (args.frames, args.height, args.width):
            raise ValueError("inspect needs --height, --width and --frames (to decode as training "
                             "would), or --write OUT (to record every entry's metadata)")
        frames_ok(args.frames, "--frames")
        size_ok(args.height, args.width, "--height x --width")
        if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
            # nan decoded no frame of any clip; inf one frame repeated
            raise ValueError(f"--fps must be a finite number > 0, got {args.fps}")
    else:
        if not 0 < args.top <= 1:
            raise ValueError(f"--top is a fraction in (0, 1], got {args.top}")
        for k in FILTER_ARGS:  # a nan threshold compares False: that filter silently off
            if not (math.isfinite(getattr(args, k)) and getattr(args, k) >= 0):
                raise ValueError(f"--{k.replace('_', '-')} must be a finite number >= 0, got "
                                 f"{getattr(args, k)}")
        # the kept subset written over the manifest it was read from loses every dropped entry
        check_not_input(filter_outputs(args.out, args.top), {args.manifest: "manifest"})
        check_writable(args.out, "--out")  # now, not after scoring every clip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("shapes", help="write the synthetic shapes set + manifest")
    p.add_argument("--out", required=True, help="a new or empty folder")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", default="32x32,32x48", help=f"HxW list, multiples of {SIZE_MULTIPLE}")
    p.add_argument("--frames", default="9,13,17", help="4k+1 clip lengths")
    p.add_argument("--fps", type=int, default=8)
    p = sub.add_parser("inspect", help="decode every entry as training would; one line each "
                       "(--write OUT: record each entry's metadata instead)")
    p.add_argument("manifest", help=".jsonl manifest or a folder of videos")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int, help="4k+1")
    p.add_argument("--write", metavar="OUT", help="write the manifest with height, width, frames, "
                   "fps, duration and a content hash per entry (training then never probes)")
    p.add_argument("--workers", type=int, help="--write: probing threads (default: the CPUs; "
                   "PyAV decodes without the GIL)")
    p.add_argument("--fps", type=float, default=None)
    p.add_argument("--pad", choices=("nearest", "repeat"), help="default: nearest")
    p = sub.add_parser("filter", help="score clips (§3.4): kept subset, top fraction, drop table")
    p.add_argument("manifest", help=".jsonl manifest or a folder of videos")
    p.add_argument("--out", required=True)
    p.add_argument("--top", type=float, default=0.2, help="fraction kept for the §3.2 fine-tune")
    p.add_argument("--classifier", help="module:function returning {negative label: probability}")
    for k in FILTER_ARGS:
        p.add_argument("--" + k.replace("_", "-"), dest=k, type=float,
                       default=getattr(FilterConfig, k))
    args = ap.parse_args(argv)
    try:  # bad input -> one line (argparse's error, exit code 2), never a traceback
        _check_args(args)
        # a missing manifest or a bad line; a classifier that does not import
        entries = read_manifest(args.manifest) if args.cmd != "shapes" else None
        classifier = (import_fn(args.classifier, "--classifier")
                      if args.cmd == "filter" and args.classifier else None)
        if entries == []:  # nothing to do is no success (and --write would write an empty file)
            raise ValueError(f"{args.manifest} has no entries: pass a folder of videos/images or "
                             "a .jsonl manifest with one {\"path\", \"caption\"} per line")
    except ValueError as e:
        ap.error(str(e))
    if args.cmd == "shapes":
        print(make_shapes(args.out, args.n, args.seed, args.sizes, args.frames, args.fps,
                          progress=True))
    elif args.cmd == "inspect":
        _inspect(entries, args)
    else:
        _filter(args, classifier)


if __name__ == "__main__":
    main()
