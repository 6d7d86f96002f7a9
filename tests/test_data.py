"""Tests for the data layer: corpus, tokenizers, packing, sharding, resume, mixture, loader."""

from __future__ import annotations

import itertools
import json
import time

import pytest
import torch

from torchtitan_rtpurbo.data import (
    DEFAULT_TOKENIZER_PATH,
    SAMPLE_KEYS,
    HuggingFaceTokenizer,
    MixtureDataset,
    PackedTokenDataset,
    SentencePieceTokenizer,
    StatefulBatchLoader,
    Tokenizer,
    build_dataloader,
    build_tokenizer,
    get_documents,
    split_of_key,
    stdlib_documents,
    stdlib_root,
    text_documents,
)


@pytest.fixture(scope="module")
def sp_tokenizer() -> SentencePieceTokenizer:
    return build_tokenizer(DEFAULT_TOKENIZER_PATH)


@pytest.fixture(scope="module")
def small_docs() -> list[str]:
    """Short distinct documents (plus one empty one, which must be skipped) so epochs roll over fast."""
    docs = [f"def f{i}(x):\n    return x * {i}\n" + "# pad\n" * (i % 5) for i in range(23)]
    docs[7] = ""
    return docs


def take(iterable, n):
    return list(itertools.islice(iterable, n))


def assert_samples_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def stream_of(samples) -> list[int]:
    """Windows overlap by one token: the stream is the first input token, then every label."""
    out = [int(samples[0]["input"][0])]
    for s in samples:
        out.extend(s["labels"].tolist())
    return out


def split_documents(stream: list[int], eos: int) -> list[list[int]]:
    docs, current = [], []
    for t in stream:
        if t == eos:
            docs.append(current)
            current = []
        else:
            current.append(t)
    return docs


# ------------------------------------------------------------------------------------ tokenizers


def test_shipped_sentencepiece_model(sp_tokenizer):
    assert DEFAULT_TOKENIZER_PATH.stat().st_size < 1_000_000
    assert isinstance(sp_tokenizer, Tokenizer)
    assert (sp_tokenizer.vocab_size, sp_tokenizer.bos_id, sp_tokenizer.eos_id, sp_tokenizer.pad_id) == (4096, 1, 2, 3)


def test_sentencepiece_round_trip_on_stdlib_files(sp_tokenizer):
    # argparse.py: ordinary code; the val split: files the tokenizer was not trained on.
    texts = [(stdlib_root() / "argparse.py").read_text(encoding="utf-8")]
    val = stdlib_documents("val")
    texts += [val[i] for i in range(len(val))]
    texts.append("\tif x:\r\n\t\treturn 'héllo ✓ 你好' # odd whitespace   \n\n\n  ")
    for text in texts:
        ids = sp_tokenizer.encode(text)
        assert all(0 <= i < sp_tokenizer.vocab_size for i in ids)
        assert sp_tokenizer.decode(ids) == text
    # Indentation is compressed: eight spaces are one token, digits are split.
    assert len(sp_tokenizer.encode("        ")) == 1
    assert len(sp_tokenizer.encode("12345")) == 5


def _write_tiny_hf_tokenizer(folder, special_tokens):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def test_hf_tokenizer_json_from_tokenizer_config(tmp_path):
    tok = _write_tiny_hf_tokenizer(tmp_path, ["<|endoftext|>", "<|im_end|>", "<pad>"])
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": None, "eos_token": {"content": "<|im_end|>", "special": True}})
    )
    hf = build_tokenizer(tmp_path)  # the directory
    assert isinstance(hf, HuggingFaceTokenizer) and isinstance(hf, Tokenizer)
    assert hf.bos_id is None  # explicit null in tokenizer_config.json
    assert hf.eos_id == tok.token_to_id("<|im_end|>")
    assert hf.pad_id == tok.token_to_id("<pad>")  # well-known name
    assert hf.vocab_size == tok.get_vocab_size(with_added_tokens=True)
    text = "def g(y):\n\treturn y - 2  # ✓\n"
    assert hf.decode(hf.encode(text)) == text
    # An explicit argument wins; build_tokenizer also takes the file itself.
    hf2 = build_tokenizer(tmp_path / "tokenizer.json", eos_token="<|endoftext|>")
    assert hf2.eos_id == tok.token_to_id("<|endoftext|>")


