"""The compact console line: last-layer terms and one sum per branch; metrics.json keeps all."""

import logging

from detectron2.utils.events import EventStorage

from detr_d2.training_log import CompactMetricPrinter, loss_branch


def test_terms_are_grouped_by_branch():
    assert loss_branch("loss_ce") == "" and loss_branch("total_loss") == ""
    assert loss_branch("loss_giou_3") == "aux"
    assert loss_branch("loss_bbox_o2m") == "o2m" and loss_branch("loss_ce_2_o2m") == "o2m"
    assert loss_branch("loss_ce_dn") == "dn" and loss_branch("loss_bbox_1_dn") == "dn"
    assert loss_branch("loss_dense_cls") == "dense"
    assert loss_branch("lr") is None and loss_branch("class_error") is None


def test_one_compact_line_with_sums_per_branch(caplog):
    terms = {
        "total_loss": 10.0,
        "loss_ce": 1.0,
        "loss_bbox": 2.0,
        "loss_ce_0": 0.5,
        "loss_bbox_0": 0.25,
        "loss_ce_o2m": 3.0,
        "loss_ce_0_o2m": 1.0,
        "loss_dense_cls": 0.125,
    }
    writer = CompactMetricPrinter(max_iter=100)
    with EventStorage(0) as storage, caplog.at_level(logging.INFO):
        for iteration in range(3):
            storage.iter = iteration
            storage.put_scalars(**terms, time=0.5, data_time=0.01, lr=1e-4)
        writer.write()
    (line,) = [r.getMessage() for r in caplog.records if "iter: 2" in r.getMessage()]
    assert "total_loss: 10" in line and "loss_ce: 1" in line and "loss_bbox: 2" in line
    assert "aux: 0.75" in line and "o2m: 4" in line and "dense: 0.125" in line
    assert "loss_ce_0" not in line and "eta: 0:00:48" in line and "lr: 0.0001" in line
    assert len(line) < 250


def test_nothing_after_the_last_iteration(caplog):
    with EventStorage(100) as storage, caplog.at_level(logging.INFO):
        storage.put_scalars(total_loss=1.0)
        CompactMetricPrinter(max_iter=100).write()
    assert not caplog.records
