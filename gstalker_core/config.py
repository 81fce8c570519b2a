"""Pipeline configuration: pydantic models, profiles, and the layering rules.

Precedence, lowest first: the profile's YAML (``gstalker_core/profiles/<name>.yaml``),
a user YAML file, ``GSTALKER_<SECTION>__<FIELD>`` environment variables, CLI overrides
``section.field=value``. Unknown fields are refused, so a typo never silently does nothing.

Each stage hashes only its own section into its content key, so changing ``audio.n_mels``
reruns the audio stage and what follows it, never ingest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

PROFILES_DIR = Path(__file__).parent / "profiles"
ProfileName = Literal["tiny", "preview", "paper"]
ENV_PREFIX = "GSTALKER_"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreConfig(Section):
    """Where artifacts live. ``url``: ``s3://bucket/prefix`` or a local directory.

    Credentials never appear here: boto3's standard chain (environment, profile, instance
    role) supplies them.
    """

    url: str = Field(default="", description="empty = <home>/store (embedded local default)")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint, e.g. http://127.0.0.1:8333")
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    max_attempts: int = Field(default=5, ge=1, le=20, description="retries with backoff on transient errors")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    multipart_threshold_mb: int = Field(default=8, ge=5)
    multipart_chunk_mb: int = Field(default=8, ge=5)


class IngestConfig(Section):
    """Decode, validate and crop the speaker video."""

    resolution: int = Field(default=256, ge=32, le=1024, description="square crop side in pixels")
    fps: Literal[25] = 25  # the field's protocol; audio steps are tied to it (2 per frame)
    audio_sample_rate: Literal[16000] = 16000
    min_duration_s: float = Field(default=10.0, ge=0.5)
    max_duration_s: float = Field(default=1800.0, gt=0)
    crop_scale: float = Field(default=2.6, ge=1.2, le=6.0, description="crop side / face box side")
    crop_center_y: float = Field(default=0.25, ge=-1.0, le=1.0,
                                 description="crop centre below the face centre, in face heights")
    detect_width: int = Field(default=320, ge=96, le=1280, description="frame width for face detection")
    detect_every: int = Field(default=5, ge=1, description="run face detection on every n-th frame")
    max_missing_face_fraction: float = Field(default=0.2, ge=0.0, le=1.0)
    chunk_frames: int = Field(default=100, ge=1, description="frames per stored chunk (one group of pictures)")
    frame_codec: Literal["h264", "ffv1"] = Field(default="h264", description="h264: RGB at frame_crf; ffv1: lossless")
    frame_crf: int = Field(default=12, ge=0, le=51, description="H.264 quality of stored frames: lower is better "
                                                                 "and larger, 0 lossless")


class AudioConfig(Section):
    """Per-step audio features: 50 Hz, two steps per 25 fps video frame."""

    kind: Literal["logmel", "mfcc", "speech_model"] = Field(
        default="logmel", description="speech_model: a HuBERT/wav2vec2 model's hidden states (needs model_dir)")
    # left out of the config (and so of the audio stage's key) while empty: default keys stay as they were
    model_dir: str = Field(default="", exclude_if=lambda v: not v,
                           description="local Hugging Face folder of the speech model for kind=speech_model "
                                       "(never downloaded)")
    n_features: int = Field(default=80, ge=8, le=256, description="mel bands or MFCC coefficients (not speech_model's)")
    n_fft: int = Field(default=800, ge=128)
    fmin: float = Field(default=55.0, ge=0)
    fmax: float = Field(default=7600.0, gt=0)
    step_window: int = Field(default=16, ge=2, description="audio steps per frame window (even)")
    normalise: Literal["none", "utterance"] = Field(
        default="utterance", description="log-mel only: per-utterance mean/variance normalisation of each band "
        "over the speech: removes the voice's and microphone's long-term spectrum, keeps what changes with the "
        "mouth (speech_model features are used as the model gives them)")
    loudness: bool = Field(
        default=True, description="log-mel only: one more feature, the step's loudness (dB of its mel power), gated "
        "and normalised per utterance as the bands are; frequency masks never hide it: it is the cue every voice "
        "shares, and the mouth opens with it")
    augment_semitones: list[float] = Field(
        default=[-4.0, -2.0, 2.0, 4.0], description="pitch shifts of the training audio (resampling shifts the "
        "formants too, like another vocal tract); training draws one of them for half of its frames so that the "
        "lips follow voices it never heard; empty: off")

    @field_validator("step_window")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even (a frame owns 2 audio steps)")
        return v

    @model_validator(mode="after")
    def _normalise_reads_decibels(self) -> "AudioConfig":
        # the noise gate, the choice of speech steps and the loudness column read log-mel levels in
        # dB (and the bands' power), which MFCCs are not
        if self.kind == "mfcc":
            to_set = [key for key, on in (("audio.normalise=none", self.normalise == "utterance"),
                                          ("audio.loudness=false", self.loudness)) if on]
            if to_set:
                raise ValueError("normalise=utterance and loudness work on log-mel levels; with kind=mfcc set "
                                 + " and ".join(to_set))
        return self


class TrackConfig(Section):
    """Tracking and parsing. Defaults suit the preview profile; the paper profile keeps them."""

    landmark_backend: Literal["mediapipe", "face_alignment", "insightface"] = Field(
        default="mediapipe", description="landmark detector; the others need model_dir")
    model_dir: str = Field(default="", description="local weights folder for the optional backends (never downloaded)")
    min_detection_confidence: float = Field(default=0.5, gt=0, lt=1)
    fov_min_deg: float = Field(default=8.0, gt=1, lt=90, description="focal search range, vertical field of view")
    fov_max_deg: float = Field(default=60.0, gt=1, lt=120)
    fov_prior_deg: float = Field(default=20.0, gt=1, lt=120,
                                 description="field of view used when the clip cannot determine it (near-static head)")
    focal_fit_frames: int = Field(default=60, ge=5, description="frames (spread over the clip) used to choose the focal")
    smooth_min_cutoff_hz: float = Field(default=1.0, gt=0, description="one-euro cutoff at rest (lower = smoother)")
    smooth_beta: float = Field(default=0.5, ge=0, description="one-euro speed coefficient (higher = less lag on turns)")
    outlier_mad: float = Field(default=6.0, gt=0, description="fit residual above median + k*MAD marks a frame invalid")
    outlier_min_px_fraction: float = Field(default=0.02, gt=0,
                                           description="...but only when the residual also exceeds this x resolution")
    max_gap_frames: int = Field(default=12, ge=0, description="longest run of bad frames that is interpolated")
    black_level: float = Field(default=12.0, ge=0, le=255, description="mean grey level below which a frame is black")
    scene_cut_factor: float = Field(default=8.0, gt=1, description="frame difference x median that counts as a cut")
    scene_cut_min_level: float = Field(default=30.0, ge=0, description="...and at least this mean abs difference (0-255)")
    min_face_fraction: float = Field(default=0.12, gt=0, lt=1, description="face width / crop side below which we refuse")
    profile_yaw_deg: float = Field(default=50.0, gt=0, lt=90, description="yaw beyond which frames are warned as profile")
    mouth_cover_ratio: float = Field(default=0.5, ge=0, lt=1,
                                     description="lip/cheek colour contrast below this x the clip's median marks the "
                                                 "mouth covered (hand over it): those frames are not trained on")
    person_threshold: float = Field(default=0.5, gt=0, lt=1, description="selfie-segmentation probability for 'person'")
    neck_half_width: float = Field(default=0.45, gt=0, description="neck band half width, in face widths")
    neck_length: float = Field(default=0.55, gt=0, description="neck bottom below the chin, in face heights")
    plate_frames: int = Field(default=64, ge=3, description="frames sampled for the background plate (bounds memory)")
    plate_dilate_fraction: float = Field(default=0.03, ge=0, description="person mask dilation for the plate, x resolution")
    qa_video: bool = Field(default=True, description="write qa.mp4 (landmarks, head axes, masks) into the stage")


# Knobs of the deformation networks (tri-plane hash field, audio encoder, face and torso fields).
# Defaults are the preview profile: sized so that a 2-core CPU evaluates ~20k Gaussians for a
# few frames per training step quickly (most hash levels fit a dense grid, evaluated by
# ``grid_sample``). The paper profile (GPU) uses more levels, finer grids, bigger tables and
# wider MLPs (ER-NeRF-sized tri-plane).
# The audio feature layout (``n_features``, ``step_window``) is not here: it belongs to the
# audio features the model is trained on (``AudioConfig`` / ``AudioFeatureSpec``) and is
# passed to the audio encoder explicitly.
class DeformConfig(Section):
    """Deformation networks. Changing any field changes the trained model (and its cache key)."""

    grid_backend: Literal["auto", "torch", "tcnn"] = Field(
        default="torch", description="hash grid implementation; 'tcnn' needs tinycudann and CUDA, and its "
                                     "weights do not load into the portable 'torch' backend; 'auto' is tcnn where "
                                     "it imports and CUDA is present, else torch (the choice enters the model's key)")
    hash_levels: int = Field(default=8, ge=1, le=32, description="resolution levels per plane")
    hash_features: int = Field(default=2, ge=1, le=8, description="features per level")
    hash_log2_table: int = Field(default=14, ge=8, le=24,
                                 description="log2 of the hash table size per level; levels whose grid fits are dense")
    hash_base_resolution: int = Field(default=16, ge=2, description="cells per side at the coarsest level")
    hash_max_resolution: int = Field(default=256, ge=2, description="cells per side at the finest level")
    audio_channels: int = Field(default=64, ge=4, description="conv width of the per-frame audio encoder")
    audio_code_dim: int = Field(default=32, ge=2, description="per-frame audio code = the face field's audio condition")
    frame_window: int = Field(default=8, ge=1, le=32,
                              description="neighbouring frames the temporal smoother weighs (t-w/2 .. t+w/2-1)")
    face_mlp_width: int = Field(default=64, ge=4)
    face_mlp_depth: int = Field(default=2, ge=1, description="hidden layers of the face field MLP")
    torso_mlp_width: int = Field(default=32, ge=4)
    torso_mlp_depth: int = Field(default=2, ge=1, description="hidden layers of the torso field MLP")
    torso_frequencies: int = Field(default=4, ge=0, le=12, description="sin/cos octaves encoding torso centres")
    torso_latent_dim: int = Field(default=8, ge=1, le=64, description="per-training-frame latent of the torso field")

    def resolved(self) -> "DeformConfig":
        """This config with ``grid_backend`` decided for this machine (``auto`` made concrete)."""
        if self.grid_backend != "auto":
            return self
        from .deform.hashgrid import tcnn_usable

        return self.model_copy(update={"grid_backend": "tcnn" if tcnn_usable() else "torch"})

    @model_validator(mode="after")
    def _resolutions_ordered(self) -> "DeformConfig":
        if self.hash_max_resolution < self.hash_base_resolution:
            raise ValueError(f"hash_max_resolution ({self.hash_max_resolution}) must be >= "
                             f"hash_base_resolution ({self.hash_base_resolution})")
        return self


class GaussianConfig(Section):
    """A Gaussian set: colour model, learning rates, 3DGS densification and pruning."""

    sh_degree: int = Field(default=1, ge=0, le=3, description="spherical-harmonics degree of the colours")
    init_opacity: float = Field(default=0.1, gt=0, lt=1)
    lr_means: float = Field(default=1.6e-4, gt=0, description="x the set's extent (3DGS)")
    lr_quats: float = Field(default=1e-3, gt=0)
    lr_scales: float = Field(default=5e-3, gt=0)
    lr_opacity: float = Field(default=5e-2, gt=0)
    lr_sh0: float = Field(default=2.5e-3, gt=0, description="higher SH bands use 1/20 of it")
    densify_from: int = Field(default=100, ge=0)
    densify_until: int = Field(default=1500, ge=0)
    densify_every: int = Field(default=100, ge=1)
    densify_grad_threshold: float = Field(default=2e-4, gt=0, description="mean view-space gradient (NDC units)")
    dense_scale_fraction: float = Field(default=0.01, gt=0, description="clone below, split above (x extent)")
    prune_opacity: float = Field(default=0.005, ge=0, lt=1)
    prune_scale_fraction: float = Field(default=0.5, gt=0, description="prune Gaussians larger than this x extent")
    opacity_reset_every: int = Field(default=1000, ge=1)
    max_gaussians: int = Field(default=30000, ge=1, description="densification stops adding beyond this")


class StaticFitConfig(Section):
    """Static fit of the head and torso Gaussians."""

    iterations: int = Field(default=2000, ge=1)
    n_head: int = Field(default=8000, ge=1, description="initial head Gaussians (random in the head volume)")
    n_torso: int = Field(default=4000, ge=1, description="initial torso Gaussians (on neck/torso pixels)")
    layer_loss_weight: float = Field(default=0.5, ge=0, description="weight of the head/torso layer losses")
    ssim_weight: float = Field(default=0.2, ge=0, le=1)
    eval_frames: int = Field(default=40, ge=1, description="held-out frames scored after the fit")
    checkpoint_every: int = Field(default=500, ge=1)
    backend: Literal["auto", "torch", "numba", "gsplat"] = "auto"
    seed: int = 0
    gaussians: GaussianConfig = GaussianConfig()


class TrainConfig(Section):
    """Deformation training schedule (after the static fit)."""

    iterations: int = Field(default=3000, ge=1, description="rendering steps (after the landmark steps)")
    guide_iterations: int = Field(default=2000, ge=0,
                                  description="landmark steps first: the face field learns the tracked landmarks' "
                                              "motion from the audio, without rendering")
    guide_batch: int = Field(default=32, ge=1, description="frames per landmark step")
    guide_weight: float = Field(default=0.1, ge=0, description="weight of the landmark loss during rendering steps")
    frames_per_step: int = Field(default=1, ge=1, description="frames rendered per optimisation step")
    lr_networks: float = Field(default=2e-3, gt=0, description="Adam learning rate of the encoder and fields")
    lr_final_scale: float = Field(default=0.1, gt=0, le=1,
                                  description="share of each learning rate left at the last rendering step "
                                              "(exponential decay over the rendering steps)")
    unfreeze_step: int = Field(default=2000, ge=0, description="step from which the static head Gaussians train too")
    static_lr_scale: float = Field(default=0.5, ge=0,
                                   description="their learning rates, x the static fit's per-attribute rates")
    lip_start: int = Field(default=1000, ge=0, description="step from which the mouth box weighs more")
    lip_weight: float = Field(default=1.0, ge=0, description="extra L1 weight inside the mouth box")
    layer_loss_weight: float = Field(default=0.5, ge=0, description="weight of the head/torso layer losses")
    ssim_weight: float = Field(default=0.2, ge=0, le=1, description="D-SSIM weight in the photometric loss")
    latent_smoothness_weight: float = Field(default=1.0, ge=0)
    checkpoint_every: int = Field(default=500, ge=1)
    band_masks: int = Field(default=2, ge=0, description="frequency masks (SpecAugment) per audio window of every "
                            "landmark step's frame, and of the rendering steps' frames that hear a pitch-shifted "
                            "voice (audio.augment_semitones): runs of feature bands hidden, so that the lips follow "
                            "more than the training voice's spectral detail; 0: off")
    band_mask_share: float = Field(default=0.15, ge=0, le=0.5, description="widest mask, as a share of the bands")
    lip_gain_frames: int = Field(default=200, ge=0,
                                 description="training frames rendered to calibrate the lip gain (model.lip_gain) "
                                             "after training; 0: no calibration, gain 1")
    # 2.5 let the speaker's own held-out audio reach 2.5 on cnn_anchor_71s, its mouth opening 1.27x
    # as widely as the truth's and gaping to 0.47 (the truth's widest 0.23); at 2.0 it opens as
    # widely as the truth's (0.0600 against 0.0588), and six new voices at 0.97-1.09x the real spread
    lip_gain_max: float = Field(default=2.0, ge=1.0, le=3.0, description="largest lip gain of any utterance")
    seed: int = 0


class DubConfig(Section):
    """Rendering new audio with a trained speaker."""

    min_duration_s: float = Field(default=0.5, gt=0)
    max_duration_s: float = Field(default=3600.0, gt=0, description="longest audio accepted (1 h)")
    chunk_frames: int = Field(default=25, ge=1, description="frames rendered per batch and piped to the encoder")
    # left out of the config (and so of the dub's output key) while unset: default keys stay as they were
    lip_gain: Optional[float] = Field(default=None, gt=0, le=5.0, exclude_if=lambda v: v is None,
                                      description="audio-driven mouth motion x this for every utterance; unset: the "
                                                  "speaker's calibrated gain x the utterance's factor (model.lip_gain)")
    pose_stretch: Optional[tuple[int, int]] = Field(
        default=None, description="training frames [start, stop) the pose/blink track ping-pongs over (default all)")


class RuntimeConfig(Section):
    """Where and how tensors are computed. Results do not depend on these beyond float
    tolerance, so no stage's content key holds them: a model trained on a GPU is the cache hit
    of the same work on a CPU."""

    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto (CUDA when present, else CPU) | cpu | cuda | cuda:N; a GPU stage run by a "
                                    "worker uses the GPU of the slot it holds")
    threads: int = Field(default=0, ge=0, description="CPU threads for torch and numba; 0 = all cores")
    matmul_precision: Literal["highest", "high"] = Field(
        default="highest", description="float32 matrix products: 'high' allows TF32 on CUDA (faster, ~1e-3 relative)")
    batch_frames: int = Field(default=8, ge=1, description="frames rendered per rasteriser call in evaluation")


class PipelineConfig(Section):
    profile: ProfileName = "preview"
    home: str = Field(default="", description="empty = $GSTALKER_HOME or ~/.gstalker")
    store: StoreConfig = StoreConfig()
    ingest: IngestConfig = IngestConfig()
    audio: AudioConfig = AudioConfig()
    track: TrackConfig = TrackConfig()
    deform: DeformConfig = DeformConfig()
    static: StaticFitConfig = StaticFitConfig()
    train: TrainConfig = TrainConfig()
    dub: DubConfig = DubConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @property
    def home_dir(self) -> Path:
        return Path(self.home or os.environ.get("GSTALKER_HOME") or "~/.gstalker").expanduser()

    @property
    def cache_dir(self) -> Path:
        """Local, disposable copies of stage outputs fetched from the store."""
        return self.home_dir / "cache"

    @property
    def store_url(self) -> str:
        return self.store.url or str(self.home_dir / "store")


def config_content(cfg: PipelineConfig) -> dict:
    """The config as a mapping that ``load_config`` layers back over the profile to the same
    config on another machine; ``home`` is that machine's own and stays out."""
    return cfg.model_dump(mode="json", exclude={"home"})


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"config override {dotted!r}: {p!r} is not a section",
                              "write overrides as section.field=value")
    tree[leaf] = value


