# faiss's bundled SWIG stubs miss most of its runtime API (downcasts, `.this`, GPU cloner options,
# vector wrappers), so mypy treats faiss as untyped: every attribute is Any.
from typing import Any

def __getattr__(name: str) -> Any: ...
