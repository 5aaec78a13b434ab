"""Programming errors inside a worker: reported as `internal_error`, never as bad input.

A worker that hits an exception nobody planned for keeps the input safe (ingest
quarantines the file, preprocess marks the scan) with reason `internal_error`, and sends
the driver a traceback that the driver writes to the run's log file. The traceback keeps
the frames (file, line, function, source line) and the exception's type but not its
message: messages of DICOM libraries can quote attribute values (names, dates), and
nothing identifying may reach a log.
"""

from __future__ import annotations

import traceback


def internal_traceback(exc: BaseException) -> str:
    """The traceback of `exc` without any exception message (see the module docstring)."""
    lines = ["Traceback (most recent call last):\n"]
    lines += traceback.format_list(traceback.extract_tb(exc.__traceback__))
    lines.append(f"{type(exc).__module__}.{type(exc).__qualname__} (message withheld)\n")
    return "".join(lines)
