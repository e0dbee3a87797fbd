"""data.py: decoding (codecs, containers, sizes, fps, audio, rotation, VFR, bad files), writing,
Frame Pack and bucket samplers (no sample lost or duplicated, rank sharding), stages, filters,
cache, shapes set.

Every clip is written here with PyAV; frame i is painted with grey level 10 + 12 i (or a known
pattern) so the decoded frame order can be read back even through lossy codecs."""
import fractions
import json
import os
import random
import sys
from dataclasses import replace

import av
import numpy as np
import pytest
import torch

import data
import train


# ----- helpers: write test clips -----

def grey(i):
    return 10 + 12 * i


def write(path, T=9, H=32, W=48, fps=8, codec=None, audio=False, rotation=None, times=None,
          paint=None, gop=None):
    """Write a clip; frame i is uniform grey(i) unless `paint(i) -> (H, W, 3)` is given.
    times: explicit presentation times in seconds (variable frame rate); gop: a keyframe every
    gop frames (libx264)."""
    ext = os.path.splitext(path)[1]
    codecs = {".mp4": "libx264", ".avi": "mpeg4", ".webm": "libvpx-vp9", ".mkv": "ffv1",
              ".ts": "libx264"}
    codec = codec or codecs[ext]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width = H, W
        s.pix_fmt = "yuv444p" if codec == "ffv1" else "yuv420p"
        if codec == "libx264":
            s.options = {"crf": "10", **({"g": str(gop), "sc_threshold": "0"} if gop else {})}
        if rotation is not None:
            s.set_display_rotation(rotation)  # PyAV 18 ignores metadata["rotate"] when writing
        if times is not None:
            s.codec_context.time_base = fractions.Fraction(1, 1000)
        a = c.add_stream("aac", rate=16000) if audio else None
        for i in range(T):
            img = paint(i) if paint else np.full((H, W, 3), grey(i), np.uint8)
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            if times is not None:
                f.pts, f.time_base = round(times[i] * 1000), fractions.Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        if a is not None:
            silence(c, a, int(16000 * T / fps) // 1024, "fltp", np.float32)
    return str(path)


def silence(c, a, n, fmt, dtype):
    """Mux n silent mono 16 kHz audio frames of 1024 samples into stream a of container c."""
    for k in range(n):
        af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype), format=fmt, layout="mono")
        af.sample_rate, af.pts = 16000, k * 1024
        for p in a.encode(af):
            c.mux(p)
    for p in a.encode():
        c.mux(p)


def levels(video):
    """(3, T, H, W) in [-1, 1] -> per-frame mean grey level 0..255."""
    return ((video + 1) * 127.5).mean(dim=(0, 2, 3))


def frame_ids(video):
    return [round((g - 10) / 12) for g in levels(video).tolist()]


# ----- decoding -----

@pytest.mark.parametrize("ext,H,W", [(".mp4", 32, 48), (".avi", 33, 47), (".webm", 33, 47),
                                     (".mkv", 33, 47)])
def test_codecs_containers_odd_sizes(tmp_path, ext, H, W):
    p = write(tmp_path / f"c{ext}", T=17, H=H, W=W, fps=24)
    v = data.load_video(p, 9, 16, 24)
    assert v.shape == (3, 9, 16, 24) and v.dtype == torch.float32
    assert v.min() >= -1 and v.max() <= 1
    assert frame_ids(v) == list(range(9))  # native rate: consecutive frames
    # fps 8 from a 24 fps clip: every third frame, uniformly spread in time
    assert frame_ids(data.load_video(p, 5, 16, 16, fps=8)) == [0, 3, 6, 9, 12]
    meta = data.probe(p)
    # webm/mkv: frames counted from the duration
    assert (meta["height"], meta["width"], meta["frames"]) == (H, W, 17)


def test_write_video_formats_rates_and_cleanup(tmp_path):
    v = torch.rand(3, 5, 17, 23, generator=torch.Generator().manual_seed(0)) * 2 - 1  # odd sides
    data.write_video(v, tmp_path / "v.mkv", fps=12.5)  # lossless FFV1 (bgr0): the exact pixels
    back = data.load_video(tmp_path / "v.mkv", 5)  # no height / width: native size
    assert torch.equal(((back + 1) * 127.5).round(), ((v + 1) * 127.5).round())
    for fps, rate in [(12.5, fractions.Fraction(25, 2)), (29.97, fractions.Fraction(30000, 1001)),
                      (8, 8)]:
        data.write_video(v, tmp_path / "v.mp4", fps=fps)  # the rate is never rounded
        with av.open(str(tmp_path / "v.mp4")) as c:
            s = c.streams.video[0]
            # yuv420p: odd sides padded
            assert s.average_rate == rate and (s.height, s.width) == (18, 24)
    with pytest.raises(ValueError, match="mp4 or .mkv"):
        data.write_video(v, tmp_path / "v.avi")
    with pytest.raises(Exception):
        data.write_video(v[:2], tmp_path / "w.mp4")  # 2 channels: fails while writing
    assert sorted(os.listdir(tmp_path)) == ["v.mkv", "v.mp4"]  # atomic: no temp file left behind


def test_short_clips_nearest_and_repeat(tmp_path):
    p = write(tmp_path / "short.mkv", T=7)
    assert frame_ids(data.load_video(p, 9, 16, 16)) == [0, 1, 2, 3, 4]  # largest 4k+1 that fits
    assert frame_ids(data.load_video(p, 9, 16, 16, pad="repeat")) == [0, 1, 2, 3, 4, 5, 6, 6, 6]
    with pytest.raises(ValueError, match="4k\\+1"):
        data.load_video(p, 8, 16, 16)


def test_seek_start_and_fps(tmp_path):
    p = write(tmp_path / "long.mp4", T=20, fps=10)
    assert frame_ids(data.load_video(p, 5, 16, 16, start=1.0)) == [10, 11, 12, 13, 14]
    assert frame_ids(data.load_video(p, 5, 16, 16, fps=5, start=0.2)) == [2, 4, 6, 8, 10]
    # past the end: 20 frames at 10 fps sampled at 5 fps from 1.0 s give frames 10..18 only
    assert frame_ids(data.load_video(p, 9, 16, 16, fps=5, start=1.0)) == [10, 12, 14, 16, 18]


@pytest.mark.parametrize("ext", [".mp4", ".ts"])
def test_seek_lands_on_start_in_every_container(tmp_path, ext):
    """MPEG-TS has no index: its seek lands on the keyframe AFTER the time asked (a clip began up
    to a GOP late, or decoded nothing); the decoder then reads from the beginning instead."""
    p = write(tmp_path / f"g{ext}", T=20, fps=25, gop=9)  # keyframes at frames 0, 9, 18
    assert frame_ids(data.load_video(p, 9, 16, 16, start=0.2)) == list(range(5, 14))
    assert frame_ids(data.load_video(p, 5, 16, 16, start=0.4)) == list(range(10, 15))
    assert frame_ids(data.load_video(p, 1, 16, 16, start=0.76)) == [19]  # past the last keyframe


def test_ts_seek_steps_back_before_reading_from_the_start(tmp_path):
    """A .ts seek past the last keyframe before start lands on nothing: seeking 1 s earlier finds
    that keyframe, so a clip late in a long file is not decoded from frame 0."""
    p = write(tmp_path / "k.ts", T=20, fps=5, gop=5)  # keyframes at 0, 1, 2, 3 s
    rate, frames = data._frames(p, 3.2)
    assert next(frames)[0] == pytest.approx(3.0)  # the keyframe before start, not frame 0
    frames.close()
    assert frame_ids(data.load_video(p, 1, 16, 16, start=3.2)) == [16]


def test_frames_every_seeks_to_start(tmp_path, monkeypatch):
    """caption.py's frames of a clip late in a file: a seek, not a decode from frame 0."""
    p = write(tmp_path / "f.mp4", T=20, fps=5, gop=5)
    asked, real = [], data._frames
    monkeypatch.setattr(data, "_frames", lambda path, start=None: asked.append(start) or real(path, start))
    got = [(t, round((int(img.mean()) - 10) / 12)) for t, img in data.frames_every(p, 1.0, start=2.2)]
    assert asked == [2.2] and got == [(0.0, 11), (1.0, 16)]  # the frames on screen at 2.2 and 3.2 s


def test_audio_stream(tmp_path):
    p = write(tmp_path / "a.mp4", T=9, audio=True)
    with av.open(p) as c:
        assert len(c.streams.audio) == 1
    assert frame_ids(data.load_video(p, 9, 32, 32)) == list(range(9))


def test_a_cover_picture_is_no_video_stream(tmp_path):
    """A song saved as .mp4 (AAC + album cover): its only video stream is the 1-frame cover. It
    was probed as 172800 frames at 90000 fps, decoded as a still and dropped as "truncated"; a
    clip with a cover reads its real video stream."""
    def mp4(path, video):
        with av.open(str(path), "w") as c:
            s = c.add_stream("libx264", rate=8) if video else None
            if s:
                s.height, s.width, s.pix_fmt = 32, 48, "yuv420p"
            cv = c.add_stream("mjpeg", rate=1)
            cv.height, cv.width, cv.pix_fmt = 64, 64, "yuvj420p"
            cv.disposition = av.stream.Disposition.attached_pic
            a = c.add_stream("aac", rate=16000)
            img = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 200, np.uint8), format="rgb24")
            for p in [*cv.encode(img.reformat(format="yuvj420p")), *cv.encode()]:
                c.mux(p)
            for i in range(9 if s else 0):
                f = av.VideoFrame.from_ndarray(np.full((32, 48, 3), grey(i), np.uint8), "rgb24")
                for p in s.encode(f):
                    c.mux(p)
            for p in s.encode() if s else ():
                c.mux(p)
            silence(c, a, 15, "fltp", np.float32)
        return str(path)
    song = mp4(tmp_path / "song.mp4", video=False)
    with pytest.raises(data.BadVideo, match=r"no video stream \(only a cover picture\)"):
        data.probe(song)
    with pytest.raises(data.BadVideo, match="cover"):
        data.load_video(song, 5)
    clip = mp4(tmp_path / "clip.mp4", video=True)
    assert (data.probe(clip)["frames"], data.probe(clip)["fps"]) == (9, 8.0)
    assert frame_ids(data.load_video(clip, 9, 32, 48)) == list(range(9))


