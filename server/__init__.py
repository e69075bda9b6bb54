"""The aiaas model server: an exported artifact behind the Open Inference Protocol (KServe v2) REST API.

Run it with ``python -m aiaas.server --model DIR [--port N] [--host H] [--name NAME]``.
"""
