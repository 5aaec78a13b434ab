"""eyehub: the imaging AI pipeline of an eye health research hub.

This package holds what every stage shares: the command line (`eyehub.cli`), settings
(`eyehub.settings`), the error hierarchy (`eyehub.errors`) and logging (`eyehub.logs`),
plus the synthetic ophthalmic DICOM cohort (`eyehub.synth`) that every stage is tested on.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("eyehub")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
