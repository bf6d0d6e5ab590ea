import os
import sys

import pytest
import torch

# Make tests/models.py importable as `models` from every test file.
sys.path.insert(0, os.path.dirname(__file__))
# Subprocesses (the CLI, examples, torchrun workers) import this checkout too, not another installed copy.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from models import TINY_VOCAB, tiny_model  # noqa: E402

# The tests run tiny models whose ops are dominated by per-op overhead; a second thread only adds contention
# (and makes timings on a shared 2-core machine erratic).
torch.set_num_threads(1)


@pytest.fixture
def tiny_model_factory():
    return tiny_model


@pytest.fixture
def tiny_vocab():
    return TINY_VOCAB


@pytest.fixture
def trainer_can_resume(monkeypatch):
    """transformers < 4.51 loads its own rng_state.pth with torch.load's default, which torch 2.6+ refuses
    (weights_only). Its users resume a checkpoint they trust this way; the code under test is not theirs or ours."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("4.51") and Version(torch.__version__) >= Version("2.6"):
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

# The torchrun workers are scripts, not test modules (and import lightning or deepspeed where those are optional).
collect_ignore = ["dist_scripts"]
