"""The contract shared by the operator, the trainer and the model server.

Everything both sides of a process boundary must agree on lives here and nowhere else: the pydantic base
model, the trainer's configuration (what the operator renders and the trainer reads), the torchrun launch
contract (env vars, ports, paths, container names, exit codes), the trainer's outcome names and how to read
one, how validation errors read, the artifact layout and the Prometheus metric names.
This package imports only pydantic and the standard library.
"""
