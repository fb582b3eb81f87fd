"""Training data sources: the four folder layouts of ``docs/ARCHITECTURE.md`` read into cases.

Every layout produces the same thing, a list of :class:`Case`: an id, the CT (display-ordered
(z, y, x), read through :func:`napari_covidseg.io.loader.load_any` so the orientation matches
what the GUI shows) in its intensity domain (HU or 8-bit display), a binary lung mask, a binary
infection mask (or ``None`` where the source has none or its label is not trusted), the spacing
(z, y, x) mm and whether that spacing is real.  Several folders are read into one list by
:func:`load_sources` (see :mod:`training.sources`).

Readings of the public releases (kept here so they are stated once):

* ``covid19ctseg`` (Zenodo 3757476): lung labels 1 (left) and 2 (right) both mean lung; the
  infection mask is binary.  The 10 Radiopaedia CTs of the release are 8-bit display images and
  are read as such (domain ``display8``).  ``Lung_and_Infection_Mask/`` (1 left lung, 2 right lung,
  3 infection) is accepted when the separate folders are missing.
* ``medseg`` (MedSeg COVID-19 CT segmentation): labels 1 ground glass and 2 consolidation are
  infection; 3 pleural effusion is *not* infection (effusion is fluid outside the lung
  parenchyma, and the papers segment parenchymal lesions only).  The 100-slice stack
  ``tr_im.nii.gz`` has no lung mask: its lung channel is missing (``None``, never invented) and
  only infection is learnt from it.
  Its slices come from ~40 patients without patient ids; we cut the stack into groups of
  consecutive slices (``MEDSEG_STACK_GROUP`` slices each) that are split as units and warn that
  slices of one patient may still fall on both sides.  The "nr. 2" volumes (``rp_im``) are
  whole patients and are cases of their own.
* ``pairs``: ``images/<case>.nii.gz`` with optional ``lung/`` and ``infection/`` masks of the same
  name; any non-zero voxel is foreground; a case needs at least one mask.
* ``phantom``: :func:`napari_covidseg.phantom.make_phantom` with seeds ``0..N-1``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from napari_covidseg.errors import CovidsegError, DataFolderError
from napari_covidseg.intensity import DOMAINS, HU
from napari_covidseg.io.loader import is_single_volume_file, load_any, volume_stem

from .sources import DataSource, as_sources

LAYOUTS = ("covid19ctseg", "medseg", "pairs", "phantom")
PHANTOM = "phantom"
MEDSEG_STACK_GROUP = 10  # consecutive slices of the MedSeg stack kept together in a split
NIFTI_SUFFIXES = (".nii.gz", ".nii")
DEFAULT_PHANTOM_SHAPE = (32, 192, 192)
#: largest difference between a mask's and its CT's affine entries (mm) that still counts as one grid
GRID_TOLERANCE_MM = 1e-3


@dataclass
class Case:
    """One training/evaluation case (a CT plus binary masks on the same grid)."""

    case_id: str
    ct: np.ndarray  # (z, y, x), in ``domain``
    lung: Optional[np.ndarray]  # (z, y, x) uint8 0/1, None when the source has no (trusted) lung mask
    infection: Optional[np.ndarray]  # (z, y, x) uint8 0/1, None when the source has none
    spacing: Tuple[float, float, float]
    group: str = ""  # cases of one group always land on the same side of a split
    notes: List[str] = field(default_factory=list)
    domain: str = HU  # "hu" or "display8"
    spacing_known: bool = True  # False: the spacing is a placeholder (no mm / mL from it)
    source: str = ""  # name of the data source (folder) it came from

    def __post_init__(self):
        if not self.group:
            self.group = self.case_id

    def labels(self) -> List[str]:
        return [name for name, m in (("lung", self.lung), ("infection", self.infection)) if m is not None]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _is_nifti(path: Path) -> bool:
    """A file that is one case's volume: NIfTI, NRRD/MHA, a slice image or a .zip (the name is historic)."""
    return is_single_volume_file(path)


def _stem(path: Path) -> str:
    return volume_stem(path)


def _nifti_by_stem(folder: Path) -> Dict[str, Path]:
    """Case id -> volume: the files of ``folder`` that are volumes, and its sub-folders (a DICOM series
    or a folder of numbered slices each).  Two volumes for one case id are refused, not one dropped."""
    if not folder.is_dir():
        return {}
    found: Dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not (_is_nifti(p) or (p.is_dir() and not p.name.startswith("."))):
            continue
        if _stem(p) in found:
            raise DataFolderError(f"{folder}: {found[_stem(p)].name} and {p.name} are both case {_stem(p)}; keep one of them")
        found[_stem(p)] = p
    return found


