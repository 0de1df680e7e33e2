"""smtp-dispatcher batch runner."""
