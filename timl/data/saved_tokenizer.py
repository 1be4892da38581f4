"""The tokenizer travels with the data: `timl tokenize` saves it beside the shards, and a run finds it there.

    tokenizer = transformers_tokenizer(encoder)   # the encoder that made the shards, as a transformers tokenizer
    save_tokenizer(tokenizer, "data/mine")         # tokenizer.json + tokenizer_config.json, each file atomically
    find_tokenizer("data/mine/train_*.bin", None)  # AutoTokenizer.from_pretrained("data/mine"), or None

Every kind of `timl.data.encoders.TextEncoder` converts, except tiktoken BPEs that are not shaped like GPT-2's: tiktoken's
GPT-2 (`--encoding_name gpt2`, or its ranks in a `.tiktoken` file) and any `vocab.bpe` + `encoder.json` pair become a
transformers GPT-2 tokenizer built offline from those files; other tiktoken encodings (cl100k_base, o200k_base, ...)
have no offline transformers equivalent that timl can build, which is said in a warning. A converted tokenizer must
encode a probe text exactly as the encoder does, and name the encoder's end-of-text token as EOS, or it is not saved.
"""

from __future__ import annotations

import copy
import glob
import inspect
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from timl.checkpoint.durable import publish_file, temporary_directory
from timl.data.encoders import (TIKTOKEN_EOT, TextEncoder, TiktokenEncoder, TokenizersEncoder, TransformersEncoder,
                                gpt2_bpe_files, load_tiktoken_encoding)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# What save_pretrained writes for the tokenizers timl meets; a stale one from an earlier tokenizer is removed.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")
# Spaces, tabs, blank lines, CRLF, contractions, digits, accents, CJK and an emoji: where byte-level BPEs differ.
PROBE_TEXT = ("Hello world! It's 3.14159,  two  spaces,\n\n\ttabs;\r\nnaïve café 日本語 Ελληνικά 🙂 'quoted' "
              "\"x\"  trailing   ")


def transformers_tokenizer(encoder: TextEncoder) -> PreTrainedTokenizerBase | None:
    """The encoder as a transformers tokenizer with its end-of-text token as EOS (and as BOS where it has none),
    or None, with a warning saying why, when there is no faithful one."""
    if isinstance(encoder, TransformersEncoder):
        tokenizer = copy.deepcopy(encoder.tokenizer)
        tokenizer.eos_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(encoder.eot_id)
    elif isinstance(encoder, TokenizersEncoder):
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(encoder.tokenizer),
                                            eos_token=encoder.eot_token)
    elif isinstance(encoder, TiktokenEncoder):
        files = _gpt2_shaped_files(encoder)
        if files is None:
            warnings.warn(f"{encoder.name} has no offline transformers equivalent that timl can build (it does so for "
                          f"GPT-2-shaped BPEs: --encoding_name gpt2, or --bpe_files vocab.bpe encoder.json), so no "
                          f"tokenizer is saved beside the shards. Tokenize with --tokenizer_name to have one.",
                          stacklevel=2)
            return None
        tokenizer = gpt2_tokenizer(*files)
    else:
        warnings.warn(f"{encoder.name}: timl cannot convert a {type(encoder).__name__} to a transformers tokenizer.",
                      stacklevel=2)
        return None
    tokenizer.bos_token = tokenizer.bos_token or tokenizer.eos_token
    return _checked(tokenizer, encoder)


