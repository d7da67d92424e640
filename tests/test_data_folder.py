"""Tests of varjax/data/folder.py and open_source on temporary ImageFolder trees."""

import os

import pytest

from varjax.data import DataError, imagenet_wnids, open_source
from varjax.data.folder import FolderSource

WNIDS = imagenet_wnids()


def touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_wnid_list_is_the_standard_order():
    assert len(WNIDS) == 1000 and list(WNIDS) == sorted(WNIDS)
    assert WNIDS[0] == "n01440764" and WNIDS[1] == "n01443537" and WNIDS[999] == "n15075141"


def test_synset_tree_with_splits(tmp_path):
    for split, wnid, name in [("train", WNIDS[0], "a.JPEG"), ("train", WNIDS[394], "b.JPEG"),
                              ("val", WNIDS[394], "c.JPEG")]:
        touch(tmp_path / split / wnid / name)
    src = open_source(str(tmp_path))
    assert isinstance(src, FolderSource) and src.splits == ("train", "val")
    assert src.labels("train") == [0, 394] and src.labels("val") == [394]
    assert src.num_classes == 1000
    [ref] = src.images("val", 394)
    assert ref.source == str(tmp_path / "val" / WNIDS[394] / "c.JPEG")
    assert src.reader()(ref.locator) == b"x"


def test_integer_class_folders_and_flat_layout(tmp_path):
    touch(tmp_path / "7" / "x.png")
    touch(tmp_path / "12" / "y.png")
    src = open_source(str(tmp_path), flat_split="val")
    assert src.splits == ("val",)
    assert src.labels("val") == [7, 12]  # by value, not by the string order "12" < "7"
    with pytest.raises(DataError, match="no 'train' split"):
        src.images("train", 7)


def test_validation_folder_name_is_accepted(tmp_path):
    touch(tmp_path / "validation" / "3" / "x.png")
    assert open_source(str(tmp_path)).splits == ("val",)


def test_file_order_is_torchvision_walk_order_and_non_images_are_recorded(tmp_path):
    class_dir = tmp_path / "train" / WNIDS[5]
    for name in ["b.JPEG", "a.jpg", "c.PNG", "A.jpeg", "sub/d.jpg", "notes.txt"]:
        touch(class_dir / name)
    src = FolderSource(str(tmp_path))
    names = [os.path.relpath(r.source, class_dir) for r in src.images("train", 5)]
    assert names == ["A.jpeg", "a.jpg", "b.JPEG", "c.PNG", os.path.join("sub", "d.jpg")]
    assert src.ignored == [(str(class_dir / "notes.txt"), "not an image file extension")]


@pytest.mark.parametrize("layout, message", [
    ({"train/cats/a.jpg"}, "neither by an ImageNet synset id"),
    ({"train/n99999999/a.jpg"}, "not one of the 1000"),
    ({"train/n01440764/a.jpg", "train/5/b.jpg"}, "mixes"),
    ({"train/7/a.jpg", "train/007/b.jpg"}, "both mean class 7"),
    ({"train/readme.txt"}, "no class folders"),
])
def test_bad_layouts_raise_one_line_errors(tmp_path, layout, message):
    for rel in layout:
        touch(tmp_path / rel)
    with pytest.raises(DataError, match=message) as err:
        open_source(str(tmp_path))
    assert "\n" not in str(err.value)


def test_missing_or_wrong_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="does not exist"):
        open_source("./surely/not/here")
    touch(tmp_path / "file.jpg")
    with pytest.raises(DataError, match="is not a folder"):
        open_source(str(tmp_path / "file.jpg"))
