"""Composing: job lines, templates, addresses and MIME into wire-ready messages."""
