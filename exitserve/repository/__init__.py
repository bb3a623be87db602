"""The model repository contract: what the exporter writes and the server reads.

Neither side owns it; both import it. One folder per model holds ``manifest.json``
(stages, input preprocessing, costs, labels), ``calibration.json`` (the budget curve) and
one ONNX file per stage. The modules:

* ``format``: the pydantic models of both JSON files, loading with validation (a
  calibration must match its manifest), atomic writing;
* ``confidence``: the confidence rules and the threshold sentinels both sides apply;
* ``preprocessing``: uint8 pixels to the normalized tensor a stage takes (NumPy);
* ``runtime``: ONNX Runtime sessions for the stages, and running them.

Nothing is imported here, so ``format`` and ``confidence`` load without ONNX Runtime.
"""
