"""Stage 2, statistics over seeds: summaries and t-intervals, comparisons against a baseline, statistical
power (``stat_power``; not watts), power-law fits with bootstrap intervals, robust aggregates (IQM)."""
