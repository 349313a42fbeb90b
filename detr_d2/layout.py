"""The class layout of a DETR model: for each of its K classes, the dataset category id, the name
and whether it is a thing (instance) or stuff (panoptic background).

The model gets its layout explicitly at build time (:func:`layout_from_cfg`), so its outputs do
not depend on what ``MetadataCatalog`` happens to hold, and official checkpoints, whose class
head is indexed by COCO category id, can be remapped to the model's classes by the model itself
(:func:`official_class_rows`). Sources, in order: the ``MODEL.DETR.CLASS_*`` keys set by hand,
the registered datasets of ``DATASETS.TEST`` / ``DATASETS.TRAIN``, the official class counts
(80 / 133: Detectron2's COCO classes; 91 / 250: the official heads' own id-indexed layouts).
"""

import logging
from dataclasses import dataclass

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

__all__ = [
    "ClassLayout",
    "layout_from_cfg",
    "layout_of_metadata",
    "official_coco_layout",
    "official_class_rows",
    "set_layout_keys",
]

logger = logging.getLogger(__name__)

# Rows of the official class heads: COCO detection ids 0..90 + "no object", COCO panoptic ids
# 0..249 + "no object" (facebookresearch/detr main.py: num_classes 91, panoptic 250).
OFFICIAL_DETECTION_ROWS = 92
OFFICIAL_PANOPTIC_ROWS = 251
_OFFICIAL_LAST_THING_ID = 90  # official PostProcessPanoptic's is_thing_map: ids <= 90
_COCO_NAMES = {c["id"]: c["name"] for c in COCO_CATEGORIES}
_COCO_THING_NAMES = {c["id"]: c["name"] for c in COCO_CATEGORIES if c["isthing"]}
_KEYS = ("MODEL.DETR.CLASS_NAMES", "MODEL.DETR.CLASS_IS_THING", "MODEL.DETR.CLASS_DATASET_IDS")


