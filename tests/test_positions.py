"""`positions=` on ablate_experts, keep_top_k, route_to (and patch_expert_outputs): at the
chosen positions the intervention acts exactly as everywhere, elsewhere nothing changes."""

from __future__ import annotations

import pytest
import torch
from hf_models import build_hf, olmoe_config, save_hf

from moe_hooked import HookedMoETransformer
from moe_hooked.interventions import ablate_experts, keep_top_k, patch_expert_outputs, route_to

LAYER = 1
BATCH, POS = 2, 7


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> HookedMoETransformer:
    return HookedMoETransformer.from_pretrained(save_hf(build_hf(olmoe_config(), seed=5), tmp_path_factory.mktemp("m")))


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(3, 97, (BATCH, POS), generator=torch.Generator().manual_seed(3))


def routing(model, tokens, hooks) -> dict[str, torch.Tensor]:
    """The routing and expert outputs at LAYER, the first layer any hook below edits."""
    with model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(tokens)
    return {name: cache[name, LAYER] for name in ("topk_indices", "topk_weights", "expert_out", "routed_out")}


def assert_acts_only_at(model, tokens, make_hooks, where: torch.Tensor) -> None:
    """Hooks made with `positions=p` equal the hooks everywhere at `where` and the clean run elsewhere."""
    clean, everywhere = routing(model, tokens, []), routing(model, tokens, make_hooks(None))
    for positions in _spellings(where):
        local = routing(model, tokens, make_hooks(positions))
        for name in clean:
            assert torch.allclose(local[name][where], everywhere[name][where], atol=1e-6), (name, positions)
            assert torch.allclose(local[name][~where], clean[name][~where], atol=1e-6), (name, positions)
    assert not torch.allclose(everywhere["routed_out"][where], clean["routed_out"][where])  # the edit does something


def _spellings(where: torch.Tensor) -> list:
    """The same positions as a [batch pos] mask and, when every row agrees, as a list, an int and a [pos] mask."""
    spellings = [where]
    if (where == where[0]).all():
        ids = where[0].nonzero().squeeze(1).tolist()
        spellings += [ids, where[0]] + ([ids[0] - POS] if len(ids) == 1 else [])
    return spellings


def test_ablate_experts_at_positions(model, tokens):
    clean = routing(model, tokens, [])
    expert = int(clean["topk_indices"][0, 4, 0])
    where = torch.zeros(BATCH, POS, dtype=torch.bool)
    where[:, 4] = True
    for mode in ("zero", "reroute"):
        assert_acts_only_at(model, tokens, lambda p: ablate_experts(model, {LAYER: [expert]}, mode, positions=p), where)
    means = {LAYER: torch.randn(model.cfg.n_experts, model.cfg.d_model)}
    assert_acts_only_at(model, tokens, lambda p: ablate_experts(model, {LAYER: [expert]}, "mean", means, positions=p), where)


def test_keep_top_k_at_positions(model, tokens):
    where = torch.zeros(BATCH, POS, dtype=torch.bool)
    where[:, [1, 5]] = True
    assert_acts_only_at(model, tokens, lambda p: keep_top_k(model, 1, layers=LAYER, positions=p), where)


def test_route_to_with_a_batch_mask(model, tokens):
    where = torch.zeros(BATCH, POS, dtype=torch.bool)
    where[0, 2], where[1, 6] = True, True
    assert_acts_only_at(model, tokens, lambda p: route_to(model, LAYER, [3], positions=p), where)


def test_patch_expert_outputs_accepts_a_mask(model, tokens):
    _, clean = model.run_with_cache(tokens)
    corrupt = tokens.flip(-1)
    mask = torch.tensor([False, True, False, False, False, True, False])
    by_mask = routing(model, corrupt, patch_expert_outputs(model, clean, LAYER, positions=mask))
    by_list = routing(model, corrupt, patch_expert_outputs(model, clean, LAYER, positions=[1, 5]))
    assert torch.equal(by_mask["expert_out"], by_list["expert_out"])
    assert torch.equal(by_mask["expert_out"][:, mask], clean["expert_out", LAYER][:, mask])


@pytest.mark.parametrize(
    "positions, message",
    [
        ([2, 7], r"positions \[7\] are out of range: this run has 7 positions \(valid: -7..6\)"),
        (-8, r"positions \[-8\] are out of range"),
        (torch.ones(3, 7, dtype=torch.bool), r"the positions mask has shape \(3, 7\), but this run is \[batch pos\] = \(2, 7\)"),
    ],
)
def test_positions_out_of_range_are_refused(model, tokens, positions, message):
    for hooks in (
        ablate_experts(model, {LAYER: [0]}, positions=positions),
        keep_top_k(model, 1, positions=positions),
        route_to(model, LAYER, 0, positions=positions),
    ):
        with pytest.raises(ValueError, match=message):
            model.run_with_hooks(tokens, fwd_hooks=hooks)


@pytest.mark.parametrize("positions", ["3", [1.5], [], torch.tensor([[0, 1]])])
def test_positions_of_the_wrong_type_are_refused(model, positions):
    with pytest.raises(ValueError, match="positions"):
        ablate_experts(model, {LAYER: [0]}, positions=positions)
