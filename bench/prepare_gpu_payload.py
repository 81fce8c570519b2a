"""Prepare what ``bench/gpu.sh`` needs on a GPU box that has no network: wheels and a tracked speaker.

    .venv/bin/python bench/prepare_gpu_payload.py                # writes bench/gpu_payload/ (a few CPU minutes)
    .venv/bin/python bench/prepare_gpu_payload.py --check-only   # the wheel-set check on bench/gpu_payload/wheels

Then, with the device tool: run ``bash bench/gpu.sh`` with ``carry=["bench/gpu_payload"]``.

``bench/gpu_payload/`` (git-ignored) holds:
- ``wheels/``: cp312 manylinux x86-64 (or pure) wheels of every distribution the bench
  imports that the box's image lacks (``CARRIED``), for ``pip install --no-index --no-deps``
  there. Versions are this venv's, where it has the distribution, so the box runs the code
  the CPU tests ran;
- ``store/``: a local artifact store with the ingest, track and audio stages of the first
  ``--seconds`` of the clip at the paper profile's 512 px, made by the real stages (the box
  has no mediapipe to track a clip itself);
- ``payload.json``: the profile, the overrides and the three stage keys, with which
  ``gpu_bench.py`` reads the store.

Size: the device tool carries 64 MiB with the working tree, so the payload must stay under
60 MiB. The wheels take 39.7 MiB, imageio-ffmpeg's (the box's only ffmpeg binary) 28 of it
(0.6.0; the 0.8 wheels are 68 MB). A second of clip at 512 px stores about 0.67 MiB (frames
at the profile's CRF 0.41, landmarks 0.14, labels 0.08, audio and features 0.05; measured on
cnn_anchor_71s), hence the default of the clip's first 26 s (650 frames, 59 held out).

The wheel-set check (``missing_distributions``) runs after every download: every module that
the bench's imports load here must come from a distribution the box has or one carried, and
every carried wheel's own requirements (for Python 3.12 on Linux) must be met the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_CLIP = REPO.parent / "shared" / "data" / "cnn_anchor_71s.mp4"
DEFAULT_OUT = REPO / "bench" / "gpu_payload"
PAYLOAD_FILE = "payload.json"
LIMIT_MIB = 60

# Distributions the bench imports that the box lacks. ``None``: this venv's version.
CARRIED: dict[str, str | None] = {
    "gsplat": "1.5.3",  # CUDA rasteriser; compiles its kernels on the box at first use
    "imageio-ffmpeg": "0.6.0",  # its ffmpeg binary decodes the stored H.264 frame chunks
    "ffmpeg-python": None, "future": None,  # gstalker_core.data.frames drives ffmpeg through it
    "pydantic": None, "pydantic-core": None, "annotated-types": None, "typing-inspection": None,  # config, manifests
    # gstalker_core.audio imports librosa; these are its imports the box lacks
    "librosa": None, "soundfile": None, "cffi": None, "pycparser": None, "soxr": None, "audioread": None,
    "decorator": None, "pooch": None, "platformdirs": None,
}
WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64")
# The box's Python, for the markers of the carried wheels' requirements.
BOX_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
               "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
# The H200 box's image ('cuda'), as read on 2026-11-17 (the device tool's KINDS.md).
BOX_PACKAGES = frozenset(canonicalize_name(name) for name in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash
yarl zipp
""".split())
# Distributions here whose import name the box provides from another distribution.
SAME_MODULES_ON_BOX = {"opencv-contrib-python": "opencv-python-headless"}
# What the bench imports: the script itself, and the tracking stage that ``tracking.open_dataset`` loads lazily.
BENCH_IMPORTS = ("gpu_bench", "gstalker_core.tracking.stage")


# -- wheels --------------------------------------------------------------------------------

def wheel_requirements() -> list[str]:
    """``name==version`` of every carried distribution."""
    return [f"{name}=={version or metadata.version(name)}" for name, version in CARRIED.items()]


