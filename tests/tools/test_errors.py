"""The error breakdown (detr_tools.errors, tools/analyze_errors.py) on hand-made cases."""

import json
import logging

import pytest
from detr_tools.errors import error_breakdown

from helpers import load_tool

GT = {
    "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
    "categories": [{"id": 1, "name": "face"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [60, 60, 20, 20], "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [40, 40, 30, 30], "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 1},
    ],
}


def det(image_id, bbox, score):
    return {"image_id": image_id, "category_id": 1, "bbox": bbox, "score": score}


RESULTS = [
    det(1, [10, 10, 20, 20], 0.9),  # found
    det(1, [11, 11, 20, 20], 0.8),  # a second box on the same face: duplicate
    det(1, [60, 60, 8, 8], 0.7),  # IoU 0.16 with the second face: badly placed
    det(2, [40, 40, 30, 29], 0.6),  # found
    det(2, [0, 90, 5, 5], 0.5),  # nothing there: background
    det(1, [61, 61, 20, 20], 0.1),  # finds the second face, but below the threshold
]


def test_every_kind_of_error_is_counted():
    b = error_breakdown(GT, RESULTS, score_threshold=0.3)
    assert b.num_objects == 3  # the crowd box is not an object
    assert (b.true_positives, b.missed) == (2, 1)
    assert (b.duplicates, b.badly_placed, b.background) == (1, 1, 1)
    assert b.recall == 1.0  # the 0.1 box finds the last face
    # ranked: tp, dup, bad, tp, bg, tp -> recall 1.0 first at rank 6, precision 3/6
    assert b.precision_at_recall_90 == pytest.approx(0.5)


def test_tool_prints_a_column_per_file_and_names_bad_files(tmp_path, capsys, caplog):
    analyze_errors = load_tool("analyze_errors").main
    gt, res = tmp_path / "gt.json", tmp_path / "res.json"
    gt.write_text(json.dumps(GT))
    res.write_text(json.dumps(RESULTS))
    assert analyze_errors([str(gt), str(res), str(res)]) == 0
    table = capsys.readouterr().out
    assert "| false positives: duplicates | 1 | 1 |" in table
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([det(7, [0, 0, 5, 5], 0.9)]))
    with caplog.at_level(logging.ERROR):
        assert analyze_errors([str(gt), str(bad)]) == 1
    assert "bad.json" in caplog.text and "image id 7" in caplog.text
