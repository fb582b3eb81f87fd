"""napari reader and writer hooks: layers come out oriented (patient left on the right), scaled in
mm, in the lung window, with geometry; saved masks land on the CT's grid; the CT is never
overwritten."""

import nibabel as nib
import numpy as np
import pytest

from napari_covidseg._reader import get_reader, layer_name
from napari_covidseg._writer import GeometryMissingWarning, write_image, write_labels
from napari_covidseg.errors import InputError
from napari_covidseg.io.geometry import GEOMETRY_KEY, Geometry
from napari_covidseg.io.nifti import SOURCE_PATH_KEY, load_volume

FILE_SHAPE = (24, 20, 6)  # x, y, z in the file
SPACING_XYZ = (0.7, 0.8, 2.5)
AFFINES = {
    # file axis 0 runs toward patient Right (RAS), Left (LAS/LPS)
    "RAS": np.diag([0.7, 0.8, 2.5, 1.0]),
    "LPS": np.diag([-0.7, -0.8, 2.5, 1.0]),
    "LAS": np.diag([-0.7, 0.8, 2.5, 1.0]),
}
MARKER_HU = 3000


def _ct_with_left_marker(path, affine):
    """Air-filled CT with one bright voxel 5 voxels from the patient's left edge, z = 3."""
    ct = np.full(FILE_SHAPE, -1000, np.int16)
    ct[4:20, 4:16, :] = 40  # a body, so it is CT-like
    toward_left = affine[0, 0] < 0  # file axis 0 increases toward patient left (world -x)
    i = FILE_SHAPE[0] - 6 if toward_left else 5
    ct[i, 10, 3] = MARKER_HU
    img = nib.Nifti1Image(ct, affine)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=1)
    nib.save(img, str(path))
    # sanity of the fixture: the marker's world x is on the patient's left (negative in RAS)
    world = affine @ np.array([i, 10, 3, 1.0])
    centre = affine @ np.array([(FILE_SHAPE[0] - 1) / 2, 10, 3, 1.0])
    assert world[0] < centre[0]
    return path


def test_get_reader_accepts_only_volume_formats():
    assert get_reader("ct.nii.gz") is not None and get_reader("CT.NII") is not None
    assert get_reader("notes.txt") is None and get_reader(["a.nii", "b.csv"]) is None
    assert layer_name("/data/case_01.nii.gz") == "case_01"  # other formats: tests/test_io_napari.py


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_reader_gives_scaled_lung_window_image_with_left_on_the_right(make_napari_viewer, tmp_path, orientation):
    path = _ct_with_left_marker(tmp_path / "chest.nii.gz", AFFINES[orientation])
    viewer = make_napari_viewer(show=True)  # the canvas only renders when shown (under xvfb in CI)
    layers = viewer.open(str(path), plugin="napari-covidseg")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.__class__.__name__ == "Image" and layer.name == "chest"
    np.testing.assert_allclose(layer.scale, (2.5, 0.8, 0.7), rtol=1e-6)
    np.testing.assert_allclose(layer.contrast_limits, (-1350.0, 150.0))
    assert layer.colormap.name == "gray"
    geometry = layer.metadata[GEOMETRY_KEY]
    assert isinstance(geometry, Geometry) and geometry.header is not None
    np.testing.assert_allclose(geometry.affine, AFFINES[orientation])
    assert layer.metadata[SOURCE_PATH_KEY] == str(path.resolve())

    # the marker (patient left) is in the right half of the axial slice napari displays
    z, row, col = np.argwhere(layer.data == MARKER_HU)[0]
    assert col > layer.data.shape[2] / 2
    viewer.dims.set_point(0, z * layer.scale[0])
    layer.contrast_limits = (2000, 3000)  # only the marker is bright
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    bright = np.argwhere(shot[..., :3].max(axis=-1) > 200)
    assert len(bright) > 0
    assert bright[:, 1].mean() > shot.shape[1] / 2


def test_mask_file_becomes_labels_with_same_scale(make_napari_viewer, tmp_path):
    mask = np.zeros(FILE_SHAPE, np.uint8)
    mask[5:10, 5:10, 2:4] = 1
    mask[14:18, 5:10, 2:4] = 2
    nib.save(nib.Nifti1Image(mask, AFFINES["LAS"]), str(tmp_path / "lungs.nii.gz"))
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "lungs.nii.gz"), plugin="napari-covidseg")
    assert layer.__class__.__name__ == "Labels"
    np.testing.assert_allclose(layer.scale, (2.5, 0.8, 0.7), rtol=1e-6)
    assert set(np.unique(layer.data)) == {0, 1, 2}
    assert isinstance(layer.metadata[GEOMETRY_KEY], Geometry)


