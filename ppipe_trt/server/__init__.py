"""The composition root: ``ppipe serve`` wires the model repository, engines, planner, the
serving runtime (:mod:`ppipe_trt.serving`) and the HTTP and gRPC front ends (:mod:`api`)
together.

It sits above all of them: nothing in the data plane or in ``api/`` imports it.
:mod:`ppipe_trt.server.prepare` resolves the models, builds their engines and plans (no
front-end code); :mod:`ppipe_trt.server.cli` is the command.
"""
