"""`python -m torch.distributed.run --nproc_per_node N tests/nonfinite_driver.py RUNS.json`: several
training runs in one job, each with NaN injected into the loss of its `bad_steps` on rank 0
(tests/nonfinite_hooks.py); every rank writes `<out>.rank<R>.json`: which steps left the weights
and Adam's state unchanged, the losses, and the error that stopped the run (if one did)."""
from __future__ import annotations

import json
import sys

from megatron.core import parallel_state

from megalong.config import load_config
from megalong.errors import MegalongError
from megalong.parallel.distributed import shutdown, world_size_from_env
from megalong.train.loop import train
from nonfinite_hooks import Recorder, install


def main(path: str) -> None:
    import torch.distributed as dist

    for run in json.loads(open(path).read()):
        recorder = Recorder(run["bad_steps"], run.get("inject_rank", 0))
        uninstall = install(recorder)
        error, losses = None, {}
        try:
            losses = train(load_config([], run["overrides"], world_size=world_size_from_env())).losses
        except MegalongError as e:
            error = str(e)
        finally:
            uninstall()
        rank = dist.get_rank()
        with open(f"{run['out']}.rank{rank}.json", "w") as f:
            json.dump({"unchanged": recorder.unchanged, "losses": losses, "error": error}, f)
        parallel_state.destroy_model_parallel()
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
