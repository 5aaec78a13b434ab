"""What a person sees: eyehub's own progress and results on the terminal; Ray's, Ray Data's,
native code's and Python's warnings in the command's log file under $EYEHUB_HOME/logs
(docs/architecture.md, "Errors and output")."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Annotated

import pytest
import typer

from eyehub import cli, logs
from tests.cli import run_eyehub

# Lines of Ray's that a run of ingest and preprocess writes, and where they come from.
RAY_LINES = {
    "Started a local Ray instance": "Ray's start-up banner (Python logger 'ray')",
    "Starting execution of Dataset": "Ray Data's INFO lines (its own handler on sys.stderr)",
    "core_worker.cc": "Ray's C++ core worker (native code writing to descriptor 2)",
}
# None of these may reach the terminal at normal verbosity.
NOT_ON_TERMINAL = (
    "core_worker",
    "Started a local Ray instance",
    "Token authentication",
    "ray.data",
    "streaming_executor",
    "INFO",
    "WARNING",
    "Warning",
    "Traceback",
    "fontManager",  # matplotlib building its font cache (forced below with a new MPLCONFIGDIR)
)


def _run_logged(home: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run `eyehub ARGS` with EYEHUB_HOME=home (and an empty matplotlib cache, if anything
    loads matplotlib); returns the result and the one log file the command created."""
    before = set((home / "logs").glob("*.log"))
    out = run_eyehub(
        *args,
        drop_env=("EYEHUB_KEY_FILE", "RAY_ADDRESS"),
        extra_env={"EYEHUB_HOME": str(home), "MPLCONFIGDIR": str(home / f"mpl-{len(before)}")},
    )
    created = set((home / "logs").glob("*.log")) - before
    assert len(created) == 1, f"eyehub {args[0]} created log files {created}"
    return out, created.pop()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str, Path]]:
    """A tiny cohort through synth, keygen, ingest and preprocess, as a person runs them:
    per verb the terminal text (stdout + stderr, in that order), the log file's text and path."""
    base = tmp_path_factory.mktemp("output")
    home = base / "home"
    runs = {
        "synth": ("synth", str(base / "cohort"), "--patients", "3", "--seed", "2"),
        "keygen": ("keygen", str(base / "hub.key")),
        "ingest": (
            "ingest",
            str(base / "cohort" / "dicom"),
            "--out",
            str(base / "ds"),
            "--labels",
            str(base / "cohort" / "labels.csv"),
            "--key-file",
            str(base / "hub.key"),
        ),
        "preprocess": ("preprocess", str(base / "ds"), "--recipe", "small"),
    }
    results = {}
    for verb, args in runs.items():
        out, log_file = _run_logged(home, *args)
        assert out.returncode == 0, f"{verb}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
        results[verb] = (out.stdout + out.stderr, log_file.read_text(encoding="utf-8"), log_file)
    results["home"] = ("", "", home)
    return results


@pytest.mark.slow
def test_terminal_shows_eyehubs_progress_and_results_only(
    pipeline: dict[str, tuple[str, str, Path]],
) -> None:
    for verb in ("synth", "keygen", "ingest", "preprocess"):
        terminal = pipeline[verb][0]
        shown = [bad for bad in NOT_ON_TERMINAL if bad in terminal]
        assert not shown, f"eyehub {verb} showed {shown} on the terminal:\n{terminal}"
    assert "converted" in pipeline["ingest"][0] and "dataset:" in pipeline["ingest"][0]
    assert "prepared" in pipeline["preprocess"][0] and "tensors:" in pipeline["preprocess"][0]


@pytest.mark.slow
def test_rays_lines_go_to_the_log_file_under_eyehub_home(
    pipeline: dict[str, tuple[str, str, Path]],
) -> None:
    home = pipeline["home"][2]
    for verb in ("synth", "keygen", "ingest", "preprocess"):
        log_file = pipeline[verb][2]
        assert log_file.parent == home / "logs"
        assert log_file.name.startswith("eyehub-") and log_file.suffix == ".log"
        assert log_file.stat().st_mode & 0o077 == 0  # paths of exports can name patients
    logged = pipeline["ingest"][1] + pipeline["preprocess"][1]
    missing = [f"{line!r} ({what})" for line, what in RAY_LINES.items() if line not in logged]
    assert not missing, f"not in the log files: {missing}"
    assert "Started a local Ray instance" in pipeline["preprocess"][1]


