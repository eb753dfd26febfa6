"""The M-Pesa Mozambique SDK: no database, no FastAPI.

``client.py`` makes the calls (one per operation: an attempt, its classification, retries),
``operations.py`` is the one list of operations (method, port, path, retry policy), ``results.py``
the results and audited exchanges (each result parses itself), ``answers.py`` decides what an
answer means (result, error, retryable), ``auth.py`` derives the bearer token, ``transport.py`` is
the aiohttp transport, ``codes.py`` the response-code table (the one place INS codes are
interpreted), ``values.py`` the value types (MSISDN, amounts, IDs).
"""
