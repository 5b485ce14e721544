#!/usr/bin/env python
"""Generate paired abdominal CT / MR T1 phantoms with a known deformation between them.

No real abdominal CT/MR data is available offline (the machines reach only package registries), so the
`f3rnet_ct_mri` bundle ships this generator. Every subject is one random anatomy, rendered twice:

* **CT** (HU, stored as int16) from the anatomy as generated;
* **MR T1** (arbitrary units, float32) from the same anatomy warped by a random smooth, large local
  deformation whose largest part sits on the liver (the paper's hard case), with a multiplicative
  bias field. The deformation is a global B-spline field (5-7 mm at most) plus a liver field (random
  translation and divergence-free local twists, 10-14 mm at most) that fades out in the fat around
  the liver and around the kidneys, so the kidneys and spleen move little and organ volumes are
  kept to within a few percent (see :func:`make_displacement`); it has no folding.

Anatomy (organ sizes, shapes and positions vary per subject, each organ being an ellipsoid with
random centre, semi-axes, rotation and a smooth random surface perturbation): an elliptical body
outline, subcutaneous fat, abdominal-wall, paraspinal and psoas muscles, a lumbar spine (vertebral
bodies with a cortical rim, intervertebral discs, spinal canal, posterior arch), aorta and IVC, a
large wedge-shaped liver on the right, the spleen on the left posterior side, both kidneys
(bean-shaped: cortex, medulla and a hilar notch) in perirenal fat, and bowel loops with fluid and
air pockets in visceral fat. The phantom is a scaled-down abdomen whose body fills the field of
view (about 130 x 105 mm at the default shape); every length scales with ``--shape``.

CT is non-contrast (kidney ~30 HU, no cortical enhancement). Both images get organ texture,
partial-volume blur (Gaussian, sigma 0.7 voxel) and noise (Gaussian on CT, Rician on MR).

Labels (uint8, as in Learn2Reg AbdomenMRCT): 0 background, 1 liver, 2 spleen, 3 right kidney,
4 left kidney. Volumes are RAS, 1 mm isotropic, with the world origin at the volume centre.

Outputs, for subject NNN (``case000``, ``case001``, ...):

    <out>/ct/caseNNN_ct.nii.gz              CT, HU, int16
    <out>/mr/caseNNN_mr.nii.gz              MR T1, arbitrary units, float32 (raw: the bundle normalises)
    <out>/labels/caseNNN_ct_label.nii.gz    labels on the CT grid
    <out>/labels/caseNNN_mr_label.nii.gz    labels on the MR grid
    <out>/ddf/caseNNN_ddf_ct2mri.nii.gz     with --save-ddf only: the true CT->MRI displacement,
                                            voxel units, channel last (X, Y, Z, 3)
    <out>/datalist_ct2mri.json              fixed = MR, moving = CT (the CT is warped onto the MR)
    <out>/datalist_mri2ct.json              fixed = CT, moving = MR
    <out>/datalist_mix_<direction>.json     with --mix-with DIR only: the training and validation subjects of
                                            this family and of DIR's (e.g. the sample phantoms), this
                                            family's test subjects; DIR's paths relative to <out>

The ground-truth displacement D (returned by :func:`make_subject`) is in voxels, channel first,
and follows MONAI's ``Warp`` convention for the CT->MRI direction: ``mr_anatomy(x) =
ct_anatomy(x + D(x))``. Subjects are split by subject into training/validation/test (8/2/2 of 12;
about 1/6 each for validation and test, at least one test subject). The same ``--seed`` gives
bit-identical files; subject i depends only on (seed, i), not on ``--n-subjects``.

Usage: python tools/make_abdomen_phantoms.py [--out data/abdomen_phantoms] [--n-subjects 12]
                                             [--seed 0] [--shape 144 144 128] [--save-ddf]
                                             [--family default|random|heldout] [--test-only] [--mix-with DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.niftiio import atomic_save, atomic_write_text  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHAPE = (144, 144, 128)
SPACING_MM = 1.0
LABEL_NAMES = {0: "background", 1: "liver", 2: "spleen", 3: "right kidney", 4: "left kidney"}
PV_SIGMA_VOXELS = 0.7  # partial-volume blur
LIVER_MAX_DISPLACEMENT_MM = (10.0, 14.0)  # at the default shape; scales with the shape
# both ranges are calibrated so that identity ("Moving") Dice/ASD on the test pairs is close to the F3RNet
# paper's Moving row (liver 77%, spleen 78%, kidney 80% Dice; ASD 5.0 / 2.0 / 2.0 mm)
GLOBAL_MAX_DISPLACEMENT_MM = (5.0, 7.0)
LIVER_WEIGHT_DILATION = 1.0  # times the liver's displacement
TWIST_STRENGTH = 2.0  # local twists of the liver relative to its translation

# Generator families (``--family``). "default" is the original generator, bit for bit. "random" widens every
# draw for SynthMorph-style training variety (Hoffmann et al., "SynthMorph: learning contrast-invariant
# registration without acquired images"): organ positions, sizes, orientations and surface ripples, body outline,
# grid size, HU tables, MR contrast drawn at random per tissue, texture, partial volume, noise, bias, and the
# deformation's magnitude and kind (a rigid part). "heldout" is a family the "random" generator never produces,
# for testing generalisation: superellipsoid (boxy) organs (exponent 3.5-5; "random" draws ellipsoids only),
# portal-venous contrast-enhanced CT (liver ~110 HU, renal cortex ~180 HU: "random" draws within 25 HU of the
# non-contrast table) and a T2-weighted MR table.
FAMILIES = ("default", "random", "heldout")
MIN_ORGAN_FRACTION = 0.001  # of the volume, for every organ of the "random" and "heldout" families
# fields of view of the "random" family (mm at the default shape, per axis), sampled at a random spacing
RANDOM_SHAPES = ((112, 128, 144, 160), (112, 128, 144, 160), (96, 112, 128, 144))
# portal-venous CT (HU) of the "heldout" family, for the tissues that enhance; the rest keep TISSUES
ENHANCED_CT_HU = {
    "liver": 110,
    "spleen": 120,
    "kidney cortex R": 180,
    "kidney medulla R": 140,
    "kidney cortex L": 180,
    "kidney medulla L": 140,
    "bowel wall": 90,
    "blood vessel": 170,
}
# T2-weighted MR (a.u.) of the "heldout" family: fluid bright, liver dark, spleen and kidneys bright
T2_MR = {
    "air": 0,
    "subcutaneous fat": 650,
    "visceral fat": 600,
    "muscle": 180,
    "liver": 230,
    "spleen": 560,
    "kidney cortex R": 520,
    "kidney medulla R": 720,
    "kidney cortex L": 520,
    "kidney medulla L": 720,
    "bowel wall": 300,
    "bowel content": 900,
    "bowel gas": 30,
    "vertebral marrow": 420,
    "cortical bone": 50,
    "disc": 650,
    "spinal canal": 1000,
    "blood vessel": 80,
}

# Tissue classes of the anatomy map. Columns: CT mean (HU), CT texture amplitude (HU),
# MR T1 mean (a.u.), MR texture amplitude (a.u.). CT is non-contrast; on T1, fat is brightest,
# the liver is brighter than the spleen, the renal cortex brighter than the medulla, cortical bone,
# flowing blood and air are dark, and fatty vertebral marrow is moderately bright.
TISSUES = [
    # name              CT HU  CT tex   MR   MR tex
    ("air", -1000, 0, 0, 0),
    ("subcutaneous fat", -100, 8, 950, 30),
    ("visceral fat", -90, 10, 900, 40),
    ("muscle", 40, 8, 330, 15),
    ("liver", 60, 5, 600, 15),
    ("spleen", 45, 5, 400, 15),
    ("kidney cortex R", 35, 4, 480, 15),
    ("kidney medulla R", 25, 4, 320, 15),
    ("kidney cortex L", 35, 4, 480, 15),
    ("kidney medulla L", 25, 4, 320, 15),
    ("bowel wall", 40, 8, 350, 20),
    ("bowel content", 15, 20, 200, 50),
    ("bowel gas", -950, 30, 30, 10),
    ("vertebral marrow", 400, 60, 650, 40),
    ("cortical bone", 700, 60, 60, 10),
    ("disc", 80, 10, 280, 15),
    ("spinal canal", 15, 5, 150, 10),
    ("blood vessel", 40, 4, 100, 20),
]
(
    AIR,
    SUBCUT_FAT,
    VISCERAL_FAT,
    MUSCLE,
    LIVER,
    SPLEEN,
    KID_R_CORTEX,
    KID_R_MEDULLA,
    KID_L_CORTEX,
    KID_L_MEDULLA,
    BOWEL_WALL,
    BOWEL_CONTENT,
    BOWEL_GAS,
    MARROW,
    CORTICAL,
    DISC,
    CANAL,
    VESSEL,
) = range(len(TISSUES))
TISSUE_TO_LABEL = np.zeros(len(TISSUES), np.uint8)
TISSUE_TO_LABEL[[LIVER, SPLEEN, KID_R_CORTEX, KID_R_MEDULLA, KID_L_CORTEX, KID_L_MEDULLA]] = [1, 2, 3, 3, 4, 4]
CAVITY_FILL = (VISCERAL_FAT, BOWEL_WALL, BOWEL_CONTENT, BOWEL_GAS)  # what the organs may replace


# ----------------------------------------------------------------------------------------------
# geometry helpers; coordinates are normalised to [-1, 1] over the field of view:
# u: left (-) to right (+), v: posterior (-) to anterior (+), w: inferior (-) to superior (+)
# ----------------------------------------------------------------------------------------------


def normalised_axes(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = [((np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1) for n in shape]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix from three angles (radians) about u, v and w."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return (rz @ ry @ rx).astype(np.float32)


def random_ripples(rng: np.random.Generator, n: int, amplitude: float, frequency: tuple[float, float]) -> list:
    """Random Fourier terms a*sin(k.q + phi): a smooth random perturbation of a surface."""
    terms = []
    for _ in range(n):
        direction = rng.standard_normal(3)
        k = direction / np.linalg.norm(direction) * rng.uniform(*frequency)
        terms.append((float(rng.uniform(0.5, 1.0) * amplitude), k.astype(np.float32), float(rng.uniform(0, 2 * np.pi))))
    return terms


def eval_ripples(terms: list, q: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray | float:
    out: np.ndarray | float = 0.0
    for amp, k, phi in terms:
        out = out + amp * np.sin(k[0] * q[0] + k[1] * q[1] + k[2] * q[2] + phi)
    return out


class Organ:
    """A randomly deformed ellipsoid: implicit function < 0 inside.

    `taper` narrows the organ's v and w extent towards its -u end (the liver's left lobe)."""

    def __init__(
        self,
        rng,
        centre,
        radii,
        angles_deg,
        jitter=0.04,
        size_jitter=0.12,
        angle_jitter=12.0,
        ripple_amp=0.08,
        taper: float = 0.0,
        exponent: float = 2.0,
    ):
        self.centre = np.asarray(centre, np.float32) + rng.uniform(-jitter, jitter, 3).astype(np.float32)
        self.radii = np.asarray(radii, np.float32) * rng.uniform(1 - size_jitter, 1 + size_jitter, 3).astype(np.float32)
        angles = np.deg2rad(np.asarray(angles_deg, float) + rng.uniform(-angle_jitter, angle_jitter, 3))
        self.rot = rotation(angles)
        self.ripples = random_ripples(rng, 4, ripple_amp, (1.5, 3.5))
        self.taper = taper
        self.exponent = float(exponent)

    def local(self, u, v, w):
        du, dv, dw = u - self.centre[0], v - self.centre[1], w - self.centre[2]
        r = self.rot  # local = R^T (p - c)
        q = [(r[0, i] * du + r[1, i] * dv + r[2, i] * dw) / self.radii[i] for i in range(3)]
        if self.taper:
            # s goes from (1 - taper) at the -u tip to 1 over the +u half
            s = 1 - self.taper / (1 + np.exp(np.clip(q[0] * 4.0, -30, 30)))
            q[1], q[2] = q[1] / s, q[2] / s
        return q

    def field(self, u, v, w) -> np.ndarray:
        q = self.local(u, v, w)
        if self.exponent == 2.0:
            radius = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
        else:  # a superellipsoid: boxier as the exponent grows
            p = self.exponent
            radius = (np.abs(q[0]) ** p + np.abs(q[1]) ** p + np.abs(q[2]) ** p) ** (1 / p)
        return radius - 1 - eval_ripples(self.ripples, q)

    def box(self, shape, margin: float = 1.6) -> tuple[slice, slice, slice]:
        """Voxel bounding box of the organ (generous: rotation, taper and ripples included)."""
        extent = float(self.radii.max()) * margin
        out = []
        for axis, n in enumerate(shape):
            lo = int(np.floor(((self.centre[axis] - extent) + 1) / 2 * n)) - 1
            hi = int(np.ceil(((self.centre[axis] + extent) + 1) / 2 * n)) + 1
            out.append(slice(max(lo, 0), min(hi, n)))
        return tuple(out)


def smooth_noise(rng: np.random.Generator, shape, length: float, down: int = 4) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation length `length` (fraction of the FOV).

    Computed on a grid `down` times coarser and upsampled linearly (the field is smooth there)."""
    low_shape = tuple(max(4, int(np.ceil(n / down))) for n in shape)
    low = rng.standard_normal(low_shape).astype(np.float32)
    sigma = [max(length * n, 0.5) for n in low_shape]
    low = ndimage.gaussian_filter(low, sigma, mode="wrap")
    low = (low - low.mean()) / (low.std() + 1e-8)
    return resize(low, shape, order=1)


