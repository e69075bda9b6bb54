"""The aiaas model server: an exported artifact behind the Open Inference Protocol (KServe v2), REST and gRPC.

Run it as ``python -m aiaas.server --model DIR [--port 8080] [--host 0.0.0.0] [--name NAME]`` (``aiaas serve``
and the InferenceService's Deployment run exactly this); ``--help`` lists the batching and limit flags.

Endpoints (``{name}`` is ``--name`` or the manifest's name; ``{v}`` is the artifact's version, the training step
it was exported at, which every inference response carries as ``model_version``; see :func:`.model.artifact_version`):

====================================================  =================================================
``GET /v2/health/live``, ``GET /v2/health/ready``     200 ``{"live": true}`` / ``{"ready": true}``; ready
                                                      is 503 until the model is loaded and after SIGTERM
``GET /v2``                                           server metadata (name, version, extensions)
``GET /v2/models/{name}[/versions/{v}]``              model metadata: versions, platform, inputs, outputs
``GET /v2/models/{name}[/versions/{v}]/ready``        ``{"name", "ready"}``
``POST /v2/models/{name}[/versions/{v}]/infer``       inference; JSON tensors (flat or nested ``data``) or
                                                      the binary tensor data extension
                                                      (``Inference-Header-Content-Length``), ``id`` echoed,
                                                      ``outputs`` honoured (``binary_data`` per output,
                                                      ``binary_data_output`` for all)
``GET /v2/models/{name}/config``                      Triton's model configuration (``tritonclient``)
``POST /v1/models/{name}:predict``                    KServe v1: ``{"instances": [...]}`` ->
                                                      ``{"predictions": [class, ...], "model_name",
                                                      "model_version"}``
``GET /v1/models``, ``GET /v1/models/{name}``, ``/``  KServe v1 listing, status and liveness
``POST /v2/models/{name}/explain``,                     Integrated Gradients attributions (only with
``POST /v1/models/{name}:explain``                      ``--explain-method``; see :mod:`.explain`)
``GET /metrics``                                      Prometheus (names in ``aiaas.contract.metrics``)
``GET /v2/openapi.json``                              the OpenAPI 3.0 description of all of the above
                                                      (also ``python -m aiaas.server --print-openapi``)
====================================================  =================================================

Errors are ``{"error": "<what is wrong and how to fix it>"}`` with the status KServe and MLServer use: 400 for
anything wrong with the request (malformed JSON, missing fields, an input whose name, datatype, shape or
values do not fit the model's signature, token ids outside the vocabulary), 404 for an unknown model, version
or path, 401 without the bearer token (when ``--auth-token-file`` is set), 405 for a wrong method, 408 for a body slower
than ``--body-timeout``, 413 for a body over ``--max-request-bytes`` (also after gzip/deflate decompression),
503 while the model loads or when the server is full (with ``Retry-After``). No client input produces a 5xx; a
500 means a bug: it is logged with its traceback and the response names only a request id (``X-Request-Id``).

Requests are batched dynamically (:mod:`.batcher`); a forward pass runs in the model thread, off the event loop,
unless passes of its size are known to be shorter than ``--inline-forward-ms`` (then on the loop itself).
gRPC (``inference.GRPCInferenceService``, :mod:`.grpc_server`) listens on ``--grpc-port`` (default 8081) and
shares the data plane (:mod:`.dataplane`). Load shedding, bearer-token authentication and explanations are
described in docs/serving.md.
"""
