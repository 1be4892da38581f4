"""Tests of `timl tokenize`: real data files in tmp_path, real worker processes, a real SIGKILL."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from timl.data.corpus import help_topic_documents, module_docstring_documents
from timl.data.encoders import gpt2_bpe_files, load_tiktoken_encoding
from timl.data.shards import list_shards, read_header, write_shard
from timl.data.tokenize import (
                                PYTHON_DOCS_VALIDATION_TOKENS,
                                TokenizeArguments,
                                TokenizeError,
                                TokenizeSummary,
                                main,
                                prepare_python_docs,
                                tokenize_dataset,
                                )

GPT2_EOT = 50256
TOKENS_PER_FILE = 64


def _documents() -> list[str]:
    words = "the quick brown fox jumps over a lazy dog while naïve cafés serve 日本語 text, tabs\tand\nnewlines".split(" ")
    rng = random.Random(1)
    documents = [" ".join(rng.choices(words, k=rng.randint(1, 40))) for _ in range(40)]
    # An empty document, special-token text (ordinary text to the tokenizer) and one document longer than a file.
    documents[5], documents[9] = "", "a literal <|endoftext|> is just text"
    documents[20] = " ".join(rng.choices(words, k=300))
    return documents


DOCUMENTS = _documents()


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp_path(tmp_path, monkeypatch):
    # load_dataset caches Arrow files of local data too; keep them out of the home folder.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


@pytest.fixture(scope="module")
def gpt2():
    return load_tiktoken_encoding("gpt2")


def write_jsonl(path: Path, rows: list, key: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({key: row}) + "\n" for row in rows), encoding="utf-8")
    return path


def arguments(tmp_path: Path, name: str = "shards", documents: list = DOCUMENTS, **overrides) -> dict:
    """The arguments of a run over `documents` as a local json file, writing into tmp_path / name."""
    values = {
        "cache_dir": str(tmp_path / name),
        "dataset_path": "json",
        "data_files": [str(write_jsonl(tmp_path / "data" / f"{name}.jsonl", documents))],
        "encoding_name": "gpt2",
        "num_tokens_per_file": TOKENS_PER_FILE,
        "num_proc": 1,
        "chunksize": 4,
    }
    return values | overrides


def run(tmp_path: Path, name: str = "shards", documents: list = DOCUMENTS, **overrides) -> TokenizeSummary:
    return tokenize_dataset(TokenizeArguments(**arguments(tmp_path, name, documents, **overrides)))


def as_argv(values: dict) -> list[str]:
    argv = []
    for flag, value in values.items():
        argv += [f"--{flag}", *map(str, value)] if isinstance(value, list) else [f"--{flag}", str(value)]
    return argv


def read_split(cache_dir: Path, split: str = "train") -> tuple[list[int], list[int]]:
    """A split's tokens as one stream, and the number of tokens in each of its files."""
    shards = list_shards(cache_dir / f"{split}_*.bin")
    return np.concatenate([shard.memmap() for shard in shards]).tolist(), [shard.num_values for shard in shards]


def expected_stream(encode, eot: int, documents: list) -> list[int]:
    return [token for document in documents for token in [eot, *encode(document)]]


def test_gpt2_bpe_is_built_offline_from_the_bundled_files(monkeypatch):
    def no_network(*args):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    encoding = load_tiktoken_encoding("gpt2")
    assert encoding.encode_ordinary("Hello world") == [15496, 995]
    assert (encoding.eot_token, encoding.n_vocab) == (GPT2_EOT, 50257)
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [GPT2_EOT]
    from tiktoken_ext.openai_public import r50k_pat_str

    assert encoding._pat_str == r50k_pat_str


def test_shards_hold_the_documents_in_order_with_exact_file_boundaries(tmp_path, gpt2, capsys):
    rows = DOCUMENTS[:7] + [None] + DOCUMENTS[7:]  # a row without text is skipped
    values = arguments(tmp_path, documents=rows, num_proc=2, chunksize=3)
    assert main(as_argv(values)) == 0

    stream, sizes = read_split(tmp_path / "shards")
    assert stream == expected_stream(gpt2.encode_ordinary, GPT2_EOT, DOCUMENTS)
    assert gpt2.decode(stream) == "".join("<|endoftext|>" + document for document in DOCUMENTS)
    assert len(sizes) >= 3 and sizes[:-1] == [TOKENS_PER_FILE] * (len(sizes) - 1) and 0 < sizes[-1] <= TOKENS_PER_FILE
    names = sorted(path.name for path in (tmp_path / "shards").iterdir())
    assert names == sorted([f"train_{index:06d}.bin" for index in range(len(sizes))] + ["tokenizer.json", "tokenizer_config.json"])
    summary = capsys.readouterr().out
    assert f"{len(DOCUMENTS)} documents (1 rows without text skipped), {len(stream):,} tokens, {len(sizes)} files" in summary


