"""Lip gain: undoing the fitted face field's shrinkage of the mouth's motion, per speaker and per utterance.

A field fitted to ambiguous targets (the same sound is said with a wider or a narrower mouth)
predicts their mean, and a voice it never heard moves it less again. Measured on
cnn_anchor_71s's preview model, by FaceMesh on the renders: dubbed with its own training audio
the mouth opened with 0.47x the real clip's spread, with another speaker's recording 0.39x,
while the tracked lip landmarks the field predicts kept 0.81x (the renders lose the rest: lips
a pixel apart do not read as open). The cure is a gain on the audio-driven part of the
motion, around the utterance's mean:

    deltas = r + gain * (field(code_t, eye_t) - r),
    r = field(mean code of the utterance, eye_t) + mean_t field(code_t, open) - field(mean code, open)

so the eyes, and whatever the field does the same for every sound, stay as trained, and the
utterance's mean motion stays as the field gives it. (Around the mean code's motion alone, the
field being non-linear in the code, a gain of 2.5 moved the whole held-out utterance: its mean
lip gap grew by a quarter, 0.072 to 0.091, against 0.081 around the mean motion.)

- **Speaker gain**, calibrated once on the training frames when the model is made
  (``calibrate``): training frames are rendered with their own audio at gains 1, 1.5, 2, ...,
  FaceMesh measures the rendered mouth opening and the real frames' opening; the speaker gain
  is where the rendered spread reaches the real one (linear between the gains tried).
- **Utterance factor**: a new voice can drive the field less than the training voice did. The
  field's predicted lip gap at the template's four mouth points (no rendering: four points a
  frame) has a spread over the utterance; the factor is the training audio's spread over this
  utterance's (normalisation per utterance, as log-mel's per band, at the level of the motion).

The gain of an utterance is speaker gain x utterance factor, within [1, ``max_gain``].

- **Rest in pauses**: where the voice pauses (``audio.speaking``), the mouth goes to the
  speaker's rest, the motion of the mean code of the training frames whose predicted lips are
  closest (``REST_SHARE`` of them, ``rest_code``). A speaker who breathes through an open mouth
  between sentences teaches the field that silence opens the mouth a little; in a new voice's
  pauses that reads as a mouth left hanging, and it was most of why cnn_anchor_71s's dubs
  followed new voices' loudness less than its own footage does (README, lip sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel

from ..config import TrackConfig
from ..data.conditions import FrameSource
from ..data.dataset import SpeakerDataset
from ..metrics import lipsync
from ..tracking.landmarks import MediapipeFaceMesh
from ..tracking.topology import FACEMESH
from ..deform.fields import DeformDeltas
from .talking_head import LipMotion, TalkingHead

TRIED_GAINS = (1.0, 1.5, 2.0, 2.5, 3.0)
MEAN_MOTION_FRAMES = 128  # of an utterance, evenly spaced, whose deltas make its mean motion
MEAN_MOTION_BLOCK = 16  # frames of deltas of every head Gaussian computed at once
MIN_FACE_SHARE = 0.5  # of the calibration frames, real and rendered, where FaceMesh must find the face
REST_SHARE = 0.05  # of the training frames, those with the narrowest predicted lip gap make the rest code


class LipGain(BaseModel):
    """A speaker's lip-gain calibration (in the bundle manifest)."""

    speaker_gain: float
    reference_spread: float  # the training audio's predicted lip-gap spread (``lip_spread``)
    lip_points: list[list[float]]  # template points: upper and lower inner lip, mouth corners (head frame)
    max_gain: float
    # what the calibration saw: real frames' mouth-opening spread, rendered spread at each gain tried
    frames: int
    real_spread: float | None
    rendered_spread: dict[str, float]
    note: str = ""
    rest_code: list[float] | None = None  # the audio code the mouth rests at in pauses; None: no rest