@pytest.mark.slow
def test_verbose_shows_them_on_the_terminal(
    pipeline: dict[str, tuple[str, str, Path]], tmp_path: Path
) -> None:
    dataset = pipeline["preprocess"][2].parents[2] / "ds"
    # another recipe, so that preprocessing runs again (on Ray) instead of finding it done
    out, log_file = _run_logged(
        tmp_path, "-v", "preprocess", str(dataset), "--recipe", "small", "--set", "fundus.size=96"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    terminal = out.stdout + out.stderr
    missing = [f"{line!r} ({what})" for line, what in RAY_LINES.items() if line not in terminal]
    assert not missing, f"-v did not show: {missing}"
    assert "Started a local Ray instance" in log_file.read_text(encoding="utf-8")


def test_help_and_usage_errors_go_to_the_terminal_and_write_no_log(tmp_path: Path) -> None:
    env = {"EYEHUB_HOME": str(tmp_path)}
    shown = run_eyehub("synth", "--help", extra_env=env)
    assert shown.returncode == 0 and "--patients" in shown.stdout
    wrong = run_eyehub("synth", str(tmp_path / "c"), "--patients", "many", extra_env=env)
    assert wrong.returncode == 2 and "--patients" in wrong.stderr
    assert not (tmp_path / "logs").exists()


# In-process: the real CLI machinery (`cli.run`, `LoggedCommand`, `logs.command_output`) on
# a tiny Typer app whose command does what a library inside a command might do.


def _tiny_app(command: typer.models.CommandFunctionType) -> typer.Typer:
    tiny = typer.Typer(pretty_exceptions_enable=False)

    @tiny.callback()
    def _group(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
        pass

    tiny.command(cls=cli.LoggedCommand)(command)
    return tiny


def _only_log_file(home: Path) -> Path:
    files = list((home / "logs").glob("*.log"))
    assert len(files) == 1, files
    return files[0]


def test_unexpected_error_is_one_line_naming_the_log_file_with_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EYEHUB_HOME", str(tmp_path))

    def divide_by_zero_in_a_command() -> None:
        counts: dict[str, int] = {}
        _ = len(counts) / len(counts)  # a programming error: ZeroDivisionError

    with pytest.raises(SystemExit) as exited:
        cli.run(_tiny_app(divide_by_zero_in_a_command), ["divide-by-zero-in-a-command"])
    assert exited.value.code == cli.EXIT_ERROR
    log_file = _only_log_file(tmp_path)
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert lines == [f"unexpected error (ZeroDivisionError); the traceback is in {log_file}"]
    logged = log_file.read_text(encoding="utf-8")
    assert "Traceback (most recent call last)" in logged
    assert "in divide_by_zero_in_a_command" in logged and "ZeroDivisionError" in logged
    assert logs.current_log_file() is None  # run() stopped logging on its way out


def test_native_stderr_child_processes_and_warnings_go_to_the_log_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EYEHUB_HOME", str(tmp_path))

    def chatter() -> None:
        os.write(2, b"native line written to descriptor 2\n")
        subprocess.run(
            [sys.executable, "-c", "import sys; sys.stderr.write('child process line\\n')"],
            check=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library's warning", UserWarning, stacklevel=1)
        logging.getLogger("somelibrary").warning("a library's warning record")
        logging.getLogger("somelibrary").error("a library's error record")
        logging.getLogger("ingest.run").info("eyehub's own progress")
        logging.getLogger("ingest.run").error("internal error converting f.dcm:\nTraceback ...")
        cli.console.print("eyehub's own result")

    with pytest.raises(SystemExit) as exited:
        cli.run(_tiny_app(chatter), ["chatter"])
    assert exited.value.code == 0
    log_file = _only_log_file(tmp_path)
    out, err = capfd.readouterr()
    assert out.splitlines() == ["eyehub's own result"]
    assert err.splitlines() == [
        "error: a library's error record",
        "eyehub's own progress",
        f"error: internal error converting f.dcm (details in {log_file})",
    ]
    logged = log_file.read_text(encoding="utf-8")
    for line in (
        "native line written to descriptor 2",
        "child process line",
        "UserWarning: a library's warning",
        "a library's warning record",
        "a library's error record",
        "eyehub's own progress",
        "internal error converting f.dcm:\nTraceback ...",
    ):
        assert line in logged
    # descriptor 2 is the terminal again
    os.write(2, b"after the command\n")
    assert capfd.readouterr().err == "after the command\n"
    assert "after the command" not in log_file.read_text(encoding="utf-8")


def test_verbose_keeps_everything_on_the_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EYEHUB_HOME", str(tmp_path))

    def chatter() -> None:
        os.write(2, b"native line written to descriptor 2\n")
        logging.getLogger("somelibrary").info("a library's info record")

    with pytest.raises(SystemExit):
        cli.run(_tiny_app(chatter), ["-v", "chatter"])
    _, err = capfd.readouterr()
    assert "native line written to descriptor 2" in err
    assert "a library's info record" in err
    assert "a library's info record" in _only_log_file(tmp_path).read_text(encoding="utf-8")


def test_summaries_point_internal_errors_to_the_log_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ingest import IngestSummary
    from preprocess import PreprocessSummary, Recipe

    ingested = IngestSummary(files=5, converted=3, quarantined=Counter(internal_error=2))
    prepared = PreprocessSummary(recipe_id="abc", scans=4, ungradable={"internal_error": 1})
    with logs.command_output(tmp_path, verbose=False, console=cli.err_console) as log_file:
        cli.print_ingest_summary(ingested, tmp_path / "ds")
        cli.print_preprocess_summary(prepared, Recipe())
    logs.stop_logging()
    out = capsys.readouterr().out
    assert f"2 file(s) hit an internal error; tracebacks are in {log_file}" in out
    assert f"1 scan(s) hit an internal error; tracebacks are in {log_file}" in out


def test_the_logged_command_line_keeps_no_credentials_or_study_uid() -> None:
    from eyehub.logs import masked_arguments

    args = ["score", "--pacs", "http://clinic:s3cret@pacs:8042/dicom-web", "--study", "1.2.3.4"]
    logged = " ".join(masked_arguments([*args, "--study=5.6.7", "scan.dcm"]))
    assert "s3cret" not in logged and "clinic" not in logged
    assert "1.2.3.4" not in logged and "5.6.7" not in logged
    assert "http://***@pacs:8042/dicom-web" in logged and "scan.dcm" in logged