def download_wheels(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", str(dest), *wheel_requirements()], check=True)


def wheel_metadata(wheel: Path) -> tuple[str, list[str]]:
    """(canonical name, Requires-Dist lines) of a wheel file."""
    with zipfile.ZipFile(wheel) as z:
        text = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    headers = [line.split(":", 1) for line in text.split("\n\n", 1)[0].splitlines() if ":" in line]
    name = next(value.strip() for key, value in headers if key == "Name")
    return canonicalize_name(name), [value.strip() for key, value in headers if key == "Requires-Dist"]


def available_on_box(carried: set[str]) -> set[str]:
    """Canonical names of the distributions the bench can import on the box."""
    return set(BOX_PACKAGES) | carried


def carried_names(wheels: Path) -> set[str]:
    return {wheel_metadata(w)[0] for w in wheels.glob("*.whl")}


def loaded_distributions(modules: tuple[str, ...]) -> set[str]:
    """Canonical names of the distributions (of this venv) whose modules are loaded once ``modules`` are
    imported, in a fresh interpreter; the project itself (gstalker) and the standard library are left out."""
    code = ("import sys, importlib, importlib.metadata as md\n"
            f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'bench')!r}]\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "owners = md.packages_distributions()\n"
            "print('\\n'.join(sorted({d for m in list(sys.modules) for d in owners.get(m.split('.')[0], [])})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {canonicalize_name(SAME_MODULES_ON_BOX.get(name, name)) for name in out.split()} - {"gstalker"}


def unmet_requirements(wheels: Path, available: set[str]) -> list[str]:
    """``wheel: requirement`` for each carried wheel's requirement (on the box's Python) nothing provides."""
    unmet = []
    for wheel in sorted(wheels.glob("*.whl")):
        name, requires = wheel_metadata(wheel)
        for line in requires:
            req = Requirement(line)
            if (req.marker is None or req.marker.evaluate(BOX_MARKERS)) and canonicalize_name(req.name) not in available:
                unmet.append(f"{name}: {line}")
    return unmet


def modules_absent_on_box() -> list[str]:
    """Top-level modules of this venv that the box will not have: those of distributions neither
    in its image nor carried (standard-library names left out). Stubs that refuse to import them
    make this venv stand in for the box (tests/test_gpu_bench.py)."""
    available = available_on_box({canonicalize_name(name) for name in CARRIED}) | {"gstalker"}
    return sorted(module for module, owners in metadata.packages_distributions().items()
                  if module.isidentifier() and module not in sys.stdlib_module_names
                  and not any(canonicalize_name(SAME_MODULES_ON_BOX.get(d, d)) in available for d in owners))


def missing_distributions(wheels: Path) -> list[str]:
    """What the bench would miss on the box (empty when the wheel set is complete); prints it."""
    available = available_on_box(carried_names(wheels))
    missing = [f"imported by the bench: {d}" for d in sorted(loaded_distributions(BENCH_IMPORTS) - available)]
    missing += [f"required by {line}" for line in unmet_requirements(wheels, available)]
    wanted = {canonicalize_name(name) for name in CARRIED}
    missing += [f"not downloaded: {d}" for d in sorted(wanted - carried_names(wheels))]
    for line in missing:
        print(f"MISSING {line}")
    print(f"wheel-set check: {'complete' if not missing else f'{len(missing)} missing'} "
          f"({len(list(wheels.glob('*.whl')))} wheels)")
    return missing


# -- the prepared speaker ------------------------------------------------------------------

def cut_clip(source: Path, seconds: float, dest: Path) -> Path:
    """The first ``seconds`` of ``source``: video re-encoded losslessly (a stream copy would cut
    inside a group of pictures), audio copied."""
    import ffmpeg

    (ffmpeg.input(str(source), t=seconds)
     .output(str(dest), vcodec="libx264", qp=0, preset="ultrafast", acodec="copy", loglevel="error")
     .overwrite_output().run(capture_stdout=True, capture_stderr=True))
    return dest