def resize(a: np.ndarray, shape, order: int) -> np.ndarray:
    out = ndimage.zoom(
        a, np.array(shape, float) / np.array(a.shape, float), order=order, mode="nearest", grid_mode=False
    )
    assert out.shape == tuple(shape), (out.shape, shape)
    return out


# ----------------------------------------------------------------------------------------------
# anatomy
# ----------------------------------------------------------------------------------------------


def organ_variety(rng: np.random.Generator, family: str) -> dict:
    """Extra keyword arguments of :class:`Organ` for a generator family (none for "default")."""
    if family == "random":
        return {
            "jitter": 0.06,
            "size_jitter": 0.2,
            "angle_jitter": 20.0,
            "ripple_amp": float(rng.uniform(0.04, 0.16)),
        }
    if family == "heldout":
        return {"exponent": float(rng.uniform(3.5, 5.0)), "ripple_amp": 0.03}
    return {}


def make_anatomy(rng: np.random.Generator, shape, family: str = "default") -> np.ndarray:
    """A random abdomen as a uint8 tissue-class map (indices into TISSUES), from generator `family`."""
    u, v, w = normalised_axes(shape)
    tissue = np.zeros(shape, np.uint8)

    # body outline: an ellipse in the axial plane, slowly varying along z, with a rippled edge
    if family == "random":
        a_u, a_v = rng.uniform(0.82, 0.97), rng.uniform(0.64, 0.80)
    else:
        a_u, a_v = rng.uniform(0.86, 0.95), rng.uniform(0.68, 0.76)
    v0 = rng.uniform(0.0, 0.04)
    taper_z = rng.uniform(-0.05, 0.05)
    theta = np.arctan2(v - v0, u)
    edge = eval_ripples(random_ripples(rng, 3, 0.015, (1.0, 3.0)), (np.cos(theta), np.sin(theta), w))
    scale_z = 1 + taper_z * w
    body_r = np.sqrt((u / (a_u * scale_z)) ** 2 + ((v - v0) / (a_v * scale_z)) ** 2) - edge

    def inner(thickness):  # ellipse shrunk by `thickness` (normalised units) along both axes
        return np.sqrt((u / (a_u * scale_z - thickness)) ** 2 + ((v - v0) / (a_v * scale_z - thickness)) ** 2) - edge

    t_fat = rng.uniform(0.05, 0.10)
    t_muscle = rng.uniform(0.04, 0.06)
    tissue[body_r < 1] = SUBCUT_FAT
    tissue[inner(t_fat) < 1] = MUSCLE
    cavity = inner(t_fat + t_muscle) < 1
    tissue[cavity] = VISCERAL_FAT

    # bowel loops: thresholded smooth noise, favouring the anterior and inferior cavity,
    # with a wall, fluid/faecal content and air pockets that rise anteriorly (supine patient)
    loops = smooth_noise(rng, shape, 0.03, down=2) + 0.5 * v - 0.3 * w
    threshold = rng.uniform(0.3, 0.6)
    gas_field = smooth_noise(rng, shape, 0.03) + 1.5 * v
    bowel = cavity & (loops > threshold)
    lumen = bowel & (loops > threshold + 0.3)
    tissue[bowel] = BOWEL_WALL
    tissue[lumen] = BOWEL_CONTENT
    tissue[lumen & (gas_field > rng.uniform(1.3, 1.7))] = BOWEL_GAS

    # muscles: paraspinal (posterior, may sit in the fat layer) and psoas (grows inferiorly)
    su = rng.uniform(-0.03, 0.03)  # spine offset from the midline
    for side in (-1, 1):
        par = ((u - su - side * 0.2) / rng.uniform(0.11, 0.15)) ** 2 + ((v + 0.58) / rng.uniform(0.08, 0.11)) ** 2
        tissue[(par < 1) & (body_r < 1)] = MUSCLE
        r_psoas = rng.uniform(0.04, 0.06) + rng.uniform(0.02, 0.04) * (1 - w) / 2
        psoas = ((u - su - side * 0.16) ** 2 + (v + 0.36) ** 2) < r_psoas**2
        tissue[psoas & cavity] = MUSCLE

    # vessels: aorta left-anterior of the spine, IVC to the right
    aorta = ((u - su + 0.05) ** 2 + (v + 0.28) ** 2) < rng.uniform(0.04, 0.055) ** 2
    ivc = ((u - su - 0.13) / 0.065) ** 2 + ((v + 0.26) / 0.045) ** 2 < 1
    tissue[np.broadcast_to(aorta | ivc, shape)] = VESSEL

    # spine: vertebral bodies (cortical rim, discs), canal, posterior arch
    vb = np.sqrt(((u - su) / rng.uniform(0.11, 0.14)) ** 2 + ((v + 0.45) / rng.uniform(0.09, 0.11)) ** 2)
    period, phase = rng.uniform(0.42, 0.5), rng.uniform(0, 1)
    disc = (((w - phase) / period) % 1.0) < 0.22
    vb3 = np.broadcast_to(vb, shape)
    tissue[vb3 < 1] = CORTICAL
    tissue[vb3 < 0.8] = MARROW
    tissue[(vb3 < 1) & np.broadcast_to(disc, shape)] = DISC
    canal_r2 = (u - su) ** 2 + (v + 0.62) ** 2
    arch = np.broadcast_to((canal_r2 < 0.095**2) | ((np.abs(u - su) < 0.025) & (v < -0.62) & (v > -0.71)), shape)
    tissue[arch & ~np.broadcast_to(disc, shape) & (body_r < 1)] = CORTICAL
    tissue[np.broadcast_to(canal_r2 < 0.055**2, shape)] = CANAL

    # organs; they only replace the cavity fill (fat and bowel), kidneys first with a perirenal fat rim
    fill = np.isin(tissue, CAVITY_FILL)
    reserved = np.zeros(shape, bool)
    for side, (cortex, medulla) in ((1, (KID_R_CORTEX, KID_R_MEDULLA)), (-1, (KID_L_CORTEX, KID_L_MEDULLA))):
        # right kidney (side +1) sits lower than the left; upper poles tilt medially, hilum faces anteromedially
        centre = (side * 0.38 + su, -0.37, -0.18 if side > 0 else -0.06)
        variety = {"ripple_amp": 0.04, **organ_variety(rng, family)}
        kidney = Organ(rng, centre, (0.13, 0.11, 0.3), (0, -side * 12, -side * 20), **variety)
        box = kidney.box(shape)
        q = kidney.local(u[box[0]], v[:, box[1]], w[:, :, box[2]])
        field = kidney.field(u[box[0]], v[:, box[1]], w[:, :, box[2]])
        hilum = (side * q[0] < -0.45) & (np.abs(q[2]) < 0.35) & (np.abs(q[1]) < 0.6)
        sub_fill, sub_tissue = fill[box], tissue[box]
        sub_tissue[(field < 0.25) & sub_fill] = VISCERAL_FAT
        inside = (field < 0) & ~hilum & sub_fill
        sub_tissue[inside] = cortex
        sub_tissue[inside & (field < -0.35)] = medulla
        reserved[box] |= field < 0.25

    liver = Organ(
        rng,
        (0.27, 0.0, 0.25),
        (0.52, 0.45, 0.48),
        (0, 0, -10),
        taper=rng.uniform(0.45, 0.6),
        **{"size_jitter": 0.1, "ripple_amp": 0.07, **organ_variety(rng, family)},
    )
    spleen = Organ(
        rng,
        (-0.6, -0.25, 0.35),
        (0.13, 0.27, 0.29),
        (0, 0, 35),
        **{"size_jitter": 0.12, "ripple_amp": 0.06, **organ_variety(rng, family)},
    )
    for organ, code in ((liver, LIVER), (spleen, SPLEEN)):
        box = organ.box(shape)
        field = organ.field(u[box[0]], v[:, box[1]], w[:, :, box[2]])
        tissue[box][(field < 0) & fill[box] & ~reserved[box]] = code
        reserved[box] |= field < 0.1  # the spleen keeps off the liver
    return tissue


