"""What ``run`` and ``worker`` share: how a job's outcome becomes a row of results."""
