"""A procedural chest CT with COVID-19-like lesions and exact ground truth.

Why: the plugin, its tests and the training pipeline must work without downloading patient data.
The phantom is an axial chest CT that a radiologist would recognise (body with a fat layer and
muscle, two lungs with branching vessels, heart and great vessels, trachea and main bronchi,
spine, ribs, sternum and the patient table) with ground-glass opacities and consolidations in
the lung periphery, and it comes with the lung and infection masks it was drawn from.

Everything is drawn in display order (z, y, x): x grows toward the patient's LEFT (so the right
lung is on the image's left), y toward POSTERIOR (anterior at the top of the image, the spine and
the table at the bottom), z toward SUPERIOR (slice 0 is the lung base, the last slice the apex).
All sizes are relative to the field of view, so any shape and spacing gives a plausible chest.

The anatomy is built from analytic shapes evaluated on 2D (y, x) grids and broadcast along z with
z-dependent sizes, so the default 48 x 256 x 256 volume takes a fraction of a second; lesion
borders and textures come from smoothed noise on a coarse grid sampled at lung voxels only.
Every random draw comes from ``numpy.random.default_rng(seed)``: the same seed gives identical
arrays, another seed another patient (body and lung size, vessel tree, lesion number, place,
size and type).

Ground truth follows how radiologists label these data sets: ``lung`` is the lung parenchyma
including lesions and the vessels inside the lungs (not the hilar vessels, trachea or main
bronchi); ``infection`` is where a lesion raises the HU by at least half of its full effect
(about 100-400 HU for ground glass, 400-900 HU for consolidation), always inside ``lung``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .io.geometry import Geometry

AIR_HU = -1000.0
FAT_HU = -100.0
MUSCLE_HU = 40.0
BLOOD_HU = 40.0
LUNG_HU = -880.0  # parenchyma; with the vessels the lung averages about -830
CANCELLOUS_BONE_HU = 400.0
CORTICAL_BONE_HU = 1000.0
GGO_HU_RANGE = (-650.0, -420.0)
CONSOLIDATION_HU_RANGE = (-40.0, 30.0)
NOISE_HU = 20.0

# body-relative radii of the inner chest wall (pleura), the thoracic cavity and the rib ring
PLEURA_R, CAVITY_R, RIB_R = 0.80, 0.83, 0.865

LESION_NONE, LESION_GGO, LESION_CONSOLIDATION = 0, 1, 2

DEFAULT_SHAPE = (48, 256, 256)
DEFAULT_SPACING = (5.0, 1.4, 1.4)


@dataclass
class Phantom:
    """A synthetic CT and its ground truth, all display-ordered (z, y, x).

    ``ct``: int16 HU; ``lung`` and ``infection``: uint8 0/1 (infection inside lung);
    ``lesion_type``: uint8, 0 none, 1 ground glass, 2 consolidation (on infection voxels);
    ``geometry``: for saving as NIfTI and for layer metadata; ``spacing``: (z, y, x) mm.
    """

    ct: np.ndarray
    lung: np.ndarray
    infection: np.ndarray
    geometry: Geometry
    spacing: Tuple[float, float, float]
    seed: int
    lesion_type: np.ndarray = field(repr=False, default=None)
    n_lesions: int = 0


# --- small helpers on 2D grids ---------------------------------------------------------------------
class _Plane:
    """Millimetre coordinates of one axial slice, centred on the body."""

    def __init__(self, shape_yx, spacing_yx, centre_yx_mm, half_axes_mm):
        ny, nx = shape_yx
        sy, sx = spacing_yx
        self.y = (np.arange(ny, dtype=np.float32) * sy - centre_yx_mm[0])[:, None]
        self.x = (np.arange(nx, dtype=np.float32) * sx - centre_yx_mm[1])[None, :]
        self.A, self.B = half_axes_mm  # body half width (x) and half depth (y), mm

    def d2(self, u, v):
        """Squared distance (mm^2) from a point given in body units (u * A, v * B)."""
        return (self.x - u * self.A) ** 2 + (self.y - v * self.B) ** 2

    def segment_d2(self, u0, v0, u1, v1):
        """Squared distance (mm^2) from the segment between two points in body units."""
        ax, ay = u0 * self.A, v0 * self.B
        bx, by = u1 * self.A, v1 * self.B
        ex, ey = bx - ax, by - ay
        t = np.clip(((self.x - ax) * ex + (self.y - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        return (self.x - ax - t * ex) ** 2 + (self.y - ay - t * ey) ** 2

    def ellipse(self, u, v, au, bv, angle=0.0):
        """Normalised ellipse radius^2 (< 1 inside) for centre (u, v) and half axes (au*A, bv*B)."""
        dx = self.x - u * self.A
        dy = self.y - v * self.B
        if angle:
            c, s = np.cos(angle), np.sin(angle)
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        return (dx / (au * self.A)) ** 2 + (dy / (bv * self.B)) ** 2


def _smooth_noise(rng, shape, sigma) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return n / max(float(n.std()), 1e-6)


def _profile(t, points):
    """Piecewise-linear profile of the relative height t in [0, 1] through (t, value) points."""
    ts, vs = zip(*points)
    return np.interp(t, ts, vs).astype(np.float32)


def _cross(a, b):
    """Cross product of two 3-vectors (np.cross is slow for single vectors)."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


