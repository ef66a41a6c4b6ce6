"""The outputs of `preprocess`: one shard per input file (its name from the file's), written under
`.<shard>.tmp/` and renamed when the file is done, with a `<shard>.done.json` record that a later
run checks before it keeps the shard (resume)."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from megalong.data.indexed import ShardWriter, read_header
from megalong.data.preprocess_events import PreprocessStats
from megalong.data.preprocess_options import Settings

DONE_VERSION = 1


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "none"


def _file_stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".zst", ".jsonl", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return safe_name(name)


def shard_bases(files: list[str], output_prefix: str) -> list[str]:
    """The output base of every input file: the prefix for one file, else PREFIX_<file stem>."""
    if len(files) == 1:
        return [output_prefix]
    stems = [_file_stem(f) for f in files]
    bases = []
    for i, stem in enumerate(stems):
        if stems.count(stem) > 1:
            stem = f"{i:05d}_{stem}"
        bases.append(f"{output_prefix}_{stem}")
    return bases


def done_path(base: str) -> Path:
    return Path(f"{base}.done.json")


def verified_record(base: str, path: str, settings: Settings, on_bad: str) -> Optional[dict]:
    """The done record of a shard if it is complete and made with these settings, else None."""
    try:
        record = json.loads(done_path(base).read_text())
        if (record["version"] != DONE_VERSION or record["settings_digest"] != settings.digest()
                or record["input_size"] != os.path.getsize(path)):
            return None
        if on_bad == "stop" and record["stats"]["bad_lines"]:
            return None  # made by skipping bad lines, and now they must stop the run
        for prefix, info in record["outputs"].items():
            if (os.path.getsize(f"{prefix}.bin") != info["bin_bytes"]
                    or os.path.getsize(f"{prefix}.idx") != info["idx_bytes"]
                    or read_header(f"{prefix}.idx")[2] != info["documents"]):
                return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Shard:
    """The outputs of one input file, written under `.<base>.tmp/` until `commit`."""

    def __init__(self, base: str, path: str, settings: Settings):
        self.base, self.path, self.settings = base, path, settings
        self.tmp = Path(base).with_name(f".{Path(base).name}.tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)  # a killed run's leftovers
        self.tmp.mkdir(parents=True)
        self.writers: dict[str, ShardWriter] = {}
        self.stats = PreprocessStats()
        self.started = time.perf_counter()
        self.position = 0
        self.size = max(1, os.path.getsize(path))

    def prefix(self, subset: str) -> str:
        return self.base if not self.settings.split_by_subset else f"{self.base}_{safe_name(subset)}"

    def add(self, groups: dict) -> None:
        for subset, (tokens, lengths) in groups.items():
            writer = self.writers.get(subset)
            if writer is None:
                writer = self.writers[subset] = ShardWriter(self.tmp / Path(self.prefix(subset)).name,
                                                            self.settings.dtype)
            writer.add(tokens, lengths)
            self.stats.documents += len(lengths)
            self.stats.tokens += len(tokens)

    def commit(self) -> dict:
        if not self.writers and not self.settings.split_by_subset:
            self.writers[""] = ShardWriter(self.tmp / Path(self.base).name, self.settings.dtype)
        outputs = {}
        for subset, writer in sorted(self.writers.items()):
            writer.finish()
            prefix = self.prefix(subset)
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)
            for suffix in (".bin", ".idx"):
                os.replace(f"{writer.path}{suffix}", f"{prefix}{suffix}")
            outputs[prefix] = {"subset": subset or None, "documents": writer.documents,
                               "tokens": writer.tokens, "bin_bytes": os.path.getsize(f"{prefix}.bin"),
                               "idx_bytes": os.path.getsize(f"{prefix}.idx")}
        s = self.stats
        record = {"version": DONE_VERSION, "input": os.path.abspath(self.path),
                  "input_size": os.path.getsize(self.path), "settings_digest": self.settings.digest(),
                  "settings": asdict(self.settings), "outputs": outputs,
                  "stats": {"documents": s.documents, "tokens": s.tokens, "bytes": s.bytes,
                            "bad_lines": s.bad_lines, "empty_documents": s.empty_documents,
                            "filtered": s.filtered, "bad_examples": s.bad_examples}}
        tmp_record = self.tmp / "done.json"
        tmp_record.write_text(json.dumps(record, indent=1))
        os.replace(tmp_record, done_path(self.base))
        shutil.rmtree(self.tmp, ignore_errors=True)
        return record

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)
