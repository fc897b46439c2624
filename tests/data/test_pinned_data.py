"""Pinned evaluation data: fixed windows (``windows: first`` or a list of offsets) instead of random
windows per stage and seed, token files (``.pt``, ``.npy``, ``.u16.bin`` / ``.u32.bin``) as data,
and one-line errors for files that are neither UTF-8 text nor valid token files."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import optuna
import pytest
import torch
import yaml
from helpers import char_tokenizer as _char_tokenizer
from helpers import dump, tiny_text_config as tiny_config
from tiny_models import tiny_model

from evoprune._cli import main
from evoprune.data._sources import load_splits, load_token_file, token_stream
from evoprune.evaluators import EvalContext, make_token_set
from evoprune.search import StudyConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)

WORDS = ["the", "king", "of", "a", "sword", "and", "crown", "night", "falls", "thou", "art"]


def _text(seed: int, n: int = 1500) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    """A saved tiny llama + character tokenizer (vocab 97), text files and the validation text's
    ids written in every token-file format."""
    root = tmp_path_factory.mktemp("pinned")
    model_dir = root / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tok = _char_tokenizer()
    tok.save_pretrained(model_dir)
    data = root / "data"
    data.mkdir()
    (data / "train.txt").write_text(_text(0), encoding="utf-8")
    (data / "valid.txt").write_text(_text(1), encoding="utf-8")
    ids = token_stream(tok, [_text(1)])
    torch.save(ids, data / "valid.pt")
    np.save(data / "valid.npy", ids.numpy().astype(np.int32))
    ids.numpy().astype("<u2").tofile(data / "valid.u16.bin")
    ids.numpy().astype("<u4").tofile(data / "valid.u32.bin")
    ids.numpy().astype("<u2").tofile(data / "valid.bin")  # dtype from data.token_dtype
    # bad files
    (data / "latin1.txt").write_bytes("Caf\xe9 au lait, d\xe9j\xe0 vu. ".encode("latin-1") * 200)
    np.save(data / "big_ids.npy", np.array([5, 6, 4000, 7] * 500, dtype=np.int64))
    np.save(data / "floats.npy", np.ones(100, dtype=np.float32))
    np.save(data / "matrix.npy", np.ones((10, 10), dtype=np.int64))
    (data / "odd.u32.bin").write_bytes(b"\x01\x02\x03")
    torch.save({"ids": ids}, data / "dict.pt")
    return {"root": root, "model": model_dir, "data": data, "tok": tok, "ids": ids}


def _config(w: dict[str, Any], validation: str = "valid.txt", **changes: Any) -> dict[str, Any]:
    """test_bad_input's tiny config on this world's model and files (3 trials, its own cache)."""
    data = {"source": "text", "train": [str(w["data"] / "train.txt")], "validation": [str(w["data"] / validation)]}
    data.update(changes.pop("data", {}))
    return tiny_config(w["data"], model=str(w["model"]), data=data, stop={"n_trials": 3},
                       cache_dir=str(w["root"] / "cache"), **changes)


# --------------------------------------------------------------------------- windows


def test_first_windows_are_exactly_the_first_tokens():
    ids = torch.randint(0, 97, (5000,), generator=torch.Generator().manual_seed(0))
    for stage, seed in (("s1", 0), ("final", 7)):
        ts = make_token_set(ids, num_tokens=300, seq_len=64, stage=stage, seed=seed, windows="first")
        assert torch.equal(ts.ids, ids[: 5 * 64].view(5, 64))  # ceil(300 / 64) = 5 whole windows
    ctx = EvalContext(eval_ids=ids, seed=3, eval_windows="first")
    small = ctx.for_stage("s1", eval_tokens=128, seq_len=64).tokens
    large = ctx.for_stage("final", eval_tokens=1024, seq_len=64).tokens
    assert torch.equal(large.ids.flatten(), ids[:1024]) and torch.equal(large.ids[:2], small.ids)
    with pytest.raises(ValueError, match="only 5000 tokens"):
        make_token_set(ids, num_tokens=6000, seq_len=64, stage="s", windows="first")


def test_offsets_give_exactly_those_windows_in_order():
    ids = torch.arange(10_000)
    offsets = [4000, 0, 9000, 123]
    ts = make_token_set(ids, num_tokens=3 * 100, seq_len=100, stage="s", seed=5, windows=offsets)
    assert ts.ids.tolist() == [list(range(o, o + 100)) for o in offsets[:3]]
    more = make_token_set(ids, num_tokens=400, seq_len=100, stage="s", seed=5, windows=offsets)
    assert torch.equal(more.ids[:3], ts.ids)  # a larger num_tokens extends a smaller one
    again = make_token_set(ids, num_tokens=300, seq_len=100, stage="other", seed=9, windows=tuple(offsets))
    assert torch.equal(again.ids, ts.ids)  # stage and seed do not move pinned windows
    ctx = EvalContext(eval_ids=ids, eval_windows=offsets)
    assert ctx.for_stage("s1", eval_tokens=200, seq_len=100).tokens.ids[:, 0].tolist() == [4000, 0]
    # fine-tuning windows stay random
    train = EvalContext(eval_ids=ids, train_ids=ids, eval_windows="first").token_set(200, 100, split="train")
    assert train.ids[:, 0].tolist() != [0, 100]


@pytest.mark.parametrize("windows, words", [
    ([0, 50], "overlap at seq_len 100"),
    ([0, 9950], "runs past the end of the data (10000 tokens)"),
    ([0], "only 1 offsets"),
    ([0, "100"], "window offsets are ints"),
    ([0, 1.5], "window offsets are ints"),
    ([0, True], "window offsets are ints"),
    ([-100, 0], ">= 0"),
    ([0, 0], "twice"),
    ([], "empty list"),
    ("last", "'random', 'first' or a list"),
])
def test_bad_offsets_are_one_line_errors(windows, words):
    with pytest.raises(ValueError) as info:
        make_token_set(torch.arange(10_000), num_tokens=200, seq_len=100, stage="s", windows=windows)
    assert words in str(info.value) and "\n" not in str(info.value)


# hard-coded from make_token_set before pinned windows existed (evoprune 9b80b93)
_DEFAULT_EVAL_STARTS = [12288, 12224, 896, 6336, 10496, 8576, 10624, 13376, 6272, 6592]
_DEFAULT_EVAL_KEY = "11aac0ea2269a0e9"
_DEFAULT_CALIB_STARTS = [17920, 8640, 18976, 19392, 5984, 8832, 9760, 4352]
_DEFAULT_CALIB_KEY = "45f36c5dbb86e972"


def test_default_random_windows_are_unchanged():
    ids = torch.arange(20_000)
    ctx = EvalContext(eval_ids=ids, seed=3, data_fingerprint="fp")
    ts = ctx.for_stage("s1", eval_tokens=640, seq_len=64).tokens
    assert ts.ids[:, 0].tolist() == _DEFAULT_EVAL_STARTS and ts.key == _DEFAULT_EVAL_KEY
    plain = make_token_set(ids, num_tokens=640, seq_len=64, stage="eval:s1", seed=3, data_fingerprint="fp")
    assert torch.equal(plain.ids, ts.ids) and plain.key == ts.key
    calib = make_token_set(ids, num_tokens=256, seq_len=32, stage="calibration", seed=0, data_fingerprint="cfp",
                           windows="random")
    assert calib.ids[:, 0].tolist() == _DEFAULT_CALIB_STARTS and calib.key == _DEFAULT_CALIB_KEY


def test_config_windows_syntax_and_unchanged_default_fingerprint():
    base = {"stages": [{"name": "final", "evaluators": ["kl"], "eval_tokens": 512, "seq_len": 256}]}
    cfg = StudyConfig.from_dict(base)
    assert cfg.data.windows == "random" and cfg.calibration.windows == "random"
    d = cfg.to_dict()
    assert "windows" not in d["data"] and "token_dtype" not in d["data"] and "windows" not in d["calibration"]
    explicit = StudyConfig.from_dict({**base, "data": {"windows": "random"},
                                      "calibration": {"num_sequences": 32, "seq_len": 256, "windows": "random"}})
    assert explicit == cfg and explicit.fingerprint == cfg.fingerprint
    first = StudyConfig.from_dict({**base, "data": {"windows": "first"}})
    pinned = StudyConfig.from_dict({**base, "data": {"windows": [0, 1024, 512]},
                                    "calibration": {"num_sequences": 2, "seq_len": 256, "windows": "first"}})
    assert pinned.data.windows == (0, 1024, 512) and pinned.to_dict()["data"]["windows"] == [0, 1024, 512]
    assert StudyConfig.from_dict(pinned.to_dict()) == pinned
    assert StudyConfig.from_dict(yaml.safe_load(pinned.to_yaml())) == pinned
    assert len({cfg.fingerprint, first.fingerprint, pinned.fingerprint}) == 3


@pytest.mark.parametrize("changes, words", [
    ({"data": {"windows": [0, 100]}}, "StudyConfig.data.windows: stage 'final' needs 2 windows of 256 tokens; the "
                                      "windows at offsets 0 and 100 overlap"),
    ({"data": {"windows": [0]}}, "stage 'final' needs 2 windows of 256 tokens, but only 1 offsets"),
    ({"data": {"windows": [0, "x"]}}, "StudyConfig.data.windows[1] is 'x'"),
    ({"data": {"windows": 7}}, "StudyConfig.data.windows must be 'random', 'first'"),
    ({"calibration": {"num_sequences": 2, "seq_len": 64, "windows": [0, 10]}},
     "StudyConfig.calibration.windows: calibration needs 2 windows of 64 tokens; the windows at offsets 0 and 10"),
    ({"data": {"token_dtype": "int8"}}, "token_dtype must be 'uint16' or 'uint32'"),
])
def test_bad_windows_fail_when_the_config_is_built(changes, words):
    base = {"stages": [{"name": "final", "evaluators": ["kl"], "eval_tokens": 512, "seq_len": 256}]}
    with pytest.raises(ValueError) as info:
        StudyConfig.from_dict({**base, **changes})
    assert words in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- token files


@pytest.mark.parametrize("name, extra", [("valid.pt", {}), ("valid.npy", {}), ("valid.u16.bin", {}),
                                         ("valid.u32.bin", {}), ("valid.bin", {"token_dtype": "uint16"})])
def test_every_token_file_format_loads_the_ids_of_the_text_path(world, name, extra):
    text_cfg = StudyConfig.from_dict(_config(world)).data
    file_cfg = StudyConfig.from_dict(_config(world, name, data=extra)).data
    from_text = load_splits(text_cfg, world["tok"])
    from_file = load_splits(file_cfg, world["tok"], vocab_size=97)
    assert from_text["validation"].dtype == from_file["validation"].dtype == torch.long
    assert torch.equal(from_file["validation"], from_text["validation"])
    assert torch.equal(from_file["validation"], world["ids"])
    assert torch.equal(from_file["train"], from_text["train"]) and torch.equal(from_file["calibration"],
                                                                            from_text["train"])


def test_text_and_token_files_mix_in_order(world):
    d = world["data"]
    cfg = StudyConfig.from_dict(_config(world, data={"validation": [str(d / "train.txt"), str(d / "valid.npy"),
                                                                    str(d / "valid.txt")]})).data
    got = load_splits(cfg, world["tok"])["validation"]
    train = token_stream(world["tok"], [_text(0)])
    assert torch.equal(got, torch.cat([train, world["ids"], world["ids"]]))


@pytest.mark.parametrize("name, words", [
    ("big_ids.npy", ("big_ids.npy", "token id 4000 (its max id)", "97 entries")),
    ("floats.npy", ("floats.npy", "float32", "1-D integer")),
    ("matrix.npy", ("matrix.npy", "(10, 10)", "1-D integer")),
    ("odd.u32.bin", ("odd.u32.bin", "3 bytes", "multiple of 4")),
    ("dict.pt", ("dict.pt", "holds a dict", "torch.save")),
    ("valid.bin", ("valid.bin", "*.u16.bin", "token_dtype")),
    ("latin1.txt", ("latin1.txt", "not UTF-8 text", "re-encode", "token file")),
])
def test_bad_data_files_are_one_line_errors_naming_the_file(world, name, words):
    cfg = StudyConfig.from_dict(_config(world, name)).data
    with pytest.raises(ValueError) as info:
        load_splits(cfg, world["tok"], vocab_size=97)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("StudyConfig.data.validation: ")
    for word in words:
        assert word in msg, msg


def test_load_token_file_rejects_negative_ids(tmp_path):
    np.save(tmp_path / "neg.npy", np.array([3, -1, 4]))
    with pytest.raises(ValueError, match=r"neg\.npy holds negative token id -1"):
        load_token_file(tmp_path / "neg.npy")


# --------------------------------------------------------------------------- end to end


def test_search_on_a_token_file_with_pinned_windows(world):
    from evoprune.study import create_study

    url = f"sqlite:///{world['root'] / 'e2e.db'}"
    cfg = StudyConfig.from_dict(_config(world, "valid.u16.bin", data={"windows": [320, 0, 640]},
                                        calibration={"num_sequences": 2, "seq_len": 32, "windows": "first"}))
    with create_study(cfg, storage=url, study_name="tok", runtime=True) as study:
        rt = study.runtime
        val = world["ids"]
        assert torch.equal(rt.context.eval_ids, val)
        stage = rt.context.for_stage("final", eval_tokens=64, seq_len=32).tokens
        assert stage.ids.tolist() == [val[320:352].tolist(), val[0:32].tolist()]
        train = token_stream(world["tok"], [_text(0)])
        assert torch.equal(rt.calib_ids, train[:64].view(2, 32))
        study.run(n_trials=3)
        assert sum(t.state.name == "COMPLETE" for t in study.trials()) == 3
    # the same through the CLI, windows: first, a .npy validation file
    path = world["root"] / "cli.yaml"
    path.write_text(yaml.safe_dump(_config(world, "valid.npy", data={"windows": "first"})), encoding="utf-8")
    assert main(["search", str(path), "--storage", url, "--study", "cli"]) == 0
    assert len(optuna.load_study(study_name="cli", storage=url).trials) == 3


_dump = dump  # test_bad_input's: every row of every table, None without a database


@pytest.mark.parametrize("validation, changes, words", [
    ("latin1.txt", {}, ("latin1.txt", "not UTF-8 text", "re-encode", "token file")),
    ("big_ids.npy", {}, ("big_ids.npy", "token id 4000", "97 entries")),
    ("valid.bin", {}, ("valid.bin", "token_dtype")),
    ("valid.npy", {"data": {"windows": [0, 16]}}, ("data.windows", "overlap")),
    ("valid.npy", {"data": {"windows": [0, 1.5]}}, ("data.windows[1]", "ints")),
    ("valid.npy", {"data": {"windows": [0, 10**6]}}, ("data.windows", "runs past the end", "offsets <=")),
])
def test_cli_bad_data_prints_one_line_and_writes_no_row(world, capsys, validation, changes, words):
    url = f"sqlite:///{world['root'] / 'bad.db'}"
    before = _dump(url)
    path = world["root"] / "bad.yaml"
    path.write_text(yaml.safe_dump(_config(world, validation, **changes)), encoding="utf-8")
    assert main(["search", str(path), "--storage", url, "--study", "bad"]) == 1
    captured = capsys.readouterr()
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("evoprune: error:")]
    assert len(errors) == 1 and "Traceback" not in captured.out + captured.err, captured.err
    for word in words:
        assert word in errors[0], errors[0]
    assert _dump(url) == before is None, "the search wrote to the database"
