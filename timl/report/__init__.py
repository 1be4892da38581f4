"""What a run reports: the run log and trackers, the log window, metrics, throughput, summary, plots."""
