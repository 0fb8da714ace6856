"""Privacy auditing: empirical lower bounds on epsilon from attacks on the running code.

An accountant's epsilon is an upper bound that holds if the code does what the proof assumes;
an audit attacks the real sampling, clipping, noise and accounting code with canaries and turns
the attack's success into a lower bound. A lower bound above the accountant's epsilon proves a
bug.

    from funcdp import audit
    result = audit.audit_privatizer(privatizer, {"w": torch.zeros(1000)}, sample_rate=1.0,
                                    steps=1, key=funcdp.random.key(0), delta=1e-5)
"""

from funcdp.audit.black_box import loss_scores, mislabelled_canaries, random_input_canaries
from funcdp.audit.bounds import (
    GuessOutcome,
    clopper_pearson_upper,
    gaussian_dp_epsilon,
    gaussian_dp_mu_lower_bound,
    guess_from_scores,
    many_run_epsilon_lower_bound,
    many_run_gdp_epsilon_lower_bound,
    one_run_ceiling,
    one_run_epsilon_lower_bound,
    one_run_gaussian_ceiling,
    one_run_p_value,
)
from funcdp.audit.canaries import (
    CANARY_PARAMETER,
    dirac_canary_grads,
    with_canary_parameter,
    without_canary_parameter,
)
from funcdp.audit.many_run import ManyRunResult, many_run_audit, many_run_scores
from funcdp.audit.white_box import AuditResult, CanaryRun, audit_privatizer, run_dirac_canaries

__all__ = [
    "CANARY_PARAMETER",
    "AuditResult",
    "CanaryRun",
    "GuessOutcome",
    "ManyRunResult",
    "audit_privatizer",
    "clopper_pearson_upper",
    "dirac_canary_grads",
    "gaussian_dp_epsilon",
    "gaussian_dp_mu_lower_bound",
    "guess_from_scores",
    "loss_scores",
    "many_run_audit",
    "many_run_epsilon_lower_bound",
    "many_run_gdp_epsilon_lower_bound",
    "many_run_scores",
    "mislabelled_canaries",
    "one_run_ceiling",
    "one_run_epsilon_lower_bound",
    "one_run_gaussian_ceiling",
    "one_run_p_value",
    "random_input_canaries",
    "run_dirac_canaries",
    "with_canary_parameter",
    "without_canary_parameter",
]
