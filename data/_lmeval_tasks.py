"""lm-eval task files for the held-out ``test`` split of the reference corpus.

Two tasks, each a YAML file plus a JSONL file, loadable with
``lm_eval.tasks.TaskManager(include_path=<dir>)``:

``evoprune_ref_ppl``
    ``loglikelihood_rolling`` over passages of the test documents (paragraphs
    packed to about :data:`PPL_PASSAGE_CHARS` characters); metrics
    ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte``.
``evoprune_ref_cloze``
    Multiple choice: a passage of a few lines, then the true next line among
    four; the three distractors are lines of similar length from *other* test
    documents. Metrics ``acc`` and ``acc_norm``; chance is 0.25.

lm-eval 0.4.13 hands ``dataset_kwargs`` to ``datasets.load_dataset("json",
...)``, which resolves relative ``data_files`` against the *working
directory*, not the YAML; the YAML therefore holds absolute paths. After
moving a checkpoint, ``build_reference_model(out=<new place>)`` (or
``evoprune reference-model --out DIR``) rewrites them without retraining;
:func:`write_lmeval_tasks` / ``evoprune reference-tasks --out DIR`` writes the
tasks anywhere. Everything is a deterministic function of the corpus.

The cloze task also reports lm-eval's ``acc_mutual_info`` (choice log-likelihood
given the passage minus given nothing): a small model's raw ``acc`` is
dominated by how likely each line is on its own, and the mutual-information
score isolates what the passage contributes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any

from ._corpus import ReferenceCorpus
from .._logging import get_logger

__all__ = ["CLOZE_TASK", "PPL_TASK", "cloze_items", "lmeval_tasks_up_to_date", "ppl_passages", "write_lmeval_tasks"]

_log = get_logger("lmeval_tasks")

PPL_TASK = "evoprune_ref_ppl"
CLOZE_TASK = "evoprune_ref_cloze"
PPL_PASSAGE_CHARS = 2000
CLOZE_ITEMS = 400
CLOZE_CONTEXT_LINES = 4  # non-empty lines before the answer
_MIN_LINE = 25  # characters in a candidate answer / distractor line
_TASKS_FORMAT_VERSION = 2  # bump whenever the task files change


def ppl_passages(corpus: ReferenceCorpus, split: str = "test") -> list[dict[str, Any]]:
    """Documents of ``split`` cut at blank lines into ~2000-character passages."""
    out: list[dict[str, Any]] = []
    for doc in corpus.documents(split):
        paragraphs = [p for p in doc.text.split("\n\n") if p.strip()]
        buf: list[str] = []
        size = 0
        for p in paragraphs:
            buf.append(p)
            size += len(p) + 2
            if size >= PPL_PASSAGE_CHARS:
                out.append({"source": doc.name, "text": "\n\n".join(buf)})
                buf, size = [], 0
        if buf:
            out.append({"source": doc.name, "text": "\n\n".join(buf)})
    for i, row in enumerate(out):
        row["id"] = i
    return out


def _is_content_line(line: str) -> bool:
    s = line.strip()
    return len(s) >= _MIN_LINE and not s.startswith("[") and bool(re.search(r"[a-z]", s))


def _rng(tag: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(tag.encode()).digest()[:8], "big"))


def cloze_items(corpus: ReferenceCorpus, split: str = "test", n: int = CLOZE_ITEMS) -> list[dict[str, Any]]:
    """Deterministic next-line multiple-choice items from ``split`` (see module docstring)."""
    docs = corpus.documents(split)
    if len(docs) < 2:
        raise ValueError(f"the {split!r} split needs at least two documents for cross-document distractors")
    lines = {d.name: d.text.split("\n") for d in docs}
    positions: list[tuple[str, int]] = []
    for d in docs:
        ls = lines[d.name]
        nonempty_before = 0
        for i, line in enumerate(ls):
            if nonempty_before >= CLOZE_CONTEXT_LINES and ls[i - 1].strip() and _is_content_line(line):
                positions.append((d.name, i))
            if line.strip():
                nonempty_before += 1
    # Distractors come from the same kind of position as answers (a content line
    # right after a non-empty line), so answers and distractors differ only in
    # where they belong, not in what lines they are.
    pool: dict[str, list[str]] = {d.name: [] for d in docs}
    for name, i in positions:
        pool[name].append(lines[name][i].strip())
    rng = _rng(f"evoprune-cloze:{corpus.fingerprint}:{split}")
    rng.shuffle(positions)
    taken: dict[str, list[int]] = {}
    chosen: list[tuple[str, int]] = []
    for name, i in positions:  # keep items apart so no answer sits in another item's passage
        if all(abs(i - k) > 3 * CLOZE_CONTEXT_LINES for k in taken.get(name, ())):
            taken.setdefault(name, []).append(i)
            chosen.append((name, i))
            if len(chosen) == n:
                break
    chosen.sort()
    items: list[dict[str, Any]] = []
    for name, i in chosen:
        ls = lines[name]
        j, seen = i, 0
        while j > 0 and seen < CLOZE_CONTEXT_LINES:
            j -= 1
            if ls[j].strip():
                seen += 1
        context = "\n".join(ls[j:i]).strip("\n")
        answer = ls[i].strip()
        others = [line for other, pl in pool.items() if other != name for line in pl if line != answer]
        for tolerance in (0.1, 0.2, 0.4, None):  # length within +-10% (at least 3 chars), widening if needed
            near = others if tolerance is None else [
                line for line in others if abs(len(line) - len(answer)) <= max(3, tolerance * len(answer))
            ]
            if len(set(near)) >= 3:
                break
        distractors: list[str] = []
        while len(distractors) < 3:
            cand = rng.choice(near)
            if cand not in distractors:
                distractors.append(cand)
        label = rng.randrange(4)
        choices = distractors[:label] + [answer] + distractors[label:]
        items.append({"id": len(items), "source": name, "context": context, "choices": choices, "label": label})
    return items


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _yaml(task: str, data_file: str, body: dict[str, Any], fingerprint: str) -> str:
    import yaml

    cfg: dict[str, Any] = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "test_split": "test",
        **body,
        "metadata": {"version": float(_TASKS_FORMAT_VERSION), "corpus_fingerprint": fingerprint},
    }
    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:  # "\n" rather than a folded block
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)

    _Dumper.add_representer(str, _str)
    header = (
        f"# Written by evoprune (write_lmeval_tasks) from the reference corpus {fingerprint[:16]}.\n"
        "# data_files is absolute: datasets resolves relative paths against the working directory.\n"
    )
    return header + yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def write_lmeval_tasks(
    directory: str | os.PathLike[str],
    corpus: ReferenceCorpus,
    *,
    final_directory: str | os.PathLike[str] | None = None,
) -> Path:
    """Write both lm-eval tasks (YAML + JSONL) into ``directory``; returns it.

    Use the result as ``TaskManager(include_path=str(path))`` and the task
    names :data:`PPL_TASK` / :data:`CLOZE_TASK`. ``final_directory`` is the
    absolute path the folder will have when used, if it is being written into a
    staging folder that is renamed later; the YAML files point there.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = Path(final_directory if final_directory is not None else directory).resolve()

    passages = ppl_passages(corpus)
    _write_jsonl(directory / f"{PPL_TASK}.jsonl", passages)
    (directory / f"{PPL_TASK}.yaml").write_text(
        _yaml(
            PPL_TASK,
            str(final / f"{PPL_TASK}.jsonl"),
            {
                "output_type": "loglikelihood_rolling",
                "doc_to_text": "",
                "doc_to_target": "{{text}}",
                "metric_list": [
                    {"metric": "word_perplexity"},
                    {"metric": "byte_perplexity"},
                    {"metric": "bits_per_byte"},
                ],
            },
            corpus.fingerprint,
        ),
        encoding="utf-8",
    )

    items = cloze_items(corpus)
    _write_jsonl(directory / f"{CLOZE_TASK}.jsonl", items)
    (directory / f"{CLOZE_TASK}.yaml").write_text(
        _yaml(
            CLOZE_TASK,
            str(final / f"{CLOZE_TASK}.jsonl"),
            {
                "output_type": "multiple_choice",
                "doc_to_text": "{{context}}",
                "doc_to_choice": "choices",
                "doc_to_target": "label",
                "target_delimiter": "\n",
                "metric_list": [
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_mutual_info", "aggregation": "mean", "higher_is_better": True},
                ],
            },
            corpus.fingerprint,
        ),
        encoding="utf-8",
    )
    _log.info(
        "wrote lm-eval tasks",
        extra={"fields": {"dir": str(final), "ppl_docs": len(passages), "cloze_items": len(items)}},
    )
    return directory


def lmeval_tasks_up_to_date(directory: str | os.PathLike[str], corpus: ReferenceCorpus) -> bool:
    """Whether ``directory`` holds this version's task files for ``corpus``, pointing at themselves."""
    import yaml

    directory = Path(directory).resolve()
    for task in (PPL_TASK, CLOZE_TASK):
        try:
            cfg = yaml.safe_load((directory / f"{task}.yaml").read_text(encoding="utf-8"))
            meta, data = cfg["metadata"], Path(cfg["dataset_kwargs"]["data_files"]["test"])
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
            return False
        if (
            meta.get("version") != float(_TASKS_FORMAT_VERSION)
            or meta.get("corpus_fingerprint") != corpus.fingerprint
            or data != directory / f"{task}.jsonl"
            or not data.is_file()
        ):
            return False
    return True
