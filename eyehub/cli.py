"""The `eyehub` command line: one verb per pipeline step.

This is the only module that imports every stage. It reads the environment once
(`Environment.from_environ`), runs every command with a log file (`eyehub.logs`: the
terminal shows eyehub's own progress and results, everything else goes to
`<EYEHUB_HOME>/logs/`), turns `EyehubError`s into one-line messages with documented exit
codes and any other exception into one line naming the log file that holds its traceback,
and owns the user-facing output (rich progress bars, summaries).
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from typer.core import TyperCommand

from eyehub import __version__, logs
from eyehub.errors import EyehubError
from eyehub.settings import Environment

if TYPE_CHECKING:
    from eyehub.synth import CohortSummary
    from ingest import HubKey, IngestSettings, IngestSummary
    from preprocess import PreprocessSummary, Recipe
    from training.config import TrainConfig
    from training.run import TrainSettings, TrainSummary

DEMO_PATIENTS = 120  # enough for the demo model's validation and test splits
DEMO_BASELINE_EPOCHS = 3  # the demo's short run, compared with the full one

app = typer.Typer(
    name="eyehub",
    help="Imaging AI pipeline for retinal OCT and fundus photographs.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# soft_wrap: long lines (paths) are left for the terminal to wrap, never broken by rich
console = Console(stderr=False, soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_QUARANTINED = 3
EXIT_INTERRUPTED = 130

# The reason code (ingest quarantine, preprocess ungradable) of a programming error inside a
# worker; its traceback is in the log file (eyehub.reasons).
INTERNAL_ERROR = "internal_error"


class LoggedCommand(TyperCommand):
    """A command that runs inside `logs.command_output`, once its arguments are parsed (so
    `--help` and usage errors print to the terminal as usual and write no log file).

    The log file goes under the command's `--home` where it has one (the demo), else under
    `$EYEHUB_HOME`."""

    def invoke(self, ctx: Any) -> Any:  # a click Context (typer vendors its own click)
        verbose = bool(ctx.find_root().params.get("verbose"))
        home = ctx.params.get("home") or Environment.from_environ().home
        with logs.command_output(Path(home), verbose=verbose, console=err_console):
            return super().invoke(ctx)


def _version(value: bool) -> None:
    if value:
        console.print(f"eyehub {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Also show debug detail and other libraries' output (Ray's included), "
            "which otherwise only go to the log file under $EYEHUB_HOME/logs.",
        ),
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    """Imaging AI pipeline for retinal OCT and fundus photographs."""


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
        # while descriptor 2 is the log file, what libraries write to sys.stderr belongs
        # there, not above the bar
        redirect_stderr=not logs.stderr_redirected(),
    )


@contextmanager
def _progress(
    description: str, unit: str, total: int | None = None
) -> Iterator[Callable[[int, int | None], None]]:
    """A progress bar for one step; yields `update(done, total=None)`."""
    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task(description, total=total, rate="")

        def update(done: int, new_total: int | None = None) -> None:
            rate = f"{done / max(time.perf_counter() - start, 1e-9):.1f} {unit}/s"
            if new_total is not None:
                bar.update(task, completed=done, total=new_total, rate=rate)
            else:
                bar.update(task, completed=done, rate=rate)

        yield update


def _log_file_text() -> str:
    path = logs.current_log_file()
    return str(path) if path is not None else "the log (no log file could be written)"


# -- the steps, shared by the verbs and the demo: run with a progress bar, print a summary --


def _run_synth(
    out_dir: Path, *, patients: int, seed: int, size: str, workers: int | None
) -> CohortSummary:
    from eyehub.synth import generate_cohort
    from eyehub.synth.cohort import validate_arguments

    validate_arguments(out_dir, patients, seed, size, workers)
    start = time.perf_counter()
    with _progress("synth", "patients", total=max(patients, 0)) as update:
        summary = generate_cohort(
            out_dir, patients, seed, size, workers, progress=lambda done: update(done, None)
        )
    print_synth_summary(summary, time.perf_counter() - start)
    return summary


def print_synth_summary(summary: CohortSummary, seconds: float) -> None:
    out_dir = summary.out_dir
    console.print(
        f"wrote {summary.files} DICOM files ({summary.bytes_written / 1e6:.1f} MB) for "
        f"{summary.patients} patients in {seconds:.1f} s"
    )
    console.print(f"  DICOM:  {out_dir / 'dicom'}")
    console.print(f"  labels: {out_dir / 'labels.csv'} ({summary.label_rows} rows)")
    console.print(
        f"  truth:  {out_dir / 'truth.csv'}   planted identifiers: {out_dir / 'phi.json'}"
    )


def _run_ingest(
    sources: list[Path],
    dataset: Path,
    *,
    key: HubKey,
    labels: Path | None,
    settings: IngestSettings,
) -> IngestSummary:
    from ingest import run_ingest

    with _progress("ingest", "files") as update:
        summary = run_ingest(
            sources,
            dataset,
            key,
            labels,
            settings,
            on_start=lambda total: update(0, total),
            on_progress=lambda done: update(done, None),
        )
    print_ingest_summary(summary, dataset)
    return summary


def print_ingest_summary(summary: IngestSummary, dataset: Path) -> None:
    console.print(
        f"{summary.files} files in {summary.seconds:.1f} s: {summary.converted} converted, "
        f"{summary.present} already present, {summary.quarantined_total} quarantined"
        + (f", {summary.ignored} ignored (DICOMDIR)" if summary.ignored else "")
        + (f" on {len(summary.nodes)} Ray node(s)" if summary.nodes else "")
        + (f"; {n} decoded on the GPU" if (n := summary.nvimgcodec["gpu"]) else "")
        + (f"; {n} by nvImageCodec's CPU backends" if (n := summary.nvimgcodec["cpu"]) else "")
    )
    for reason, count in sorted(summary.quarantined.items()):
        console.print(f"  quarantined {count:>5}  {reason}")
    internal = summary.quarantined.get(INTERNAL_ERROR, 0)
    if internal:
        console.print(
            f"{internal} file(s) hit an internal error; tracebacks are in {_log_file_text()}"
        )
    console.print(f"dataset: {dataset}  ({summary.catalog_rows} scans in catalog.parquet)")
    if summary.quarantined_total:
        console.print(f"see {dataset / 'quarantine.parquet'} for what to do about each")


def _run_preprocess(
    dataset: Path,
    *,
    recipe: Recipe,
    device: str,
    workers: int,
    ray_address: str | None,
) -> PreprocessSummary:
    from preprocess import run_preprocess

    with _progress("preprocess", "scans") as update:
        summary = run_preprocess(dataset, recipe, device, workers, ray_address, on_progress=update)
    print_preprocess_summary(summary, recipe)
    return summary


def print_preprocess_summary(summary: PreprocessSummary, recipe: Recipe) -> None:
    console.print(
        f"recipe {summary.recipe_id} ({recipe.name}) on {summary.device}: {summary.scans} scans, "
        f"{summary.prepared} prepared, {summary.already_done} already done, "
        f"{sum(summary.ungradable.values())} ungradable in {summary.seconds:.1f} s"
    )
    for reason, count in sorted(summary.ungradable.items()):
        console.print(f"  ungradable {count:>5}  {reason}")
    internal = summary.ungradable.get(INTERNAL_ERROR, 0)
    if internal:
        console.print(
            f"{internal} scan(s) hit an internal error; tracebacks are in {_log_file_text()}"
        )
    console.print(f"  tensors: {summary.zarr_path}")
    console.print(f"  index:   {summary.parquet_path}")


def _run_train(config: TrainConfig, dataset: Path, *, settings: TrainSettings) -> TrainSummary:
    from rich.live import Live
    from rich.text import Text

    from training.run import run_training

    state: dict[str, Any] = {}
    status = Text("starting Ray Train ...")

    def on_progress(event: dict[str, Any]) -> None:
        state.update(event)
        line = f"epoch {state.get('epoch', '?')}/{state.get('epochs', '?')}"
        if "step" in state:
            line += f"  step {state['step']}/{state.get('steps', '?')}"
        if "loss" in state:
            line += f"  loss {state['loss']:.4f}"
        if "samples_per_s" in state:
            line += f"  {state['samples_per_s']:.1f} samples/s"
        metric = config.early_stopping_metric
        if metric in state:
            line += f"  {metric} {state[metric]:.3f}"
        status.plain = line

    with Live(status, console=err_console, refresh_per_second=4, transient=False):
        summary = run_training(
            config,
            dataset,
            settings,
            on_progress=on_progress,
            on_note=lambda text: console.print(text),
        )
    print_train_summary(config, summary)
    from inference.card import write_model_card

    cards = settings.home / "model_cards"
    name, version = summary.model_name, summary.model_version
    markdown, _ = write_model_card(name, version, summary.tracking_uri, cards)
    console.print(f"model card: {markdown.resolve()} (and .html; also the version's description)")
    return summary


def print_train_summary(config: TrainConfig, summary: TrainSummary) -> None:
    from rich.table import Table

    split = summary.split
    if split is not None:
        console.print(
            "split (patients/samples, ungradable left out): "
            + ", ".join(
                f"{s} {split.patients[s]}/{split.samples[s]} ({split.ungradable[s]})"
                for s in ("train", "val", "test")
            )
        )
    table = Table(title=f"test metrics ({config.name}, best epoch {summary.best_epoch})")
    for column in ("task", "metric", "value", "95% CI"):
        table.add_column(column)
    for key, value in sorted(summary.metrics.items()):
        parts = key.split("/")
        if len(parts) != 3 or parts[2] in ("n", "n_patients", "positives"):
            continue
        low = summary.metrics.get(f"{key}/ci_low")
        high = summary.metrics.get(f"{key}/ci_high")
        ci = f"{low:.3f}-{high:.3f}" if low is not None and high is not None else ""
        table.add_row(parts[1], parts[2], f"{value:.3f}", ci)
    console.print(table)
    for text in summary.warnings:
        console.print(f"[bold yellow]warning:[/] {text}", highlight=False)
    console.print(
        f"MLflow run {summary.run_id} (experiment {summary.experiment}) at {summary.tracking_uri}"
    )
    console.print(
        f"registered model {summary.model_name} version {summary.model_version}, alias "
        f"candidate: models:/{summary.model_name}@candidate"
    )
    console.print(f"model directory: {summary.model_dir}   ({summary.seconds:.0f} s)")


# -- the verbs --


@app.command(cls=LoggedCommand)
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the cohort into.")],
    patients: Annotated[int, typer.Option(help="Number of patients.")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 0,
    size: Annotated[
        str, typer.Option(help="Image sizes: 'small' (tests) or 'realistic' (device sizes).")
    ] = "small",
    workers: Annotated[
        int | None, typer.Option(help="Processes to render with (default: all CPUs).")
    ] = None,
) -> None:
    """Write a synthetic ophthalmic DICOM cohort (fundus OP/SC/XC + OCT OPT) and labels.csv."""
    _run_synth(out_dir, patients=patients, seed=seed, size=size, workers=workers)


@app.command(cls=LoggedCommand)
def keygen(
    path: Annotated[Path, typer.Argument(help="Where to write the new key file (mode 0600).")],
) -> None:
    """Write a new secret pseudonymisation key. Keep it out of the repository and backed up:
    a lost key means new pseudonyms for everyone."""
    from ingest import generate_key_file

    generate_key_file(path)
    console.print(f"wrote a new key to {path} (mode 0600)")


@app.command(cls=LoggedCommand)
def ingest(
    sources: Annotated[list[Path], typer.Argument(help="DICOM files or folders (any names).")],
    out: Annotated[Path, typer.Option("--out", help="The dataset directory to write.")],
    labels: Annotated[
        Path | None, typer.Option(help="labels.csv keyed by mrn, eye, study_date.")
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option(help="Hub secret key (default: $EYEHUB_KEY_FILE).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Files converted at once.")] = 2,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else this machine)."),
    ] = None,
    executor: Annotated[
        str,
        typer.Option(
            help="auto: Ray with a cluster address, else worker processes on this machine "
            "(no Ray start-up); local or ray to choose."
        ),
    ] = "auto",
    max_decoded_bytes: Annotated[
        str, typer.Option(help="Quarantine scans whose decoded size exceeds this (e.g. 4GiB).")
    ] = "4GiB",
    gpu_decode: Annotated[
        str,
        typer.Option(
            help="auto: JPEG 2000 and JPEG decode on a CUDA GPU (nvImageCodec) where this "
            "machine has one, lossless bit-exact; off: always on the CPU."
        ),
    ] = "auto",
) -> None:
    """De-identify DICOM into a dataset: OME-Zarr scans, catalog.parquet, quarantine.parquet.

    Exit status: 0 every input converted or already present; 3 some inputs quarantined
    (see quarantine.parquet); 2 usage error (bad arguments, missing key).
    """
    from eyehub.errors import UsageError
    from ingest import IngestSettings, load_key, parse_size
    from ingest.gpu_decode import MODES
    from ingest.run import EXECUTORS

    env = Environment.from_environ()
    key = load_key(key_file or env.key_file)
    if executor not in EXECUTORS:
        raise UsageError(f"--executor must be auto, local or ray (got {executor!r})")
    if gpu_decode not in MODES:  # nvimgcodec-cpu too: a mode for tests, not advertised
        raise UsageError(f"--gpu-decode must be auto or off (got {gpu_decode!r})")
    settings = IngestSettings(
        workers=workers,
        max_decoded_bytes=parse_size(max_decoded_bytes),
        ray_address=ray_address or env.ray_address,
        executor=executor,
        gpu_decode=gpu_decode,
    )
    summary = _run_ingest(sources, out, key=key, labels=labels, settings=settings)
    if summary.quarantined_total:
        raise typer.Exit(EXIT_QUARANTINED)


@app.command(cls=LoggedCommand)
def preprocess(
    dataset: Annotated[Path, typer.Argument(help="A dataset directory written by ingest.")],
    recipe: Annotated[
        str,
        typer.Option(
            help="A shipped recipe's name (default, small: configs/preprocess/) "
            "or the path of a recipe YAML file."
        ),
    ] = "default",
    device: Annotated[str, typer.Option(help="auto | cuda | cpu")] = "auto",
    workers: Annotated[int, typer.Option(help="Ray Data actors (one GPU each on CUDA).")] = 2,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else local).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe key: fundus.size=384")
    ] = None,
) -> None:
    """Prepare training-ready tensors: prepared/<recipe_id>.zarr and .parquet."""
    from eyehub.configs import resolve_config
    from eyehub.settings import load_settings
    from preprocess import Recipe

    env = Environment.from_environ()
    settings = load_settings(Recipe, resolve_config("preprocess", recipe), set_ or [])
    _run_preprocess(
        dataset,
        recipe=settings,
        device=device,
        workers=workers,
        ray_address=ray_address or env.ray_address,
    )


@app.command(cls=LoggedCommand)
def train(
    config: Annotated[
        str,
        typer.Option(
            "--config",
            help="A shipped training config's name (fundus_demo: configs/train/) or a YAML path.",
        ),
    ],
    dataset: Annotated[Path, typer.Option("--dataset", help="A dataset written by ingest.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key: training.epochs=3"),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else local).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Ray Train workers (DDP).")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs per worker (0: CPU).")] = 0.0,
    resume: Annotated[
        bool | None,
        typer.Option(
            "--resume/--new-run",
            help="Continue the run of this config and dataset (default when it did not "
            "finish) or start a new one.",
        ),
    ] = None,
) -> None:
    """Train, evaluate and register a model: Ray Train, tracked in MLflow (docs/training.md).

    Prepares the dataset with the config's recipe first when needed. Prints the MLflow run,
    the registered model and version, and the test metrics with their 95% CIs.
    """
    from training.config import load_train_config
    from training.run import TrainSettings

    env = Environment.from_environ()
    resolved = load_train_config(config, set_ or [])
    _run_train(
        resolved,
        dataset,
        settings=TrainSettings(
            home=env.home,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            ray_address=ray_address or env.ray_address,
            tracking_uri=env.tracking_uri,
            resume=resume,
        ),
    )


def _model_and_scorer(
    model: str, key_file: Path | None, explain_task: str | None, device: str
) -> tuple[Any, Any]:
    """The loaded model and its Scorer, with the hub key (or a per-run key, said so)."""
    from inference.registry import load_model
    from inference.score import Scorer
    from ingest import HubKey, load_key

    env = Environment.from_environ()
    path = key_file or env.key_file
    if path is not None:
        key = load_key(path)
    else:
        import secrets

        key = HubKey(secrets.token_bytes(32))
        console.print(
            "note: no hub key given (--key-file or EYEHUB_KEY_FILE); scans are named by "
            "pseudonyms that hold for this run only"
        )
    loaded = load_model(model, env.default_tracking_uri, env.home / "cache" / "models", device)
    described = loaded.describe()
    console.print(
        f"model {described['name']}"
        + (f" version {described['version']}" if described["version"] else "")
        + (f" (alias {described['alias']})" if described["alias"] else "")
        + f", {described['input']} input, recipe {described['recipe_id']}"
    )
    return loaded, Scorer(loaded, key, device=device, explain_task=explain_task)


def _write_exam(result: Any, loaded: Any, out: Path, sr: bool) -> list[Path]:
    """The exam's JSON, heat-map PNG(s) and (with `sr`) DICOM SR under `out`, named by the
    exam's pseudonym (a file name is never a patient identifier)."""
    import json

    from eyehub.storage import atomic_path, write_text_atomic
    from inference.heatmap import png_bytes

    out.mkdir(parents=True, exist_ok=True)
    written = []
    stem = result.scan
    write_text_atomic(out / f"{stem}.json", json.dumps(result.to_json(), indent=2))
    written.append(out / f"{stem}.json")
    for image in result.images:
        suffix = "" if len(result.images) == 1 else f"-{image.scan.modality}"
        path = out / f"{stem}{suffix}.png"
        with atomic_path(path) as tmp:
            tmp.write_bytes(png_bytes(image.overlay()))
        written.append(path)
    if sr:
        from inference.sr import build_sr

        report = build_sr(result, loaded)
        path = out / f"{stem}.sr.dcm"
        with atomic_path(path) as tmp:
            report.save_as(tmp, enforce_file_format=True)
        written.append(path)
    return written


