"""Read SAE features and neurons: statistics, top tokens and contexts, logit lens, scores, browser."""
from .browser import write_browser, write_plots
from .features import interpret, load_unit
from .stats import UnitStats

__all__ = ["UnitStats", "interpret", "load_unit", "write_browser", "write_plots"]