# --- vessel tree -------------------------------------------------------------------------------------
def _vessel_segments(rng, hilum_mm, lateral_sign, scale_mm, depth):
    """Line segments (p0, p1, r0, r1) of a branching tree growing from a hilum (z, y, x mm)."""
    segments = []
    # lobar trunks: up, down, lateral-anterior, lateral-posterior, down-posterior
    trunks = [
        (1.0, -0.2, 0.3), (0.8, 0.4, 0.5), (-1.0, 0.1, 0.35), (-0.8, 0.6, 0.5), (-0.6, -0.5, 0.6),
        (0.1, -0.8, 0.8), (0.1, 0.7, 0.8), (0.3, 0.0, 1.0),
    ]
    stack = []
    for dz, dy, dx in trunks:
        d = np.array([dz, dy, dx * lateral_sign], dtype=float)
        d += rng.normal(0, 0.15, 3)
        stack.append((np.asarray(hilum_mm, float), d / np.linalg.norm(d), 0.22 * scale_mm, 0.03 * scale_mm, 0))
    while stack:
        p0, d, length, radius, level = stack.pop()
        p1 = p0 + d * length
        r1 = radius * 0.8
        segments.append((p0, p1, radius, r1))
        if level + 1 >= depth:
            continue
        for _ in range(2):
            # rotate the direction by 25-45 degrees about a random perpendicular axis
            axis = _cross(d, rng.normal(size=3))
            axis /= np.linalg.norm(axis) + 1e-9
            ang = np.deg2rad(rng.uniform(25, 45))
            nd = d * np.cos(ang) + _cross(axis, d) * np.sin(ang)
            nd /= np.linalg.norm(nd)
            stack.append((p1, nd, length * rng.uniform(0.7, 0.9), r1 * 0.85, level + 1))
    return segments


def _draw_vessels(shape, spacing, segments, out):
    """Add each tube's partial-volume fraction (max over tubes) into ``out`` (float32 z,y,x)."""
    sz, sy, sx = spacing
    grid = np.array([sz, sy, sx])
    half_slab = 0.4 * sz  # a thick slice sees a vessel lying within it, at reduced contrast
    soft = max(0.5 * min(sy, sx), 0.4)
    for p0, p1, r0, r1 in segments:
        rmax = max(r0, r1)
        lo = np.floor((np.minimum(p0, p1) - rmax - half_slab - soft) / grid).astype(int)
        hi = np.ceil((np.maximum(p0, p1) + rmax + half_slab + soft) / grid).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, shape)
        if np.any(hi <= lo):
            continue
        z = (np.arange(lo[0], hi[0]) * sz)[:, None, None]
        y = (np.arange(lo[1], hi[1]) * sy)[None, :, None]
        x = (np.arange(lo[2], hi[2]) * sx)[None, None, :]
        seg = p1 - p0
        seg_len2 = float(seg @ seg) + 1e-9
        t = ((z - p0[0]) * seg[0] + (y - p0[1]) * seg[1] + (x - p0[2]) * seg[2]) / seg_len2
        t = np.clip(t, 0.0, 1.0)
        dz = z - (p0[0] + t * seg[0])
        dy = y - (p0[1] + t * seg[1])
        dx = x - (p0[2] + t * seg[2])
        dz = np.maximum(np.abs(dz) - half_slab, 0.0)
        dist = np.sqrt(dz * dz + dy * dy + dx * dx)
        radius = r0 + t * (r1 - r0)
        # thin vessels in thick slices fill only part of the voxel: lower contrast
        fill = np.minimum(1.0, (2.0 * radius) / (0.5 * sz + 1e-6) + 0.35)
        frac = np.clip((radius - dist) / soft + 0.5, 0.0, 1.0) * fill
        box = out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        np.maximum(box, frac.astype(np.float32), out=box)


# --- the phantom, step by step ------------------------------------------------------------------------
# Each step below draws one part of the chest.  The steps that take ``rng`` must run in the order
# make_phantom calls them: that order fixes which random numbers each part gets, so a seed keeps
# giving the same patient.
@dataclass
class _Patient:
    """Sizes, the body frame and the random proportions shared by all drawing steps."""

    shape: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    A: float  # body half width (x), mm
    B: float  # body half depth (y), mm
    centre: Tuple[float, float]  # body centre (y, x), mm from the first voxel
    P: _Plane
    t: np.ndarray  # relative height of each slice: 0 base, 1 apex
    lung_scale_r: float
    lung_scale_l: float
    heart_shift: np.ndarray


class _Masks:
    """A named bundle of masks and sizes handed from one drawing step to another."""

    def __init__(self, **items):
        self.__dict__.update(items)


