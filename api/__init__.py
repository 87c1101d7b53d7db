"""The front ends: KServe v2 / Triton REST routes, binary tensors, frames, metrics, and gRPC.

Only this package knows HTTP and gRPC; both are thin adapters over one protocol-neutral
:class:`~api.service.InferenceService`.  ``create_app`` (``api.app``) builds the FastAPI
application (with the gRPC front end beside it when asked).
"""
