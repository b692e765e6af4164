"""NIfTI datasets in the nnU-Net v2 / Decathlon raw layout: ``dataset.json`` and the cases it implies.

Every problem raises :class:`NiftiDataError` naming the file and the key. The volumes themselves are
read in :mod:`simlab.data.nifti`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

_SUPPORTED_ENDINGS = (".nii.gz", ".nii")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class NiftiDataError(Exception):
    """A problem with a user dataset; the message always names the file (and field)."""


# ---------------------------------------------------------------------------------------------
# dataset.json
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One training case: its identifier, image file(s) and label file.

    ``images`` holds one path per channel (nnU-Net v2) or a single path (Decathlon, where a
    multi-channel image is one 4D file with the channel on its last axis).
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` declares, plus the case identifiers it implies.

    ``labels`` maps label name → integer value (region entries of nnU-Net v2 are left out);
    ``label_values`` is every declared integer value, region members included (always holds 0).
    ``entries`` is set when ``dataset.json`` lists the files itself (Decathlon ``training``,
    nnU-Net v2 ``dataset``): case id → (image paths, label path), relative to ``root`` unless
    absolute. Otherwise the cases were found by scanning ``imagesTr`` and ``labelsTr``.
    """

    root: Path
    json_path: Path
    flavour: Literal["nnunetv2", "decathlon"]
    name: str
    labels: dict[str, int]
    label_values: tuple[int, ...]
    channel_names: tuple[str, ...]
    file_ending: str
    case_ids: tuple[str, ...]
    num_training: int | None
    entries: dict[str, tuple[tuple[str, ...], str]] | None = None


