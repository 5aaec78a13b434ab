"""Write the synthetic images as DICOM the way ophthalmic devices and PACS exports do.

IODs (PS3.3 Annex A): Ophthalmic Photography 8 Bit Image (A.39.1), Ophthalmic Tomography
Image (A.41), Secondary Capture Image (A.8.1) and VL Photographic Image (A.33.4). Every
file is meant to pass `dciodvfy` with no Error line; `tests/eyehub/test_synth_dicom.py`
runs it where dicom3tools is installed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from highdicom.frame import encode_frame
from PIL import Image
from pydicom import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)

OP_8BIT = UID("1.2.840.10008.5.1.4.1.1.77.1.5.1")  # Ophthalmic Photography 8 Bit Image
OPT = UID("1.2.840.10008.5.1.4.1.1.77.1.5.4")  # Ophthalmic Tomography Image
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
VL_PHOTOGRAPHIC = UID("1.2.840.10008.5.1.4.1.1.77.1.4")

PRIVATE_CREATOR = "SYNTHOPTIX EXPORT 1.0"
IMPLEMENTATION_UID = UID("1.2.826.0.1.3680043.10.1219.1")


def uid_for(seed: int, *parts: object) -> str:
    """A deterministic UID for one object of the cohort.

    2.25 form (PS3.5 B.2): the decimal of a 128-bit number, here a hash of the object's
    name, so the same seed always gives the same UIDs. (pydicom's `generate_uid` ignores
    its entropy sources when no prefix is given.)
    """
    key = "\x1f".join([str(seed), *map(str, parts)]).encode()
    return "2.25." + str(int.from_bytes(hashlib.sha256(key).digest()[:16], "big"))


@dataclass(frozen=True)
class Device:
    manufacturer: str
    model: str
    serial: str
    software: str
    station: str


@dataclass(frozen=True)
class StudyInfo:
    """Patient and study attributes (identifiable, as exports carry them)."""

    patient_name: str
    patient_id: str
    other_patient_id: str
    birth_date: dt.date
    sex: str
    address: str
    institution: str
    referring_physician: str
    accession: str
    study_uid: str
    study_date: dt.date
    study_time: str
    device: Device


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _da(d: dt.date) -> str:
    return d.strftime("%Y%m%d")


def _age(birth: dt.date, on: dt.date) -> str:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{years:03d}Y"


def _base(
    info: StudyInfo,
    sop_class: str,
    sop_uid: str,
    series_uid: str,
    modality: str,
    series_number: int,
    instance_number: int,
    ts: str,
) -> Dataset:
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(ts)
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "EYEHUB_SYNTH"
    ds.file_meta = meta
    # SOP Common (C.12.1)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = _da(info.study_date)
    ds.InstanceCreationTime = info.study_time
    # Patient (C.7.1.1) - identifiable on purpose
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.IssuerOfPatientID = info.institution
    ds.PatientBirthDate = _da(info.birth_date)
    ds.PatientSex = info.sex
    other = Dataset()
    other.PatientID = info.other_patient_id
    other.TypeOfPatientID = "TEXT"
    other.IssuerOfPatientID = "NATIONAL HEALTH REGISTER"
    ds.OtherPatientIDsSequence = Sequence([other])
    # Patient Study (C.7.2.2)
    ds.PatientAge = _age(info.birth_date, info.study_date)
    # General Study (C.7.2.1)
    ds.StudyInstanceUID = info.study_uid
    ds.StudyDate = _da(info.study_date)
    ds.StudyTime = info.study_time
    ds.ReferringPhysicianName = info.referring_physician
    ds.StudyID = info.accession[-6:]
    ds.AccessionNumber = info.accession
    ds.StudyDescription = "Retinal imaging"
    # General Series (C.7.3.1)
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = _da(info.study_date)
    ds.SeriesTime = info.study_time
    # General Equipment (C.7.5.1) and Enhanced General Equipment (C.7.5.2)
    dev = info.device
    ds.Manufacturer = dev.manufacturer
    ds.InstitutionName = info.institution
    ds.InstitutionAddress = f"{info.institution}, 1 Hospital Road"
    ds.StationName = dev.station
    ds.ManufacturerModelName = dev.model
    ds.DeviceSerialNumber = dev.serial
    ds.SoftwareVersions = dev.software
    # General Image / content
    ds.InstanceNumber = instance_number
    ds.ContentDate = _da(info.study_date)
    ds.ContentTime = info.study_time
    # Private block, as device exports carry: identifiers that de-identification must drop
    block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", info.patient_id)
    block.add_new(0x11, "PN", info.patient_name)
    block.add_new(0x12, "LO", info.address[:64])
    return ds


def _set_pixels(ds: Dataset, frames: list[np.ndarray], ts: str) -> None:
    """Encode frames into Pixel Data under transfer syntax `ts`, setting Image Pixel attrs."""
    first = frames[0]
    colour = first.ndim == 3
    ds.SamplesPerPixel = 3 if colour else 1
    ds.Rows, ds.Columns = int(first.shape[0]), int(first.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if colour:
        ds.PlanarConfiguration = 0
    if ts == JPEGBaseline8Bit:
        photometric = "YBR_FULL_422" if colour else "MONOCHROME2"
        encoded = [_jpeg_baseline(f) for f in frames]
    else:
        # lossless JPEG 2000 applies the reversible colour transform (PS3.5 8.2.4)
        rgb_pi = "YBR_RCT" if ts == JPEG2000Lossless else "RGB"
        photometric = rgb_pi if colour else "MONOCHROME2"
        encoded = [
            encode_frame(
                np.ascontiguousarray(f),
                ts,
                8,
                8,
                photometric,
                0,
                0 if colour else None,
            )
            for f in frames
        ]
    ds.PhotometricInterpretation = photometric
    if ts == ExplicitVRLittleEndian:
        data = b"".join(encoded)
        if len(data) % 2:
            data += b"\x00"
        ds.PixelData = data
    else:
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
    if ts == JPEGBaseline8Bit:
        raw = sum(f.nbytes for f in frames)
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = f"{raw / max(1, sum(map(len, encoded))):.2f}"[:16]
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    else:
        ds.LossyImageCompression = "00"


def _jpeg_baseline(frame: np.ndarray) -> bytes:
    """JPEG Baseline with true 4:2:2 chroma subsampling, matching YBR_FULL_422."""
    buf = io.BytesIO()
    image = Image.fromarray(frame, mode="RGB" if frame.ndim == 3 else "L")
    image.save(buf, format="JPEG", quality=92, subsampling=1 if frame.ndim == 3 else 0)
    return buf.getvalue()


def _retina_region() -> Sequence:
    return Sequence([_code("5665001", "SCT", "Retina")])


def _ophthalmic_acquisition_common(ds: Dataset) -> None:
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.PupilDilated = "YES"
    agent = Dataset()
    agent.MydriaticAgentCodeSequence = Sequence([_code("373529000", "SCT", "Tropicamide")])
    ds.MydriaticAgentSequence = Sequence([agent])
    ds.DegreeOfDilation = 7.0
    ds.RefractiveStateSequence = Sequence()


def build_fundus_op(
    info: StudyInfo,
    image: np.ndarray,
    eye: str,
    ts: str,
    sop_uid: str,
    series_uid: str,
    acquisition: dt.datetime,
    pixel_spacing_mm: float,
    fov_degrees: float,
) -> Dataset:
    """Ophthalmic Photography 8 Bit Image (PS3.3 A.39.1)."""
    ds = _base(info, OP_8BIT, sop_uid, series_uid, "OP", 1, 1, ts)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.AcquisitionDateTime = acquisition.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # name and date in the corners, outside the FOV
    ds.RecognizableVisualFeatures = "NO"
    ds.PatientOrientation = ""
    # Synchronization (C.7.4.2)
    ds.SynchronizationFrameOfReferenceUID = "1.2.840.10008.15.1.1"  # UTC synchronization
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "N"
    # Multi-frame (C.7.6.6): a single frame
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00181063  # Frame Time, as for any single-frame cine
    ds.FrameTime = 0.0
    ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    # Ocular Region Imaged (C.8.17.5)
    ds.ImageLaterality = eye
    ds.AnatomicRegionSequence = _retina_region()
    # Acquisition Context (C.7.6.14)
    ds.AcquisitionContextSequence = Sequence()
    # Ophthalmic Photography Acquisition Parameters (C.8.17.4)
    ds.PatientEyeMovementCommanded = "NO"
    ds.HorizontalFieldOfView = fov_degrees
    _ophthalmic_acquisition_common(ds)
    # Ophthalmic Photographic Parameters (C.8.17.3)
    ds.AcquisitionDeviceTypeCodeSequence = Sequence([_code("409898007", "SCT", "Fundus Camera")])
    ds.IlluminationTypeCodeSequence = Sequence()
    ds.LightPathFilterTypeStackCodeSequence = Sequence()
    ds.ImagePathFilterTypeStackCodeSequence = Sequence()
    ds.LensesCodeSequence = Sequence()
    ds.DetectorType = "CCD"
    _set_pixels(ds, [image], ts)
    return ds


def build_fundus_sc(
    info: StudyInfo,
    image: np.ndarray,
    eye: str,
    ts: str,
    sop_uid: str,
    series_uid: str,
) -> Dataset:
    """A fundus photograph re-exported by a PACS as Secondary Capture (PS3.3 A.8.1)."""
    ds = _base(info, SECONDARY_CAPTURE, sop_uid, series_uid, "OP", 90, 1, ts)
    ds.ConversionType = "WSD"  # workstation export
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.Laterality = eye  # General Series; exports carry laterality here only
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "YES"
    ds.SeriesDescription = "Fundus photograph (export)"
    _set_pixels(ds, [image], ts)
    return ds


def build_fundus_vl(
    info: StudyInfo,
    image: np.ndarray,
    eye: str,
    ts: str,
    sop_uid: str,
    series_uid: str,
    acquisition: dt.datetime,
) -> Dataset:
    """A fundus photograph exported as VL Photographic Image (PS3.3 A.33.4)."""
    ds = _base(info, VL_PHOTOGRAPHIC, sop_uid, series_uid, "XC", 91, 1, ts)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.AcquisitionDateTime = acquisition.strftime("%Y%m%d%H%M%S")
    ds.ImageLaterality = eye
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "YES"
    ds.AcquisitionContextSequence = Sequence()
    ds.AnatomicRegionSequence = _retina_region()
    ds.SeriesDescription = "Fundus photograph"
    _set_pixels(ds, [image], ts)
    return ds


@dataclass(frozen=True)
class OctSpacing:
    bscan_mm: float  # distance between B-scans
    depth_mm: float  # axial pixel size
    ascan_mm: float  # lateral pixel size


def build_oct_opt(
    info: StudyInfo,
    volume: np.ndarray,
    eye: str,
    ts: str,
    sop_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    acquisition: dt.datetime,
    spacing: OctSpacing,
    fundus_ref: tuple[str, str, tuple[int, int]] | None,
    fundus_pixel_mm: float,
    frame_order: list[int],
) -> Dataset:
    """Ophthalmic Tomography Image (PS3.3 A.41), one frame per B-scan.

    Args:
        frame_order: the order in which B-scans are stored; InStackPositionNumber keeps
            the anatomical order (devices do not always store frames in order).
        fundus_ref: (SOP Class UID, SOP Instance UID, fovea (col, row)) of the fundus
            photograph of the same eye and visit, for OphthalmicFrameLocationSequence.
    """
    n_z, _, n_x = volume.shape
    ds = _base(info, OPT, sop_uid, series_uid, "OPT", 2, 1, ts)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.AcquisitionDateTime = acquisition.strftime("%Y%m%d%H%M%S")
    ds.AcquisitionDuration = 1.6
    ds.AcquisitionNumber = 1
    ds.PresentationLUTShape = "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.ImageLaterality = eye
    ds.AnatomicRegionSequence = _retina_region()
    # Frame of Reference (C.7.4.1)
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionContextSequence = Sequence()
    # Ophthalmic Tomography Acquisition Parameters (C.8.17.8)
    ds.AxialLengthOfTheEye = None
    ds.HorizontalFieldOfView = None
    _ophthalmic_acquisition_common(ds)
    # Ophthalmic Tomography Parameters (C.8.17.9)
    ds.AcquisitionDeviceTypeCodeSequence = Sequence(
        [_code("392012008", "SCT", "Optical Coherence Tomography Scanner")]
    )
    ds.LightPathFilterTypeStackCodeSequence = Sequence()
    ds.DetectorType = "CCD"
    ds.IlluminationWaveLength = 840.0
    ds.IlluminationPower = 0.7
    ds.IlluminationBandwidth = 50.0
    ds.DepthSpatialResolution = round(spacing.depth_mm * 1000, 3)
    ds.MaximumDepthDistortion = 1.0
    ds.AlongScanSpatialResolution = round(spacing.ascan_mm * 1000, 3)
    ds.MaximumAlongScanDistortion = 1.0
    ds.AcrossScanSpatialResolution = round(spacing.bscan_mm * 1000, 3)
    ds.MaximumAcrossScanDistortion = 1.0

    # Multi-frame Functional Groups (C.7.6.16). The OPT Image module (C.8.17.7) fixes these
    # three at 0/1/1 with no Concatenation UID: the volume is never split across instances.
    ds.NumberOfFrames = n_z
    ds.ConcatenationFrameOffsetNumber = 0
    ds.InConcatenationNumber = 1
    ds.InConcatenationTotalNumber = 1
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [round(spacing.depth_mm, 6), round(spacing.ascan_mm, 6)]
    measures.SliceThickness = round(spacing.bscan_mm, 6)
    shared.PixelMeasuresSequence = Sequence([measures])
    orientation = Dataset()
    # rows run along the scan (+x), columns into the eye (-z): the normal is +y, the
    # direction the raster advances in, so plane positions sort like InStackPositionNumber
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    shared.PlaneOrientationSequence = Sequence([orientation])
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = _retina_region()
    anatomy.FrameLaterality = eye
    shared.FrameAnatomySequence = Sequence([anatomy])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    dim_uid = uid_for(0, sop_uid, "dimension")
    org = Dataset()
    org.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = Sequence([org])
    idx = Dataset()
    idx.DimensionOrganizationUID = dim_uid
    idx.DimensionIndexPointer = 0x00209057  # In-Stack Position Number
    idx.FunctionalGroupPointer = 0x00209111  # Frame Content Sequence
    idx.DimensionDescriptionLabel = "B-scan"
    ds.DimensionIndexSequence = Sequence([idx])

    per_frame = []
    frames = []
    for k in frame_order:
        item = Dataset()
        content = Dataset()
        content.FrameAcquisitionDateTime = (
            acquisition + dt.timedelta(milliseconds=12 * k)
        ).strftime("%Y%m%d%H%M%S.%f")
        content.FrameReferenceDateTime = content.FrameAcquisitionDateTime
        content.FrameAcquisitionDuration = 12.0
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [k + 1]
        item.FrameContentSequence = Sequence([content])
        position = Dataset()
        position.ImagePositionPatient = [0.0, round(k * spacing.bscan_mm, 6), 0.0]
        item.PlanePositionSequence = Sequence([position])
        if fundus_ref is not None:
            ref_class, ref_uid, (fcol, frow) = fundus_ref
            # where this B-scan lies on the fundus photograph: a horizontal line
            # (PS3.3 C.8.17.10: Reference Coordinates are row/column pairs)
            half_w = n_x * spacing.ascan_mm / fundus_pixel_mm / 2
            row = frow + (k - (n_z - 1) / 2) * spacing.bscan_mm / fundus_pixel_mm
            loc = Dataset()
            loc.ReferencedSOPClassUID = ref_class
            loc.ReferencedSOPInstanceUID = ref_uid
            loc.ReferenceCoordinates = [
                round(float(row), 2),
                round(float(fcol - half_w), 2),
                round(float(row), 2),
                round(float(fcol + half_w), 2),
            ]
            loc.OphthalmicImageOrientation = "LINEAR"
            item.OphthalmicFrameLocationSequence = Sequence([loc])
        per_frame.append(item)
        frames.append(volume[k])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    if fundus_ref is not None:
        # Referenced Image functional group (C.7.6.16.2.5): the fundus is the localizer
        ref = Dataset()
        ref.ReferencedSOPClassUID = fundus_ref[0]
        ref.ReferencedSOPInstanceUID = fundus_ref[1]
        ref.PurposeOfReferenceCodeSequence = Sequence([_code("121311", "DCM", "Localizer")])
        shared.ReferencedImageSequence = Sequence([ref])
    _set_pixels(ds, frames, ts)
    return ds


def write(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
