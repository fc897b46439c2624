"""A full disk (here: a file-size limit, EFBIG, in a subprocess) while caching importance scores or
dense logits: the caches are skipped with a warning, nothing half-written is left, the scores are right."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def test_caches_on_a_full_disk_are_skipped_and_scores_unchanged(tmp_path):
    script = textwrap.dedent(f"""
        import resource, sys
        import torch
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from tiny_models import tiny_model
        from evoprune.evaluators import EvalContext, KLToDense
        from evoprune.pruning import Pruner
        from evoprune.space import SearchSpace

        def score(cache, limit):
            torch.manual_seed(0)
            model = tiny_model("llama")
            ids = torch.randint(3, 90, (4000,), generator=torch.Generator().manual_seed(0))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            try:
                pruner = Pruner(model, ids[:64].reshape(2, 32), cache_dir=cache)
                ctx = EvalContext(eval_ids=ids, pruner=pruner, cache_dir=cache, seed=0).for_stage(
                    "s", eval_tokens=256, seq_len=32)
                kl = KLToDense(name="kl")
                kl.prepare(model, ctx)
                cand = SearchSpace.from_model(model.config).random(0)
                with pruner.applied(cand):
                    return kl.evaluate(model, cand, ctx).value
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

        full = score({str(tmp_path / "full")!r}, 512)
        roomy = score({str(tmp_path / "roomy")!r}, resource.RLIM_INFINITY)
        print("VALUES", full == roomy)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "VALUES True" in r.stdout
    assert "could not write the importance cache" in r.stderr and "could not write dense reference cache" in r.stderr
    assert list((tmp_path / "full").iterdir()) == []  # no partial files left behind
    assert sorted(p.suffix for p in (tmp_path / "roomy").iterdir()) == [".pt", ".safetensors"]
