"""The checks every dataset registration from the config shares."""

import os
from collections.abc import Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

_EXISTS = {"file": os.path.isfile, "folder": os.path.isdir}


def needs_registration(
    key: str, name: str, paths: Sequence[tuple[str, str | None, str]], identity: dict[str, str]
) -> bool:
    """Check that every ``(what, path, "file"|"folder")`` exists (``None`` paths are skipped),
    naming the config ``key`` and the path otherwise. Returns False when ``name`` is already
    registered with the same ``identity`` metadata (each launched process registers again), and
    fails when it is registered with other files."""
    for what, path, kind in paths:
        if path is not None and not _EXISTS[kind](path):
            raise FileNotFoundError(f"{key} ({name!r}): {what} not found: {path}")
    if name not in DatasetCatalog.list():
        return True
    meta = MetadataCatalog.get(name)
    if all(meta.get(k) == v for k, v in identity.items()):
        return False
    registered = ", ".join(str(meta.get(k)) for k in identity)
    raise ValueError(
        f"{key}: dataset name {name!r} is already registered with other files ({registered}); "
        "choose another name."
    )
