"""The M-Pesa Mozambique SDK: no database, no FastAPI.

``client.py`` makes the calls (one per operation, retries, classification), ``auth.py`` derives
the bearer token, ``transport.py`` is the aiohttp transport, ``codes.py`` the response-code table
(the one place INS codes are interpreted), ``values.py`` the value types (MSISDN, amounts, IDs).
"""
