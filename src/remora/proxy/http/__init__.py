"""Envoy's HTTP layer: ``envoy.filters.network.http_connection_manager`` and the router.

Layout (each module's docstring says what it owns):

* :mod:`.types` shared plain types: header maps, request/response heads, codec events.
* :mod:`.h1` HTTP/1.1 codec (sans-IO, on ``httptools``), server and client side.
* :mod:`.h2codec` HTTP/2 codec (sans-IO, on ``h2``), server and client side.
* :mod:`.routes` route configuration (virtual hosts, routes, actions) and matching; pure.
* :mod:`.routes_compile` Envoy protos (HCM, RouteConfiguration, fault) → :mod:`.routes` types.
* :mod:`.accesslog` Envoy's access-log command operators, Istio's default text and JSON formats.
* :mod:`.telemetry` Istio's standard metrics (``istio_requests_total`` …).
* :mod:`.hcm` the connection manager and router: streams, retries, timeouts, local replies.
* :mod:`.pool` upstream connection pools, outlier detection.
"""
