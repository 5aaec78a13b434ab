"""Who the synthetic patients are: identities, labels, and the imaging signs that cause them.

Every label except `null_control` is drawn from a small causal model, and each has a sign
a model can learn from the pixels (see `EyeSigns`); sex acts through anatomy alone
(`sex_anatomy`). Identity features (vessel and choroidal patterns and pigmentation seeded
per patient) are shared by all of a patient's images, so a patient leaking across data
splits lets a model predict `null_control` above chance.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field

import numpy as np

_SURNAMES = (
    "OKAFOR",
    "NAKAMURA",
    "LINDQVIST",
    "FITZGERALD",
    "PETROVA",
    "HADDAD",
    "MENDOZA",
    "KOWALSKI",
    "ABERNATHY",
    "SORENSEN",
    "MWANGI",
    "CHATTERJEE",
    "DUBOIS",
    "HALVORSEN",
    "QUINTERO",
    "VASQUEZ",
    "ODUYA",
    "BRANDSTETTER",
    "TAKAHASHI",
    "MACALLISTER",
)
_GIVEN = (
    "AMARA",
    "BENEDIKT",
    "CORDELIA",
    "DMITRI",
    "ELSPETH",
    "FARIDA",
    "GWENDOLYN",
    "HIROSHI",
    "IMOGEN",
    "JOAQUIN",
    "KATARINA",
    "LEOPOLD",
    "MARISOL",
    "NIAMH",
    "OSWALDO",
    "PERPETUA",
)
_STREETS = ("Harbour Lane", "Juniper Close", "Quarry Road", "Wisteria Walk", "Foundry Street")
_TOWNS = ("Eastbridge", "Millhaven", "Stonecroft", "Larkmoor", "Ashwell")
_PHYSICIANS = ("GREENWOOD^ALICE", "RAMANATHAN^VIJAY", "OBRIEN^SEAMUS", "FERREIRA^LUCIA")
_INSTITUTIONS = (
    "St Brigid Eye Infirmary",
    "Northgate Retina Centre",
    "Lakeside Diabetic Eye Clinic",
)


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


@dataclass(frozen=True)
class Identity:
    """Identifiers a real export carries; all are planted so privacy tests can look for them."""

    patient_name: str
    mrn: str
    birth_date: dt.date
    address: str
    institution: str
    referring_physician: str
    other_id: str


@dataclass(frozen=True)
class EyeSigns:
    """What the renderers draw for one eye at one visit (units: fractions of FOV radius, mm)."""

    cup_disc_ratio: float
    microaneurysms: int
    haemorrhages: int
    exudates: int
    cotton_wool_spots: int
    neovascularisation: bool
    drusen: int
    macular_fluid: bool
    central_thickening_mm: float
    rnfl_factor: float
    arteriole_calibre: float
    venule_calibre: float
    yellowing: float
    # anatomy that differs by sex (`sex_anatomy`): fixed per eye, the same at every visit
    disc_scale: float = 1.0  # optic disc radius relative to the average disc
    disc_fovea_scale: float = 1.0  # disc-fovea distance relative to the average
    tessellation: float = 0.0  # visibility of the choroidal vessels outside the macula, 0-1
    choroid_mm: float = 0.28  # choroidal thickness (Bruch's membrane to the sclera)


@dataclass(frozen=True)
class EyeVisit:
    eye: str  # "R" or "L"
    visit_index: int
    study_date: dt.date
    dr_grade: int
    referable_dr: int
    amd: int
    glaucoma: int
    dme: int
    signs: EyeSigns


@dataclass(frozen=True)
class Patient:
    index: int
    identity: Identity
    sex: str
    age_first_visit: float
    diabetes: int
    hypertension: int
    systolic_bp: float
    hba1c: float
    cvd_5y: int
    dementia: int
    null_control: int
    site: int  # which device profile (hospital) the patient attends
    identity_seed: int  # seeds the vessel pattern and pigmentation: identity features
    pigmentation: tuple[float, float, float]
    visits: tuple[tuple[dt.date, tuple[EyeVisit, EyeVisit]], ...] = field(default=())

    def age_at(self, date: dt.date) -> float:
        return (date - self.identity.birth_date).days / 365.25


# Sex differences in the eye, as (male mean, female mean, SD between people). Their
# direction follows reported differences (males: larger optic disc, longer disc-fovea
# distance, more visible choroidal tessellation, thicker choroid); their size is
# exaggerated (1.3-2.5 SDs apart) so that a small network learns sex from ~100 patients,
# while each overlaps enough that no single measure separates the sexes.
SEX_ANATOMY: dict[str, tuple[float, float, float]] = {
    "disc_scale": (1.04, 0.96, 0.05),
    "disc_fovea_scale": (1.03, 0.97, 0.035),
    "tessellation": (0.66, 0.24, 0.17),
    "choroid_mm": (0.31, 0.25, 0.045),
}
_EYE_SD = 0.15  # the two eyes differ by this share of the SD between people


@dataclass(frozen=True)
class EyeAnatomy:
    """One eye's share of `EyeSigns` that sex acts through (see `SEX_ANATOMY`)."""

    disc_scale: float
    disc_fovea_scale: float
    tessellation: float
    choroid_mm: float


