"""Errors of the engine that its callers answer, importable without torch.

``bentoml serve``'s supervisor imports ``service.py`` only to read the service, and the
HTTP layer maps these errors to statuses there too: keeping them apart from the
modules that load transformers spares that process about 3 s of CPU and 110 MB at
every start.
"""


class QueueFull(Exception):
    """The decode loop's waiting queue is full: the caller should answer 503."""
