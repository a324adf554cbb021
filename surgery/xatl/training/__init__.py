"""Training a hybrid: the Lightning module (freeze, align, distil, unfreeze), attention alignment, and the automatic
choice of attention layers to keep."""
