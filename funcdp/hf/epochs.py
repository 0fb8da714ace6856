"""The privacy spent after each epoch of DP-SGD with Poisson sampling."""

from __future__ import annotations

from funcdp.accounting import dpsgd_epsilon


def epsilon_per_epoch(
    *,
    noise_multiplier: float,
    sample_rate: float,
    epochs: int,
    delta: float,
    method: str = "pld",
) -> list[float]:
    """Epsilon after epochs 1..epochs, an epoch being round(1 / sample_rate) Poisson steps.

    Keyword only, as every accounting function (`sample_rate` and `delta` both lie in (0, 1));
    `method` defaults as `funcdp.epsilon`'s does, so the last entry equals `epsilon(ledger)` of a
    run of that many steps.

    Raises:
      ValueError: epochs is not a positive int (the accountant checks the rest).
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    steps = max(round(1.0 / sample_rate), 1)
    return [
        dpsgd_epsilon(
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps * epoch,
            delta=delta,
            method=method,
        )
        for epoch in range(1, epochs + 1)
    ]
