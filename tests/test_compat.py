"""The upstream details detr_d2 relies on (detr_d2/compat.py lists them): each test fails when
Detectron2, fvcore or PyTorch change the private behaviour a shim depends on, naming the shim."""

import argparse
import ast
import hashlib
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, create_ddp_model
from detectron2.evaluation import COCOEvaluator, coco_evaluation
from detectron2.utils.events import EventStorage
from fvcore.common.checkpoint import Checkpointer

from detr_d2 import compat
from detr_d2.checkpoint import DetrCheckpointer
from detr_d2.engine import DetrTrainer, _DetrAMPTrainer, _DetrSimpleTrainer
from detr_d2.evaluation import BackendCOCOEvaluator

from helpers import REPO


def _parameters(function):
    return list(inspect.signature(function).parameters)


def _source_hash(function):
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def assert_upstream_unchanged(function, expected_hash, item):
    """For the overrides that do an upstream function's work their own way: any change to its
    source (a new Detectron2 or fvcore) needs a look at compat item ``item`` before the hash is
    updated."""
    actual = _source_hash(function)
    assert actual == expected_hash, (
        f"{function.__module__}.{function.__qualname__} changed upstream (source hash {actual}, "
        f"expected {expected_hash}): check detr_d2/compat.py item {item} against the new code, "
        "then update the hash here."
    )


