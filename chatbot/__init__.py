"""Core of the Blenderbot chat service, free of any BentoML import.

Everything here is plain Python (transformers + torch + pydantic) so that it can be
tested, benchmarked and reused without starting a server; ``service.py`` only wires
these pieces into BentoML.
"""
