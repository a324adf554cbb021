"""Continual learning with task-keyed norm sets (De Min et al. 2023), on text.

A frozen model learns a sequence of tasks; each task gets its own set of norm gains and biases (LN-tuning's
selection) and a key. At inference the frozen model's pooled output selects the nearest key and a second forward
runs with that task's set. `sets` stores the sets and keys, `keyed` runs the two forwards, `stages` trains (Lightning),
`tasks` holds the two offline settings (VADER sentiment sources on MiniLM, standard-library packages on the tiny
LMs), `sequence` and `run` run a sequence against the baselines, `evaluate` and `report` measure it.
"""

from surgery.ln_tune.continual.keyed import KeyedNorms, query
from surgery.ln_tune.continual.sequence import METHODS, ContinualConfig, run_method
from surgery.ln_tune.continual.sets import NormSets

__all__ = ["METHODS", "ContinualConfig", "KeyedNorms", "NormSets", "query", "run_method"]