def _data_gym_files(tmp_path, gpt2):
    folder = tmp_path / "gpt2_files"
    folder.mkdir()
    files = [shutil.copy(path, folder) for path in gpt2_bpe_files()]
    return {"encoding_name": None, "bpe_files": files}, gpt2.encode_ordinary, GPT2_EOT


def _write_tiktoken_file(path: Path, gpt2) -> str:
    ranks = sorted(gpt2._mergeable_ranks.items(), key=lambda item: item[1])
    path.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks))
    return str(path)


def _tiktoken_file(tmp_path, gpt2):
    return {"encoding_name": None, "bpe_files": [_write_tiktoken_file(tmp_path / "my_bpe.tiktoken", gpt2)]}, gpt2.encode_ordinary, GPT2_EOT


def _tiktoken_file_of_a_named_encoding(tmp_path, gpt2):
    # r50k_base is GPT-2's BPE under another name: its definition supplies the regex and <|endoftext|> = 50256.
    files = [_write_tiktoken_file(tmp_path / "ranks.tiktoken", gpt2)]
    return {"encoding_name": "r50k_base", "bpe_files": files}, gpt2.encode_ordinary, GPT2_EOT


def _tiny_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eot>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(DOCUMENTS, trainer)
    return tokenizer


def _tokenizers_json(tmp_path, gpt2):
    tokenizer = _tiny_bpe()
    tokenizer.save(str(tmp_path / "tokenizer.json"))

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False).ids

    return {"encoding_name": None, "tokenizer_path": str(tmp_path / "tokenizer.json")}, encode, tokenizer.token_to_id("<eot>")


def _transformers_folder(tmp_path, gpt2):
    from transformers import PreTrainedTokenizerFast

    tokenizer = _tiny_bpe()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eot>").save_pretrained(tmp_path / "hf_tokenizer")

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False).ids

    return {"encoding_name": None, "tokenizer_name": str(tmp_path / "hf_tokenizer")}, encode, tokenizer.token_to_id("<eot>")


TOKENIZER_KINDS = {
    "vocab.bpe+encoder.json": _data_gym_files,
    ".tiktoken": _tiktoken_file,
    ".tiktoken+encoding_name": _tiktoken_file_of_a_named_encoding,
    "tokenizers json": _tokenizers_json,
    "transformers folder": _transformers_folder,
}


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_each_tokenizer_kind_writes_its_tokens(tmp_path, gpt2, kind):
    overrides, encode, eot = TOKENIZER_KINDS[kind](tmp_path, gpt2)
    run(tmp_path, num_proc=2, chunksize=5, **overrides)
    stream, _ = read_split(tmp_path / "shards")
    assert stream == expected_stream(encode, eot, DOCUMENTS)


def test_a_vocab_too_large_for_the_token_dtype_is_rejected_before_any_work(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{index}": index for index in range(70_000)} | {"<eot>": 70_000}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "big.json"))
    overrides = {"encoding_name": None, "tokenizer_path": str(tmp_path / "big.json")}

    with pytest.raises(TokenizeError, match=r"--token_dtype uint16 holds ids below 65,536, .* 70,001 ids: pass --token_dtype uint32"):
        run(tmp_path, **overrides)
    assert not (tmp_path / "shards").exists()
    run(tmp_path, token_dtype="uint32", **overrides)
    assert read_header(tmp_path / "shards" / "train_000000.bin").dtype == np.uint32


def test_a_tokenizer_that_cannot_serve_is_named_with_the_fix(tmp_path):
    with pytest.raises(TokenizeError, match=r"--encoding_name gpt5: unknown; tiktoken knows .*gpt2"):
        run(tmp_path, encoding_name="gpt5")
    _tiny_bpe().save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizeError, match=r"has no '<\|end\|>' token; pass its end-of-text token with --eot_token"):
        run(tmp_path, encoding_name=None, tokenizer_path=str(tmp_path / "tokenizer.json"), eot_token="<|end|>")
    assert not (tmp_path / "shards").exists()