def test_labels_layer_saved_through_napari_lands_on_ct_grid(make_napari_viewer, tmp_path):
    ct_path = _ct_with_left_marker(tmp_path / "chest.nii.gz", AFFINES["LPS"])
    viewer = make_napari_viewer()
    (ct_layer,) = viewer.open(str(ct_path), plugin="napari-covidseg")
    prediction = (ct_layer.data > 0).astype(np.uint8)
    labels = viewer.add_labels(prediction, name="lung", scale=ct_layer.scale, metadata={GEOMETRY_KEY: ct_layer.metadata[GEOMETRY_KEY]})
    out = tmp_path / "lung_mask.nii.gz"
    written = labels.save(str(out), plugin="napari-covidseg")
    assert [str(p) for p in written] == [str(out)]
    saved = nib.load(str(out))
    np.testing.assert_allclose(saved.affine, AFFINES["LPS"])
    ct_file = np.asanyarray(nib.load(str(ct_path)).dataobj)
    assert np.array_equal(np.asanyarray(saved.dataobj), (ct_file > 0).astype(np.uint8))
    assert load_volume(out).kind == "labels"


def test_writer_refuses_to_overwrite_the_ct(tmp_path):
    ct_path = _ct_with_left_marker(tmp_path / "chest.nii.gz", AFFINES["RAS"])
    ct = load_volume(ct_path)
    before = ct_path.read_bytes()
    meta = {"name": "lung", "scale": ct.spacing, "metadata": {GEOMETRY_KEY: ct.geometry}}
    with pytest.raises(InputError, match="never overwritten"):
        write_labels(str(ct_path), np.zeros(ct.data.shape, np.uint8), meta)
    image_meta = {"name": "chest", "scale": ct.spacing, "metadata": {GEOMETRY_KEY: ct.geometry, SOURCE_PATH_KEY: str(ct_path)}}
    with pytest.raises(InputError, match="never overwritten"):
        write_image(str(ct_path), ct.data, image_meta)
    assert ct_path.read_bytes() == before
    # saving the image elsewhere is an exact copy in the source orientation
    copy = write_image(str(tmp_path / "copy.nii.gz"), ct.data, image_meta)
    assert np.array_equal(np.asanyarray(nib.load(copy[0]).dataobj), np.asanyarray(nib.load(str(ct_path)).dataobj))


def test_mask_may_be_saved_over_its_own_mask_file(tmp_path):
    mask = np.zeros(FILE_SHAPE, np.uint8)
    mask[3:6, 3:6, 1:3] = 1
    path = tmp_path / "lung.nii.gz"
    nib.save(nib.Nifti1Image(mask, AFFINES["LAS"]), str(path))
    volume = load_volume(path)
    edited = volume.data.copy()
    edited[0, 0, 0] = 1
    meta = {"name": "lung", "scale": volume.spacing, "metadata": {GEOMETRY_KEY: volume.geometry, SOURCE_PATH_KEY: str(path)}}
    write_labels(str(path), edited, meta)
    assert np.array_equal(load_volume(path).data, edited)


def test_labels_without_geometry_fall_back_to_scale_with_warning(tmp_path):
    data = np.zeros((4, 5, 6), np.int64)  # napari's default label dtype
    data[1, 2, 3] = 2
    out = tmp_path / "orphan"  # no extension: .nii.gz is added
    with pytest.warns(GeometryMissingWarning, match="no CT geometry"):
        written = write_labels(str(out), data, {"name": "orphan", "scale": (2.0, 0.5, 0.5), "metadata": {}})
    assert written == [str(tmp_path / "orphan.nii.gz")]
    back = load_volume(written[0])
    assert back.data.dtype == np.uint8 and np.array_equal(back.data, data)
    np.testing.assert_allclose(back.spacing, (2.0, 0.5, 0.5))


def test_wrong_shape_for_geometry_is_refused(tmp_path):
    ct = load_volume(_ct_with_left_marker(tmp_path / "chest.nii.gz", AFFINES["RAS"]))
    meta = {"name": "lung", "scale": ct.spacing, "metadata": {GEOMETRY_KEY: ct.geometry}}
    with pytest.raises(InputError, match="cannot be saved on that CT's grid"):
        write_labels(str(tmp_path / "m.nii.gz"), np.zeros((2, 3, 4), np.uint8), meta)
    assert not (tmp_path / "m.nii.gz").exists()


def test_mask_that_fits_no_open_ct_is_opened_with_a_warning(make_napari_viewer, tmp_path, monkeypatch):
    warned = []
    monkeypatch.setattr("napari.utils.notifications.show_warning", lambda message: warned.append(message))
    ct_path = _ct_with_left_marker(tmp_path / "chest.nii.gz", AFFINES["LPS"])
    fitting = np.zeros(FILE_SHAPE, np.uint8)
    fitting[5:9, 5:9, 2] = 1
    nib.save(nib.Nifti1Image(fitting, AFFINES["LPS"]), str(tmp_path / "fits.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((10, 10, 4), np.uint8), AFFINES["LPS"]), str(tmp_path / "other.nii.gz"))
    viewer = make_napari_viewer()
    viewer.open(str(ct_path), plugin="napari-covidseg")
    viewer.open(str(tmp_path / "fits.nii.gz"), plugin="napari-covidseg")
    assert warned == []
    (other,) = viewer.open(str(tmp_path / "other.nii.gz"), plugin="napari-covidseg")
    assert other.__class__.__name__ == "Labels"  # still opened: the user may want to look at it
    assert len(warned) == 1 and "other.nii.gz" in warned[0] and "'chest'" in warned[0]
