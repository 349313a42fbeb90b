"""detr_d2: DETR (DEtection TRansformer) as a Detectron2 plugin."""

import warnings

# Detectron2 applies the deprecated torch.jit.script at import time (a FutureWarning on every run
# since PyTorch 2.10): filtered here, before ``modeling`` imports Detectron2's model code.
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

# Importing `modeling` registers the DETR meta-architecture and backbone with Detectron2.
from . import modeling
from .checkpoint import DetrCheckpointer, convert_official_state_dict, safe_torch_load
from .compat import apply_upstream_workarounds
from .config import add_detr_config
from .layout import ClassLayout, layout_from_cfg

__all__ = [
    "ClassLayout",
    "DetrCheckpointer",
    "add_detr_config",
    "convert_official_state_dict",
    "layout_from_cfg",
    "modeling",
    "safe_torch_load",
]

# Official DETR files through Detectron2's own checkpointers (see detr_d2/compat.py).
apply_upstream_workarounds()
