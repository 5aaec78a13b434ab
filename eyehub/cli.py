"""The `eyehub` command line: one verb per pipeline step.

This is the only module that imports every stage. It reads the environment once
(`Environment.from_environ`), turns `EyehubError`s into one-line messages with documented
exit codes, and owns the user-facing output (rich progress bars, summaries).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated

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

from eyehub import __version__
from eyehub.errors import EyehubError
from eyehub.logs import configure_logging
from eyehub.settings import Environment

app = typer.Typer(
    name="eyehub",
    help="Imaging AI pipeline for retinal OCT and fundus photographs.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False)
err_console = Console(stderr=True)
log = logging.getLogger("eyehub")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _version(value: bool) -> None:
    if value:
        console.print(f"eyehub {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    configure_logging("DEBUG" if verbose else "INFO")


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
    )


@app.command()
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
    from eyehub.synth import generate_cohort
    from eyehub.synth.cohort import validate_arguments

    validate_arguments(out_dir, patients, seed, size, workers)
    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("synth", total=max(patients, 0), rate="")

        def advance(done: int) -> None:
            elapsed = time.perf_counter() - start
            bar.update(task, completed=done, rate=f"{done / max(elapsed, 1e-9):.1f} patients/s")

        summary = generate_cohort(out_dir, patients, seed, size, workers, advance)
    elapsed = time.perf_counter() - start
    console.print(
        f"wrote {summary.files} DICOM files ({summary.bytes_written / 1e6:.1f} MB) for "
        f"{summary.patients} patients in {elapsed:.1f} s"
    )
    console.print(f"  DICOM:  {out_dir / 'dicom'}")
    console.print(f"  labels: {out_dir / 'labels.csv'} ({summary.label_rows} rows)")
    console.print(
        f"  truth:  {out_dir / 'truth.csv'}   planted identifiers: {out_dir / 'phi.json'}"
    )


EXIT_QUARANTINED = 3


@app.command()
def keygen(
    path: Annotated[Path, typer.Argument(help="Where to write the new key file (mode 0600).")],
) -> None:
    """Write a new secret pseudonymisation key. Keep it out of the repository and backed up:
    a lost key means new pseudonyms for everyone."""
    from ingest import generate_key_file

    generate_key_file(path)
    console.print(f"wrote a new key to {path} (mode 0600)")


@app.command()
def ingest(
    sources: Annotated[list[Path], typer.Argument(help="DICOM files or folders (any names).")],
    out: Annotated[Path, typer.Option("--out", help="The dataset directory to write.")],
    labels: Annotated[
        Path | None, typer.Option(help="labels.csv keyed by mrn, eye, study_date.")
    ] = None,
    key_file: Annotated[
        Path | None, typer.Option(help="Hub secret key (default: $EYEHUB_KEY_FILE).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Files converted at once (Ray tasks).")] = 2,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else local).")
    ] = None,
    max_decoded_bytes: Annotated[
        str, typer.Option(help="Quarantine scans whose decoded size exceeds this (e.g. 4GiB).")
    ] = "4GiB",
) -> None:
    """De-identify DICOM into a dataset: OME-Zarr scans, catalog.parquet, quarantine.parquet.

    Exit status: 0 every input converted or already present; 3 some inputs quarantined
    (see quarantine.parquet); 2 usage error (bad arguments, missing key).
    """
    from ingest import IngestSettings, load_key, parse_size, run_ingest

    env = Environment.from_environ()
    key = load_key(key_file or env.key_file)
    settings = IngestSettings(
        workers=workers,
        max_decoded_bytes=parse_size(max_decoded_bytes),
        ray_address=ray_address or env.ray_address,
    )
    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("ingest", total=None, rate="")

        def started(total: int) -> None:
            bar.update(task, total=total)

        def advance(done: int) -> None:
            elapsed = time.perf_counter() - start
            bar.update(task, completed=done, rate=f"{done / max(elapsed, 1e-9):.1f} files/s")

        summary = run_ingest(sources, out, key, labels, settings, started, advance)
    console.print(
        f"{summary.files} files in {summary.seconds:.1f} s: {summary.converted} converted, "
        f"{summary.present} already present, {summary.quarantined_total} quarantined"
        + (f", {summary.ignored} ignored (DICOMDIR)" if summary.ignored else "")
        + (f" on {len(summary.nodes)} Ray node(s)" if summary.nodes else "")
    )
    for reason, count in sorted(summary.quarantined.items()):
        console.print(f"  quarantined {count:>5}  {reason}")
    console.print(f"dataset: {out}  ({summary.catalog_rows} scans in catalog.parquet)")
    if summary.quarantined_total:
        console.print(f"see {out / 'quarantine.parquet'} for what to do about each")
        raise typer.Exit(EXIT_QUARANTINED)


@app.command()
def preprocess(
    dataset: Annotated[Path, typer.Argument(help="A dataset directory written by ingest.")],
    recipe: Annotated[Path, typer.Option(help="Recipe YAML (configs/preprocess/*.yaml).")] = Path(
        "configs/preprocess/default.yaml"
    ),
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
    from eyehub.settings import load_settings
    from preprocess import Recipe, run_preprocess

    env = Environment.from_environ()
    settings = load_settings(Recipe, recipe, set_ or [])
    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("preprocess", total=None, rate="")

        def advance(done: int, total: int) -> None:
            elapsed = time.perf_counter() - start
            bar.update(
                task, completed=done, total=total, rate=f"{done / max(elapsed, 1e-9):.1f} scans/s"
            )

        summary = run_preprocess(
            dataset, settings, device, workers, ray_address or env.ray_address, on_progress=advance
        )
    console.print(
        f"recipe {summary.recipe_id} ({settings.name}) on {summary.device}: {summary.scans} scans, "
        f"{summary.prepared} prepared, {summary.already_done} already done, "
        f"{sum(summary.ungradable.values())} ungradable in {summary.seconds:.1f} s"
    )
    for reason, count in sorted(summary.ungradable.items()):
        console.print(f"  ungradable {count:>5}  {reason}")
    console.print(f"  tensors: {summary.zarr_path}")
    console.print(f"  index:   {summary.parquet_path}")


@app.command()
def demo(
    home: Annotated[
        Path | None,
        typer.Option(help="Where the demo writes (default: $EYEHUB_HOME or ./.eyehub)."),
    ] = None,
    patients: Annotated[int, typer.Option(help="Patients in the demo cohort.")] = 24,
) -> None:
    """Run the pipeline end to end on a synthetic cohort with embedded defaults."""
    env = Environment.from_environ()
    root = (home or env.home) / "demo"
    cohort = root / "cohort"
    dataset = root / "dataset"
    key_path = root / "hub.key"
    console.rule("[bold]1/3 synth: a synthetic hospital export")
    synth(cohort, patients=patients, seed=7, size="small", workers=None)
    console.rule("[bold]2/3 ingest: de-identify into an OME-Zarr dataset")
    if not key_path.exists():
        from ingest import generate_key_file

        generate_key_file(key_path)
        console.print(
            f"created a demo pseudonymisation key at {key_path} (mode 0600); "
            "outside the demo, pass --key-file or set EYEHUB_KEY_FILE"
        )
    try:
        ingest([cohort / "dicom"], dataset, cohort / "labels.csv", key_path, 2, None, "4GiB")
    except typer.Exit as exc:
        if exc.exit_code not in (0, EXIT_QUARANTINED):
            raise
    console.rule("[bold]3/3 preprocess: training-ready tensors (recipe 'small')")
    preprocess(dataset, _package_config("preprocess/small.yaml"), "auto", 2, None, None)
    console.rule("[bold]done")
    console.print(f"demo outputs are under {root.resolve()}")
    console.print(f"  synthetic DICOM export: {(cohort / 'dicom').resolve()}")
    console.print(f"  de-identified dataset:  {dataset.resolve()} (scans.zarr, catalog.parquet)")
    console.print(f"  prepared tensors:       {(dataset / 'prepared').resolve()}")


def _package_config(name: str) -> Path:
    """A config shipped in the repository's configs/ (the demo's embedded defaults)."""
    return Path(__file__).resolve().parent.parent / "configs" / name


def main() -> None:
    """Console entry point: EyehubErrors become one line on stderr and an exit code.

    Exit codes: 0 success; 2 usage or configuration error; 3 the job ran but some inputs
    were quarantined (ingest); 130 interrupted.
    """
    try:
        app()  # standalone: click prints its own usage errors and exits 2
    except EyehubError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
