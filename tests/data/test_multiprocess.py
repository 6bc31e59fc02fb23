"""Two local JAX processes (jax.distributed on 127.0.0.1) read disjoint shards that cover the
data, assemble a global batch, and restore their iterator states exactly from a checkpoint."""

import json
import os
import socket
import subprocess
import sys

from tests.helpers import REPO


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(data_dir, out_dir, mode):
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = [subprocess.Popen([sys.executable, "-m", "tests.data.multiprocess_reader", coordinator, "2", str(p),
                               str(data_dir), str(out_dir), mode], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for p in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]


def test_two_processes_read_disjoint_shards_and_resume_exactly(tmp_path):
    data = tmp_path / "data"
    for name, n, files in (("a", 120, 3), ("b", 50, 1)):
        (data / name).mkdir(parents=True)
        for f in range(files):
            (data / name / f"{f}.jsonl").write_text(
                "".join(json.dumps({"text": f"{name}{i:03d}"}) + "\n" for i in range(f, n, files)))
    out = tmp_path / "out"
    out.mkdir()
    _launch(data, out, "read")
    r0, r1 = (json.loads((out / f"records_{p}.json").read_text()) for p in range(2))
    assert not set(r0) & set(r1)
    assert sorted(r0 + r1) == sorted([f"a{i:03d}" for i in range(120)] + [f"b{i:03d}" for i in range(50)])
    g0 = json.loads((out / "global_0.json").read_text())
    assert g0["shape"] == [8, 16] and g0["mine"] == [g0["local"]]  # its 4 rows of the 8-row global batch

    _launch(data, out, "resume")
    for p in range(2):
        after = json.loads((out / f"after_{p}.json").read_text())
        resumed = json.loads((out / f"resumed_{p}.json").read_text())
        assert resumed == after
    assert json.loads((out / "after_0.json").read_text()) != json.loads((out / "after_1.json").read_text())
