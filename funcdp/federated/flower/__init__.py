"""Flower adapter: DP-FedAvg across Flower's own processes, with SecAgg+ and funcdp's ledger.

Clients (`FuncdpClient`, wrapped in a `ClientApp` with Flower's `secaggplus_mod`) train locally
with funcdp and clip their update; SecAgg+ lets the server see only the sum; the server
(`run_server`, inside a `ServerApp`) adds Gaussian noise once, divides by the expected number of
clients, steps its optimizer and records each round in the ledger, stopping at the budget.
Needs the `flower` extra (`pip install funcdp[flower]`); `import funcdp` never imports Flower.
"""

try:
    import flwr  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "funcdp.federated.flower needs Flower: pip install 'funcdp[flower]'"
    ) from error

from funcdp.federated.flower.client import FuncdpClient
from funcdp.federated.flower.secagg import SecAggPlus
from funcdp.federated.flower.server import FlowerRun, RoundRecord, run_server

__all__ = ["FlowerRun", "FuncdpClient", "RoundRecord", "SecAggPlus", "run_server"]
