"""Calibration data loading: formats, batching, re-streaming and one-line validation errors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.calibration.data import Batch, calibration_source
from onnxcomp.errors import CalibrationError


def image_model(dims: list[int | str | None] | None = None, elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x[N,1,4,4] -> Identity -> y; an initializer 'w' is also listed as a graph input."""
    dims = ["N", 1, 4, 4] if dims is None else dims
    x = helper.make_tensor_value_info("x", elem, dims)
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "image",
        [x, w],
        [helper.make_tensor_value_info("y", elem, dims)],
        [numpy_helper.from_array(np.ones(1, np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def two_input_model() -> onnx.ModelProto:
    """a[N,3] float32, b[N,2] int64 -> Concat(a, Cast(b)) -> y[N,5]."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
            helper.make_node("Concat", ["a", "bf"], ["y"], axis=1),
        ],
        "two",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["N", 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def images(n: int, seed: int = 0, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 4, 4)).astype(dtype)


def pairs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((n, 3)).astype(np.float32), "b": rng.integers(0, 9, (n, 2)).astype(np.int64)}


def sizes(factory: object) -> list[int]:
    return [len(b["x"] if "x" in b else b["a"]) for b in factory()]  # type: ignore[operator]


def errors(data: object, model: onnx.ModelProto | None = None, **kwargs: int) -> str:
    with pytest.raises(CalibrationError) as info:
        factory, _ = calibration_source(data, model or image_model(), **kwargs)  # type: ignore[arg-type]
        list(factory())
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- happy paths -------------------------------------------------------------------------------


def test_demo_files() -> None:
    model = onnx.load(str(MODELS / "digits_cnn.onnx"))
    factory, name = calibration_source(MODELS / "digits_calib.npz", model)
    batches = list(factory())
    assert name == "digits_calib.npz (128 samples)"
    assert [b["input"].shape for b in batches] == [(16, 1, 16, 16)] * 8
    assert all(b["input"].dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(
        np.concatenate([b["input"] for b in batches]), np.load(MODELS / "digits_calib.npz")["input"]
    )


def test_npz_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", x=images(40))
    factory, name = calibration_source(str(tmp_path / "c.npz"), image_model())
    assert name == "c.npz (40 samples)"
    assert sizes(factory) == [16, 16, 8]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in factory()]), images(40))


def test_directory_of_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "b.npz", x=images(10, seed=2))
    np.savez(tmp_path / "a.npz", x=images(20, seed=1))
    (tmp_path / "README.txt").write_text("ignored")
    factory, name = calibration_source(tmp_path, image_model())
    assert name == f"{tmp_path.name}/ (2 files, 30 samples)"
    assert sizes(factory) == [16, 4, 10]  # re-sliced per file, in sorted name order
    got = np.concatenate([b["x"] for b in factory()])
    np.testing.assert_array_equal(got, np.concatenate([images(20, seed=1), images(10, seed=2)]))


def test_directory_of_npy(tmp_path: Path) -> None:
    np.save(tmp_path / "part1.npy", images(5, seed=1))
    np.save(tmp_path / "part0.npy", images(18, seed=0))
    factory, name = calibration_source(tmp_path, image_model(), batch_size=8)
    assert name == f"{tmp_path.name}/ (2 files, 23 samples)"
    assert sizes(factory) == [8, 8, 2, 5]
    batches = list(factory())
    assert all(type(b["x"]) is np.ndarray for b in batches)  # copies, not memmaps
    np.testing.assert_array_equal(batches[0]["x"], images(18)[:8])


def test_single_npy_file(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", images(3))
    factory, name = calibration_source(tmp_path / "x.npy", image_model())
    assert name == "x.npy (3 samples)" and sizes(factory) == [3]


def test_list_of_dicts_yielded_as_given_but_capped() -> None:
    data = [{"x": images(5)}, {"x": images(20, seed=1)}]
    factory, name = calibration_source(data, image_model())
    assert name == "in-memory batches (25 samples)"
    assert sizes(factory) == [5, 16, 4]


def test_dict_of_arrays_and_bare_array() -> None:
    factory, name = calibration_source({"x": images(33)}, image_model())
    assert name == "in-memory arrays (33 samples)" and sizes(factory) == [16, 16, 1]
    factory, name = calibration_source(images(3), image_model())
    assert name == "in-memory array (3 samples)" and sizes(factory) == [3]


def test_callable_is_called_per_pass() -> None:
    calls = []

    def make() -> Iterator[Batch]:
        calls.append(1)
        yield {"x": images(4)}
        yield {"x": images(4, seed=1)}

    factory, name = calibration_source(make, image_model())
    assert name == "batches from test_callable_is_called_per_pass.<locals>.make() (8 samples)"
    assert sizes(factory) == [4, 4] and sizes(factory) == [4, 4]
    assert len(calls) == 3  # validation + two passes


def test_max_samples_and_batch_size(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=images(20))
    np.savez(tmp_path / "b.npz", x=images(20, seed=1))
    factory, name = calibration_source(tmp_path, image_model(), batch_size=16, max_samples=30)
    assert sizes(factory) == [16, 4, 10] and name.endswith("(2 files, first 30 samples)")
    factory, _ = calibration_source(tmp_path, image_model(), batch_size=7, max_samples=20)
    assert sizes(factory) == [7, 7, 6]
    factory, name = calibration_source(tmp_path, image_model(), max_samples=1000)
    assert sum(sizes(factory)) == 40 and name.endswith("(2 files, 40 samples)")
    factory, _ = calibration_source(tmp_path, image_model(), batch_size=1, max_samples=3)
    assert sizes(factory) == [1, 1, 1]


def test_factory_streams_twice_identically(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", x=images(37))
    for data in (tmp_path / "c.npz", tmp_path, {"x": images(37)}, [{"x": images(37)}]):
        factory, _ = calibration_source(data, image_model(), batch_size=10)
        first, second = list(factory()), list(factory())
        assert len(first) == len(second) == 4
        for b1, b2 in zip(first, second):
            np.testing.assert_array_equal(b1["x"], b2["x"])


def test_batches_are_copies() -> None:
    arr = images(4)
    factory, _ = calibration_source({"x": arr}, image_model())
    next(factory())["x"][:] = 0
    np.testing.assert_array_equal(arr, images(4))


def test_one_shot_generator_single_pass_then_error() -> None:
    gen = ({"x": images(6, seed=i)} for i in range(3))
    factory, name = calibration_source(gen, image_model(), batch_size=4)
    assert name == "one-shot iterator of batches (single pass)"
    assert sizes(factory) == [4, 2, 4, 2, 4, 2]
    with pytest.raises(
        CalibrationError,
        match=re.escape(
            "calibration data is a one-shot iterator and was already consumed; "
            "pass a list or a callable returning a fresh iterator"
        ),
    ):
        factory()


def test_one_shot_generator_checks_first_batch_eagerly_and_later_ones_when_streamed() -> None:
    assert "no array for model input 'x' in batch 0" in errors(iter([{"y": images(2)}]))
    bad = images(3)
    bad[2, 0, 1, 1] = np.nan
    factory, _ = calibration_source(iter([{"x": images(3)}, {"x": bad}]), image_model())
    with pytest.raises(CalibrationError, match=r"input 'x' has NaN/Inf in sample 2 of batch 1$"):
        list(factory())
    assert errors(iter([])) == "calibration data is empty: one-shot iterator of batches yielded nothing"


def test_dtype_conversion() -> None:
    factory, _ = calibration_source({"x": images(3, dtype=np.float64)}, image_model())
    (batch,) = factory()
    assert batch["x"].dtype == np.float32
    np.testing.assert_array_equal(batch["x"], images(3, dtype=np.float64).astype(np.float32))
    factory, _ = calibration_source({"x": images(3, dtype=np.float16)}, image_model())
    assert next(factory())["x"].dtype == np.float32
    big = images(3, dtype=np.float64)
    big[1, 0, 0, 0] = 1e300
    assert (
        errors({"x": big})
        == "calibration data for input 'x' has values outside the float32 range in sample 1 of in-memory arrays"
    )
    msg = errors({"x": np.ones((3, 1, 4, 4), np.int32)})
    assert msg.startswith("input 'x': data in in-memory arrays has dtype int32 but the model expects float32")


def test_multi_input_model(tmp_path: Path) -> None:
    model = two_input_model()
    np.savez(tmp_path / "p.npz", **pairs(20))
    factory, name = calibration_source(tmp_path / "p.npz", model)
    assert name == "p.npz (20 samples)" and sizes(factory) == [16, 4]
    batch = next(factory())
    assert batch["a"].dtype == np.float32 and batch["b"].dtype == np.int64
    data = pairs(5)
    data["b"] = data["b"].astype(np.int32)  # safely widened to int64
    factory, _ = calibration_source([data], model)
    assert next(factory())["b"].dtype == np.int64
    assert errors({"a": pairs(5)["a"], "b": pairs(5)["b"].astype(np.float32)}, model).startswith(
        "input 'b': data in in-memory arrays has dtype float32 but the model expects int64"
    )
    assert (
        errors({"a": pairs(5)["a"]}, model)
        == "calibration data has no array for model input 'b' in in-memory arrays; arrays found: a"
    )
    assert (
        errors({"a": pairs(5)["a"], "b": pairs(4)["b"]}, model)
        == "calibration data in in-memory arrays has different sample counts per input: 'a' has 5, 'b' has 4"
    )
    assert (
        errors({"a": pairs(5)["a"][:, :2], "b": pairs(5)["b"]}, model)
        == "input 'a': sample shape (2,) does not match the model's (3,) at axis 1 in in-memory arrays"
    )
    np.save(tmp_path / "a.npy", pairs(5)["a"])
    assert ".npy files are only accepted for single-input models" in errors(tmp_path / "a.npy", model)
    assert ".npy files are only accepted for single-input models" in errors(tmp_path, model)
    assert "a bare array can only calibrate a single-input model" in errors(pairs(5)["a"], model)


def test_symbolic_and_unknown_dims_accept_any_size() -> None:
    factory, _ = calibration_source({"x": np.ones((2, 5, 7), np.float32)}, image_model(["N", "C", None]))
    assert sizes(factory) == [2]
    unranked = image_model()
    unranked.graph.input[0].type.tensor_type.ClearField("shape")
    factory, _ = calibration_source({"x": np.ones((2, 3), np.float32)}, unranked)
    assert sizes(factory) == [2]


def test_fixed_batch_dimension() -> None:
    factory, _ = calibration_source({"x": images(3)}, image_model([1, 1, 4, 4]), batch_size=16)
    assert sizes(factory) == [1, 1, 1]
    factory, _ = calibration_source({"x": images(8)}, image_model([4, 1, 4, 4]), max_samples=7)
    assert sizes(factory) == [4]
    assert errors({"x": images(10)}, image_model([4, 1, 4, 4])) == (
        "the model's inputs have a fixed batch size of 4 but in-memory arrays holds 10 samples, not a multiple of 4"
    )


# ---- errors ------------------------------------------------------------------------------------


def test_missing_and_extra_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", image=images(3), label=np.arange(3))
    assert (
        errors(tmp_path / "c.npz")
        == "calibration data has no array for model input 'x' in c.npz; arrays found: image, label"
    )
    np.savez(tmp_path / "d.npz", x=images(3), label=np.arange(3))
    assert (
        errors(tmp_path / "d.npz")
        == "calibration data in d.npz has arrays that are not model inputs: label; expected exactly: x"
    )


def test_rank_and_shape_mismatch() -> None:
    assert (
        errors({"x": np.ones((3, 4, 4), np.float32)})
        == "input 'x': data in in-memory arrays has rank 3 (shape (3, 4, 4)) but the model expects rank 4 (N, 1, 4, 4)"
    )
    assert (
        errors({"x": np.float32(1.0)})
        == "input 'x': data in in-memory arrays is a scalar; its first axis must index samples"
    )
    model = onnx.load(str(MODELS / "digits_cnn.onnx"))
    assert (
        errors({"input": np.zeros((128, 1, 8, 8), np.float32)}, model)
        == "input 'input': sample shape (1, 8, 8) does not match the model's (1, 16, 16) at axis 2 in in-memory arrays"
    )


def test_nan_and_inf_name_input_sample_and_file(tmp_path: Path) -> None:
    data = np.load(MODELS / "digits_calib.npz")["input"].copy()
    data[17, 0, 3, 3] = np.nan
    data[40, 0, 0, 0] = np.inf
    np.savez(tmp_path / "digits_calib.npz", input=data)
    model = onnx.load(str(MODELS / "digits_cnn.onnx"))
    assert (
        errors(tmp_path / "digits_calib.npz", model)
        == "calibration data for input 'input' has NaN/Inf in sample 17 of digits_calib.npz"
    )
    assert (
        errors([{"x": images(2)}, {"x": np.where(np.arange(3)[:, None, None, None] == 1, np.inf, images(3))}])
        == "calibration data for input 'x' has NaN/Inf in sample 1 of batch 1"
    )
    np.save(tmp_path / "x.npy", np.where(np.arange(30)[:, None, None, None] == 25, np.nan, images(30)))
    assert errors(tmp_path / "x.npy") == "calibration data for input 'x' has NaN/Inf in sample 25 of x.npy"


def test_error_is_raised_at_construction_before_any_pass() -> None:
    bad = images(40)
    bad[39, 0, 0, 0] = np.nan
    with pytest.raises(CalibrationError, match="sample 39 of in-memory arrays"):
        calibration_source({"x": bad}, image_model())


def test_empty_data(tmp_path: Path) -> None:
    np.savez(tmp_path / "e.npz", x=np.zeros((0, 1, 4, 4), np.float32))
    assert errors(tmp_path / "e.npz") == "calibration data is empty: e.npz has no samples"
    assert errors([]) == "calibration data is empty: in-memory batches has no samples"
    (tmp_path / "empty").mkdir()
    assert (
        errors(tmp_path / "empty")
        == f"calibration data is empty: directory {tmp_path / 'empty'} has no .npz or .npy files"
    )


def test_missing_unreadable_and_unsupported_paths(tmp_path: Path) -> None:
    assert errors(tmp_path / "nope.npz") == f"{tmp_path / 'nope.npz'}: no such file or directory"
    (tmp_path / "bad.npz").write_bytes(b"this is not a zip archive")
    assert errors(tmp_path / "bad.npz").startswith("bad.npz: cannot read as .npz: ")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    assert errors(tmp_path / "bad.npy").startswith("bad.npy: cannot read as .npy: ")
    np.save(tmp_path / "single.npy", images(2))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    assert errors(tmp_path / "single.npz") == "single.npz: not an .npz archive (it holds a single array; name it .npy)"
    np.savez(tmp_path / "arch.npz", x=images(2))
    (tmp_path / "arch.npz").rename(tmp_path / "arch.npy")
    assert errors(tmp_path / "arch.npy") == "arch.npy: not an .npy array file (it is an .npz archive; name it .npz)"
    (tmp_path / "data.csv").write_text("1,2")
    assert "unsupported calibration file" in errors(tmp_path / "data.csv")
    np.savez(tmp_path / "obj.npz", x=np.array([object()] * 2, dtype=object))
    assert errors(tmp_path / "obj.npz").startswith("obj.npz: cannot read as .npz: ")


def test_bad_arguments_and_items() -> None:
    assert errors({"x": images(2)}, batch_size=0) == "calibration batch size must be a positive integer, got 0"
    assert (
        errors({"x": images(2)}, max_samples=0) == "the number of calibration samples must be a positive integer, got 0"
    )
    assert errors([images(2)]) == "calibration batch 0 is not a dict of {input name: array} (got ndarray)"
    assert errors(42).startswith("unsupported calibration data of type int")


def test_compress_records_calibration_name(tmp_path: Path) -> None:
    from conftest import conv_bn_model

    from onnxcomp.api import compress

    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32))
    compress(conv_bn_model(), ["remove_identity"], tmp_path / "out.onnx", calibration=tmp_path / "calib.npz")
    assert 'calibration = "calib.npz (5 samples)"' in (tmp_path / "out.recipe.toml").read_text()
