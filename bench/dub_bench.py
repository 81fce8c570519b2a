"""Dubbing speed and memory.

    .venv/bin/python bench/dub_bench.py fps [--profile preview|paper] [--frames 100]
    .venv/bin/python bench/dub_bench.py memory [--profile preview]    # peak RSS for 10 s vs 600 s of audio
    .venv/bin/python bench/dub_bench.py fps --bundle DIR              # a trained bundle instead

Without ``--bundle`` the model is synthetic but full size: the profile's deformation
networks, ``--gaussians`` head + torso Gaussians in a head-and-shoulders layout, at the
profile's resolution; speed depends on those sizes, not on what the model learned.
Render FPS is reported four ways: deformation + rasterisation + compositing alone, then
with audio feature extraction, then with H.264 encoding (and audio muxing), end to end.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gstalker_core import __version__  # noqa: E402
from gstalker_core.audio import Signal, compute_features, speaking, spec_for  # noqa: E402
from gstalker_core.model.bundle import FORMAT_VERSION, Bundle, BundleManifest, load_bundle, save_bundle  # noqa: E402
from gstalker_core.config import DubConfig, load_config  # noqa: E402
from gstalker_core.dub import DubAudio, dub_source, lip_motion, video_frames  # noqa: E402
from gstalker_core.media import VideoWriter  # noqa: E402
from gstalker_core.render.gaussians import GaussianModel  # noqa: E402
from gstalker_core.model.talking_head import TalkingHead  # noqa: E402


def synthetic_bundle(profile: str, n_gaussians: int) -> Bundle:
    cfg = load_config(profile, environ={})
    size = cfg.ingest.resolution
    f = 0.5 * size / math.tan(math.radians(10))
    K = np.array([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]], np.float32)
    n_head = n_gaussians * 2 // 3
    head = GaussianModel.init_random(cfg.static.gaussians, n_head, np.array([-0.09, -0.14, -0.06]),
                                     np.array([0.09, 0.1, 0.14]))
    rng = np.random.default_rng(0)
    torso_xyz = np.stack([rng.uniform(-0.2, 0.2, n_gaussians - n_head), rng.uniform(0.1, 0.3, n_gaussians - n_head),
                          0.62 + rng.normal(0, 0.02, n_gaussians - n_head)], 1)
    torso = GaussianModel.init_points(cfg.static.gaussians, torso_xyz, rng.uniform(0.2, 0.8, (len(torso_xyz), 3)))
    with torch.no_grad():  # opaque, as a fitted model is
        head.opacity_logits.fill_(3.0)
        torso.opacity_logits.fill_(3.0)
    n_train = 250
    viewmats = np.tile(np.eye(4, dtype=np.float32), (n_train, 1, 1))
    viewmats[:, 2, 3] = 0.6
    viewmats[:, 0, 3] = 0.01 * np.sin(np.arange(n_train) / 20)
    spec = spec_for(cfg.audio, cfg.ingest.audio_sample_rate)
    model = TalkingHead(cfg.deform, head, torso, spec.width, cfg.audio.step_window, torch.from_numpy(viewmats))
    manifest = BundleManifest(format_version=FORMAT_VERSION, gstalker_version=__version__, resolution=size, fps=25,
                              audio_spec=spec, step_window=cfg.audio.step_window, deform=cfg.deform,
                              n_train_frames=n_train, sources={})
    plate = np.full((size, size, 3), 90, np.uint8)
    return Bundle(manifest, model.eval(), viewmats, np.zeros(n_train, np.float32), K, plate)


def speech_like(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)  # syllable-rate loudness changes
    return (0.2 * envelope * np.sin(2 * np.pi * 180 * t) * (1 + 0.3 * np.sin(2 * np.pi * 900 * t))).astype(np.float32)


@torch.no_grad()
def fps(bundle: Bundle, frames: int, chunk: int) -> dict[str, float]:
    """Frames a second of ``dub.video_frames`` (what ``gstalker dub`` runs), audio features and
    H.264 encoding; the features' first call (librosa's imports, seconds, once per process) is
    made before the clock starts and reported apart."""
    spec = bundle.manifest.audio_spec
    samples = speech_like(frames / 25, spec.sample_rate)
    start = time.perf_counter()
    compute_features(samples[: spec.sample_rate], spec, n_frames=25)
    print(f"  first feature call of the process (imports): {time.perf_counter() - start:.2f} s, not counted")
    start = time.perf_counter()
    heard = DubAudio(compute_features(samples, spec, n_frames=frames), frames / 25, frames,
                     speaking(Signal.of_array(samples, spec.sample_rate), frames, 25))
    feature_s = time.perf_counter() - start
    model, size = bundle.model, bundle.manifest.resolution
    source = dub_source(bundle, heard)
    track = np.arange(frames) % len(bundle.viewmats)
    render_s = encode_s = 0.0
    start = time.perf_counter()
    lip = lip_motion(bundle, source, DubConfig())  # the utterance's lip gain, counted with rendering
    render_s += time.perf_counter() - start
    print(f"  lip gain of this audio: {lip.gain:.2f}")
    with tempfile.TemporaryDirectory() as tmp, VideoWriter(Path(tmp) / "out.mp4", size, size, 25) as writer:
        chunks = video_frames(model, source, track, frames, chunk, lip)
        while True:
            t0 = time.perf_counter()
            images, _ = next(chunks, (None, None))
            t1 = time.perf_counter()
            if images is None:
                break
            for image in images:
                writer.write(image)
            render_s += t1 - t0
            encode_s += time.perf_counter() - t1
    return {"render": frames / render_s, "render+features": frames / (render_s + feature_s),
            "render+encode": frames / (render_s + encode_s),
            "end to end": frames / (render_s + feature_s + encode_s)}


def peak_rss_of_dub(bundle_dir: Path, wav: Path) -> float:
    """Peak RSS (MiB) of a separate process that dubs ``wav``; made by the caller, so that synthesising
    the audio (float64 arrays of its whole length) does not count."""
    code = f"""
import resource, sys, tempfile
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from gstalker_core.model.bundle import load_bundle
from gstalker_core.config import DubConfig
from gstalker_core.dub import dub
with tempfile.TemporaryDirectory() as tmp:
    dub(load_bundle(Path({str(bundle_dir)!r})), Path({str(wav)!r}), Path(tmp) / "o.mp4", DubConfig())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["fps", "memory"])
    parser.add_argument("--profile", default="preview")
    parser.add_argument("--gaussians", type=int, default=20000)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=25)
    parser.add_argument("--bundle", type=Path, help="a trained bundle folder instead of a synthetic model")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle) if args.bundle else synthetic_bundle(args.profile, args.gaussians)
    n = len(bundle.model.head) + len(bundle.model.torso)
    print(f"{'bundle ' + str(args.bundle) if args.bundle else 'synthetic ' + args.profile} model: "
          f"{bundle.manifest.resolution} px, {n} Gaussians, torch {torch.__version__} cpu, {torch.get_num_threads()} threads")
    if args.what == "fps":
        result = fps(bundle, args.frames, args.chunk)
        print(json.dumps({k: round(v, 2) for k, v in result.items()}))
        for k, v in result.items():
            print(f"  {k:<16} {v:8.2f} frames/s")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_bundle(bundle, Path(tmp) / "bundle")
            for seconds in (10, 600):
                wav = Path(tmp) / f"{seconds}s.wav"
                soundfile.write(wav, speech_like(seconds), 16000)
                print(f"  dub of {seconds:>4} s audio: peak RSS {peak_rss_of_dub(folder, wav):.0f} MiB")
    print(f"bench peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
