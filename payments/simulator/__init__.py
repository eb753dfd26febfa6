"""The fake provider: an M-Pesa Mozambique simulator for development and tests.

``app.py`` is the simulator (its FastAPI app, the route table and the control endpoints; its
docstring lists the scripted numbers), ``operations.py`` what each provider operation checks,
records and answers, ``state.py`` what it remembers, ``scripts.py`` the scripted outcomes,
``wire.py`` the ``input_*``/``output_*`` format, ``auth.py`` the bearer-token check,
``faults.py`` the wire faults, ``config.py`` its settings, ``serving.py`` uvicorn,
``transport.py`` the in-process httpx transport to it, ``keys.py`` its public demo credentials.
Nothing in the payments domain needs this package except ``MPESA_ENVIRONMENT=simulator``: a host
may delete it.
"""
