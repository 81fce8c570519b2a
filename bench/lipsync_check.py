"""Does a video's mouth follow its sound track? A weight-free lip-sync figure for any mp4.

    .venv/bin/python bench/lipsync_check.py VIDEO.mp4 [VIDEO2.mp4 ...] [--size 128]

For each video: FaceMesh on every frame (at ``--size`` px, the model's resolution), the
mouth opening (inner-lip gap / mouth width), the loudness of the video's own audio under
each frame, and their correlation; also the correlation with loudness a few frames later
and earlier (speech leads the lips by 0-2 frames), the spread of the mouth opening and
the frames where no face was found. Run it on a dubbed video and, for scale, on a real
clip of the speaker: a frozen or audio-blind mouth gives about 0 correlation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gstalker_core.metrics import lipsync  # noqa: E402
from gstalker_core.config import TrackConfig  # noqa: E402
from gstalker_core.media import decode_audio, probe, stream_frames  # noqa: E402
from gstalker_core.tracking.landmarks import MediapipeFaceMesh  # noqa: E402

LAGS = (-2, -1, 0, 1, 2)  # frames: positive = the mouth follows the sound that many frames later


def mouth_track(video: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mouth opening per frame, NaN where no face; face found flags)."""
    detector = MediapipeFaceMesh(TrackConfig())
    openings = []
    try:
        for frame in stream_frames(video, 25, size, size):
            points = detector.detect(frame)
            openings.append(np.nan if points is None else float(lipsync.mouth_opening(points[None])[0]))
    finally:
        detector.close()
    opening = np.asarray(openings)
    return opening, ~np.isnan(opening)


def lagged_correlation(opening: np.ndarray, energy: np.ndarray, found: np.ndarray, lag: int) -> float:
    n = len(opening)
    idx = np.arange(max(0, -lag), min(n, n - lag))
    keep = found[idx + lag]
    return lipsync.pearson(opening[idx + lag][keep], energy[idx][keep])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("videos", nargs="+", type=Path)
    parser.add_argument("--size", type=int, default=128, help="frame side the landmarker sees (px)")
    args = parser.parse_args()
    print(f"{'video':40s} {'frames':>6s} {'no face':>7s} {'open mean':>9s} {'open std':>8s} "
          + " ".join(f"{'r@' + str(lag):>6s}" for lag in LAGS))
    for video in args.videos:
        info = probe(video)
        opening, found = mouth_track(video, args.size)
        energy = lipsync.audio_energy_per_frame(decode_audio(video, 16000), 16000, len(opening))
        corr = [lagged_correlation(opening, energy, found, lag) for lag in LAGS]
        print(f"{video.name[:40]:40s} {len(opening):6d} {int((~found).sum()):7d} {np.nanmean(opening):9.3f} "
              f"{np.nanstd(opening):8.3f} " + " ".join(f"{c:6.3f}" for c in corr)
              + ("" if info.has_audio else "  (no audio track)"))


if __name__ == "__main__":
    main()