# ----------------------------------------------------------------------------------------------
# deformation
# ----------------------------------------------------------------------------------------------


def shape_scale(shape) -> float:
    """Lengths in mm are given for the default shape; smaller test shapes scale them down."""
    return float(np.prod(np.array(shape, float) / np.array(DEFAULT_SHAPE, float)) ** (1 / 3))


def make_displacement(
    rng: np.random.Generator,
    shape,
    liver_mask: np.ndarray,
    exclude_masks: tuple[np.ndarray, ...] = (),
    liver_mm: tuple[float, float] = LIVER_MAX_DISPLACEMENT_MM,
    global_mm: tuple[float, float] = GLOBAL_MAX_DISPLACEMENT_MM,
    twist: float = TWIST_STRENGTH,
) -> np.ndarray:
    """A smooth random displacement (3, X, Y, Z) in voxels.

    * a weak global field: 4x4x4 random control vectors, cubic B-spline upsampled;
    * a large local field on the liver: a random translation plus three local twists (curls of
      Gaussian potentials at random liver points, so divergence-free), weighted by a smooth weight
      that is 1 over the liver dilated by the displacement and decays around it (so the liver moves
      and bends rather than being compressed); scaled so that the largest local displacement in the
      liver is 10-14 mm at the default shape;
    * organs in `exclude_masks` (the kidneys: retroperitoneal, fixed in perirenal fat) keep out of the
      liver's motion: the local field fades to 0 over a smooth ramp around them, so they follow only
      the weak global field.

    Computed on a grid up to 4x coarser (at least 24 voxels a side where the shape allows) and
    upsampled linearly.

    `liver_mm` and `global_mm` are the ranges of the largest liver and global displacement (mm at the default
    shape), `twist` the strength of the liver's local twists."""
    scale = shape_scale(shape)
    factor = max(1, min(4, min(shape) // 24))
    low_shape = tuple(max(6, int(np.ceil(n / factor))) for n in shape)
    ctrl = rng.standard_normal((3, 4, 4, 4)).astype(np.float32)
    glob = np.stack([resize(c, low_shape, order=3) for c in ctrl])
    glob *= rng.uniform(*global_mm) * scale / (np.sqrt((glob**2).sum(0)).max() + 1e-8)

    liver_low = resize(liver_mask.astype(np.float32), low_shape, order=1)
    sigma = 0.06 * float(np.mean(low_shape))
    target = rng.uniform(*liver_mm) * scale  # voxels
    # weight 1 over the liver dilated by about the displacement (so the pulled-back liver keeps its
    # volume), then a smooth ramp down to 0 in the surrounding fat and bowel
    distance = ndimage.distance_transform_edt(liver_low <= 0.5)  # low-res voxels from the liver
    ramp = 3 * sigma
    weight = np.clip(1 - (distance - LIVER_WEIGHT_DILATION * target / factor) / ramp, 0, 1).astype(np.float32)
    weight = ndimage.gaussian_filter(weight, sigma / 2)
    grid = np.indices(low_shape, dtype=np.float32)
    points = np.argwhere(liver_low > 0.5)
    if len(points) == 0:
        points = np.argwhere(liver_low == liver_low.max())
    local = np.broadcast_to(rng.standard_normal(3).astype(np.float32)[:, None, None, None], (3,) + low_shape).copy()
    # local twists: curl(bump * a) = grad(bump) x a, divergence-free, so they bend without compressing
    width = 0.25 * float(np.mean(low_shape))
    for p in points[rng.choice(len(points), size=3)]:
        offset = grid - p[:, None, None, None].astype(np.float32)
        bump = np.exp(-(offset**2).sum(0) / (2 * width**2))
        grad = -offset / width**2 * bump  # gradient of the bump
        a = rng.standard_normal(3).astype(np.float32) * width * twist
        local += np.stack(
            [grad[1] * a[2] - grad[2] * a[1], grad[2] * a[0] - grad[0] * a[2], grad[0] * a[1] - grad[1] * a[0]]
        )
    local *= weight
    # kidneys keep out of the liver's motion: the local field fades to 0 over a smooth ramp around them
    for mask in exclude_masks:
        m_low = resize(mask.astype(np.float32), low_shape, order=1)
        if not (m_low > 0.25).any():
            continue
        distance = ndimage.distance_transform_edt(m_low <= 0.25)
        keep = np.clip((distance - 1) / ramp, 0, 1).astype(np.float32)  # 0 on the kidney, 1 far away
        local *= ndimage.gaussian_filter(keep, sigma / 2)
    magnitude = np.sqrt((local**2).sum(0))
    local *= target / (magnitude[liver_low > 0.5].max() + 1e-8)
    field = glob + local
    return np.stack([resize(c, shape, order=1) for c in field]).astype(np.float32)


def warp(volume: np.ndarray, displacement: np.ndarray, order: int) -> np.ndarray:
    """out(x) = volume(x + displacement(x)); nearest-neighbour for order 0 (labels)."""
    coords = np.indices(volume.shape, dtype=np.float32)
    coords += displacement
    return ndimage.map_coordinates(volume, coords, order=order, mode="nearest", prefilter=False)


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------


def tissue_tables(rng: np.random.Generator, family: str = "default") -> tuple[np.ndarray, ...]:
    """Per-subject CT and MR lookup tables (mean and texture amplitude per tissue).

    "default": small random offsets around TISSUES. "random": CT within 25 HU of TISSUES (texture x0.5-2) and the
    MR mean of every tissue drawn uniformly in [0, 1000] a.u., SynthMorph's contrast randomisation, so that no MR
    intensity table can be learnt. "heldout": contrast-enhanced CT (ENHANCED_CT_HU) and T2-weighted MR (T2_MR),
    each within 5 HU / 10 %."""
    table = np.array([t[1:] for t in TISSUES], np.float32)
    n = len(TISSUES)
    if family == "random":
        ct_mean = table[:, 0] + rng.uniform(-25, 25, n).astype(np.float32)
        ct_mean[AIR] = -1000
        ct_amp = table[:, 1] * rng.uniform(0.5, 2.0, n).astype(np.float32)
        mr_mean = rng.uniform(0, 1000, n).astype(np.float32)
        mr_amp = rng.uniform(5, 60, n).astype(np.float32)
        return ct_mean, ct_amp, mr_mean, mr_amp
    if family == "heldout":
        names = [t[0] for t in TISSUES]
        ct_mean = np.array([ENHANCED_CT_HU.get(name, t[1]) for name, t in zip(names, TISSUES)], np.float32)
        ct_mean += rng.uniform(-5, 5, n).astype(np.float32)
        ct_mean[AIR] = -1000
        mr_mean = np.array([T2_MR[name] for name in names], np.float32) * rng.uniform(0.9, 1.1, n).astype(np.float32)
        return ct_mean, table[:, 1], mr_mean, table[:, 3]
    ct_mean = table[:, 0] + rng.uniform(-5, 5, len(TISSUES)).astype(np.float32)
    ct_mean[AIR] = -1000
    mr_mean = table[:, 2] * rng.uniform(0.9, 1.1, len(TISSUES)).astype(np.float32)
    return ct_mean, table[:, 1], mr_mean, table[:, 3]


def render(
    tissue: np.ndarray, texture: np.ndarray, mean: np.ndarray, amplitude: np.ndarray, pv_sigma: float = PV_SIGMA_VOXELS
) -> np.ndarray:
    image = mean[tissue] + amplitude[tissue] * texture
    return ndimage.gaussian_filter(image, pv_sigma, mode="nearest")


def bias_field(rng: np.random.Generator, shape, strength: tuple[float, float] = (0.2, 0.3)) -> np.ndarray:
    """Smooth multiplicative MR bias: exp of a random quadratic polynomial, about +-`strength` (20-30 %)."""
    u, v, w = normalised_axes(shape)
    c = rng.normal(0, 1, 9).astype(np.float32)
    log_b = (
        c[0] * u
        + c[1] * v
        + c[2] * w
        + c[3] * u * v
        + c[4] * v * w
        + c[5] * u * w
        + c[6] * u**2
        + c[7] * v**2
        + c[8] * w**2
    )
    log_b = log_b - log_b.mean()
    log_b *= rng.uniform(*strength) / (np.abs(log_b).max() + 1e-8)
    return np.exp(log_b).astype(np.float32)


def random_shape(rng: np.random.Generator, shape) -> tuple[int, int, int]:
    """A grid size of the "random" family: each axis drawn from RANDOM_SHAPES, scaled by `shape` / DEFAULT_SHAPE
    (so that small test shapes stay small) and rounded to a multiple of 16 voxels (at least 16)."""
    out = []
    for choices, n, n0 in zip(RANDOM_SHAPES, shape, DEFAULT_SHAPE):
        size = int(rng.choice(choices)) * n / n0
        out.append(max(16, int(round(size / 16)) * 16))
    return tuple(out)


def random_spacing_grid(rng: np.random.Generator, fov_shape) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The grid and voxel spacing of a "random" subject: the field of view `fov_shape` (mm, from :func:`random_shape`)
    sampled at a spacing drawn in [1, 2] mm (one draw for all axes; half of the subjects keep 1 mm), the grid
    rounded to a multiple of 16 voxels (at least 16) and the spacing adjusted to it. The anatomy is defined on the
    field of view, so a coarser grid shows the same anatomy with fewer, larger voxels; the displacements are drawn in
    voxels of the grid (:func:`shape_scale`)."""
    target = 1.0 if rng.uniform() < 0.5 else float(rng.uniform(1.0, 2.0))
    grid = tuple(max(16, int(round(n / target / 16)) * 16) for n in fov_shape)
    return grid, tuple(float(n) / g for n, g in zip(fov_shape, grid))


def rigid_displacement(rng: np.random.Generator, shape, max_degrees: float, max_shift: float) -> np.ndarray:
    """A small rigid motion as a DDF (3, X, Y, Z) in voxels: a rotation about the volume's centre and its body
    axis w (up to `max_degrees`) and a translation (up to `max_shift` voxels per axis)."""
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    shift = rng.uniform(-max_shift, max_shift, 3)
    grid = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape, np.float32) - 1) / 2
    x, y = grid[0] - centre[0], grid[1] - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    ddf = np.stack([c * x - s * y - x, s * x + c * y - y, np.zeros(shape, np.float32)])
    return (ddf + shift.astype(np.float32)[:, None, None, None]).astype(np.float32)


def make_subject(rng: np.random.Generator, shape=DEFAULT_SHAPE, family: str = "default") -> dict[str, np.ndarray]:
    """One random subject from generator `family` (one of FAMILIES; see the module constants).

    Returns float32 ``ct`` (HU) and ``mr`` (a.u.), uint8 ``ct_label`` and ``mr_label``, the uint8
    tissue map ``ct_tissue`` and the float32 ``displacement`` (3, X, Y, Z) in voxels with
    ``mr_anatomy(x) = ct_anatomy(x + displacement(x))``, i.e. the true CT->MRI DDF, and the voxel ``spacing`` (mm).
    The "random" family draws its own field of view and spacing (:func:`random_shape`, :func:`random_spacing_grid`),
    so its arrays may differ from `shape` and its voxels from 1 mm.

    Raises:
        ValueError: `shape` is not three sizes of at least 16 voxels, or `family` is not one of FAMILIES."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three sizes of at least 16 voxels, got {shape}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    wide = family == "random"
    spacing = (SPACING_MM,) * 3
    if wide:
        shape, spacing = random_spacing_grid(rng, random_shape(rng, shape))
    ct_tissue = make_anatomy(rng, shape, family)
    for _ in range(20 if family != "default" else 0):  # wider draws may squeeze an organ out: draw again
        if (
            np.bincount(TISSUE_TO_LABEL[ct_tissue].ravel(), minlength=5)[1:].min()
            >= MIN_ORGAN_FRACTION * ct_tissue.size
        ):
            break
        ct_tissue = make_anatomy(rng, shape, family)
    fine = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.0)
    texture = 0.6 * smooth_noise(rng, shape, 0.02, down=2) + 0.8 * fine / (fine.std() + 1e-8)  # unit std
    ct_mean, ct_amp, mr_mean, mr_amp = tissue_tables(rng, family)
    kidneys = (np.isin(ct_tissue, (KID_R_CORTEX, KID_R_MEDULLA)), np.isin(ct_tissue, (KID_L_CORTEX, KID_L_MEDULLA)))
    motion = {"liver_mm": (4.0, 18.0), "global_mm": (2.0, 10.0), "twist": float(rng.uniform(0.5, 3.5))} if wide else {}
    displacement = make_displacement(rng, shape, ct_tissue == LIVER, kidneys, **motion)
    if wide and rng.uniform() < 0.5:  # another kind of motion: a small rigid shift (5 mm at the default shape) and turn
        displacement = displacement + rigid_displacement(rng, shape, 5.0, 5.0 * shape_scale(shape))
    mr_tissue = warp(ct_tissue, displacement, order=0)
    mr_texture = warp(texture, displacement, order=1)

    pv = float(rng.uniform(0.4, 1.2)) if wide else PV_SIGMA_VOXELS
    ct = render(ct_tissue, texture, ct_mean, ct_amp, pv)
    ct += rng.standard_normal(shape, dtype=np.float32) * np.float32(rng.uniform(*((5, 30) if wide else (8, 15))))
    ct = np.clip(ct, -1024, 3071)

    mr = render(mr_tissue, mr_texture, mr_mean, mr_amp, pv) * bias_field(rng, shape, (0.1, 0.5) if wide else (0.2, 0.3))
    sigma = np.float32(rng.uniform(*((5, 40) if wide else (12, 20))))
    mr = np.sqrt(
        (mr + rng.standard_normal(shape, dtype=np.float32) * sigma) ** 2
        + (rng.standard_normal(shape, dtype=np.float32) * sigma) ** 2
    )  # Rician magnitude noise
    return {
        "ct": ct.astype(np.float32),
        "mr": mr.astype(np.float32),
        "ct_label": TISSUE_TO_LABEL[ct_tissue],
        "mr_label": TISSUE_TO_LABEL[mr_tissue],
        "ct_tissue": ct_tissue,
        "displacement": displacement,
        "spacing": tuple(float(x) for x in spacing),
    }


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------


def make_affine(shape, spacing=(SPACING_MM,) * 3) -> np.ndarray:
    """RAS, `spacing` mm (1 mm by default), world origin at the centre of the volume."""
    spacing = np.asarray(spacing, float)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape, float) - 1) / 2 * spacing
    return affine


def nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return img


def split_sizes(n: int, test_only: bool = False) -> tuple[int, int, int]:
    """(training, validation, test): about 1/6 each for validation and test, test at least one; with `test_only`
    (a held-out family) every subject is a test subject."""
    if test_only:
        if n < 1:
            raise SystemExit(f"error: --n-subjects must be at least 1, got {n}")
        return 0, 0, n
    if n < 3:
        raise SystemExit(
            f"error: --n-subjects must be at least 3 (one each for training, validation and test), got {n}"
        )
    n_test = max(1, round(n / 6))
    n_val = max(1, round(n / 6))
    return n - n_val - n_test, n_val, n_test


def case_files(case: str) -> dict[str, str]:
    return {
        "ct": f"ct/{case}_ct.nii.gz",
        "mr": f"mr/{case}_mr.nii.gz",
        "ct_label": f"labels/{case}_ct_label.nii.gz",
        "mr_label": f"labels/{case}_mr_label.nii.gz",
    }


def build_datalists(
    cases: list[str], shape, seed: int, family: str = "default", test_only: bool = False
) -> dict[str, dict]:
    n_train, n_val, _ = split_sizes(len(cases), test_only)
    splits = {
        "training": cases[:n_train],
        "validation": cases[n_train : n_train + n_val],
        "test": cases[n_train + n_val :],
    }
    out = {}
    titles = {"ct2mri": "CT->MRI: fixed MR, moving CT", "mri2ct": "MRI->CT: fixed CT, moving MR"}
    for direction, (fixed, moving) in {"ct2mri": ("mr", "ct"), "mri2ct": ("ct", "mr")}.items():
        datalist: dict = {
            "description": (
                f"Synthetic abdominal CT/MR phantoms (tools/make_abdomen_phantoms.py, family {family}, seed {seed}), "
                f"{titles[direction]}; "
                "each subject's CT paired with its own MR, which differs by a known smooth deformation "
                "(largest on the liver). CT in HU, MR raw."
            ),
            "direction": direction,
            "family": family,
            # the "random" family draws a grid size per subject
            "spatial_shape": None if family == "random" else list(shape),
            "spacing_mm": None if family == "random" else [SPACING_MM] * 3,
            "labels": {str(k): v for k, v in LABEL_NAMES.items()},
        }
        for split, names in splits.items():
            items = []
            for case in names:
                files = case_files(case)
                items.append(
                    {
                        "fixed_image": files[fixed],
                        "moving_image": files[moving],
                        "fixed_label": files[f"{fixed}_label"],
                        "moving_label": files[f"{moving}_label"],
                        "name": case,
                    }
                )
            datalist[split] = items
        out[direction] = datalist
    return out


