"""Privacy accounting: the ledger kept in the train state, epsilon and noise calibration."""

from funcdp.accounting.accountant import calibrate_noise, dpsgd_epsilon, epsilon
from funcdp.accounting.ledger import Ledger, LedgerRecord, Mechanism

__all__ = ["Ledger", "LedgerRecord", "Mechanism", "calibrate_noise", "dpsgd_epsilon", "epsilon"]
