"""The phantom sample data through napari's own menu path: layers, metadata, a non-blank canvas."""

import os
import time

import numpy as np
import pytest

from napari_covidseg._sample_data import LUNG_WINDOW, chest_phantom_small
from napari_covidseg.io.geometry import GEOMETRY_KEY, Geometry

SCREENSHOTS = os.path.join(os.path.dirname(__file__), "..", "screenshots")


def test_layer_data_tuples():
    layers = chest_phantom_small()
    assert [t[2] for t in layers] == ["image", "labels", "labels"]
    (ct, ct_kw, _), (lung, lung_kw, _), (inf, inf_kw, _) = layers
    assert ct.dtype == np.int16 and lung.dtype == np.uint8 and inf.dtype == np.uint8
    assert ct.shape == lung.shape == inf.shape == (24, 128, 128)
    for kw in (ct_kw, lung_kw, inf_kw):
        assert kw["scale"] == (10.0, 2.8, 2.8)
        geom = kw["metadata"][GEOMETRY_KEY]
        assert isinstance(geom, Geometry)
        assert geom.spacing == pytest.approx((10.0, 2.8, 2.8))
        assert geom.display_shape == ct.shape
        assert kw["metadata"]["phantom_seed"] == 0
    assert ct_kw["metadata"] is not lung_kw["metadata"]  # each layer owns its metadata
    assert ct_kw["contrast_limits"] == LUNG_WINDOW
    assert lung_kw["visible"] is False


def test_open_sample_and_screenshot(make_napari_viewer):
    viewer = make_napari_viewer(show=True)  # a hidden canvas is not drawn
    # CPU time, not wall time: the CI machine is shared, and waiting for a core is not our cost
    t0 = time.process_time()
    viewer.open_sample("napari-covidseg", "chest_phantom")
    load_s = time.process_time() - t0
    assert load_s < 3.0, f"the sample took {load_s:.1f} s of CPU to load"
    names = [layer.name for layer in viewer.layers]
    assert names == ["phantom CT", "phantom lung GT", "phantom infection GT"]
    ct, lung, inf = (viewer.layers[n] for n in names)
    assert type(ct).__name__ == "Image" and type(lung).__name__ == "Labels" and type(inf).__name__ == "Labels"
    for layer in (ct, lung, inf):
        np.testing.assert_allclose(layer.scale, (5.0, 1.4, 1.4))
        assert isinstance(layer.metadata[GEOMETRY_KEY], Geometry)
        assert layer.metadata["phantom_seed"] == 0
    assert tuple(ct.contrast_limits) == LUNG_WINDOW
    assert ct.colormap.name == "gray"
    assert ct.data.shape == (48, 256, 256)
    assert np.asarray(inf.data).any() and (np.asarray(inf.data) <= np.asarray(lung.data)).all()

    # a slice through the lesions, as a reader would look at it
    z = int(np.argmax(np.asarray(inf.data).sum(axis=(1, 2))))
    viewer.dims.set_current_step(0, z)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    os.makedirs(SCREENSHOTS, exist_ok=True)
    from skimage.io import imsave

    imsave(os.path.join(SCREENSHOTS, "sample_phantom.png"), shot, check_contrast=False)
    grey = shot[..., :3].astype(float).mean(axis=-1)
    assert grey.std() > 30, "the canvas looks blank"
    # the CT in a lung window: dark lung, bright soft tissue and bone
    assert (grey < 60).mean() > 0.03
    assert (grey > 180).mean() > 0.05
    # the infection overlay is drawn in red somewhere
    rgb = shot[..., :3].astype(int)
    assert ((rgb[..., 0] - rgb[..., 1]) > 40).sum() > 20
