"""The hub's secret key and the keyed pseudonyms derived from it.

`patient_id`, `scan_id`, remapped UIDs and the per-patient date shift are all
HMAC-SHA256 under the hub's key: the same input always gives the same output, and nobody
without the key can reverse or recompute them. The key lives in a file outside the
repository (`eyehub keygen PATH`, mode 0600) named by `--key-file` or `EYEHUB_KEY_FILE`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from eyehub.errors import KeyMissingError, NotFoundError, UsageError

KEY_BYTES = 32
_HEADER = "eyehub-key-v1"
# PS3.15 E.3.6 leaves the size of the shift to the implementer; up to two years back
MAX_DATE_SHIFT_DAYS = 730


@dataclass(frozen=True)
class HubKey:
    """The secret; its repr never shows the bytes."""

    secret: bytes

    def __repr__(self) -> str:
        return "HubKey(<secret>)"

    def _mac(self, purpose: str, *parts: str) -> bytes:
        msg = "\x1f".join((purpose, *parts)).encode("utf-8")
        return hmac.new(self.secret, msg, hashlib.sha256).digest()

    def patient_id(self, mrn: str) -> str:
        """Pseudonym of a patient from the MRN (the key the labels file carries too)."""
        return "P" + self._mac("patient", mrn.strip()).hex()[:20]

    def scan_id(self, sop_instance_uid: str) -> str:
        return "S" + self._mac("scan", sop_instance_uid.strip()).hex()[:24]

    def uid(self, uid: str) -> str:
        """A remapped UID in 2.25 form (PS3.5 B.2), the same wherever the UID appears."""
        digest = self._mac("uid", uid.strip())[:16]
        return "2.25." + str(int.from_bytes(digest, "big"))

    def date_shift_days(self, patient_id: str) -> int:
        """One shift per patient, 1..MAX days back (Modified Dates option, PS3.15 E.3.6)."""
        value = int.from_bytes(self._mac("date-shift", patient_id)[:4], "big")
        return 1 + value % MAX_DATE_SHIFT_DAYS

    def shift_date(self, patient_id: str, date: dt.date) -> dt.date:
        return date - dt.timedelta(days=self.date_shift_days(patient_id))


def generate_key_file(path: Path, *, overwrite: bool = False) -> Path:
    """Write a new random key to `path` with mode 0600; refuses to overwrite by default."""
    if path.exists() and not overwrite:
        raise UsageError(
            f"{path} already exists; a new key would change every pseudonym. "
            "Remove it first if that is really what you want."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(f"{_HEADER}\n{secrets.token_hex(KEY_BYTES)}\n")
    os.chmod(path, 0o600)
    return path


def load_key(path: Path | None) -> HubKey:
    """Read the key file; clear errors when it is missing, unreadable or malformed."""
    if path is None:
        raise KeyMissingError(
            "no pseudonymisation key: pass --key-file PATH or set EYEHUB_KEY_FILE "
            "(create one with `eyehub keygen PATH`)"
        )
    if not path.is_file():
        raise NotFoundError(f"key file {path} does not exist (create one with `eyehub keygen`)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise UsageError(f"key file {path} is readable by others (mode {mode:o}); chmod 600 it")
    lines = path.read_text(encoding="ascii", errors="replace").split()
    if len(lines) != 2 or lines[0] != _HEADER:
        raise UsageError(f"{path} is not an eyehub key file (expected one written by keygen)")
    try:
        secret = bytes.fromhex(lines[1])
    except ValueError:
        raise UsageError(f"{path} is not an eyehub key file (the key is not hex)") from None
    if len(secret) < 16:
        raise UsageError(f"the key in {path} is too short")
    return HubKey(secret)