def test_hf_tokenizer_fallbacks_and_errors(tmp_path):
    tok = _write_tiny_hf_tokenizer(tmp_path / "a", ["<s>", "</s>"])
    hf = build_tokenizer(tmp_path / "a")  # no config files: well-known names
    assert (hf.bos_id, hf.eos_id) == (tok.token_to_id("<s>"), tok.token_to_id("</s>"))
    assert hf.pad_id == hf.eos_id  # no pad token: falls back to EOS
    # config.json ids are used when no tokenizer_config.json names the token.
    (tmp_path / "a" / "config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    assert build_tokenizer(tmp_path / "a").eos_id == 5
    # A token named in tokenizer_config.json that is not in the vocabulary: error names file and token.
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json.*<nope>"):
        build_tokenizer(tmp_path / "a")
    # No EOS anywhere.
    _write_tiny_hf_tokenizer(tmp_path / "b", [])
    with pytest.raises(ValueError, match="no EOS token"):
        build_tokenizer(tmp_path / "b")


def test_build_tokenizer_errors_name_the_path(tmp_path):
    missing = tmp_path / "nothing.model"
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        build_tokenizer(missing)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="garbage.model"):
        build_tokenizer(garbage)
    bad_json = tmp_path / "bad" / "tokenizer.json"
    bad_json.parent.mkdir()
    bad_json.write_text("{")
    with pytest.raises(ValueError, match="tokenizer.json"):
        build_tokenizer(bad_json.parent)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        build_tokenizer(empty)


# ------------------------------------------------------------------------------------ corpus


def test_stdlib_splits_are_deterministic_disjoint_and_complete():
    splits = {s: stdlib_documents(s) for s in ("train", "val", "test", "all")}
    keys = {s: [d.key(i) for i in range(len(d))] for s, d in splits.items()}
    assert keys["all"] == sorted(keys["all"])
    assert not any(k.startswith("site-packages/") for k in keys["all"])
    assert sorted(keys["train"] + keys["val"] + keys["test"]) == keys["all"]
    assert all(split_of_key(k) == s for s in ("train", "val", "test") for k in keys[s])
    assert len(keys["val"]) > 0 and len(keys["test"]) > 0
    assert len(keys["train"]) > 0.95 * len(keys["all"])
    assert splits["train"][0] == (stdlib_root() / keys["train"][0]).read_text(encoding="utf-8")


def test_text_and_jsonl_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nwith two lines\n")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n')
    (tmp_path / "c.jsonl").write_text('{"body": "custom field"}\n')
    docs = text_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    assert [docs[i] for i in range(len(docs))] == ["first document\nwith two lines\n", "one", "two"]
    assert [docs.key(i) for i in range(len(docs))] == ["a.txt", "b.jsonl:1", "b.jsonl:3"]
    globbed = get_documents(str(tmp_path / "[ab].*"), split="all")
    assert len(globbed) == 3
    custom = get_documents(str(tmp_path / "c.jsonl"), split="all", text_field="body")
    assert custom[0] == "custom field"
    with pytest.raises(FileNotFoundError, match="nomatch"):
        get_documents(str(tmp_path / "nomatch*.jsonl"))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8"):
        text_documents([tmp_path / "latin1.txt"])
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(ValueError, match=r"d\.csv"):
        get_documents(str(tmp_path / "d.csv"), split="all")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"text": "ok"', "not valid JSON"),
        ('{"body": "no text field"}', "missing field 'text'"),
        ('{"text": 3}', "field 'text' is int, expected a string"),
        ('["a list"]', "expected a JSON object"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "fine too"}\n' + bad_line + "\n")
    with pytest.raises(ValueError, match=rf"data\.jsonl:3: {message}"):
        text_documents([path])


# ------------------------------------------------------------------------------------ packing


