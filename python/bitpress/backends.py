"""Backend choice (public name of :mod:`bitpress._core.backends`, where it is documented)."""

from bitpress._core.backends import (
    BACKENDS,
    Capability,
    Device,
    available_backends,
    backend_available,
    capabilities,
    forced_backend,
    implementations,
    refusal,
    register,
    select,
    set_backend,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "Capability",
    "Device",
    "available_backends",
    "backend_available",
    "capabilities",
    "forced_backend",
    "implementations",
    "refusal",
    "register",
    "select",
    "set_backend",
    "use_backend",
]
