"""The model side: architecture, modules, checkpoint formats, decoding and preprocessing. Imports nothing of the
HTTP side, so it can be used (and tested) without a server."""
