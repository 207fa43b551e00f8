"""Adapters between netloader's core and inference engines. The core never imports these."""