def test_a_missing_text_key_names_the_key_and_the_columns(tmp_path):
    values = arguments(tmp_path) | {"data_files": [str(write_jsonl(tmp_path / "content.jsonl", DOCUMENTS, key="content"))]}
    with pytest.raises(TokenizeError, match=r"--dataset_text_key text: .* has no column 'text'; its columns are content\."):
        tokenize_dataset(TokenizeArguments(**values))
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_an_empty_dataset_is_rejected_before_any_work(tmp_path, streaming):
    with pytest.raises(TokenizeError, match=r"--dataset_path json: the dataset \(json, split train\) is empty\."):
        run(tmp_path, documents=[], streaming=streaming)
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize(
    ("tokenizer_flags", "message"),
    [
        ([], "no tokenizer given: pass one of --tokenizer_name, --encoding_name"),
        (["--encoding_name", "gpt2", "--tokenizer_name", "gpt2"], "more than one tokenizer given (--tokenizer_name, --encoding_name/--bpe_files)"),
    ],
)
def test_no_tokenizer_or_more_than_one_is_rejected(tmp_path, capsys, tokenizer_flags, message):
    values = arguments(tmp_path)
    del values["encoding_name"]
    assert main(as_argv(values) + tokenizer_flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()


def test_a_cache_dir_with_shards_is_refused_unless_overwrite(tmp_path):
    first = run(tmp_path)
    stale = tmp_path / "shards" / "train_000099.bin"  # a leftover of some longer, older run
    write_shard(stale, np.zeros(3, dtype=np.uint16))
    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "shards").iterdir()}

    with pytest.raises(TokenizeError, match=rf"--cache_dir .*shards already holds {len(first.files) + 1} shards .* Pass --overwrite"):
        run(tmp_path)
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "shards").iterdir()} == before

    second = run(tmp_path, overwrite=True)
    assert not stale.exists() and sorted((tmp_path / "shards").iterdir()) == sorted(second.files + second.tokenizer_files)


def test_min_and_max_file_index_write_only_the_files_in_range(tmp_path):
    full = run(tmp_path, name="full")
    part = run(tmp_path, name="part", min_file_index=1, max_file_index=2)
    assert [path.name for path in part.files] == ["train_000001.bin", "train_000002.bin"]
    for path in part.files:
        assert path.read_bytes() == (tmp_path / "full" / path.name).read_bytes()
    assert part.tokens_written == 2 * TOKENS_PER_FILE < part.tokens <= full.tokens
    # Stopping after the file of max_file_index reads no further than that file needs.
    first_only = run(tmp_path, name="first", max_file_index=0)
    assert [path.name for path in first_only.files] == ["train_000000.bin"] and first_only.tokens < full.tokens


def test_validation_tokens_send_the_first_whole_documents_to_validation(tmp_path, gpt2):
    run(tmp_path, validation_tokens=100, num_proc=2, chunksize=3, streaming=True)
    validation, validation_sizes = read_split(tmp_path / "shards", "validation")
    train, _ = read_split(tmp_path / "shards", "train")

    assert validation + train == expected_stream(gpt2.encode_ordinary, GPT2_EOT, DOCUMENTS)
    lengths = np.cumsum([1 + len(gpt2.encode_ordinary(document)) for document in DOCUMENTS])
    assert len(validation) == lengths[np.searchsorted(lengths, 100)]  # the fewest whole documents with >= 100 tokens
    assert train[0] == GPT2_EOT and validation_sizes[:-1] == [TOKENS_PER_FILE] * (len(validation_sizes) - 1)


def test_validation_split_and_dataset_split_must_differ(tmp_path):
    with pytest.raises(TokenizeError, match="--validation_tokens writes validation_"):
        TokenizeArguments(**arguments(tmp_path, validation_tokens=10, dataset_split="validation"))


