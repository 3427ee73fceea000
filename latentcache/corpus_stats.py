"""Old home of `latentcache stats`, kept so existing imports work: the code is in `latentcache.stats`."""

from .stats.config import StatsConfig
from .stats.document import report_lines
from .stats.run import run_stats

__all__ = ["StatsConfig", "report_lines", "run_stats"]
