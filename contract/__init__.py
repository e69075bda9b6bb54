"""The contract shared by the operator, the trainer and the model server.

Everything both sides of a process boundary must agree on lives here and nowhere else: the pydantic base
model, the trainer's configuration (what the operator renders and the trainer reads), the torchrun launch
contract (env vars, ports, paths, exit codes), the artifact layout and the Prometheus metric names.
This package imports only pydantic and the standard library.
"""
