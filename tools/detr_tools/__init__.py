"""Shared code of the scripts in ``tools/``: command-line set-up (``cli``), developer tools (speed
benchmarks ``benchmark``, convergence experiments ``convergence``, error analysis ``errors``,
metric plots ``metrics_plots``) and the sample-data generators (``samples``). Not installed with
``detr_d2``: the scripts import it from their own folder (tests: ``pythonpath`` in setup.cfg).

Importing it first silences the FutureWarning Detectron2 triggers at import time by applying the
deprecated ``torch.jit.script`` (every run since PyTorch 2.10), so each tool imports this package
before Detectron2."""

import warnings

warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)
