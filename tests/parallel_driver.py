"""Run several training configs one after another in one torchrun job (saves ~15 s of start-up
per config): `python -m torch.distributed.run --nproc_per_node N tests/parallel_driver.py RUNS.json`
where RUNS.json is a list of lists of `key=value` overrides. megatron-core's parallel state is
rebuilt for each run; the process group is kept. Each run's log goes, as the CLI's does, to
`<save_dir>/train.log` (rank 0)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron.core import parallel_state

from megalong.cli.logs import setup_logging
from megalong.config import load_config
from megalong.parallel.distributed import shutdown, world_size_from_env
from megalong.train.loop import train


def main(path: str) -> None:
    for overrides in json.loads(open(path).read()):
        cfg = load_config([], overrides, world_size=world_size_from_env())
        setup_logging(Path(cfg.train.save_dir) / "train.log" if cfg.train.save_dir else None)
        train(cfg)
        parallel_state.destroy_model_parallel()
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
