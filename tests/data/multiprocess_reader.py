"""One JAX process of the 2-process data tests (run by tests/data/test_multiprocess.py).

    python -m tests.data.multiprocess_reader <coordinator> <num_processes> <process_id> <data_dir> <out_dir> <mode>

mode "read":  every record of this process's shard, one epoch -> out_dir/records_<pid>.json;
              then 3 batches, an orbax checkpoint of the iterator, 4 more batches
              -> out_dir/after_<pid>.json; and one global batch assembled from both processes.
mode "resume": restore the iterator from that checkpoint, 4 batches -> out_dir/resumed_<pid>.json.
"""

import json
import pathlib
import sys

import jax
import numpy as np


def main():
    coordinator, n, pid, data_dir, out_dir, mode = sys.argv[1:7]
    jax.distributed.initialize(coordinator, int(n), int(pid))
    import grain
    import orbax.checkpoint as ocp

    from data import pipeline
    from data.sources import SourceSpec
    from tests.data.test_pipeline import CharTokenizer
    from train.mesh import batch_sharding, make_mesh, resolve_shape

    out = pathlib.Path(out_dir)
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    specs = [SourceSpec("a", "jsonl", path=f"{data_dir}/a/*.jsonl", weight=2.0),
             SourceSpec("b", "jsonl", path=f"{data_dir}/b/*.jsonl", weight=1.0)]
    kw = dict(seq_len=16, batch_size=4, seed=3, shuffle_window=8, num_workers=2, **shard)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    mngr = ocp.CheckpointManager(out / "ckpt", options=options)

    if mode == "read":
        recs = [r["text"] for spec in specs for r in pipeline.source_dataset(spec, num_epochs=1, **shard)]
        (out / f"records_{pid}.json").write_text(json.dumps(recs))
        it = iter(pipeline.source_batches(specs, CharTokenizer(), **kw))
        for _ in range(3):
            next(it)
        mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        after = [next(it)["inputs_BT"].tolist() for _ in range(4)]
        (out / f"after_{pid}.json").write_text(json.dumps(after))
        # the global batch: each process contributes its local rows
        mesh = make_mesh(resolve_shape({}, jax.device_count()))
        local = next(it)["inputs_BT"]
        arr = jax.make_array_from_process_local_data(batch_sharding(mesh, (8, 16)), local)
        rows = [np.asarray(s.data).tolist() for s in arr.addressable_shards]
        (out / f"global_{pid}.json").write_text(json.dumps({"shape": list(arr.shape), "local": local.tolist(),
                                                             "mine": rows}))
    else:
        it = iter(pipeline.source_batches(specs, CharTokenizer(), **kw))
        mngr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it)))
        resumed = [next(it)["inputs_BT"].tolist() for _ in range(4)]
        (out / f"resumed_{pid}.json").write_text(json.dumps(resumed))
    mngr.close()
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