def _load(path: Path, kind: str):
    try:
        return load_any(path, kind=kind, check_hounsfield=(kind == "image"))
    except CovidsegError as exc:
        raise DataFolderError(f"cannot use {path}: {exc}") from None
    except Exception as exc:  # reader errors of all kinds for broken files
        raise DataFolderError(f"cannot read {path} ({type(exc).__name__}: {exc}); replace or remove the file") from None


def _mask_on(ct_vol, mask_vol, path: Path, what: str) -> np.ndarray:
    """The mask's voxels if it lies voxel for voxel on its CT's grid (same shape *and* position/orientation:
    a mask mirrored or shifted against its CT would teach the network wrong labels), else a DataFolderError."""
    if tuple(mask_vol.data.shape) != tuple(ct_vol.data.shape):
        raise DataFolderError(
            f"{what} mask {path} has shape {tuple(mask_vol.data.shape)} but its CT has shape {tuple(ct_vol.data.shape)}; "
            "a mask must be on the CT's voxel grid (same size); re-export it from the CT"
        )
    difference = float(np.max(np.abs(mask_vol.geometry.affine - ct_vol.geometry.affine)))
    if not difference <= GRID_TOLERANCE_MM:
        raise DataFolderError(
            f"{what} mask {path} has its CT's shape but another position/orientation (affines differ by up to "
            f"{difference:.3g} mm; CT {_axcodes(ct_vol)}, mask {_axcodes(mask_vol)}): its labels would be mirrored or "
            "shifted against the CT; re-export the mask from this CT (or fix its header)"
        )
    return mask_vol.data


def _axcodes(vol) -> str:
    import nibabel as nib

    return "".join(nib.aff2axcodes(vol.geometry.affine))


def _spacing(vol) -> Tuple[float, float, float]:
    return tuple(float(s) for s in vol.spacing)


def _case(cid: str, ct_vol, lung, infection, image=None, **kwargs) -> Case:
    """A :class:`Case` of a loaded CT volume (``image`` replaces its voxels, e.g. a slice range)."""
    return Case(cid, ct_vol.data if image is None else image, lung, infection, _spacing(ct_vol),
                domain=ct_vol.domain, spacing_known=ct_vol.spacing_known, **kwargs)


# ------------------------------------------------------------------------------------------------
# layout detection
# ------------------------------------------------------------------------------------------------
def detect_layout(data: str) -> str:
    """Name of the layout of ``data`` (a folder, or ``"phantom"``); :class:`DataFolderError` if none fits."""
    if str(data) == PHANTOM:
        return PHANTOM
    root = Path(data)
    if not root.exists():
        raise DataFolderError(f"the data folder {root} does not exist; give a folder with CT and mask NIfTI files, or 'phantom'")
    if not root.is_dir():
        raise DataFolderError(f"{root} is a file, not a folder; give the folder that holds the training data")
    entries = list(root.iterdir())
    if not entries:
        raise DataFolderError(f"the data folder {root} is empty; put the CTs and masks in it (see `python -m training check-data --help`)")
    names = {p.name for p in entries}
    if any(n.startswith("COVID-19-CT-Seg") for n in names) or "Lung_Mask" in names or "Infection_Mask" in names:
        return "covid19ctseg"
    if "tr_im.nii.gz" in names or "tr_im.nii" in names or "rp_im" in names:
        return "medseg"
    if "images" in names:
        return "pairs"
    niftis = [p for p in entries if _is_nifti(p)]
    hint = (f" It holds {len(niftis)} NIfTI file(s) loose at the top level: put CTs in images/, lung masks in lung/ and "
            "infection masks in infection/ (same file names)." if niftis else
            " It holds no NIfTI (.nii/.nii.gz) files at the top level.")
    raise DataFolderError(
        f"cannot tell the layout of {root}: expected one of covid19ctseg (COVID-19-CT-Seg_20cases/, Lung_Mask/, Infection_Mask/), "
        f"medseg (tr_im.nii.gz + tr_mask.nii.gz, or rp_im/ + rp_msk/), or pairs (images/ + lung/ and/or infection/).{hint}"
    )


