"""What a run tells: report.md and its plots, evaluation statistics, loss-aversion figures, export and dataset card.
In: the run directory (marked eval rows, datasets/stats.json, the manifest). Out: report.md, report/*.png,
an exported datasets folder. May import data, and marker (the marker's version on the card)."""
