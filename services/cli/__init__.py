"""The composition root: the ``tessera`` command, ``tessera up``, import and the demo dataset.

It is the only package that imports every service; the services import only ``services.core``.
"""
