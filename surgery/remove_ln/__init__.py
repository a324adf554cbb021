"""LayerNorm removal by fine-tuning: fake LNs, the removal schedule, the LN-free export."""

from surgery.remove_ln.export import export_ln_free, marked_ln_free
from surgery.remove_ln.fake_ln import SwitchableLayerNorm
from surgery.remove_ln.points import find_points, prepare_for_removal
from surgery.remove_ln.schedule import RemovalSchedule

__all__ = ["RemovalSchedule", "SwitchableLayerNorm", "export_ln_free", "find_points", "marked_ln_free", "prepare_for_removal"]
