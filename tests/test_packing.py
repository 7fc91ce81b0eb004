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
    assert first["values"].startswith("codebook[") and int(first["values"][9:-1]) <= 16


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
    import json
    import zlib

    meta_len = struct.unpack_from("<I", packed, 12)[0]
    meta = json.loads(zlib.decompress(packed[20 : 20 + meta_len]))
    assert set(meta) == {"header", "tensors", "qparams"}
    assert meta["header"]["spec"]["arch"] == "mlp"


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
    # Integers: a codebook of ≤ 256 entries, or raw int8 when that is smaller.
    _, meta, _ = read_packed(tmp_path / "s.sfz")
    for t in meta["tensors"]:
        if t["name"].endswith("weight"):
            assert "int_grid" in t
            assert t["values"]["kind"] == "codebook" or t["values"]["dtype"] == "int8"