def lip_points(template: np.ndarray, topology) -> np.ndarray:
    """(4, 3) template points: upper and lower inner-lip midpoints, then the mouth corners."""
    return template[[*topology.lip_gap, *topology.mouth_corners]].astype(np.float32)


@torch.no_grad()
def lip_gaps(model: TalkingHead, codes: torch.Tensor, points: np.ndarray) -> torch.Tensor:
    """(T,) lip gap over mouth width that the face field predicts at the template's mouth
    ``points`` for the audio ``codes`` (T, code_dim), eyes open, gain 1."""
    field = model.face_field
    encoded = field.encode(torch.as_tensor(points, dtype=codes.dtype, device=codes.device))
    moved = torch.as_tensor(points, dtype=codes.dtype, device=codes.device) + field(
        encoded, codes, torch.ones(len(codes), dtype=codes.dtype, device=codes.device)).d_means
    return (moved[:, 0] - moved[:, 1]).norm(dim=-1) / (moved[:, 2] - moved[:, 3]).norm(dim=-1).clamp_min(1e-9)


def lip_spread(model: TalkingHead, codes: torch.Tensor, points: np.ndarray) -> float:
    """Spread (std over frames) of ``lip_gaps``."""
    return float(lip_gaps(model, codes, points).std()) if len(codes) > 1 else 0.0


def rest_code(model: TalkingHead, codes: torch.Tensor, points: np.ndarray) -> torch.Tensor:
    """(code_dim,) the mean of the training ``codes`` whose ``lip_gaps`` are the narrowest
    (``REST_SHARE`` of them, at least one)."""
    narrowest = lip_gaps(model, codes, points).argsort()[:max(1, round(REST_SHARE * len(codes)))]
    return codes[narrowest].mean(dim=0)


@torch.no_grad()
def mean_motion_shift(model: TalkingHead, codes: torch.Tensor) -> DeformDeltas:
    """(1, N_head, ...) deltas: the mean over the utterance ``codes`` (T, code_dim; at most
    ``MEAN_MOTION_FRAMES`` of them, evenly spaced) of the face field's deltas, minus the deltas of
    their mean code, eyes open."""
    picked = codes[torch.linspace(0, len(codes) - 1, min(MEAN_MOTION_FRAMES, len(codes)),
                                  device=codes.device).round().long()]
    field, encoded = model.face_field, model.face_field.encode(model.head.means)
    at_mean = field(encoded, codes.mean(dim=0, keepdim=True), torch.ones(1, dtype=codes.dtype, device=codes.device))
    totals = [torch.zeros_like(part) for part in at_mean.parts()]
    for block in picked.split(MEAN_MOTION_BLOCK):
        deltas = field(encoded, block, torch.ones(len(block), dtype=codes.dtype, device=codes.device))
        for total, part in zip(totals, deltas.parts()):
            total += part.sum(dim=0, keepdim=True)
    return DeformDeltas(*(total / len(picked) - part for total, part in zip(totals, at_mean.parts())))


@torch.no_grad()
def utterance_motion(model: TalkingHead, codes: torch.Tensor, calibration: LipGain | None,
                     fixed_gain: float | None = None) -> LipMotion:
    """The lip motion of an utterance whose audio codes are ``codes`` (T, code_dim), around its
    mean motion; the gain ``fixed_gain`` when given, else the calibrated speaker gain x
    utterance factor within [1, max gain] (1 for a model without calibration); the rest in
    pauses where the calibration has one."""
    if fixed_gain is not None:
        gain = float(fixed_gain)
    elif calibration is None:
        gain = 1.0
    else:
        spread = lip_spread(model, codes, np.asarray(calibration.lip_points, np.float32))
        factor = calibration.reference_spread / spread if spread > 0 else calibration.max_gain
        gain = float(np.clip(calibration.speaker_gain * factor, 1.0, calibration.max_gain))
    rest = None if calibration is None or calibration.rest_code is None else \
        torch.tensor(calibration.rest_code, dtype=codes.dtype, device=codes.device)
    return LipMotion(codes.mean(dim=0), gain, None if gain == 1.0 else mean_motion_shift(model, codes), rest)