def test_packing_labels_positions_doc_ids(small_docs, sp_tokenizer):
    eos = sp_tokenizer.eos_id
    ds = PackedTokenDataset(small_docs, sp_tokenizer, seq_len=16, shuffle=False, infinite=False)
    samples = list(ds)
    assert len(samples) > 5
    for s in samples:
        assert set(s) == set(SAMPLE_KEYS)
        assert s["input"].dtype == torch.int64 and s["labels"].dtype == torch.int64
        assert s["positions"].dtype == torch.int64 and s["doc_ids"].dtype == torch.int32
        assert all(t.shape == (16,) for t in s.values())
        inp, lab, pos, doc = s["input"].tolist(), s["labels"].tolist(), s["positions"].tolist(), s["doc_ids"].tolist()
        assert inp[1:] == lab[:-1]  # labels are inputs shifted by one
        assert pos[0] == 0 and doc[0] == 0
        for i in range(1, 16):
            after_eos = inp[i - 1] == eos
            assert pos[i] == (0 if after_eos else pos[i - 1] + 1)  # restart after each EOS
            assert doc[i] == doc[i - 1] + (1 if after_eos else 0)  # new document after each EOS
    # Consecutive windows overlap by one token and the stream is exactly the documents + EOS.
    for a, b in zip(samples, samples[1:]):
        assert int(b["input"][0]) == int(a["labels"][-1])
    expected = []
    for text in small_docs:
        if text:  # the empty document is skipped
            expected += sp_tokenizer.encode(text) + [eos]
    stream = stream_of(samples)
    assert stream == expected[: len(stream)]
    assert len(expected) - len(stream) < 16  # only the incomplete last window is dropped


def test_determinism_and_shuffle(small_docs, sp_tokenizer):
    make = lambda seed: PackedTokenDataset(small_docs, sp_tokenizer, seq_len=8, seed=seed)  # noqa: E731
    a, b, c = take(make(0), 40), take(make(0), 40), take(make(1), 40)
    assert_samples_equal(a, b)
    assert any(not torch.equal(x["input"], y["input"]) for x, y in zip(a, c))
    # Infinite: runs past one epoch; each epoch is a permutation of all non-empty documents.
    ds = make(3)
    samples = take(ds, 200)
    assert ds.epoch >= 2
    docs = split_documents(stream_of(samples), sp_tokenizer.eos_id)
    texts = [sp_tokenizer.decode(d) for d in docs[:22]]  # the stream starts at the start of a document
    non_empty = sorted(t for t in small_docs if t)
    assert sorted(texts) == non_empty  # epoch 0 = 22 documents in some order
    assert texts != [t for t in small_docs if t]  # ... shuffled


def test_dp_document_sharding_disjoint_and_covering(small_docs, sp_tokenizer):
    eos, dp = sp_tokenizer.eos_id, 3
    seen = []
    for rank in range(dp):
        ds = PackedTokenDataset(small_docs, sp_tokenizer, seq_len=8, dp_rank=rank, dp_degree=dp, seed=5)
        num_docs_epoch0 = sum(1 for i in ds._order(0) if small_docs[i])  # the empty document is skipped
        docs = split_documents(stream_of(take(ds, 60)), eos)
        assert ds.epoch >= 1
        seen.append([sp_tokenizer.decode(d) for d in docs[:num_docs_epoch0]])
    all_seen = [t for rank_docs in seen for t in rank_docs]
    assert len(all_seen) == len(set(all_seen))  # disjoint
    assert sorted(all_seen) == sorted(t for t in small_docs if t)  # together cover the epoch


def test_dp_sample_sharding_interleaves_the_global_stream(small_docs, sp_tokenizer):
    dp = 3
    whole = take(PackedTokenDataset(small_docs, sp_tokenizer, seq_len=8, seed=2, shard_by="sample"), 30)
    for rank in range(dp):
        ds = PackedTokenDataset(
            small_docs, sp_tokenizer, seq_len=8, seed=2, shard_by="sample", dp_rank=rank, dp_degree=dp
        )
        assert_samples_equal(take(ds, 10), whole[rank::dp])


@pytest.mark.parametrize("shard_by", ["document", "sample"])
def test_resume_is_exact(small_docs, sp_tokenizer, shard_by):
    kwargs = dict(seq_len=8, dp_rank=1, dp_degree=2, seed=7, shard_by=shard_by)
    reference = take(PackedTokenDataset(small_docs, sp_tokenizer, **kwargs), 80)
    for split_at in (1, 13, 37, 61):  # 37 and 61 are past an epoch boundary
        ds = PackedTokenDataset(small_docs, sp_tokenizer, **kwargs)
        take(ds, split_at)
        state = json.loads(json.dumps(ds.state_dict()))  # plain ints/strings: survives serialisation
        restored = PackedTokenDataset(small_docs, sp_tokenizer, **kwargs)
        restored.load_state_dict(state)
        assert_samples_equal(take(restored, 80 - split_at), reference[split_at:])


