"""mm-retention analysis: statistics, tables, figures, reports, the study pipeline and the `mmret` CLI."""
