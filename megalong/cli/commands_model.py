"""`megalong checkpoint convert`, `import`, `export`, `generate` and `eval`: their arguments here; torch,
megatron-core and transformers are imported only when a command runs."""
from __future__ import annotations

import argparse
import sys

from megalong.argtypes import int_at_least, non_negative_int, number_in, positive_int
from megalong.data.splits import SPLIT_NAMES

CHECKPOINT_HELP = "a step_* directory, or a save_dir (its newest checkpoint)"


def add_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="checkpoint tools (convert the old .pt format)")
    csub = p.add_subparsers(dest="checkpoint_command", required=True)
    p = csub.add_parser("convert", help="rewrite checkpoints of the old pickled .pt format as "
                                        "safetensors and JSON (once; for checkpoints you trust)")
    p.add_argument("src", help="a step_* directory, or a save_dir (all its old step directories)")
    p.add_argument("dst", nargs="?", default=None,
                   help="write a converted copy here instead of converting in place (must not exist)")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from megalong.checkpoint.convert import convert

    done = convert(args.src, args.dst)
    if not done:
        print(f"{args.src}: no checkpoint of the old .pt format there; nothing to convert")
    for step_dir in done:
        print(f"converted {step_dir}")
    return 0


def add_export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument("out_dir", help="the Hugging Face folder to write")
    parser.add_argument("--target", default="auto",
                        choices=("auto", "llama", "mistral", "qwen2", "gpt_neo", "mixtral", "megalong"),
                        help="the Hugging Face class to write (auto: the plainest stock class that "
                             "represents the model exactly; the log says why plainer ones do not fit)")


def add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="a Hugging Face model folder as a step-0 megalong checkpoint")
    p.add_argument("hf_dir", help="a local Hugging Face folder (config.json, *.safetensors)")
    p.add_argument("out_dir", help="the new save_dir to write (step_00000000/, megalong.yaml)")
    p.add_argument("--tokenizer", default=None,
                   help="the SentencePiece .model to train with (default: HF_DIR/tokenizer.model)")
    p.set_defaults(func=run_import, logging=True)


def run_import(args: argparse.Namespace) -> int:
    from megalong.hf_import.write import CONFIG_NAME, import_hf

    step_dir = import_hf(args.hf_dir, args.out_dir, args.tokenizer)
    print(f"imported {args.hf_dir} -> {step_dir}; edit {step_dir.parent / CONFIG_NAME} and train from it")
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to a Hugging Face folder")
    add_export_args(p)
    p.set_defaults(func=run_export, logging=True)


def run_export(args: argparse.Namespace) -> int:
    from megalong.export.hf import export_checkpoint

    export_checkpoint(args.checkpoint, args.out_dir, args.target)
    return 0


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=non_negative_int, default=50)
    p.add_argument("--temperature", type=number_in(0), default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=non_negative_int, default=40,
                   help="sample among the K most likely ids; 0 for all")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.set_defaults(func=run_generate, logging=True)


def run_generate(args: argparse.Namespace) -> int:
    from megalong.generate import generate, load_for_inference

    model, _, tokenizer = load_for_inference(args.checkpoint)
    prompt = tokenizer.encode(args.prompt)
    try:
        new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                       tokenizer.eod, tokenizer.vocab_size, args.seed)
    except ValueError as e:
        print(f"megalong: generate error: {e}", file=sys.stderr)
        return 2
    # Decoded together: SentencePiece drops the leading space of a text decoded on its own.
    print(tokenizer.decode(prompt + new))
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="held-out perplexity of a checkpoint at any sequence length")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--seq-length", type=int_at_least(2), action="append", required=True,
                   help="window length in tokens (repeatable; may exceed the training length)")
    p.add_argument("--tokens", type=positive_int, default=32768,
                   help="held-out tokens scored at every length")
    p.add_argument("--data", default=None, help=".bin/.idx prefix (default: the training data's)")
    p.add_argument("--split", default="valid", choices=SPLIT_NAMES, help="which split of data.split")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.set_defaults(func=run_eval, logging=True)


def run_eval(args: argparse.Namespace) -> int:
    """An EvalError is printed by main as `megalong: eval error: ...`."""
    from megalong.evaluate import evaluate_checkpoint

    results = evaluate_checkpoint(args.checkpoint, args.seq_length, args.tokens, args.data,
                                  args.split, args.batch_size)
    for r in results:
        print(f"seq_length {r.seq_length}: loss {r.loss:.4f}, perplexity {r.perplexity:.2f} "
              f"({r.tokens} tokens)")
    return 0