def test_resume_errors(small_docs, sp_tokenizer):
    ds = PackedTokenDataset(small_docs, sp_tokenizer, seq_len=8)
    it = iter(ds)
    take(it, 3)
    state = ds.state_dict()
    other = PackedTokenDataset(small_docs, sp_tokenizer, seq_len=16)
    with pytest.raises(ValueError, match="'seq_len'"):
        other.load_state_dict(state)
    ds.load_state_dict(state)
    with pytest.raises(RuntimeError, match="call iter"):
        next(it)


# ------------------------------------------------------------------------------------ mixture + loader


class CountingSource:
    """A minimal non-token source (stands in for the synthetic tasks): sample i is filled with i."""

    def __init__(self, seq_len: int, offset: int):
        self.seq_len, self.offset, self.next_index = seq_len, offset, 0

    def __iter__(self):
        while True:
            value = self.offset + self.next_index
            self.next_index += 1
            full = torch.full((self.seq_len,), value, dtype=torch.int64)
            yield {
                "input": full,
                "labels": full.clone(),
                "positions": torch.arange(self.seq_len),
                "doc_ids": torch.zeros(self.seq_len, dtype=torch.int32),
            }

    def state_dict(self):
        return {"next_index": self.next_index}

    def load_state_dict(self, state):
        self.next_index = state["next_index"]


def test_mixture_deterministic_weighted_and_resumable(small_docs, sp_tokenizer):
    def make():
        packed = PackedTokenDataset(small_docs, sp_tokenizer, seq_len=8, seed=1)
        return MixtureDataset([packed, CountingSource(8, offset=10_000)], weights=[3, 1], seed=4)

    mix = make()
    reference = take(mix, 400)
    from_counter = [int(s["input"][0]) >= 10_000 for s in reference]
    assert from_counter == [make().source_of(i) == 1 for i in range(400)]
    assert 0.15 < sum(from_counter) / 400 < 0.35  # weight 1 of 4
    assert_samples_equal(take(make(), 400), reference)
    for split_at in (5, 150):
        mix = make()
        take(mix, split_at)
        state = mix.state_dict()
        restored = make()
        restored.load_state_dict(state)
        assert_samples_equal(take(restored, 400 - split_at), reference[split_at:])


def test_mixture_rejects_wrong_keys():
    class BadSource(CountingSource):
        def __iter__(self):
            for s in super().__iter__():
                yield {"tokens": s["input"]}

    with pytest.raises(ValueError, match="source 0"):
        take(MixtureDataset([BadSource(4, 0)], [1.0]), 1)


def test_build_dataloader_stdlib_first_batch_fast_and_resumable():
    start = time.perf_counter()
    loader = build_dataloader(
        "stdlib", str(DEFAULT_TOKENIZER_PATH), seq_len=256, batch_size=4, dp_rank=1, dp_degree=2, seed=0
    )
    first = next(iter(loader))
    seconds = time.perf_counter() - start
    assert seconds < 10, f"first batch took {seconds:.1f} s"
    assert {k: tuple(v.shape) for k, v in first.items()} == {k: (4, 256) for k in SAMPLE_KEYS}
    assert first["doc_ids"].dtype == torch.int32
    batches = take(loader, 3)
    state = loader.state_dict()
    after = take(loader, 2)
    restored = build_dataloader(
        "stdlib", DEFAULT_TOKENIZER_PATH, seq_len=256, batch_size=4, dp_rank=1, dp_degree=2, seed=0
    )
    restored.load_state_dict(state)
    assert_samples_equal(take(restored, 2), after)
    assert state["batches_yielded"] == 4 and len(batches) == 3


def test_build_dataloader_jsonl_finite(tmp_path, sp_tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"x = {i}\n" * 5}) + "\n" for i in range(40)))
    loader = build_dataloader(
        str(path), sp_tokenizer, seq_len=32, batch_size=2, split="all", shuffle=False, infinite=False
    )
    batches = list(loader)
    assert batches and all(b["input"].shape == (2, 32) for b in batches)
    assert isinstance(loader, StatefulBatchLoader)
