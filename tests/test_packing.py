"""Packed model files (.sfz): exact round trips, size, entropy coding, format errors, no code run."""

from __future__ import annotations

import copy
import pickle
import struct

import numpy as np
import pytest
import torch

import shrinkflow
from schemas.common import Finetune
from schemas.quantize import DynamicQuant, KMeansQuant
from shrinkflow.artifacts import ModelHeader, save_model
from shrinkflow.errors import InputError
from shrinkflow.loading import load_model, pack_file
from shrinkflow.methods import Env
from shrinkflow.packing import PackedFormatError, huffman, is_packed, load_packed, pack_model, read_packed
from shrinkflow.packing.codec import positions_from_relative, relative_indices
from shrinkflow.packing.container import VERSION
from shrinkflow.quantization import kmeans, static
from tests.toy_models import prune_structurally


def _header(spec=None, shape=(1, 8, 8)) -> ModelHeader:
    return ModelHeader(
        spec=spec or {"arch": "mlp", "hidden": [48, 24]}, input_shape=list(shape), out_features=10, task="classification"
    )


def _pruned(header: ModelHeader, keep: float = 0.15, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = header.build().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                p.mul_((p.abs() >= p.abs().flatten().quantile(1 - keep)).float())
    return model


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _same(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("spec", [{"arch": "mlp", "hidden": [48, 24]}, {"arch": "lenet5"}])
def test_float_pruned_round_trip_is_exact(tmp_path, x, spec):
    h = _header(spec)
    model = _pruned(h)
    rep = pack_model(model, h, tmp_path / "m.sfz")
    loaded = shrinkflow.load(tmp_path / "m.sfz")
    _same(model, loaded, x)
    assert rep.size_bytes == (tmp_path / "m.sfz").stat().st_size == sum(rep.breakdown.values())
    assert any(t["layout"] == "sparse" for t in rep.tensors)


def test_dense_unpruned_round_trip_is_exact(tmp_path, x):
    h = _header()
    torch.manual_seed(3)
    model = h.build().eval()
    pack_model(model, h, tmp_path / "d.sfz")
    _same(model, shrinkflow.load(tmp_path / "d.sfz"), x)


def test_dynamic_int8_round_trip_keeps_the_integers(tmp_path, x):
    from shrinkflow.quantization import dynamic

    h = _header()
    q, hq = dynamic.quantize_dynamic(_pruned(h), h, DynamicQuant(), Env())
    pack_model(q, hq, tmp_path / "q.sfz")
    loaded, header = load_model(tmp_path / "q.sfz")
    assert header == hq
    _same(q, loaded, x)
    assert torch.equal(loaded.net[1].weight().int_repr(), q.net[1].weight().int_repr())


def test_kmeans_shared_round_trip_and_codebook(tmp_path, x):
    h = _header()
    params = KMeansQuant(bits=4, finetune=Finetune(epochs=0))
    q, hq = kmeans.quantize_kmeans(_pruned(h), h, params, Env())
    rep = pack_model(q, hq, tmp_path / "k.sfz")
    _same(q, shrinkflow.load(tmp_path / "k.sfz"), x)
    first = next(t for t in rep.tensors if t["name"] == "net.1.weight")
    assert first["values"].startswith("codebook[") and first["codebook"] <= 16


def test_structured_pruned_layers_are_stored_small(tmp_path, x):
    h = _header()
    model = h.build().eval()
    hs = prune_structurally(model, h)
    rep = pack_model(model, hs, tmp_path / "s.sfz")
    shapes = {t["name"]: t["shape"] for t in rep.tensors}
    assert shapes["net.1.weight"][0] < 48
    _same(model, shrinkflow.load(tmp_path / "s.sfz"), x)


def test_pack_file_and_load_dispatch_on_magic(tmp_path, x):
    h = _header()
    model = _pruned(h)
    save_model(model, tmp_path / "m.pt", h)
    pack_file(tmp_path / "m.pt", tmp_path / "any-name.bin")
    assert is_packed(tmp_path / "any-name.bin") and not is_packed(tmp_path / "m.pt")
    _same(model, shrinkflow.load(tmp_path / "any-name.bin"), x)


# ---------------------------------------------------------------- size


def test_packed_is_smaller_than_sparse_int8_file(tmp_path):
    from shrinkflow.quantization import dynamic

    h = _header(shape=(1, 16, 16))
    q, hq = dynamic.quantize_dynamic(_pruned(h, keep=0.1), h, DynamicQuant(), Env())
    storage = "sparse"
    baseline = save_model(q, tmp_path / "q.pt", hq.model_copy(update={"storage": storage, "masked": True}))
    packed = pack_model(q, hq, tmp_path / "q.sfz").size_bytes
    assert packed < baseline, (storage, packed, baseline)


def test_huffman_beats_fixed_width_on_a_skewed_stream():
    rng = np.random.default_rng(0)
    symbols = np.minimum(rng.geometric(0.5, size=20_000) - 1, 31)
    lengths, bits = huffman.huffman_encode(symbols, 32)
    fixed = huffman.pack_fixed(symbols, 5)
    assert len(bits) + len(lengths) < 0.6 * len(fixed)
    assert np.array_equal(huffman.huffman_decode(lengths, bits, len(symbols)), symbols)
    assert np.array_equal(huffman.unpack_fixed(fixed, len(symbols), 5), symbols)


def test_code_lengths_respect_the_limit_and_kraft():
    counts = np.array([2**i for i in range(30)], dtype=np.int64)
    lengths = huffman.code_lengths(counts, max_length=12)
    assert lengths.max() <= 12
    assert sum(2.0 ** -int(l) for l in lengths) <= 1.0


@pytest.mark.parametrize("width", [2, 3, 8])
def test_relative_indices_round_trip_with_long_gaps(width):
    positions = np.array([0, 1, 5, 300, 301, 5000, 5002], dtype=np.int64)
    rel = relative_indices(positions, width)
    assert rel.max() <= (1 << width) - 1
    assert np.array_equal(positions_from_relative(rel, width), positions)


# ---------------------------------------------------------------- bad files


@pytest.fixture
def packed(tmp_path) -> bytes:
    h = _header()
    pack_model(_pruned(h), h, tmp_path / "ok.sfz")
    return (tmp_path / "ok.sfz").read_bytes()


def test_truncated_file_raises_format_error(tmp_path, packed):
    for cut in (10, len(packed) // 2, len(packed) - 1):
        (tmp_path / "t.sfz").write_bytes(packed[:cut])
        with pytest.raises(PackedFormatError, match="truncated"):
            shrinkflow.load(tmp_path / "t.sfz")


def test_corrupt_byte_raises_checksum_error(tmp_path, packed):
    data = bytearray(packed)
    data[len(data) // 2] ^= 0x40
    (tmp_path / "c.sfz").write_bytes(bytes(data))
    with pytest.raises(PackedFormatError, match="checksum"):
        shrinkflow.load(tmp_path / "c.sfz")


def test_newer_version_says_so(tmp_path, packed):
    data = bytearray(packed)
    struct.pack_into("<H", data, 8, VERSION + 1)
    (tmp_path / "n.sfz").write_bytes(bytes(data))
    with pytest.raises(PackedFormatError, match="newer") as err:
        shrinkflow.load(tmp_path / "n.sfz")
    assert isinstance(err.value, InputError) and err.value.exit_code == 2


def test_loading_runs_no_code_from_the_file(tmp_path, packed, monkeypatch, x):
    """No unpickling at all: torch.load and pickle are unusable while the file loads."""

    def forbidden(*a, **k):
        raise AssertionError("the packed loader must not unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    (tmp_path / "m.sfz").write_bytes(packed)
    model, _ = load_packed(tmp_path / "m.sfz")
    with torch.no_grad():
        assert model(x).shape == (64, 10)


def test_metadata_is_plain_json_without_pickle_opcodes(packed):
    from shrinkflow.packing import container

    version, meta, _ = container.decode(packed, "packed")
    assert version == VERSION and set(meta) == {"h", "q", "l"}
    assert meta["h"]["spec"]["arch"] == "mlp"


def test_a_torch_file_is_not_mistaken_for_packed(tmp_path):
    h = _header()
    model = copy.deepcopy(_pruned(h))
    save_model(model, tmp_path / "m.pt", h)
    with pytest.raises(PackedFormatError, match="magic"):
        load_packed(tmp_path / "m.pt")


def test_cli_pack_and_predict(tmp_path):
    from typer.testing import CliRunner

    from shrinkflow.cli import app

    h = _header()
    model = _pruned(h)
    save_model(model, tmp_path / "m.pt", h)
    runner = CliRunner()
    res = runner.invoke(app, ["pack", str(tmp_path / "m.pt"), str(tmp_path / "m.sfz")])
    assert res.exit_code == 0, res.output
    assert "positions" in res.output and is_packed(tmp_path / "m.sfz")
    X = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", X)
    res = runner.invoke(app, ["predict", str(tmp_path / "m.sfz"), str(tmp_path / "x.npy")])
    assert res.exit_code == 0, res.output
    with torch.no_grad():
        expected = model(torch.from_numpy(X).reshape(4, 1, 8, 8)).argmax(1).tolist()
    assert [int(v) for v in res.output.split()] == expected
    (tmp_path / "bad.sfz").write_bytes((tmp_path / "m.sfz").read_bytes()[:50])
    res = runner.invoke(app, ["predict", str(tmp_path / "bad.sfz"), str(tmp_path / "x.npy")])
    assert res.exit_code == 2 and "truncated" in res.output


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor(7, dtype=torch.int64),  # BatchNorm's num_batches_tracked
        torch.tensor([True, False, True]),
        torch.randn(5, 3).to(torch.bfloat16),
        torch.zeros(0, 4),
        torch.zeros(6, 6),
        torch.tensor([[0.5, 0.0], [0.25, -1.0]], dtype=torch.float64),
    ],
    ids=["int64-scalar", "bool", "bf16", "empty", "all-zero", "float64"],
)
def test_any_state_tensor_round_trips(tensor):
    from shrinkflow.packing.codec import _decode_tensor, _encode_tensor, _Payload

    p = _Payload()
    entry = _encode_tensor(p, "t", tensor)
    out = _decode_tensor(memoryview(bytes(p.buf)), entry)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape and torch.equal(out, tensor)


def test_static_int8_per_channel_round_trip_stores_integers(tmp_path, x):
    """FX static int8 (per-channel scales): the integers are stored, not >256 distinct floats."""
    from schemas.quantize import StaticQuant
    from shrinkflow.data import Splits

    h = _header()
    rng = np.random.default_rng(0)
    X = rng.random((128, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 128)
    splits = Splits(X, y, X[:8], y[:8], X[:8], y[:8], "classification")
    q, hq = static.quantize_static(_pruned(h, keep=0.5), h, StaticQuant(method="static"), Env(splits=splits))
    rep = pack_model(q, hq, tmp_path / "s.sfz")
    with torch.no_grad():
        assert torch.equal(q(x), shrinkflow.load(tmp_path / "s.sfz")(x))
    assert rep.size_bytes < save_model(q, tmp_path / "s.pt", hq)
    # The per-channel scales are coded sections of the payload, put back into the header on load.
    assert rep.breakdown["scales"] > 0
    _, meta, _ = read_packed(tmp_path / "s.sfz")
    assert any(qp["scheme"] == "per_channel" and len(qp["scales"]) == 48 for qp in meta["qparams"])
    # Integers: a codebook of ≤ 256 entries, or raw int8 when that is smaller.
    for t in rep.tensors:
        if t["name"].endswith("weight"):
            assert t["values"].endswith("(int8 grid)")
            assert t["values"].startswith("codebook[") or t["values"].startswith("raw int8")


# ---------------------------------------------------------------- format version 2: every byte


DATA = __import__("pathlib").Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["kmeans", "dynamic"])
def test_version_1_files_still_load_and_compute_the_same(name):
    """Files written by the version-1 packer (tests/data/sfz-v1, made before version 2) load unchanged."""
    from shrinkflow.packing import container

    path = DATA / "sfz-v1" / f"mlp-{name}.sfz"
    assert container.decode(path.read_bytes(), "fixture")[0] == 1
    expected = np.load(DATA / "sfz-v1" / "expected.npz")
    model = shrinkflow.load(path)
    with torch.no_grad():
        out = model(torch.from_numpy(expected["x"]))
    assert torch.equal(out, torch.from_numpy(expected[name]))


def test_repacking_a_version_1_file_writes_version_2_smaller(tmp_path):
    src = DATA / "sfz-v1" / "mlp-kmeans.sfz"
    rep = pack_file(src, tmp_path / "v2.sfz")
    assert rep.version == VERSION == 2
    assert rep.size_bytes < src.stat().st_size
    expected = np.load(DATA / "sfz-v1" / "expected.npz")
    with torch.no_grad():
        assert torch.equal(shrinkflow.load(tmp_path / "v2.sfz")(torch.from_numpy(expected["x"])), torch.from_numpy(expected["kmeans"]))


def test_breakdown_names_every_section_and_adds_up(tmp_path):
    from shrinkflow.packing import CATEGORIES

    h = _header()
    q, hq = kmeans.quantize_kmeans(_pruned(h), h, KMeansQuant(bits=4, finetune=Finetune(epochs=0)), Env())
    rep = pack_model(q, hq, tmp_path / "k.sfz")
    assert set(rep.breakdown) == set(CATEGORIES)
    assert sum(rep.breakdown.values()) == rep.size_bytes == (tmp_path / "k.sfz").stat().st_size
    for part in ("positions", "indices", "codebooks", "biases", "table", "header", "container"):
        assert rep.breakdown[part] > 0, part
    # The biases (24 + 48 + 10 fp32 values, no structure to find) are all of their section.
    assert rep.breakdown["biases"] == 4 * (48 + 24 + 10)
    # A compressed header primed with the format's dictionary: a few dozen bytes, not a JSON document.
    assert rep.breakdown["header"] < 60 and rep.breakdown["table"] < 12 * len(rep.tensors)


def test_removed_unit_lists_leave_the_json_header(tmp_path, x):
    """A structured transform's index lists are coded sections (at most about a bit per unit), not JSON text."""
    import json

    h = _header(shape=(1, 16, 16), spec={"arch": "mlp", "hidden": [300, 100]})
    model = h.build().eval()
    hs = prune_structurally(model, h)
    removed = sum(len(idx) for _, _, idx in hs.transforms[0]["history"])
    rep = pack_model(model, hs, tmp_path / "s.sfz")
    loaded, header = load_model(tmp_path / "s.sfz")
    assert header == hs
    x16 = torch.randn(8, 1, 16, 16)
    _same(model, loaded, x16)
    assert removed == 200
    assert 0 < rep.breakdown["structure"] <= (300 + 100) / 8 + 8
    assert rep.breakdown["structure"] + rep.breakdown["header"] < len(json.dumps(hs.transforms)) / 8


def _tie_model() -> tuple[torch.nn.Module, ModelHeader]:
    """Class 1 wins every input by 1e-6: rounding the last bias to float16 would make it a tie (class 0)."""
    h = _header(spec={"arch": "mlp", "hidden": [8]})
    h = h.model_copy(update={"out_features": 2})
    torch.manual_seed(0)
    model = h.build().eval()
    with torch.no_grad():
        model.net[3].weight.zero_()
        model.net[3].bias.copy_(torch.tensor([0.1, 0.1 + 1e-6]))
    return model, h


def test_float16_only_where_every_reference_prediction_stays(tmp_path, x):
    model, h = _tie_model()
    exact = pack_model(model, h, tmp_path / "exact.sfz")
    rep = pack_model(model, h, tmp_path / "half.sfz", reference=x)
    assert rep.checked == len(x)
    assert set(rep.rounded) == {"net.1.weight", "net.1.bias"}  # net.3.weight is all zeros (exact); net.3.bias would flip
    assert rep.size_bytes < exact.size_bytes
    with torch.no_grad():
        assert torch.equal(shrinkflow.load(tmp_path / "half.sfz")(x).argmax(1), model(x).argmax(1))
        assert torch.equal(shrinkflow.load(tmp_path / "exact.sfz")(x), model(x))
    rows = {t["name"]: t for t in rep.tensors}
    assert rows["net.1.bias"]["precision"] == "float16 (rounded)" and rows["net.3.bias"]["precision"] == "exact"


def test_float16_everywhere_when_nothing_flips(tmp_path, x):
    h = _header()
    q, hq = kmeans.quantize_kmeans(_pruned(h), h, KMeansQuant(bits=4, finetune=Finetune(epochs=0)), Env())
    exact = pack_model(q, hq, tmp_path / "exact.sfz")
    rep = pack_model(q, hq, tmp_path / "half.sfz", reference=x)
    assert set(rep.rounded) == {k for k in q.state_dict() if k.endswith("bias") or k.endswith("codebook")} - {
        k for k in q.state_dict() if k.endswith("codebook")
    } | {k.replace("weight_codebook", "weight") for k in q.state_dict() if k.endswith("weight_codebook")}
    # Codebooks and biases halve: 2 bytes saved per stored float.
    saved = exact.size_bytes - rep.size_bytes
    assert saved >= 2 * (48 + 24 + 10) + 2 * 3 * 14
    with torch.no_grad():
        assert torch.equal(shrinkflow.load(tmp_path / "half.sfz")(x).argmax(1), q(x).argmax(1))


def test_rounding_never_turns_a_weight_into_zero(tmp_path, x):
    model, h = _tie_model()
    with torch.no_grad():
        model.net[1].weight[0, 0] = 1e-9  # float16 flushes it to zero: the tensor is kept exact
    rep = pack_model(model, h, tmp_path / "t.sfz", reference=x)
    assert "net.1.weight" not in rep.rounded
    assert shrinkflow.load(tmp_path / "t.sfz").net[1].weight[0, 0] == model.net[1].weight[0, 0]


def test_regression_models_are_packed_exactly(tmp_path):
    h = ModelHeader(spec={"arch": "mlp", "hidden": [8]}, input_shape=[4], out_features=1, task="regression")
    torch.manual_seed(0)
    model = h.build().eval()
    X = torch.randn(32, 4)
    rep = pack_model(model, h, tmp_path / "r.sfz", reference=X)
    assert rep.rounded == [] and rep.checked == 0
    with torch.no_grad():
        assert torch.equal(shrinkflow.load(tmp_path / "r.sfz")(X), model(X))


def test_a_damaged_table_is_a_format_error(tmp_path, packed):
    """Bytes changed consistently (CRC recomputed): the table is checked, not trusted."""
    import zlib

    meta_len = struct.unpack_from("<I", packed, 12)[0]
    start = 20 + meta_len
    for pos, value in ((start, 0xFF), (start + 1, 7), (start + 2, 0xEE)):
        data = bytearray(packed[:-4])
        data[pos] = value
        data += struct.pack("<I", zlib.crc32(bytes(data)))
        (tmp_path / "d.sfz").write_bytes(bytes(data))
        with pytest.raises(PackedFormatError, match="corrupt or inconsistent"):
            shrinkflow.load(tmp_path / "d.sfz")


def test_varints_round_trip():
    from shrinkflow.packing.container import Reader, Writer

    values = [0, 1, 127, 128, 300, 2**21, 2**35 + 5]
    w = Writer()
    for v in values:
        w.uint(v)
    assert len(w.buf) == 1 + 1 + 1 + 2 + 2 + 4 + 6
    r = Reader(bytes(w.buf))
    assert [r.uint() for _ in values] == values
    with pytest.raises(ValueError, match="ends early"):
        r.uint()


def test_cli_pack_shows_bytes_per_section_and_float16(tmp_path):
    from typer.testing import CliRunner

    from shrinkflow.cli import app

    model, h = _tie_model()
    save_model(model, tmp_path / "m.pt", h)
    np.save(tmp_path / "ref.npy", torch.randn(16, 64).numpy())
    res = CliRunner().invoke(app, ["pack", str(tmp_path / "m.pt"), str(tmp_path / "m.sfz"), "--reference", str(tmp_path / "ref.npy")])
    assert res.exit_code == 0, res.output
    for part in ("| biases |", "| header |", "| net.3.bias | 2 |", "float16: net.1.weight, net.1.bias", "16 reference inputs"):
        assert part in res.output, part
    np.save(tmp_path / "bad.npy", np.zeros((3, 5), dtype=np.float32))
    res = CliRunner().invoke(app, ["pack", str(tmp_path / "m.pt"), str(tmp_path / "x.sfz"), "--reference", str(tmp_path / "bad.npy")])
    assert res.exit_code == 2 and "rows shaped [5]" in res.output
    assert not (tmp_path / "x.sfz").exists()
