"""`timl tokenize`: turn a text dataset into token shards that timl's loader reads.

    timl tokenize --cache_dir data/gpt2_c4 --dataset_path allenai/c4 --dataset_name en --encoding_name gpt2 \\
        --max_file_index 1 --streaming true
    timl tokenize --cache_dir data/python_docs --dataset_path timl:python-docs --encoding_name gpt2 \\
        --validation_tokens 32768

Every document becomes the end-of-text token followed by its tokens, and the documents, in dataset order, form one
stream. With --dataset_path text, each file is one document, newlines and all (--sample_by paragraph or line cuts
files into smaller documents, as datasets' text builder does). The stream is cut into files
`{split}_{index:06d}.bin` of exactly --num_tokens_per_file tokens (the last one may be shorter), each in timl's
shard format and written atomically, so an interrupted run leaves only whole files.
With --validation_tokens N, the first documents, until they reach N tokens, go to `validation_*.bin` instead.

Tokenization runs in --num_proc worker processes, on batches of --chunksize documents, in order. The tokenizer is
saved into --cache_dir too, as a transformers tokenizer, so that `AutoTokenizer.from_pretrained(cache_dir)` decodes
the shards (see timl/data/saved_tokenizer.py for the tiktoken encodings that have no such equivalent).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from timl.data.corpus import PYTHON_DOCS, TEXT_KEY, python_docs_documents
from timl.data.encoders import TextEncoder, TokenizeError, encode_in_order, fits_dtype, load_encoder, tokenizer_choice_problem
from timl.data.saved_tokenizer import remove_tokenizer_files, save_tokenizer, transformers_tokenizer
from timl.data.shards import write_shard

VALIDATION_SPLIT = "validation"
PYTHON_DOCS_DIR = "data/python_docs"
PYTHON_DOCS_VALIDATION_TOKENS = 2**15


@dataclass
class TokenizeArguments:
    """The arguments of `timl tokenize`; each field is a command-line flag of the same name."""

    cache_dir: str = field(metadata={"help": "Folder to write the shards into (created if missing)."})
    dataset_path: str = field(
        metadata={
            "help": "A datasets Hub id or local folder; text, json, parquet or csv with --data_files; or "
            f"{PYTHON_DOCS} for the corpus bundled with Python (no download)."
        }
    )
    dataset_name: str | None = field(default=None, metadata={"help": "The dataset's configuration, e.g. en for allenai/c4."})
    dataset_split: str = field(default="train", metadata={"help": "The split to read, which also names the files."})
    dataset_text_key: str = field(default="text", metadata={"help": "The column that holds each document's text."})
    sample_by: Literal["document", "paragraph", "line"] = field(
        default="document",
        metadata={
            "help": "With --dataset_path text: one document per file, per paragraph (split at blank lines, which are "
            "dropped) or per line (newlines kept), as datasets' text builder's sample_by."
        },
    )
    data_files: list[str] | None = field(default=None, metadata={"help": "Local data files, with --dataset_path text, json, parquet or csv."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset instead of downloading it whole first."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "A transformers AutoTokenizer: Hub id or local folder. Its EOS token ends documents."})
    encoding_name: str | None = field(default=None, metadata={"help": "A tiktoken encoding, e.g. gpt2 (built from bundled files, no download) or cl100k_base."})
    bpe_files: list[str] | None = field(
        default=None,
        metadata={"help": "A tiktoken BPE from local files: GPT-2's vocab.bpe and encoder.json, or one .tiktoken ranks file."},
    )
    tokenizer_path: str | None = field(default=None, metadata={"help": "A tokenizers JSON file; --eot_token ends documents."})
    eot_token: str = field(default="<eot>", metadata={"help": "The end-of-text token of --tokenizer_path (or of a --tokenizer_name without EOS)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Let a --tokenizer_name from the Hub run its own code."})
    token_dtype: Literal["uint16", "uint32"] = field(default="uint16", metadata={"help": "Token dtype; uint16 holds vocabs of up to 65,536 ids."})
    num_tokens_per_file: int = field(default=2**27, metadata={"help": "Tokens in each file but the last."})
    min_file_index: int = field(default=0, metadata={"help": "Skip writing the files below this index, in each split (e.g. to resume)."})
    max_file_index: int | None = field(default=None, metadata={"help": "Stop after the --dataset_split file of this index."})
    validation_tokens: int = field(
        default=0,
        metadata={"help": "Send the first documents, until they reach this many tokens, to validation_*.bin; 0 for none."},
    )
    num_proc: int | None = field(default=None, metadata={"help": "Tokenizer processes; default: one per CPU core but one."})
    chunksize: int = field(default=1024, metadata={"help": "Documents per batch handed to a tokenizer process."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the shards that cache_dir already holds for these splits and file indices."})

    def __post_init__(self) -> None:
        problems = []
        tokenizer_problem = tokenizer_choice_problem(self.tokenizer_name, self.encoding_name, self.bpe_files, self.tokenizer_path)
        if tokenizer_problem:
            problems.append(tokenizer_problem)
        for flag in ("num_tokens_per_file", "chunksize", "num_proc"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                problems.append(f"--{flag} must be at least 1, not {value}.")
        for flag in ("min_file_index", "validation_tokens"):
            if getattr(self, flag) < 0:
                problems.append(f"--{flag} must not be negative, not {getattr(self, flag)}.")
        if self.max_file_index is not None and self.max_file_index < self.min_file_index:
            problems.append(f"--max_file_index {self.max_file_index} is below --min_file_index {self.min_file_index}.")
        if self.validation_tokens and self.dataset_split == VALIDATION_SPLIT:
            problems.append(f"--validation_tokens writes {VALIDATION_SPLIT}_*.bin, which --dataset_split {VALIDATION_SPLIT} also names.")
        if self.sample_by != "document" and self.dataset_path != "text":
            problems.append(f"--sample_by {self.sample_by} applies only to --dataset_path text.")
        if self.dataset_path == PYTHON_DOCS and self.data_files:
            problems.append(f"--data_files does not apply to --dataset_path {PYTHON_DOCS}.")
        local_files = {
            "data_files": self.data_files or [],
            "bpe_files": self.bpe_files or [],
            "tokenizer_path": [self.tokenizer_path] if self.tokenizer_path else [],
        }
        for flag, paths in local_files.items():
            for path in paths:
                if not any(char in path for char in "*?[") and "://" not in path and not Path(path).exists():
                    problems.append(f"--{flag} {path} does not exist.")
        if problems:
            raise TokenizeError(" ".join(problems))

    @property
    def splits(self) -> list[str]:
        """The splits this run writes, in stream order."""
        return [VALIDATION_SPLIT, self.dataset_split] if self.validation_tokens else [self.dataset_split]

    @property
    def processes(self) -> int:
        # Like the original timl, leave one core free for the process that reads the data and writes the files.
        return self.num_proc or max(1, (os.cpu_count() or 1) - 1)


@dataclass
class TokenizeSummary:
    """What a run did: documents and tokens it read, files it wrote, and how long it took."""

    documents: int = 0
    tokens: int = 0
    tokens_written: int = 0  # fewer than tokens when --min_file_index or --max_file_index leave files out
    validation_tokens: int = 0
    longest_validation_document: int = 0  # in tokens, end-of-text included
    tokenizer_files: list[Path] = field(default_factory=list)
    skipped_rows: int = 0  # rows whose text was not a string (e.g. None)
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0  # the whole run, loading the tokenizer and the dataset included
    tokenize_seconds: float = 0.0  # from the first batch tokenized to the last file written

    def __str__(self) -> str:
        skipped = f" ({self.skipped_rows:,} rows without text skipped)" if self.skipped_rows else ""
        written = f" ({self.tokens_written:,} written)" if self.tokens_written != self.tokens else ""
        splits = Counter(path.name.rsplit("_", 1)[0] for path in self.files)
        per_split = f" ({', '.join(f'{count} {split}' for split, count in splits.items())})" if len(splits) > 1 else ""
        return (
            f"timl tokenize: {self.documents:,} documents{skipped}, {self.tokens:,} tokens{written}, "
            f"{len(self.files)} files{per_split}, {self.seconds:.1f} s "
            f"({self.tokens / max(self.tokenize_seconds, 1e-9):,.0f} tokens/s while tokenizing)"
            + ("; tokenizer saved beside them" if self.tokenizer_files else "")
        )


def tokenize_dataset(args: TokenizeArguments) -> TokenizeSummary:
    """Runs `timl tokenize`. Every check on the input runs before the first document is tokenized or file written."""
    start = time.perf_counter()
    cache_dir = Path(args.cache_dir)
    existing = existing_shards(cache_dir, args.splits, args.min_file_index, args.max_file_index)
    if existing and not args.overwrite:
        names = ", ".join(path.name for path in existing[:5]) + (", ..." if len(existing) > 5 else "")
        raise TokenizeError(
            f"--cache_dir {cache_dir} already holds {len(existing)} shards that this run would write ({names}). "
            f"Pass --overwrite to replace them, or choose another --cache_dir."
        )
    encoder = _load_encoder(args)
    tokenizer = transformers_tokenizer(encoder)  # before any work: a tokenizer that cannot be saved is said at once
    batches = _text_batches(args)
    for path in existing:
        path.unlink()
    cache_dir.mkdir(parents=True, exist_ok=True)

    summary = TokenizeSummary()
    tokenize_start = time.perf_counter()
    writers = [_ShardWriter(cache_dir, split, args) for split in args.splits]
    encoded = encode_in_order(encoder, batches, np.dtype(args.token_dtype), args.processes)
    with contextlib.closing(encoded), tqdm(desc="tokenize", unit="tok", unit_scale=True, dynamic_ncols=True) as bar:
        for tokens, document_lengths, rows in encoded:
            summary.documents += len(document_lengths)
            summary.tokens += len(tokens)
            summary.skipped_rows += rows - len(document_lengths)
            longest = _route(tokens, document_lengths, writers, args.validation_tokens)
            summary.longest_validation_document = max(summary.longest_validation_document, longest)
            documents_per_second = summary.documents / (time.perf_counter() - tokenize_start)
            bar.set_postfix_str(f"{documents_per_second:,.0f} docs/s, file {writers[-1].index}", refresh=False)
            bar.update(len(tokens))  # the bar's own rate is tokens/s
            if writers[-1].finished:
                break
    # Only a run that read all its input writes its last, short file: an interrupted one leaves whole files only.
    for writer in writers:
        writer.close()
        summary.files.extend(writer.written)
        summary.tokens_written += writer.tokens_written
    if tokenizer is not None:
        summary.tokenizer_files = save_tokenizer(tokenizer, cache_dir)
    else:
        remove_tokenizer_files(cache_dir)  # an earlier run's tokenizer would not describe these shards
    summary.validation_tokens = writers[0].tokens if args.validation_tokens else 0
    _warn_about_validation(summary, args.validation_tokens)
    summary.tokenize_seconds = time.perf_counter() - tokenize_start
    summary.seconds = time.perf_counter() - start
    return summary


def _warn_about_validation(summary: TokenizeSummary, asked: int) -> None:
    if not asked:
        return
    if summary.validation_tokens > summary.tokens / 2:
        warnings.warn(f"--validation_tokens {asked:,} sent {summary.validation_tokens:,} of the {summary.tokens:,} "
                      f"tokens, more than half of the data, to {VALIDATION_SPLIT}_*.bin.", stacklevel=3)
    if summary.longest_validation_document > asked:
        warnings.warn(f"One document alone has {summary.longest_validation_document:,} tokens, more than "
                      f"--validation_tokens {asked:,}: the {VALIDATION_SPLIT} split takes whole documents, so it holds "
                      f"{summary.validation_tokens:,} tokens.", stacklevel=3)


def prepare_python_docs(cache_dir: str | os.PathLike = PYTHON_DOCS_DIR, num_proc: int | None = None) -> tuple[str, str]:
    """Makes GPT-2 shards of the corpus bundled with Python, unless `cache_dir` holds them already.

    Returns the glob patterns of the train and validation shards. The equivalent command is
    `timl tokenize --dataset_path timl:python-docs --cache_dir data/python_docs --encoding_name gpt2 --validation_tokens 32768`.
    """
    cache_dir = Path(cache_dir)
    patterns = (str(cache_dir / "train_*.bin"), str(cache_dir / f"{VALIDATION_SPLIT}_*.bin"))
    if all(existing_shards(cache_dir, [split], 0, None) for split in ("train", VALIDATION_SPLIT)):
        return patterns
    args = TokenizeArguments(
        cache_dir=str(cache_dir),
        dataset_path=PYTHON_DOCS,
        encoding_name="gpt2",
        validation_tokens=PYTHON_DOCS_VALIDATION_TOKENS,
        num_proc=num_proc,
        chunksize=32,  # the corpus is only ~600 documents: small batches keep every process busy
        overwrite=True,  # the folder holds only part of a previous run's shards
    )
    print(tokenize_dataset(args))
    return patterns


def existing_shards(cache_dir: Path, splits: Iterable[str], min_index: int, max_index: int | None) -> list[Path]:
    """The shards of these splits in cache_dir whose index lies in [min_index, max_index]."""
    if not cache_dir.is_dir():
        return []
    found = []
    for split in splits:
        name = re.compile(rf"{re.escape(split)}_(\d+)\.bin")
        for path in sorted(cache_dir.iterdir()):
            match = name.fullmatch(path.name)
            if match and min_index <= int(match[1]) and (max_index is None or int(match[1]) <= max_index):
                found.append(path)
    return found


def _load_encoder(args: TokenizeArguments) -> TextEncoder:
    encoder = load_encoder(
        tokenizer_name=args.tokenizer_name,
        encoding_name=args.encoding_name,
        bpe_files=args.bpe_files,
        tokenizer_path=args.tokenizer_path,
        eot_token=args.eot_token,
        trust_remote_code=args.trust_remote_code,
    )
    if not fits_dtype(encoder.vocab_size, args.token_dtype):
        raise TokenizeError(
            f"--token_dtype {args.token_dtype} holds ids below {np.iinfo(args.token_dtype).max + 1:,}, but {encoder.name} "
            f"has a vocab of {encoder.vocab_size:,} ids: pass --token_dtype uint32."
        )
    return encoder


def _text_batches(args: TokenizeArguments) -> Iterator[list]:
    """Batches of --chunksize texts. Reads the first batch now, to reject an empty dataset or a missing text key."""
    key = args.dataset_text_key
    columns = _column_batches(args)
    first = next(columns, None)
    if first is None:
        raise TokenizeError(f"--dataset_path {args.dataset_path}: the dataset{_described(args)} is empty.")
    if key not in first:
        raise TokenizeError(
            f"--dataset_text_key {key}: the dataset{_described(args)} has no column {key!r}; its columns are {', '.join(first)}."
        )
    if not any(isinstance(text, str) for text in first[key]):
        kinds = ", ".join(sorted({type(text).__name__ for text in first[key]}))
        raise TokenizeError(f"--dataset_text_key {key}: the column holds {kinds} values, not text.")
    return (batch[key] for batch in itertools.chain([first], columns))


def _column_batches(args: TokenizeArguments) -> Iterator[dict[str, list]]:
    if args.dataset_path == PYTHON_DOCS:
        documents = python_docs_documents()
        for start in range(0, len(documents), args.chunksize):
            yield {TEXT_KEY: documents[start : start + args.chunksize]}
        return
    import datasets

    # A file is one document, newlines kept, unless --sample_by cuts it smaller (datasets' default is one per line,
    # without newlines).
    text_options = {"sample_by": args.sample_by, "keep_linebreaks": True} if args.dataset_path == "text" else {}
    try:
        dataset = datasets.load_dataset(
            args.dataset_path,
            name=args.dataset_name,
            split=args.dataset_split,
            data_files=args.data_files,
            streaming=args.streaming,
            num_proc=args.processes if args.processes > 1 and not args.streaming else None,
            **text_options,
        )
    except StopIteration:  # what datasets' json builder raises for files without a single row: an empty dataset
        return
    except Exception as error:  # datasets raises many kinds; all mean the same thing to the user
        raise TokenizeError(f"--dataset_path {args.dataset_path}: could not load the dataset{_described(args)}: {error}") from error
    if dataset.column_names and args.dataset_text_key in dataset.column_names:
        # Converting only the text column out of Arrow saves what the others (urls, dates, ...) would cost.
        dataset = dataset.select_columns([args.dataset_text_key])
    yield from dataset.iter(batch_size=args.chunksize)


def _described(args: TokenizeArguments) -> str:
    name = f" --dataset_name {args.dataset_name}" if args.dataset_name else ""
    return f" ({args.dataset_path}{name}, split {args.dataset_split})"


def _route(tokens: np.ndarray, document_lengths: np.ndarray, writers: list[_ShardWriter], validation_tokens: int) -> int:
    """Sends whole documents to the validation writer until it has validation_tokens tokens, the rest to the last
    writer. Returns the length of the longest document sent to validation (0 if none)."""
    cut, longest = 0, 0
    if len(writers) > 1 and writers[0].tokens < validation_tokens:
        starts = np.cumsum(document_lengths) - document_lengths
        documents = int(np.searchsorted(starts, validation_tokens - writers[0].tokens))
        cut = int(starts[documents]) if documents < len(starts) else len(tokens)
        longest = int(document_lengths[:documents].max(initial=0))
        writers[0].add(tokens[:cut])
    writers[-1].add(tokens[cut:])
    return longest


class _ShardWriter:
    """Cuts one split's token stream into files of exactly num_tokens_per_file tokens; writes those in the index range."""

    def __init__(self, cache_dir: Path, split: str, args: TokenizeArguments):
        self.cache_dir, self.split = cache_dir, split
        self.min_index, self.max_index = args.min_file_index, args.max_file_index
        # np.empty only reserves memory; pages are touched as tokens arrive, so a small dataset costs little.
        self.buffer = np.empty(args.num_tokens_per_file, dtype=args.token_dtype)
        self.index = 0
        self.filled = 0
        self.tokens = 0
        self.tokens_written = 0
        self.written: list[Path] = []

    @property
    def finished(self) -> bool:
        return self.max_index is not None and self.index > self.max_index

    def add(self, tokens: np.ndarray) -> None:
        self.tokens += len(tokens)
        while len(tokens) and not self.finished:
            take = min(len(tokens), len(self.buffer) - self.filled)
            if self.index >= self.min_index:  # files below min_file_index are counted, never copied
                self.buffer[self.filled : self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == len(self.buffer):
                self._end_file()

    def close(self) -> None:
        if self.filled and not self.finished:
            self._end_file()

    def _end_file(self) -> None:
        if self.index >= self.min_index:
            path = self.cache_dir / f"{self.split}_{self.index:06d}.bin"
            write_shard(path, self.buffer[: self.filled])
            self.written.append(path)
            self.tokens_written += self.filled
        self.index += 1
        self.filled = 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default, and the module docstring's example command as written."""


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TokenizeArguments, prog="timl tokenize", description=__doc__, formatter_class=_HelpFormatter)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
        summary = tokenize_dataset(args)
    except TokenizeError as error:
        print(f"timl tokenize: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ntiml tokenize: interrupted; the shards written so far are whole (--min_file_index resumes)", file=sys.stderr)
        return 130
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
