"""The upstream details detr_d2 relies on (detr_d2/compat.py lists them): each test fails when
Detectron2, fvcore or PyTorch change the private behaviour a shim depends on, naming the shim."""

import argparse
import inspect

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.utils.events import EventStorage
from fvcore.common.checkpoint import Checkpointer

from detr_d2 import compat
from detr_d2.checkpoint import DetrCheckpointer
from detr_d2.engine import _DetrAMPTrainer, _NonFiniteLossCheck


def _parameters(function):
    return list(inspect.signature(function).parameters)


# ---------------------------------------------------------------- 1, 2: applied on import
def test_official_args_namespace_is_a_safe_global(tmp_path):
    """Also after our own safe loads, Detectron2's checkpointer (plain ``torch.load``) reads a
    file with the official ``args`` Namespace."""
    from detr_d2.checkpoint import safe_torch_load

    path = tmp_path / "official.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1e-4)}, path)
    assert safe_torch_load(str(path))["args"].lr == 1e-4
    assert argparse.Namespace in torch.serialization.get_safe_globals()
    assert torch.load(path)["args"].lr == 1e-4  # torch.load's default is weights_only=True


def test_checkpointer_lets_the_model_convert_first():
    """fvcore's ``_load_model(self, checkpoint)`` is wrapped once, and still drops mismatched
    shapes itself (else the wrapper would no longer be needed)."""
    assert getattr(DetectionCheckpointer._load_model, compat._MARK, False)
    assert _parameters(Checkpointer._load_model) == ["self", "checkpoint"]
    model = torch.nn.Linear(2, 3)
    seen = []
    load_own = model._load_from_state_dict

    def spy(state_dict, prefix, *args):
        seen.extend(state_dict)
        return load_own(state_dict, prefix, *args)

    model._load_from_state_dict = spy
    Checkpointer(model)._load_model(
        {"model": {"weight": torch.zeros(5, 2), "bias": torch.zeros(3)}}
    )
    assert seen == ["bias"]  # the 5-row weight was dropped before the model could remap it
    compat.apply_upstream_workarounds()  # idempotent: not wrapped twice
    assert not getattr(DetectionCheckpointer._load_model.__wrapped__, compat._MARK, False)


# ---------------------------------------------------------------- 3: lazy data-loader iterator
def test_start_data_loader_creates_the_lazy_iterator():
    model = torch.nn.Linear(1, 1)
    loader_iterated = []

    class Loader:
        def __iter__(self):
            loader_iterated.append(True)
            return iter([])

    trainer = SimpleTrainer(model, Loader(), torch.optim.SGD(model.parameters(), lr=0.1))
    assert not loader_iterated  # Detectron2 still creates the iterator lazily
    compat.start_data_loader(trainer)
    assert loader_iterated == [True] and trainer._data_loader_iter_obj is not None


# ---------------------------------------------------------------- 4: event storage outside a loop
def test_current_event_storage_inside_and_outside_a_loop():
    assert compat.current_event_storage() is None
    with EventStorage(0) as storage:
        assert compat.current_event_storage() is storage


# ---------------------------------------------------------------- 5: private bf16 probe
def test_native_bf16_probe_exists():
    assert callable(torch.ops.mkldnn._is_mkldnn_bf16_supported)  # else compat says "no bf16"
    assert isinstance(compat.cpu_has_native_bf16(), bool)


# ---------------------------------------------------------------- 6: COCOeval class hook
def test_coco_evaluator_takes_its_cocoeval_class_from_module_globals():
    assert compat.detectron2_takes_cocoeval_class()
    assert _parameters(COCOEvaluator._eval_predictions) == ["self", "predictions", "img_ids"]

    class Marker:
        pass

    clone = compat.eval_predictions_with(Marker)
    assert clone.__globals__["COCOeval"] is Marker and clone.__globals__["COCOeval_opt"] is Marker
    assert COCOEvaluator._eval_predictions.__globals__["COCOeval"] is not Marker  # untouched


# ---------------------------------------------------------------- subclass overrides
def test_default_trainer_init_is_the_one_engine_copies():
    """``DetrTrainer.__init__`` copies ``DefaultTrainer.__init__``: the attributes it sets must
    still be the ones Detectron2 sets (a new attribute upstream means updating the copy)."""
    source = inspect.getsource(DefaultTrainer.__init__)
    for attribute in (
        "self._trainer",
        "self.scheduler",
        "self.checkpointer",
        "self.start_iter",
        "self.max_iter",
        "self.cfg",
        "self.register_hooks",
    ):
        assert attribute in source, attribute
    assert _parameters(DefaultTrainer.__init__) == ["self", "cfg"]
    assert _parameters(DefaultTrainer.auto_scale_workers) == ["cfg", "num_workers"]


def test_amp_trainer_still_needs_our_run_step():
    """Detectron2's ``AMPTrainer.run_step`` asserts CUDA (so CPU bf16 needs our copy), and its
    constructor takes ``precision`` and ``grad_scaler``."""
    assert "torch.cuda.is_available()" in inspect.getsource(AMPTrainer.run_step)
    assert {"grad_scaler", "precision"} <= set(_parameters(AMPTrainer.__init__))
    assert _DetrAMPTrainer.run_step is not AMPTrainer.run_step


def test_write_metrics_signature_matches_the_override():
    upstream = _parameters(SimpleTrainer._write_metrics)
    assert upstream == ["self", "loss_dict", "data_time", "prefix", "iter"]
    assert _parameters(_NonFiniteLossCheck._write_metrics) == upstream


def test_upstream_checkpointer_methods_the_checkpointer_overrides():
    """``DetrCheckpointer`` overrides fvcore's ``save(name, **kwargs)`` and
    ``tag_last_checkpoint``, and Detectron2's ``_torch_load(f)`` (called by ``_load_file``)."""
    assert _parameters(Checkpointer.save) == ["self", "name", "kwargs"]
    assert "self.checkpointables" in inspect.getsource(Checkpointer.save)
    assert _parameters(Checkpointer.tag_last_checkpoint) == ["self", "last_filename_basename"]
    assert _parameters(DetectionCheckpointer._torch_load) == ["self", "f"]
    assert "self._torch_load(" in inspect.getsource(DetectionCheckpointer._load_file)
    for name in ("save", "_torch_load", "_load_model", "tag_last_checkpoint"):
        assert getattr(DetrCheckpointer, name) is not getattr(DetectionCheckpointer, name), name


# ---------------------------------------------------------------- entry points
def test_tools_print_no_detectron2_jit_warnings():
    """Detectron2's import-time ``torch.jit.script`` FutureWarnings are filtered by each tool."""
    import subprocess
    import sys

    from helpers import REPO

    result = subprocess.run(
        [sys.executable, "-W", "default", str(REPO / "tools" / "train_net.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch.jit.script" not in result.stderr
