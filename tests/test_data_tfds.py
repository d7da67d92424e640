"""Tests of varjax/data/imagenet_tfds.py, without TensorFlow.

tfds' default `mock_data` cannot serve imagenet2012 with `SkipDecoding` without TensorFlow
(its fake generator encodes random images with tf.image.encode_jpeg), so the mock test uses
mock_data's supported hook for data sources, `as_data_source_fn`, with PIL-encoded JPEGs.
A second test builds a real, tiny imagenet2012 in ArrayRecord with tfds' own builder
machinery (which needs no TensorFlow when images are given as bytes) and reads it back
through the real `tfds.data_source`.
"""

import io
import os

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as imagenet_lib

from varjax.data import AugmentConfig, DataError, augment, make_loader, open_source, select
from varjax.data import imagenet_tfds
from varjax.data.imagenet_tfds import TfdsSource

CONFIG = AugmentConfig(resolution=32, views=2)


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (45, 60, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


# Records in a shuffled order, as tfds stores them: (file name, label, image seed).
TRAIN = [("n01443537_30.JPEG", 1, 0), ("n01440764_7.JPEG", 0, 1), ("n01443537_4.JPEG", 1, 2),
         ("n01440764_12.JPEG", 0, 3), ("n01484850_1.JPEG", 2, 4), ("n01440764_100.JPEG", 0, 5)]
VAL = [("ILSVRC2012_val_00000009.JPEG", 1, 6), ("ILSVRC2012_val_00000002.JPEG", 1, 7),
       ("ILSVRC2012_val_00000005.JPEG", 0, 8)]


def build_tiny_imagenet(data_dir: str) -> None:
    """Writes imagenet2012 (same features and version as tfds') with TRAIN and VAL records."""
    with tfds.core.registered.skip_registration():

        class TinyImagenet(imagenet_lib.Builder):
            name = "imagenet2012"
            # tfds would look up checksums beside this test module (needing the absent
            # importlib_resources package); a generated dataset has no downloads to check.
            code_path = None

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(
                        names_file=imagenet_lib.imagenet_common.label_names_file()),
                    "file_name": tfds.features.Text(),
                }))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(TRAIN),
                        "validation": self._generate_examples(VAL)}

            def _generate_examples(self, records):
                for name, label, seed in records:
                    yield name, {"image": jpeg(seed), "label": label, "file_name": name}

    TinyImagenet(data_dir=data_dir, file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    build_tiny_imagenet(data_dir)
    return data_dir


def test_real_array_record_dataset(tiny_imagenet, tmp_path, monkeypatch):
    src = open_source("imagenet2012", data_dir=tiny_imagenet, index_dir=str(tmp_path))
    assert isinstance(src, TfdsSource) and src.splits == ("train", "val")
    assert src.num_classes == 1000
    samples = select(src, classes=[0, 1], per_class=2)
    # Per class the first 2 in sorted file-name order, not in record order.
    assert [s.source for s in samples] == [
        "imagenet2012/train/n01440764_100.JPEG", "imagenet2012/train/n01440764_12.JPEG",
        "imagenet2012/train/n01443537_30.JPEG", "imagenet2012/train/n01443537_4.JPEG",
        "imagenet2012/validation/ILSVRC2012_val_00000005.JPEG",
        "imagenet2012/validation/ILSVRC2012_val_00000002.JPEG",
        "imagenet2012/validation/ILSVRC2012_val_00000009.JPEG"]
    assert [s.label for s in samples] == [0, 0, 1, 1, 0, 1, 1]
    # Pixels: PIL's decode of the original JPEG bytes.
    seeds = {name: seed for name, _, seed in TRAIN + VAL}
    batches = list(make_loader(src, samples, batch_size=4, augment_config=CONFIG, seed=0))
    images = np.concatenate([b["images"] for b in batches])
    for i, s in enumerate(samples):
        expected = augment(jpeg(seeds[s.source.split("/")[-1]]), s.sample, CONFIG, seed=0)
        np.testing.assert_array_equal(images[i], expected)
    # The index is cached: a second source reads it instead of scanning the records.
    assert os.path.exists(tmp_path / "imagenet2012" / "5.1.0" / "train-6.csv")
    monkeypatch.setattr(imagenet_tfds, "_write_index", lambda *a: pytest.fail("rescanned"))
    again = open_source("imagenet2012", data_dir=tiny_imagenet, index_dir=str(tmp_path))
    assert select(again, classes=[0, 1], per_class=2) == samples


def test_mock_data_source(tmp_path):
    calls = []

    def as_data_source(builder, split=None, decoders=None, **kwargs):
        calls.append(decoders)
        fake = {"train": [{"image": jpeg(seed), "label": label, "file_name": name.encode()}
                          for name, label, seed in TRAIN]}
        return fake if split is None else fake[split]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        src = open_source("imagenet2012", index_dir=str(tmp_path))
        samples = select(src, n_classes=None, classes=[2, 0])
    # Images must reach varjax undecoded, so that PIL (not OpenCV) decodes them.
    image_decoder = calls[0]["image"]
    assert image_decoder is tfds.decode.SkipDecoding or \
        isinstance(image_decoder, tfds.decode.SkipDecoding)
    assert src.splits == ("train",)
    assert [os.path.basename(s.source) for s in samples] == [
        "n01440764_100.JPEG", "n01440764_12.JPEG", "n01440764_7.JPEG", "n01484850_1.JPEG"]
    [batch] = make_loader(src, samples, batch_size=4, augment_config=CONFIG)
    assert batch["valid"].all() and batch["label"].tolist() == [0, 0, 0, 2]
    np.testing.assert_array_equal(batch["images"][3], augment(jpeg(4), 3, CONFIG, seed=0))


def test_unprepared_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="not prepared: nothing in .*IMAGENET_HOWTO") as err:
        open_source("imagenet2012", data_dir=str(tmp_path))
    assert "\n" not in str(err.value) and str(tmp_path / "imagenet2012") in str(err.value)
    assert list(tmp_path.iterdir()) == []  # looking leaves nothing behind


def test_unknown_name_is_one_clear_error():
    with pytest.raises(DataError, match="neither an existing folder nor a tfds dataset"):
        open_source("no_such_dataset_xyz")


def test_howto_names_the_manual_files_and_command():
    for text in ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                 "~/tensorflow_datasets/downloads/manual",
                 "tfds build imagenet2012 --file_format=array_record"]:
        assert text in imagenet_tfds.IMAGENET_HOWTO
