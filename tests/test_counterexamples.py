"""Property: every counterexample any cascade rung returns lies in the set and is misclassified in float64.

Random small networks (fully connected, and convolutional), all four input sets, float64.  Membership
is checked from the norms (``strategies.in_set``), not with :meth:`polytope.InputSet.contains`, and the
margin with a float64 forward pass of the torch module itself.  A ``not_robust`` verdict must never
coincide with a positive dual margin (a certificate).
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import SET_KINDS, cases, fast_no_shrink, in_set, make_set

from polytope.verifiers.cascade import RUNGS, Cascade
from polytope.verifiers.robust import certificate_margins, worst_of

TIME_LIMIT = 5.0

#: The whole cascade, and ladders without the attack rung so that the MILP (and its targeted attack) decide.
LADDERS = st.sampled_from([RUNGS, ("dual", "milp"), ("milp",)])


def _check_verdicts(case, rungs: tuple[str, ...], scale: float, random_labels: bool, attack_first: bool,
                    seed: int) -> None:
    input_set = make_set(case.kind, float(case.input_set.eps) * scale)  # one radius (cases() draws a float)
    net, x, seq = case.net, case.x, case.seq
    with torch.no_grad():
        logits = seq(x)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, logits.shape[1], (len(x),), generator=gen) if random_labels else logits.argmax(1)
    verdicts = Cascade(net, input_set, rungs=rungs, time_limit=TIME_LIMIT, optimize_steps=5, attack_steps=20,
                       milp_attack_restarts=2, milp_attack_min_unstable=0 if attack_first else 10**9,
                       ).run(x, y, list(range(len(x))))
    dual = certificate_margins(net, x, y, input_set, "dual")
    certified = worst_of(dual, y) > 0
    for v in verdicts:
        if v.verdict != "not_robust":
            assert v.counterexample is None
            continue
        assert v.rung in ("clean", "attack", "bab", "milp-attack", "milp")
        assert not bool(certified[v.index]), f"not_robust ({v.rung}) with a positive dual margin"
        point = torch.from_numpy(v.counterexample).to(torch.float64)
        assert point.shape == x[v.index].shape
        assert bool(in_set(input_set, x[v.index: v.index + 1], point[None, None], tol=1e-9)[0, 0]), v.rung
        with torch.no_grad():
            f = seq(point[None])[0]
        others = torch.cat([f[: v.label], f[v.label + 1:]])
        assert float(f[v.label] - others.max()) <= 0, v.rung


@given(cases(kind="fc", set_kinds=SET_KINDS), LADDERS, st.sampled_from([1.0, 3.0]), st.booleans(), st.booleans(),
       st.integers(0, 2**31 - 1))
@fast_no_shrink(30)
def test_counterexamples_lie_in_the_set_fc(case, rungs, scale, random_labels, attack_first, seed) -> None:
    _check_verdicts(case, rungs, scale, random_labels, attack_first, seed)


@given(cases(kind="conv", set_kinds=SET_KINDS, max_batch=2), LADDERS, st.sampled_from([1.0, 3.0]), st.booleans(),
       st.integers(0, 2**31 - 1))
@fast_no_shrink(10)
def test_counterexamples_lie_in_the_set_conv(case, rungs, scale, attack_first, seed) -> None:
    _check_verdicts(case, rungs, scale, False, attack_first, seed)
