"""The model zoo: every family builds quickly, runs, and is the same model for the same seed."""
import time

import pytest
import torch
from zoo import ZOO, tiny_model, tiny_samples


@pytest.fixture(scope="module", autouse=True)
def _warm():
    # transformers' shared machinery loads on the first build (~1.5 s); time each family without it
    tiny_model("llama")


@pytest.mark.parametrize("name", ZOO)
def test_builds_fast_and_gives_finite_logits(name):
    start = time.perf_counter()
    model = tiny_model(name)
    assert time.perf_counter() - start < 2.0
    ids = tiny_samples(model)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (8, 32, model.get_input_embeddings().num_embeddings)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ZOO)
def test_same_seed_same_model(name):
    rng = torch.get_rng_state()
    a, b, c = tiny_model(name, seed=0), tiny_model(name, seed=0), tiny_model(name, seed=1)
    assert torch.equal(rng, torch.get_rng_state())  # building leaves the global generator alone
    ids = tiny_samples(a, n=2)
    with torch.no_grad():
        la, lb, lc = a(ids).logits, b(ids).logits, c(ids).logits
    assert torch.equal(la, lb)
    assert not torch.allclose(la, lc)
