"""The TensorBoard event files of a run, read back with tensorboardX's protocol buffers and
CRC-32C (the reference implementation of the format)."""

import struct

from tensorboardX.crc32c import crc32c as reference_crc32c
from tensorboardX.proto.event_pb2 import Event

from t2i_jax.train import tensorboard
from t2i_jax.train.logging import MetricWriter


def read_records(path):
    with open(path, "rb") as f:
        data = f.read()
    records, at = [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        (length_crc,) = struct.unpack("<I", data[at + 8 : at + 12])
        body = data[at + 12 : at + 12 + length]
        (body_crc,) = struct.unpack("<I", data[at + 12 + length : at + 16 + length])
        assert length_crc == tensorboard.masked_crc(data[at : at + 8])
        assert body_crc == tensorboard.masked_crc(body)
        records.append(Event.FromString(body))
        at += 16 + length
    return records


def test_crc32c_matches_the_reference():
    for data in (b"", b"a", b"123456789", bytes(range(256)) * 3):
        assert tensorboard.crc32c(data) == reference_crc32c(data)
    assert tensorboard.crc32c(b"123456789") == 0xE3069283  # the published check value


def test_a_runs_scalars_read_back_as_events(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.write(10, {"loss": 0.5, "grad_norm": 3.25}, perf={"mfu": 0.125})
    writer.write(20, {"loss": 0.25, "grad_norm": 1.5})
    writer.close()
    (path,) = (tmp_path / "tb").iterdir()
    assert path.name.startswith("events.out.tfevents.")
    header, first, second = read_records(path)
    assert header.file_version == "brain.Event:2"
    assert first.step == 10 and second.step == 20 and first.wall_time > 1.7e9
    values = lambda e: {v.tag: v.simple_value for v in e.summary.value}
    assert values(first) == {"loss": 0.5, "grad_norm": 3.25, "perf/mfu": 0.125}
    assert values(second) == {"loss": 0.25, "grad_norm": 1.5}