def prepare_store(clip: Path, seconds: float, profile: str, root: Path) -> dict:
    """Run the ingest, track and audio stages of the first ``seconds`` of ``clip`` into the local
    store ``root/store``; write and return the payload description (``root/payload.json``)."""
    from gstalker_core import audio, ingest, tracking
    from gstalker_core.config import load_config
    from gstalker_core.storage import open_store

    # the cut clip is shorter than the paper profile's 60 s minimum; the QA video is not needed
    overrides = ["ingest.min_duration_s=1.0", "track.qa_video=false"]
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(profile, overrides=[*overrides, f"home={tmp}", f"store.url={root / 'store'}"], environ={})
        store = open_store(cfg)
        source = cut_clip(clip, seconds, Path(tmp) / f"{clip.stem}_{seconds:g}s.mkv")
        ingest_run = ingest.run(store, str(source), cfg).manifest
        runs = {"ingest": ingest_run, "track": tracking.run(store, ingest_run, cfg).manifest,
                "audio": audio.run(store, ingest_run, cfg).manifest}
    payload = {"clip": clip.name, "seconds": seconds, "profile": profile, "overrides": overrides,
               "frames": ingest_run.meta["n_frames"], "resolution": ingest_run.meta["resolution"],
               "stages": {name: run.key for name, run in runs.items()}, "commit": git_commit(),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (root / PAYLOAD_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    return payload


def git_commit() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def check_carried_ffmpeg(wheels: Path, store: Path) -> bool:
    """Decode one stored frame chunk with the carried wheel's ffmpeg and with this machine's:
    H.264 decoding is exact, so the frames must be equal. Prints the outcome."""
    from gstalker_core.data.frames import decode_video_chunk

    chunk = next(store.rglob("frames_00000.mkv"))
    resolution = json.loads((store.parent / PAYLOAD_FILE).read_text())["resolution"]
    here = decode_video_chunk(chunk, resolution, resolution)
    wheel = next(wheels.glob("imageio_ffmpeg-*.whl"))
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if "/binaries/ffmpeg-" in n)
        binary = Path(tmp) / "ffmpeg"
        binary.write_bytes(z.read(member))
        binary.chmod(0o755)
        path = os.environ["PATH"]
        os.environ["PATH"] = f"{tmp}{os.pathsep}{path}"
        try:
            carried = decode_video_chunk(chunk, resolution, resolution)
        finally:
            os.environ["PATH"] = path
    same = here.shape == carried.shape and bool(np.array_equal(here, carried))
    print(f"carried ffmpeg ({Path(member).name}) decodes {chunk.name}: {carried.shape}, "
          f"{'identical to' if same else 'DIFFERENT from'} this machine's decode")
    return same


def size_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP)
    parser.add_argument("--seconds", type=float, default=26.0, help="length of the clip's start that is prepared")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check-only", action="store_true", help="only check the wheels already in OUT/wheels")
    args = parser.parse_args()
    wheels = args.out / "wheels"
    if not args.check_only:
        shutil.rmtree(args.out, ignore_errors=True)  # two versions of a wheel would stop the install on the box
        download_wheels(wheels)
    if missing_distributions(wheels):
        sys.exit("the wheel set is incomplete: add the missing distributions to CARRIED")
    if args.check_only:
        return
    payload = prepare_store(args.clip, args.seconds, "paper", args.out)
    print(json.dumps(payload, indent=2))
    if not check_carried_ffmpeg(wheels, args.out / "store"):
        sys.exit("the carried ffmpeg decodes the stored frames differently")
    for part in (wheels, args.out / "store"):
        print(f"{part.relative_to(args.out)}: {size_mib(part):.1f} MiB")
    total = size_mib(args.out)
    print(f"payload {args.out}: {total:.1f} MiB (limit {LIMIT_MIB} MiB)")
    if total > LIMIT_MIB:
        sys.exit(f"the payload is over {LIMIT_MIB} MiB: prepare fewer --seconds")


if __name__ == "__main__":
    main()
