"""ffmpeg-python wrappers: probe a media file, stream its frames, extract its audio.

Every ffmpeg failure on user media becomes an ``InputError`` that says what is wrong
with the file; frames are streamed through a pipe one at a time, so memory does not
grow with the clip's length or resolution.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import ffmpeg
import numpy as np

from .errors import InputError


def _require_ffmpeg() -> None:
    missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if missing:
        raise InputError(f"{' and '.join(missing)} not found on PATH",
                         "install ffmpeg (Debian/Ubuntu: apt-get install ffmpeg; scripts/install.sh does it)")


@dataclass(frozen=True)
class MediaInfo:
    """What ffprobe says about a file, in display orientation (rotation applied)."""

    path: Path
    duration_s: float
    has_video: bool
    has_audio: bool
    width: int = 0
    height: int = 0
    fps: float = 0.0  # average frame rate
    variable_frame_rate: bool = False
    pix_fmt: str = ""
    bits_per_sample: int = 8
    audio_sample_rate: int = 0
    audio_channels: int = 0


def _ratio(text: str | None) -> float:
    try:
        value = Fraction(text or "0")
    except (ValueError, ZeroDivisionError):
        return 0.0
    return float(value)


def _rotation(stream: dict) -> int:
    for side in stream.get("side_data_list", []):
        if "rotation" in side:
            return int(side["rotation"]) % 360
    return int(stream.get("tags", {}).get("rotate", 0)) % 360


def _ffmpeg_message(err: ffmpeg.Error) -> str:
    lines = (err.stderr or b"").decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "ffmpeg failed"


def probe(path: Path) -> MediaInfo:
    """Probe ``path``; an empty, missing or unreadable file is an ``InputError``."""
    _require_ffmpeg()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file", "check the path of the video or audio file")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes)", "the upload or copy was interrupted: provide the file again")
    try:
        info = ffmpeg.probe(str(path))
    except ffmpeg.Error as err:
        raise InputError(f"{path.name} is not a media file ffmpeg can read ({_ffmpeg_message(err)})",
                         "provide a video (e.g. mp4/mov/mkv) or audio file (wav/mp3/m4a); re-export it if it is corrupt") from None
    streams = info.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"
                  and not s.get("disposition", {}).get("attached_pic")), None)
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    duration = _ratio(info.get("format", {}).get("duration")) or max(
        (_ratio(s.get("duration")) for s in streams), default=0.0)
    fields: dict = dict(path=path, duration_s=duration, has_video=video is not None, has_audio=audio is not None)
    if video is not None:
        width, height = int(video.get("width", 0)), int(video.get("height", 0))
        if _rotation(video) in (90, 270):
            width, height = height, width
        avg, nominal = _ratio(video.get("avg_frame_rate")), _ratio(video.get("r_frame_rate"))
        bits = int(video.get("bits_per_raw_sample") or 0) or (10 if "10" in video.get("pix_fmt", "") else 8)
        fields.update(width=width, height=height, fps=avg or nominal, pix_fmt=video.get("pix_fmt", ""),
                      variable_frame_rate=bool(avg and nominal and abs(avg - nominal) > 0.01 * nominal),
                      bits_per_sample=bits)
    if audio is not None:
        fields.update(audio_sample_rate=int(audio.get("sample_rate") or 0), audio_channels=int(audio.get("channels") or 0))
    return MediaInfo(**fields)


def stream_frames(path: Path, fps: int, width: int, height: int, crop: tuple[int, int, int, int] | None = None
                  ) -> Iterator[np.ndarray]:
    """RGB uint8 frames (height, width, 3) at a constant ``fps``, optionally cropped first.

    ``crop`` is (x, y, w, h) in display pixels. The ``fps`` filter duplicates or drops
    frames so a variable-frame-rate source comes out on the constant grid the audio is
    aligned to; scaling uses area averaging, which does not alias when shrinking.
    """
    stream = ffmpeg.input(str(path)).video.filter("fps", fps=fps)
    if crop is not None:
        x, y, w, h = crop
        stream = stream.crop(x, y, w, h)
    stream = stream.filter("scale", width, height, flags="area").output(
        "pipe:", format="rawvideo", pix_fmt="rgb24", loglevel="error")
    process = stream.run_async(pipe_stdout=True, pipe_stderr=True)
    frame_bytes = width * height * 3
    try:
        while True:
            buf = process.stdout.read(frame_bytes)
            if len(buf) < frame_bytes:
                break
            yield np.frombuffer(buf, np.uint8).reshape(height, width, 3)
    finally:
        process.stdout.close()
        process.kill()
        stderr = process.stderr.read().decode(errors="replace").strip()
        process.stderr.close()
        code = process.wait()
    if code not in (0, -9) and stderr:
        raise InputError(f"{Path(path).name}: ffmpeg could not decode the video ({stderr.splitlines()[-1]})",
                         "the file is truncated or corrupt: re-export or re-upload it")


def extract_audio(path: Path, dest: Path, sample_rate: int, codec: str = "pcm_s16le") -> Path:
    """Decode the first audio stream of ``path`` to ``dest`` as mono PCM WAV (16-bit unless ``codec`` says)."""
    try:
        (ffmpeg.input(str(path)).audio
         .output(str(dest), ac=1, ar=sample_rate, acodec=codec, format="wav", loglevel="error")
         .overwrite_output().run(capture_stdout=True, capture_stderr=True))
    except ffmpeg.Error as err:
        raise InputError(f"{Path(path).name}: ffmpeg could not decode the audio ({_ffmpeg_message(err)})",
                         "the file is truncated or corrupt: re-export or re-upload it") from None
    return dest


def decode_audio(path: Path, sample_rate: int) -> np.ndarray:
    """Any audio ffmpeg reads (or a video's sound track) as float32 mono samples at ``sample_rate``."""
    try:
        raw, _ = (ffmpeg.input(str(path)).audio
                  .output("pipe:", format="f32le", ac=1, ar=sample_rate, loglevel="error")
                  .run(capture_stdout=True, capture_stderr=True))
    except ffmpeg.Error as err:
        raise InputError(f"{Path(path).name}: ffmpeg could not decode the audio ({_ffmpeg_message(err)})",
                         "the file is truncated or corrupt: re-export or re-upload it") from None
    return np.frombuffer(raw, np.float32).copy()


class VideoWriter:
    """Stream RGB uint8 frames into an H.264 mp4, muxing an audio file if given.

    Frames go straight down ffmpeg's stdin, so memory does not grow with the video's
    length. Writes to ``<dest>.part`` and renames on success: a crash never leaves a
    file that looks finished.
    """

    def __init__(self, dest: Path, width: int, height: int, fps: int, audio: Path | None = None, crf: int = 18):
        self.dest = Path(dest)
        self.partial = self.dest.with_name(self.dest.name + ".part")
        self.frames = 0
        video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
        streams = [video] + ([ffmpeg.input(str(audio)).audio] if audio else [])
        opts = dict(vcodec="libx264", pix_fmt="yuv420p", crf=crf, preset="veryfast", format="mp4",
                    movflags="+faststart", loglevel="error")
        if audio:
            opts.update(acodec="aac", audio_bitrate="128k")
        self._process = ffmpeg.output(*streams, str(self.partial), **opts).overwrite_output().run_async(
            pipe_stdin=True, pipe_stderr=True)

    def write(self, frame: np.ndarray) -> None:
        self._process.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
        self.frames += 1

    def close(self) -> Path:
        self._process.stdin.close()
        stderr = self._process.stderr.read().decode(errors="replace")
        if self._process.wait() != 0:
            self.partial.unlink(missing_ok=True)
            raise RuntimeError(f"ffmpeg failed writing {self.dest.name}: {stderr.strip()[-400:]}")
        self.partial.replace(self.dest)
        return self.dest

    def abort(self) -> None:
        self._process.kill()
        self._process.wait()
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()
