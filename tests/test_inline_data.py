"""Big weights inside an .onnx file, mapped from it (ir.inline_data).

The wire-format walk must find every raw_data field byte for byte, the model without them must
be the model itself minus those bytes, and a command on a model whose weights are mapped from its
own file must write the model the in-memory path writes, leaving the input untouched.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcomp import api, model_io
from onnxcomp.errors import ModelLoadError
from onnxcomp.ir.inline_data import WireFormatError, load_without_inline_data, write_inline
from onnxcomp.ir.mapped import MIN_MAPPED_BYTES, is_mapped, materialized, source_of
from tests.test_mapped import ROOT, SHAPE, _same_models, write_decoder  # the mapped tests' decoder


@pytest.fixture(scope="module")
def inline_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test decoder as one .onnx file (weights inline)."""
    folder = tmp_path_factory.mktemp("inline")
    external = folder / "external.onnx"
    write_decoder(external, SHAPE, seed=5)
    path = folder / "decoder.onnx"
    model = onnx.load(str(external))
    for tensor in model.graph.initializer:  # as exporters write it (loading external data sets it)
        tensor.ClearField("data_location")
    onnx.save(model, str(path))
    external.unlink()
    external.with_name("external.onnx.data").unlink()
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("min_bytes", [MIN_MAPPED_BYTES, 1])
def test_left_out_bytes_are_the_raw_data_and_the_rest_is_the_model(inline_decoder: Path, min_bytes: int) -> None:
    whole = onnx.load(str(inline_decoder))
    stripped, left_out, total = load_without_inline_data(inline_decoder, min_bytes)
    data = inline_decoder.read_bytes()
    expected = {i for i, t in enumerate(whole.graph.initializer) if len(t.raw_data) >= min_bytes}
    assert set(left_out) == expected and len(expected) > 4
    assert total == sum(length for _, length in left_out.values())
    for index, (offset, length) in left_out.items():
        assert data[offset : offset + length] == whole.graph.initializer[index].raw_data
        assert not stripped.graph.initializer[index].HasField("raw_data")
        whole.graph.initializer[index].ClearField("raw_data")
    # Everything but those bytes is the model, field for field.
    assert stripped.SerializeToString(deterministic=True) == whole.SerializeToString(deterministic=True)


def test_nothing_to_leave_out_parses_the_file_as_is(inline_decoder: Path) -> None:
    model, left_out, total = load_without_inline_data(inline_decoder, 1 << 40)
    assert left_out == {} and total == 0
    assert model.SerializeToString(deterministic=True) == onnx.load(str(inline_decoder)).SerializeToString(
        deterministic=True
    )


def test_load_model_maps_inline_weights_from_the_file(inline_decoder: Path) -> None:
    whole = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(inline_decoder)).graph.initializer}
    model = model_io.load_model(inline_decoder, mapped=True)
    assert is_mapped(model) and model.ByteSize() < 64 * 1024
    mapped = [t for t in model.graph.initializer if source_of(t) is not None]
    assert len(mapped) > 4 and {source_of(t)[0] for t in mapped} == {str(inline_decoder.resolve())}  # type: ignore[index]
    for tensor in materialized(model).graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), whole[tensor.name], err_msg=tensor.name)
    unmapped = model_io.load_model(inline_decoder, mapped=False)
    assert not is_mapped(unmapped) and unmapped.ByteSize() > 500_000


