"""The fake provider: an M-Pesa Mozambique simulator for development and tests.

``app.py`` is the simulator (a FastAPI app speaking M-Pesa's wire protocol), ``transport.py``
the in-process httpx transport to it, ``keys.py`` its public demo credentials. Nothing in the
payments domain needs this package except ``MPESA_ENVIRONMENT=simulator``: a host may delete it.
"""