# ------------------------------------------------- 1, 2: applied when a Detr is built
def test_import_registers_only_and_building_detr_applies_the_change():
    """``import detr_d2`` leaves Detectron2's checkpointer and torch's safe globals as they are;
    building (or unpickling) our model applies items 1 and 2."""
    code = textwrap.dedent(
        """
        import argparse, pickle, sys
        import torch
        from detectron2.checkpoint import DetectionCheckpointer
        sys.path.insert(0, "tests")
        import detr_d2
        from detr_d2 import compat
        assert not getattr(DetectionCheckpointer._load_model, compat._MARK, False)
        assert argparse.Namespace not in torch.serialization.get_safe_globals()
        from helpers import build_model_no_weights, tiny_cfg
        model = build_model_no_weights(tiny_cfg())
        assert getattr(DetectionCheckpointer._load_model, compat._MARK, False)
        assert argparse.Namespace in torch.serialization.get_safe_globals()
        DetectionCheckpointer._load_model = DetectionCheckpointer._load_model.__wrapped__
        pickle.loads(pickle.dumps(model))
        assert getattr(DetectionCheckpointer._load_model, compat._MARK, False)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------------------ 1, 2
def test_official_args_namespace_is_a_safe_global(tmp_path):
    """Also after our own safe loads, Detectron2's checkpointer (plain ``torch.load``) reads a
    file with the official ``args`` Namespace."""
    from detr_d2.checkpoint import safe_torch_load

    compat.let_detectron2_load_official_files()  # as building a Detr does
    path = tmp_path / "official.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1e-4)}, path)
    assert safe_torch_load(str(path))["args"].lr == 1e-4
    assert argparse.Namespace in torch.serialization.get_safe_globals()
    assert torch.load(path)["args"].lr == 1e-4  # torch.load's default is weights_only=True


def test_checkpointer_lets_the_model_convert_first():
    """fvcore's ``_load_model(self, checkpoint)`` is wrapped once, and still drops mismatched
    shapes itself (else the wrapper would no longer be needed)."""
    compat.let_detectron2_load_official_files()  # as building a Detr does
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
    compat.let_detectron2_load_official_files()  # idempotent: not wrapped twice
    assert not getattr(DetectionCheckpointer._load_model.__wrapped__, compat._MARK, False)


def test_let_model_convert_uses_the_models_conversion():
    class Converting(torch.nn.Linear):
        def convert_checkpoint_state_dict(self, state_dict):
            return {"converted." + k: v for k, v in state_dict.items()}

    checkpoint = {"model": {"w": torch.zeros(1)}}
    compat.let_model_convert(Checkpointer(Converting(1, 1)), checkpoint)
    assert list(checkpoint["model"]) == ["converted.w"]
    compat.let_model_convert(Checkpointer(torch.nn.Linear(1, 1)), checkpoint)  # no conversion
    assert list(checkpoint["model"]) == ["converted.w"]


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
    from detectron2.utils.events import has_event_storage

    assert callable(has_event_storage)  # public since Detectron2 0.6: no private stack read
    assert compat.current_event_storage() is None
    with EventStorage(0) as storage:
        assert compat.current_event_storage() is storage


# ---------------------------------------------------------------- 5: private bf16 probe
def test_native_bf16_probe_exists():
    assert callable(torch.ops.mkldnn._is_mkldnn_bf16_supported)  # else compat says "no bf16"
    assert isinstance(compat.cpu_has_native_bf16(), bool)
    assert callable(torch.cpu._is_amx_tile_supported)  # else compat says "no AMX"
    assert isinstance(compat.cpu_has_amx(), bool)
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    assert "cpu" in _get_fused_kernels_supported_devices()  # else CPU runs the looped update
    assert "cpu" in compat.fused_optimizer_device_types()


# ---------------------------------------------------------------- 6: COCOeval class argument
def test_coco_evaluator_parts_our_eval_predictions_uses():
    """``BackendCOCOEvaluator._eval_predictions`` does the steps of Detectron2's method with the
    COCOeval class passed as ``cocoeval_fn``: the function and attributes it uses exist, and the
    method it overrides is unchanged (else its new steps need a look)."""
    assert compat.detectron2_takes_cocoeval_fn()
    assert _parameters(coco_evaluation._evaluate_predictions_on_coco) == [
        "coco_gt",
        "coco_results",
        "iou_type",
        "kpt_oks_sigmas",
        "cocoeval_fn",
        "img_ids",
        "max_dets_per_image",
    ]
    assert _parameters(COCOEvaluator._eval_predictions) == ["self", "predictions", "img_ids"]
    assert _parameters(COCOEvaluator._derive_coco_results) == [
        "self",
        "coco_eval",
        "iou_type",
        "class_names",
    ]
    assert BackendCOCOEvaluator._eval_predictions is not COCOEvaluator._eval_predictions
    assert _parameters(COCOEvaluator._tasks_from_predictions) == ["self", "predictions"]
    assert_upstream_unchanged(COCOEvaluator._eval_predictions, "af889c28df2ab0c9", 6)
    init = inspect.getsource(COCOEvaluator.__init__)
    for name in ("_coco_api", "_metadata", "_output_dir", "_do_evaluation", "_tasks"):
        assert f"self.{name} =" in init, f"COCOEvaluator no longer sets {name} (compat item 6)"
    assert "self._max_dets_per_image =" in init, "compat item 6"


# ---------------------------------------------------------------- 7: DefaultTrainer's attributes
def _attributes_set_in(function) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }


def test_detr_trainer_sets_what_default_trainer_init_sets():
    """``DetrTrainer.__init__`` replaces ``DefaultTrainer.__init__`` (which it does not call):
    it must set every attribute upstream's sets, since ``DefaultTrainer``'s other methods
    (``run_step``, ``state_dict``, ``resume_or_load``, ``build_hooks``) read them."""
    upstream = _attributes_set_in(DefaultTrainer.__init__)
    assert upstream == {"_trainer", "scheduler", "checkpointer", "start_iter", "max_iter", "cfg"}, (
        f"DefaultTrainer.__init__ now sets {sorted(upstream)}: check compat item 7"
    )
    assert upstream <= _attributes_set_in(DetrTrainer.__init__)
    assert _parameters(DefaultTrainer.__init__) == ["self", "cfg"]
    source = inspect.getsource(DetrTrainer.__init__)
    assert "super().__init__(" not in source and "DefaultTrainer.__init__(self" not in source
    # the public parts it builds with, in upstream's order
    for name in ("build_model", "build_optimizer", "build_train_loader", "build_lr_scheduler"):
        assert _parameters(getattr(DefaultTrainer, name))[0] == "cfg", name
    # create_ddp_model passes our device_ids (None for a CPU model) on instead of the local rank
    assert '"device_ids" not in kwargs' in inspect.getsource(create_ddp_model), "compat item 7"


# ---------------------------------------------------------------- 8: AMPTrainer.run_step
def test_amp_trainer_still_asserts_cuda():
    """Detectron2's ``AMPTrainer.run_step`` asserts CUDA (so CPU bf16 needs our own step
    trainer), and keeps its scaler's state under "grad_scaler" (as ours does)."""
    assert "torch.cuda.is_available()" in inspect.getsource(AMPTrainer.run_step), (
        "AMPTrainer.run_step no longer asserts CUDA: compat item 8 may use it"
    )
    assert 'ret["grad_scaler"]' in inspect.getsource(AMPTrainer.state_dict), "compat item 8"
    assert issubclass(_DetrAMPTrainer, SimpleTrainer)
    assert not issubclass(_DetrAMPTrainer, AMPTrainer)