def test_probe_counts_the_video_not_a_longer_audio_track_or_a_missing_duration(tmp_path):
    """mkv / webm hold no frame count: it came from the container's duration, which a longer audio
    track sets (47 frames planned as 59, then dropped as truncated), and a file written without a
    duration (a live or browser recording) was planned as a 1-frame still."""
    import io

    class Pipe(io.RawIOBase):  # a non-seekable output: the muxer cannot go back to write lengths
        def __init__(self, f):
            self.f = f

        def writable(self):
            return True

        def write(self, b):
            return self.f.write(b)

    def clip(path, T, fps, audio_seconds, live):
        with open(path, "wb") as raw:
            with av.open(Pipe(raw) if live else raw, "w", format="matroska") as c:
                s = c.add_stream("ffv1", rate=fps)
                s.height, s.width, s.pix_fmt = 32, 32, "yuv444p"
                a = c.add_stream("aac", rate=16000)
                for i in range(T):
                    f = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 5 * i, np.uint8),
                                                   format="rgb24")
                    for p in s.encode(f):
                        c.mux(p)
                for p in s.encode():
                    c.mux(p)
                silence(c, a, int(16000 * audio_seconds) // 1024, "fltp", np.float32)
        return str(path)

    stage = data.Stage([(32, 32)], [1, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49])
    for live in (False, True):
        p = clip(tmp_path / f"a{int(live)}.mkv", 47, 24, 47 / 24 + 0.5, live)
        meta = data.probe(p)
        assert meta["frames"] == 47 and abs(meta["seconds"] - 47 / 24) < 0.01, (live, meta)
        ds = data.VideoDataset([{"path": p, "caption": ""}], stage)
        assert ds.shapes == [(45, 32, 32)] and ds[0] is not None and ds.skipped == 0


def test_rotation_metadata(tmp_path):
    def paint(i):  # stored landscape 48x32 with a red block in the top-left corner
        img = np.zeros((32, 48, 3), np.uint8)
        img[:8, :8] = (255, 0, 0)
        return img
    p = write(tmp_path / "rot.mp4", T=5, H=32, W=48, rotation=90, paint=paint)
    meta = data.probe(p)
    assert (meta["height"], meta["width"]) == (48, 32)  # displayed portrait
    v = data.load_video(p, 5, 48, 32)
    red = (v[0] > 0.5) & (v[1] < -0.5)  # (T, H, W)
    # rotated 90 degrees counterclockwise: the top-left corner goes to the bottom-left
    assert red[:, -8:, :8].all() and not red[:, :8, :].any()


def test_anamorphic_pixels_are_shown_square(tmp_path):
    """HDV / DV / DVD store non-square pixels (1440x1080 with a 4:3 sample aspect ratio is 16:9 on
    screen): frames were read at their stored width, so a clip was planned for the wrong aspect
    bucket and trained squashed. Probe, load_video and frames_every see the shown width."""
    def paint(i):  # stored 48x32, pixels twice as wide as tall: 96x32 on screen
        img = np.zeros((32, 48, 3), np.uint8)
        img[:8, :8] = (255, 0, 0)
        return img
    p = str(tmp_path / "sar.mp4")
    with av.open(p, "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.height, s.width, s.pix_fmt = 32, 48, "yuv420p"
        s.codec_context.sample_aspect_ratio = fractions.Fraction(2, 1)
        for i in range(5):
            for pk in s.encode(av.VideoFrame.from_ndarray(paint(i), format="rgb24")):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    assert (data.probe(p)["height"], data.probe(p)["width"]) == (32, 96)
    v = data.load_video(p, 5)
    assert v.shape == (3, 5, 32, 96)
    red = ((v[0] > 0.5) & (v[1] < -0.5))[:, 4]  # (T, W): the block's middle row
    assert red[:, 2:14].all() and not red[:, 18:].any()  # 8 stored pixels, 16 shown
    assert next(data.frames_every(p, 1.0))[1].shape == (32, 96, 3)


def test_a_size_change_midway_keeps_the_first_frames_size(tmp_path):
    """Two .ts recordings joined (or a browser's adaptive recording) change size midway: at native
    size (`data.py inspect` without --height/--width) torch.stack crashed on the mixed frames."""
    a = write(tmp_path / "a.ts", T=5, H=32, W=48)
    b = write(tmp_path / "b.ts", T=5, H=48, W=64,
              paint=lambda i: np.full((48, 64, 3), grey(5 + i), np.uint8))
    p = tmp_path / "ab.ts"
    p.write_bytes(open(a, "rb").read() + open(b, "rb").read())
    v = data.load_video(str(p), 9)
    assert v.shape == (3, 9, 32, 48) and frame_ids(v) == list(range(9))


def test_an_mp4_edit_list_is_not_a_truncated_clip(tmp_path):
    """A trimmed mp4 (a phone's trim, `ffmpeg -ss 1 -c copy`) keeps the frames before its edit
    list's start as samples the decoder hides: 40 samples, 28 frames shown. The header's count
    was trusted, so the clip was planned at 37 frames and dropped as truncated."""
    p = str(tmp_path / "trim.mp4")
    with av.open(p, "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.height, s.width, s.pix_fmt = 32, 32, "yuv420p"
        for i in range(40):
            f = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 5 * i, np.uint8), format="rgb24")
            f.pts = i - 12  # the first 12 frames before the edit's start
            for pk in s.encode(f):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    with av.open(p) as c:
        assert c.streams.video[0].frames == 40  # (the premise: the header counts them all)
    assert data.probe(p)["frames"] == 28
    ds = data.VideoDataset([{"path": p, "caption": ""}], data.Stage([(32, 32)], [1, 9, 25, 37]))
    assert ds.shapes == [(25, 32, 32)] and ds[0]["video"].shape[1] == 25 and ds.skipped == 0


def test_variable_frame_rate(tmp_path):
    times = [0.0, 0.05, 0.1, 0.4, 0.45, 0.5, 0.9, 1.0]
    p = write(tmp_path / "vfr.mkv", T=len(times), times=times)
    with av.open(p) as c:
        assert [round(f.time, 2) for f in c.decode(video=0)] == times
    # targets 0, .2, .4, .6, .8 -> nearest frames 0 (0.0), 2 (0.1), 3 (0.4), 5 (0.5), 6 (0.9)
    assert frame_ids(data.load_video(p, 5, 16, 16, fps=5)) == [0, 2, 3, 5, 6]


def test_images_and_cover_crop(tmp_path):
    from PIL import Image
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = (255, 0, 0)
    img[:, 20:] = (0, 0, 255)
    for ext in (".png", ".jpg"):
        Image.fromarray(img).save(tmp_path / f"im{ext}")
        v = data.load_video(tmp_path / f"im{ext}", 9, 32, 32)  # images are 1-frame videos
        assert v.shape == (3, 1, 32, 32)
        # cover: 20x40 -> 32x64, center crop keeps columns 16..47: half red, half blue
        assert (v[0, 0, :, :14] > 0.8).all() and (v[2, 0, :, 18:] > 0.8).all()
        assert (v[2, 0, :, :14] < -0.8).all()


def test_bad_files_and_inspect(tmp_path, capsys):
    good = write(tmp_path / "good.mp4", T=9)
    full = open(good, "rb").read()
    (tmp_path / "trunc.mp4").write_bytes(full[: len(full) // 2])  # mp4 index (moov) is at the end
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video at all\n" * 50)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with av.open(str(tmp_path / "audio.mkv"), "w") as c:  # audio only: no video stream
        silence(c, c.add_stream("flac", rate=16000), 4, "s16", np.int16)
    bad = {"missing.mp4": "missing file", "empty.mp4": "zero-byte", "trunc.mp4": "cannot open",
           "text.mp4": "cannot open", "bad.png": "unreadable image", "audio.mkv": "no video stream"}
    for name, reason in bad.items():
        with pytest.raises(data.BadVideo, match=reason):
            data.load_video(tmp_path / name, 9, 16, 16)
    m = data.write_manifest([{"path": str(tmp_path / n), "caption": "x"}
                             for n in ["good.mp4", *bad]], tmp_path / "m.jsonl")
    data.main(["inspect", m, "--height", "16", "--width", "16", "--frames", "9"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + len(bad) + 1
    assert lines[0].endswith("good.mp4: ok (3, 9, 16, 16)")
    assert all(": skip: " in line for line in lines[1:-1])
    assert lines[-1] == f"1 ok, {len(bad)} skipped"


def test_manifests(tmp_path):
    (tmp_path / "sub").mkdir()
    a = write(tmp_path / "sub" / "a.mkv", T=5)
    (tmp_path / "sub" / "a.txt").write_text("a clip\n")
    from PIL import Image
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "sub" / "b.png")
    folder = data.read_manifest(tmp_path / "sub")
    assert [(os.path.basename(e["path"]), e["caption"]) for e in folder] == [("a.mkv", "a clip"),
                                                                              ("b.png", "")]
    line = json.dumps({"path": "sub/a.mkv", "caption": "c", "score": 3})
    (tmp_path / "m.jsonl").write_text(line + "\n\n")
    (e,) = data.read_manifest(tmp_path / "m.jsonl")
    assert e == {"path": a, "caption": "c", "score": 3}
    out = data.write_manifest([e], tmp_path / "o" / "m2.jsonl")  # paths relative to the new folder
    assert json.loads(open(out).read())["path"] == "../sub/a.mkv"
    assert data.read_manifest(out)[0]["path"] == a
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        data.read_manifest(tmp_path / "bad.jsonl")
    # a field of the wrong type, text that is not UTF-8 (a video passed as the manifest): the
    # file, the line and the fix, not a TypeError or a bare codec error
    (tmp_path / "n.jsonl").write_text('{"path": "a.mkv", "caption": null}\n')  # uncaptioned
    assert data.read_manifest(str(tmp_path / "n.jsonl"))[0]["caption"] == ""
    for start in ('"2"', "-1", "true"):  # a clip's start: seconds >= 0 (training crashed on these)
        (tmp_path / "s.jsonl").write_text('{"path": "a.mkv", "start": %s}\n' % start)
        with pytest.raises(ValueError, match='s.jsonl:1: "start" must be seconds >= 0'):
            data.read_manifest(str(tmp_path / "s.jsonl"))
    for text, err in [('{"path": 5}', '"path" must be a string, got 5'),
                      ('{"path": null}', '"path" must be a string, got null'),
                      ('{"path": "a.mkv", "caption": ["x"]}', '"caption" must be a string')]:
        (tmp_path / "bad.jsonl").write_text(json.dumps({"path": "a.mkv"}) + "\n" + text + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:2: {err}"):
            data.read_manifest(tmp_path / "bad.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"path": "a.mkv", "caption": "caf\xe9"}\n'
                                            .encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.jsonl:1: not UTF-8 text; pass a UTF-8 JSONL"):
        data.read_manifest(tmp_path / "latin1.jsonl")
    with pytest.raises(ValueError, match="a.mkv:1: not UTF-8 text"):  # a video, not a manifest
        data.read_manifest(a)
    (tmp_path / "sub" / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="caption file .*a.txt is not UTF-8 text; save it as"):
        data.read_manifest(tmp_path / "sub")


def test_folder_lists_camcorder_and_phone_containers(tmp_path):
    # .mts/.m2ts (AVCHD) and .3gp were neither listed nor counted: a folder of them read as empty
    for name, codec in [("a.mts", "libx264"), ("b.M2TS", "libx264"), ("c.3gp", "mpeg4")]:
        write(tmp_path / name, codec=codec)
    got = data.read_manifest(tmp_path)
    assert [os.path.basename(e["path"]) for e in got] == ["a.mts", "b.M2TS", "c.3gp"]
    for e in got:  # and they decode
        assert frame_ids(data.load_video(e["path"], 9, 16, 16)) == list(range(9))


def test_manifest_start_must_be_finite(tmp_path):
    """A "start" of Infinity (what json.dumps writes for float("inf")) passed the "seconds >= 0"
    check and crashed planning with an OverflowError: refused with the file and line. A finite
    start too large to seek to (1e300) crashed the loader the same way: a counted bad file."""
    (tmp_path / "s.jsonl").write_text('{"path": "a.mkv"}\n{"path": "a.mkv", "start": Infinity}\n')
    with pytest.raises(ValueError, match='s.jsonl:2: "start" must be seconds >= 0'):
        data.read_manifest(str(tmp_path / "s.jsonl"))
    p = write(tmp_path / "a.mkv", T=9, H=16, W=16)
    ds = data.VideoDataset([{"path": p, "caption": "", "start": 1e300}],
                           data.Stage([(16, 16)], [1, 9]))
    assert ds[0] is None and ds.skipped == 1


def test_manifest_and_captions_with_a_byte_order_mark(tmp_path):
    """A manifest or caption .txt saved as "UTF-8 with BOM" (Windows editors, PowerShell's
    Out-File) reads as the same text without one: the manifest's first line was refused as "not
    JSON (Unexpected UTF-8 BOM ...)", and a folder's caption began with "\ufeff" (a stray token
    in T5's input, another text-cache key); a BOM is only dropped at the start of the file."""
    a = write(tmp_path / "a.mkv", T=5)
    lines = [json.dumps({"path": "a.mkv", "caption": c}) for c in ("first", "second")]
    (tmp_path / "m.jsonl").write_bytes(("\ufeff" + "\n".join(lines) + "\n").encode("utf-8"))
    assert [(e["path"], e["caption"]) for e in data.read_manifest(tmp_path / "m.jsonl")] == [
        (a, "first"), (a, "second")]
    (tmp_path / "a.txt").write_bytes("\ufeffa red circle\n".encode("utf-8"))
    assert [e["caption"] for e in data.read_manifest(tmp_path)] == ["a red circle"]


# ----- Frame Pack and bucket samplers -----

def random_shapes(n, seed=0):
    rng = random.Random(seed)
    sizes = [(16, 16), (16, 24), (32, 32)]
    return [(rng.choice([1, 5, 9, 13, 17]), *rng.choice(sizes)) for _ in range(n)]


KW = dict(max_tokens=96, text_len=8, tf=4, sf=4, p=2)


def test_frame_pack_every_sample_once_with_and_without_sharding():
    shapes = random_shapes(203) + [None, None]  # None: a file that failed to probe is skipped
    valid = sorted(i for i, s in enumerate(shapes) if s is not None)
    for world in (1, 2, 3):
        samplers = [data.FramePackSampler(shapes, rows=2, seed=5, rank=r, world_size=world, **KW)
                    for r in range(world)]
        for epoch in (0, 1):
            seen = []
            for s in samplers:
                s.set_epoch(epoch)
                seen += s.epoch_samples()
            assert sorted(seen) == valid  # none lost, none duplicated
            assert len({len(s) for s in samplers}) == 1  # every rank runs the same number of steps
            for gb in samplers[0].global_batches():
                keys = [k for ks in gb for k in ks if k[3] > 0]
                # weights normalised over the global batch; slots number it
                assert abs(sum(k[3] for k in keys) - 1) < 1e-9
                assert sorted(k[2] for k in keys) == list(range(len(keys))) == list(range(keys[0][4]))
                for ks in gb:  # no row overflows, rows are local to the rank
                    assert ks and all(0 <= k[1] < 2 for k in ks)
                    for r in range(2):
                        row = sum(samplers[0].tokens[k[0]] for k in ks if k[1] == r)
                        assert row <= KW["max_tokens"]
    s = data.FramePackSampler(shapes, rows=2, seed=5, **KW)
    assert s.global_batches(0) == s.global_batches(0)
    again = data.FramePackSampler(shapes, rows=2, seed=5, **KW)
    assert again.global_batches(0) == s.global_batches(0)
    assert s.global_batches(1) != s.global_batches(0)
    assert s.efficiency(0) > 0.85, s.efficiency(0)


def test_frame_pack_ranks_equal_one_process_on_global_batch():
    shapes = random_shapes(120, seed=1)
    one = data.FramePackSampler(shapes, rows=4, seed=3, **KW)
    ranks = [data.FramePackSampler(shapes, rows=2, seed=3, rank=r, world_size=2, **KW)
             for r in range(2)]
    for b1, r0, r1 in zip(one, *ranks):
        merged = [(i, slot, w, n) for i, _, slot, w, n in r0 + r1 if w > 0]
        assert sorted(merged, key=lambda k: k[1]) == [(i, slot, w, n) for i, _, slot, w, n in b1]
    assert len(one) == len(ranks[0])


def test_frame_pack_rejects_oversized_samples():
    with pytest.raises(ValueError, match="max_tokens"):
        data.FramePackSampler([(17, 32, 32)], rows=1, max_tokens=64, text_len=4, tf=4, sf=4, p=2)
    with pytest.raises(ValueError, match="multiple"):
        data.num_tokens(9, 20, 16, 4, tf=4, sf=4, p=2)


def test_frame_pack_rejects_lookahead_below_one():
    # lookahead=0 admitted no sample: the first-fit loop built empty batches forever
    for balance in (None, 0.05):
        with pytest.raises(ValueError, match="lookahead must be >= 1"):
            data.FramePackSampler(random_shapes(8), rows=2, lookahead=0, balance=balance, **KW)


def test_bucket_sampler_sharding():
    shapes = random_shapes(101, seed=2)
    for world in (1, 2, 4):
        ranks = [data.BucketSampler(shapes, batch_size=3, seed=1, rank=r, world_size=world)
                 for r in range(world)]
        assert sorted(i for s in ranks for i in s.epoch_samples(0)) == list(range(101))
        for gb in ranks[0].global_batches(0):
            assert all(gb) and len({shapes[k[0]] for ks in gb for k in ks}) == 1  # one shape
            real = [k for ks in gb for k in ks if k[3] > 0]
            if len(real) == 3 * world:  # full batch: rank r holds slots [3r, 3r + 3)
                slots = [[3 * r, 3 * r + 1, 3 * r + 2] for r in range(world)]
                assert [[k[2] for k in ks] for ks in gb] == slots
    one = data.BucketSampler(shapes, batch_size=6, seed=1)
    two = [data.BucketSampler(shapes, batch_size=3, seed=1, rank=r, world_size=2) for r in range(2)]
    for b1, r0, r1 in zip(one, *two):
        assert [k for k in r0 + r1 if k[3] > 0] == b1


def test_samplers_drop_last():
    shapes = random_shapes(203) + [None]
    pack = lambda **k: data.FramePackSampler(shapes, rows=2, seed=5, **KW, **k)
    bucket = lambda **k: data.BucketSampler(shapes, batch_size=3, seed=1, **k)
    full_pack = lambda s, b: (2 * sum(s.tokens[k[0]] for ks in b for k in ks if k[3] > 0)
                              >= 2 * KW["max_tokens"])
    full_bucket = lambda s, b: sum(k[3] > 0 for ks in b for k in ks) == 3
    for make, is_full in ((pack, full_pack), (bucket, full_bucket)):
        keep, drop = make(), make(drop_last=True)
        full = [b for b in keep.global_batches(0) if is_full(keep, b)]
        # only the partial batches go
        assert drop.global_batches(0) == full and 0 < len(full) < len(keep)
        seen = drop.epoch_samples(0)
        assert len(seen) == len(set(seen)) < len(keep.epoch_samples(0))
    tiny = data.BucketSampler([(1, 8, 8)], batch_size=3, drop_last=True)
    assert len(tiny) == 1  # a set smaller than one batch still yields it


def test_samplers_drop_last_count_what_they_leave_out():
    """drop_last leaves samples out of an epoch: the sampler counts them (dropped(epoch): the
    readable samples no rank sees in it), so a run can say so instead of losing them silently;
    0 without drop_last. Balanced Frame Pack drops unbalanced batches from mid-epoch too."""
    shapes = random_shapes(203) + [None]  # the unreadable one is no drop
    makes = [lambda **k: data.FramePackSampler(shapes, rows=2, seed=5, **KW, **k),
             lambda **k: data.FramePackSampler(shapes, rows=2, seed=5, **KW, balance=0.05, **k),
             lambda **k: data.BucketSampler(shapes, batch_size=3, seed=1, **k)]
    for make in makes:
        for world in (1, 2):
            ranks = [make(drop_last=True, rank=r, world_size=world) for r in range(world)]
            for epoch in (0, 1):
                seen = {i for s in ranks for i in s.epoch_samples(epoch)}
                assert ranks[0].dropped(epoch) == 203 - len(seen) > 0
        assert make().dropped(0) == 0


# ----- stages, dataset, loader -----

@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return data.make_shapes(str(out), 30, seed=0)


def test_clips_slower_than_the_stage_rate_are_counted(shapes_set):
    # the set's clips are 8 fps: a 16 fps stage repeats each frame (train.py warns with the count)
    entries = data.read_manifest(shapes_set)
    clips = sum(e["frames"] > 1 for e in entries)
    low = data.STAGES["shapes"][0]
    assert data.VideoDataset(entries, replace(low, fps=16)).slow == clips > 0
    assert data.VideoDataset(entries, replace(low, fps=8)).slow == 0
    assert data.VideoDataset(entries, replace(low, fps=4)).slow == 0


def test_stage_dataset_and_loader(shapes_set, tmp_path):
    entries = data.read_manifest(shapes_set)
    entries.append({"path": str(tmp_path / "gone.mp4"), "caption": "missing"})
    bad = write(tmp_path / "bad.mp4", T=9)
    entries.append({"path": bad, "caption": "breaks later"})
    low, high = data.STAGES["shapes"]
    ds = data.VideoDataset(entries, low)
    assert ds.shapes[-2] is None and ds.skipped == 1  # header probe failed: planned out
    for e, (T, H, W) in zip(entries[:-2], ds.shapes[:-2]):
        assert (H, W) == ((16, 16) if e["width"] == e["height"] else (16, 24))  # nearest aspect
        assert T == (1 if e["frames"] == 1 else 9)  # the longest stage length each clip can fill
    hi = data.VideoDataset(entries[:-2], high)
    planned = {T for T, _, _ in hi.shapes}
    assert planned <= {1, 9, 13, 17} and {e["frames"] for e in entries[:-2]} == planned
    os.truncate(bad, 100)  # it breaks after planning: the loader skips it, counts it, warns once
    s = data.FramePackSampler(ds.shapes, max_tokens=64, rows=2, text_len=4, tf=4, sf=4, p=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=s, collate_fn=data.collate)  # train.py's
    seen = []
    for b in loader:
        for it in b["items"]:
            assert tuple(it["video"].shape[1:]) == ds.shapes[it["index"]]
        seen += [it["index"] for it in b["items"]]
    assert sorted(seen) == list(range(len(entries) - 2)) and ds.skipped == 2 and bad in ds.bad
    bucket = data.VideoDataset(entries[:-2], high, mode="bucket")
    assert {T for T, _, _ in bucket.shapes} == {1, 17}  # clips padded to the stage length
    bs = data.BucketSampler(bucket.shapes, batch_size=4, seed=0)
    assert len(bs) > 1
    for (keys,) in bs.global_batches(0):  # one rank: its batch is the whole global batch
        assert 1 <= len(keys) <= 4 and len({bucket.shapes[k[0]] for k in keys}) == 1
        assert abs(sum(k[3] for k in keys) - 1) < 1e-9  # loss weights sum to 1 per global batch
    keys = next(iter(bs))
    video = torch.stack([bucket[k]["video"] for k in keys])  # one shape per batch: it stacks
    assert video.shape == (len(keys), 3, *bucket.shapes[keys[0][0]])  # (B, 3, T, H, W)
    short = next(i for i, e in enumerate(entries) if e["frames"] == 9)
    v = bucket[short]["video"]  # 9 real frames + 8 copies of the last (released pad_last_frame)
    assert v.shape[1] == 17 and torch.equal(v[:, 8], v[:, 16])


def test_stage_subset_top_quality(shapes_set):
    entries = data.read_manifest(shapes_set)
    with pytest.raises(ValueError, match="data.py filter"):
        data.VideoDataset(entries, data.Stage([(32, 32)], [9], subset=0.2))
    for k, e in enumerate(entries):
        e["quality"] = k / len(entries)
    ds = data.VideoDataset(entries, data.Stage([(32, 32)], [9], subset=0.2))
    clips = [e for e in entries if e["frames"] > 1]
    assert len([e for e in ds.entries if e["frames"] > 1]) == 5
    assert max(e["quality"] for e in clips) in [e["quality"] for e in ds.entries]


def test_top_quality_keeps_the_fraction_asked_exactly():
    """The best 7% of 100 clips is 7 clips, not 8: 0.07 * 100 is 7.000000000000001 in floats,
    whose ceiling kept one clip too many (454 such (fraction, count) pairs among 1-99% and up to
    3000 clips, for the subset stage and `data.py filter --top`); a fraction that does not come
    out whole still rounds up."""
    clips = [{"path": f"{k}.mp4", "quality": k / 100} for k in range(100)]
    assert len(data.top_quality(clips, 0.07)) == 7
    assert len(data.top_quality(clips, 0.29)) == 29
    assert len(data.top_quality(clips, 0.071)) == 8  # 7.1 clips: the best 8


# ----- filters -----

def test_filter_and_inspect_take_an_entry_from_its_start(tmp_path, capsys):
    """An entry's "start" (a clip of a longer file, as training decodes it) was ignored by the
    filters and `inspect`: scored from second 0 of the file (its still black first half dropped
    the moving clip as "static frames") with the file's whole length as its seconds."""
    def paint(i):  # 2 s of black, then 2 s of a moving square (8 fps)
        img = np.zeros((32, 32, 3), np.uint8)
        if i >= 16:
            img[10:20, 2 + (i - 16):12 + (i - 16)] = (255, 255, 255)
        return img
    p = write(tmp_path / "two.mkv", T=32, H=32, W=32, fps=8, paint=paint)
    s, why = data.score_entry({"path": p, "caption": "", "start": 2.0})
    assert why == [] and s["static"] == 0 and s["seconds"] == pytest.approx(2.0), (s, why)
    m = data.write_manifest([{"path": p, "caption": "", "start": 3.5}], tmp_path / "m.jsonl")
    data.main(["inspect", m, "--height", "32", "--width", "32", "--frames", "9"])
    assert f"{p}: ok (3, 1, 32, 32)" in capsys.readouterr().out  # 4 frames left after 3.5 s


def test_filters_cli(tmp_path, capsys):
    rng = np.random.default_rng(0)

    def moving(i):
        img = np.zeros((32, 32, 3), np.uint8)
        img[10:20, 2 + 2 * i:12 + 2 * i] = (255, 255, 255)
        return img
    still = np.full((32, 32, 3), 128, np.uint8)
    clips = {"good.mkv": dict(paint=moving), "static.mkv": dict(paint=lambda i: still),
             "cut.mkv": dict(paint=lambda i: np.full((32, 32, 3), (255, 0, 0) if i < 5 else (0, 0, 255),
                                                     np.uint8)),
             "dark.mkv": dict(paint=lambda i: (rng.random((32, 32, 3)) * 20).astype(np.uint8)),
             "short.mkv": dict(paint=moving, T=5)}
    entries = [{"path": write(tmp_path / n, **dict(dict(T=10, H=32, W=32, fps=8), **kw)), "caption": n}
               for n, kw in clips.items()]
    entries.append({"path": str(tmp_path / "missing.mkv"), "caption": "gone"})
    m = data.write_manifest(entries, tmp_path / "all.jsonl")
    data.main(["filter", m, "--out", str(tmp_path / "kept.jsonl")])
    out, err = capsys.readouterr()
    assert "filter: 100%" in err and f"{len(entries)}/{len(entries)}" in err  # the tqdm bar
    kept = data.read_manifest(tmp_path / "kept.jsonl")
    assert [os.path.basename(e["path"]) for e in kept] == ["good.mkv"]
    assert kept[0]["quality"] > 0.5 and kept[0]["scores"]["motion"] > 0.01
    table = open(tmp_path / "kept.dropped.tsv").read()
    for name, reason in [("static.mkv", "static frames"), ("cut.mkv", "scene cut"),
                         ("dark.mkv", "too dark"), ("short.mkv", "too short"),
                         ("missing.mkv", "unreadable")]:
        assert any(line.startswith(str(tmp_path / name)) and reason in line
                   for line in table.splitlines()), (name, table)
        assert reason in out
    assert len(data.read_manifest(tmp_path / "kept.top20.jsonl")) == 1
    # the learned-classifier hook: its negative-label probabilities become scores and drop reasons
    s, why = data.score_entry(entries[0], classifier=lambda v: {"lecture": 0.9, "editing": 0.1})
    assert s["p_lecture"] == 0.9 and why == ["classifier: lecture 0.90 > 0.5"]
    # a hook raising on one clip drops that clip, named; the run goes on (it was a traceback and
    # nothing written); raising on every clip is no success (exit code 1)
    calls = []

    def flaky(video):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error:\ndevice-side assert")
        return {"lecture": 0.1}
    kept, dropped = data.filter_manifest(m, tmp_path / "k2.jsonl", classifier=flaky)
    assert kept == [] and len(calls) == 5  # every readable clip scored (good.mkv first)
    assert ("classifier failed (RuntimeError: CUDA error: device-side assert)"
            in dict(dropped)[entries[0]["path"]])
    good = data.write_manifest(entries[:1], tmp_path / "good.jsonl")
    sys.modules["flaky_hook"] = type(sys)("flaky_hook")
    sys.modules["flaky_hook"].fail = lambda v: 1 / 0
    with pytest.raises(SystemExit) as e:
        data.main(["filter", good, "--out", str(tmp_path / "k3.jsonl"), "--classifier",
                   "flaky_hook:fail"])
    assert e.value.code == 1 and "error: every one of the 1 clips is unreadable or failed the " \
        "--classifier" in capsys.readouterr().err
    del sys.modules["flaky_hook"]


# ----- latent cache -----

def test_latent_cache(tmp_path):
    p = write(tmp_path / "c.mkv", T=5)
    cache = data.LatentCache(tmp_path / "cache")
    calls = []
    make = lambda: calls.append(1) or {"z": torch.randn(4, 2, 4, 4)}
    k = cache.key(p, (5, 32, 32), "vae-a")
    z1 = cache.get_or_make(k, make)["z"]
    z2 = cache.get_or_make(k, make)["z"]
    assert len(calls) == 1 and torch.equal(z1, z2) and (cache.hits, cache.misses) == (1, 1)
    assert cache.key(p, (5, 32, 32), "vae-b") != k and cache.key(p, (5, 16, 16), "vae-a") != k
    # every decoding parameter and what is stored is part of the key
    defaults = dict(fps=None, start=None, pad="repeat", latent="posterior")
    assert cache.key(p, (5, 32, 32), "vae-a", **defaults) == k
    other = [dict(fps=8), dict(fps=4), dict(start=0.5), dict(pad="nearest"), dict(latent="mean"),
             dict(latent="sample")]
    keys = {cache.key(p, (5, 32, 32), "vae-a", **kw) for kw in other}
    assert len(keys) == len(other) and k not in keys
    assert cache.key(p, (5, 32, 32), "vae-a", fps=8) == cache.key(p, (5, 32, 32), "vae-a", fps=8.0)
    with pytest.raises(ValueError, match="latent"):
        cache.key(p, (5, 32, 32), "vae-a", latent="z")
    os.utime(p, ns=(1, 1))  # content changed (mtime): a new key, the stale latent is not reused
    assert cache.key(p, (5, 32, 32), "vae-a") != k
    assert cache.text_key("a red circle", "t5") != cache.text_key("a blue circle", "t5")
    files = [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs]
    assert files == [k + ".safetensors"]



def test_latent_cache_keeps_what_fits_in_memory(tmp_path):
    """keep: up to that many bytes of entries stay in memory once read (first come, first kept),
    so an epoch's second read of a small data set does not go to the disk; what get returns is a
    new dict each time (a caller adding keys does not change the kept entry)."""
    cache = data.LatentCache(tmp_path / "cache", keep=2 * 24)  # two entries of 6 floats
    keys = [cache.text_key(f"caption {i}", "t5") for i in range(3)]
    for i, k in enumerate(keys):
        cache.put(k, {"z": torch.full((2, 3), float(i))})
        assert torch.equal(cache.get(k)["z"], torch.full((2, 3), float(i)))
    cache.get(keys[0])["extra"] = 1
    for k in keys:
        os.remove(cache._file(k))
    assert [float(cache.get(k)["z"][0, 0]) for k in keys[:2]] == [0.0, 1.0]
    assert "extra" not in cache.get(keys[0]) and cache.get(keys[2]) is None  # over the budget
    assert data.LatentCache(tmp_path / "cache").get(keys[0]) is None  # keep=0: the disk only


def test_corrupt_latent_cache_file_is_a_miss(tmp_path, capsys):
    """A cache file cut short (a full disk, a crash outside atomic_write) is a miss, not a
    SafetensorError in training: warned, deleted, encoded again (each time it is found so)."""
    cache = data.LatentCache(tmp_path / "cache")
    calls = []
    make = lambda: calls.append(1) or {"z": torch.full((2, 3), float(len(calls)))}
    k = cache.key(write(tmp_path / "c.mkv", T=5), (5, 32, 32), "vae")
    cache.get_or_make(k, make)
    f = cache._file(k)
    for _ in range(2):
        with open(f, "r+b") as fh:
            fh.truncate(20)
        z = cache.get_or_make(k, make)["z"]  # (2, 3)
        assert torch.equal(z, torch.full((2, 3), float(len(calls))))
        assert torch.equal(cache.get(k)["z"], z)  # re-encoded and written whole
    err = capsys.readouterr().err
    assert len(calls) == 3 and cache.misses == 3 and err.count("warning: latent cache file") == 2
    assert f in err and "deleted, it is encoded again" in err


def test_latent_cache_read_error_keeps_the_file(tmp_path, monkeypatch, capsys):
    """A read error that says nothing of the file (EIO, too many open files) is a miss that keeps
    the file (it was deleted: a lost text embedding when no --text-encoder can make it again); a
    torn file in a read-only cache is a miss, not a PermissionError traceback from its removal."""
    import errno
    cache = data.LatentCache(tmp_path / "cache")
    k = cache.key(write(tmp_path / "c.mkv", T=5), (5, 32, 32), "vae")
    cache.put(k, {"z": torch.ones(2, 3)})
    f, load = cache._file(k), data.load_file
    monkeypatch.setattr(data, "load_file", lambda p: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    assert cache.get(k) is None and os.path.exists(f)
    assert "unreadable ([Errno 5] I/O error); encoded again" in capsys.readouterr().err
    monkeypatch.setattr(data, "load_file", load)
    assert torch.equal(cache.get(k)["z"], torch.ones(2, 3))  # the next read finds it whole
    with open(f, "r+b") as fh:
        fh.truncate(20)
    monkeypatch.setattr(data.os, "remove", lambda p: (_ for _ in ()).throw(PermissionError(13, "denied")))
    assert cache.get(k) is None  # warned, kept (it cannot be removed), encoded again


def test_model_id_sees_the_files_of_subfolders(tmp_path):
    """A pipeline-layout text encoder (text_encoder/ + tokenizer/): new weights in a subfolder
    change the id, so cached T5 embeddings are not reused stale; hidden files do not count; a flat
    folder keeps the id it always had."""
    root = tmp_path / "t5"
    for f, text in [("model_index.json", "{}"), ("text_encoder/model.safetensors", "w1"),
                    ("tokenizer/spiece.model", "t"), (".cache/lock", "x")]:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text(text)
    before = data.model_id(root)
    (root / ".cache" / "lock").write_text("changed")
    assert data.model_id(root) == before
    (root / "text_encoder" / "model.safetensors").write_text("w2, retrained")
    assert data.model_id(root) != before
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.bin").write_text("abc")
    st = os.stat(flat / "a.bin")
    assert data.model_id(flat) == f"{flat}/a.bin:{st.st_size}:{st.st_mtime_ns}"


# ----- the shapes set and its checker -----

def test_shapes_set_deterministic_and_held_out(shapes_set, tmp_path):
    entries = data.read_manifest(shapes_set)
    again = data.read_manifest(data.make_shapes(str(tmp_path / "again"), 30, seed=0))
    strip = lambda es: [dict(e, path=os.path.basename(e["path"])) for e in es]
    assert strip(entries) == strip(again)
    for a, b in zip(entries[:3], again[:3]):
        assert torch.equal(data.load_video(a["path"], 9, 32, 32),
                           data.load_video(b["path"], 9, 32, 32))
    other = data.read_manifest(data.make_shapes(str(tmp_path / "other"), 30, seed=1))
    assert strip(other) != strip(entries)
    assert not any((e["colour"], e["motion"]) in data.HELD_OUT for e in entries)
    assert {e["frames"] for e in entries} == {1, 9, 13, 17}
    assert {(e["height"], e["width"]) for e in entries} == {(32, 32), (32, 48)}
    words = {w for e in entries for w in e["caption"].split()}
    assert len(words) <= 16, words
    prompts = data.eval_prompts()
    assert sum(h for _, h in prompts) == 2 * len(data.HELD_OUT) and len(prompts) == 32
    assert ("a red circle moves up", True) in prompts
    assert ("a red circle moves to the left", False) in prompts


def test_shapes_check_passes_every_training_clip_and_fails_wrong_captions(shapes_set):
    entries = data.read_manifest(shapes_set)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    other_shape = {"circle": "square", "square": "circle"}
    for e in entries:
        v = data.load_video(e["path"], 17, e["height"], e["width"])
        res = data.shapes_check(v, e["caption"])
        assert res["pass"], (e, res)  # colour, shape, motion and steadiness
        assert data.shapes_follow(v, e["caption"])
        # at the 16-pixel stage size a disc is too small to tell from a square: the rest holds
        small = data.load_video(e["path"], 17, 16, 16 * e["width"] // e["height"])
        res = data.shapes_check(small, e["caption"])
        assert res["colour"] and res["motion"] and res["steady"] and not res["shape"], (e, res)
        wrong_colour = next(c for c in data.COLOURS if c != e["colour"])
        assert not data.shapes_follow(v, data.caption_of(wrong_colour, e["shape"], e["motion"]))
        wrong_shape = data.caption_of(e["colour"], other_shape[e["shape"]], e["motion"])
        assert not data.shapes_check(v, wrong_shape)["shape"]
        if e["motion"] is None:
            assert not data.shapes_follow(v, data.caption_of(e["colour"], e["shape"], "left"))
            continue
        assert not data.shapes_follow(v, data.caption_of(e["colour"], e["shape"]))  # a still
        reverse = data.caption_of(e["colour"], e["shape"], opposite[e["motion"]])
        assert not data.shapes_follow(v, reverse)
        side = "up" if e["motion"] in ("left", "right") else "left"
        assert not data.shapes_follow(v, data.caption_of(e["colour"], e["shape"], side))
        assert not data.shapes_follow(v.flip(1), e["caption"])  # played backwards
        assert not data.shapes_follow(v[:, :1].expand_as(v), e["caption"])  # frozen: no motion
    black = -torch.ones(3, 9, 32, 32)
    assert not data.shapes_follow(black, "a red circle moves up")
    noise = torch.rand(3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert not any(data.shapes_follow(noise, p) for p, _ in data.eval_prompts())
    with pytest.raises(ValueError, match="colours"):
        data.shapes_follow(black, "a purple circle moves up")


@pytest.mark.parametrize("sizes, radius, frames", [
    (((32, 32), (32, 48)), (0.18, 0.24), (9, 13, 17)),  # make_shapes' defaults
    tuple(train.DEMO_SET[k] for k in ("sizes", "radius", "frames"))])  # the demo's set
def test_shapes_check_passes_rendered_clips_as_the_set_draws_them(sizes, radius, frames):
    # 200 clips drawn as make_shapes draws them (sizes, radii, places, lengths, motions, stills)
    rng = random.Random(1)
    for _ in range(200):
        H, W = rng.choice(sizes)
        r = rng.uniform(*radius) * min(H, W)
        colour, shape = rng.choice(list(data.COLOURS)), rng.choice(data.SHAPES)
        motion, T = rng.choice([*data.MOTIONS, None]), rng.choice(frames)
        cx, cy = data.shapes_start(rng, H, W, r, motion, T)  # as make_shapes places them
        x = data.shapes_clip(H, W, colour, shape, motion, T, cx, cy, r)  # (T, H, W, 3)
        v = torch.from_numpy(x).permute(3, 0, 1, 2).float() / 127.5 - 1
        res = data.shapes_check(v, data.caption_of(colour, shape, motion))
        assert res["pass"], (H, W, r, colour, shape, motion, T, cx, cy, res)


def clip(colour="red", shape="square", motion="left", T=9, cx=22.0, cy=16.0, r=7.0, **kw):
    """A rendered shapes clip as the checker sees it: (3, T, H, W) in [-1, 1]."""
    x = data.shapes_clip(32, 32, colour, shape, motion, T, cx, cy, r, **kw)  # (T, H, W, 3)
    return torch.from_numpy(x).permute(3, 0, 1, 2).float() / 127.5 - 1


def test_shapes_check_fails_slow_drifting_fading_shrinking_smearing_recoloured():
    cap = "a red square moves to the left"
    for shape in data.SHAPES:  # both shapes, every size the set draws (r = 0.18-0.24 x 32)
        for r in (5.8, 6.7, 7.7):
            for cx in (20.0, 20.3, 20.5):
                res = data.shapes_check(clip(shape=shape, r=r, cx=cx), f"a red {shape} moves "
                                        f"to the left")
                assert res["pass"], (shape, r, cx, res)
    # motion: at least half the set's speed (1 px a frame at 32), and along the prompted axis
    assert data.shapes_check(clip(speed=0.6), cap)["motion"]
    assert not data.shapes_check(clip(speed=0.4), cap)["motion"]
    drift = clip(speed=1.0)
    drift = torch.stack([torch.roll(drift[:, t], -t, dims=1) for t in range(9)], 1)  # + up
    assert not data.shapes_check(drift, cap)["motion"]
    # steadiness: the last frames' object as bright, as large and as sharp as the first frames'
    v = clip()
    fade = torch.linspace(1, 0.6, 9).view(1, 9, 1, 1)
    assert not data.shapes_check((v + 1) * fade - 1, cap)["steady"]
    assert not data.shapes_check((v + 1) * fade.clamp(max=0.3).flip(1) - 1, cap)["pass"]  # gone
    shrink = torch.stack([clip(T=1, cx=22.0 - t, r=7.0 - 0.4 * t)[:, 0] for t in range(9)], 1)
    res = data.shapes_check(shrink, cap)
    assert res["colour"] and res["motion"] and not res["steady"], res
    blur = v.clone()
    for _ in range(3):  # smear the last four frames
        blur[:, 5:] = torch.nn.functional.avg_pool2d(blur[:, 5:], 3, 1, 1, count_include_pad=False)
    res = data.shapes_check(blur, cap)
    assert res["colour"] and res["motion"] and not res["steady"], res
    # colour: in every frame (a shape that turns green in its last frames fails)
    recolour = torch.cat([v[:, :6], clip(colour="green")[:, 6:]], 1)  # same path
    assert not data.shapes_check(recolour, cap)["colour"]
    assert data.shapes_check(recolour, "a red square moves to the left")["motion"]


def frames_of(draw, T=9, H=32, W=32):
    """(3, T, H, W) in [-1, 1] from draw(t, yy, xx) -> list of (mask (H, W), rgb) objects."""
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    v = np.zeros((T, H, W, 3), np.float32)
    for t in range(T):
        for mask, rgb in draw(t, yy, xx):
            v[t][mask] = rgb
    return torch.from_numpy(v).permute(3, 0, 1, 2) / 127.5 - 1


def test_shapes_check_fails_videos_a_person_calls_wrong():
    # each of these passed the checker once (it took every bright pixel for one object, judged
    # shape by fill alone, colour by the nearest of four, motion by a fitted line and steadiness
    # on the first and last frames only); beside each, a like clip that follows its caption
    red, blue = data.COLOURS["red"], data.COLOURS["blue"]
    disc = lambda cx, cy, r: lambda yy, xx: (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    box = lambda cx, cy, a, b: lambda yy, xx: (abs(xx - cx) <= a) & (abs(yy - cy) <= b)
    left = lambda make, rgb=red, x0=22: frames_of(lambda t, yy, xx: [(make(x0 - t)(yy, xx), rgb)])
    ok = lambda v, cap: data.shapes_check(v, cap)["pass"]
    circle, square = "a red circle moves to the left", "a red square moves to the left"
    assert ok(left(lambda x: disc(x, 16, 6.5)), circle)
    assert ok(left(lambda x: box(x, 16, 6, 6)), square)
    # two objects: two squares captioned as a circle (their joint box: fill 0.88, a circle's);
    # a still red circle beside a moving blue square
    two = frames_of(lambda t, yy, xx: [(box(22 - t, 9, 5, 5)(yy, xx), red),
                                       (box(22 - t, 23, 5, 5)(yy, xx), red)])
    assert not ok(two, circle) and not ok(two, square)
    pair = frames_of(lambda t, yy, xx: [(disc(8, 8, 5)(yy, xx), red),
                                        (box(22 - t, 22, 5, 5)(yy, xx), blue)])
    assert not ok(pair, "a red circle moves to the left")
    # shapes: a ring, an outline, a triangle, a 45-degree square and a 2:1 ellipse are no circle;
    # a 14 x 9 rectangle is no square
    ring = lambda x: lambda yy, xx: disc(x, 16, 7)(yy, xx) & ~disc(x, 16, 4.5)(yy, xx)
    outline = lambda x: lambda yy, xx: box(x, 16, 7, 7)(yy, xx) & ~box(x, 16, 5, 5)(yy, xx)
    tri = lambda x: lambda yy, xx: (yy >= 9) & (yy <= 23) & (abs(xx - x) <= (yy - 9) / 2)
    diamond = lambda x: lambda yy, xx: abs(xx - x) + abs(yy - 16) <= 8
    ellipse = lambda x: lambda yy, xx: ((xx - x) / 8) ** 2 + ((yy - 16) / 4) ** 2 <= 1
    for make in (ring, outline, tri, diamond, ellipse):
        assert not data.shapes_check(left(make), circle)["shape"]
        assert not data.shapes_check(left(make), square)["shape"]
    assert not data.shapes_check(left(lambda x: box(x, 16, 7, 4.5)), square)["shape"]
    # colours no caption names: white and grey are no yellow, magenta no red, cyan no green
    for rgb, cap in [((255, 255, 255), "yellow"), ((170, 170, 170), "yellow"),
                     ((255, 0, 255), "red"), ((0, 255, 255), "green"), ((0, 255, 255), "blue")]:
        v = left(lambda x: box(x, 16, 6, 6), rgb)
        assert not data.shapes_check(v, f"a {cap} square moves to the left")["colour"], rgb
    # motion: a teleport (still, then at the end), a late start, a zig-zag across the way
    at = lambda xs, ys=None: frames_of(lambda t, yy, xx: [(
        box(xs[t], 16 if ys is None else ys[t], 6, 6)(yy, xx), red)])
    assert ok(at([22 - t for t in range(9)]), square)
    assert not ok(at([22] * 8 + [14]), square)  # teleport
    assert not ok(at([22] * 6 + [17, 15, 14]), square)  # still, then a jump
    assert not ok(at([22 - t for t in range(9)], [16 + 3 * (-1) ** t for t in range(9)]), square)
    assert not ok(at([22, 20, 22, 19, 17, 19, 16, 14, 14]), square)  # back and forth
    # exactly one set step back (a 1-px wobble) is allowed, also when float32 centroids of a
    # disc read it as -1.000001 (1 clip in 75 with +-1 px jitter failed on that rounding)
    ys = [1, 0, 3, 2, 4, 5, 7, 8, 9, 8, 11, 12, 13, 13, 15, 16, 16]
    wobble = torch.from_numpy(np.stack([data.draw_shape(32, 32, "red", "circle", 7.446, 24.933 - y,
                                                        5.901) for y in ys])).permute(3, 0, 1, 2)
    assert data.shapes_check(wobble.float() / 127.5 - 1, "a red circle moves up")["motion"]
    # a second object too dim for an object pixel (brightness 0.47) or a quarter the size
    dim = frames_of(lambda t, yy, xx: [(box(9, 8, 5, 5)(yy, xx), (120, 0, 0)),
                                       (box(22 - t, 22, 5, 5)(yy, xx), red)])
    assert not ok(dim, square)
    small = frames_of(lambda t, yy, xx: [(box(22 - t, 20, 6, 6)(yy, xx), red),
                                         (box(4, 4, 2.5, 2.5)(yy, xx), red)])
    assert not ok(small, square)
    # an object 45% green is not a red one
    half = frames_of(lambda t, yy, xx: [(box(22 - t, 16, 6, 6)(yy, xx), red),
                                        (box(22 - t, 16, 6, 6)(yy, xx) & (yy >= 17.5), (0, 255, 0))])
    assert not ok(half, square)
    # the shape in (nearly) every frame, not in their median: a square that turns into a circle
    # (or a 45-degree square) for a third of the clip
    turn = frames_of(lambda t, yy, xx: [((box(22 - t, 16, 6, 6) if t < 6 else disc(22 - t, 16, 6.5))
                                         (yy, xx), red)])
    assert not ok(turn, square) and not ok(turn, circle)
    spin = frames_of(lambda t, yy, xx: [((box(22 - t, 16, 6, 6) if t % 3 else diamond(22 - t))
                                         (yy, xx), red)])
    assert not ok(spin, square)
    # shapes that are no convex blob: a plus, a disc with a slot to its centre ("C"), notches
    plus = lambda x: lambda yy, xx: box(x, 16, 6.5, 2.5)(yy, xx) | box(x, 16, 2.5, 6.5)(yy, xx)
    slot = lambda x: lambda yy, xx: disc(x, 16, 7)(yy, xx) & ~((abs(yy - 16) <= 1.5) & (xx > x))
    notch = lambda x: lambda yy, xx: disc(x, 16, 7)(yy, xx) & ~(
        ((abs(yy - 16) <= 1.5) & (abs(xx - x) > 3.5)) | ((abs(xx - x) <= 1.5) & (abs(yy - 16) > 3.5)))
    for make in (plus, slot, notch):
        assert not data.shapes_check(left(make), circle)["shape"]
    # slow along a steep diagonal (0.5 px a frame left, as much down) is no "moves to the left"
    assert not ok(frames_of(lambda t, yy, xx: [(box(22 - t / 2, 10 + t / 2, 6, 6)(yy, xx), red)]),
                  square)
    # steadiness in every frame: a square that shrinks to half in the middle of the clip
    a = [6, 6, 5, 4, 4, 4, 5, 6, 6]
    mid = frames_of(lambda t, yy, xx: [(box(22 - t, 16, a[t], a[t])(yy, xx), red)])
    assert not data.shapes_check(mid, square)["steady"]
    assert data.shapes_check(mid, square)["motion"]


def test_shapes_check_reads_caption_words_through_punctuation():
    # 'left!' or a quoted caption hid the word: a still passed 'moves to the left!' and the
    # right clip failed it; '"red' named no colour (ValueError)
    moving, still = clip(shape="circle"), clip(shape="circle", motion=None)
    for cap in ("a red circle moves to the left!", '"a red circle moves to the left"',
                "a red circle moves left; fast", "A red circle (moves to the left)?"):
        assert data.shapes_follow(moving, cap), cap
        assert not data.shapes_follow(still, cap), cap
    assert data.shapes_follow(still, '"a red circle!"')


def test_atomic_writes_use_unique_temp_names_and_clean_up(tmp_path, monkeypatch):
    renamed, replace = [], os.replace
    monkeypatch.setattr(os, "replace",
                        lambda a, b: renamed.append((str(a), str(b))) or replace(a, b))
    m = str(tmp_path / "m.jsonl")
    data.write_manifest([{"path": m, "caption": "x"}], m)
    data.write_manifest([{"path": m, "caption": "y"}], m)
    cache = data.LatentCache(tmp_path / "cache")
    cache.put("ab" * 16, {"z": torch.zeros(2)})
    tmps = [a for a, _ in renamed]
    # unique per process and per call
    assert len(set(tmps)) == 3 and all(f".tmp{os.getpid()}_" in t for t in tmps)
    assert [b for _, b in renamed[:2]] == [m, m]
    with pytest.raises(Exception):
        cache.put("cd" * 16, {"z": "not a tensor"})  # safetensors refuses: nothing half-written
    files = sorted(f for _, _, fs in os.walk(tmp_path / "cache") for f in fs)
    assert files == ["ab" * 16 + ".safetensors"]
    assert json.loads(open(m).read())["caption"] == "y"


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path,
                                                                               monkeypatch):
    """A power loss after the rename must not leave an empty file (the data fsynced first) nor the
    old one (the folder fsynced after); a folder that cannot be opened (Windows) is skipped."""
    import stat
    events, fsync, replace, open_ = [], os.fsync, os.replace, os.open

    def record_fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync dir" if stat.S_ISDIR(st.st_mode) else "fsync", st.st_ino))
        fsync(fd)
    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", os.stat(a).st_ino))
                        or replace(a, b))
    p = tmp_path / "f.txt"
    data.atomic_write(str(p), lambda tmp: open(tmp, "w").write("x"))
    ino = os.stat(p).st_ino  # (a rename keeps the inode: the temp file's)
    assert events == [("fsync", ino), ("replace", ino), ("fsync dir", os.stat(tmp_path).st_ino)]

    def no_dirs(path, flags, *a):
        if os.path.isdir(path):
            raise PermissionError(13, "a folder cannot be opened here")
        return open_(path, flags, *a)
    monkeypatch.setattr(os, "open", no_dirs)
    data.atomic_write(str(p), lambda tmp: open(tmp, "w").write("y"))
    assert p.read_text() == "y" and events[-1] == ("replace", os.stat(p).st_ino)
    n = len(events)  # durable=False (the latent cache's entries, made again when lost): no fsync
    data.atomic_write(str(p), lambda tmp: open(tmp, "w").write("z"), durable=False)
    assert p.read_text() == "z" and [e[0] for e in events[n:]] == ["replace"]


def _one_line_error(err, text):
    """argparse's error: usage, then one `data.py ...: error: ...` line naming the problem; no
    traceback."""
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and ": error: " in last and text in last, err


def test_cli_bad_input_one_line_errors(tmp_path, capsys):
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data.py")
    p = subprocess.run([sys.executable, script, "inspect", "/nonexistent.jsonl", "--height", "16",
                        "--width", "16", "--frames", "9"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    _one_line_error(p.stderr, "/nonexistent.jsonl does not exist")
    m = data.write_manifest([], tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"caption": "no path"}\n')
    o = ["--out", str(tmp_path / "o.jsonl")]
    cases = [(["filter", "/nonexistent.jsonl", *o], "does not exist"),
             (["filter", str(tmp_path / "bad.jsonl"), *o], 'bad.jsonl:1: needs a "path"'),
             (["filter", m, *o, "--top", "0"], "--top"),
             (["filter", m, *o, "--classifier", "no_such_module_x:f"], "no_such_module_x"),
             (["inspect", m, "--height", "16", "--width", "16", "--frames", "8"],
              "--frames must be 4k+1"),
             (["inspect", m, "--height", "20", "--width", "16", "--frames", "9"], "multiples of 8"),
             (["shapes", "--out", str(tmp_path / "s"), "--sizes", "30x30"], "multiples of 8"),
             (["shapes", "--out", str(tmp_path / "s"), "--sizes", "32by32"], "--sizes"),
             (["shapes", "--out", str(tmp_path / "s"), "--frames", "9,8"], "--frames must be 4k+1"),
             # it wrote its 00000.mkv ... and manifest.jsonl over the folder's own
             (["shapes", "--out", str(tmp_path), "--n", "2", "--sizes", "16x16"],
              f"--out {tmp_path} is not empty: the set's 00000.mkv, ... and manifest.jsonl would "
              "replace files there; pass a new folder"),
             # nan: every clip "no frames decoded"; inf: the first frame repeated
             *((["inspect", m, "--height", "16", "--width", "16", "--frames", "9", "--fps", v],
                f"--fps must be a finite number > 0, got {v}") for v in ("nan", "inf")),
             # a nan threshold compares False: that filter off, every clip kept
             (["filter", m, *o, "--min-motion", "nan"], "--min-motion must be a finite number >= 0"),
             (["filter", m, *o, "--max-cut", "-1"], "--max-cut must be a finite number >= 0"),
             # one inspect mode's options in the other: ignored (even --height 17, --frames 8)
             (["inspect", m, "--write", str(tmp_path / "w.jsonl"), "--height", "17", "--frames", "8"],
              "--write records each entry's metadata and decodes nothing: drop --height, --frames"),
             (["inspect", m, "--write", str(tmp_path / "w.jsonl"), "--pad", "repeat"], "drop --pad"),
             (["inspect", m, "--height", "16", "--width", "16", "--frames", "9", "--workers", "4"],
              "--workers sets --write's probing threads")]
    # the kept subset (or the top fraction, or the drop table) written over the manifest read
    for name, out in (("kept.jsonl", "kept.jsonl"), ("kept.top20.jsonl", "kept.jsonl"),
                      ("k.top50.jsonl", "k.jsonl"), ("kept.dropped.tsv", "kept.jsonl")):
        src = data.write_manifest([{"path": "a.mkv", "caption": "a"}], tmp_path / name)
        top = ["--top", "0.5"] if "50" in name else []
        cases.append((["filter", src, "--out", str(tmp_path / out), *top],
                      f"would overwrite the manifest input; pass another --out"))
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    for argv, text in cases:
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        assert e.value.code == 2, argv
        _one_line_error(capsys.readouterr().err, text)
    assert not (tmp_path / "s").exists()  # checked before any work
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_cli_nothing_done_is_no_success(tmp_path, capsys):
    """No entry at all: one error line, exit code 2, nothing written. Every entry unreadable: an
    error line and exit code 1 (as caption.py when every video fails), never a silent 0."""
    (tmp_path / "none").mkdir()
    empty = data.write_manifest([], tmp_path / "empty.jsonl")
    size = ["--height", "16", "--width", "16", "--frames", "9"]
    for m in (str(tmp_path / "none"), empty):
        for argv, out in [(["inspect", m, *size], None),
                          (["inspect", m, "--write", str(tmp_path / "o.jsonl")], "o.jsonl"),
                          (["filter", m, "--out", str(tmp_path / "f.jsonl")], "f.jsonl")]:
            with pytest.raises(SystemExit) as e:
                data.main(argv)
            assert e.value.code == 2 and not (out and (tmp_path / out).exists()), argv
            out_text, err = capsys.readouterr()
            assert not out_text, argv
            _one_line_error(err, "has no entries: pass a folder of videos")
    (tmp_path / "bad").mkdir()
    for n in "abc":
        (tmp_path / "bad" / f"{n}.mp4").write_bytes(b"not a video")
    bad = str(tmp_path / "bad")
    for argv in (["inspect", bad, *size], ["inspect", bad, "--write", str(tmp_path / "o.jsonl")],
                 ["filter", bad, "--out", str(tmp_path / "f.jsonl")]):
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and err[-1] == "error: every one of the 3 entries is unreadable "\
            "(reasons above)", (argv, err)


def test_shapes_cli_progress(tmp_path, capsys):
    data.main(["shapes", "--out", str(tmp_path / "s"), "--n", "3", "--sizes", "16x16"])
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "s" / "manifest.jsonl")
    assert "shapes: 100%" in err and "3/3" in err
    assert len(data.read_manifest(out.strip())) == 3


def test_cli_output_paths_checked_before_the_work(tmp_path, capsys, monkeypatch):
    """An --out that can only fail after all the work (a folder where a file goes, a file where a folder goes,
    somewhere nothing can be created): one line, exit code 2, nothing done (issue 20)."""
    m = data.make_shapes(str(tmp_path / "set"), 2, seed=0, frames=(5,), sizes=((16, 16),))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.jsonl").mkdir()
    monkeypatch.setattr(data, "make_shapes", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(data, "filter_manifest", lambda *a, **k: pytest.fail("work started"))
    cases = [(["shapes", "--out", str(tmp_path / "afile")], "afile is a file; pass a folder"),
             (["shapes", "--out", "/proc/nope/set"], "cannot create files in /proc"),  # /proc: no new files
             (["filter", m, "--out", str(tmp_path / "adir.jsonl")], "adir.jsonl is a folder"),
             (["filter", m, "--out", "/proc/nope/kept.jsonl"], "cannot create files in /proc"),
             (["filter", m, "--out", str(tmp_path / "afile" / "kept.jsonl")], "afile is a file, not a folder")]
    for argv, text in cases:
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        assert e.value.code == 2, argv
        _one_line_error(capsys.readouterr().err, text)


def test_write_video_fps_and_no_temp_file_on_failure(tmp_path, monkeypatch):
    import av
    video = torch.zeros(3, 5, 16, 16)
    # 0 was written as the encoder's 24 fps
    with pytest.raises(ValueError, match="fps must be a finite number > 0"):
        data.write_video(video, str(tmp_path / "z.mp4"), fps=0)
    for fps, rate in ((12.5, "25/2"), (29.97, "30000/1001")):  # exact rates, never rounded
        data.write_video(video, str(tmp_path / "r.mp4"), fps=fps)
        with av.open(str(tmp_path / "r.mp4")) as c:
            assert str(c.streams.video[0].average_rate) == rate
    calls = []

    def breaks(*a, **k):  # the encoder fails on the third frame
        calls.append(1)
        if len(calls) == 3:
            raise av.FFmpegError(1, "encoder failed")
        return real(*a, **k)

    real = av.VideoFrame.from_ndarray
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", breaks)
    with pytest.raises(av.FFmpegError):
        data.write_video(video, str(tmp_path / "f.mp4"), fps=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.mp4"]  # no .tmp file left, no partial file


def test_truncated_clip_is_a_counted_bad_file(tmp_path):
    """A clip whose header promises 17 frames but whose data ends after a few (a cut download): dropped, counted
    and warned with its reason, not padded with copies of its last frame (issue 20.4). One frame short of the
    header is a frame-count rounding: padded, as before."""
    full = write(tmp_path / "full.mkv", T=17, H=32, W=32, paint=lambda i: np.full((32, 32, 3), 15 * i, np.uint8))
    raw = open(full, "rb").read()
    (tmp_path / "cut.mkv").write_bytes(raw[:len(raw) // 2])
    cut = str(tmp_path / "cut.mkv")
    short = write(tmp_path / "short.mkv", T=16, H=32, W=32)  # its manifest entry says 17
    assert data.probe(cut)["frames"] == 17 and len(data._decode(cut, 17, 32, 32, None, None)) < 16
    entries = [{"path": cut, "caption": "cut"}, {"path": full, "caption": "whole"},
               {"path": short, "caption": "one short", "height": 32, "width": 32, "frames": 17,
                "fps": 8, "duration": 2.0}]
    for mode in ("pack", "bucket"):
        ds = data.VideoDataset(entries, data.Stage([(32, 32)], [1, 9, 17]), mode=mode)
        assert ds.shapes == [(17, 32, 32)] * 3  # planned from the headers
        assert ds[(0, 0, 0, 1 / 3, 3)] is None and ds.skipped == 1 and ds.bad[cut].startswith("truncated: ")
        assert data.collate([ds[(k, 0, k, 1 / 3, 3)] for k in range(3)])["bad"] == 1  # the bad-file tally
        assert ds[1]["video"].shape[1] == 17 and ds[2]["video"].shape[1] == 17
    with pytest.raises(data.BadVideo, match="truncated"):
        data.load_video(cut, 17, min_frames=16)
    assert data.load_video(cut, 17, pad="repeat").shape[1] == 17  # no min_frames: padded as asked


# ----- issue 17: a data path that feeds a cluster -----

def test_inspect_write_records_metadata_in_parallel_and_training_never_probes(tmp_path, capsys,
                                                                              monkeypatch):
    """`data.py inspect M --write OUT` records META + a content hash for every entry (2 worker
    processes here); an unreadable one is kept, marked, and planned out without a probe; a
    VideoDataset on OUT opens no file to plan; `data.py filter` carries the fields through."""
    a = write(tmp_path / "a.mp4", T=17, H=32, W=48, fps=8)
    b = write(tmp_path / "b.mkv", T=9, H=48, W=32, fps=4)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    m = data.write_manifest([{"path": p, "caption": "x", "keep": 1} for p in
                             (a, b, str(tmp_path / "bad.mp4"))], tmp_path / "m.jsonl")
    import multiprocessing.pool
    pools, real_pool = [], multiprocessing.pool.ThreadPool
    monkeypatch.setattr(multiprocessing.pool, "ThreadPool",
                        lambda n: pools.append(n) or real_pool(min(n, 3)))  # (never 100000)
    data.main(["inspect", m, "--write", str(tmp_path / "meta.jsonl"), "--workers", "2"])
    assert "2 ok, 1 unreadable" in capsys.readouterr().out
    # --workers 100000 started threads until "can't start new thread" (a traceback after 20 s)
    data.main(["inspect", m, "--write", str(tmp_path / "meta2.jsonl"), "--workers", "100000"])
    assert pools == [2, 3] and "2 ok, 1 unreadable" in capsys.readouterr().out
    got = data.read_manifest(tmp_path / "meta.jsonl")
    assert [(e["height"], e["width"], e["frames"], e["fps"]) for e in got[:2]] == [
        (32, 48, 17, 8), (48, 32, 9, 4)]
    assert got[0]["duration"] == pytest.approx(17 / 8, abs=0.13) and got[0]["keep"] == 1
    assert len({e["hash"] for e in got[:2]}) == 2 and data.content_hash(a) == got[0]["hash"]
    assert "unreadable" in got[2] and not data.has_meta(got[2])
    monkeypatch.setattr(data, "probe", lambda p: pytest.fail(f"probed {p}"))
    ds = data.VideoDataset(got, data.Stage([(16, 24), (24, 16)], [1, 9, 17]))
    assert ds.shapes[:2] == [(17, 16, 24), (9, 24, 16)] and ds.shapes[2] is None
    monkeypatch.undo()
    # a manifest where nothing is readable is no silent success
    bad = data.write_manifest([{"path": str(tmp_path / "bad.mp4"), "caption": "x"}],
                              tmp_path / "bad.jsonl")
    with pytest.raises(SystemExit) as e:
        data.main(["inspect", bad, "--write", str(tmp_path / "o.jsonl"), "--workers", "1"])
    assert e.value.code == 1
    with pytest.raises(SystemExit):  # without --write, the decode check needs its sizes
        data.main(["inspect", m])
    assert "--write OUT" in capsys.readouterr().err
    # filter: an entry without META gets it recorded, one with META keeps its own
    moving = lambda i: np.roll(np.eye(32, dtype=np.uint8)[:, :, None].repeat(3, 2) * 255, i, 1)
    c = write(tmp_path / "c.mkv", T=10, H=32, W=32, fps=8, paint=moving)
    mine = dict(height=32, width=32, frames=10, fps=8.0, duration=9.0)  # a marker duration
    m2 = data.write_manifest([{"path": c, "caption": "x"}, {"path": c, "caption": "y", **mine}],
                             tmp_path / "f.jsonl")
    kept, _ = data.filter_manifest(m2, str(tmp_path / "kept.jsonl"), top=1.0)
    assert len(kept) == 2 and all(data.has_meta(e) for e in kept)
    assert kept[0]["duration"] == pytest.approx(10 / 8, abs=0.13) and kept[1]["duration"] == 9.0


def test_random_start_and_crop_per_seed_epoch_sample(tmp_path):
    """augment="random": the start (in frames at the stage rate, each of 0..slack alike) and the
    crop are a pure function of (seed, epoch, index): the same in any process, or on resume; a
    new epoch draws anew. Decoding shows exactly the drawn frames and pixels."""
    ramp = lambda i: np.broadcast_to((np.arange(64) * 4).astype(np.uint8)[None, :, None],
                                     (32, 64, 3)).copy()
    p = write(tmp_path / "a.mkv", T=21, H=32, W=32, fps=8)  # frame i is grey(i)
    r = write(tmp_path / "r.mkv", T=9, H=32, W=64, fps=8, paint=ramp)  # x-ramp: columns readable
    entries = [{"path": p, "caption": "a", "frames": 21, "height": 32, "width": 32, "fps": 8},
               {"path": r, "caption": "r", "frames": 9, "height": 32, "width": 64, "fps": 8}]
    stage = data.Stage([(32, 32)], [9])
    ds = data.VideoDataset(entries, stage, augment="random", seed=3)
    again = data.VideoDataset(entries, stage, augment="random", seed=3)
    draws = [ds.augmentation(0, e) for e in range(12)]
    assert draws == [again.augmentation(0, e) for e in range(12)]  # reproducible
    assert len(set(draws)) == 12 and ds.augmentation(0, 0) != data.VideoDataset(
        entries, stage, augment="random", seed=4).augmentation(0, 0)
    firsts = set()
    for epoch in range(6):
        v = ds[(0, 0, 0, 1.0, 1, epoch)]["video"]
        ids = frame_ids(v)
        k = ids[0]
        assert ids == list(range(k, k + 9)) and 0 <= k <= 12  # 21 - 9 frames of slack
        firsts.add(k)
        start, _ = ds.augmentation(0, epoch)
        assert k == (0 if start is None else round(start * 8 + 0.5))  # the drawn start
    assert len(firsts) > 1
    for epoch in range(4):  # the crop: 32 columns of the 64, at the drawn offset
        fy, fx = ds.augmentation(1, epoch)[1]
        left = min(32, int(fx * 33))
        col = ((ds[(1, 0, 0, 1.0, 1, epoch)]["video"][0, 0, 16] + 1) * 127.5)  # (32,) one row
        assert torch.allclose(col, torch.arange(left, left + 32) * 4.0, atol=6), (left, col)
    fixed = data.VideoDataset(entries, stage, seed=3)  # augment="fixed": start 0, the centre
    assert fixed.augmentation(0, 5) == (None, None)
    assert frame_ids(fixed[(0, 0, 0, 1.0, 1, 5)]["video"]) == list(range(9))


def test_plan_counts_frames_from_the_entry_start_and_needs_full_metadata(tmp_path):
    """An entry's "start" leaves fewer frames to plan with (it was planned from the whole file,
    then rejected as truncated); an entry with sizes and frames but no fps is probed (its frames
    were taken as frames at the stage rate)."""
    level = lambda i: np.full((32, 32, 3), 10 * i, np.uint8)  # frame i is grey level 10 * i
    p = write(tmp_path / "a.mkv", T=24, H=32, W=32, fps=8, paint=level)  # 3 s
    stage = data.Stage([(32, 32)], [1, 9, 13, 17])
    ds = data.VideoDataset([{"path": p, "caption": "a", "start": 2.0}], stage)
    assert ds.shapes == [(5, 32, 32)] and ds.avail == [8]  # frames 16..23 remain
    got = levels(ds[0]["video"])  # (T,) grey levels
    assert ds.skipped == 0 and torch.allclose(got, torch.arange(16, 21) * 10.0, atol=3), got
    rnd = data.VideoDataset([{"path": p, "caption": "a", "start": 2.0}], stage, augment="random")
    assert all(rnd[(0, 0, 0, 1.0, 1, e)] is not None for e in range(4)) and rnd.skipped == 0
    partial = {"path": p, "caption": "a", "height": 32, "width": 32, "frames": 24}  # no fps
    ds = data.VideoDataset([partial], data.Stage([(32, 32)], [1, 9, 17], fps=4))
    assert ds.shapes == [(9, 32, 32)] and ds[0] is not None  # 12 frames at 4 fps, not 24


def test_metadata_of_the_wrong_kind_is_probed_again(tmp_path):
    """A manifest from another tool may hold null, 0 or strings in data.META (a webm's frame
    count is 0 in its header; pandas writes null): such an entry is probed, as one without META.
    Frames 0 planned a 21-frame clip as a 1-frame still, silently; null was a TypeError."""
    p = write(tmp_path / "a.mkv", T=21, H=32, W=48, fps=8)
    good = {"path": p, "caption": "", "height": 32, "width": 48, "frames": 21, "fps": 8,
            "duration": 2.625}
    assert data.has_meta(good) and data.has_meta(dict(good, fps=None, duration=None))
    stage = data.Stage([(32, 48)], [1, 9, 17])
    for k, v in [("frames", 0), ("frames", None), ("frames", "21"), ("frames", 21.0),
                 ("height", None), ("width", 0), ("height", True), ("fps", 0), ("fps", "8")]:
        e = dict(good, **{k: v})
        assert not data.has_meta(e), (k, v)
        ds = data.VideoDataset([e], stage)
        assert ds.shapes == [(17, 32, 48)] and ds.skipped == 0, (k, v)
        (got,), bad = data.probe_entries([e])  # train.py's up-front probe re-records it
        assert not bad and data.has_meta(got) and got["frames"] == 21 and got["width"] == 48


def test_a_stage_of_stills_takes_one_frame_of_each_clip(tmp_path):
    """train.py --frames 1 (every stage of stills): a clip gives its first frame. Pack mode planned
    it at its whole length (21 frames, in a stage that asks for 1) and bucket mode (the VAE) failed
    with 'max() arg is an empty sequence'."""
    p = write(tmp_path / "a.mkv", T=21, H=32, W=32, fps=8)
    for mode in ("pack", "bucket"):
        ds = data.VideoDataset([{"path": p, "caption": ""}], data.Stage([(32, 32)], [1]), mode)
        assert ds.shapes == [(1, 32, 32)], mode
        assert frame_ids(ds[0]["video"]) == [0] and ds.skipped == 0


def test_frame_pack_rows_balanced_across_ranks_on_a_realistic_mix():
    """balance=0.05: on images and 17/49/81-frame clips at 480x720 and 768x1360 (the released
    VAE and patch, 226 text tokens), every global batch's ranks cost within 10% of each other
    under attention ~ Σn² + the rest ~ Σn (D = 3072), where rows filled by tokens alone differ
    by 2x; no sample is lost and N ranks still run one process's global batch."""
    rng = random.Random(0)
    shapes = [(rng.choice([1, 17, 49, 81]), *rng.choice([(480, 720), (768, 1360)]))
              for _ in range(1500)]
    f = dict(text_len=226, tf=4, sf=8, p=2, linear_cost=6 * 3072)
    M = data.num_tokens(81, 768, 1360, 226, 4, 8, 2)
    spread = lambda s: max(max(c) / max(min(c), 1) - 1 for c in s.rank_costs(0))
    for world, rows in ((8, 1), (4, 2)):
        make = lambda **k: [data.FramePackSampler(shapes, M, rows, **f, world_size=world, rank=r,
                                                  seed=1, **k) for r in range(world)]
        bal = make(balance=0.05, drop_last=True)
        assert spread(bal[0]) <= 0.10, spread(bal[0])
        assert spread(make(drop_last=True)[0]) > 1.0  # token-filled rows: far apart
        assert bal[0].efficiency(0) > 0.85
        full = make(balance=0.05)  # without drop_last every sample is seen once
        seen = sorted(i for s in full for i in s.epoch_samples(0))
        assert seen == list(range(len(shapes)))
    one = data.FramePackSampler(shapes, M, 4, **f, seed=1, balance=0.05)
    two = [data.FramePackSampler(shapes, M, 2, **f, world_size=2, rank=r, seed=1, balance=0.05)
           for r in range(2)]
    for b1, r0, r1 in zip(one, *two):
        merged = sorted((i, s, w) for i, _, s, w, _ in r0 + r1 if w > 0)
        assert merged == sorted((i, s, w) for i, _, s, w, _ in b1)


def test_loader_workers_and_exact_data_position(shapes_set):
    """One DataLoader per stage (data.make_loader over data.Requests): 2 persistent decoding
    workers give exactly the main process's batches, epoch after epoch; the position each batch
    reports resumes the stream exactly; the dataset holds no model (picklable, no torch module)."""
    import pickle
    entries = data.read_manifest(shapes_set)[:12]
    ds = data.VideoDataset(entries, data.STAGES["shapes"][0], augment="random", seed=2)
    assert not any(isinstance(v, torch.nn.Module) for v in vars(ds).values())
    pickle.dumps(ds)
    s = data.FramePackSampler(ds.shapes, max_tokens=64, rows=2, text_len=4, tf=4, sf=4, p=2,
                              seed=0)
    n = len(s.global_batches(0))

    def run(workers, pos, count):
        req = data.Requests(s, pos)
        loader = data.make_loader(ds, req, workers, prefetch=2)
        out = []
        for b in loader:
            out.append((req.given.popleft()[:2], [(it["index"], it["start"], it["crop"])
                                                  for it in b["items"]],
                        torch.cat([it["video"].flatten() for it in b["items"]])))
            if len(out) == count:
                break
        return out, loader
    main, _ = run(0, {"epoch": 0, "batch": 0}, 2 * n + 1)
    two, loader = run(2, {"epoch": 0, "batch": 0}, 2 * n + 1)
    assert loader.persistent_workers and loader.num_workers == 2
    assert [(p, k) for p, k, _ in main] == [(p, k) for p, k, _ in two]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(main, two))
    assert [p for p, _, _ in main[:n + 1]] == [(0, b) for b in range(n)] + [(1, 0)]
    assert main[0][1] != main[n][1]  # the next epoch: new order, new starts and crops
    resumed, _ = run(0, {"epoch": 1, "batch": 1}, 2)  # resume mid-epoch: the same batches
    assert [(p, k) for p, k, _ in resumed] == [(p, k) for p, k, _ in main[n + 1:n + 3]]


def test_encode_plan_and_latent_encoder(tmp_path):
    """The main process encodes in batches on the training device: complete() gives each
    decoded clip the posterior a direct encode gives; the plan is the least approximate mode the
    budget allows (whole clip, then streamed, then tiled), and a budget nothing fits is a clear
    error. The released VAE at 49x480x720 in bf16 fits 12 GiB streamed (train.py's simulator
    measures it)."""
    import vae
    torch.manual_seed(0)
    ae = vae.CausalVAE(vae.VAE_PRESETS["tiny"]).eval()
    enc = data.LatentEncoder(ae, budget=2**30)
    assert str(enc.plan((9, 32, 32))) == "whole" and enc.plan((9, 32, 32)).batch > 1
    x = torch.rand(3, 3, 9, 32, 32) * 2 - 1  # (B, 3, T, H, W)
    items = [{"video": x[i], "caption": "c", "text": torch.zeros(2, 4)} for i in range(3)]
    out = enc.complete({"items": items})["items"]
    with torch.no_grad():
        ref = ae.encode(x)
    assert all("video" not in it for it in out)
    assert torch.allclose(torch.stack([it["mean"] for it in out]), ref.mean, atol=1e-5)
    cfg = vae.VAE_PRESETS["cogvideox-5b"]
    whole = data.encode_bytes(cfg, (49, 480, 720), data.EncodePlan(), 2)
    plan = data.encode_plan(cfg, (49, 480, 720), 12 * 2**30, itemsize=2)
    assert whole > 12 * 2**30 and plan.stream and not plan.tile and plan.peak <= 12 * 2**30
    big = data.encode_plan(cfg, (81, 768, 1360), 12 * 2**30, itemsize=2)
    assert big.stream and big.peak <= 12 * 2**30
    with pytest.raises(ValueError, match="--encode-memory"):
        data.encode_plan(cfg, (81, 768, 1360), 2**28, itemsize=2)


def test_latent_encoder_stage_mode_fits_every_shape_of_the_stage():
    """set_stage picks one encode mode for the whole stage: it must fit every shape the stage
    has, not only the one largest as a whole-clip encode. Streaming keeps a long clip small but
    not a short wide one (its first chunk is the whole clip, at a larger size): with the long
    clips square and the wide ones short, the mode of the long clip left the wide clips over
    the budget, a ValueError at their first batch, mid-training. No mode that fits all is an
    error at set_stage (the stage's start)."""
    import vae
    ae = vae.CausalVAE(vae.VAE_PRESETS["tiny"]).eval()
    shapes = [(33, 128, 128), (9, 128, 256), (1, 128, 256)]
    enc = data.LatentEncoder(ae)
    enc.budget = enc.weights + 100 * 10**6
    enc.set_stage(shapes)
    for s in shapes:  # raised "encoding one 9x128x256 clip needs ..." for the wide clip
        assert enc.plan(s).peak <= enc.budget, s
    assert enc.mode.tile  # streaming alone leaves the wide clip over the budget
    enc.budget = enc.weights + 10**6
    with pytest.raises(ValueError, match="--encode-memory"):
        enc.set_stage(shapes)


def test_16_bit_greyscale_png(tmp_path):
    """A 16-bit greyscale PNG (PIL mode I;16) was clipped at 255 by convert("RGB"): a mid-grey
    image read as all white. Its 0..65535 scale maps onto 0..255 now (16-bit RGB was right)."""
    from PIL import Image
    ramp = np.linspace(0, 65535, 32).round().astype(np.uint16)[None].repeat(8, 0)  # (8, 32)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    Image.fromarray((ramp / 257).round().astype(np.uint8)).save(tmp_path / "g8.png")
    v16 = data.load_video(tmp_path / "g16.png", 1)
    assert v16.shape == (3, 1, 8, 32)
    assert torch.equal(v16, data.load_video(tmp_path / "g8.png", 1))


def test_palette_png_with_transparency_reads_without_a_warning(tmp_path):
    """A palette PNG with a transparency table (a GIF-like export, an --image) printed PIL's
    "Palette images with Transparency ... should be converted to RGBA" warning (two stderr
    lines around the CLI's output); the pixels are the palette's colours either way."""
    import warnings

    from PIL import Image
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[:, :4] = (0, 90, 0, 0)  # a transparent half: its stored colour is what RGB keeps
    Image.fromarray(rgba, "RGBA").quantize(4).save(tmp_path / "p.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = data.load_video(tmp_path / "p.png", 1)
    expect = torch.from_numpy(rgba[..., :3]).permute(2, 0, 1)[:, None].float() / 127.5 - 1
    assert torch.equal(v, expect)
