"""The hybrid model: a source family's causal LM with linear-cost mixers in place of some or all attention layers, and
the cache that carries attention's keys and values beside the mixers' recurrent states."""