def test_a_truncated_file_is_a_one_line_error(inline_decoder: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(inline_decoder.read_bytes()[:-1000])
    with pytest.raises(WireFormatError):
        load_without_inline_data(broken, MIN_MAPPED_BYTES)
    with pytest.raises(ModelLoadError, match=r"broken\.onnx: not an ONNX model .*truncated") as info:
        model_io.load_model(broken, mapped=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "options",
    [
        {"weights": "int4", "granularity": "group:32", "activations": "none"},
        {"weights": "int8", "granularity": "channel", "activations": "none"},
    ],
    ids=["int4", "int8"],
)
def test_quantize_with_inline_weights_mapped_writes_the_in_memory_model(
    inline_decoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict[str, str]
) -> None:
    before = _digest(inline_decoder)
    in_memory = tmp_path / "memory.onnx"
    api.quantize(inline_decoder, in_memory, **options)  # type: ignore[arg-type]
    assert not in_memory.with_name("memory.onnx.data").exists()
    monkeypatch.setattr(model_io, "MAP_WEIGHTS_FROM_BYTES", 0)
    mapped = tmp_path / "mapped.onnx"
    report = api.quantize(inline_decoder, mapped, **options)  # type: ignore[arg-type]
    # under 1 GiB the caller gets an ordinary proto of the output, as from an in-memory run
    assert not is_mapped(report.model)
    onnx.checker.check_model(report.model, full_check=True)
    assert not mapped.with_name("mapped.onnx.data").exists()  # one file, as the in-memory path writes
    assert mapped.read_bytes() == in_memory.read_bytes()
    _same_models(mapped, in_memory)
    assert (tmp_path / "mapped.quant_record.json").read_text() == (tmp_path / "memory.quant_record.json").read_text()
    assert _digest(inline_decoder) == before
    assert sorted(p.name for p in inline_decoder.parent.iterdir()) == ["decoder.onnx"]


def test_fuse_with_inline_weights_mapped_writes_the_in_memory_model(
    inline_decoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.fuse(inline_decoder, tmp_path / "memory.onnx")
    monkeypatch.setattr(model_io, "MAP_WEIGHTS_FROM_BYTES", 0)
    api.fuse(inline_decoder, tmp_path / "mapped.onnx")
    assert (tmp_path / "mapped.onnx").read_bytes() == (tmp_path / "memory.onnx").read_bytes()


def test_external_data_is_still_written_when_asked(
    inline_decoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_io, "MAP_WEIGHTS_FROM_BYTES", 0)
    api.quantize(inline_decoder, tmp_path / "w8.onnx", weights="int8", activations="none", external_data=True)
    api.quantize(inline_decoder, tmp_path / "one.onnx", weights="int8", activations="none")
    assert (tmp_path / "w8.onnx.data").exists() and not (tmp_path / "one.onnx.data").exists()
    _same_models(tmp_path / "w8.onnx", tmp_path / "one.onnx")


def test_an_explicit_default_data_location_gives_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tensor read back from external data carries ``data_location: DEFAULT``; both paths drop
    the default on load, so they write the same bytes."""
    external = tmp_path / "external.onnx"
    write_decoder(external, SHAPE, seed=6)
    path = tmp_path / "explicit.onnx"
    onnx.save(onnx.load(str(external)), str(path))
    assert any(t.HasField("data_location") for t in onnx.load(str(path)).graph.initializer)
    api.quantize(path, tmp_path / "memory.onnx", weights="int8", activations="none")
    monkeypatch.setattr(model_io, "MAP_WEIGHTS_FROM_BYTES", 0)
    api.quantize(path, tmp_path / "mapped.onnx", weights="int8", activations="none")
    assert (tmp_path / "mapped.onnx").read_bytes() == (tmp_path / "memory.onnx").read_bytes()


def test_write_inline_is_the_serialisation_of_the_model_read_in(inline_decoder: Path, tmp_path: Path) -> None:
    model = model_io.load_model(inline_decoder, mapped=True)
    model.graph.initializer[0].raw_data = b"changed in memory"  # in-memory and mapped tensors mixed
    out = tmp_path / "inline.onnx"
    write_inline(model, out)
    assert out.read_bytes() == materialized(model).SerializeToString(deterministic=True)


def test_ascend_target_on_a_mapped_model_writes_the_in_memory_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Ascend writers and the deploy model's reference run read mapped weights (they once
    took the proto's bytes only)."""
    demo, calib = ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "digits_calib.npz"
    api.quantize(demo, tmp_path / "memory.onnx", calibration=calib, target="ascend", reports=False)
    monkeypatch.setattr(model_io, "MAP_WEIGHTS_FROM_BYTES", 0)
    assert is_mapped(model_io.load_model(demo))
    api.quantize(demo, tmp_path / "mapped.onnx", calibration=calib, target="ascend", reports=False)
    for suffix in (".onnx", ".fake_quant.onnx"):
        got, want = (
            {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / f"{stem}{suffix}")).graph.initializer}
            for stem in ("mapped", "memory")
        )
        assert sorted(got) == sorted(want)
        for name, value in want.items():  # calibrated: a range may move by an ulp (docs/scale.md)
            if value.dtype.kind == "f":
                np.testing.assert_allclose(got[name], value, rtol=1e-5, err_msg=name)
            else:
                np.testing.assert_allclose(got[name].astype(np.int64), value.astype(np.int64), atol=1, err_msg=name)
    deploy = onnx.load(str(tmp_path / "mapped.onnx"))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in deploy.graph.initializer)