# ------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------
def _read_covid19ctseg(root: Path) -> List[Case]:
    image_dirs = [p for p in sorted(root.iterdir()) if p.is_dir() and p.name.startswith("COVID-19-CT-Seg")]
    if not image_dirs:
        raise DataFolderError(f"{root}: no COVID-19-CT-Seg_20cases/ folder with the CT volumes")
    images = {}
    for d in image_dirs:
        images.update(_nifti_by_stem(d))
    if not images:
        raise DataFolderError(f"{image_dirs[0]} holds no NIfTI files (.nii.gz); copy the CT volumes there")
    lungs = _nifti_by_stem(root / "Lung_Mask")
    infections = _nifti_by_stem(root / "Infection_Mask")
    combined = _nifti_by_stem(root / "Lung_and_Infection_Mask")
    cases = []
    for cid, path in images.items():
        if cid not in lungs and cid not in infections and cid not in combined:
            raise DataFolderError(
                f"case {cid}: no mask found in Lung_Mask/, Infection_Mask/ or Lung_and_Infection_Mask/ (expected {cid}.nii.gz); "
                "add its masks or remove the CT"
            )
        ct = _load(path, "image")
        lung = infection = None
        if cid in lungs:
            lung = (np.isin(_mask_on(ct, _load(lungs[cid], "labels"), lungs[cid], "lung"), (1, 2))).astype(np.uint8)
        if cid in infections:
            infection = (_mask_on(ct, _load(infections[cid], "labels"), infections[cid], "infection") != 0).astype(np.uint8)
        if (lung is None or infection is None) and cid in combined:
            both = _mask_on(ct, _load(combined[cid], "labels"), combined[cid], "lung-and-infection")
            if lung is None:
                lung = np.isin(both, (1, 2, 3)).astype(np.uint8)
            if infection is None:
                infection = (both == 3).astype(np.uint8)
        cases.append(_case(cid, ct, lung, infection))
    return cases


def _read_medseg(root: Path) -> List[Case]:
    cases: List[Case] = []
    stack = next((root / n for n in ("tr_im.nii.gz", "tr_im.nii") if (root / n).is_file()), None)
    if stack is not None:
        mask_path = next((root / n for n in ("tr_mask.nii.gz", "tr_mask.nii") if (root / n).is_file()), None)
        if mask_path is None:
            raise DataFolderError(f"{root}: tr_im.nii.gz has no tr_mask.nii.gz next to it; add the mask file")
        ct = _load(stack, "image")
        labels = _mask_on(ct, _load(mask_path, "labels"), mask_path, "MedSeg")
        infection = np.isin(labels, (1, 2)).astype(np.uint8)
        n = ct.data.shape[0]
        warnings.warn(
            "MedSeg tr_im is a stack of slices from ~40 patients without patient ids; it is split in groups of "
            f"{MEDSEG_STACK_GROUP} consecutive slices, so slices of one patient may fall on both sides of the split",
            stacklevel=2,
        )
        for g, start in enumerate(range(0, n, MEDSEG_STACK_GROUP)):
            sl = slice(start, min(n, start + MEDSEG_STACK_GROUP))
            cases.append(_case(f"tr_im_{start:03d}", ct, None, infection[sl], image=ct.data[sl], group=f"tr_im_group{g}",
                               notes=["slice group of the MedSeg stack; no lung mask"]))
    rp_images = _nifti_by_stem(root / "rp_im")
    rp_masks = _nifti_by_stem(root / "rp_msk")
    rp_lungs = _nifti_by_stem(root / "rp_lung_msk")
    for cid, path in rp_images.items():
        if cid not in rp_masks and cid not in rp_lungs:
            raise DataFolderError(f"MedSeg case rp_im/{path.name}: no mask in rp_msk/ or rp_lung_msk/; add it or remove the CT")
        ct = _load(path, "image")
        infection = lung = None
        if cid in rp_masks:
            infection = np.isin(_mask_on(ct, _load(rp_masks[cid], "labels"), rp_masks[cid], "infection"), (1, 2)).astype(np.uint8)
        if cid in rp_lungs:
            lung = (_mask_on(ct, _load(rp_lungs[cid], "labels"), rp_lungs[cid], "lung") != 0).astype(np.uint8)
        cases.append(_case(f"rp_{cid}", ct, lung, infection))
    if not cases:
        raise DataFolderError(f"{root}: no MedSeg volumes found (tr_im.nii.gz or rp_im/*.nii.gz)")
    return cases


