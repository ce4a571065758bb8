"""loss.dpo_loss against TRL's own loss code: tests/fixtures/trl/trl_losses.json holds
TRL's outputs on 64 random pairs for every loss TRL also has, at three betas and several
hyper-parameters (made by tests/fixtures/trl/make_fixture.py, run by hand with TRL
installed). A misreading of a paper that TRL reads otherwise fails here."""

import json
import os

import pytest
import torch

from loss import dpo_loss

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "trl", "trl_losses.json")
with open(FIXTURE, encoding="utf-8") as f:
    TRL = json.load(f)
OUR_NAME = {"sigmoid_norm": "norm"}  # TRL's name -> ours; the others are the same


def pair_tensors():
    pairs = TRL["pairs"]
    return {k: torch.tensor([p[k] for p in pairs], dtype=torch.float64) for k in pairs[0]}


def case_id(case):
    extras = {k: case[k] for k in ("label_smoothing", "simpo_gamma") if k in case}
    return f"{case['loss_type']}-beta{case['beta']}-" + "-".join(f"{v}" for v in extras.values())


def test_the_fixture_covers_every_loss_trl_has():
    covered = {OUR_NAME.get(c["loss_type"], c["loss_type"]) for c in TRL["cases"]}
    assert covered == {"sigmoid", "robust", "hinge", "ipo", "norm", "bco_pair", "nca_pair",
                       "apo_zero", "sppo_hard", "simpo", "orpo"}
    assert TRL["trl_version"] and len(TRL["pairs"]) == 64


@pytest.mark.parametrize("case", TRL["cases"], ids=case_id)
def test_dpo_loss_reproduces_trl(case):
    t = pair_tensors()
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        t["policy_chosen"], t["policy_rejected"], t["reference_chosen"], t["reference_rejected"],
        beta=case["beta"], loss_type=OUR_NAME.get(case["loss_type"], case["loss_type"]),
        label_smoothing=case.get("label_smoothing", 0.0),
        simpo_gamma=case.get("simpo_gamma", 0.5), chosen_n_tokens=t["n_chosen"],
        rejected_n_tokens=t["n_rejected"])
    if case["loss_type"] == "orpo":  # TRL gives the odds-ratio term; ours adds -avg(log pi(y_w))
        expected = -torch.tensor(case["odds_ratio_term"], dtype=torch.float64)
        losses = losses + t["policy_chosen"] / t["n_chosen"]
    else:
        expected = torch.tensor(case["loss"], dtype=torch.float64)
    # ORPO: TRL computes in float32 whatever it is given, so 1e-6 relative to the value
    scale = expected.abs().clamp(min=1) if case.get("trl_dtype") == "float32" else 1.0
    assert ((losses - expected).abs() / scale).max().item() <= 1e-6
    for ours, theirs in ((chosen_rewards, case["rewards_chosen"]),
                         (rejected_rewards, case["rewards_rejected"])):
        assert (ours - torch.tensor(theirs, dtype=torch.float64)).abs().max().item() <= 1e-6
