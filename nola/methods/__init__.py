"""The adaptation methods nola trains, one module each behind `AdapterMethod` (nola/methods/base.py), and the
registry that maps a config's `method` to its implementation. Besides these modules only the config
(nola/adapter_config.py) names a method; the rest of nola asks the method object."""

from __future__ import annotations

from nola.methods.base import AdapterMethod
from nola.methods.lora import Lora
from nola.methods.nola import Nola
from nola.methods.vera import Vera

METHODS: dict[str, AdapterMethod] = {method.name: method for method in (Nola(), Lora(), Vera())}


def method_for(name: str) -> AdapterMethod:
    """The implementation of `adapter.method` (the config has checked the name against METHODS)."""
    return METHODS[name]


__all__ = ["METHODS", "AdapterMethod", "method_for"]
