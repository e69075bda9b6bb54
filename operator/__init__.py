"""The aiaas operator: API models, CRD generation, pure renderers, status logic, kopf handlers and the CLI.

Nothing here imports torch; only :mod:`aiaas.operator.k8s` talks to the API server.
"""
