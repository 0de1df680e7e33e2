"""After sending: the suppression list, bounce and complaint reports, one-click unsubscribes."""