def gpt2_tokenizer(vocab_bpe: str | os.PathLike, encoder_json: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A transformers GPT-2 tokenizer from GPT-2's two BPE files, offline; <|endoftext|> is BOS, EOS and UNK."""
    from tokenizers.models import BPE
    from transformers import GPT2TokenizerFast

    if "vocab" in inspect.signature(GPT2TokenizerFast.__init__).parameters:  # transformers 5 takes the contents
        vocab, merges = BPE.read_file(str(encoder_json), str(vocab_bpe))
        return GPT2TokenizerFast(vocab=vocab, merges=merges)
    return GPT2TokenizerFast(vocab_file=str(encoder_json), merges_file=str(vocab_bpe))


def _gpt2_shaped_files(encoder: TiktokenEncoder) -> tuple[Path, Path] | None:
    """GPT-2-format files (vocab.bpe, encoder.json) that describe exactly this tiktoken encoding, if any."""
    from tiktoken_ext.openai_public import r50k_pat_str

    encoding = encoder.encoding
    if encoding._pat_str != r50k_pat_str or set(encoding._special_tokens) != {TIKTOKEN_EOT}:
        return None
    if encoder.data_gym_files is not None:
        return encoder.data_gym_files
    gpt2 = load_tiktoken_encoding("gpt2")
    same = encoding._mergeable_ranks == gpt2._mergeable_ranks and encoding._special_tokens == gpt2._special_tokens
    return gpt2_bpe_files() if same else None


def _checked(tokenizer: PreTrainedTokenizerBase, encoder: TextEncoder) -> PreTrainedTokenizerBase | None:
    expected = [int(token) for token in encoder.encode_batch([PROBE_TEXT])[0]]
    actual = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
    if actual == expected and eos == encoder.eot_id:
        return tokenizer
    problem = "encodes text differently" if actual != expected else f"has EOS id {eos}, not {encoder.eot_id}"
    warnings.warn(f"The transformers tokenizer built from {encoder.name} {problem}, so no tokenizer is saved beside "
                  f"the shards.", stacklevel=3)
    return None


def save_tokenizer(tokenizer: PreTrainedTokenizerBase | str | os.PathLike, directory: str | os.PathLike) -> list[Path]:
    """Writes a tokenizer's files (save_pretrained) into `directory`, each atomically (a temporary file, fsynced,
    renamed; tokenizer_config.json last), and removes tokenizer files an earlier tokenizer left there. `tokenizer` is
    a loaded tokenizer or a folder holding one. Returns the files written."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Inside the destination, so each rename stays on one filesystem; per process, as parallel tokenize jobs that
    # share a cache_dir each save the tokenizer.
    staging = temporary_directory(directory / "tokenizer", per_process=True)
    try:
        tokenizer.save_pretrained(staging)
        names = sorted((path.name for path in staging.iterdir()), key=lambda name: name == "tokenizer_config.json")
        for name in names:
            publish_file(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    remove_tokenizer_files(directory, keep=names)
    return [directory / name for name in names]


def remove_tokenizer_files(directory: str | os.PathLike, keep: Sequence[str] = ()) -> list[Path]:
    """Deletes the tokenizer files in `directory` but those named in `keep`; returns what it deleted."""
    removed = [Path(directory) / name for name in TOKENIZER_FILES if name not in keep]
    removed = [path for path in removed if path.is_file()]
    for path in removed:
        path.unlink()
    return removed


def find_tokenizer(train_file_pattern: str | Sequence[Any] | None,
                   tokenizer_name: str | None = None) -> PreTrainedTokenizerBase | None:
    """The tokenizer of a run's data: `tokenizer_name` (a Hub id or a folder) if given; else the one that `timl
    tokenize` saved in the folder of the training shards (of every source, for a mixture: a warning if they
    differ); else None."""
    from transformers import AutoTokenizer

    if tokenizer_name:
        return AutoTokenizer.from_pretrained(tokenizer_name)
    if train_file_pattern is None:
        return None
    from timl.data.sources import parse_sources  # here, not at the top: `timl tokenize` never needs torch

    folders: list[Path] = []
    for source in parse_sources(train_file_pattern, "--train_file_pattern"):
        for path in sorted(glob.glob(source.pattern)):
            folder = Path(path).parent
            if folder not in folders and any((folder / name).is_file() for name in TOKENIZER_FILES[:2]):
                folders.append(folder)
    if not folders:
        return None
    found = [AutoTokenizer.from_pretrained(folder) for folder in folders]
    differing = [str(folder) for folder, other in zip(folders[1:], found[1:]) if other.get_vocab() != found[0].get_vocab()]
    if differing:
        warnings.warn(f"The training sources' tokenizers differ ({', '.join(differing)} from {folders[0]}); using "
                      f"the one in {folders[0]}.", stacklevel=2)
    return found[0]
