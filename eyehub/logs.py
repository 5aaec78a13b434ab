"""Logging, and what a person sees on the terminal versus what goes to the log file.

Library modules call `logging.getLogger(__name__)` and never configure handlers. The command
line runs each command inside `command_output`, which

- creates `<EYEHUB_HOME>/logs/eyehub-<YYYYmmdd-HHMMSS>-<pid>.log` (mode 0600: paths of
  hospital exports can name patients) and sends every log record there: eyehub's own from
  DEBUG, other libraries' from INFO, Python warnings included (`current_log_file()` names it);
- shows on the terminal eyehub's own records from INFO, one line each (the rest of a
  multi-line record, such as a worker's traceback, stays in the file), and other libraries'
  records from ERROR;
- points file descriptor 2 at the log file while the command runs. Ray's banners and token
  notice, Ray Data's INFO lines, Ray's C++ core worker (which writes to descriptor 2 itself)
  and child processes that inherit it all land in the file, with the Python records. The
  rich console that draws eyehub's progress bars and messages writes to a duplicate of the
  original descriptor 2 instead; standard output (eyehub's results) is not redirected.

With `verbose`, nothing is redirected and every record is shown as it was before this module
kept a log file; the file still receives the log records.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

# The packages whose loggers are eyehub's own: their INFO reaches the terminal.
EYEHUB_PACKAGES = ("eyehub", "ingest", "preprocess", "models", "training", "inference")
LOG_DIR = "logs"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"
# Libraries that log every file or request below WARNING; capped even in the log file.
_CHATTY = (
    "mlflow",
    "urllib3",
    "alembic",
    "numcodecs",
    "PIL",
    "openjpeg",
    "pydicom",
    "highdicom",
    "libjpeg",
    "rle",
    "dicomweb_client",  # its DEBUG lines carry request URLs, with study UIDs in them
)

_log_file: Path | None = None
_handlers: list[logging.Handler] = []
_saved_levels: dict[str, int] = {}
_root_level: int | None = None
_redirected = False

log = logging.getLogger(__name__)


def current_log_file() -> Path | None:
    """The log file of the command running in this process (None outside the CLI)."""
    return _log_file


def stderr_redirected() -> bool:
    """True while file descriptor 2 points at the log file (see the module docstring)."""
    return _redirected


def is_eyehub_logger(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in EYEHUB_PACKAGES)


def new_log_file(home: Path) -> Path:
    """Create `<home>/logs/eyehub-<YYYYmmdd-HHMMSS>-<pid>.log`, readable by its owner only."""
    folder = home / LOG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"eyehub-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    return path


def _for_the_terminal(record: logging.LogRecord) -> bool:
    if getattr(record, "terminal", True) is False:
        return False
    if is_eyehub_logger(record.name):
        return record.levelno >= logging.INFO
    return record.levelno >= logging.ERROR and record.name != "py.warnings"


class TerminalHandler(logging.Handler):
    """One line per record, printed through the rich console that draws the progress bars
    (so a message lands above a live bar, not inside it). What does not fit one line (more
    lines, a traceback) is left to the log file, which the line names."""

    _PREFIX = ((logging.ERROR, "error: ", "bold red"), (logging.WARNING, "warning: ", "yellow"))

    def __init__(self, console: Console, log_file: Path | None) -> None:
        super().__init__(logging.INFO)
        self.console = console
        self.log_file = log_file
        self.addFilter(_for_the_terminal)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            first, _, rest = record.getMessage().partition("\n")
            if (rest.strip() or record.exc_info) and self.log_file is not None:
                first = f"{first.rstrip(':')} (details in {self.log_file})"
            line = Text()
            for level, prefix, style in self._PREFIX:
                if record.levelno >= level:
                    line.append(prefix, style=style)
                    break
            line.append(first)
            self.console.print(line, soft_wrap=True)
        except Exception:
            self.handleError(record)


def start_logging(log_file: Path | None, *, verbose: bool, console: Console) -> None:
    """Route log records for one command: to `log_file` (all) and `console` (see above).

    Replaces what an earlier call set up; `stop_logging` undoes it. Handlers installed by
    others (pytest's capture, say) are left in place."""
    global _log_file, _root_level
    stop_logging()
    root = logging.getLogger()
    _root_level = root.level
    if log_file is not None:
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setLevel(logging.DEBUG)
        to_file.setFormatter(logging.Formatter(FILE_FORMAT))
        _handlers.append(to_file)
    if verbose:
        shown: logging.Handler = RichHandler(
            console=console, show_path=False, rich_tracebacks=False, markup=False
        )
        shown.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        shown = TerminalHandler(console, log_file)
    _handlers.append(shown)
    for handler in _handlers:
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    levels = {name: logging.DEBUG for name in EYEHUB_PACKAGES}
    levels.update({name: logging.WARNING for name in _CHATTY})
    for name, level in levels.items():
        logger = logging.getLogger(name)
        _saved_levels[name] = logger.level
        logger.setLevel(level)
    logging.captureWarnings(True)
    _log_file = log_file


def stop_logging() -> None:
    """Remove and close the handlers `start_logging` installed; restore the levels."""
    global _log_file, _root_level
    root = logging.getLogger()
    for handler in _handlers:
        root.removeHandler(handler)
        handler.close()
    _handlers.clear()
    for name, level in _saved_levels.items():
        logging.getLogger(name).setLevel(level)
    _saved_levels.clear()
    if _root_level is not None:
        root.setLevel(_root_level)
        _root_level = None
    logging.captureWarnings(False)
    _log_file = None


@contextmanager
def stderr_to(path: Path) -> Iterator[TextIO]:
    """Point file descriptor 2 at `path` (appending) for the block; yield a text stream that
    still reaches the original standard error (the terminal)."""
    global _redirected
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(target, 2)
    os.close(target)
    terminal = open(  # noqa: SIM115 - closed below, after descriptor 2 is restored
        saved,
        "w",
        encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
        errors="backslashreplace",
        buffering=1,
        closefd=False,
    )
    _redirected = True
    try:
        yield terminal
    finally:
        _redirected = False
        terminal.flush()
        sys.stderr.flush()  # what Python buffered for descriptor 2 belongs in the file
        os.dup2(saved, 2)
        terminal.close()
        os.close(saved)


@contextmanager
def _console_file(console: Console, stream: TextIO) -> Iterator[None]:
    previous = console._file  # None: "sys.stderr at the time of writing"
    console.file = stream
    try:
        yield
    finally:
        console._file = previous


@contextmanager
def command_output(home: Path, *, verbose: bool, console: Console) -> Iterator[Path | None]:
    """Run one command with a log file under `home` (see the module docstring); yields it.

    `console` is the rich console that writes to standard error (progress bars, messages):
    while descriptor 2 points at the log file it writes to the terminal instead. Logging
    stays configured after the block (so an error escaping the command is logged to the same
    file) until `stop_logging`."""
    log_file, problem = _try_new_log_file(home)
    start_logging(log_file, verbose=verbose, console=console)
    if problem:
        log.warning("no log file: cannot write under %s (%s)", home / LOG_DIR, problem)
    log.debug("eyehub %s", " ".join(masked_arguments(sys.argv[1:])))
    if verbose or log_file is None:
        yield log_file
        return
    with stderr_to(log_file) as terminal, _console_file(console, terminal):
        yield log_file


# options whose value is a secret or identifies a patient's study: never written down
_MASKED_OPTIONS = ("--study",)
_URL_CREDENTIALS = re.compile(r"//[^/@\s]+@")


def masked_arguments(args: list[str]) -> list[str]:
    """The command line as the log records it: `user:password@` in URLs and the values of
    options that name a patient's study replaced by `***`."""
    out = []
    masked_next = False
    for arg in args:
        if masked_next:
            out.append("***")
            masked_next = False
            continue
        name, eq, _ = arg.partition("=")
        if name in _MASKED_OPTIONS:
            if eq:
                out.append(f"{name}=***")
            else:
                out.append(arg)
                masked_next = True
            continue
        out.append(_URL_CREDENTIALS.sub("//***@", arg))
    return out


def _try_new_log_file(home: Path) -> tuple[Path | None, str]:
    try:
        return new_log_file(home), ""
    except OSError as exc:
        return None, exc.strerror or str(exc)


def log_unexpected_error(exc: BaseException, home: Path, console: Console) -> Path | None:
    """Write `exc` and its traceback to the log file only (a new one under `home` if no
    command opened one); returns the file, or None if no log file can be written."""
    if _log_file is None:
        log_file, _ = _try_new_log_file(home)
        if log_file is None:
            return None
        start_logging(log_file, verbose=False, console=console)
    log.error(
        "unexpected error (%s)",
        type(exc).__name__,
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"terminal": False},
    )
    return _log_file
