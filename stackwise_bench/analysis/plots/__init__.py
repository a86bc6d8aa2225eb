"""Stage 5, the figures: PNG files drawn on matplotlib's Agg canvas (never pyplot), one module per kind."""
