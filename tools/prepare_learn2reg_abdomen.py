#!/usr/bin/env python
"""Turn a Learn2Reg 2021 AbdomenMRCT download into `f3rnet_ct_mri` datalists (both directions).

Expected layout (as unzipped from learn2reg.grand-challenge.org):

    <root>/AbdomenMRCT_dataset.json
    <root>/imagesTr/AbdomenMRCT_XXXX_0000.nii.gz    MR (T1)
    <root>/imagesTr/AbdomenMRCT_XXXX_0001.nii.gz    CT
    <root>/labelsTr/<same names>                    organ labels
    <root>/masksTr/<same names>                     body masks (optional; copied when present)

The dataset JSON is read defensively:

* pairs (`training_paired_images`, `registration_val`, `registration_test`) are dicts whose values
  are image paths; the keys may be ``fixed``/``moving`` (the Learn2Reg 2021+ style) or channel
  keys such as ``0``/``1`` or ``0000``/``0001`` (older/hand-made lists). The key is ignored: each
  path's modality comes from its channel suffix (``_0000``/``_0001``), mapped through the JSON's
  `modality` field when it names MR and CT (default: ``_0000`` MR, ``_0001`` CT). A path may be
  relative to <root> (``./imagesTr/...``) or a bare file name or case stem (found in imagesTr/).
* `labels` may be flat (``{"1": "liver", ...}``), per channel (``{"0": {"1": "liver"}, "1": {...}}``;
  each modality's label files are then mapped with their own table) or inverted
  (``{"liver": 1}``). Names are matched case-insensitively ("_"/"-" count as spaces) to
  1 liver, 2 spleen, 3 right kidney ("right kidney", "kidney right", "kidney_r", ...),
  4 left kidney; every other label becomes 0. A missing organ is an error.

Every volume is read (nibabel) and checked before anything is written: label and mask maps are brought onto
their image's grid by world coordinates (nearest neighbour); non-integer/negative labels, a label that misses its
image, a CT not in Hounsfield units and a non-singleton extra axis are errors naming the file.

Processing: reorient to RAS; optionally resample to isotropic ``--spacing`` mm (default: keep the
native grid, 2 mm for the Learn2Reg release, where 144x144x128 voxels cover 288x288x256 mm; at 1 mm
that crop would cut the organs); CT clipped to [-300, 500] HU; MR clipped at the 99th percentile
of its non-zero voxels; every volume centre-cropped/zero-padded to 144x144x128 (CT padding is
-300, the clip floor) with the affine shifted so world coordinates are unchanged. Outputs:

    <out>/mr/<case>_mr.nii.gz, <out>/ct/<case>_ct.nii.gz                  float32
    <out>/labels/<case>_mr_label.nii.gz, <out>/labels/<case>_ct_label.nii.gz  uint8, 0-4
    <out>/masks/<case>_{mr,ct}_mask.nii.gz                                uint8 (if masks exist)
    <out>/datalist_ct2mri.json    fixed MR, moving CT (Learn2Reg's own direction)
    <out>/datalist_mri2ct.json    fixed CT, moving MR

training = `training_paired_images` minus the pairs whose cases appear in `registration_val`;
validation = `registration_val`; test = `registration_test` when its images and labels are all
present locally (Learn2Reg does not release test labels), otherwise test = validation (said in the
datalist's `description`).

Usage: python tools/prepare_learn2reg_abdomen.py --root /path/to/AbdomenMRCT
                                                 [--out data/learn2reg_abdomen] [--spacing MM]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.niftiio import (  # noqa: E402
    atomic_save,
    atomic_write_text,
    check_label_values,
    crop_or_pad,
    label_onto_grid,
    prepare_out_dir,
    read_volume,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET_JSON = "AbdomenMRCT_dataset.json"
TARGET_SHAPE = (144, 144, 128)
CT_CLIP = (-300.0, 500.0)
CT_AIR_MAX = -500.0  # a CT in Hounsfield units holds air (about -1000 HU) below this
MR_PERCENTILE = 99.0
TARGET_LABELS = {1: "liver", 2: "spleen", 3: "right kidney", 4: "left kidney"}
LABEL_ALIASES = {
    1: {"liver"},
    2: {"spleen"},
    3: {"right kidney", "kidney right", "kidney r", "r kidney", "rkidney", "kidneyr", "right kidneys"},
    4: {"left kidney", "kidney left", "kidney l", "l kidney", "lkidney", "kidneyl", "left kidneys"},
}
DEFAULT_MODALITY = {0: "mr", 1: "ct"}
CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def fail(message: str) -> SystemExit:
    return SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------------------------
# dataset JSON
# ----------------------------------------------------------------------------------------------


def load_dataset_json(root: Path) -> tuple[dict, Path]:
    path = root / DATASET_JSON
    if not root.is_dir():
        raise fail(f"{root} is not a folder (expected the unzipped Learn2Reg AbdomenMRCT data set)")
    if not path.is_file():
        candidates = sorted(root.glob("*_dataset.json"))
        if len(candidates) != 1:
            raise fail(f"{path} not found: the dataset JSON must sit in the data set's root folder")
        path = candidates[0]
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise fail(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise fail(f"{path} does not hold a JSON object")
    return data, path


def normalise_name(name: str) -> str:
    return " ".join(re.sub(r"[_\-./]+", " ", str(name).lower()).split())


def organ_of(name: str) -> int:
    norm = normalise_name(name)
    for target, aliases in LABEL_ALIASES.items():
        if norm in aliases:
            return target
    return 0


def label_table(names: dict[int, str], where: str) -> np.ndarray:
    """Lookup table from source label ids to 0-4, by organ name."""
    found: dict[int, list[int]] = {}
    for source_id, name in names.items():
        target = organ_of(name)
        if target:
            found.setdefault(target, []).append(source_id)
    missing = [TARGET_LABELS[t] for t in TARGET_LABELS if t not in found]
    if missing:
        raise fail(
            f"{where} has no label named {', '.join(repr(m) for m in missing)} "
            f"(labels found: {json.dumps({str(k): v for k, v in sorted(names.items())})})"
        )
    duplicates = {TARGET_LABELS[t]: ids for t, ids in found.items() if len(ids) > 1}
    if duplicates:
        raise fail(f"{where} names an organ more than once: {duplicates}")
    lut = np.zeros(max(max(names), 0) + 1, np.uint8)
    for target, (source_id,) in found.items():
        lut[source_id] = target
    return lut


def parse_flat_labels(mapping: dict, where: str) -> dict[int, str]:
    names: dict[int, str] = {}
    for key, value in mapping.items():
        if isinstance(value, str) and str(key).strip().lstrip("-").isdigit():
            names[int(key)] = value
        elif isinstance(key, str) and isinstance(value, int) and not isinstance(value, bool):
            names[value] = key  # inverted {"liver": 1}
        else:
            raise fail(f"{where}: cannot read label entry {key!r}: {value!r}")
    if any(k < 0 for k in names):
        raise fail(f"{where}: negative label ids")
    return names


def parse_labels(data: dict, json_path: Path) -> dict[int | None, np.ndarray]:
    """{channel: lut} for per-channel label tables, or {None: lut} for one shared table."""
    labels = data.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise fail(f"{json_path} has no `labels` dictionary (label id -> organ name)")
    where = f"{json_path} `labels`"
    if all(isinstance(v, dict) for v in labels.values()):
        tables = {}
        for channel, mapping in labels.items():
            if not str(channel).isdigit():
                raise fail(f'{where}: expected channel keys like "0", "1", got {channel!r}')
            tables[int(channel)] = label_table(parse_flat_labels(mapping, where), f"{where}[{channel!r}]")
        return tables
    return {None: label_table(parse_flat_labels(labels, where), where)}


def parse_modalities(data: dict) -> dict[int, str]:
    """Channel -> "mr"/"ct" from the JSON's `modality` field, falling back to _0000 MR, _0001 CT."""
    modality = data.get("modality")
    result: dict[int, str] = {}
    if isinstance(modality, dict):
        for key, value in modality.items():
            if not str(key).isdigit():
                continue
            text = str(value).upper()
            if "CT" in text and "MR" not in text:
                result[int(key)] = "ct"
            elif "MR" in text or "T1" in text or "T2" in text:
                result[int(key)] = "mr"
    if sorted(result.values()) != ["ct", "mr"]:
        return dict(DEFAULT_MODALITY)
    return result


