"""``step()`` called on rank 0 only (2 CPU ranks, gloo, a short process-group timeout set by the test).

A probe is collective; the lone rank waits in the first agreement collective until the timeout. Its error must state
the rule ("every rank must call step() ... at the same steps"), not just gloo's words. Rank 1 never probes: it waits
for rank 0's result file and exits (no collective, which would pair with rank 0's pending one).
"""

from __future__ import annotations

import os
import time

import _common as C


def main() -> None:
    from layerwatch import LayerWatch

    rank, _ = C.init_gloo()
    out = C.outdir()
    result: dict = {"rank": rank}
    if rank == 0:
        watch = LayerWatch(C.make_probe(), logdir=None, every=1, strict=True, batch_size=C.PROBE_BATCH)
        started = time.monotonic()
        try:
            watch.step(C.tiny_llama(), 1)
            result["raised"] = None
        except Exception as error:  # noqa: BLE001 - the test reads which error and its message
            result["raised"], result["message"] = type(error).__name__, str(error)
        result["waited_s"] = time.monotonic() - started
    else:
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(out, "result_rank0.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
    C.write_result(result, rank)


if __name__ == "__main__":
    C.main_guard(main)
