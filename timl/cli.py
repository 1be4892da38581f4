"""The `timl` command: one subcommand per entry point. `python -m timl SUBCOMMAND` runs the same, which is how
launchers start it on every process: `accelerate launch -m timl train ...`, `torchrun -m timl train ...`."""

from __future__ import annotations

import importlib
import sys

# Subcommand -> module whose main(argv) runs it. Modules are imported only when asked for, so `timl --help` is quick.
SUBCOMMANDS = {
    "train": ("timl.train.pretrain", "pre-train a model on token shards (every flag of recipes/gpt2_c4.py)"),
    "tokenize": ("timl.data.tokenize", "turn a text dataset into token shards"),
    "plot": ("timl.report.plot", "draw PNG figures of runs from their metrics.jsonl"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:<10} {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
        print("usage: timl SUBCOMMAND [--help] [ARGS...]\n\nsubcommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\ntiml: unknown subcommand {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    if argv[0] == "train":
        # A bad or removed flag, a bad value and --help end here, before the training code imports torch (seconds).
        from timl.config.arguments import ModelArguments, TrainingArguments
        from timl.config.parsing import parse_args

        parse_args(ModelArguments, TrainingArguments, argv=argv[1:])
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