KILL_DURING_SECOND_SHARD = """
import os, sys, time
from pathlib import Path

real_fsync, calls = os.fsync, []

def fsync_that_hangs_in_the_second_shard(fd):
    calls.append(fd)
    if len(calls) == 3:  # write_shard fsyncs the file, then its folder: call 3 is the second shard's data
        Path(sys.argv[1]).touch()
        time.sleep(600)
    real_fsync(fd)

os.fsync = fsync_that_hangs_in_the_second_shard
from timl.data.tokenize import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_run_killed_mid_write_leaves_only_whole_shards_and_resumes(tmp_path, gpt2):
    script, marker = tmp_path / "killed_run.py", tmp_path / "in_second_shard"
    script.write_text(KILL_DURING_SECOND_SHARD)
    environment = os.environ | {"HF_DATASETS_CACHE": str(tmp_path / "hf_datasets_cache")}
    process = subprocess.Popen(
        [sys.executable, str(script), str(marker), *as_argv(arguments(tmp_path))], env=environment, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 600
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), process.stderr.read().decode() if process.poll() is not None else "timed out"
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()

    shards = tmp_path / "shards"
    assert list(shards.glob(".train_000001.bin.*.tmp")), "the kill should land while the second shard is written"
    assert sorted(path.name for path in shards.glob("train_*.bin")) == ["train_000000.bin"]
    for path in shards.glob("*.bin"):
        assert read_header(path).num_values == TOKENS_PER_FILE

    run(tmp_path, min_file_index=1)  # resume after the last whole file
    stream, _ = read_split(shards)
    assert stream == expected_stream(gpt2.encode_ordinary, GPT2_EOT, DOCUMENTS)


def test_module_docstrings_are_read_from_source_without_importing(tmp_path):
    (tmp_path / "package").mkdir()
    (tmp_path / "package" / "__init__.py").write_text(
        '"""Package doc."""\nraise SystemExit("imported")\n\n'
        'class Thing(Base):\n    """Thing doc."""\n\n    def method(self, x=1):\n        """Method doc."""\n'
    )
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_thing.py").write_text('"""Docstring of a test module."""\n')
    (tmp_path / "broken.py").write_text('"""Broken."""\ndef (:\n')
    (tmp_path / "plain.py").write_text("x = 1\n")
    expected = "package\n\nPackage doc.\n\n\nclass Thing(Base)\n\nThing doc.\n\n\ndef method(self, x=1)\n\nMethod doc."
    assert module_docstring_documents(tmp_path) == [expected]
    assert any(topic.startswith('The "assert" statement') for topic in help_topic_documents())


def test_the_python_docs_corpus_becomes_gpt2_train_and_validation_shards(tmp_path, gpt2):
    train_pattern, validation_pattern = prepare_python_docs(tmp_path / "python_docs", num_proc=2)
    validation = np.concatenate([shard.memmap() for shard in list_shards(validation_pattern)])
    train_tokens = sum(shard.num_values for shard in list_shards(train_pattern))
    assert PYTHON_DOCS_VALIDATION_TOKENS <= len(validation) and 10 * len(validation) < train_tokens
    assert validation[0] == GPT2_EOT and " the " in gpt2.decode(validation.tolist())

    shards = sorted((tmp_path / "python_docs").iterdir())
    written = [path.stat().st_mtime_ns for path in shards]
    assert prepare_python_docs(tmp_path / "python_docs") == (train_pattern, validation_pattern)
    assert [path.stat().st_mtime_ns for path in shards] == written  # found, not made again


def test_help_lists_the_flags_from_both_entry_points():
    commands = [[sys.executable, "-m", "timl.data.tokenize", "--help"], [str(Path(sys.executable).with_name("timl")), "tokenize", "--help"]]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for command in commands]
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
        flags = [f"--{name}" for name in TokenizeArguments.__dataclass_fields__]
        assert [flag for flag in flags if flag not in out] == []
        assert out.startswith("usage: timl tokenize")


TEXT_FILES = {
    "poem.txt": "Roses are red,\nviolets are blue.\n\n\nSecond stanza, after two blank lines.\n",
    "notes.md": "\n\nStarts with blank lines\n\tand a tab\n\nno trailing newline, naïve café 日本語",
    "code.py": "def f(x):\n    return x  # spaces  inside\n\n\n\nclass A:\n    pass\n\n",
    "empty_lines.txt": "\n\n\n",
}


def write_text_files(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in TEXT_FILES.items():
        (folder / name).write_bytes(text.encode("utf-8"))  # bytes: no newline translation on the way out either
    return [str(folder / name) for name in TEXT_FILES]


def decoded_documents(cache_dir: Path, gpt2) -> list[str]:
    """The shards' documents: the text between consecutive end-of-text tokens, decoded."""
    stream, _ = read_split(cache_dir)
    starts = [index for index, token in enumerate(stream) if token == GPT2_EOT] + [len(stream)]
    assert starts[0] == 0
    return [gpt2.decode(stream[start + 1 : stop]) for start, stop in zip(starts, starts[1:])]


