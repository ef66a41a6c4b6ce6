"""`megalong preprocess`, `megalong tokenizer train` and `megalong data inspect|merge`: their
arguments, and the runs (the data modules are imported when a command runs; none of these
commands imports torch, megatron-core or transformers)."""
from __future__ import annotations

import argparse
import os

from megalong.argtypes import int_at_least, non_negative_int, number_in, positive_int
from megalong.data.preprocess_options import BAD_POLICIES, EMPTY_POLICIES, PreprocessOptions
from megalong.data.tokenizer_training import MODEL_TYPES, train_sentencepiece


def add_preprocess_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl/.jsonl.zst files or globs")
    parser.add_argument("--output-prefix", required=True,
                        help="one input: PREFIX.bin/.idx; several: PREFIX_<file name>.bin/.idx each")
    parser.add_argument("--tokenizer-model", required=True,
                        help="SentencePiece .model or Hugging Face tokenizer.json")
    parser.add_argument("--json-key", nargs="+", default=["text"],
                        help="the key(s) holding the document text; several are joined with --join-keys")
    parser.add_argument("--join-keys", default="\n\n", help="separator between several keys' texts")
    parser.add_argument("--workers", type=positive_int, default=max(1, min(8, (os.cpu_count() or 2))),
                        help="tokenizer processes (default: the CPU count, at most 8)")
    parser.add_argument("--no-append-eod", action="store_true", help="do not end documents with EOD")
    parser.add_argument("--eod-token", default=None,
                        help="tokenizer.json only: the end-of-document token (default: </s>, "
                             "<|endoftext|>, ... whichever the vocabulary has)")
    parser.add_argument("--on-bad-input", choices=BAD_POLICIES, default=None,
                        help="a line that is not UTF-8/JSON or lacks a key, a truncated .zst, a missing "
                             "file: stop with the file and line (default) or skip and count")
    parser.add_argument("--skip-bad-lines", action="store_true", help="the same as --on-bad-input skip")
    parser.add_argument("--empty-docs", choices=EMPTY_POLICIES, default="keep",
                        help="empty documents: keep (just EOD, default), skip and count, or stop")
    parser.add_argument("--subsets", nargs="+", default=None,
                        help="keep only documents whose meta.pile_set_name is one of these")
    parser.add_argument("--split-by-subset", action="store_true",
                        help="one dataset per meta.pile_set_name: <shard>_<subset>.bin/.idx")
    parser.add_argument("--normalize", choices=("nfkc", "ftfy"), default=None,
                        help="NFKC normalisation, or ftfy.fix_text (needs ftfy installed)")
    parser.add_argument("--no-resume", action="store_true",
                        help="redo every shard, also those recorded as done")
    parser.add_argument("--max-doc-chars", type=int_at_least(1000), default=1_000_000,
                        help="longer documents are tokenized in pieces of about this many characters")
    parser.add_argument("--log-interval", type=number_in(0, low_open=True), default=10.0,
                        help="seconds between progress lines")


def preprocess_options(args: argparse.Namespace) -> PreprocessOptions:
    return PreprocessOptions(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer_model=args.tokenizer_model,
        json_keys=args.json_key, join_keys=args.join_keys, workers=args.workers,
        append_eod=not args.no_append_eod, eod_token=args.eod_token,
        on_bad=args.on_bad_input or ("skip" if args.skip_bad_lines else "stop"),
        empty_docs=args.empty_docs, subsets=args.subsets, split_by_subset=args.split_by_subset,
        normalize=args.normalize, resume=not args.no_resume, max_doc_chars=args.max_doc_chars,
        log_interval=args.log_interval)


def run_preprocess(args: argparse.Namespace) -> int:
    """The events are logged (`log_event`): progress, skipped inputs, the summary."""
    from megalong.data.preprocess import preprocess
    from megalong.data.preprocess_events import log_event

    preprocess(preprocess_options(args), log_event)
    return 0


def add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="tokenize .jsonl/.jsonl.zst into megatron .bin/.idx")
    add_preprocess_args(p)
    p.set_defaults(func=run_preprocess, logging=True)


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl/.jsonl.zst files or globs")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model, .vocab, .settings.json")
    parser.add_argument("--vocab-size", type=int_at_least(260), required=True,
                        help="pieces (at least 260: byte fallback needs 256 plus the special ones)")
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument("--sample-docs", type=positive_int, default=50_000,
                        help="documents sampled uniformly across all files (default 50000)")
    parser.add_argument("--max-doc-chars", type=positive_int, default=20_000,
                        help="each sampled document is cut to this many characters (bounds memory)")
    parser.add_argument("--json-key", default="text", help="the key holding the document text")
    parser.add_argument("--on-bad-input", choices=("stop", "skip"), default=None,
                        help="a line that is not UTF-8/JSON/Unicode or lacks the key: stop with the "
                             "file and line (default) or skip and count it")
    parser.add_argument("--skip-bad-lines", action="store_true", help="the same as --on-bad-input skip")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the document sample")


def run_tokenizer_train(args: argparse.Namespace) -> int:
    skip = args.on_bad_input == "skip" or (args.on_bad_input is None and args.skip_bad_lines)
    train_sentencepiece(args.input, args.model_prefix, args.vocab_size, args.model_type,
                        args.sample_docs, args.json_key, args.max_doc_chars, args.seed, skip)
    return 0


def add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    tp = tsub.add_parser("train", help="train a SentencePiece tokenizer on a sample of a corpus")
    add_tokenizer_args(tp)
    tp.set_defaults(func=run_tokenizer_train, logging=True)


def add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="inspect or merge .bin/.idx datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("inspect", help="documents, tokens, length histogram and a decoded sample")
    p.add_argument("prefix", help="a .bin/.idx prefix")
    p.add_argument("--tokenizer-model", default=None,
                   help="to decode samples (default: the one recorded by preprocess)")
    p.add_argument("--samples", type=non_negative_int, default=1,
                   help="documents to show (spread over the dataset)")
    p.add_argument("--sample-tokens", type=positive_int, default=200, help="tokens shown per sample")
    p.set_defaults(func=run_inspect)
    p = dsub.add_parser("merge", help="concatenate .bin/.idx datasets into one")
    p.add_argument("--input", nargs="+", required=True, help="prefixes or globs of prefixes, in order")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.set_defaults(func=run_merge)


def run_inspect(args: argparse.Namespace) -> int:
    from megalong.data.inspect import inspect_dataset

    print(inspect_dataset(args.prefix, args.tokenizer_model, args.samples, args.sample_tokens))
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from megalong.config import ConfigError
    from megalong.data.indexed import expand_prefixes, merge

    prefixes = expand_prefixes(args.input)
    if not prefixes:
        raise ConfigError("--input: no datasets given")
    documents, tokens = merge(prefixes, args.output_prefix)
    print(f"merged {len(prefixes)} datasets: {documents} documents, {tokens} tokens -> "
          f"{args.output_prefix}.bin/.idx")
    return 0