def read_config_file(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", "check the path given to --config") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections", "see gstalker_core/profiles/preview.yaml")
    return data


def _env_overrides(environ: dict[str, str]) -> dict:
    tree: dict = {}
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
            _set_path(tree, dotted, yaml.safe_load(raw) if raw else raw)
    return tree


def _format_validation_error(err: ValidationError, origin: str) -> ConfigError:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        lines.append(f"{field}: {e['msg']} (got {e.get('input')!r})")
    return ConfigError(
        "invalid configuration:\n    " + "\n    ".join(lines),
        f"correct the field(s) above in {origin}; `gstalker config show` prints a valid config",
    )


def load_config(
    profile: str = "preview",
    config_file: str | Path | dict | None = None,
    overrides: list[str] | None = None,
    environ: dict[str, str] | None = None,
) -> PipelineConfig:
    """Build the effective config. Raises ``ConfigError`` naming every bad field.

    ``config_file`` is a YAML file's path or its content already read (a mapping of
    sections): a queued run carries the content, since a worker cannot read the submitter's
    files and an edit after submission must not change the run."""
    allowed = ProfileName.__args__
    if profile not in allowed:
        raise ConfigError(f"unknown profile {profile!r}", f"choose one of: {', '.join(allowed)}")
    tree = read_config_file(PROFILES_DIR / f"{profile}.yaml")
    tree["profile"] = profile
    if isinstance(config_file, dict):
        tree = _deep_merge(tree, config_file)
    elif config_file:
        tree = _deep_merge(tree, read_config_file(Path(config_file)))
    tree = _deep_merge(tree, _env_overrides(dict(os.environ if environ is None else environ)))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"config override {item!r} has no '='", "write overrides as section.field=value")
        dotted, raw = item.split("=", 1)
        _set_path(tree, dotted.strip(), yaml.safe_load(raw) if raw else raw)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        raise _format_validation_error(e, "the profile, --config file, GSTALKER_* variables or --set overrides") from None
