"""Per-request phase timings: where one request's time goes inside the server.

Off by default (``EXITSERVE_PHASE_METRICS``): when on, ``RequestMetrics`` gives each
classify request's ``RequestContext`` a ``phases`` dict; the route and the data plane add
the seconds of each phase to it, and the middleware observes them into
``exitserve_request_phase_seconds{route, phase}`` when the response is sent. The phases
that partition a request's time in the app are ``PARTITION``; what they leave of the
app's total is the framework's own share (middleware, routing), observed as
``framework``; the whole is ``app``. ``stage_<k>`` (the wall time of stage k of the batch
that carried the request) is observed beside them, inside ``inference``.
"""

from __future__ import annotations

# in the order a request meets them
PARTITION = ("body", "multipart", "options", "decode", "queue", "inference", "resume", "respond", "send")
FRAMEWORK = "framework"
