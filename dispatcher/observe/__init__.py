"""What an operator sees: logs, metrics and the live progress display."""
