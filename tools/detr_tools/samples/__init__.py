"""Synthetic sample datasets (faces; panoptic scenes of faces and balls) that the tools, the demo
configs and the tests generate offline, with their shared drawing and regeneration bookkeeping."""

from .faces import generate_face_dataset
from .panoptic import generate_panoptic_dataset

__all__ = ["generate_face_dataset", "generate_panoptic_dataset"]
