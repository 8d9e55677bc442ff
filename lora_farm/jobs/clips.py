"""Video clips, decoded with PyAV (FFmpeg), one rule for validation and the trainer (torch-free).

A clip is a video file (``.mp4``, ``.webm``, ``.mov``, ``.gif``) or a folder of frames (images,
taken in name order). A training sample is ``num_frames`` frames of it from the start: every
``frame_stride``-th decoded frame, or, with ``fps``, the frame shown at each tick of that rate
(the clip's own timestamps; a frame folder has none, so it takes ``frame_stride`` only).

``sample_frames`` decodes no further than the last frame it needs, so checking a long clip costs
what training it costs. Every failure is a ``ClipError`` that names the clip and says the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".gif", ".mkv", ".avi")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ClipError(ValueError):
    """Raised when a clip does not decode, or holds too few frames for the sample asked."""


@dataclass(frozen=True)
class FrameRule:
    """Which frames a sample takes: ``count`` of them, every ``stride``-th, or at ``fps``."""

    count: int
    stride: int = 1
    fps: float | None = None

    @classmethod
    def of_spec(cls, spec: Any) -> "FrameRule":
        return cls(spec.num_frames, spec.frame_stride or 1, spec.fps)

    def shorter(self) -> str:
        """How the sample would span less of a clip."""
        if self.fps:
            return "lower `num_frames`, or raise `fps` (up to the clip's own rate)"
        return "lower `num_frames` or `frame_stride`" if self.stride > 1 else "lower `num_frames`"

    def describe(self) -> str:
        how = f"at {self.fps:g} fps" if self.fps else f"every {self.stride}" if self.stride > 1 else "in a row"
        return f"{self.count} frames {how}"


def is_clip(path: Path) -> bool:
    """A video file by its suffix, or a folder holding at least one frame image."""
    if path.is_dir():
        return any(p.suffix.lower() in FRAME_SUFFIXES for p in path.iterdir())
    return path.suffix.lower() in VIDEO_SUFFIXES


def frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)


def sample_frames(clip: Path, rule: FrameRule) -> list[Any]:
    """The sample's frames as ``av.VideoFrame`` s (decoded, in order); ``ClipError`` when the
    clip does not decode or ends before the last frame the rule needs."""
    if clip.is_dir():
        return _folder_frames(clip, rule)
    if not clip.is_file():
        raise ClipError(f"{clip}: not a file or a folder of frames; add it or remove its row")
    if clip.stat().st_size == 0:
        raise ClipError(f"{clip}: the file is empty (0 bytes); export the clip again or remove it")
    return _video_frames(clip, rule)


def _video_frames(clip: Path, rule: FrameRule) -> list[Any]:
    import av

    picked: list[Any] = []
    seen = 0
    try:
        with av.open(str(clip), mode="r") as container:
            if not container.streams.video:
                raise ClipError(f"{clip}: holds no video stream ({_what(container)}); use a video file")
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if _wanted(frame, seen, len(picked), rule, stream):
                    picked.append(frame)
                seen += 1
                if len(picked) == rule.count:
                    return picked
    except ClipError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as error:
        raise ClipError(f"{clip}: does not decode as a video ({_reason(error)}); re-encode it "
                        "(e.g. ffmpeg -i in -c:v libx264 out.mp4) or remove it") from error
    if seen == 0:
        raise ClipError(f"{clip}: no frame decodes (an empty or damaged video); re-encode or remove it")
    raise ClipError(f"{clip}: too few frames for {rule.describe()}: it ends after {seen} decoded "
                    f"frame(s) ({len(picked)} of {rule.count} taken); use a longer clip, or {rule.shorter()}")


def _wanted(frame: Any, index: int, taken: int, rule: FrameRule, stream: Any) -> bool:
    """Whether decoded frame ``index`` is the next one of the sample."""
    if rule.fps is None:
        return index % rule.stride == 0
    if frame.pts is None or stream.time_base is None:  # no timestamps: the stream's own rate
        rate = stream.average_rate or stream.guessed_rate or Fraction(rule.fps)
        seconds = Fraction(index) / Fraction(rate)
    else:
        seconds = Fraction(frame.pts - (stream.start_time or 0)) * stream.time_base
    # the first frame starting at or after tick `taken` (a rate above the clip's own repeats no
    # frame: the sample then spans more of the clip)
    return seconds + Fraction(1, 10_000) >= Fraction(taken) / Fraction(rule.fps)


def _folder_frames(folder: Path, rule: FrameRule) -> list[Any]:
    if rule.fps is not None:
        raise ClipError(f"{folder}: a folder of frames has no frame rate, so `fps` cannot resample "
                        "it; use `frame_stride`, or make the frames a video file")
    files = frame_files(folder)[::rule.stride][:rule.count]
    if len(files) < rule.count:
        raise ClipError(f"{folder}: too few frames for {rule.describe()}: it holds "
                        f"{len(frame_files(folder))} frame image(s); add frames, or {rule.shorter()}")
    return [_image_frame(file) for file in files]


def _image_frame(file: Path) -> Any:
    import av

    if file.stat().st_size == 0:
        raise ClipError(f"{file}: the frame image is empty (0 bytes); export it again")
    try:
        with av.open(str(file), mode="r") as container:
            for frame in container.decode(video=0):
                return frame
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as error:
        raise ClipError(f"{file}: the frame image does not decode ({_reason(error)}); export it "
                        "again") from error
    raise ClipError(f"{file}: the frame image holds no picture; export it again")


def _what(container: Any) -> str:
    kinds = sorted({stream.type for stream in container.streams})
    return ", ".join(kinds) + " only" if kinds else "no streams"


def _reason(error: Exception) -> str:
    """FFmpeg's own words, without the file path it repeats."""
    text = getattr(error, "strerror", None) or str(error)
    return str(text).split(": '")[0].strip() or type(error).__name__
