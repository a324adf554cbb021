"""Training plumbing every surgery shares: the Lightning causal-LM base, the teacher, the NaN/divergence guard, resume,
the run lock, run directories, validation of settings, progress output, and the end-of-run results table."""
