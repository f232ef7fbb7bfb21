"""Two JAX processes on one machine (gloo collectives) train one run together."""

import json
import os
import socket

from helpers import start_cli, train_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_a_run(tmp_path, data_dir):
    workdir = tmp_path / "run"
    port = free_port()
    procs = [
        start_cli(
            *train_args(workdir, data_dir, "--config.train.steps=4"),
            "--config.train.checkpoint_every=2",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(i),
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]

    # Each process saved its own data-iterator position; process 0 alone wrote the logs.
    data = workdir / "checkpoints" / "4" / "data"
    assert sorted(f for f in os.listdir(data) if f.endswith(".json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    positions = [json.loads((data / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert positions[0] != positions[1]  # Different shards of the records.
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").open()]
    assert steps == [2, 4]
    assert (workdir / "report.md").is_file() and (workdir / "samples" / "step_4.png").is_file()
