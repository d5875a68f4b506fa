import pytest
import torch

from kernels.topk_softmax import reference, topk_softmax
from tests.kernels.conftest import DEVICE, DTYPES, assert_close, poisoned


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts,topk", [(1, 128, 8), (45, 128, 8), (17, 60, 4), (3, 8, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_softmax_chooses_the_top_probabilities(tokens, experts, topk, renormalize, dtype, seed):
    logits = torch.randn(tokens, experts, dtype=dtype, device=DEVICE) * 2
    weights, ids = topk_softmax(logits, topk, renormalize, weights_out=poisoned((tokens, topk), torch.float32),
                                ids_out=poisoned((tokens, topk), torch.int32))
    ref_weights, _ = reference(logits.double(), topk, renormalize)
    # ties in low precision may pick another id with the same probability: compare what was chosen, not the ids
    assert_close(weights, ref_weights, torch.float32 if dtype == torch.float32 else dtype, seed=seed)
    probs = torch.softmax(logits.double(), dim=-1)
    chosen = probs.gather(1, ids.long())
    assert_close(chosen, reference(logits.double(), topk, False)[0], dtype, seed=seed)
    assert ((ids >= 0) & (ids < experts)).all()
    assert all(len(set(row.tolist())) == topk for row in ids)  # k distinct experts per token


def test_weights_sum_to_one_when_renormalised(seed):
    weights, _ = topk_softmax(torch.randn(64, 128, device=DEVICE), 8, True)
    assert torch.allclose(weights.sum(-1), torch.ones(64, device=DEVICE), atol=1e-6)


def test_bad_topk_is_rejected():
    with pytest.raises(ValueError, match=r"topk must be between 1 and the number of experts \(16\), got 17"):
        topk_softmax(torch.randn(2, 16, device=DEVICE), 17)
    with pytest.raises(ValueError, match="gating_output must have 2 dimensions"):
        topk_softmax(torch.randn(2, 3, 16, device=DEVICE), 2)
