"""Image files that are missing, unreadable or truncated get errors naming the file and image
id; grayscale, RGBA, CMYK and EXIF-rotated files load as upright RGB."""

import numpy as np
import pytest
from PIL import Image

from detr_d2.data import DetrDatasetMapper
from detr_d2.data.augmentation import DetrResizeShortestEdge


def mapper():
    return DetrDatasetMapper(
        is_train=False, augmentations=[DetrResizeShortestEdge([40], 100)], image_format="RGB"
    )


def record(path, height=None, width=None):
    return {"file_name": str(path), "image_id": 42, "height": height, "width": width}


def test_missing_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image id 42: .*nowhere.png"):
        mapper()(record(tmp_path / "nowhere.png"))


def test_not_an_image_named(tmp_path):
    path = tmp_path / "text.jpg"
    path.write_text("this is not a jpeg")
    with pytest.raises(OSError, match=r"image id 42: cannot read .*text.jpg"):
        mapper()(record(path))


def test_truncated_file_named(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        path, quality=95
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"image id 42: cannot read .*cut.jpg.*truncated"):
        mapper()(record(path))


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_other_modes_load_as_rgb(tmp_path, mode):
    path = tmp_path / ("img.jpg" if mode == "CMYK" else "img.png")
    Image.new("RGB", (30, 20), (200, 40, 10)).convert(mode).save(path)
    out = mapper()(record(path, 20, 30))
    assert out["image"].shape == (3, 40, 60)


def test_exif_rotation_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    image = Image.new("RGB", (30, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 15, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(path, exif=exif, quality=100)
    out = mapper()(record(path, 30, 20))  # the annotation stores the upright size
    assert out["image"].shape == (3, 60, 40)
    top, bottom = out["image"][:, :20].float().mean(), out["image"][:, 40:].float().mean()
    assert top > 200 and bottom < 50  # the white half is on top once upright