@dataclass(frozen=True)
class ClassLayout:
    """Per contiguous class i (0..K-1): ``names[i]``, ``is_thing[i]`` and ``dataset_ids[i]`` (the
    dataset's category id, ``None`` when not known). ``source`` says where it came from."""

    names: tuple[str, ...]
    is_thing: tuple[bool, ...]
    dataset_ids: tuple[int, ...] | None = None
    source: str = ""

    def __post_init__(self):
        sizes = {len(self.names), len(self.is_thing)}
        if self.dataset_ids is not None:
            sizes.add(len(self.dataset_ids))
        assert len(sizes) == 1, f"class layout with parts of different lengths: {self}"

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def thing_ids(self) -> tuple[int, ...]:
        return tuple(i for i, thing in enumerate(self.is_thing) if thing)

    @property
    def all_things(self) -> bool:
        return all(self.is_thing)

    def to_dict(self) -> dict:
        """Plain lists, for checkpoints and JSON."""
        return {
            "names": list(self.names),
            "is_thing": list(self.is_thing),
            "dataset_ids": None if self.dataset_ids is None else list(self.dataset_ids),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ClassLayout":
        ids = data.get("dataset_ids")
        return cls(
            names=tuple(str(n) for n in data["names"]),
            is_thing=tuple(bool(t) for t in data["is_thing"]),
            dataset_ids=None if ids is None else tuple(int(i) for i in ids),
            source=data.get("source", ""),
        )


def generic_layout(num_classes: int) -> ClassLayout:
    """Numbered names, every class a thing: what a detection model without a dataset knows."""
    names = tuple(f"class {i}" for i in range(num_classes))
    return ClassLayout(names, (True,) * num_classes, None, "generic (no dataset, no CLASS_* keys)")


def _official_layout(num_classes: int) -> ClassLayout | None:
    """The official heads' own layouts, where logit i is COCO (panoptic) category id i."""
    if num_classes == OFFICIAL_DETECTION_ROWS - 1:
        things = [True] * num_classes
    elif num_classes == OFFICIAL_PANOPTIC_ROWS - 1:
        things = [i <= _OFFICIAL_LAST_THING_ID for i in range(num_classes)]
    else:
        return None
    names = tuple(_COCO_NAMES.get(i, "N/A") for i in range(num_classes))
    source = f"official {num_classes}-class head (logit i = COCO category id i)"
    return ClassLayout(names, tuple(things), tuple(range(num_classes)), source)


def layout_of_metadata(meta) -> ClassLayout | None:
    """The layout a dataset's metadata defines: Detectron2's standard panoptic layout (things and
    stuff in one contiguous range, names in ``stuff_classes``), or a detection dataset (all
    things). ``None`` when the metadata has no usable class ids (e.g. "separated" panoptic)."""
    things = meta.get("thing_dataset_id_to_contiguous_id") or {}
    stuff = meta.get("stuff_dataset_id_to_contiguous_id") or {}
    if not things and not stuff:
        return None
    merged = {contiguous: dataset_id for dataset_id, contiguous in things.items()}
    stuff_ids = {contiguous: dataset_id for dataset_id, contiguous in stuff.items()}
    if stuff and set(merged) & set(stuff_ids):
        return None  # "separated" panoptic layout: stuff numbered on its own
    merged.update(stuff_ids)
    if sorted(merged) != list(range(len(merged))):
        return None
    names = meta.get("stuff_classes") if stuff else meta.get("thing_classes")
    if not names or len(names) != len(merged):
        names = [f"class {i}" for i in range(len(merged))]
    thing_set = set(things.values())
    return ClassLayout(
        tuple(names),
        tuple(i in thing_set for i in range(len(merged))),
        tuple(merged[i] for i in range(len(merged))),
        f"dataset {meta.name!r}",
    )


def _dataset_layout(cfg: CfgNode, num_classes: int) -> ClassLayout | None:
    """The first dataset of ``DATASETS.TEST`` / ``TRAIN`` whose metadata has ``num_classes``
    classes (any count for 0); panoptic datasets of another layout fail with the keys to set."""
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        meta = MetadataCatalog.get(name)
        layout = layout_of_metadata(meta)
        if layout is not None and num_classes in (0, layout.num_classes):
            return layout
        separated = layout is None and meta.get("stuff_dataset_id_to_contiguous_id")
        if separated and (cfg.MODEL.MASK_ON or cfg.MODEL.DETR.TEST.PANOPTIC_ON):
            raise ValueError(
                f"Dataset {name!r} has no contiguous thing+stuff class layout (Detectron2's "
                "'*_panoptic_separated' datasets number stuff separately). Use the standard "
                "registration, e.g. 'coco_2017_val_panoptic' with MODEL.DETR.NUM_CLASSES 133, or "
                f"set the class layout by hand: {', '.join(_KEYS)}."
            )
    return None


def _builtin_coco_layout(num_classes: int) -> ClassLayout | None:
    """Detectron2's contiguous COCO (80) and COCO panoptic (133) classes, from its metadata."""
    name = {80: "coco_2017_val", 133: "coco_2017_val_panoptic"}.get(num_classes)
    layout = layout_of_metadata(MetadataCatalog.get(name)) if name else None
    if layout is None or layout.num_classes != num_classes:
        return None
    return ClassLayout(layout.names, layout.is_thing, layout.dataset_ids, f"Detectron2's {name!r}")


def official_coco_layout(num_classes: int) -> ClassLayout:
    """The COCO layout of an official class count: 80 / 133 (Detectron2's contiguous COCO and
    COCO panoptic classes) or 91 / 250 (the official heads' id-indexed ones)."""
    layout = _builtin_coco_layout(num_classes) or _official_layout(num_classes)
    if layout is None:
        raise ValueError(
            f"No official COCO class layout has {num_classes} classes (80, 91, 133, 250)."
        )
    return layout


def _hand_keys(cfg: CfgNode, num_classes: int) -> dict[str, list]:
    """The ``MODEL.DETR.CLASS_*`` keys that are set, each checked to have one entry per class."""
    detr = cfg.MODEL.DETR
    given = {
        "names": [str(n) for n in detr.CLASS_NAMES],
        "is_thing": [bool(t) for t in detr.CLASS_IS_THING],
        "dataset_ids": [int(i) for i in detr.CLASS_DATASET_IDS],
    }
    given = {k: v for k, v in given.items() if v}
    counts = {len(v) for v in given.values()}
    if num_classes:
        counts.add(num_classes)
    if len(counts) > 1:
        lengths = ", ".join(
            f"{key} has {len(given[part])}"
            for key, part in zip(_KEYS, ("names", "is_thing", "dataset_ids"))
            if part in given
        )
        raise ValueError(
            f"MODEL.DETR.NUM_CLASSES={num_classes} but {lengths} entries: give one entry per "
            "class (or leave a key empty to take it from the datasets)."
        )
    return given


def layout_from_cfg(cfg: CfgNode) -> ClassLayout:
    """The class layout of the model ``cfg`` builds (see the module docstring for the sources).

    ``MODEL.DETR.NUM_CLASSES`` 0 takes the count from the first dataset with a layout. A mask
    model (``MODEL.MASK_ON``) whose thing/stuff split is known from no source fails here,
    naming the keys to set; a detection model falls back to numbered names, all things.
    """
    num_classes = cfg.MODEL.DETR.NUM_CLASSES
    given = _hand_keys(cfg, num_classes)
    found = _dataset_layout(cfg, num_classes)
    if found is None and num_classes:
        found = _builtin_coco_layout(num_classes) or _official_layout(num_classes)  # or None
    if found is None:
        count = num_classes or (len(next(iter(given.values()))) if given else 0)
        if not count:
            raise ValueError(
                "MODEL.DETR.NUM_CLASSES 0 takes the class count from the training set, but no "
                "dataset of DATASETS.TRAIN / DATASETS.TEST is registered with categories: "
                "register it (DATASETS.REGISTER_COCO) or set NUM_CLASSES."
            )
        if cfg.MODEL.MASK_ON and "is_thing" not in given:
            raise ValueError(
                f"MODEL.MASK_ON: the thing/stuff split of the model's {count} classes is unknown "
                f"(no dataset of DATASETS.TEST {tuple(cfg.DATASETS.TEST)} / DATASETS.TRAIN "
                f"{tuple(cfg.DATASETS.TRAIN)} is registered with {count} classes). Set "
                "MODEL.DETR.CLASS_IS_THING (one True/False per class; names in "
                "MODEL.DETR.CLASS_NAMES), or register the datasets."
            )
        found = generic_layout(count)
    for part, values in given.items():
        known = getattr(found, part)
        if found.source.startswith("dataset") and known is not None and tuple(values) != known:
            key = _KEYS[("names", "is_thing", "dataset_ids").index(part)]
            raise ValueError(
                f"{key}={values} disagrees with {found.source}, which has {list(known)}: fix the "
                "key or leave it empty to take the dataset's."
            )
    if given:
        parts = {**found.to_dict(), **given}
        source = f"MODEL.DETR.CLASS_* keys ({', '.join(given)}), rest from {found.source}"
        found = ClassLayout.from_dict({**parts, "source": source})
    return found


def set_layout_keys(cfg: CfgNode, layout: ClassLayout) -> None:
    """Write ``layout`` into ``cfg`` (NUM_CLASSES and the CLASS_* keys), so that a dumped
    ``config.yaml`` builds the same model without the datasets."""
    cfg.MODEL.DETR.NUM_CLASSES = layout.num_classes
    cfg.MODEL.DETR.CLASS_NAMES = list(layout.names)
    cfg.MODEL.DETR.CLASS_IS_THING = list(layout.is_thing)
    cfg.MODEL.DETR.CLASS_DATASET_IDS = (
        [] if layout.dataset_ids is None else list(layout.dataset_ids)
    )


def official_class_rows(layout: ClassLayout, head_rows: int) -> list[int] | None:
    """The rows of an official class head of ``head_rows`` rows to take for the model's classes,
    when every class is a COCO category of that head, with COCO's name (so a custom dataset's
    category id 1 "face" is not read as COCO's 1 "person"). ``None``: no known layout fits."""
    table = {OFFICIAL_DETECTION_ROWS: _COCO_THING_NAMES, OFFICIAL_PANOPTIC_ROWS: _COCO_NAMES}.get(
        head_rows
    )
    if table is None or layout.dataset_ids is None:
        return None
    if all(table.get(i) == name for i, name in zip(layout.dataset_ids, layout.names)):
        return list(layout.dataset_ids)
    return None