def print_exam(result: Any, source: str) -> None:
    style = {"refer": "bold red", "routine": "bold green", "ungradable": "bold yellow"}
    decision = result.to_json()["decision"]
    console.print(f"[bold]{source}[/] ({result.eye} eye) scan {result.scan}", highlight=False)
    console.print(f"  [{style[decision]}]{result.headline()}[/]", highlight=False)
    for task in result.tasks:
        console.print(f"    {task.words()}", highlight=False)


@app.command(cls=LoggedCommand)
def score(
    scans: Annotated[
        list[Path] | None, typer.Argument(help="DICOM files of one or more patients' eyes.")
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="models:/eyehub-<name>@<alias>, models:/eyehub-<name>/<version>, or a "
            "model directory.",
        ),
    ] = "models:/eyehub-fundus_demo@champion",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Where results go (default: ./eyehub-scores; with --dataset a .parquet file "
            "or a directory, default DATASET/predictions/).",
        ),
    ] = None,
    sr: Annotated[
        bool, typer.Option("--sr", help="Also write a DICOM Structured Report per exam.")
    ] = False,
    pacs: Annotated[
        str | None,
        typer.Option(help="DICOMweb base URL of a PACS to fetch --study from (and store SRs to)."),
    ] = None,
    study: Annotated[
        str | None, typer.Option(help="Study Instance UID to score from --pacs.")
    ] = None,
    pacs_token_file: Annotated[
        Path | None, typer.Option(help="File holding a bearer token for the PACS.")
    ] = None,
    dataset: Annotated[
        Path | None,
        typer.Option(help="Score a whole ingested dataset with Ray Data into a Parquet instead."),
    ] = None,
    explain_task: Annotated[
        str | None, typer.Option(help="The task the heat map explains (default: primary).")
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option(help="Hub secret key, for scan pseudonyms ($EYEHUB_KEY_FILE).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto")] = "cpu",
    workers: Annotated[int, typer.Option(help="--dataset: Ray Data scoring actors.")] = 2,
    batch_size: Annotated[int, typer.Option(help="--dataset: scans per model call.")] = 16,
    ray_address: Annotated[
        str | None, typer.Option(help="--dataset: Ray cluster address (default: local).")
    ] = None,
) -> None:
    """Score scans: calibrated risks, decisions in words, heat maps (and DICOM SR).

    Per exam it writes SCAN.json (the result), SCAN.png (the heat map over the scan; for an
    OCT the B-scan that mattered most) and with --sr SCAN.sr.dcm, named by the scan's
    keyed pseudonym. Exit status: 0 every scan scored (ungradable ones included); 3 some
    files were refused (not DICOM, not a scan the model takes); 2 usage error.
    """
    from eyehub.errors import EyehubError, UsageError

    env = Environment.from_environ()
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dataset is not None:
        if scans or pacs:
            raise UsageError("--dataset scores a whole dataset; give no files and no --pacs")
        from inference.batch import score_dataset

        with _progress("score", "scans") as update:
            summary = score_dataset(
                dataset,
                model,
                tracking_uri=env.default_tracking_uri,
                cache=env.home / "cache" / "models",
                out=out,
                workers=workers,
                batch_size=batch_size,
                device=device,
                ray_address=ray_address or env.ray_address,
                on_progress=update,
                on_note=lambda text: console.print(text, highlight=False),
            )
        version = f" version {summary.model_version}" if summary.model_version else ""
        console.print(
            f"{summary.model_name}{version} on {summary.device}: {summary.scans} "
            "rows in "
            f"{summary.seconds:.1f} s, {summary.scored} scored, {summary.ungradable} ungradable"
            + (" (dataset prepared with the model's recipe first)" if summary.prepared else "")
        )
        for reason, count in sorted(summary.reasons.items()):
            console.print(f"  ungradable {count:>5}  {reason}")
        if summary.unpaired:
            console.print(f"  {summary.unpaired} OCT volume(s) without a linked photograph")
        console.print(f"predictions: {summary.path}")
        return
    if (pacs is None) != (study is None):
        raise UsageError("--pacs and --study go together")
    if pacs is None and not scans:
        raise UsageError("give DICOM files to score, --pacs URL --study UID, or --dataset")
    token = pacs_token_file.read_text().strip() if pacs_token_file is not None else None
    loaded, scorer = _model_and_scorer(model, key_file, explain_task, device)
    out = out or Path("eyehub-scores")
    sources: list[tuple[str, Path | bytes]]
    if pacs is not None:
        from inference.pacs import retrieve_study

        assert study is not None
        fetched = retrieve_study(pacs, study, token)
        console.print(f"retrieved {len(fetched)} instance(s) of the study from the PACS")
        sources = [(f"instance {i + 1}", b) for i, b in enumerate(fetched)]
    else:
        sources = [(str(p), p) for p in scans or []]
    # one file at a time (a folder of volumes never sits in memory whole), except for a
    # fusion model, which pairs each eye's photograph and OCT first
    batches = [sources] if loaded.model.spec.input == "fusion" else [[s] for s in sources]
    refused, scored, reports = 0, 0, []
    for batch in batches:
        read = []
        for label, source in batch:
            try:
                read.append((label, scorer.read(source)))
            except EyehubError as exc:
                refused += 1
                reason = getattr(exc, "reason", type(exc).__name__)
                console.print(f"[bold yellow]refused[/] {label}: {reason}: {exc}", highlight=False)
        labels = {id(scan): label for label, scan in read}
        exams, refusals = scorer.partition([scan for _, scan in read])
        for group, error in refusals:
            names = ", ".join(labels[id(scan)] for scan in group)
            if pacs is not None and error.reason == "wrong_modality":  # studies hold both kinds
                console.print(f"skipped {names}: {group[0].modality} scan", highlight=False)
                continue
            refused += len(group)
            console.print(
                f"[bold yellow]refused[/] {names}: {error.reason}: {error}", highlight=False
            )
        for result in scorer.score_exams(exams):
            written = _write_exam(result, loaded, out, sr)
            scored += 1
            print_exam(result, ", ".join(labels[id(i.scan)] for i in result.images))
            for path in written:
                console.print(f"    -> {path}", highlight=False)
            if sr:
                reports.append(written[-1])
    if pacs is not None and sr and reports:
        import pydicom

        from inference.pacs import store_instances

        store_instances(pacs, [pydicom.dcmread(p) for p in reports], token)
        console.print(f"stored {len(reports)} structured report(s) in the study on the PACS")
    console.print(f"{scored} exam(s) scored, {refused} file(s) refused; results in {out}")
    if refused:
        raise typer.Exit(EXIT_QUARANTINED)