def _err(path: Path | str, message: str) -> NiftiDataError:
    return NiftiDataError(f"{path}: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _indexed_names(obj: object, json_path: Path, key: str) -> tuple[str, ...]:
    """Parse {"0": name, "1": name, ...} into names ordered by index; indices must be 0..n-1."""
    if not isinstance(obj, dict) or not obj:
        raise _err(json_path, f"key '{key}' must be a non-empty object {{\"0\": name, ...}}")
    indexed: dict[int, str] = {}
    for k, v in obj.items():
        try:
            idx = int(k)
        except (TypeError, ValueError):
            raise _err(json_path, f"key '{key}': index {k!r} is not an integer") from None
        indexed[idx] = str(v)
    if sorted(indexed) != list(range(len(indexed))):
        raise _err(json_path, f"key '{key}': indices must be 0..{len(indexed) - 1}, got {sorted(indexed)}")
    return tuple(indexed[i] for i in range(len(indexed)))


def _parse_labels_v2(obj: object, json_path: Path) -> tuple[dict[str, int], set[int]]:
    if not isinstance(obj, dict) or not obj:
        raise _err(json_path, "key 'labels' must be a non-empty object {name: int}")
    labels: dict[str, int] = {}
    values: set[int] = set()
    for name, v in obj.items():
        if _is_int(v):
            labels[str(name)] = int(v)
            values.add(int(v))
        elif isinstance(v, list) and v and all(_is_int(x) for x in v):
            values.update(int(x) for x in v)
        else:
            raise _err(json_path, f"key 'labels.{name}': expected an integer (or a list of integers), got {v!r}")
    return labels, values


def _parse_labels_decathlon(obj: object, json_path: Path) -> tuple[dict[str, int], set[int]]:
    if not isinstance(obj, dict) or not obj:
        raise _err(json_path, "key 'labels' must be a non-empty object {\"0\": name}")
    labels: dict[str, int] = {}
    for k, name in obj.items():
        try:
            value = int(k)
        except (TypeError, ValueError):
            raise _err(json_path, f"key 'labels': value {k!r} is not an integer") from None
        labels[str(name)] = value
    return labels, set(labels.values())


def _require(data: dict, key: str, json_path: Path) -> object:
    if key not in data:
        raise _err(json_path, f"missing key '{key}'")
    return data[key]


def _strip_ending(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.endswith(ending) and len(name) > len(ending) else None


def _visible_files(folder: Path, ending: str) -> list[Path]:
    """Files of ``folder`` ending in ``ending``; hidden files (e.g. macOS ``._x.nii.gz``) skipped."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name.endswith(ending))


def _scan_case_ids(root: Path, ending: str) -> tuple[str, ...]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise _err(d, "folder not found")
    ids: set[str] = set()
    for p in _visible_files(images_dir, ending):
        stem = _strip_ending(p.name, ending)
        m = _CHANNEL_RE.match(stem or "")
        if m is None:
            raise _err(p, f"image file name must be <case>_XXXX{ending} (4-digit channel suffix)")
        ids.add(m.group("case"))
    for p in _visible_files(labels_dir, ending):
        stem = _strip_ending(p.name, ending)
        if stem:
            ids.add(stem)
    return tuple(sorted(ids))


def read_dataset_json(root: str | Path) -> DatasetInfo:
    """Read and validate ``ROOT/dataset.json`` (nnU-Net v2 or Decathlon flavour).

    The flavour is nnU-Net v2 when ``channel_names`` is present, Decathlon when ``modality`` is.
    Required keys: v2 — ``channel_names``, ``labels``, ``numTraining``, ``file_ending``;
    Decathlon — ``modality``, ``labels``, ``training`` (``numTraining`` checked when present).
    Labels must declare the background value 0 (the foreground rule is ``label > 0``).
    Only ``.nii.gz`` and ``.nii`` files are supported. Raises :class:`NiftiDataError`
    naming ``dataset.json`` and the key on any problem.
    """
    root = Path(root)
    json_path = root / "dataset.json"
    if not json_path.is_file():
        raise _err(json_path, "file not found (every dataset needs ROOT/dataset.json)")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _err(json_path, f"cannot parse JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise _err(json_path, "top level must be a JSON object")

    if "channel_names" in data:
        fields = _read_v2(data, root, json_path)
    elif "modality" in data:
        fields = _read_decathlon(data, json_path)
    else:
        raise _err(json_path, "missing key 'channel_names' (nnU-Net v2) or 'modality' (Decathlon)")
    values = fields.pop("values")
    if 0 not in values:
        raise _err(json_path, "key 'labels' must declare the background value 0")
    return DatasetInfo(root=root, json_path=json_path, name=str(data.get("name", root.name)),
                       label_values=tuple(sorted(values)), **fields)


def _read_v2(data: dict, root: Path, json_path: Path) -> dict:
    """The nnU-Net v2 fields of a dataset.json (cases from ``dataset`` or from the folders)."""
    channel_names = _indexed_names(data["channel_names"], json_path, "channel_names")
    labels, values = _parse_labels_v2(_require(data, "labels", json_path), json_path)
    num_training = _require(data, "numTraining", json_path)
    if not _is_int(num_training) or num_training < 0:
        raise _err(json_path, f"key 'numTraining' must be a non-negative integer, got {num_training!r}")
    file_ending = _require(data, "file_ending", json_path)
    if file_ending not in _SUPPORTED_ENDINGS:
        raise _err(json_path, f"key 'file_ending': {file_ending!r} not supported (NIfTI only: {', '.join(_SUPPORTED_ENDINGS)})")
    entries = None
    if "dataset" in data:
        ds = data["dataset"]
        if not isinstance(ds, dict):
            raise _err(json_path, "key 'dataset' must be an object {case: {images, label}}")
        entries = {}
        for cid, entry in ds.items():
            imgs = entry.get("images") if isinstance(entry, dict) else None
            lab = entry.get("label") if isinstance(entry, dict) else None
            if not isinstance(imgs, list) or not imgs or not all(isinstance(x, str) for x in imgs):
                raise _err(json_path, f"key 'dataset.{cid}.images' must be a non-empty list of paths")
            if not isinstance(lab, str):
                raise _err(json_path, f"key 'dataset.{cid}.label' must be a path")
            entries[str(cid)] = (tuple(imgs), lab)
        case_ids = tuple(sorted(entries))
    else:
        case_ids = _scan_case_ids(root, file_ending)
    return dict(flavour="nnunetv2", channel_names=channel_names, labels=labels, values=values,
                num_training=num_training, file_ending=file_ending, case_ids=case_ids, entries=entries)


def _read_decathlon(data: dict, json_path: Path) -> dict:
    """The Medical Segmentation Decathlon fields of a dataset.json (cases from ``training``)."""
    channel_names = _indexed_names(data["modality"], json_path, "modality")
    labels, values = _parse_labels_decathlon(_require(data, "labels", json_path), json_path)
    training = _require(data, "training", json_path)
    if not isinstance(training, list):
        raise _err(json_path, "key 'training' must be a list of {image, label}")
    num_training = data.get("numTraining")
    if num_training is not None and not _is_int(num_training):
        raise _err(json_path, f"key 'numTraining' must be an integer, got {num_training!r}")
    entries: dict[str, tuple[tuple[str, ...], str]] = {}
    file_ending = ""
    for i, entry in enumerate(training):
        if not isinstance(entry, dict):
            raise _err(json_path, f"key 'training[{i}]' must be an object {{image, label}}")
        for k in ("image", "label"):
            if not isinstance(entry.get(k), str):
                raise _err(json_path, f"missing key 'training[{i}].{k}'")
        img_name = Path(entry["image"]).name
        ending = next((e for e in _SUPPORTED_ENDINGS if img_name.endswith(e)), None)
        if ending is None:
            raise _err(json_path, f"key 'training[{i}].image': {entry['image']!r} is not a NIfTI file")
        file_ending = file_ending or ending
        cid = img_name[: -len(ending)]
        if cid in entries:
            raise _err(json_path, f"key 'training[{i}]': case {cid!r} listed twice")
        entries[cid] = ((entry["image"],), entry["label"])
    return dict(flavour="decathlon", channel_names=channel_names, labels=labels, values=values,
                num_training=num_training, file_ending=file_ending or ".nii.gz", case_ids=tuple(sorted(entries)),
                entries=entries)


def _resolve(root: Path, p: str) -> Path:
    q = Path(p)
    return q if q.is_absolute() else root / q


def list_cases(root: str | Path, info: DatasetInfo) -> list[Case]:
    """Resolve every case's files and check that they pair up.

    nnU-Net v2 (scanned): every case needs all channel files ``<case>_0000 .. _{C-1}`` and its
    label, every label needs its images, and no channel index beyond the declared channels.
    Listed cases (Decathlon ``training`` / v2 ``dataset``): every listed image and label file
    must exist. Finally the number of cases must equal ``numTraining`` when declared. Problems
    raise :class:`NiftiDataError` naming the file concerned (or ``dataset.json`` and the key).
    Cases come back sorted by id.
    """
    root = Path(root)
    cases: list[Case] = []
    n_channels = len(info.channel_names)
    if info.entries is not None:
        for cid in info.case_ids:
            imgs, lab = info.entries[cid]
            images = tuple(_resolve(root, p) for p in imgs)
            label = _resolve(root, lab)
            for p in images:
                if not p.is_file():
                    raise _err(p, f"image of case {cid!r} listed in {info.json_path.name} not found")
            if not label.is_file():
                raise _err(label, f"label of case {cid!r} listed in {info.json_path.name} not found")
            if info.flavour == "nnunetv2" and len(images) != n_channels:
                raise _err(info.json_path, f"key 'dataset.{cid}.images' lists {len(images)} files, 'channel_names' declares {n_channels}")
            cases.append(Case(cid, images, label))
    else:
        ending = info.file_ending
        images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
        channels: dict[str, dict[int, Path]] = {}
        for p in _visible_files(images_dir, ending):
            m = _CHANNEL_RE.match(_strip_ending(p.name, ending) or "")
            if m is None:
                raise _err(p, f"image file name must be <case>_XXXX{ending} (4-digit channel suffix)")
            ch = int(m.group("channel"))
            if ch >= n_channels:
                raise _err(p, f"channel {ch} but dataset.json 'channel_names' declares {n_channels} channel(s)")
            channels.setdefault(m.group("case"), {})[ch] = p
        label_ids = {_strip_ending(p.name, ending) for p in _visible_files(labels_dir, ending)}
        for cid in info.case_ids:
            label = labels_dir / f"{cid}{ending}"
            if cid not in channels:
                raise _err(label, f"label without image: no {images_dir / f'{cid}_0000{ending}'}")
            if cid not in label_ids:
                first = channels[cid][min(channels[cid])]
                raise _err(first, f"image without label: {label} not found")
            missing = [c for c in range(n_channels) if c not in channels[cid]]
            if missing:
                raise _err(images_dir / f"{cid}_{missing[0]:04d}{ending}", f"channel {missing[0]} of case {cid!r} not found")
            cases.append(Case(cid, tuple(channels[cid][c] for c in range(n_channels)), label))
    if info.num_training is not None and info.num_training != len(cases):
        raise _err(info.json_path, f"key 'numTraining' is {info.num_training} but {len(cases)} case(s) found")
    return cases