class Image:
    """One input volume: path, case, channel, modality."""

    def __init__(self, path: Path, case: str, channel: int, modality: str):
        self.path, self.case, self.channel, self.modality = path, case, channel, modality

    @property
    def stem(self) -> str:
        return f"{self.case}_{self.channel:04d}"


def resolve_image(root: Path, entry: str, modalities: dict[int, str], where: str) -> Image:
    if not isinstance(entry, str) or not entry.strip():
        raise fail(f"{where}: expected an image path, got {entry!r}")
    name = Path(entry.strip())
    base = name.name
    for ext in (".nii.gz", ".nii"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    match = CHANNEL_RE.match(base)
    if not match:
        raise fail(f"{where}: {entry!r} does not end in a _XXXX channel suffix (_0000 MR, _0001 CT)")
    channel = int(match["channel"])
    if channel not in modalities:
        raise fail(
            f"{where}: {entry!r} has channel {channel:04d}, which is neither MR nor CT "
            f"({', '.join(f'_{c:04d} {m.upper()}' for c, m in sorted(modalities.items()))})"
        )
    candidates = [root / name] if not name.is_absolute() else [name]
    candidates += [
        root / "imagesTr" / f"{base}.nii.gz",
        root / "imagesTr" / f"{base}.nii",
        root / "imagesTs" / f"{base}.nii.gz",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return Image(candidate, match["case"], channel, modalities[channel])
    raise fail(f"{where}: image file {candidates[0]} not found")


def parse_pairs(
    data: dict, key: str, root: Path, json_path: Path, modalities: dict[int, str], required: bool = True
) -> list[tuple[Image, Image]]:
    """(mr, ct) pairs of a JSON pair list; pair dicts may use fixed/moving or channel keys."""
    entries = data.get(key)
    if entries is None or entries == []:
        if required:
            raise fail(f"{json_path} has no `{key}` list of image pairs")
        return []
    if not isinstance(entries, list):
        raise fail(f"{json_path}: `{key}` must be a list of pairs, got {type(entries).__name__}")
    pairs = []
    for i, entry in enumerate(entries):
        where = f"{json_path} `{key}`[{i}]"
        if isinstance(entry, dict):
            values = [v for v in entry.values() if isinstance(v, str)]
        elif isinstance(entry, (list, tuple)):
            values = list(entry)
        else:
            raise fail(f"{where}: expected a dict of two image paths, got {entry!r}")
        if len(values) != 2:
            raise fail(f"{where}: expected two image paths, got {entry!r}")
        images = [resolve_image(root, v, modalities, where) for v in values]
        by_modality = {img.modality: img for img in images}
        if set(by_modality) != {"mr", "ct"}:
            raise fail(f"{where}: a pair needs one MR and one CT image, got {values}")
        pairs.append((by_modality["mr"], by_modality["ct"]))
    return pairs


def pair_name(mr: Image, ct: Image) -> str:
    return mr.case if mr.case == ct.case else f"{mr.case}_{ct.case}"


# ----------------------------------------------------------------------------------------------
# volumes
# ----------------------------------------------------------------------------------------------


def load_volume(path: Path, what: str) -> nib.Nifti1Image:
    """The volume reoriented to RAS (nibabel, `tools.niftiio.read_volume`: trailing singleton axes squeezed; a
    non-singleton extra axis, an unreadable file or NaN values are an error naming the file)."""
    data, affine = read_volume(path, what)
    return nib.as_closest_canonical(nib.Nifti1Image(data, affine))


def spacing_of(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def resample(data: np.ndarray, affine: np.ndarray, spacing: float | None, order: int):
    """Resample to isotropic `spacing` mm about the volume's centre (a no-op for None or equal spacing)."""
    if spacing is None:
        return data, affine
    current = spacing_of(affine)
    if np.allclose(current, spacing, atol=1e-3):
        return data, affine
    step = spacing / current  # new voxel i sits at old voxel (i - c_new) * step + c_old
    new_shape = tuple(int(n) for n in np.maximum(np.round(np.array(data.shape) * current / spacing), 1))
    c_old = (np.array(data.shape) - 1) / 2
    c_new = (np.array(new_shape) - 1) / 2
    offset = c_old - step * c_new
    out = ndimage.affine_transform(data, step, offset=offset, output_shape=new_shape, order=order, mode="nearest")
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] @ np.diag(step)
    new_affine[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
    return out, new_affine


def crop_or_pad_centre(data: np.ndarray, affine: np.ndarray, fill: float = 0.0):
    """Centre crop/zero-pad to TARGET_SHAPE; the affine is shifted so world coordinates are kept."""
    return crop_or_pad(data, affine, (np.array(data.shape) - np.array(TARGET_SHAPE)) // 2, TARGET_SHAPE, fill)


def load_image(img: Image) -> nib.Nifti1Image:
    """The image reoriented to RAS; a CT whose values are not Hounsfield units (no air below -500) is an error."""
    what = f"{img.modality.upper()} image"
    vol = load_volume(img.path, what)
    if img.modality == "ct":
        data = np.asanyarray(vol.dataobj)
        lowest, highest = float(data.min()), float(data.max())
        if lowest > CT_AIR_MAX:
            raise fail(
                f"{what} {img.path} has values in [{lowest:g}, {highest:g}]; expected Hounsfield units, with air "
                f"near -1000 HU (below {CT_AIR_MAX:g}): convert it to HU first (e.g. subtract 1024 from a 0-4095 range)"
            )
    return vol


def process_image(img: Image, spacing: float | None, vol: nib.Nifti1Image | None = None):
    vol = vol if vol is not None else load_image(img)
    data = np.asarray(vol.dataobj, dtype=np.float32)
    if img.modality == "ct":
        data = np.clip(data, *CT_CLIP)
        fill = CT_CLIP[0]
    else:
        # the background is the lowest value (0 for a magnitude image; shifted for a z-scored one)
        fill = float(data.min())
        above = data[data > fill]
        upper = np.percentile(above if above.size else data, MR_PERCENTILE)
        data = np.minimum(data, np.float32(upper))
    data, affine = resample(data, vol.affine, spacing, order=1)
    data, affine = crop_or_pad_centre(data, affine, fill)
    return data.astype(np.float32), affine


def load_label(path: Path, lut: np.ndarray | None, image: nib.Nifti1Image, image_path: Path, what: str):
    """Labels remapped through `lut` (ids beyond it map to 0), or a binary mask for lut=None, on the grid of their
    (RAS) `image`: resampled by world coordinates, nearest neighbour, when the shape or affine differs. Non-integer
    or negative values, and a label that does not overlap its image, are errors naming the file."""
    vol = load_volume(path, what)
    raw = check_label_values(np.asanyarray(vol.dataobj), path, what)
    if lut is None:
        data = (raw > 0).astype(np.uint8)
    else:
        ids, inverse = np.unique(raw, return_inverse=True)
        mapped = np.array([lut[i] if i < len(lut) else 0 for i in ids], np.uint8)  # ids not named in the JSON: 0
        data = mapped[inverse].reshape(raw.shape)
    return label_onto_grid(data, vol.affine, image.shape[:3], image.affine, path, image_path)


def process_label(
    path: Path,
    lut: np.ndarray | None,
    spacing: float | None,
    what: str,
    image: nib.Nifti1Image,
    image_path: Path,
):
    """`load_label`, then resampled and cropped as its image (`process_image`)."""
    data = load_label(path, lut, image, image_path, what)
    data, affine = resample(data, image.affine, spacing, order=0)
    data, affine = crop_or_pad_centre(data, affine)
    return data.astype(np.uint8), affine


def nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return img


def output_files(img: Image) -> dict[str, str]:
    m = img.modality
    return {
        "image": f"{m}/{img.case}_{m}.nii.gz",
        "label": f"labels/{img.case}_{m}_label.nii.gz",
        "mask": f"masks/{img.case}_{m}_mask.nii.gz",
    }


def check_pair_grids(mr: Image, ct: Image, spacing: float | None, affines: dict[str, np.ndarray]) -> None:
    if spacing is not None:
        return
    a, b = spacing_of(affines[mr.stem]), spacing_of(affines[ct.stem])
    if not np.allclose(a, b, atol=1e-3):
        raise fail(
            f"{mr.path} (spacing {np.round(a, 3).tolist()}) and {ct.path} (spacing {np.round(b, 3).tolist()}) "
            f"have different voxel sizes; pass --spacing to resample both"
        )


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="the unzipped AbdomenMRCT folder")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "learn2reg_abdomen", help="output folder")
    parser.add_argument(
        "--spacing",
        type=float,
        default=None,
        help="resample to this isotropic spacing in mm before the crop (default: native grid)",
    )
    args = parser.parse_args(argv)
    if args.spacing is not None and args.spacing <= 0:
        raise fail(f"--spacing must be positive, got {args.spacing}")
    root: Path = args.root
    data, json_path = load_dataset_json(root)
    modalities = parse_modalities(data)
    luts = parse_labels(data, json_path)

    paired = parse_pairs(data, "training_paired_images", root, json_path, modalities)
    validation = parse_pairs(data, "registration_val", root, json_path, modalities)
    val_cases = {c for mr, ct in validation for c in (mr.case, ct.case)}
    training = [(mr, ct) for mr, ct in paired if mr.case not in val_cases and ct.case not in val_cases]
    try:
        test = parse_pairs(data, "registration_test", root, json_path, modalities, required=False)
    except SystemExit:
        test = []  # test images not downloaded
    if test and not all(
        (root / "labelsTr" / img.path.name).is_file() or (root / "labelsTs" / img.path.name).is_file()
        for pair in test
        for img in pair
    ):
        test = []  # Learn2Reg releases no test labels: evaluation needs them
    test_is_validation = not test
    if test_is_validation:
        test = validation
    if not training:
        raise fail(f"{json_path}: no training pairs left after removing the `registration_val` cases")

    images: dict[str, Image] = {}
    for split, pairs in (("training_paired_images", training), ("registration_val", validation), ("test", test)):
        names: dict[str, tuple[Image, Image]] = {}
        for mr, ct in pairs:
            for img in (mr, ct):
                known = images.setdefault(img.stem, img)
                if known.path.resolve() != img.path.resolve():  # both would be written to one output file
                    raise fail(
                        f"{known.path} and {img.path} are both case {img.case} channel {img.channel:04d}; "
                        f"their outputs would overwrite each other ({output_files(img)['image']})"
                    )
            name = pair_name(mr, ct)
            if name in names:
                raise fail(
                    f"{json_path} `{split}` lists the pair {name} ({mr.path.name}, {ct.path.name}) more than once, "
                    f"or two pairs with one name; pair names must be unique"
                )
            names[name] = (mr, ct)

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise fail(f"output path {out} exists and is not a folder")
    has_mask, affines = {}, {}
    for stem, img in tqdm(sorted(images.items()), desc="checking volumes", unit="volume"):  # before any write
        label_dir = "labelsTs" if img.path.parent.name == "imagesTs" else "labelsTr"
        label = root / label_dir / img.path.name
        if not label.is_file():
            raise fail(f"label file {label} for {img.path} not found")
        mask_dir = "masksTs" if img.path.parent.name == "imagesTs" else "masksTr"
        has_mask[stem] = (root / mask_dir / img.path.name).is_file()
        lut = luts.get(img.channel, luts.get(None))
        if lut is None:
            raise fail(f"{json_path} `labels` has no table for channel {img.channel} ({img.path.name})")
        vol = load_image(img)
        affines[stem] = vol.affine
        load_label(label, lut, vol, img.path, "label")
        if has_mask[stem]:
            load_label(root / mask_dir / img.path.name, None, vol, img.path, "mask")
    for mr, ct in training + validation + test:
        check_pair_grids(mr, ct, args.spacing, affines)
    prepare_out_dir(out, ("mr", "ct", "labels") + (("masks",) if any(has_mask.values()) else ()))

    for stem, img in tqdm(sorted(images.items()), desc="preparing volumes", unit="volume"):
        files = output_files(img)
        label_dir = "labelsTs" if img.path.parent.name == "imagesTs" else "labelsTr"
        lut = luts.get(img.channel, luts.get(None))
        vol = load_image(img)
        image, affine = process_image(img, args.spacing, vol)
        label, _ = process_label(root / label_dir / img.path.name, lut, args.spacing, "label", vol, img.path)
        atomic_save(nifti(image, affine), out / files["image"])
        atomic_save(nifti(label, affine), out / files["label"])
        if has_mask[stem]:
            mask_dir = "masksTs" if img.path.parent.name == "imagesTs" else "masksTr"
            mask, _ = process_label(root / mask_dir / img.path.name, None, args.spacing, "mask", vol, img.path)
            atomic_save(nifti(mask, affine), out / files["mask"])

    spacing_text = f"{args.spacing:g} mm" if args.spacing else "native spacing"
    base = (
        f"Learn2Reg 2021 AbdomenMRCT (from {json_path.name}) prepared by tools/prepare_learn2reg_abdomen.py: "
        f"RAS, {spacing_text}, centre crop/pad to {'x'.join(map(str, TARGET_SHAPE))}; CT clipped to "
        f"[{CT_CLIP[0]:g}, {CT_CLIP[1]:g}] HU; MR clipped at its {MR_PERCENTILE:g}th percentile; labels "
        f"1 liver, 2 spleen, 3 right kidney, 4 left kidney (mapped by name). training = training_paired_images "
        f"minus the registration_val cases; validation = registration_val; "
        + ("test = validation (no labelled test set is given)." if test_is_validation else "test = registration_test.")
    )
    for direction, (fixed, moving) in {"ct2mri": ("mr", "ct"), "mri2ct": ("ct", "mr")}.items():
        title = "CT->MRI: fixed MR, moving CT. " if direction == "ct2mri" else "MRI->CT: fixed CT, moving MR. "
        datalist: dict = {
            "description": title + base,
            "direction": direction,
            "spatial_shape": list(TARGET_SHAPE),
            "labels": {"0": "background", **{str(k): v for k, v in TARGET_LABELS.items()}},
            "test_is_validation": test_is_validation,
        }
        for split, pairs in (("training", training), ("validation", validation), ("test", test)):
            items = []
            for mr, ct in pairs:
                by = {"mr": mr, "ct": ct}
                f, m = output_files(by[fixed]), output_files(by[moving])
                item = {
                    "fixed_image": f["image"],
                    "moving_image": m["image"],
                    "fixed_label": f["label"],
                    "moving_label": m["label"],
                    "name": pair_name(mr, ct),
                }
                if has_mask[by[fixed].stem] and has_mask[by[moving].stem]:
                    item.update({"fixed_mask": f["mask"], "moving_mask": m["mask"]})
                items.append(item)
            datalist[split] = items
        atomic_write_text(json.dumps(datalist, indent=2), out / f"datalist_{direction}.json")
    print(
        f"learn2reg abdomen: {len(images)} volumes of {TARGET_SHAPE} ({spacing_text}) in {out}; "
        f"pairs training/validation/test {len(training)}/{len(validation)}/{len(test)}"
        + (" (test = validation)" if test_is_validation else "")
    )
    print(
        f"datalists: {out / 'datalist_ct2mri.json'} (fixed MR, moving CT), "
        f"{out / 'datalist_mri2ct.json'} (fixed CT, moving MR)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
