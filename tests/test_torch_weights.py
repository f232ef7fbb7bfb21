"""The restricted reader of torch weight files: exact round trips, refused pickles, damage."""

import collections
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from t2i_jax.errors import CheckpointError
from t2i_jax.nets.torch_weights import load_state_dict

FORMATS = pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])


def _save(obj, path, legacy: bool) -> str:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return str(path)


def _state_dict():
    g = torch.Generator().manual_seed(0)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return collections.OrderedDict(
        f32=torch.randn(3, 5, generator=g),
        f16=torch.randn(4, generator=g).half(),
        bf16=torch.randn(3, 2, generator=g).bfloat16(),
        f64=torch.randn(2, 2, generator=g).double(),
        i64=torch.randint(-(10**12), 10**12, (5,), generator=g),
        i32=torch.randint(-9, 9, (3,), generator=g, dtype=torch.int32),
        u8=torch.randint(0, 255, (4,), generator=g, dtype=torch.uint8),
        bool=torch.rand(7, generator=g) > 0.5,
        transposed=torch.randn(3, 4, generator=g).t(),  # non-contiguous
        view=base[1:, 2:],  # storage offset 8, strides of the 6-wide base
        base=base,  # shares its storage with `view`
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 3),
        parameter=torch.nn.Parameter(torch.randn(2, generator=g)),
        expanded=torch.randn(3, 1, generator=g).expand(3, 4),  # stride 0
    )


@FORMATS
def test_state_dict_round_trips_exactly(tmp_path, legacy):
    state = _state_dict()
    loaded = load_state_dict(_save(state, tmp_path / "w.pth", legacy))
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        tensor = tensor.detach()
        got = loaded[name]
        assert isinstance(got, np.ndarray), name
        if tensor.dtype == torch.bfloat16:
            assert got.dtype.name == "bfloat16"
            expected = tensor.float().numpy()
            got = got.astype(np.float32)
        else:
            expected = tensor.numpy()
            assert got.dtype == expected.dtype, name
        assert got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    # Copies, not views of one storage: writing one tensor leaves its neighbours alone.
    loaded["view"][...] = -1
    assert loaded["base"][0, 0] == 0


def test_nested_state_dict_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = {"a": torch.randn(3, 3), "b": torch.arange(4)}
    wrapped = load_state_dict(_save({"state_dict": state}, tmp_path / "w.pth", False))
    np.testing.assert_array_equal(wrapped["a"], state["a"].numpy())
    save_file(state, str(tmp_path / "w.safetensors"))
    converted = load_state_dict(str(tmp_path / "w.safetensors"))
    np.testing.assert_array_equal(converted["b"], state["b"].numpy())


class _Exploit:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@FORMATS
def test_malicious_pickle_is_refused_and_not_run(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = _save({"w": torch.zeros(2), "x": _Exploit(str(marker))}, tmp_path / "w.pth", legacy)
    with pytest.raises(CheckpointError, match=r"refusing to load (posix|os|nt)\.system"):
        load_state_dict(path)
    assert not marker.exists()


def test_plain_pickle_exploit_is_refused_though_pickle_would_run_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "w.pth"
    path.write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(CheckpointError, match="refusing"):
        load_state_dict(str(path))
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the control: the exploit is real
    assert marker.exists()


def test_objects_other_than_tensors_are_refused(tmp_path):
    path = _save({"w": torch.zeros(1), "m": torch.nn.Linear(2, 2)}, tmp_path / "m.pth", False)
    with pytest.raises(CheckpointError, match="refusing to load torch.nn"):
        load_state_dict(path)


@FORMATS
@pytest.mark.parametrize("keep", [0.5, 0.99, 40])
def test_truncated_file_is_a_checkpoint_error(tmp_path, legacy, keep):
    path = _save({"w": torch.randn(64, 64)}, tmp_path / "w.pth", legacy)
    with open(path, "rb") as f:
        data = f.read()
    cut = int(len(data) * keep) if keep < 1 else keep
    with open(path, "wb") as f:
        f.write(data[:cut])
    with pytest.raises(CheckpointError, match="w.pth"):
        load_state_dict(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(str(tmp_path / "none.pth"))
    (tmp_path / "x.pth").write_bytes(b"hello, not a weight file")
    with pytest.raises(CheckpointError, match="x.pth"):
        load_state_dict(str(tmp_path / "x.pth"))
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="x.safetensors"):
        load_state_dict(str(tmp_path / "x.safetensors"))


@pytest.mark.parametrize(
    "offset,size,stride",
    [(0, (5,), (1,)), (2, (2, 2), (2, 1)), (0, (2,), (4,)), (0, (2,), (-1,)), (-1, (2,), (1,))],
)
def test_tensors_reaching_outside_their_storage_are_refused(offset, size, stride):
    from t2i_jax.nets.torch_weights import _rebuild_tensor

    # A crafted file could ask for a strided view past the end of its 4-element storage.
    with pytest.raises(CheckpointError):
        _rebuild_tensor(np.arange(4, dtype=np.float32), offset, size, stride)
    np.testing.assert_array_equal(
        _rebuild_tensor(np.arange(4, dtype=np.float32), 1, (3,), (1,)), [1, 2, 3]
    )


def _legacy_bytes(keys: list[str], values: np.ndarray) -> bytes:
    """A file in torch's legacy format written by hand, with a chosen storage key list."""
    storage = object()

    class Tensor:
        def __reduce__(self):
            args = (storage, 0, (values.size,), (1,), False, collections.OrderedDict())
            return torch._utils._rebuild_tensor_v2, args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is storage:
                return ("storage", torch.FloatStorage, "0", "cpu", values.size, None)
            return None

    main = io.BytesIO()
    Pickler(main, protocol=2).dump({"w": Tensor()})
    header = b"".join(
        pickle.dumps(x, protocol=2)
        for x in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True})
    )
    raw = struct.pack("<q", values.size) + values.astype("<f4").tobytes()
    return header + main.getvalue() + pickle.dumps(keys, protocol=2) + raw


def test_legacy_storage_list_must_cover_every_tensor(tmp_path):
    values = np.arange(4, dtype=np.float32)
    (tmp_path / "ok.pth").write_bytes(_legacy_bytes(["0"], values))
    np.testing.assert_array_equal(load_state_dict(str(tmp_path / "ok.pth"))["w"], values)
    # Without its key the storage's bytes are never read: an error, not a tensor of zeros.
    (tmp_path / "bad.pth").write_bytes(_legacy_bytes([], values))
    with pytest.raises(CheckpointError, match="storage list"):
        load_state_dict(str(tmp_path / "bad.pth"))


def test_pickle_cannot_retype_a_storage(tmp_path):
    # GLOBAL torch.FloatStorage, then BUILD with {"dtype": "<U4"}: would make string tensors.
    payload = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x03\x00\x00\x00<U4sb."
    path = tmp_path / "retype.pth"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match="modify a storage type"):
        load_state_dict(str(path))