@app.command(cls=LoggedCommand)
def serve(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="models:/eyehub-<name>@<alias> (followed when the alias moves), "
            "models:/eyehub-<name>/<version>, or a model directory.",
        ),
    ] = "models:/eyehub-fundus_demo@champion",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    max_upload_mb: Annotated[
        float, typer.Option(help="Uploads above this are refused with 413.")
    ] = 512,
    token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the API's bearer token (default: $EYEHUB_API_TOKEN)."),
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option(help="Hub secret key, for the audit's scan pseudonyms.")
    ] = None,
    reload_interval: Annotated[
        float, typer.Option(help="Seconds between looks at where the model's alias points.")
    ] = 30.0,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    ray_address: Annotated[
        str | None,
        typer.Option(help="Serve on Ray Serve at this cluster ('local' starts one) instead."),
    ] = None,
    replicas: Annotated[int, typer.Option(help="Ray Serve replicas (with --ray-address).")] = 1,
) -> None:
    """Serve scoring over HTTP: POST /v1/score, the clinician's page at /, /metrics, /docs."""
    import os

    from eyehub.errors import UsageError
    from inference.service import ServiceSettings, run_service

    env = Environment.from_environ()
    token = os.environ.get("EYEHUB_API_TOKEN") or None
    if token_file is not None:
        if not token_file.is_file():
            raise UsageError(f"--token-file {token_file} does not exist")
        token = token_file.read_text().strip() or None
    settings = ServiceSettings(
        model=model,
        tracking_uri=env.default_tracking_uri,
        cache=env.home / "cache" / "models",
        key_file=key_file or env.key_file,
        host=host,
        port=port,
        max_upload_mb=max_upload_mb,
        token=token,
        reload_interval_s=reload_interval,
        device=device,
        ray_address=ray_address,
        replicas=replicas,
    )
    run_service(settings, lambda line: console.print(line, highlight=False))


