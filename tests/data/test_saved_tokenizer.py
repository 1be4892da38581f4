"""The tokenizer that travels with the data: saved atomically, found beside the shards or by name."""

from __future__ import annotations

import numpy as np
import pytest

from timl.data.encoders import load_encoder
from timl.data.saved_tokenizer import find_tokenizer, save_tokenizer, transformers_tokenizer
from timl.data.shards import write_shard


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return transformers_tokenizer(load_encoder(encoding_name="gpt2"))


def tiny_tokenizer(eos: str = "<eot>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eot>": 0, "<end>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos)


def shards_in(folder, name="train_000000.bin"):
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / name, np.arange(10, dtype=np.uint16))
    return str(folder / "train_*.bin")


def test_save_writes_whole_files_and_replaces_an_earlier_tokenizers(tmp_path, gpt2_tokenizer):
    from transformers import AutoTokenizer

    (tmp_path / "vocab.json").write_text("{}")  # what a slow tokenizer left here once
    (tmp_path / "config.json").write_text("{}")  # not a tokenizer file: kept
    written = save_tokenizer(gpt2_tokenizer, tmp_path)
    assert sorted(path.name for path in written) == ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    assert AutoTokenizer.from_pretrained(tmp_path)("Hello world")["input_ids"] == [15496, 995]
    # From a folder, into another: the same tokenizer.
    save_tokenizer(tmp_path, tmp_path / "copy")
    assert AutoTokenizer.from_pretrained(tmp_path / "copy")("Hello world")["input_ids"] == [15496, 995]


def test_find_looks_beside_the_shards_or_by_name(tmp_path, gpt2_tokenizer):
    pattern = shards_in(tmp_path / "data")
    assert find_tokenizer(pattern, None) is None
    save_tokenizer(gpt2_tokenizer, tmp_path / "data")
    assert find_tokenizer(pattern, None)("Hello world")["input_ids"] == [15496, 995]
    save_tokenizer(tiny_tokenizer(), tmp_path / "other")
    assert find_tokenizer(pattern, str(tmp_path / "other"))("hello world")["input_ids"] == [2, 3]
    assert find_tokenizer(None, None) is None


def test_find_over_a_mixture_warns_when_the_sources_tokenizers_differ(tmp_path, gpt2_tokenizer):
    web, code = shards_in(tmp_path / "web"), shards_in(tmp_path / "code")
    save_tokenizer(tiny_tokenizer(), tmp_path / "code")
    mixture = f"web={web}:0.5,code={code}:0.5"
    assert find_tokenizer(mixture, None)("hello")["input_ids"] == [2]  # only code's folder holds one
    save_tokenizer(gpt2_tokenizer, tmp_path / "web")
    with pytest.warns(UserWarning, match=r"tokenizers differ .*code from .*web"):
        assert find_tokenizer(mixture, None)("Hello world")["input_ids"] == [15496, 995]


def test_a_converted_tokenizer_must_name_the_encoders_end_of_text_as_eos(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path / "eot")
    encoder = load_encoder(tokenizer_name=str(tmp_path / "eot"))
    assert transformers_tokenizer(encoder).eos_token == "<eot>"
    # A transformers tokenizer without EOS gets the end-of-text token (--eot_token) as EOS and BOS.
    tiny_tokenizer(eos=None).save_pretrained(tmp_path / "no_eos")
    converted = transformers_tokenizer(load_encoder(tokenizer_name=str(tmp_path / "no_eos"), eot_token="<end>"))
    assert (converted.eos_token, converted.bos_token, converted.eos_token_id) == ("<end>", "<end>", 1)
