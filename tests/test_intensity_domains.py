"""Two intensity domains, one product: CT in HU and 8-bit display images (0..255).

The reader tells them apart and says when the spacing is a placeholder; a checkpoint records the
domain its network learnt and how HU is mapped into 8-bit; inference maps or refuses with the
reason; sizes are in voxels, not mL, where the spacing is unknown."""

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_covidseg.errors import InputError
from napari_covidseg.inference import predict_volume
from napari_covidseg.intensity import (CT_SEG_PNG_RECIPE, DISPLAY8, HU, LUNG_WINDOW, DomainError, HUToDisplay8,
                                       looks_like_display8, slice_minmax_clahe)
from napari_covidseg.io.nifti import load_volume
from napari_covidseg.models import get_network
from napari_covidseg.phantom import make_phantom
from napari_covidseg.preprocessing import Preprocessing, preprocess
from napari_covidseg.quantify import quantify

DISPLAY_PREP = Preprocessing(domain=DISPLAY8, hu_to_display8=CT_SEG_PNG_RECIPE.to_dict(), inplane_size=(64, 64))


def _nifti(path, array, zooms=(1.0, 1.0, 1.0)):
    img = nib.Nifti1Image(array, np.diag([-zooms[0], -zooms[1], zooms[2], 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


def _eight_bit(shape=(40, 30, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


# --- reading ------------------------------------------------------------------------------------
def test_8bit_file_opens_in_the_display_domain_with_placeholder_spacing(tmp_path):
    vol = load_volume(_nifti(tmp_path / "slices.nii.gz", _eight_bit()))
    assert vol.kind == "image" and vol.domain == DISPLAY8 and vol.data.dtype == np.uint8
    assert vol.spacing_known is False  # 1 mm everywhere in an 8-bit image: a converter's placeholder


def test_8bit_with_real_spacing_keeps_it_and_hu_is_hu(tmp_path):
    vol = load_volume(_nifti(tmp_path / "png.nii.gz", _eight_bit(), zooms=(0.7, 0.7, 5.0)))
    assert vol.domain == DISPLAY8 and vol.spacing_known
    ct = make_phantom(shape=(4, 32, 32)).ct
    hu = load_volume(_nifti(tmp_path / "ct.nii.gz", np.ascontiguousarray(ct.transpose(2, 1, 0))))
    assert hu.domain == HU and hu.spacing_known  # a real HU CT at 1 mm isotropic is not a placeholder


def test_display_detection_rules():
    assert looks_like_display8(np.array([0, 255], np.uint8))
    assert looks_like_display8(np.array([3.0, 200.0], np.float32))
    assert not looks_like_display8(np.array([-1000, 40], np.int16))  # air: HU
    assert not looks_like_display8(np.array([0.2, 0.7], np.float32))  # normalised, not 8-bit
    assert not looks_like_display8(np.full(5, 7, np.uint8))  # no contrast


# --- mapping HU into 8-bit -------------------------------------------------------------------------
def test_recipe_maps_each_slice_to_256_and_uses_the_full_range():
    ct = make_phantom(shape=(4, 100, 120)).ct[:3]
    out = CT_SEG_PNG_RECIPE(ct)
    assert out.shape == (3, 256, 256) and out.dtype == np.uint8
    assert all(s.min() < 20 and s.max() > 235 for s in out)
    padded, air = ct.copy(), ct.copy()
    padded[:, :5], air[:, :5] = -3024, -1024  # scanner padding outside the field of view is air
    assert np.array_equal(CT_SEG_PNG_RECIPE(padded), CT_SEG_PNG_RECIPE(air))


def test_lung_window_is_exact():
    hu = np.array([[[-2000.0, -1350.0, -600.0, 150.0, 900.0]]])
    assert LUNG_WINDOW(hu).tolist() == [[[0, 0, 128, 255, 255]]]
    assert "W 1500 / L -600" in LUNG_WINDOW.describe()


def test_mapping_round_trips_through_a_checkpoint_dict():
    prep = Preprocessing.from_dict(DISPLAY_PREP.to_dict())
    assert prep == DISPLAY_PREP and prep.mapping == CT_SEG_PNG_RECIPE
    assert "CLAHE" in prep.describe_domains()
    old = Preprocessing.from_dict({"hu_min": -1250.0, "hu_max": 250.0, "normalisation": "minmax"})
    assert old.domain == HU  # checkpoints from before domains existed were all trained in HU
    with pytest.raises(ValueError):
        HUToDisplay8(method="gamma")


def test_hu_network_refuses_8bit_with_the_reason_and_display_network_reads_both():
    prep_hu = Preprocessing()
    with pytest.raises(DomainError) as info:
        preprocess(_eight_bit((2, 16, 16)), prep_hu, DISPLAY8)
    assert "HU cannot be recovered" in str(info.value) and isinstance(info.value, InputError)
    eight = preprocess(_eight_bit((2, 16, 16)), DISPLAY_PREP, DISPLAY8)
    assert eight.shape == (2, 16, 16) and 0.0 <= eight.min() and eight.max() <= 1.0
    mapped = preprocess(make_phantom(shape=(4, 32, 32)).ct[:2], DISPLAY_PREP, HU)
    assert mapped.shape == (2, 256, 256)  # the recipe's slice size


@pytest.mark.parametrize("network", ["unet", "qchc_unet3d"])
def test_prediction_comes_back_on_the_input_grid_in_both_domains(network):
    spec = get_network(network)
    torch.manual_seed(0)
    model = spec.create(base=4)
    prep = DISPLAY_PREP if spec.dims == 2 else Preprocessing(domain=DISPLAY8, hu_to_display8=LUNG_WINDOW.to_dict(),
                                                             normalisation="zscore", inplane_size=(32, 32))
    ct = make_phantom(shape=(5, 40, 48)).ct
    for image, domain in ((ct, HU), (_eight_bit((5, 40, 48)), DISPLAY8)):
        prob = predict_volume(model, spec, image, (5.0, 1.0, 1.0), prep, domain=domain, patch_size=(4, 32, 32))
        assert prob.shape == (2, 5, 40, 48) and np.isfinite(prob).all()


# --- sizes without a real spacing ---------------------------------------------------------------
def test_quantify_gives_voxels_not_ml_when_the_spacing_is_a_placeholder():
    ph = make_phantom(shape=(8, 64, 64))
    known = quantify(ph.lung, ph.infection, (1.0, 1.0, 1.0))
    unknown = quantify(ph.lung, ph.infection, (1.0, 1.0, 1.0), spacing_known=False)
    assert known["volume_unit"] == "mL" and "lung_ml" in known
    assert unknown["volume_unit"] == "voxels" and not any(k.endswith("_ml") for k in unknown if k != "voxel_volume_ml")
    assert unknown["voxel_volume_ml"] is None
    assert unknown["lung_voxels"] == int(ph.lung.sum())
    assert unknown["total_involvement_pct"] == pytest.approx(known["total_involvement_pct"])
    assert unknown["n_lesions"] == known["n_lesions"]  # same size threshold at the 1 mm placeholder


def test_clahe_mapping_handles_constant_and_tiny_slices():
    out = slice_minmax_clahe(np.full((2, 8, 8), -1000, np.int16), size=(16, 16))
    assert out.shape == (2, 16, 16) and not out.any()
