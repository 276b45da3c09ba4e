"""Serving nola adapters through an engine that reads LoRA (vLLM): the store a server finds adapters in by name,
and the bounded cache of their exact LoRA forms that the engine loads.

Like the method core it builds on, this package imports no training machinery: a server process needs the core
only."""
