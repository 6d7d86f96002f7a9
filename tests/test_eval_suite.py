"""Long-context evaluation suite: task generation, scoring, runner, report, synthetic training source."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from torchtitan_rtpurbo.data.synthetic import SyntheticTaskDataset
from torchtitan_rtpurbo.evaluation import (
    ALL_TASKS,
    TASKS,
    GenerationOutput,
    PromptTooLong,
    compare_models,
    evaluate_model,
    format_table,
    generate_suite,
    load_report,
    load_samples,
    perplexity,
    resolve_tasks,
    save_samples,
    score_exact,
    score_prediction,
    score_recall,
)
from torchtitan_rtpurbo.evaluation.tasks import number_split, word_split

REPO = Path(__file__).resolve().parents[1]


class ByteTokenizer:
    """A byte-level stand-in with the Tokenizer protocol: ids 3..258 are bytes, 1 is EOS, 0 is pad."""

    vocab_size = 259
    bos_id = None
    eos_id = 1
    pad_id = 0

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


def _code_docs() -> list[str]:
    """A small deterministic Python-like corpus for haystacks."""
    rng = np.random.default_rng(0)
    docs = []
    for d in range(6):
        lines = []
        for i in range(120):
            indent = "    " * int(rng.integers(0, 3))
            kind = int(rng.integers(0, 4))
            if kind == 0:
                lines.append(f"{indent}def func_{d}_{i}(x, y={int(rng.integers(100))}):")
            elif kind == 1:
                lines.append(f"{indent}value_{i} = compute(x + {int(rng.integers(1000))}) * scale")
            elif kind == 2:
                lines.append(f"{indent}# comment about item {i} in module {d}")
            else:
                lines.append("")
        docs.append("\n".join(lines) + "\n")
    return docs


DOCS = _code_docs()
BYTES = ByteTokenizer()


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """A small real BPE tokenizer (SentencePiece, trained here in a fraction of a second) whose pieces
    merge across newlines and spaces: prompt lengths must still fit exactly."""
    spm = pytest.importorskip("sentencepiece")
    from torchtitan_rtpurbo.data.tokenizer import SentencePieceTokenizer

    text = "".join(DOCS) + " ".join(f"# special key {k}: value {k * 7}" for k in range(10000, 10400))
    chunks = [text[i : i + 1000] for i in range(0, len(text), 1000)]
    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks), model_writer=model, model_type="bpe", vocab_size=400, hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True, byte_fallback=True, character_coverage=1.0,
        max_sentence_length=8000, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return SentencePieceTokenizer(path)


def _oracle(samples, tok):
    table = {tuple(s.prompt_ids): tok.encode(s.target) + [tok.eos_id] for s in samples}
    return lambda prompts, n: [table[tuple(p)][:n] for p in prompts]


# ------------------------------------------------------------------------------------------ generation


def test_generation_is_deterministic_and_seeded():
    for task in ALL_TASKS:
        a = TASKS[task].generate("eval", 600, 2, 7, BYTES, DOCS)
        b = TASKS[task].generate("eval", 600, 2, 7, BYTES, DOCS)
        c = TASKS[task].generate("eval", 600, 2, 8, BYTES, DOCS)
        assert [(s.prompt, s.prompt_ids, s.answer) for s in a] == [(s.prompt, s.prompt_ids, s.answer) for s in b]
        assert [s.answer for s in a] != [s.answer for s in c], task
        assert a[0].answer != a[1].answer, task  # samples of one stream differ


def test_train_and_eval_are_held_out():
    for task in ALL_TASKS:
        train = TASKS[task].generate("train", 700, 4, 0, BYTES, DOCS)
        evals = TASKS[task].generate("eval", 700, 4, 0, BYTES, DOCS)
        train_items = {a for s in train for a in s.answers}
        eval_items = {a for s in evals for a in s.answers}
        assert not train_items & eval_items, task
        for split, samples in (("train", train), ("eval", evals)):
            for s in samples:
                for a in s.answers:  # every answer item is owned by its split's key space
                    own = number_split(int(a)) if a.isdigit() else word_split(a.removeprefix("var_"))
                    assert own == split, (task, split, a)
                # ... and so is every key / variable / entity the prompt defines
                for key in re.findall(r"# special key (\d+):", s.prompt):
                    assert number_split(int(key)) == split
                for name in re.findall(r"^(var_\w+) = ", s.prompt, flags=re.M):
                    assert word_split(name.removeprefix("var_")) == split
                for country in re.findall(r"# The \w+ of (\w+)ia is", s.prompt):
                    assert word_split(country) == split


@pytest.mark.parametrize("which", ["bytes", "sentencepiece"])
def test_prompt_length_fits_target(which, sp_tokenizer):
    tok = BYTES if which == "bytes" else sp_tokenizer
    exact = total = 0
    for task in ALL_TASKS:
        for length in (400, 1000, 3000):
            for s in TASKS[task].generate("eval", length, 2, 1, tok, DOCS):
                n = len(s.prompt_ids)
                assert n <= length, (task, length, n)
                assert n >= length - 8, (task, length, n)
                assert s.prompt_ids == tok.encode(s.prompt)  # canonical tokenisation of the prompt text
                assert s.length == length and s.target == " " + s.answer
                for a in s.answers:  # the answer is in the haystack (cwe/fwe: the words; vt: the names)
                    assert a in s.prompt, (task, a)
                exact += n == length
                total += 1
    assert exact >= 0.9 * total  # the fit is usually exact (equal-length prompts batch together)


def test_too_short_target_raises():
    with pytest.raises(PromptTooLong):
        TASKS["niah_multiquery"].generate("eval", 40, 1, 0, BYTES, DOCS)


def test_task_formats():
    s = TASKS["niah_single"].generate("eval", 500, 1, 0, BYTES, DOCS)[0]
    assert f"value {s.answer}\n" in s.prompt and s.prompt.endswith(": value")
    assert s.prompt.count("# special key") == 2  # the needle and the query
    mv = TASKS["niah_multivalue"].generate("eval", 500, 1, 0, BYTES, DOCS)[0]
    assert len(mv.answers) == 4 and mv.answer == ", ".join(mv.answers)
    positions = [mv.prompt.index(f"value {v}\n") for v in mv.answers]
    assert positions == sorted(positions)  # values listed in the order they appear
    vt = TASKS["variable_tracking"].generate("eval", 800, 1, 0, BYTES, DOCS)[0]
    value = re.search(r"variables equal to (\d+):$", vt.prompt).group(1)
    assert f"{vt.answers[0]} = {value}\n" in vt.prompt
    for prev, cur in zip(vt.answers, vt.answers[1:]):
        assert vt.prompt.index(f"{cur} = {prev}\n") > vt.prompt.index(f"{prev} = ")
    cwe = TASKS["common_words"].generate("eval", 1500, 1, 0, BYTES, DOCS)[0]
    words = cwe.prompt.split("\n", 1)[1].rsplit("\n", 1)[0].split()
    counts = {w: words.count(w) for w in set(words) if w != "."}
    top = sorted(counts.values(), reverse=True)
    assert min(counts[a] for a in cwe.answers) > top[len(cwe.answers)]
    fwe = TASKS["frequent_words"].generate("eval", 1500, 1, 0, BYTES, DOCS)[0]
    words = fwe.prompt.split("\n", 1)[1].rsplit("\n", 1)[0].split()
    freq = [words.count(a) for a in fwe.answers]
    assert freq == sorted(freq, reverse=True) and len(set(freq)) == 3
    qa = TASKS["qa"].generate("eval", 800, 1, 0, BYTES, DOCS)[0]
    rel, country = re.search(r"What is the (\w+) of (\w+)\?", qa.prompt).groups()
    assert f"# The {rel} of {country} is {qa.answer}.\n" in qa.prompt


def test_samples_roundtrip_and_task_names(tmp_path):
    samples = generate_suite(["niah_single", "cwe"], [300], 2, 0, BYTES, DOCS)
    save_samples(samples, tmp_path / "s.jsonl")
    assert load_samples(tmp_path / "s.jsonl") == samples
    assert resolve_tasks("vt,fwe") == ["variable_tracking", "frequent_words"]
    assert resolve_tasks(None) == list(ALL_TASKS)
    with pytest.raises(KeyError):
        resolve_tasks(["nope"])


# ------------------------------------------------------------------------------------------ scoring


def test_score_exact_edge_cases():
    assert score_exact(" 93117", "93117") == 100
    assert score_exact(" 93117\n# more text", "93117") == 100
    assert score_exact("93117. and so on", "93117") == 100
    assert score_exact(" 93117, 5", "93117") == 100
    assert score_exact(" 931170", "93117") == 0  # a longer number is wrong
    assert score_exact(" 9311", "93117") == 0
    assert score_exact("", "93117") == 0
    assert score_exact("\n93117", "93117") == 0  # the answer line is empty
    assert score_exact(" Miltock_x", "Miltock") == 0
    assert score_exact(" miltock", "Miltock") == 0  # case-sensitive
    with pytest.raises(ValueError):
        score_exact("x", "")


def test_score_recall_edge_cases():
    ans = ["111", "222", "333", "444"]
    assert score_recall(" 111, 222, 333, 444", ans) == 100
    assert score_recall(" 444 333 222 111", ans) == 100  # order-free
    assert score_recall(" 111, 222", ans) == 50
    assert score_recall(" 111, 111, 111, 111", ans) == 25  # repeats count once
    assert score_recall(" 999, 888, 777, 666, 111", ans) == 0  # only the first len(answers) items count
    assert score_recall(" 111, 222\n333, 444", ans) == 50  # one line
    assert score_recall("", ans) == 0
    assert score_recall(" var_ab, var_cd", ["var_ab", "var_cd"]) == 100
    s = TASKS["niah_multiquery"].generate("eval", 400, 1, 0, BYTES, DOCS)[0]
    assert score_prediction(s, s.target) == 100
    t = TASKS["niah_single"].generate("eval", 400, 1, 0, BYTES, DOCS)[0]
    assert score_prediction(t, t.target + "\n") == 100


# ------------------------------------------------------------------------------------------ runner


def test_oracle_scores_100_and_random_scores_0():
    samples = generate_suite("all", [500, 900], 2, 3, BYTES, DOCS)
    res = evaluate_model(None, BYTES, samples=samples, generate_fn=_oracle(samples, BYTES), progress=False, batch_size=4)
    assert res["average"] == 100.0
    assert all(v == 100.0 for t in res["scores"] for v in res["scores"][t].values())
    assert set(res["scores"]) == set(ALL_TASKS) and res["lengths"] == [500, 900]
    assert len(res["records"]) == len(samples) and res["density"] == {500: None, 900: None}

    gen = torch.Generator().manual_seed(0)

    def random_fn(prompts, n):
        return [torch.randint(3, 259, (n,), generator=gen).tolist() for _ in prompts]

    res = evaluate_model(None, BYTES, samples=samples, generate_fn=random_fn, progress=False)
    assert res["average"] < 2.0


class OracleLM(nn.Module):
    """A "language model" whose greedy continuation is the sample's target + EOS; it reports a kept density
    of 0.5 through the attention context, like an RTPurbo backend (dict entries with per-head tensors)."""

    def __init__(self, samples, tok):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.vocab = tok.vocab_size
        self.table = {tuple(s.prompt_ids): tok.encode(s.target) + [tok.eos_id] for s in samples}

    def forward(self, tokens, positions=None, doc_ids=None, ctx=None):
        if ctx is not None and ctx.collect is not None:
            ctx.collect.setdefault("density", []).append({"layer": 0, "heads": [0, 1], "density": torch.tensor([0.25, 0.75])})
            ctx.collect["density"].append({"layer": 1, "heads": [3], "density": torch.tensor([0.5])})
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], self.vocab)
        for b, row in enumerate(tokens.tolist()):
            for plen in range(len(row), 0, -1):
                target = self.table.get(tuple(row[:plen]))
                if target is not None:
                    logits[b, -1, target[min(len(row) - plen, len(target) - 1)]] = 1.0
                    break
        return logits


def test_greedy_generator_density_and_stopping():
    samples = generate_suite(["niah_single", "niah_multivalue", "common_words"], [400], 2, 0, BYTES, DOCS)
    model = OracleLM(samples, BYTES)
    res = evaluate_model(model, BYTES, samples=samples, progress=False, batch_size=2)
    assert res["average"] == 100.0
    assert res["density"][400] == pytest.approx(0.5)
    assert all(r["prediction"] == next(s.target for s in samples if s.index == r["index"] and s.task == r["task"]) for r in res["records"])
    assert model.training  # evaluate_model restores the mode


def test_real_model_runs_end_to_end():
    from models.qwen3 import Qwen3ModelArgs, build_model

    torch.manual_seed(0)
    args = Qwen3ModelArgs(vocab_size=259, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64,
                          rope_theta=10_000.0, max_seq_len=1024, tie_embeddings=True)
    model = build_model(args)
    samples = generate_suite(["niah_single", "qa"], [500], 1, 0, BYTES, DOCS)
    res = evaluate_model(model, BYTES, samples=samples, max_new_tokens=3, progress=False, batch_size=2)
    assert len(res["records"]) == 2 and all(0 <= r["score"] <= 100 for r in res["records"])
    assert res["density"][500] is None  # dense attention reports no density
    ppl = perplexity(model, BYTES, DOCS, seq_len=128, max_docs=2, max_windows=3, return_details=True)
    assert ppl["windows"] == 3 and ppl["tokens"] == 3 * 128 and 1.0 < ppl["perplexity"] < 1e4


def test_perplexity_of_uniform_model_is_vocab_size():
    class Uniform(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def forward(self, tokens, positions=None, doc_ids=None, ctx=None):
            return torch.zeros(*tokens.shape, 259)

    assert perplexity(Uniform(), BYTES, DOCS, seq_len=64, max_docs=1) == pytest.approx(259.0, rel=1e-5)


def test_report_json_table_and_plots(tmp_path):
    samples = generate_suite(["niah_single", "frequent_words"], [400, 800], 2, 0, BYTES, DOCS)
    oracle = _oracle(samples, BYTES)

    def half_density_oracle(prompts, n):
        return GenerationOutput(tokens=oracle(prompts, n), density=[0.3] * len(prompts))

    def silent(prompts, n):
        return [[BYTES.eos_id] for _ in prompts]

    comp = compare_models({"dense": oracle, "rtpurbo": half_density_oracle, "streaming": silent}, BYTES,
                          samples=samples, out_dir=tmp_path, progress=False)
    table = format_table(comp)
    assert "| niah_single" in table and "rtpurbo" in table and "kept density" in table
    assert comp["models"]["dense"]["average"] == 100 and comp["models"]["streaming"]["average"] == 0
    for name in ("results.json", "table.md", "accuracy_density.png", "accuracy_by_task.png"):
        assert (tmp_path / name).stat().st_size > 0
    loaded = load_report(tmp_path / "results.json")
    assert format_table(loaded) == table  # the table is rebuilt identically from the JSON
    assert loaded["models"]["rtpurbo"]["density"]["800"] == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------ synthetic data


def _check_window(ds, w):
    window, samples = ds.window_with_samples(w)
    inp, lab, pos, doc = (window[k] for k in ("input", "labels", "positions", "doc_ids"))
    L = ds.seq_len
    assert all(t.shape == (L,) for t in (inp, lab, pos, doc))
    assert inp.dtype == lab.dtype == pos.dtype == torch.long and doc.dtype == torch.int32
    start = 0
    expected = torch.full((L + 1,), -100)  # expected[i + 1] is the label of input position i
    stream = torch.full((L + 1,), ds.pad_id)
    for d, s in enumerate(samples):
        answer = BYTES.encode(s.target) + [BYTES.eos_id]
        n = len(s.prompt_ids) + len(answer)
        stream[start : start + n] = torch.tensor(s.prompt_ids + answer)
        expected[start + len(s.prompt_ids) : start + n] = torch.tensor(answer)
        end = min(start + n, L)
        assert (doc[start:end] == d).all() and torch.equal(pos[start:end], torch.arange(end - start))
        start += n
    assert samples and start <= L + 1
    if start < L:  # padding: its own document, positions from 0, no labels
        assert (doc[start:] == len(samples)).all() and (inp[start:] == ds.pad_id).all()
        assert torch.equal(pos[start:], torch.arange(L - start))
    assert torch.equal(inp, stream[:-1])
    assert torch.equal(lab, expected[1:])  # exactly the answer tokens and their EOS carry labels
    assert (lab != -100).sum() == sum(len(BYTES.encode(s.target)) + 1 for s in samples)
    return window, samples


def test_synthetic_label_mask_covers_exactly_the_answers():
    ds = SyntheticTaskDataset(BYTES, tasks="all", lengths=[300, 700], seq_len=1024, seed=5, corpus_docs=DOCS)
    n_docs = []
    for w in range(6):
        _, samples = _check_window(ds, w)
        n_docs.append(len(samples))
        assert all(s.split == "train" for s in samples)
    assert max(n_docs) >= 2  # several samples are packed into one window


def test_synthetic_resume_is_exact_and_sharded():
    def make(**kw):
        return SyntheticTaskDataset(BYTES, tasks=["niah_single", "vt", "cwe"], lengths=[200, 400], seq_len=512, seed=1,
                                    corpus_docs=DOCS, **kw)

    ds = make()
    it = iter(ds)
    first = [next(it) for _ in range(3)]
    state = ds.state_dict()
    rest = [next(it) for _ in range(2)]
    ds2 = make()
    ds2.load_state_dict(json.loads(json.dumps(state)))  # the state is plain JSON
    it2 = iter(ds2)
    for a, b in zip(rest, [next(it2) for _ in range(2)]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    ds.load_state_dict(state)
    with pytest.raises(RuntimeError):
        next(it)  # an iterator created before load_state_dict is stale
    shard = make(dp_rank=1, dp_degree=2)
    s_it = iter(shard)
    assert torch.equal(next(s_it)["input"], first[1]["input"]) and torch.equal(next(s_it)["input"], rest[0]["input"])
    with pytest.raises(ValueError):
        make(dp_rank=0, dp_degree=2).load_state_dict(state)


def test_synthetic_mixes_with_packed_data():
    from torchtitan_rtpurbo.data.dataset import MixtureDataset, PackedTokenDataset, StatefulBatchLoader

    syn = SyntheticTaskDataset(BYTES, tasks=["niah_single"], lengths=[200], seq_len=256, seed=0, corpus_docs=DOCS)
    packed = PackedTokenDataset(DOCS, BYTES, seq_len=256, seed=0)
    loader = StatefulBatchLoader(MixtureDataset([packed, syn], [0.5, 0.5], seed=0), batch_size=4)
    batch = next(iter(loader))
    assert batch["input"].shape == (4, 256) and batch["doc_ids"].shape == (4, 256)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_smoke(tmp_path, sp_tokenizer):
    cmd = [sys.executable, str(REPO / "scripts" / "eval_long.py"), "--model", "rand=random:debug", "--tokenizer",
           str(sp_tokenizer.path), "--tasks", "niah_single", "--lengths", "160", "--samples", "1", "--device", "cpu",
           "--dtype", "float32", "--max-new-tokens", "2", "--out-dir", str(tmp_path), "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| niah_single" in out.stdout and (tmp_path / "results.json").is_file()