# -- review: compare tracked runs, promote behind a guard, model cards, MLflow's UI --------
# (inference/compare.py, promote.py, card.py, ui.py; docs/review.md)


@app.command(cls=LoggedCommand)
def compare(
    runs: Annotated[
        list[str],
        typer.Argument(
            help="Two or more runs: MLflow run ids, models:/eyehub-<name>/<version> or "
            "models:/eyehub-<name>@<alias>."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the report.")],
    task: Annotated[
        list[str] | None,
        typer.Option("--task", help="Compare this task only (repeatable; default: all shared)."),
    ] = None,
    format_: Annotated[
        str | None,
        typer.Option("--format", help="html | md | json (default: --out's suffix, else html)."),
    ] = None,
    bootstrap: Annotated[
        int | None,
        typer.Option(help="Patient bootstrap resamples (default: the first run's config's)."),
    ] = None,
) -> None:
    """Compare tracked runs on the test samples they share: metrics with CIs, paired
    differences (patient bootstrap, DeLong for AUROC), curves, subgroups (docs/review.md).

    The HTML report is one self-contained file; md and json hold the same content (the JSON
    is what a script gates on). Exit status: 0 compared; 2 usage error or unusable runs.
    """
    from eyehub.errors import UsageError
    from inference.compare import compare_runs, report_format, write_report

    fmt = report_format(out, format_)
    if bootstrap is not None and bootstrap < 1:
        raise UsageError(f"--bootstrap must be at least 1 (got {bootstrap})")
    env = Environment.from_environ()
    comparison = compare_runs(
        runs,
        env.default_tracking_uri,
        tasks=task,
        bootstrap=bootstrap,
        on_note=lambda text: err_console.print(text, highlight=False),
    )
    print_comparison(comparison.content)
    path = write_report(comparison, out, fmt)
    console.print(f"report ({fmt}): {path.resolve()}", highlight=False)


def print_comparison(content: dict[str, Any]) -> None:
    """Each task's main metric per run and each pair's difference, then the warnings."""
    from itertools import combinations

    from rich.table import Table

    from inference.compare import difference_text, interval, p_text

    labels = [r["label"] for r in content["runs"]]
    for r in content["runs"]:
        console.print(f"{r['label']}: {r['title']}  (run {r['run_id']})", highlight=False)
    pairs = list(combinations(labels, 2))
    table = Table(title="main metric per task, on the shared test samples (95% CI)")
    for column in ("task", "metric", *labels, *(f"{b} - {a}, p" for a, b in pairs)):
        table.add_column(column)
    for t in content["tasks"]:
        metric = t["main_metric"]
        if t["error"]:
            table.add_row(t["task"], metric, *(["-"] * (len(labels) + len(pairs))))
            continue
        found = {(c["first"], c["second"]): c for c in t["comparisons"] if c["metric"] == metric}
        cells = []
        for pair in pairs:
            c = found.get(pair)
            if c is None or "skipped" in c:
                cells.append("-")
                continue
            style = "bold" if c["significant"] else ""
            text = f"{difference_text(c)}, p {p_text(c)}"
            cells.append(f"[{style}]{text}[/]" if style else text)
        table.add_row(
            t["task"] + (" (primary)" if t["primary"] else ""),
            metric,
            *(interval(t["metrics"].get(label, {}).get(metric)) for label in labels),
            *cells,
        )
    console.print(table)
    for text in content["warnings"]:
        console.print(f"[bold yellow]warning:[/] {text}", highlight=False)


@app.command(cls=LoggedCommand)
def promote(
    name: Annotated[str, typer.Argument(help="The registered model, eyehub-<config name>.")],
    version: Annotated[str, typer.Option("--version", help="The version to promote.")],
    alias: Annotated[str, typer.Option(help="The alias to move to it.")] = "champion",
    metric: Annotated[
        str | None,
        typer.Option(
            help="The guard's metric, test/<task>/<metric> (default: the primary task's "
            "AUROC, QWK or MAE)."
        ),
    ] = None,
    margin: Annotated[
        float, typer.Option(help="How much worse than the alias's holder it may measure.")
    ] = 0.01,
    force: Annotated[
        bool, typer.Option("--force", help="Promote where the guard refuses (needs --reason).")
    ] = False,
    reason: Annotated[
        str | None, typer.Option(help="Why; recorded on the version (required with --force).")
    ] = None,
    bootstrap: Annotated[
        int | None,
        typer.Option(help="Patient bootstrap resamples (default: the version's config's)."),
    ] = None,
) -> None:
    """Move an alias (champion) to a registered version, behind a guard (docs/review.md).

    Refused when the version is worse than the alias's current holder on the guard's metric
    by more than --margin (point estimate on their shared test samples, paired patient
    bootstrap reported), or was tested on other samples. Records who, when, why and the
    comparison on the version, keeps the previous champion as @previous and writes the
    version's model card. Exit status: 0 promoted (or already there); 4 refused, nothing
    changed; 2 usage error.
    """
    from eyehub.errors import UsageError
    from inference.promote import comparison_text
    from inference.promote import promote as promote_version

    if bootstrap is not None and bootstrap < 1:
        raise UsageError(f"--bootstrap must be at least 1 (got {bootstrap})")
    env = Environment.from_environ()
    result = promote_version(
        name,
        version,
        env.default_tracking_uri,
        alias=alias,
        metric=metric,
        margin=margin,
        force=force,
        reason=reason,
        bootstrap=bootstrap,
        card_dir=env.home / "model_cards",
        on_note=lambda text: err_console.print(text, highlight=False),
    )
    console.print(result.summary(), highlight=False)
    if result.comparison is not None:
        console.print(f"  {comparison_text(result.comparison)}", highlight=False)
    for text in result.notes:
        console.print(f"  [bold yellow]note:[/] {text}", highlight=False)
    if result.card is not None:
        md, html = result.card
        console.print(f"model card: {md.resolve()} (and {html.name})", highlight=False)


@app.command(cls=LoggedCommand)
def card(
    name: Annotated[str, typer.Argument(help="The registered model, eyehub-<config name>.")],
    version: Annotated[str, typer.Option("--version", help="The registered version.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder to write it into (default: $EYEHUB_HOME/model_cards)."),
    ] = None,
) -> None:
    """Write a registered version's model card (Markdown and HTML), store it with the version
    and show it as the version's description in MLflow (docs/review.md)."""
    from inference.card import write_model_card

    env = Environment.from_environ()
    md, html = write_model_card(
        name, version, env.default_tracking_uri, out or env.home / "model_cards"
    )
    console.print(f"model card of {name} version {version}:", highlight=False)
    console.print(f"  {md.resolve()}", highlight=False)
    console.print(f"  {html.resolve()}", highlight=False)


@app.command(cls=LoggedCommand)
def ui(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    open_browser: Annotated[
        bool, typer.Option("--open", help="Also open it in the default browser.")
    ] = False,
) -> None:
    """MLflow's UI on the project's tracking store: runs, registered models, aliases.

    Runs `mlflow server` on $MLFLOW_TRACKING_URI, else $EYEHUB_HOME/mlflow.db, until Ctrl+C.
    """
    from inference.ui import run_ui

    env = Environment.from_environ()
    run_ui(
        env.default_tracking_uri,
        env.home,
        host=host,
        port=port,
        on_line=lambda text: console.print(text, highlight=False),
        open_browser=open_browser,
    )


@app.command(cls=LoggedCommand)
def demo(
    home: Annotated[
        Path | None,
        typer.Option(help="Where the demo writes (default: $EYEHUB_HOME or ./.eyehub)."),
    ] = None,
    patients: Annotated[int, typer.Option(help="Patients in the demo cohort.")] = DEMO_PATIENTS,
    train_model: Annotated[
        bool,
        typer.Option(
            "--train/--no-train",
            help="End by training two fundus_demo runs, comparing them, promoting through "
            "the guard and scoring a held-out patient's scan with the champion.",
        ),
    ] = True,
) -> None:
    """Run the pipeline end to end on a synthetic cohort with embedded defaults."""
    from eyehub.configs import resolve_config
    from eyehub.settings import load_settings
    from ingest import IngestSettings, generate_key_file, load_key
    from preprocess import Recipe

    env = Environment.from_environ()
    root = (home or env.home) / "demo"
    cohort = root / "cohort"
    dataset = root / "dataset"
    key_path = root / "hub.key"
    steps = 6 if train_model else 3
    console.rule(f"[bold]1/{steps} synth: a synthetic hospital export")
    _run_synth(cohort, patients=patients, seed=7, size="small", workers=None)
    console.rule(f"[bold]2/{steps} ingest: de-identify into an OME-Zarr dataset")
    if not key_path.exists():
        generate_key_file(key_path)
        console.print(
            f"created a demo pseudonymisation key at {key_path} (mode 0600); "
            "outside the demo, pass --key-file or set EYEHUB_KEY_FILE"
        )
    _run_ingest(  # quarantined inputs are reported in the summary; the demo goes on
        [cohort / "dicom"],
        dataset,
        key=load_key(key_path),
        labels=cohort / "labels.csv",
        settings=IngestSettings(workers=2),
    )
    console.rule(f"[bold]3/{steps} preprocess: training-ready tensors (recipe 'small')")
    _run_preprocess(
        dataset,
        recipe=load_settings(Recipe, resolve_config("preprocess", "small")),
        device="auto",
        workers=2,
        ray_address=None,
    )
    trained = None
    review: dict[str, Path] = {}
    if train_model:
        from training.config import load_train_config
        from training.run import TrainSettings

        train_settings = TrainSettings(home=(home or env.home), tracking_uri=env.tracking_uri)
        console.rule(
            f"[bold]4/{steps} train: a short baseline and the full fundus_demo run, "
            "tracked in MLflow and registered"
        )
        baseline = _run_train(
            load_train_config("fundus_demo", [f"training.epochs={DEMO_BASELINE_EPOCHS}"]),
            dataset,
            settings=train_settings,
        )
        trained = _run_train(load_train_config("fundus_demo"), dataset, settings=train_settings)
        console.rule(f"[bold]5/{steps} review: compare the two runs, promote through the guard")
        review = _demo_review(root, baseline, trained, home or env.home)
        console.rule(f"[bold]6/{steps} score: a held-out patient's scan with the champion")
        review["scored"] = _demo_score(root, trained, key_path, env)
    console.rule("[bold]done")
    console.print(f"demo outputs are under {root.resolve()}")
    console.print(f"  synthetic DICOM export: {(cohort / 'dicom').resolve()}")
    console.print(f"  de-identified dataset:  {dataset.resolve()} (scans.zarr, catalog.parquet)")
    console.print(f"  prepared tensors:       {(dataset / 'prepared').resolve()}")
    if trained is not None:
        console.print(
            f"  registered model:       models:/{trained.model_name}@candidate "
            f"(version {trained.model_version}); `eyehub ui` or MLflow at {trained.tracking_uri}"
        )
    if "report" in review:
        console.print(f"  comparison report:      {review['report']}")
        console.print(f"  champion's model card:  {review['card']} (and .html)")
    if "scored" in review:
        console.print(
            f"  held-out scan scored:   {review['scored']} (heat map and DICOM SR beside it)"
        )
        console.print(f"  serve it to clinicians: {_serve_hint(root, trained)}", highlight=False)
    console.print(f"  log of this run:        {_log_file_text()}")


def _demo_review(
    root: Path, baseline: TrainSummary, trained: TrainSummary, home: Path
) -> dict[str, Path]:
    """Compare the demo's two runs into a report, then promote each through the guard in
    turn (the first becomes champion unguarded when there is none; the full run only if
    the guard lets it), and write the champion's model card."""
    import mlflow

    from eyehub.errors import PromotionRefusedError
    from inference.card import write_model_card
    from inference.compare import compare_runs, write_report
    from inference.promote import comparison_text, promote

    name, uri = trained.model_name, trained.tracking_uri
    cards = home / "model_cards"
    references = [f"models:/{name}/{s.model_version}" for s in (baseline, trained)]
    comparison = compare_runs(references, uri)
    print_comparison(comparison.content)
    report = write_report(comparison, root / "comparison.html")
    for summary, why in ((baseline, "demo: the short baseline"), (trained, "demo: the full run")):
        try:
            result = promote(name, summary.model_version, uri, reason=why, card_dir=cards)
            console.print(result.summary(), highlight=False)
            if result.comparison:
                console.print("  " + comparison_text(result.comparison), highlight=False)
        except PromotionRefusedError as exc:
            console.print(f"[bold yellow]guard:[/] {exc}", highlight=False)
    champion = mlflow.MlflowClient(uri).get_model_version_by_alias(name, "champion").version
    markdown, _ = write_model_card(name, champion, uri, cards)
    return {"report": report.resolve(), "card": markdown.resolve()}


def _serve_hint(root: Path, trained: TrainSummary | None) -> str:
    token_file = (root / "api-token").resolve()
    name = trained.model_name if trained is not None else "eyehub-fundus_demo"
    return (
        f"eyehub serve --model models:/{name}@champion --token-file {token_file} "
        f"(page at http://127.0.0.1:8080/, API token {token_file.read_text().strip()})"
    )


def _demo_score(root: Path, trained: TrainSummary, key_path: Path, env: Environment) -> Path:
    """The demo's last step: the trained version becomes `champion` when there is none
    yet (a later one is moved there only by a promotion), then a photograph of a patient
    the model never saw is scored with it, with heat map and DICOM SR; an API token for
    `eyehub serve` is written beside them."""
    import secrets

    import mlflow

    from eyehub.synth import generate_cohort

    client = mlflow.MlflowClient(tracking_uri=trained.tracking_uri)
    name = trained.model_name
    try:
        champion = client.get_model_version_by_alias(name, "champion").version
        console.print(f"{name}: champion stays at version {champion}")
    except mlflow.exceptions.MlflowException:
        client.set_registered_model_alias(name, "champion", trained.model_version)
        champion = trained.model_version
        console.print(f"{name}: version {champion} is the first model, promoted to champion")
    heldout = root / "heldout"
    if not (heldout / "truth.csv").exists():
        generate_cohort(heldout, patients=1, seed=8_000_001, size="small", workers=1)
    import pandas as pd

    truth = pd.read_csv(heldout / "truth.csv")
    scan = heldout / str(truth[truth.kind == "fundus"].path.iloc[0])
    token_file = root / "api-token"
    if not token_file.exists():
        token_file.touch(mode=0o600)
        token_file.write_text(secrets.token_urlsafe(24) + "\n")
    loaded, scorer = _model_and_scorer(
        f"models:/{name}@champion", key_path, explain_task=None, device="cpu"
    )
    out = root / "scores"
    (result,) = scorer.score_files([scan])
    written = _write_exam(result, loaded, out, sr=True)
    print_exam(result, str(scan))
    for path in written:
        console.print(f"    -> {path.resolve()}", highlight=False)
    return written[0].resolve()


def run(application: typer.Typer, args: list[str] | None = None) -> None:
    """Run `application` (the `eyehub` app) on `args` (default: sys.argv) and exit.

    An `EyehubError` becomes one line on stderr and its exit code; any other exception
    becomes one line naming the log file that holds its traceback, exit 1. Exit codes: 0
    success; 1 unexpected error; 2 usage or configuration error; 3 the job ran but some
    inputs were quarantined (ingest) or refused (score); 4 the promotion guard refused;
    130 interrupted.
    """
    try:
        application(args=args)  # standalone: click prints its own usage errors and exits 2
    except EyehubError as exc:
        logs.log.debug("error: %s", exc, extra={"terminal": False})
        err_console.print(Text.assemble(("error:", "bold red"), f" {exc}"), soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        where = logs.log_unexpected_error(exc, Environment.from_environ().home, err_console)
        if where is None:  # nowhere to keep it: the terminal is the only record left
            traceback.print_exc()
        err_console.print(
            f"unexpected error ({type(exc).__name__}); the traceback is in "
            + (str(where) if where is not None else "the lines above (no log file)"),
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
        sys.exit(EXIT_ERROR)
    finally:
        logs.stop_logging()


def main() -> None:
    """Console entry point (`eyehub`)."""
    run(app)


if __name__ == "__main__":
    main()