# ---------------------------------------------------------------- 9: _write_metrics
def test_write_metrics_is_called_before_the_optimizer_step():
    upstream = _parameters(SimpleTrainer._write_metrics)
    assert upstream == ["self", "loss_dict", "data_time", "prefix", "iter"]
    assert _parameters(compat.NonFiniteLossCheck._write_metrics) == upstream
    for run_step, step in (
        (SimpleTrainer.run_step, "self.optimizer.step()"),
        (_DetrAMPTrainer.run_step, "self.grad_scaler.step(self.optimizer)"),
    ):
        source = inspect.getsource(run_step)
        assert 0 < source.index("_write_metrics(loss_dict, data_time)") < source.index(step)
    assert issubclass(_DetrSimpleTrainer, compat.NonFiniteLossCheck)
    assert issubclass(_DetrAMPTrainer, compat.NonFiniteLossCheck)


# ---------------------------------------------------------------- 10: atomic checkpoint writes
def test_fvcore_checkpointer_writes_through_its_path_manager(tmp_path):
    """``save`` and ``tag_last_checkpoint`` open their files with ``self.path_manager`` (so
    ``AtomicWrites`` makes them atomic), and ``save`` merges its kwargs last."""
    assert 'self.path_manager.open(save_file, "wb")' in inspect.getsource(Checkpointer.save)
    assert 'self.path_manager.open(save_file, "w")' in inspect.getsource(
        Checkpointer.tag_last_checkpoint
    )
    assert_upstream_unchanged(Checkpointer.save, "1ae94732e8613f3a", 10)
    opened = []

    class Recording:
        def open(self, path, mode="r", **kwargs):
            opened.append((os.path.basename(path), mode))
            return open(path, mode, **kwargs)

    checkpointer = Checkpointer(torch.nn.Linear(1, 1), str(tmp_path))
    checkpointer.path_manager = Recording()
    checkpointer.save("first", model={"replaced": torch.ones(1)}, extra=1)
    assert opened == [("first.pth", "wb"), ("last_checkpoint", "w")]
    saved = torch.load(tmp_path / "first.pth", weights_only=True)
    assert list(saved) == ["model", "extra"] and list(saved["model"]) == ["replaced"]


def test_atomic_open_keeps_the_previous_file_when_interrupted(tmp_path):
    path = str(tmp_path / "file.bin")
    with compat.atomic_open(path) as f:
        f.write(b"good")
    with pytest.raises(KeyboardInterrupt), compat.atomic_open(path) as f:
        f.write(b"half")
        raise KeyboardInterrupt
    assert open(path, "rb").read() == b"good" and os.listdir(tmp_path) == ["file.bin"]


def test_atomic_writes_path_manager_delegates_everything_else(tmp_path):
    checkpointer = DetrCheckpointer(torch.nn.Linear(1, 1), str(tmp_path))
    manager = checkpointer.path_manager
    assert isinstance(manager, compat.AtomicWrites)
    with manager.open(str(tmp_path / "text"), "w") as f:
        f.write("written")
    assert manager.exists(str(tmp_path / "text")) and manager.ls(str(tmp_path)) == ["text"]
    with manager.open(str(tmp_path / "text")) as f:
        assert f.read() == "written"
    checkpointer.save("model_0000001")
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000001.pth")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth", "text"]


# ---------------------------------------------------------------- 11: checkpointer overrides
def test_upstream_checkpointer_methods_the_checkpointer_overrides():
    """``DetrCheckpointer`` overrides fvcore's ``save(name, **kwargs)`` (calling it) and
    ``_load_model(checkpoint)``, and Detectron2's ``_torch_load(f)`` (called by
    ``_load_file``); ``tag_last_checkpoint`` is fvcore's own (atomic through item 10)."""
    assert _parameters(Checkpointer.save) == ["self", "name", "kwargs"]
    assert _parameters(Checkpointer.tag_last_checkpoint) == ["self", "last_filename_basename"]
    assert _parameters(DetectionCheckpointer._torch_load) == ["self", "f"]
    assert "self._torch_load(" in inspect.getsource(DetectionCheckpointer._load_file)
    for name in ("save", "_torch_load", "_load_model"):
        assert getattr(DetrCheckpointer, name) is not getattr(DetectionCheckpointer, name), name
    assert DetrCheckpointer.tag_last_checkpoint is Checkpointer.tag_last_checkpoint


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
