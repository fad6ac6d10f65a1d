"""Backends implementing :class:`mislib.inference.protocol.Backend`, one module each,
imported by name through :mod:`mislib.inference.registry` (never at ``import mislib``)."""