def _checked_args(shape, spacing, infection_fraction):
    """The shape and spacing as int and float tuples; ValueError for impossible arguments."""
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be three sizes (z, y, x) of at least 4 voxels, got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive voxel sizes (z, y, x) in mm, got {spacing}")
    if infection_fraction is not None and not 0.0 <= infection_fraction < 1.0:
        raise ValueError(f"infection_fraction must be in [0, 1), got {infection_fraction}")
    return shape, spacing


def _draw_patient(rng, shape, spacing) -> _Patient:
    """Patient size and position (body units: A = half width, B = half depth, in mm), lung and heart proportions."""
    nz, ny, nx = shape
    sz, sy, sx = spacing
    fov_y, fov_x = ny * sy, nx * sx
    A = 0.41 * fov_x * rng.uniform(0.93, 1.03)
    B = 0.29 * fov_y * rng.uniform(0.93, 1.05)
    centre = (0.44 * fov_y, 0.5 * fov_x + rng.uniform(-0.01, 0.01) * fov_x)
    P = _Plane((ny, nx), (sy, sx), centre, (A, B))
    t = np.linspace(0.0, 1.0, nz, dtype=np.float32) if nz > 1 else np.zeros(1, np.float32)  # 0 base, 1 apex

    lung_scale_r = rng.uniform(0.93, 1.07)
    lung_scale_l = rng.uniform(0.93, 1.07)
    heart_shift = rng.uniform(-0.03, 0.03, 2)
    return _Patient(shape, spacing, A, B, centre, P, t, lung_scale_r, lung_scale_l, heart_shift)


def _draw_table(ct, pt: _Patient):
    """Patient table (posterior, below the body): a curved carbon shell with a foam core."""
    P, A, B = pt.P, pt.A, pt.B
    sy = pt.spacing[1]
    fov_y = pt.shape[1] * sy
    table_top = B + 0.02 * fov_y  # P.y is relative to the body centre
    curve = table_top - 0.10 * B * (P.x / (0.9 * A)) ** 2
    depth = P.y - curve
    width_ok = np.abs(P.x) < 1.05 * A
    shell = max(2.0, 2.0 * sy)  # two voxels at least, so coarse grids still show it
    table_shell = width_ok & (((depth >= 0) & (depth < shell)) | ((depth >= 0.06 * B + shell) & (depth < 0.06 * B + 2 * shell)))
    table_core = width_ok & (depth >= shell) & (depth < 0.06 * B + shell)
    ct[:, table_core] = -550.0
    ct[:, table_shell] = 500.0


