"""Weight transfer: what a source transformer and its hybrid twin share, copied across (Q/K/V/O into the mixers where
their shapes allow)."""
