"""Packed documents with and without the document mask: held-out loss per document for global,
local and linear models (issue 18).

The main job's corpus (the standard library documentation, its BPE tokenizer, as `megalong demo`
makes them) has long documents (median ~2300 tokens), so samples of a CPU-sized length would hold
about one document each. Here each document is cut at blank lines into sections of at least
`--section-chars` characters, shuffled (the held-out split's neighbours are unrelated too) and
packed end to end by megatron's GPTDataset: a sample of `--seq-length` tokens holds several
unrelated sections, as pretraining samples hold several unrelated documents at long context.

Per kind, two models train for the same steps from the same seed, differing only in
`data.document_mask` (and `data.reset_position_ids` with it): one sees the sections before a
section's start, the other only its own section. Both are scored on the same held-out windows:
- "packed": each model as it trained (the masked one with the mask);
- "alone": with the mask at evaluation, i.e. every section scored as if it were run alone (the
  document tests prove the two equal).
Per document: the mean loss of its tokens (the target after an EOD, a next document's first token,
is not scored), averaged over documents; and the same over each document's first 16 targets, where
the context before the boundary matters most.

    python bench/document_mask.py --workdir /tmp/docmask-bench --steps 150
"""
from __future__ import annotations

import argparse
import io
import json
import random
import re
import time
from pathlib import Path

KINDS = {"global": ['model.attention_layers=[[["global"], 2]]'],
         "local": ['model.attention_layers=[[["local"], 2]]', "model.attention.local.window=32"],
         "linear": ['model.attention_layers=[[["linear"], 2]]']}
HEAD = 16  # a document's first targets, scored apart


def write_sections(corpus: Path, out: Path, min_chars: int) -> int:
    """The corpus's documents cut at blank lines into sections of at least min_chars characters."""
    import zstandard

    sections = []
    with corpus.open("rb") as raw:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8"):
            text, piece = json.loads(line)["text"], ""
            for paragraph in re.split(r"\n\s*\n", text):
                piece = f"{piece}\n\n{paragraph}" if piece else paragraph
                if len(piece) >= min_chars:
                    sections.append(piece)
                    piece = ""
            if piece:
                sections.append(piece)
    random.Random(0).shuffle(sections)  # held-out neighbours unrelated too, not one module's sections
    with out.open("wb") as f, zstandard.ZstdCompressor().stream_writer(f) as z:
        for text in sections:
            z.write((json.dumps({"text": text}) + "\n").encode())
    return len(sections)


def document_losses(model, stream, seq_length: int, eod: int, masked: bool,
                    batch_size: int = 8) -> tuple[float, float, int]:
    """(mean over documents of their mean target loss, the same over their first HEAD targets,
    documents) on `stream` cut into windows of seq_length + 1 tokens."""
    import torch

    from megalong.train.documents import DocumentBatching, model_inputs

    documents = DocumentBatching(eod, document_mask=masked, reset_position_ids=masked)
    windows = len(stream) // (seq_length + 1)
    tokens = torch.from_numpy(stream[:windows * (seq_length + 1)].copy()).view(windows, seq_length + 1)
    means, heads = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, windows, batch_size):
            chunk = tokens[start:start + batch_size]
            batch = {"tokens": chunk[:, :-1], "labels": chunk[:, 1:], "loss_mask": torch.ones(len(chunk), seq_length)}
            batch = documents.apply(batch)
            ids, positions, kwargs = model_inputs(batch)
            per_token = model(ids, positions, None, labels=batch["labels"], **kwargs).float()
            scored = ids != eod
            segment = torch.cumsum((ids == eod).long(), dim=1)  # EOD closes its document
            for row in range(len(chunk)):
                for s in segment[row].unique():
                    keep = (segment[row] == s) & scored[row]
                    if keep.any():
                        loss = per_token[row][keep]
                        means.append(float(loss.mean()))
                        heads.append(float(loss[:HEAD].mean()))
    return sum(means) / len(means), sum(heads) / len(heads), len(means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="docmask-bench")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--section-chars", type=int, default=400)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--kinds", nargs="*", default=list(KINDS))
    args = parser.parse_args()

    from megalong.cli import quiet_bench_logging

    quiet_bench_logging()
    from megalong.config import load_config
    from megalong.data.preprocess import PreprocessOptions, preprocess
    from megalong.demo import DEFAULT_CONFIG, demo_data
    from megalong.evaluate import held_out_tokens
    from megalong.generate import load_for_inference
    from megalong.parallel.distributed import shutdown
    from megalong.train.loop import train

    work = Path(args.workdir).resolve()
    corpus, tokenizer_prefix, data_prefix = demo_data(work)
    sections = work / "corpus" / "sections.jsonl.zst"
    prefix = work / "data" / "docs"
    if not Path(f"{prefix}.idx").is_file():
        print("sections:", write_sections(corpus, sections, args.section_chars), flush=True)
        preprocess(PreprocessOptions([str(sections)], str(prefix), f"{tokenizer_prefix}.model", workers=2))
    rows = {}
    for kind in args.kinds:
        for masked in (False, True):
            name = f"{kind}-{'mask' if masked else 'nomask'}"
            started = time.perf_counter()
            overrides = [f"data.tokenizer={tokenizer_prefix}.model", f"data.train=[{prefix}]",
                         f"data.seq_length={args.seq_length}", f"model.max_position_embeddings={args.seq_length}",
                         "model.num_layers=2", "model.hidden_size=128", *KINDS[kind],
                         f"data.document_mask={str(masked).lower()}", f"data.reset_position_ids={str(masked).lower()}",
                         f"train.train_steps={args.steps}", f"train.save_dir={work / name}", "train.load=null",
                         f"train.micro_batch_size={args.batch_size}", f"train.global_batch_size={args.batch_size}",
                         "train.seed=1234", f"train.warmup_steps={max(1, args.steps // 10)}",
                         "train.progress_bar=false", f"train.eval_interval={args.steps}",
                         f"train.log_interval={max(1, args.steps // 4)}"]
            try:
                result = train(load_config([DEFAULT_CONFIG], overrides))
            finally:
                shutdown()
            train_s = time.perf_counter() - started
            try:
                model, cfg, tokenizer = load_for_inference(result.checkpoint)
                stream = held_out_tokens(str(prefix), cfg.data.split, "valid", args.eval_tokens)
                packed = document_losses(model, stream, args.seq_length, tokenizer.eod, masked)
                alone = document_losses(model, stream, args.seq_length, tokenizer.eod, True)
            finally:
                shutdown()
            rows[name] = {"train_loss": result.losses[max(result.losses)], "train_s": round(train_s),
                          "packed": packed[0], "packed_head": packed[1], "alone": alone[0],
                          "alone_head": alone[1], "documents": packed[2]}
            print(name, json.dumps(rows[name]), flush=True)

    print(f"\n| model | train loss | packed: loss/doc | first {HEAD} | alone: loss/doc | first {HEAD} | docs |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['train_loss']:.3f} | {r['packed']:.3f} | {r['packed_head']:.3f} | "
              f"{r['alone']:.3f} | {r['alone_head']:.3f} | {r['documents']} |")
    (work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
