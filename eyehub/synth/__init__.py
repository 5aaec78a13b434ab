"""The synthetic ophthalmic DICOM cohort every stage is tested on (`eyehub synth`)."""

from eyehub.synth.cohort import LABEL_COLUMNS, SITES, SIZES, CohortSummary, generate_cohort

__all__ = ["LABEL_COLUMNS", "SITES", "SIZES", "CohortSummary", "generate_cohort"]
