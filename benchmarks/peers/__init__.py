"""Peer servers for the end-to-end benchmark, each around transformers' model of the same checkpoint."""