def sex_anatomy(seed: int, index: int, sex: str) -> dict[str, EyeAnatomy]:
    """Each eye's anatomy that differs by sex, keyed "R" and "L".

    Drawn from its own stream so the labels and every other sign stay as they were. The two
    eyes of a person are nearly alike; nothing here depends on age or any other label."""
    rng = np.random.default_rng([seed, index, 0x5E8])
    male = sex == "M"
    person = {name: rng.normal(m if male else f, sd) for name, (m, f, sd) in SEX_ANATOMY.items()}
    eyes = {}
    for eye in "RL":
        v = {
            name: float(person[name] + rng.normal(0, _EYE_SD * sd))
            for name, (_, _, sd) in SEX_ANATOMY.items()
        }
        eyes[eye] = EyeAnatomy(
            disc_scale=v["disc_scale"],
            disc_fovea_scale=v["disc_fovea_scale"],
            tessellation=float(np.clip(v["tessellation"], 0.0, 1.0)),
            choroid_mm=float(np.clip(v["choroid_mm"], 0.12, 0.5)),
        )
    return eyes


def make_patient(seed: int, index: int, n_sites: int) -> Patient:
    """Draw one patient, deterministically from (seed, index)."""
    rng = np.random.default_rng([seed, index, 0x5EED])
    surname = _SURNAMES[int(rng.integers(len(_SURNAMES)))]
    given = _GIVEN[int(rng.integers(len(_GIVEN)))]
    mrn = f"MRN{seed % 100:02d}{index:05d}{int(rng.integers(10, 99))}"
    age = float(rng.uniform(40, 88))
    first_visit = dt.date(2019, 1, 1) + dt.timedelta(days=int(rng.integers(0, 4 * 365)))
    birth = first_visit - dt.timedelta(days=int(age * 365.25))
    identity = Identity(
        patient_name=f"{surname}^{given}",
        mrn=mrn,
        birth_date=birth,
        address=f"{int(rng.integers(1, 240))} {_STREETS[int(rng.integers(len(_STREETS)))]}, "
        f"{_TOWNS[int(rng.integers(len(_TOWNS)))]}",
        institution=_INSTITUTIONS[int(rng.integers(len(_INSTITUTIONS)))],
        referring_physician=_PHYSICIANS[int(rng.integers(len(_PHYSICIANS)))],
        other_id=f"NHS{int(rng.integers(10**8, 10**9))}",
    )
    sex = "F" if rng.random() < 0.5 else "M"
    diabetes = int(rng.random() < _sigmoid(-1.0 + 0.03 * (age - 60)))
    hba1c = float(np.clip(rng.normal(7.9, 1.3), 5.9, 13.0) if diabetes else rng.normal(5.4, 0.3))
    hypertension = int(rng.random() < _sigmoid(-0.5 + 0.06 * (age - 60) + 0.6 * diabetes))
    sbp = float(rng.normal(154, 13) if hypertension else rng.normal(121, 10))
    cvd = int(
        rng.random() < _sigmoid(-2.6 + 0.07 * (age - 60) + 0.9 * diabetes + 0.9 * hypertension)
    )
    dementia = int(rng.random() < _sigmoid(-2.4 + 0.13 * (age - 70) + 0.5 * diabetes + 0.5 * cvd))
    null_control = int(rng.random() < 0.5)
    identity_seed = int(rng.integers(2**31))
    pigment = (
        float(rng.uniform(0.72, 0.92)),
        float(rng.uniform(0.30, 0.44)),
        float(rng.uniform(0.12, 0.22)),
    )
    site = int(rng.integers(n_sites))

    # eye-level propensities shared between visits
    amd_prop = rng.normal(0, 1)
    gl_prop = rng.normal(0, 1)
    dr_latent = {e: rng.normal(0, 0.45) for e in "RL"}
    n_visits = 1 + int(rng.random() < 0.5)
    visit_dates = [first_visit]
    if n_visits == 2:
        visit_dates.append(first_visit + dt.timedelta(days=int(rng.integers(300, 800))))

    patient = Patient(
        index=index,
        identity=identity,
        sex=sex,
        age_first_visit=age,
        diabetes=diabetes,
        hypertension=hypertension,
        systolic_bp=round(sbp, 1),
        hba1c=round(hba1c, 1),
        cvd_5y=cvd,
        dementia=dementia,
        null_control=null_control,
        site=site,
        identity_seed=identity_seed,
        pigmentation=pigment,
    )
    anatomy = sex_anatomy(seed, index, sex)
    visits = []
    for v, date in enumerate(visit_dates):
        age_v = patient.age_at(date)
        eyes = []
        for eye in "RL":
            ev = _eye_visit(rng, patient, eye, v, date, age_v, amd_prop, gl_prop, dr_latent[eye])
            a = anatomy[eye]
            signs = dataclasses.replace(
                ev.signs,
                disc_scale=a.disc_scale,
                disc_fovea_scale=a.disc_fovea_scale,
                tessellation=a.tessellation,
                choroid_mm=a.choroid_mm,
            )
            eyes.append(dataclasses.replace(ev, signs=signs))
        visits.append((date, (eyes[0], eyes[1])))
    return Patient(**{**patient.__dict__, "visits": tuple(visits)})


