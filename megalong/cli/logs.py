"""Where the CLI's log goes: INFO on rank 0 (stdout, and a file), and megatron's import-time
warnings silenced."""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional


def setup_logging(log_file: Optional[Path] = None) -> None:
    """INFO on rank 0 (and into log_file), warnings only elsewhere."""
    rank = int(os.environ.get("RANK", "0"))
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", handlers=handlers,
                        force=True)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its dataset builder logs every index
    # megatron warns about every MLP class it does not know, megalong's MoELayer included.
    logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(
        lambda record: "Unknown MLP type" not in record.getMessage())


def quiet_megatron_warnings() -> None:
    """megatron-core warns on import that TransformerEngine/apex are absent and about its own
    deprecations; megalong knows, and a user's log should not start with a page of them."""
    for category in (UserWarning, DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"megatron\.")
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", message=".*Apex.*")


def quiet_bench_logging() -> None:
    """A bench's console: no megatron warnings, and megalong's warnings only, since the bench
    prints its own table."""
    quiet_megatron_warnings()
    setup_logging()
    logging.getLogger("megalong").setLevel(logging.WARNING)
