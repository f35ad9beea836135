"""Per-group statistics (`token_groups`) of dft_loss and fused_dft_loss against a float64 computation per group.

The group sums match the definition group by group, add up to the global statistics, leave the loss and its
gradients unchanged, follow each target's own label (packed rows mix groups), and cost the fused path no
`[tokens, vocab]` block.
"""

from __future__ import annotations

import pytest
import torch

from core.keys import IGNORE_INDEX
from core.metric_sums import GROUP_SUM_COLUMNS
from dft.loss import dft_loss, fused_dft_loss
from tests.helpers import LOSS_VOCAB, float32_bound, leaves, num_valid, random_inputs, relative_error

NUM_GROUPS = 4  # group 3 is never used: its row must be zeros
COUNT = GROUP_SUM_COLUMNS.index("num_tokens")

# The sums are float64, but of float32 per-token values: each CE_t carries the float32 rounding of a log-softmax over
# the vocabulary, about eps * sqrt(LOSS_VOCAB = 37) relative (the per-group sums have at most 36 terms, fewer than
# that). Every column of floats is compared with the float64 definition, relative in norm, at 4 * eps * sqrt(37) =
# 2.9e-6 (measured at most 3.6e-7 with 1 or 2 threads); a token in the wrong group or a wrong weight moves a column by
# 1e-2 or more. The token counts are integers and must be exact.
FLOAT32_BOUND = float32_bound(LOSS_VOCAB)


def assert_sums_close(name: str, sums: torch.Tensor, expected: torch.Tensor) -> None:
    """Counts exactly; each float column (over the groups) within FLOAT32_BOUND of float64, relative in norm."""
    assert torch.equal(sums[:, COUNT], expected[:, COUNT]), f"{name}: token counts {sums[:, COUNT]}"
    for column, title in enumerate(GROUP_SUM_COLUMNS):
        if column != COUNT:
            error = relative_error(sums[:, column], expected[:, column])
            assert error <= FLOAT32_BOUND, f"{name}: {title}: relative error in norm {error:.2e}"


def token_groups(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Groups that change inside rows, as in a packed row: runs of random length from groups 0..2."""
    generator = torch.Generator().manual_seed(seed)
    run_ids = torch.cumsum(torch.rand(labels.shape, generator=generator) < 0.3, dim=-1)
    return (run_ids + torch.arange(labels.size(0))[:, None]) % (NUM_GROUPS - 1)


def float64_group_sums(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    alpha: float,
    num_groups: int = NUM_GROUPS,
) -> torch.Tensor:
    """`GROUP_SUM_COLUMNS` per group from the definition, in float64; a target counts in its own label's group."""
    log_probs = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)[:, :-1]
    targets, target_groups = labels[:, 1:], groups[:, 1:]
    nll = -log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    p = torch.exp(-nll)
    weighted = nll * (alpha * p + (1 - alpha))
    rows = []
    for group in range(num_groups):
        mask = (targets != IGNORE_INDEX) & (target_groups == group)
        rows.append(torch.stack([p[mask].sum(), nll[mask].sum(), weighted[mask].sum(), mask.sum().double()]))
    return torch.stack(rows)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_group_sums_match_float64_per_group_and_leave_the_loss_alone(alpha: float, implementation: str) -> None:
    hidden, weight, _, labels = random_inputs(11, batch=3, seq=13)
    groups = token_groups(labels)
    expected = float64_group_sums(hidden, weight, labels, groups, alpha)
    assert (expected[:3, -1] > 0).all() and expected[3].abs().sum() == 0  # every used group has tokens

    def run(**group_kwargs: object) -> tuple[torch.Tensor, object, list[torch.Tensor]]:
        h, w = leaves(hidden, weight)
        if implementation == "fused":
            loss, stats = fused_dft_loss(h, w, labels, alpha, chunk_size=4, **group_kwargs)
        else:
            loss, stats = dft_loss(h @ w.T, labels, alpha, **group_kwargs)
        loss.backward()
        return loss.detach(), stats, [h.grad, w.grad]

    loss, stats, grads = run(token_groups=groups, num_groups=NUM_GROUPS)
    plain_loss, plain_stats, plain_grads = run()

    sums = stats.group_sums
    assert sums.shape == (NUM_GROUPS, len(GROUP_SUM_COLUMNS)) and sums.dtype == torch.float64
    assert not sums.requires_grad
    assert_sums_close(implementation, sums, expected)
    assert sums[3].abs().sum() == 0  # the unused group: zeros, not rounding
    # The groups partition the valid tokens: their totals are the global statistics (float32 sums of the same
    # per-token values, against float64 totals, so FLOAT32_BOUND again).
    assert sums[:, COUNT].sum().item() == num_valid(labels) == stats.num_tokens
    totals = expected.sum(0)
    assert relative_error(stats.sum_p_correct, totals[0]) <= FLOAT32_BOUND
    assert relative_error(stats.sum_nll, totals[1]) <= FLOAT32_BOUND
    # sum_t w_t CE_t over all groups is the loss before its division by the token count.
    assert relative_error(loss, totals[2] / num_valid(labels)) <= FLOAT32_BOUND
    # Asking for groups changes nothing else.
    assert torch.equal(loss, plain_loss) and plain_stats.group_sums is None
    for field in ("sum_p_correct", "sum_nll", "num_tokens"):
        assert torch.equal(getattr(stats, field), getattr(plain_stats, field)), field
    for grad, plain in zip(grads, plain_grads, strict=True):
        assert torch.equal(grad, plain)


def test_fused_and_reference_group_sums_agree_on_packed_rows() -> None:
    # A packed row: separators (IGNORE_INDEX at each sample's first label), one group per sample.
    hidden, weight, _, labels = random_inputs(12, batch=1, seq=20, ignore_share=0.0)
    lengths = [6, 9, 5]
    groups = torch.repeat_interleave(torch.tensor([2, 0, 2]), torch.tensor(lengths))[None]
    labels[0, [0, 6, 15]] = IGNORE_INDEX
    _, fused = fused_dft_loss(hidden, weight, labels, 1.0, chunk_size=3, token_groups=groups, num_groups=3)
    _, reference = dft_loss(hidden @ weight.T, labels, 1.0, token_groups=groups, num_groups=3)
    # Each path against float64 (FLOAT32_BOUND), so within twice that of each other.
    expected = float64_group_sums(hidden, weight, labels, groups, 1.0, num_groups=3)
    assert_sums_close("fused", fused.group_sums, expected)
    assert_sums_close("reference", reference.group_sums, expected)
    # Each sample's last position predicts the next sample's separator, so it is not counted anywhere.
    assert fused.group_sums[:, -1].tolist() == [8.0, 0.0, 4.0 + 5.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token_groups": torch.zeros(3, 9, dtype=torch.long)}, "num_groups=None"),
        ({"token_groups": torch.zeros(3, 8, dtype=torch.long), "num_groups": 2}, "token_groups .* do not match"),
    ],
)
@pytest.mark.parametrize("implementation", ["fused", "reference"])
def test_bad_group_arguments_are_named(kwargs: dict, message: str, implementation: str) -> None:
    hidden, weight, _, labels = random_inputs(9)
    with pytest.raises(ValueError, match=message):
        if implementation == "fused":
            fused_dft_loss(hidden, weight, labels, 1.0, **kwargs)
        else:
            dft_loss(hidden @ weight.T, labels, 1.0, **kwargs)
