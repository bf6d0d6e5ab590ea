"""Worker of tests/metrics/test_stderr_ranks.py: one probe of a tiny model, its record's stderr written as JSON.

    python stderr_worker.py OUT             # one process
    torchrun --nproc_per_node 2 stderr_worker.py OUT   # two ranks (gloo)
"""

from __future__ import annotations

import json
import os
import sys


def main(out: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: models
    from models import TINY_VOCAB, tiny_model

    from layerwatch import LayerWatch, Probe

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    model = tiny_model("gpt2", layers=2)
    ids = torch.randint(3, TINY_VOCAB, (21, 12), generator=torch.Generator().manual_seed(0))
    probe = Probe.from_tensors(ids, vocab_size=TINY_VOCAB, views=2, labels=[i % 3 for i in range(21)])
    record = LayerWatch(probe, logdir=None, metrics="standard", batch_size=4).run(model, 0)
    with open(os.path.join(out, f"stderr_world{world}_rank{rank}.json"), "w") as handle:
        json.dump(record.stderr, handle)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