def _read_pairs(root: Path) -> List[Case]:
    img_dir = root / "images"
    others = [p.name for p in img_dir.iterdir() if p.is_file() and not _is_nifti(p) and not p.name.startswith(".")]
    images = _nifti_by_stem(img_dir)
    if not images:
        extra = f" (it holds other files: {', '.join(sorted(others)[:3])})" if others else ""
        raise DataFolderError(f"{img_dir} holds no NIfTI (.nii/.nii.gz) CT files{extra}; put one CT per case there")
    if others:
        warnings.warn(f"{img_dir}: ignoring files that are not NIfTI: {', '.join(sorted(others)[:5])}", stacklevel=2)
    lungs = _nifti_by_stem(root / "lung")
    infections = _nifti_by_stem(root / "infection")
    cases = []
    for cid, path in images.items():
        if cid not in lungs and cid not in infections:
            raise DataFolderError(
                f"case {cid}: no mask found (expected lung/{path.name} and/or infection/{path.name}); "
                "add a mask or remove the CT from images/"
            )
        ct = _load(path, "image")
        lung = (_mask_on(ct, _load(lungs[cid], "labels"), lungs[cid], "lung") != 0).astype(np.uint8) if cid in lungs else None
        infection = ((_mask_on(ct, _load(infections[cid], "labels"), infections[cid], "infection") != 0).astype(np.uint8)
                     if cid in infections else None)
        cases.append(_case(cid, ct, lung, infection))
    return cases


def phantom_spacing(shape: Sequence[int]) -> Tuple[float, float, float]:
    """Spacing that keeps the default phantom's field of view at another voxel count."""
    from napari_covidseg.phantom import DEFAULT_SHAPE, DEFAULT_SPACING

    return tuple(float(s) * d / n for s, d, n in zip(DEFAULT_SPACING, DEFAULT_SHAPE, shape))


def phantom_cases(n: int, shape: Sequence[int] = DEFAULT_PHANTOM_SHAPE, first_seed: int = 0, healthy: int = 0) -> List[Case]:
    """``n`` phantoms from seeds ``first_seed...``; the last ``healthy`` of them have no lesion
    (ids ``phantom_<seed>_healthy``), so a network also sees lungs without infection."""
    from napari_covidseg.phantom import make_phantom

    if n < 2:
        raise DataFolderError(f"at least 2 phantom cases are needed (one to train, one to validate), not {n}")
    if not 0 <= healthy <= n:
        raise DataFolderError(f"healthy phantoms must be between 0 and the number of phantoms ({n}), not {healthy}")
    shape = tuple(int(s) for s in shape)
    spacing = phantom_spacing(shape)
    out = []
    for k, seed in enumerate(range(first_seed, first_seed + n)):
        is_healthy = k >= n - healthy
        p = make_phantom(shape=shape, spacing=spacing, seed=seed, healthy=is_healthy)
        out.append(Case(f"phantom_{seed:03d}" + ("_healthy" if is_healthy else ""), p.ct, p.lung.astype(np.uint8),
                        p.infection.astype(np.uint8), tuple(p.spacing)))
    return out


def load_cases(data: str, layout: str = "auto", phantom_n: int = 8, phantom_shape=DEFAULT_PHANTOM_SHAPE,
               phantom_healthy: int = 0) -> Tuple[str, List[Case]]:
    """Read every case of ``data``; returns ``(layout, cases)``."""
    if layout not in ("auto",) + LAYOUTS:
        raise DataFolderError(f"unknown layout {layout!r}; use auto, {', '.join(LAYOUTS)}")
    if str(data) == PHANTOM or layout == PHANTOM:
        return PHANTOM, phantom_cases(phantom_n, phantom_shape, healthy=phantom_healthy)
    detected = detect_layout(data)
    layout = detected if layout == "auto" else layout
    root = Path(data)
    reader = {"covid19ctseg": _read_covid19ctseg, "medseg": _read_medseg, "pairs": _read_pairs}[layout]
    if layout != detected:
        warnings.warn(f"{root} looks like {detected}, reading it as {layout} as asked", stacklevel=2)
    cases = reader(root)
    if not cases:
        raise DataFolderError(f"{root}: no cases found in the {layout} layout")
    return layout, cases


