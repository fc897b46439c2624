"""evoprune: compress pretrained causal language models by evolutionary architecture search.

Public API (see README.md for runnable examples)::

    import evoprune
    from evoprune.space import Candidate, LayerConfig, SearchSpace
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
