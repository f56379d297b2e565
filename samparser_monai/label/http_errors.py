# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Request errors the MONAI Label server raises before the app sees a request, answered as the client's mistake.

MONAI Label's ``POST /infer/<model>`` parses its ``params`` form field with ``json.loads`` before calling the app,
so malformed JSON would come back as HTTP 500 ("Internal Server Error"), as if the server had failed. The handler
here answers it with 400 and one sentence, and the server goes on serving.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

__all__ = ["bad_params_response", "install_request_error_handlers"]

logger = logging.getLogger(__name__)

_EXAMPLE = '{"roi": [i0, i1, j0, j1, k0, k1]} or {"foreground": [[i, j, k]]}'


def bad_params_response(request: Any, error: json.JSONDecodeError) -> Any:
    """HTTP 400 with one sentence for ``params`` that are not JSON (a Starlette exception handler)."""
    from fastapi.responses import JSONResponse

    detail = (
        f"The request's params are not valid JSON ({error.msg} at character {error.pos}); send a JSON object such "
        f"as {_EXAMPLE}."
    )
    logger.warning("%s %s: %s", request.method, request.url.path, detail)
    return JSONResponse(status_code=400, content={"detail": detail})


def install_request_error_handlers() -> bool:
    """Register :func:`bad_params_response` on the running MONAI Label server; False when there is none.

    The app is created while the server starts (after the ASGI app's middleware stack was built), so the stack is
    reset and rebuilt with the handler on the next request. Outside a server (tests that build the app directly)
    nothing happens.
    """
    server_module = sys.modules.get("monailabel.app")
    server = getattr(server_module, "app", None)
    if server is None:
        return False
    server.add_exception_handler(json.JSONDecodeError, bad_params_response)
    server.middleware_stack = None  # Starlette rebuilds it, with the handler, on the next request
    return True
