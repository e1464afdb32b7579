"""Model ``onex``'s ``model.py`` inside Triton's Python-backend stub; never imported by onex_export itself.

:func:`onex_export.serving.server.install_triton_model` ships this file as the model's ``model.py`` and PyTriton's
own proxy model beside it as ``pytriton_model.py``. It is PyTriton's model with one change: a response whose data
is a refusal (the ``error`` output of :func:`onex_export.serving.handler.refusal`: status, newline, message)
becomes Triton's error for that request alone, with that status. PyTriton's proxy can only fail a whole call as
INTERNAL, so without this a client's mistake came back as HTTP 500 and failed the requests batched with it.

Triton imports this file as ``<version>.model``, hence the relative import.
"""
import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the stub

from . import pytriton_model as _proxy

ERROR_OUTPUT = "error"  # as onex_export.serving.handler.ERROR_OUTPUT
STATUSES = ("INVALID_ARG", "UNAVAILABLE")  # names of pb_utils.TritonError's codes, set by the stub after import
_proxy_response = _proxy._wrap_response


def _response(response, requested_output_names, model_outputs):
    """PyTriton's response, or Triton's error with the refusal's status (whatever outputs the client asked for)."""
    if response.data is not None and ERROR_OUTPUT in response.data:
        text = np.asarray(response.data[ERROR_OUTPUT]).reshape(-1)[0]
        status, _, message = (text if isinstance(text, bytes) else bytes(text)).decode("utf-8", "replace").partition("\n")
        code = getattr(pb_utils.TritonError, status if status in STATUSES else "INTERNAL")
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
    return _proxy_response(response, requested_output_names, model_outputs)


_proxy._wrap_response = _response  # the proxy's response handler looks the function up at each call
TritonPythonModel = _proxy.TritonPythonModel
