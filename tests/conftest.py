"""Shared fixtures; model factories live in tiny_models.py."""

from __future__ import annotations

import os

import pytest
import torch

from tiny_models import ARCHS, tiny_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch):
    return tiny_model(arch)
