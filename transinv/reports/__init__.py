"""What a run produces: rows and files, terminal tables, figures, comparisons, leaderboards, pictures."""
