"""The HTTP front end: KServe v2 / Triton REST routes, binary tensors, frames, metrics.

Only this package knows HTTP; ``create_app`` (``api.app``) builds the FastAPI application.
"""
