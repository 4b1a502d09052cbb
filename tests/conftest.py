"""Shared test set-up: offline hub, small thread counts, the optional real-data folder."""
import os
from pathlib import Path

import pytest

# Hub look-ups otherwise retry for a minute before failing (DEVELOPERS.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _need(sub: str) -> Path:
    p = SHARED / sub
    if not p.exists():
        pytest.skip(f"real-data folder {p} is absent: these tests read ../shared/{sub} beside the "
                    f"checkout (not part of the repository)")
    return p


@pytest.fixture
def cub_dir() -> Path:
    """../shared/data/cub-birds: 832 real bird photographs, generic CSV metadata."""
    return _need("data/cub-birds")


@pytest.fixture
def formats_dir() -> Path:
    """../shared/formats: real excerpts of iNat 2021, FishNet and BIOSCAN metadata."""
    return _need("formats")


@pytest.fixture(autouse=True, scope="session")
def _threads():
    try:
        import torch
    except ImportError:
        return
    # pytest -n 2 on a 2-core machine: one thread per worker avoids oversubscription
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sd15_dir(tmp_path_factory) -> Path:
    """A tiny random SD v1.5 stand-in in exact diffusers format (tests/sdstub.py), BPE tokenizer files."""
    from sdstub import write_sd15_stub
    return write_sd15_stub(tmp_path_factory.mktemp("sd15") / "sd15", "bpe")


@pytest.fixture(scope="session")
def sd15_json_dir(tmp_path_factory) -> Path:
    """The same stand-in with tokenizer.json only, as current transformers saves a tokenizer."""
    from sdstub import write_sd15_stub
    return write_sd15_stub(tmp_path_factory.mktemp("sd15j") / "sd15", "json")


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory) -> Path:
    """torch-fidelity's FID Inception at random init, saved where --fid-weights can point (the real
    weights cannot be downloaded here; the code path is the same)."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from taxadiffusion.evaluation import fid
    with pytest.MonkeyPatch.context() as m:   # its constructor always loads weights: stubbed here
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path_factory.mktemp("inception") / fid.INCEPTION_FILE
    torch.save(net.state_dict(), weights)
    return weights


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: two threads spin against other processes on a busy 2-core
    machine (modules ask for it with `pytest.mark.usefixtures("one_thread")`)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
