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
    console.rule("[bold]1/1 synth: a synthetic hospital export")
    synth(cohort, patients=patients, seed=7, size="small", workers=None)
    console.rule("[bold]done")
    console.print(f"demo outputs are under {root.resolve()}")
    console.print(f"  synthetic DICOM export: {(cohort / 'dicom').resolve()}")


def main() -> None:
    """Console entry point: EyehubErrors become one line on stderr and an exit code.

    Exit codes: 0 success; 1 the job ran but some inputs failed (see each verb); 2 usage or
    configuration error; 130 interrupted.
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