def gain_reaching(target: float, gains: list[float], spreads: list[float]) -> float:
    """The gain at which the rendered spread, linear between the ``gains`` tried (ascending),
    first reaches ``target``: the first gain when it is already there, the last when none does."""
    if spreads[0] >= target:
        return gains[0]
    for (g0, s0), (g1, s1) in zip(zip(gains, spreads), zip(gains[1:], spreads[1:])):
        if s1 >= target:
            return g0 + (g1 - g0) * (target - s0) / (s1 - s0)
    return gains[-1]


@dataclass
class _Openings:
    values: list[float]

    def spread(self) -> float | None:
        found = [v for v in self.values if np.isfinite(v)]
        return float(np.std(found)) if len(found) >= max(2, MIN_FACE_SHARE * len(self.values)) else None


def _opening(detector: MediapipeFaceMesh, image: np.ndarray) -> float:
    points = detector.detect(image)
    return np.nan if points is None else float(lipsync.mouth_opening(points[None], FACEMESH)[0])


@torch.no_grad()
def calibrate(model: TalkingHead, train: SpeakerDataset, source: FrameSource, track_cfg: TrackConfig,
              n_frames: int, max_gain: float, batch_frames: int = 8) -> LipGain:
    """The speaker gain of ``model`` measured on ``n_frames`` training frames spread over the clip
    (each with its own audio, pose, blink and torso latent; frames whose mouth is covered left
    out), the training audio's spread and the speaker's rest code."""
    a = train.arrays
    points = lip_points(a.template, train.topology)
    train_frames = train.indices  # ascending
    codes = model.audio_encoder.conditions(source.features, 0, int(train_frames[-1]) + 1)[
        torch.as_tensor(train_frames, device=source.device)]
    reference, shift = codes.mean(dim=0), mean_motion_shift(model, codes)
    picked = train.drawn[np.linspace(0, len(train.drawn) - 1, min(n_frames, len(train.drawn))).round().astype(int)]
    gains = [g for g in TRIED_GAINS if g <= max_gain]
    # FaceMesh in video mode carries each image's landmarks to the next: one detector per stream
    # of images (the real frames, each gain's renders), as the evaluation keeps one per panel
    detectors = {stream: MediapipeFaceMesh(track_cfg) for stream in ["real", *gains]}
    try:
        real = _Openings([_opening(detectors["real"], train.sample(int(t)).rgb.numpy()) for t in picked])
        rendered = {g: _Openings([]) for g in gains}
        canonical = model.canonical_codes()
        for first in range(0, len(picked), batch_frames):
            batch = picked[first:first + batch_frames]
            cond = source.conditions(model, batch, track=batch)
            for g in gains:
                head, torso = model.frames(cond, codes=canonical, lip=LipMotion(reference, g, shift))
                rgb = source.render(head, torso, batch).rgb.clamp(0, 1)
                images = (rgb * 255).round().byte().cpu().numpy()
                rendered[g].values.extend(_opening(detectors[g], image) for image in images)
    finally:
        for detector in detectors.values():
            detector.close()
    real_spread = real.spread()
    spreads = {g: o.spread() for g, o in rendered.items()}
    common = dict(reference_spread=lip_spread(model, codes, points), lip_points=points.tolist(), max_gain=max_gain,
                  rest_code=rest_code(model, codes, points).tolist(),
                  frames=len(picked), real_spread=real_spread,
                  rendered_spread={f"{g:g}": s for g, s in spreads.items() if s is not None})
    if real_spread is None or any(s is None for s in spreads.values()):
        return LipGain(speaker_gain=1.0, note=f"FaceMesh found too few faces in the {len(picked)} calibration "
                                              f"frames (under {MIN_FACE_SHARE:.0%}): gain left at 1", **common)
    return LipGain(speaker_gain=gain_reaching(real_spread, gains, [spreads[g] for g in gains]), **common)