def _eye_visit(
    rng: np.random.Generator,
    p: Patient,
    eye: str,
    v: int,
    date: dt.date,
    age: float,
    amd_prop: float,
    gl_prop: float,
    dr_latent: float,
) -> EyeVisit:
    if p.diabetes:
        latent = 0.55 * (p.hba1c - 6.3) + dr_latent + rng.normal(0, 0.6) + 0.35 * v
        grade = int(np.digitize(latent, [0.35, 1.05, 1.8, 2.6]))
    else:
        grade = int(rng.random() < 0.03)
    dme = int(p.diabetes and rng.random() < _sigmoid(-3.4 + 1.1 * grade))
    referable = int(grade >= 2 or dme)
    amd = int(_sigmoid(-2.0 + 0.10 * (age - 60) + 1.3 * amd_prop) > rng.uniform(0.3, 0.7))
    glaucoma = int(_sigmoid(-2.2 + 0.05 * (age - 60) + 1.3 * gl_prop) > rng.uniform(0.3, 0.7))

    age_n = float(np.clip((age - 40) / 50, 0, 1.2))
    signs = EyeSigns(
        cup_disc_ratio=float(rng.uniform(0.66, 0.88) if glaucoma else rng.uniform(0.22, 0.48)),
        microaneurysms=int((0, 7, 14, 22, 26)[grade] + rng.integers(0, 3) * (grade > 0)),
        haemorrhages=int((0, 0, 5, 12, 16)[grade] + rng.integers(0, 2) * (grade > 1)),
        exudates=int((0, 0, 5, 10, 12)[grade] + 14 * dme),
        cotton_wool_spots=int((0, 0, 0, 3, 4)[grade]),
        neovascularisation=grade == 4,
        drusen=int(rng.integers(14, 32)) if amd else int(rng.integers(0, 2)),
        macular_fluid=bool(dme),
        central_thickening_mm=float(rng.uniform(0.10, 0.22)) if dme else 0.0,
        rnfl_factor=float(
            (0.5 if glaucoma else 1.0) * (1.0 - 0.25 * age_n) * (0.88 if p.dementia else 1.0)
        ),
        arteriole_calibre=float(
            np.clip(1.0 - 0.008 * (p.systolic_bp - 115), 0.55, 1.1) * (1.0 - 0.12 * age_n)
        ),
        venule_calibre=float((1.0 + 0.15 * p.cvd_5y + 0.08 * p.dementia) * (1.0 - 0.05 * age_n)),
        yellowing=float(np.clip(age_n, 0, 1)),
    )
    return EyeVisit(
        eye=eye,
        visit_index=v,
        study_date=date,
        dr_grade=grade,
        referable_dr=referable,
        amd=amd,
        glaucoma=glaucoma,
        dme=dme,
        signs=signs,
    )