def mix_datalists(out: Path, other: Path) -> dict[str, dict]:
    """Training mixes of two phantom folders: per direction, ``out``'s datalist with ``other``'s training and
    validation subjects appended (their paths made relative to ``out``, names prefixed by ``other``'s folder name
    so that they stay unique); the test subjects stay ``out``'s alone.

    Used to keep the sample phantoms in the random family's training data (the SynthMorph-style family alone
    makes a network forget the sample phantoms' contrast, training log stage 1).

    Raises:
        FileNotFoundError: a datalist of either folder is missing (run this tool for that folder first).
    """
    mixes = {}
    for direction in ("ct2mri", "mri2ct"):
        lists = []
        for folder in (out, other):
            path = folder / f"datalist_{direction}.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: make the phantoms of {folder} first")
            lists.append(json.loads(path.read_text()))
        own, extra = lists
        prefix = Path(os.path.relpath(other.resolve(), out.resolve()))
        mix = dict(own)
        mix["family"] = f"{own.get('family')}+{extra.get('family')}"
        mix["description"] = (
            f"{own.get('description', '')} Training and validation mixed with those of {other.name} "
            f"(family {extra.get('family')}); the test subjects are this family's alone."
        )
        for split in ("training", "validation"):
            moved = []
            for item in extra.get(split, []):
                item = {k: str(prefix / v) if k != "name" else f"{other.name}_{v}" for k, v in item.items()}
                moved.append(item)
            mix[split] = list(own.get(split, [])) + moved
        mixes[direction] = mix
    return mixes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "abdomen_phantoms", help="output folder")
    parser.add_argument("--n-subjects", type=int, default=12, help="number of subjects (at least 3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=list(DEFAULT_SHAPE),
        metavar=("X", "Y", "Z"),
        help="volume size in 1 mm voxels",
    )
    parser.add_argument(
        "--save-ddf", action="store_true", help="also write the true CT->MRI displacement of each subject to <out>/ddf/"
    )
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default="default",
        help="generator family: default (the sample phantoms), random (SynthMorph-style training variety), "
        "heldout (organ shapes and CT/MR tables the random family never produces; for testing)",
    )
    parser.add_argument(
        "--test-only", action="store_true", help="put every subject in the test split (a held-out test family)"
    )
    parser.add_argument(
        "--mix-with",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write <out>/datalist_mix_<direction>.json: this family's training and validation subjects "
        "with those of the phantom folder DIR (e.g. data/abdomen_phantoms), for training on both",
    )
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    if min(shape) < 16:
        raise SystemExit(f"error: --shape must be at least 16 voxels along every axis, got {shape}")
    split_sizes(args.n_subjects, args.test_only)
    if args.mix_with is not None:
        missing = [str(args.mix_with / f"datalist_{d}.json") for d in ("ct2mri", "mri2ct")]
        missing = [m for m in missing if not Path(m).is_file()]
        if missing:  # checked before any phantom is made
            raise SystemExit(f"error: --mix-with: {missing[0]} not found: make the phantoms of {args.mix_with} first")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: output path {out} exists and is not a folder")
    folders = ["ct", "mr", "labels"] + (["ddf"] if args.save_ddf else [])
    for sub in folders:
        (out / sub).mkdir(parents=True, exist_ok=True)

    cases = [f"case{i:03d}" for i in range(args.n_subjects)]
    for i, case in enumerate(tqdm(cases, desc=f"making phantoms ({args.family})", unit="subject")):
        subject = make_subject(np.random.default_rng([args.seed, i]), shape, args.family)
        affine = make_affine(subject["ct"].shape, subject["spacing"])
        files = case_files(case)
        atomic_save(nifti(np.round(subject["ct"]).astype(np.int16), affine), out / files["ct"])
        atomic_save(nifti(subject["mr"], affine), out / files["mr"])
        atomic_save(nifti(subject["ct_label"], affine), out / files["ct_label"])
        atomic_save(nifti(subject["mr_label"], affine), out / files["mr_label"])
        if args.save_ddf:
            ddf = np.ascontiguousarray(np.moveaxis(subject["displacement"], 0, -1))
            atomic_save(nifti(ddf, affine), out / "ddf" / f"{case}_ddf_ct2mri.nii.gz")

    for direction, datalist in build_datalists(cases, shape, args.seed, args.family, args.test_only).items():
        atomic_write_text(json.dumps(datalist, indent=2), out / f"datalist_{direction}.json")
    if args.mix_with is not None:
        for direction, datalist in mix_datalists(out, args.mix_with).items():  # its datalists were checked above
            atomic_write_text(json.dumps(datalist, indent=2), out / f"datalist_mix_{direction}.json")
        print(f"training mixes with {args.mix_with}: {out / 'datalist_mix_ct2mri.json'}, datalist_mix_mri2ct.json")
    n_train, n_val, n_test = split_sizes(len(cases), args.test_only)
    grid = "random grids and spacings" if args.family == "random" else f"{shape} at {SPACING_MM:g} mm"
    print(
        f"abdomen phantoms ({args.family} family): {len(cases)} subjects of {grid} in {out} "
        f"(training/validation/test {n_train}/{n_val}/{n_test})"
    )
    print(
        f"datalists: {out / 'datalist_ct2mri.json'} (fixed MR, moving CT), "
        f"{out / 'datalist_mri2ct.json'} (fixed CT, moving MR)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
