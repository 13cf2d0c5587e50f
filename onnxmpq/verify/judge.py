"""Fidelity of a quantized model against the float model on held-out calibration samples.

`Judge` holds a fixed set of samples and the float model's outputs on them (computed once), and scores
any candidate model (a ModelProto or a path) with `evaluate`'s metrics: top-1 agreement, KL and SQNR
of the first output. The drop used by `--max-drop`, the threshold method and the Pareto sweep is

    drop = 1 - agreement   (the share of predictions, or of time steps for a sequence output, that
                            change against the float model; label-free)

The samples are the run's held-out split (`context.RunContext`): never those the model was calibrated
or rounded on, unless the set is too small to split (`Fidelity.held_out` says which).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from onnxmpq.graph import runtime
from onnxmpq.verify.evaluate import Sums


@dataclass(frozen=True)
class Fidelity:
    samples: int
    held_out: bool
    agreement: float
    kl: float
    sqnr_db: float

    @property
    def drop(self) -> float:
        return 1.0 - self.agreement

    def to_dict(self) -> dict:
        out = asdict(self)
        out["drop"] = self.drop
        if not np.isfinite(out["sqnr_db"]):
            out["sqnr_db"] = 999.0
        return out


class Judge:
    """Scores models against the float outputs on fixed batches."""

    def __init__(self, float_proto, batches: list[dict[str, np.ndarray]], held_out: bool):
        self.batches, self.held_out = batches, held_out
        sess = runtime.session(float_proto)
        self.reference = [np.asarray(runtime.run(sess, feed)[0]) for feed in batches]

    def score(self, model) -> Fidelity:
        sess = runtime.session(model)
        sums = Sums()
        for feed, ref in zip(self.batches, self.reference):
            sums.add(np.asarray(runtime.run(sess, feed)[0]), None, ref, len(next(iter(feed.values()))))
        sqnr = 10 * np.log10(sums.signal / sums.noise) if sums.noise > 0 else float("inf")
        return Fidelity(sums.samples, self.held_out, sums.agree / max(sums.rows, 1), sums.kl / max(sums.rows, 1),
                        float(sqnr))