def _draw_body(rng, ct, pt: _Patient):
    """Skin/fat layer around muscle and the thoracic cavity; returns theta, muscle, rr and cavity.

    ``theta`` is the angle around the body, ``rr`` the body-relative radius (slightly larger
    toward the apex, where the cavity narrows); both shape the ribs, lungs and lesions.
    """
    P, A, B = pt.P, pt.A, pt.B
    ny, nx = pt.shape[1:]
    # the back is flatter than the front (the patient lies on the table): a super-ellipse there
    power = np.where(P.y > 0, 2.6, 2.1).astype(np.float32)
    body_r2 = ((np.abs(P.x / A) ** power + np.abs(P.y / B) ** power) ** (2.0 / power)).astype(np.float32)
    theta = np.arctan2(P.y / B, P.x / A)  # 0 toward the patient's left, +pi/2 posterior
    fat_noise = _smooth_noise(rng, (ny // 4 + 1, nx // 4 + 1), 2.0)
    fat_noise = ndimage.zoom(fat_noise, (ny / fat_noise.shape[0], nx / fat_noise.shape[1]), order=1)[:ny, :nx]
    fat_thick = 0.06 + 0.03 * np.cos(theta) ** 2 + 0.012 * fat_noise  # thicker laterally
    body = body_r2 < 1.0
    muscle = body_r2 < (1.0 - fat_thick) ** 2
    body_2d = np.where(muscle, MUSCLE_HU, np.where(body, FAT_HU, AIR_HU)).astype(np.float32)
    skin = body & (body_r2 > 0.985)
    body_2d[skin] = 20.0
    ct[:, body] = body_2d[body]

    # thoracic cavity (rings in body units, slightly smaller toward the apex)
    r_body = np.sqrt(body_r2)
    cavity_scale = _profile(pt.t, [(0, 1.0), (0.7, 0.98), (1.0, 0.9)])[:, None, None]
    rr = r_body[None] / cavity_scale
    cavity = rr < CAVITY_R
    ct[cavity] = FAT_HU + 10.0  # mediastinal fat by default; lungs and organs are drawn over it
    return theta, muscle, rr, cavity


def _rib_cage(rng, pt: _Patient, theta, rr) -> _Masks:
    """Ribs (with cortex) and the sternum (with cortex and its z range)."""
    P, t = pt.P, pt.t
    nz, sz = pt.shape[0], pt.spacing[0]
    # ribs: arcs of a ring that rotate with z (they slope), absent at the spine and the sternum
    rib_phase = 2 * np.pi * (np.arange(nz) * sz) / (32.0 + rng.uniform(-3, 3)) + rng.uniform(0, 2 * np.pi)
    rib_angle = np.sin(6.0 * theta[None] + rib_phase[:, None, None])
    rib_ring = np.abs(rr - RIB_R) < 0.027
    away_from_spine = np.abs(np.angle(np.exp(1j * (theta - np.pi / 2)))) > 0.35
    away_from_sternum = np.abs(np.angle(np.exp(1j * (theta + np.pi / 2)))) > 0.3
    ribs = rib_ring & (rib_angle > 0.25) & away_from_spine[None] & away_from_sternum[None]
    rib_cortex = ribs & (np.abs(rr - RIB_R) > 0.014)

    # sternum (anterior midline), present over most of the chest
    sternum = P.ellipse(0.0, -0.875, 0.09, 0.065) < 1.0
    sternum_z = (t > 0.1) & (t < 0.9)
    ster_cortex = sternum & (P.ellipse(0.0, -0.875, 0.065, 0.04) >= 1.0)
    return _Masks(ribs=ribs, rib_cortex=rib_cortex, sternum=sternum, sternum_z=sternum_z, ster_cortex=ster_cortex)


def _spine(pt: _Patient, muscle) -> _Masks:
    """Vertebral body, canal with cord, posterior arch, spinous and transverse processes (2D masks)."""
    P, A, B = pt.P, pt.A, pt.B
    vb_v = 0.60
    vb_r = 0.115 * A
    vb_d2 = P.d2(0.0, vb_v)
    vertebra = vb_d2 < vb_r**2
    vertebra_cortex = vertebra & (vb_d2 > (vb_r - 2.5) ** 2)
    canal_v = vb_v + (vb_r + 0.045 * A) / B
    canal_d2 = P.d2(0.0, canal_v)
    canal = canal_d2 < (0.05 * A) ** 2
    arch = (canal_d2 < (0.085 * A) ** 2) & ~canal & (P.y > canal_v * B - 0.02 * A)
    spinous = (np.abs(P.x) < 0.02 * A) & (P.y > canal_v * B) & (P.y < canal_v * B + 0.16 * A)
    # transverse processes point laterally and backwards
    transverse = (np.abs(P.y - (canal_v * B - 0.01 * A) - 0.35 * (np.abs(P.x) - 0.06 * A)) < 0.022 * A) & (np.abs(P.x) < 0.17 * A)
    spinous &= muscle
    bone_2d = vertebra | arch | spinous | transverse
    keepout = (P.d2(0.0, vb_v) < (vb_r + 0.05 * A) ** 2)  # the lungs keep a small distance from it
    return _Masks(vertebra_cortex=vertebra_cortex, canal=canal, arch=arch, spinous=spinous, bone_2d=bone_2d, keepout=keepout)


def _heart_and_great_vessels(pt: _Patient) -> _Masks:
    """Mediastinal band, heart (with its fat and clearance), aorta, SVC, pulmonary trunk, neck vessels."""
    P, A, B, t, heart_shift = pt.P, pt.A, pt.B, pt.t, pt.heart_shift
    # mediastinal band (wider posteriorly), heart (lower half, toward the patient's left)
    band_half = 0.09 + 0.07 * np.clip((P.y / B + 0.6) / 1.2, 0, 1)
    med_band = np.abs(P.x / A - 0.02) < band_half
    heart_size = _profile(t, [(0, 0.8), (0.15, 1.0), (0.35, 0.95), (0.52, 0.55), (0.6, 0.0), (1.0, 0.0)])
    heart_r2 = P.ellipse(0.12 + heart_shift[0], -0.2 + heart_shift[1], 0.40, 0.36, angle=-0.6)
    hs2 = np.maximum(heart_size, 1e-3)[:, None, None] ** 2
    heart = (heart_r2[None] < hs2) & (heart_size[:, None, None] > 0)
    heart_fat = (heart_r2[None] < hs2 * 1.12) & (heart_size[:, None, None] > 0)
    heart_clear = (heart_r2[None] < hs2 * 1.3) & (heart_size[:, None, None] > 0)

    desc_aorta_d2 = P.d2(0.12, 0.36)
    aorta_r = 0.075 * A
    desc_aorta = (desc_aorta_d2 < aorta_r**2)[None] & (t < 0.8)[:, None, None]
    asc_present = ((t > 0.5) & (t < 0.78))[:, None, None]
    asc_aorta = (P.d2(0.04, -0.30) < (0.09 * A) ** 2)[None] & asc_present
    # the aortic arch joins them near the top of the mediastinum
    arch_z = ((t >= 0.74) & (t < 0.84))[:, None, None]
    arch_band = (P.segment_d2(0.04, -0.30, 0.12, 0.36) < aorta_r**2)[None] & arch_z
    svc = (P.d2(-0.14, -0.22) < (0.055 * A) ** 2)[None] & ((t > 0.48) & (t < 0.9))[:, None, None]
    pulm_trunk = (P.d2(0.12, -0.36) < (0.085 * A) ** 2)[None] & ((t > 0.48) & (t < 0.62))[:, None, None]
    # branches of the supra-aortic vessels at the apex
    neck_vessels = (
        (P.d2(-0.10, -0.05) < (0.04 * A) ** 2) | (P.d2(0.10, -0.02) < (0.035 * A) ** 2) | (P.d2(0.17, 0.05) < (0.035 * A) ** 2)
    )[None] & (t >= 0.84)[:, None, None]
    desc_aorta_clear = (desc_aorta_d2 < (aorta_r + 0.03 * A) ** 2)[None]
    return _Masks(
        med_band=med_band, heart=heart, heart_fat=heart_fat, heart_clear=heart_clear, desc_aorta_clear=desc_aorta_clear,
        great_vessels=(desc_aorta, asc_aorta, arch_band, svc, pulm_trunk, neck_vessels),
    )


def _airways(pt: _Patient) -> _Masks:
    """Trachea and main bronchi (air and wall) and the oesophagus (wall and air, 2D)."""
    P, A, B, t = pt.P, pt.A, pt.B, pt.t
    trachea_v = 0.12
    trachea_r = 0.06 * A
    carina_t = 0.56
    trachea_d2 = P.d2(0.0, trachea_v)
    trachea_z = (t >= carina_t)[:, None, None]
    trachea_air = (trachea_d2 < trachea_r**2)[None] & trachea_z
    trachea_wall = (trachea_d2 < (trachea_r + 2.0) ** 2)[None] & trachea_z
    # main bronchi below the carina, moving laterally and a little down
    below = np.clip((carina_t - t) / 0.18, 0, 1)
    bronchi_z = ((t < carina_t) & (t > carina_t - 0.2))[:, None, None]
    off = (0.04 + 0.22 * below)[:, None, None] * A
    bronchus_r = 0.04 * A
    dyb = (P.y - trachea_v * B)[None]
    d2_rb = (P.x[None] + off) ** 2 + dyb**2
    d2_lb = (P.x[None] - off * 0.9) ** 2 + dyb**2
    bronchi_air = bronchi_z & ((d2_rb < bronchus_r**2) | (d2_lb < bronchus_r**2))
    bronchi_wall = bronchi_z & ((d2_rb < (bronchus_r + 1.8) ** 2) | (d2_lb < (bronchus_r + 1.8) ** 2))
    oesophagus = (P.d2(0.05, 0.30) < (0.04 * A) ** 2)
    oesophagus_air = (P.d2(0.05, 0.30) < (0.012 * A) ** 2)
    return _Masks(
        air=trachea_air | bronchi_air, wall=trachea_wall | bronchi_wall, oesophagus=oesophagus, oesophagus_air=oesophagus_air
    )


def _lungs(pt: _Patient, rr, med: _Masks, spine: _Masks):
    """Lung mask (one ellipsoid-like volume per side, clipped by the cavity and the mediastinum) and the diaphragm domes.

    Returns ``lung`` and a bundle with the domes (``in_dome_r``, ``in_dome_l``, ``dome_l``).
    """
    P, A, t = pt.P, pt.A, pt.t
    size = _profile(t, [(0, 0.86), (0.22, 1.0), (0.55, 0.97), (0.8, 0.8), (1.0, 0.45)])[:, None, None]
    r_lung_r = P.ellipse(-0.40, 0.04, 0.40 * pt.lung_scale_r, 0.74 * pt.lung_scale_r)[None] / size**2
    r_lung_l = P.ellipse(0.42, 0.06, 0.36 * pt.lung_scale_l, 0.72 * pt.lung_scale_l)[None] / size**2
    inner = rr < PLEURA_R

    # the lungs keep a small distance from the mediastinal organs, the spine and the hila
    hilum_keepout = (P.d2(0.0, 0.05) < (0.2 * A) ** 2)[None] & ((t > 0.35) & (t < 0.7))[:, None, None]
    desc_aorta, asc_aorta, arch_band, svc, pulm_trunk, neck_vessels = med.great_vessels
    organs_clear = (
        med.med_band[None]
        | med.heart_clear
        | med.desc_aorta_clear
        | spine.keepout[None]
        | hilum_keepout
        | (asc_aorta | svc | pulm_trunk | arch_band | neck_vessels)
    )

    # diaphragm domes: the liver (right) and spleen/stomach (left) rise into the lung bases
    dome_r = _profile(t, [(0, 0.75), (0.12, 0.45), (0.2, 0.0), (1, 0.0)])[:, None, None]
    dome_l = _profile(t, [(0, 0.65), (0.08, 0.35), (0.15, 0.0), (1, 0.0)])[:, None, None]
    in_dome_r = (P.ellipse(-0.32, -0.12, 0.6, 0.8)[None] < dome_r**2)
    in_dome_l = (P.ellipse(0.36, -0.12, 0.5, 0.7)[None] < dome_l**2)

    lung_r = (r_lung_r < 1.0) & inner & ~organs_clear & ~in_dome_r & (P.x < 0)[None]
    lung_l = (r_lung_l < 1.0) & inner & ~organs_clear & ~in_dome_l & (P.x > 0)[None]
    lung = lung_r | lung_l
    # keep only the big part of each lung on every slice (no crumbs from clipping)
    lung = ndimage.binary_opening(lung, structure=np.ones((1, 3, 3), bool))
    return lung, _Masks(in_dome_r=in_dome_r, in_dome_l=in_dome_l, dome_l=dome_l)


def _parenchyma_hu(pt: _Patient):
    """Lung parenchyma HU per (1, y, x): slightly denser posteriorly (gravity-dependent perfusion)."""
    gradient = (12.0 * (pt.P.y / pt.B))[None]
    return LUNG_HU + gradient


def _draw_organs(ct, pt: _Patient, cavity, lung, domes: _Masks, med: _Masks, air: _Masks):
    """Organs below the domes, the lung parenchyma, then the mediastinal organs and airways."""
    P, t = pt.P, pt.t
    ct[domes.in_dome_r & cavity] = 55.0  # liver
    ct[domes.in_dome_l & cavity] = 45.0  # spleen / stomach wall
    dome_l = domes.dome_l
    stomach_gas = (P.ellipse(0.42, -0.25, 0.16, 0.14)[None] < (dome_l / 0.65) ** 2) & (dome_l > 0.3)
    ct[stomach_gas & cavity] = AIR_HU

    lung_hu = np.broadcast_to(_parenchyma_hu(pt), pt.shape)
    ct[lung] = lung_hu[lung]

    # mediastinal organs (drawn after the lungs so the edges are crisp)
    ct[med.heart_fat & cavity & ~lung] = FAT_HU
    ct[med.heart & cavity] = BLOOD_HU
    for m in med.great_vessels:
        ct[m & cavity & ~lung] = BLOOD_HU
    oesophagus, oesophagus_air = air.oesophagus, air.oesophagus_air
    ct[:, oesophagus] = np.where(cavity[:, oesophagus], 35.0, ct[:, oesophagus])
    ct[:, oesophagus_air] = np.where(cavity[:, oesophagus_air] & (t > 0.3)[:, None], AIR_HU, ct[:, oesophagus_air])
    ct[air.wall & ~lung] = 30.0
    ct[air.air] = AIR_HU


def _draw_bones(ct, ribcage: _Masks, spine: _Masks):
    """Ribs, sternum and spine, drawn last: nothing drawn before may cover them."""
    ct[ribcage.ribs] = CANCELLOUS_BONE_HU - 100.0
    ct[ribcage.rib_cortex] = CORTICAL_BONE_HU
    ct[ribcage.sternum_z[:, None, None] & ribcage.sternum[None]] = CANCELLOUS_BONE_HU - 100.0
    ct[ribcage.sternum_z[:, None, None] & ribcage.ster_cortex[None]] = CORTICAL_BONE_HU - 100.0
    ct[:, spine.bone_2d] = CANCELLOUS_BONE_HU
    ct[:, spine.vertebra_cortex | spine.arch | spine.spinous] = CORTICAL_BONE_HU
    ct[:, spine.canal] = 25.0


def _draw_pulmonary_vessels(rng, ct, pt: _Patient, lung, lung_idx):
    """A branching tree per lung from the hilum, thinning to the periphery; returns the vessel fraction."""
    shape, spacing, A, B, centre = pt.shape, pt.spacing, pt.A, pt.B, pt.centre
    nz, ny, nx = shape
    sz, sy, sx = spacing
    vessels = np.zeros(shape, np.float32)
    z_hilum = 0.45 * (nz - 1) * sz
    for side, u_hilum in ((-1, -0.17), (1, 0.2)):
        hilum = np.array((z_hilum, centre[0] + 0.05 * B, centre[1] + u_hilum * A))
        segs = _vessel_segments(rng, hilum, side, A, depth=6 if min(ny, nx) >= 96 else 4)
        # peripheral twigs: short thin vessels pointing away from the hilum, spread over the lung
        side_idx = lung_idx[(lung_idx % nx < nx / 2) == (side < 0)]
        n_twigs = min(int(side_idx.size * sz * sy * sx / 4000.0), 400)
        if n_twigs and side_idx.size:
            tz, ty, tx = np.unravel_index(rng.choice(side_idx, n_twigs), shape)
            starts = np.stack([tz * sz, ty * sy, tx * sx], axis=1)
            dirs = starts - hilum + rng.normal(0, 0.15 * A, (n_twigs, 3))
            dirs /= np.linalg.norm(dirs, axis=1, keepdims=True) + 1e-9
            lengths = rng.uniform(0.04, 0.1, n_twigs) * A
            radii = rng.uniform(0.005, 0.009, n_twigs) * A
            for p0, d, length, r in zip(starts, dirs, lengths, radii):
                segs.append((p0, p0 + d * length, r, r * 0.8))
        _draw_vessels(shape, spacing, segs, vessels)
    vessels *= lung
    vessel_idx = np.flatnonzero(vessels)
    flat_ct = ct.reshape(-1)
    flat_ct[vessel_idx] += vessels.reshape(-1)[vessel_idx] * (BLOOD_HU - flat_ct[vessel_idx])
    return vessels


def _lesion_seeds(rng, pt: _Patient, lung_idx, rr, n) -> _Masks:
    """Lung-voxel coordinates and n lesion seeds: centre (a lung voxel), radius, stretch, kind and HU."""
    shape, (sz, sy, sx), t = pt.shape, pt.spacing, pt.t
    nz = shape[0]
    lz, ly, lx = np.unravel_index(lung_idx, shape)
    zmm, ymm, xmm = lz * sz, ly * sy, lx * sx
    # where lesions start: mostly subpleural (close to the chest wall) and posterior/basal
    rr_l = rr[lz, ly, lx] if rr.shape[0] == nz else rr[0, ly, lx]
    v_l = (ymm - pt.centre[0]) / pt.B
    weight = np.exp((rr_l - PLEURA_R) / 0.05) * (1.2 + v_l) * (1.3 - 0.6 * t[lz])
    weight = np.clip(weight, 1e-12, None)
    weight /= weight.sum()
    picks = rng.choice(lung_idx.size, size=n, replace=n > lung_idx.size, p=weight)
    radii = rng.uniform(0.07, 0.2, n) * pt.A
    stretch = rng.uniform(0.7, 1.4, (n, 3))
    kinds = rng.choice(3, size=n, p=[0.65, 0.1, 0.25])  # 0 GGO, 1 consolidation, 2 mixed
    ggo_hu = rng.uniform(*GGO_HU_RANGE, n)
    cons_hu = rng.uniform(*CONSOLIDATION_HU_RANGE, n)
    return _Masks(
        lz=lz, ly=ly, lx=lx, zmm=zmm, ymm=ymm, xmm=xmm, rr_l=rr_l,
        picks=picks, radii=radii, stretch=stretch, kinds=kinds, ggo_hu=ggo_hu, cons_hu=cons_hu,
    )


def _lesion_noise(rng, shape, s: _Masks):
    """Border and texture noise: coarse smooth noise sampled at the lung voxels."""
    nz, ny, nx = shape
    lz, ly, lx = s.lz, s.ly, s.lx
    coarse = (max(nz // 2, 2), max(ny // 8, 2), max(nx // 8, 2))
    border_noise = _smooth_noise(rng, coarse, 1.0)
    texture_noise = _smooth_noise(rng, (max(nz, 2), max(ny // 3, 2), max(nx // 3, 2)), 1.0)
    coords = np.stack([lz * (coarse[0] - 1) / max(nz - 1, 1), ly * (coarse[1] - 1) / max(ny - 1, 1), lx * (coarse[2] - 1) / max(nx - 1, 1)])
    bn = ndimage.map_coordinates(border_noise, coords, order=1, mode="nearest").astype(np.float32)
    tshape = texture_noise.shape
    coords_t = np.stack([lz * (tshape[0] - 1) / max(nz - 1, 1), ly * (tshape[1] - 1) / max(ny - 1, 1), lx * (tshape[2] - 1) / max(nx - 1, 1)])
    tn = ndimage.map_coordinates(texture_noise, coords_t, order=1, mode="nearest").astype(np.float32)
    return bn, tn


def _lesion_field(s: _Masks, bn):
    """Lesion field at the lung voxels (> threshold is infected) and the lesion that owns each voxel."""
    zmm, ymm, xmm, stretch = s.zmm, s.ymm, s.xmm, s.stretch
    field_max = np.full(zmm.size, -np.inf, np.float32)
    owner = np.zeros(zmm.size, np.int32)
    for i in range(s.picks.size):
        c = (zmm[s.picks[i]], ymm[s.picks[i]], xmm[s.picks[i]])
        d2 = (
            ((zmm - c[0]) / stretch[i, 0]) ** 2 + ((ymm - c[1]) / stretch[i, 1]) ** 2 + ((xmm - c[2]) / stretch[i, 2]) ** 2
        ) / s.radii[i] ** 2
        f = (1.0 - d2).astype(np.float32)
        better = f > field_max
        field_max[better] = f[better]
        owner[better] = i
    # lesions spread along the pleura more than toward the hilum (subpleural patches)
    lesion_field = field_max + 0.45 * bn + 1.2 * (s.rr_l - PLEURA_R) / 0.2
    return lesion_field, owner


def _draw_lesions(rng, ct, pt: _Patient, lung_idx, rr, vessels, n_lesions, infection_fraction, healthy):
    """Ground-glass and consolidation lesions in the lungs, thresholded to the infection fraction.

    Returns the infection mask, the lesion type per voxel and the number of lesions drawn.
    """
    shape = pt.shape
    infection = np.zeros(shape, bool)
    lesion_type = np.zeros(shape, np.uint8)
    if healthy or not lung_idx.size:
        return infection, lesion_type, 0
    n = int(rng.integers(3, 9)) if n_lesions is None else int(n_lesions)
    target = float(rng.uniform(0.02, 0.12)) if infection_fraction is None else float(infection_fraction)
    if not (n > 0 and target > 0):
        return infection, lesion_type, 0
    s = _lesion_seeds(rng, pt, lung_idx, rr, n)
    bn, tn = _lesion_noise(rng, shape, s)
    lesion_field, owner = _lesion_field(s, bn)
    # threshold so that the infected fraction of the lung matches the target
    thr = float(np.quantile(lesion_field, 1.0 - target))
    ramp = 0.18
    w = np.clip((lesion_field - thr) / ramp + 0.5, 0.0, 1.0)
    inside = lesion_field > thr
    kind = s.kinds[owner]
    depth_in = lesion_field - thr
    cons_core = (kind == 1) | ((kind == 2) & (depth_in > 0.6))
    target_hu = np.where(cons_core, s.cons_hu[owner], s.ggo_hu[owner]) + np.where(cons_core, 15.0, 45.0) * tn
    # the lesion replaces the parenchyma part of a voxel only, so vessels stay visible
    # inside ground glass (as on real CT)
    parenchyma_hu = np.broadcast_to(_parenchyma_hu(pt), shape).reshape(-1)[lung_idx]
    vessel_part = vessels.reshape(-1)[lung_idx]
    flat = ct.reshape(-1)
    flat[lung_idx] += (1.0 - vessel_part) * w * (target_hu - parenchyma_hu)
    infection.reshape(-1)[lung_idx] = inside
    lesion_type.reshape(-1)[lung_idx] = np.where(inside, np.where(cons_core, LESION_CONSOLIDATION, LESION_GGO), 0)
    return infection, lesion_type, n


def _form_image(rng, ct, noise_hu):
    """Partial volume blur and correlated noise, rounded and clipped to int16 HU.

    One in-plane Gaussian does both: it softens the edges (partial volume) and correlates the
    white noise added before it, whose amplitude is raised by the filter's known noise
    reduction (the root of the sum of its squared weights) so the result has ``noise_hu``.
    """
    blur = (0.0, 0.65, 0.65)
    if noise_hu > 0:
        delta = np.zeros((1, 15, 15), np.float64)
        delta[0, 7, 7] = 1.0
        reduction = float(np.sqrt((ndimage.gaussian_filter(delta, blur, truncate=2.5) ** 2).sum()))
        noise = rng.standard_normal(ct.shape, dtype=np.float32)
        noise *= noise_hu / reduction
        ct += noise
    ct = ndimage.gaussian_filter(ct, sigma=blur, truncate=2.5, output=ct)
    np.rint(ct, out=ct)
    np.clip(ct, -1024, 3071, out=ct)
    return ct.astype(np.int16)


# --- the phantom -----------------------------------------------------------------------------------
def make_phantom(
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    seed: int = 0,
    n_lesions: Optional[int] = None,
    infection_fraction: Optional[float] = None,
    healthy: bool = False,
    noise_hu: float = NOISE_HU,
) -> Phantom:
    """Draw a chest CT phantom (see the module docstring).

    Parameters
    ----------
    shape, spacing:
        Display-ordered (z, y, x) size in voxels and voxel size in mm.  Anatomy scales with the
        field of view, so (16, 128, 128) for fast 2D training works as well as the default.
    seed:
        Seeds every random choice; the same seed gives identical arrays.
    n_lesions:
        Number of lesion seeds (default: 3-8, drawn from the seed).  Touching lesions merge, so
        the connected-component count can be lower.
    infection_fraction:
        Fraction of the lung volume to be infected (e.g. 0.1 for 10 %); the lesion borders are
        grown or shrunk together to match it (to within a few voxels).  Default: drawn from
        the seed, 2-12 %.
    healthy:
        No lesions at all (an empty infection mask).
    noise_hu:
        Standard deviation of the (slightly correlated) image noise in HU.
    """
    shape, spacing = _checked_args(shape, spacing, infection_fraction)
    rng = np.random.default_rng(seed)
    # the random draws happen in this order: patient, fat layer, ribs, vessels, lesions, noise
    pt = _draw_patient(rng, shape, spacing)
    ct = np.full(shape, AIR_HU, dtype=np.float32)
    _draw_table(ct, pt)
    theta, muscle, rr, cavity = _draw_body(rng, ct, pt)
    ribcage = _rib_cage(rng, pt, theta, rr)
    spine = _spine(pt, muscle)
    med = _heart_and_great_vessels(pt)
    lung, domes = _lungs(pt, rr, med, spine)
    _draw_organs(ct, pt, cavity, lung, domes, med, _airways(pt))
    _draw_bones(ct, ribcage, spine)
    lung_idx = np.flatnonzero(lung)
    vessels = _draw_pulmonary_vessels(rng, ct, pt, lung, lung_idx)
    infection, lesion_type, n_drawn = _draw_lesions(
        rng, ct, pt, lung_idx, rr, vessels, n_lesions, infection_fraction, healthy
    )
    ct = _form_image(rng, ct, noise_hu)

    geometry = Geometry.from_display_spacing(shape, spacing)
    return Phantom(
        ct=ct,
        lung=lung.astype(np.uint8),
        infection=(infection & lung).astype(np.uint8),
        geometry=geometry,
        spacing=spacing,
        seed=int(seed),
        lesion_type=lesion_type,
        n_lesions=n_drawn,
    )
