"""What a network's channels are: the traced channel graph (`channels`) and the searchable view with
its MACs and parameters (`network`). Shared by the gates, the baselines, compaction and the reports."""
