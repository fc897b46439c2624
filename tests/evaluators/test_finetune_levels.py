"""Fine-tuning a candidate whose weights come from a level database: it trains the stored weights
(masked ones stay zero), and afterwards the live model and the database files are exactly as before."""

from __future__ import annotations

import torch

from tiny_models import tiny_model

from evoprune.evaluators import EvalContext, finetune
from evoprune.pruning import Pruner, levels_from_space
from evoprune.space import SearchSpace


def test_finetune_trains_the_database_weights_and_undoes_it(tmp_path):
    model = tiny_model("llama")
    calib = torch.randint(3, 97, (8, 24), generator=torch.Generator().manual_seed(0))
    pruner = Pruner(model, calib)
    space = SearchSpace.from_model(pruner.spec, attention=None, mlp=False, sparsity_levels=(0.0, 0.5),
                                   sparsity_method="sparsegpt")
    pruner.use_levels(levels_from_space(space), cache_dir=tmp_path)
    db = pruner.strategy.db
    cand = space.candidate_from_levels({g.name: g.top for g in space.genes})
    ids = (torch.arange(20_000) * 31 + 7) % 97
    ctx = EvalContext(eval_ids=ids, train_ids=ids, cache_dir=False, pruner=pruner)
    probe = calib[:2]
    with pruner.applied(cand):
        before = model(probe).logits
        stored = {p: p.detach().clone() for p in pruner.masks}
        with finetune(model, ctx, tokens=512, seq_len=32, lr=1e-2, batch_size=4, verify="exact"):
            assert any(not torch.equal(p, w) for p, w in stored.items())  # the stored weights train
            for p, m in pruner.masks.items():
                assert torch.equal(p != 0, stored[p] != 0) and torch.equal(m, stored[p] != 0)
        assert torch.equal(model(probe).logits, before)
    assert db.verify(range(pruner.spec.num_layers)) == []  # copy-on-write: the files never changed
    with pruner.applied(cand):
        assert torch.equal(model(probe).logits, before)