def load_sources(data, phantom_n: int = 8, phantom_shape=DEFAULT_PHANTOM_SHAPE) -> Tuple[List[DataSource], List[str], List[Case]]:
    """Read every source of ``data`` (see :func:`training.sources.as_sources`); returns
    ``(sources, layouts, cases)``.  Labels a source does not trust are dropped (``None``); with
    several sources, case ids and groups are prefixed ``<source>/`` so they stay apart."""
    sources = as_sources(data)
    layouts, cases = [], []
    for source in sources:
        n = source.cases if source.cases is not None else phantom_n
        layout, found = load_cases(source.path, source.layout, n, phantom_shape, source.healthy or 0)
        layouts.append(layout)
        for case in found:
            case.source = source.name
            if source.labels is not None:
                if "lung" not in source.labels:
                    case.lung = None
                if "infection" not in source.labels:
                    case.infection = None
            if not case.labels():
                raise DataFolderError(f"case {case.case_id} of {source.path} has none of the labels {'+'.join(source.labels)}")
            if len(sources) > 1:
                case.case_id, case.group = f"{source.name}/{case.case_id}", f"{source.name}/{case.group}"
        cases.extend(found)
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataFolderError(f"case id(s) {', '.join(duplicates[:5])} appear twice; give each case one file name")
    return sources, layouts, cases


def absent_label_warnings(cases: Sequence[Case], names: Sequence[str] = ("lung", "infection"), where: str = "case") -> List[str]:
    """A warning for each class in ``names`` that no case of ``cases`` shows: no mask at all, or only
    empty masks (a folder of healthy lungs has no infection to learn or to score)."""
    out = []
    for name in names:
        masks = [getattr(c, name) for c in cases if getattr(c, name) is not None]
        if not masks:
            article = "an" if name[0] in "aeiou" else "a"
            out.append(f"no {where} has {article} {name} mask: the {name} channel is neither learnt nor validated "
                       "from this data")
        elif not any(bool(np.any(m)) for m in masks):
            out.append(f"no {where} has any {name} voxel (all {len(masks)} {name} masks are empty): the network cannot "
                       f"learn {name} from this data, and no {name} Dice can be computed on it")
    return out


def _domain_summary(cases: Sequence[Case]) -> dict:
    out = {}
    for domain in DOMAINS:
        chosen = [c for c in cases if c.domain == domain]
        if chosen:
            out[domain] = {"cases": len(chosen), "slices": int(sum(c.ct.shape[0] for c in chosen)),
                           "spacing_known": sum(c.spacing_known for c in chosen),
                           "value_range": [float(min(c.ct.min() for c in chosen)), float(max(c.ct.max() for c in chosen))]}
    return out


def _label_summary(cases: Sequence[Case]) -> dict:
    return {name: sum(1 for c in cases if name in c.labels()) for name in ("lung", "infection")}


def check_data(data, layout: str = "auto", phantom_n: int = 8, phantom_shape=DEFAULT_PHANTOM_SHAPE) -> dict:
    """A report of what ``data`` (one or several sources) holds, per source and per intensity
    domain (for ``python -m training check-data``); raises on unusable data."""
    if isinstance(data, str) and layout != "auto":
        data = f"{data},layout={layout}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sources, layouts, cases = load_sources(data, phantom_n, phantom_shape)
    problems = [str(w.message) for w in caught] + absent_label_warnings(cases)
    report_cases = []
    for c in cases:
        entry = {"id": c.case_id, "source": c.source, "shape": list(c.ct.shape), "spacing": list(c.spacing),
                 "spacing_known": c.spacing_known, "domain": c.domain, "labels": c.labels(), "group": c.group}
        if c.lung is not None and not c.lung.any():
            problems.append(f"case {c.case_id}: the lung mask is empty")
        if c.infection is not None:
            entry["infection_voxels"] = int(np.count_nonzero(c.infection))
        report_cases.append(entry)
    per_source = []
    for source, found_layout in zip(sources, layouts):
        mine = [c for c in cases if c.source == source.name]
        per_source.append({"source": source.to_text(), "name": source.name, "layout": found_layout, "n_cases": len(mine),
                           "n_groups": len({c.group for c in mine}), "slices": int(sum(c.ct.shape[0] for c in mine)),
                           "labels": _label_summary(mine), "domains": _domain_summary(mine)})
    return {"data": [s.to_text() for s in sources], "layout": layouts[0] if len(layouts) == 1 else layouts,
            "n_cases": len(cases), "n_groups": len({c.group for c in cases}), "domains": _domain_summary(cases),
            "sources": per_source, "cases": report_cases, "problems": problems}