def text_arguments(tmp_path: Path, **overrides) -> dict:
    values = arguments(tmp_path) | {"dataset_path": "text", "data_files": write_text_files(tmp_path / "texts")}
    return values | overrides


def test_each_text_file_is_one_document_that_decodes_to_its_exact_text(tmp_path, gpt2):
    assert main(as_argv(text_arguments(tmp_path, num_proc=2))) == 0
    assert decoded_documents(tmp_path / "shards", gpt2) == list(TEXT_FILES.values())


def _paragraphs(text: str) -> list[str]:
    return [paragraph for paragraph in text.split("\n\n") if paragraph]


def _lines(text: str) -> list[str]:
    pieces = text.split("\n")
    return [piece + "\n" for piece in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])


@pytest.mark.parametrize(("sample_by", "split"), [("paragraph", _paragraphs), ("line", _lines)])
def test_sample_by_paragraph_or_line_cuts_files_as_datasets_does(tmp_path, gpt2, sample_by, split):
    run_arguments = text_arguments(tmp_path, sample_by=sample_by)
    tokenize_dataset(TokenizeArguments(**run_arguments))
    documents = decoded_documents(tmp_path / "shards", gpt2)
    assert documents == [piece for text in TEXT_FILES.values() for piece in split(text)]
    if sample_by == "line":  # newlines are kept, so the lines still add up to the files
        assert "".join(documents) == "".join(TEXT_FILES.values())


def test_sample_by_needs_text_files(tmp_path):
    with pytest.raises(TokenizeError, match="--sample_by line applies only to --dataset_path text"):
        TokenizeArguments(**arguments(tmp_path, sample_by="line"))


def test_the_tokenizer_saved_beside_the_shards_is_gpt2s(tmp_path, gpt2, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(socket.socket, "connect", lambda *args: pytest.fail("tried to reach the network"))
    summary = run(tmp_path)
    cache_dir = tmp_path / "shards"
    assert sorted(path.name for path in summary.tokenizer_files) == ["tokenizer.json", "tokenizer_config.json"]
    assert not list(cache_dir.glob(".*")), "no temporary file or folder is left behind"
    tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>" and tokenizer.eos_token_id == GPT2_EOT
    stream, _ = read_split(cache_dir)
    assert tokenizer.decode(stream) == gpt2.decode(stream)


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_every_tokenizer_kind_is_saved_as_one_that_encodes_the_same(tmp_path, gpt2, kind):
    from transformers import AutoTokenizer

    overrides, encode, eot = TOKENIZER_KINDS[kind](tmp_path, gpt2)
    run(tmp_path, **overrides)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "shards")
    assert tokenizer.eos_token_id == eot
    for document in DOCUMENTS:
        # split_special_tokens: "<|endoftext|>" inside a document is text, as it was to the encoder.
        ids = tokenizer(document, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ids == list(encode(document))


def test_a_tiktoken_bpe_without_a_transformers_equivalent_is_said_and_not_saved(tmp_path, gpt2):
    run(tmp_path)  # leaves GPT-2's tokenizer in the folder, which the next run must not leave beside its shards
    # GPT-2's first 1000 ranks: a valid BPE shaped like GPT-2's, but not GPT-2's, and not read from vocab.bpe files.
    ranks = sorted(gpt2._mergeable_ranks.items(), key=lambda item: item[1])[:1000]
    path = tmp_path / "small.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks))
    with pytest.warns(UserWarning, match=r"tiktoken small has no offline transformers equivalent"):
        summary = run(tmp_path, encoding_name=None, bpe_files=[str(path)], overwrite=True)
    assert summary.tokenizer_files == []
    assert sorted(path.name for path in (tmp_path / "shards").iterdir()) == sorted(path.name for path in summary.files)


def test_validation_tokens_that_take_most_of_the_data_or_less_than_a_document_warn(tmp_path, gpt2):
    total = len(expected_stream(gpt2.encode_ordinary, GPT2_EOT, DOCUMENTS))
    with pytest.warns(UserWarning, match=r"more than half of the data") as caught:
        run(tmp_path, name="most", validation_tokens=total * 3 // 4)
    assert not any("One document alone" in str(warning.message) for warning in caught)
    first = 1 + len(gpt2.encode_ordinary(DOCUMENTS[0]))
    with pytest.warns(UserWarning, match=rf"One document alone has {first} tokens, more than --validation_tokens 2") as caught:
        run(tmp_path, name="tiny", validation_tokens=2)
    assert not any("more than half" in str(warning.message) for warning in caught)
