"""Evaluation: held-out cross-entropy, the lm-evaluation-harness bridge, and the offline tasks it runs here."""
