"""The `gstalker` command line.

`ingest` runs one core stage in-process (no orchestrator needed); `train` runs the
train-speaker flow locally (against the Prefect server in PREFECT_API_URL, or a temporary
one). Errors meant for the user print as "error: ... / fix: ..." with exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from flows import HEARTBEAT_FREQUENCY_S
from gstalker_core import __version__
from gstalker_core.config import PipelineConfig, load_config
from gstalker_core.runtime import select_device
from gstalker_core.errors import ConfigError, GstalkerError

if TYPE_CHECKING:
    from tasks.stages import StageDisplay

app = typer.Typer(help="gstalker: audio-driven 3D Gaussian talking heads.", pretty_exceptions_enable=False,
                  no_args_is_help=True, add_completion=False)
store_app = typer.Typer(help="Inspect the artifact store.", no_args_is_help=True)
config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)
app.add_typer(store_app, name="store")
app.add_typer(config_app, name="config")
console = Console(stderr=True)
out = Console()

ProfileOpt = typer.Option("preview", "--profile", "-p", help="tiny | preview | paper")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML file layered over the profile")
SetOpt = typer.Option(None, "--set", "-s", help="override: section.field=value (repeatable)")
StoreOpt = typer.Option(None, "--store", help="store URL: s3://bucket/prefix or a directory (= --set store.url=...)")


def _config(profile: str, config_file: Optional[str], sets: Optional[list[str]], store: Optional[str]) -> PipelineConfig:
    return load_config(profile, config_file, _overrides(sets, store))


def _overrides(sets: Optional[list[str]], store: Optional[str]) -> list[str]:
    return [*(sets or []), *([f"store.url={store}"] if store else [])]


@contextmanager
def _progress(label: str) -> Iterator:
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextmanager
def _training_bars() -> Iterator[StageDisplay]:
    """A bar per training stage with the loss and PSNR of its latest step. Each is live only
    while its stage trains (the other stages' native libraries write straight to the terminal,
    across any live display), then stays on screen with the stage's final figures."""
    columns = (TextColumn("[bold]{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[figures]}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    # markup off: Prefect's log lines print through this console too, and must print as they are
    live_console = Console(stderr=True, markup=False)
    bars: dict[str, tuple[Progress, TaskID]] = {}

    def show(stage: str, done: int, total: Optional[int], info: dict) -> None:
        fields = dict(completed=done, total=total, figures=_figures(info))
        if stage in bars and bars[stage][0].live.is_started:
            bar, task = bars[stage]
            bar.update(task, **fields)
        else:  # the stage's first report, or a retry's
            bar = Progress(*columns, console=live_console)
            bar.start()
            bars[stage] = (bar, bar.add_task(stage, **fields))
        if done == total:
            bar.stop()

    with _prefect_logs_through(live_console):
        try:
            yield show
        finally:
            for bar, _ in bars.values():
                bar.stop()


def _figures(info: dict) -> str:
    """A step's figures for its bar: the loss, the PSNR of rendering steps, the landmark loss
    of deformation training (its first phase renders nothing, so it has no PSNR)."""
    parts = [f"loss {info['loss']:.4f}"]
    if "psnr" in info:
        parts.append(f"PSNR {info['psnr']:5.2f} dB")
    if "landmark loss" in info:
        parts.append(f"landmarks {info['landmark loss']:.3f}")
    return "  ".join(parts)


@contextmanager
def _prefect_logs_through(live_console: Console) -> Iterator[None]:
    """Prefect's console log handlers print through rich consoles of their own, straight across
    live bars; for the block they print through ``live_console`` (the bars'), above the bars."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(),
               *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    handlers = {h for logger in loggers for h in logger.handlers if isinstance(h, PrefectConsoleHandler)}
    own = {h: h.console for h in handlers}
    for h in handlers:
        h.console = live_console
    try:
        yield
    finally:
        for h, prefect_console in own.items():
            h.console = prefect_console


def _version(value: bool) -> None:
    if value:
        out.print(f"gstalker {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version")):
    pass


@app.command()
def ingest(video: str = typer.Argument(..., help="local path or s3:// URL of the speaker video"),
           profile: str = ProfileOpt, config: Optional[str] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
           store: Optional[str] = StoreOpt) -> None:
    """Probe, validate and crop a speaker video into the store (cached by content)."""
    from gstalker_core import ingest as ingest_stage
    from gstalker_core.storage import open_store

    cfg = _config(profile, config, set_, store)
    with _progress("ingest") as progress:
        run = ingest_stage.run(open_store(cfg), video, cfg, progress=progress)
    meta = run.manifest.meta
    out.print(f"ingest {'cache hit' if run.cache_hit else 'done'}: stages/ingest/{run.manifest.key} in {cfg.store_url}")
    out.print(f"  {meta['n_frames']} frames at {meta['fps']} fps, {meta['resolution']} px, crop {meta['crop']}, "
              f"audio {meta['audio_duration_s']:.2f} s")
    for warning in meta.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}")


@app.command()
def inspect(video: str = typer.Argument(..., help="local path or s3:// URL of the speaker video"),
            output: Optional[str] = typer.Option(None, "--output", "-o", help="where to copy the QA video (.mp4)"),
            profile: str = ProfileOpt, config: Optional[str] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
            store: Optional[str] = StoreOpt) -> None:
    """Ingest and track a video (cached), then write its QA video: landmarks, head axes, masks."""
    import shutil

    from gstalker_core import ingest as ingest_stage
    from gstalker_core import tracking
    from gstalker_core.storage import fetch_part, open_store

    cfg = _config(profile, config, set_, store)
    st = open_store(cfg)
    with _progress("ingest") as progress:
        clip = ingest_stage.run(st, video, cfg, progress=progress).manifest
    with _progress("track and parse") as progress:
        tracks = tracking.run(st, clip, cfg, progress=progress).manifest
    meta = tracking.manifest_of(tracks)
    qa = fetch_part(st, tracks, tracking.QA_VIDEO, cfg.cache_dir)
    dest = output or f"{Path(video).stem}-qa.mp4"
    shutil.copyfile(qa, dest)
    out.print(f"QA video: {dest}  (stored at stages/track/{tracks.key}/)")
    out.print(f"  landmarks: {meta.landmark_backend} ({meta.landmark_topology}), "
              f"focal {meta.focal:.1f} px (fov {meta.fov_deg:.1f} deg), reprojection error "
              f"{meta.reprojection_error_px:.2f} px, jitter {meta.jitter_raw_px:.2f} -> {meta.jitter_smoothed_px:.2f} "
              f"px/frame^2, {meta.n_valid}/{meta.n_frames} frames tracked")
    for warning in meta.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


@app.command()
def train(video: str = typer.Argument(..., help="local path or s3:// URL of the speaker video"),
          speaker: str = typer.Option(..., "--speaker", help="speaker name: lower-case letters, digits, - and _"),
          profile: str = ProfileOpt, config: Optional[str] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
          store: Optional[str] = StoreOpt) -> None:
    """Run the train-speaker flow locally for one video."""
    from gstalker_core.config import read_config_file
    from gstalker_core.naming import validate_speaker

    validate_speaker(speaker)
    cfg = _config(profile, config, set_, store)  # fail on bad config before starting Prefect
    select_device(cfg.runtime)  # and on a device this machine lacks, before any stage runs
    _check_prefect_api()
    from flows.train_speaker import train_speaker
    from tasks.stages import progress_shown_by

    with _training_bars() as bars, progress_shown_by(bars), _local_prefect_errors():
        keys = train_speaker(video=video, speaker=speaker, profile=profile, overrides=_overrides(set_, store),
                             config=read_config_file(Path(config)) if config else None)
    _print_evaluation(cfg, keys["evaluate"])
    table = Table("stage", "content key", title=f"train-speaker {speaker}")
    for stage, key in keys.items():
        table.add_row(stage, key)
    out.print(table)


def _print_evaluation(cfg: PipelineConfig, key: str) -> None:
    """The evaluation a training run made: its table, and where its video and plot are."""
    from gstalker_core import evaluate
    from gstalker_core.storage import find_stage, open_store

    store = open_store(cfg)
    run = find_stage(store, evaluate.STAGE, key)
    report = evaluate.EvalReport.model_validate(run.meta)
    columns, rows = report.table()
    # a column per method: eleven metric columns do not fit a terminal, four methods do
    table = Table("", *(row[0] for row in rows), title="held-out evaluation", caption=report.caption())
    for i, metric in enumerate(columns[1:], 1):
        table.add_row(metric, *(row[i] for row in rows))
    out.print(table)
    for what, part in ((f"side-by-side video ({' / '.join(evaluate.VIDEO_PANELS)})", evaluate.VIDEO),
                       ("per-frame curves", evaluate.PLOT)):
        stored = run.parts[part].key
        out.print(f"{what}: {store.local_path(stored) or f'{cfg.store_url}/{stored}'}", highlight=False,
                  soft_wrap=True)  # a path broken over lines is no path to copy


def _check_prefect_api() -> None:
    """A PREFECT_API_URL that does not answer is the user's to fix, before any stage runs."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        from flows.submit import prefect_api

        with prefect_api() as client:
            client.hello()


@contextmanager
def _local_prefect_errors() -> Iterator[None]:
    """Without PREFECT_API_URL, Prefect starts a temporary server (main() gives it time); if
    that still fails, say so and how to avoid it instead of Prefect's traceback."""
    try:
        yield
    except RuntimeError as err:
        if "ephemeral Prefect API server" not in str(err):
            raise
        raise ConfigError(f"Prefect's temporary local server did not start: {err}",
                          "start one server and reuse it: `prefect server start &` then "
                          "`export PREFECT_API_URL=http://127.0.0.1:4200/api`, or raise "
                          f"{EPHEMERAL_TIMEOUT_ENV} (now {os.environ.get(EPHEMERAL_TIMEOUT_ENV)} s)") from None


@app.command()
def dub(audio: str = typer.Argument(..., help="audio file (wav/mp3/m4a/..., or a video's sound), path or s3:// URL"),
        speaker: str = typer.Option(..., "--speaker", help="a trained speaker"),
        output: Optional[str] = typer.Option(None, "--output", "-o", help="also write the mp4 here"),
        profile: str = ProfileOpt, config: Optional[str] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
        store: Optional[str] = StoreOpt) -> None:
    """Make a trained speaker say AUDIO: an mp4 with the audio, in the store (cached) and at --output."""
    import shutil
    import time

    from gstalker_core import dub as dubbing
    from gstalker_core.naming import validate_speaker
    from gstalker_core.storage import open_store

    validate_speaker(speaker)
    cfg = _config(profile, config, set_, store)
    select_device(cfg.runtime)
    st = open_store(cfg)
    start = time.perf_counter()
    with _progress(f"dub {speaker}") as progress:
        result = dubbing.run(st, speaker, audio, cfg, progress=progress)
    if result.cache_hit:
        out.print(f"already rendered: {result.key} in {cfg.store_url}")
    else:
        m = result.manifest
        out.print(f"rendered {m.n_frames} frames ({m.audio_duration_s:.2f} s of audio) at {m.resolution} px in "
                  f"{time.perf_counter() - start:.1f} s ({m.n_frames / m.render_s:.1f} frames/s), lip gain "
                  f"{m.lip_gain:.2f}: {result.key}")
    if output:
        local = st.local_path(result.key)
        if local is not None:
            shutil.copyfile(local, output)
        else:
            st.get_file(result.key, Path(output))
        out.print(f"  written to {output}")


@app.command()
def export(speaker: str = typer.Option(..., "--speaker", help="a trained speaker"),
           out_dir: Optional[str] = typer.Option(None, "--out", help="folder for the .ply files "
                                                 "(default: ./<speaker>-ply)"),
           at: Optional[float] = typer.Option(None, "--at", help="seconds into --audio: also the head deformed "
                                              "as the dub of that audio shows it then"),
           audio: Optional[str] = typer.Option(None, "--audio", help="audio file (path, s3:// URL or store key) "
                                               "that --at is a time of"),
           profile: str = ProfileOpt, config: Optional[str] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
           store: Optional[str] = StoreOpt) -> None:
    """Write a trained speaker's head and torso Gaussians as 3DGS .ply files (splat viewers),
    and with --audio and --at the head deformed at that time."""
    from gstalker_core.export import export_speaker
    from gstalker_core.naming import validate_speaker
    from gstalker_core.storage import open_store

    validate_speaker(speaker)
    cfg = _config(profile, config, set_, store)
    select_device(cfg.runtime)
    result = export_speaker(open_store(cfg), speaker, Path(out_dir or f"{speaker}-ply"), cfg, at, audio)
    at_frame = "" if result.frame is None else f" (the head at {at:g} s: dub frame {result.frame})"
    out.print(f"exported {speaker}{at_frame}:")
    for path in result.files:
        out.print(f"  {path}", highlight=False, soft_wrap=True)


@app.command()
def submit(video: str = typer.Argument(..., help="local path (uploaded to the store) or s3:// URL of the speaker video"),
           speaker: str = typer.Option(..., "--speaker", help="speaker name: lower-case letters, digits, - and _"),
           profile: str = ProfileOpt, config: Optional[str] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
           store: Optional[str] = StoreOpt) -> None:
    """Queue a training run on the train-speaker deployment (Prefect server in PREFECT_API_URL)."""
    from flows.submit import submit_training, ui_link

    sub = submit_training(video, speaker, profile, _overrides(set_, store), config)
    run = sub.run
    if not sub.created:
        out.print(f"already submitted with the same video and config: flow run {run.id} "
                  f"({run.state.name if run.state else 'pending'}); not queued again")
    elif sub.replaces is not None:
        out.print(f"submitted train-speaker for {speaker}: flow run {run.id}, replacing {sub.replaces.id} "
                  f"({sub.replaces.state.name}); stages it finished are reused")
    else:
        out.print(f"submitted train-speaker for {speaker}: flow run {run.id}")
    out.print(f"  {ui_link(run)}", highlight=False)


@app.command()
def status(run_id: Optional[str] = typer.Argument(None, help="flow run id (default: the 20 most recent runs)")) -> None:
    """Show the state of a submitted run, or of recent runs."""
    from flows.submit import read_run, recent_runs, ui_link

    runs = [read_run(run_id)] if run_id else recent_runs()
    table = Table("flow run", "name", "state", "started", "link")
    for run in runs:
        started = run.start_time.strftime("%Y-%m-%d %H:%M") if run.start_time else "-"
        table.add_row(str(run.id), run.name, run.state.name if run.state else "-", started, ui_link(run))
    out.print(table)


@app.command()
def setup(heartbeat_timeout: float = typer.Option(90.0, "--heartbeat-timeout",
                                                  help="seconds without a heartbeat before a run is Crashed"),
          max_attempts: int = typer.Option(3, "--max-attempts",
                                           help="runs per submission, the first included, before resubmitting stops")
          ) -> None:
    """Install (or update) the automations that crash and resubmit the runs of dead workers.
    Run it after `prefect deploy --all`, against the server in PREFECT_API_URL; idempotent."""
    from flows import automations
    from flows.submit import prefect_api

    with prefect_api() as client:
        for line in automations.install(client, heartbeat_timeout, max_attempts):
            out.print(line)


@store_app.command("ls")
def store_ls(prefix: str = typer.Argument("", help="key prefix, e.g. stages/ingest/"),
             profile: str = ProfileOpt, config: Optional[str] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
             store: Optional[str] = StoreOpt) -> None:
    """List keys in the artifact store."""
    from gstalker_core.storage import open_store

    st = open_store(_config(profile, config, set_, store))
    for key in st.list(prefix):
        out.print(key, highlight=False)


@config_app.command("show")
def config_show(profile: str = ProfileOpt, config: Optional[str] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
                store: Optional[str] = StoreOpt) -> None:
    """Print the effective configuration as YAML."""
    import yaml

    cfg = _config(profile, config, set_, store)
    out.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), highlight=False)


# Prefect gives its temporary server 20 s; on 2 cores with an empty PREFECT_HOME (a first run,
# creating its database) it needs about that, so first runs failed. A minute and a half is ample.
EPHEMERAL_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def main() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault(EPHEMERAL_TIMEOUT_ENV, "90")
    # beat as often as deployments do (prefect.yaml): the crash automation of `gstalker setup`
    # would take a local run on a shared server, beating at Prefect's default 180 s, for dead
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_FREQUENCY_S))
    try:
        app()
    except GstalkerError as e:
        console.print(f"[bold red]error:[/] {e.problem}", highlight=False)
        console.print(f"  [bold]fix:[/] {e.fix}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted: stages already published stay in the store; rerun to resume")
        sys.exit(130)
