"""megalong preprocess vs Megatron-LM's tools/preprocess_data.py: same input, same SentencePiece
model, same number of workers, one run each; wall time, MB/s and peak memory (RSS summed over the
process and its workers, sampled every 20 ms). Also checks that both wrote the same tokens.

    python bench/preprocess.py --megatron-lm /tmp/megatron-lm [--workers 2] [--vocab-size 8000]

Megatron-LM is a checkout of the version matching megatron-core (core_v0.16.1), outside this
repository; its script imports megatron.training, so it runs with PYTHONPATH=<checkout>.
The input is the standard library's documentation (megalong's embedded corpus) followed by the
standard library's .py files, one document each, as plain .jsonl (what Megatron's script reads);
CPU time is the sum over the processes of the tree (sampled), robust when the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_measured(cmd: list[str], env: dict) -> tuple[float, float, int, str]:
    """(wall seconds, CPU seconds, peak summed PSS bytes, output) of a command and all its
    children. PSS (proportional set size) shares the pages that forked workers share, where a sum
    of RSS would count them once per process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    cpu_seen: dict[int, float] = {}  # the last CPU time seen of every process of the tree
    out_chunks: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()))
    reader.start()
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_full_info().pss for p in procs if p.is_running()))
            for p in procs:
                times = p.cpu_times()
                cpu_seen[p.pid] = times.user + times.system
        except psutil.Error:
            pass
        time.sleep(0.02)
    reader.join()
    wall = time.perf_counter() - started
    cpu = sum(cpu_seen.values())
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(out_chunks)[-3000:]}")
    return wall, cpu, peak, "".join(out_chunks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-lm", required=True, help="Megatron-LM checkout (core_v0.16.1)")
    parser.add_argument("--workdir", default="/tmp/megalong-bench-preprocess")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--mb", type=float, default=40.0,
                        help="input size: the stdlib docs, then the stdlib's .py files as documents")
    args = parser.parse_args()

    from megalong.data.corpus import iter_documents
    from megalong.data.stdlib_corpus import build_stdlib_corpus
    from megalong.data.tokenizer_training import train_sentencepiece

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus, jsonl, model = work / "stdlib.jsonl.zst", work / "input.jsonl", work / "spm.model"
    if not jsonl.exists():
        build_stdlib_corpus(corpus)
        import sysconfig

        with open(jsonl, "w") as f:
            for doc in iter_documents([str(corpus)]):
                f.write(json.dumps({"text": str(doc)}) + "\n")
            # More real text, none of it repeated: the standard library's own source files, in
            # sorted order, up to --mb or the first file under site-packages.
            for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
                if f.tell() > args.mb * 1e6 or "site-packages" in path.parts:
                    break
                try:
                    f.write(json.dumps({"text": path.read_text(encoding="utf-8")}) + "\n")
                except (UnicodeDecodeError, OSError):
                    continue
    if not model.exists():
        train_sentencepiece([str(corpus)], str(work / "spm"), vocab_size=args.vocab_size)
    size = jsonl.stat().st_size
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    mlm_prefix = work / "megatron"
    mlm_cmd = [sys.executable, str(Path(args.megatron_lm) / "tools" / "preprocess_data.py"), "--input", str(jsonl),
               "--output-prefix", str(mlm_prefix), "--tokenizer-type", "SentencePieceTokenizer",
               "--tokenizer-model", str(model), "--workers", str(args.workers), "--append-eod",
               "--log-interval", "100"]
    ours_prefix = work / "megalong"
    ours_cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(jsonl), "--output-prefix",
                str(ours_prefix), "--tokenizer-model", str(model), "--workers", str(args.workers),
                "--no-resume", "--log-interval", "1000"]
    results = {}
    for name, cmd, extra in (("Megatron-LM tools/preprocess_data.py", mlm_cmd, {"PYTHONPATH": args.megatron_lm}),
                             ("megalong preprocess", ours_cmd, {"PYTHONPATH": str(REPO)})):
        wall, cpu, peak, out = run_measured(cmd, {**env, **extra})
        results[name] = (wall, cpu, peak, out)
        print(f"{name}: {wall:.1f} s wall, {size / 1e6 / wall:.2f} MB/s (input {size / 1e6:.1f} MB, "
              f"startup included), {cpu:.1f} CPU s (all processes), peak memory {peak / 2**20:.0f} MiB "
              f"(PSS summed over the processes)", flush=True)
        rates = re.findall(r"([0-9.]+) MB/s", out)
        if rates:
            print(f"    the tool's own last MB/s figure (processing only): {rates[-1]}")

    # Same tokens? Megatron drops empty documents, megalong keeps them as a lone EOD by default.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    theirs = IndexedDataset(f"{mlm_prefix}_text_document")
    ours = IndexedDataset(str(ours_prefix))
    kept = [ours[i] for i in range(len(ours)) if len(ours[i]) > 1]
    same = len(theirs) == len(kept) and all(
        np.array_equal(theirs[i].astype(np.int64), kept[i].astype(np.int64)) for i in range(len(kept)))
    print(f"documents: Megatron {len(theirs)}, megalong {len(ours)} ({len(ours) - len(kept)} empty); "
          f"same tokens, EOD included, empty documents aside: {same}")
    (t_wall, t_cpu, t_peak, _), (o_wall, o_cpu, o_peak, _) = results.values()
    print(f"megalong is {t_wall / o_wall:.2f}x faster in wall time and uses {t_cpu / o_cpu:.2f}x less CPU "
          f"time; peak memory {o_peak / 2**20:.0f} vs {t_peak / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
