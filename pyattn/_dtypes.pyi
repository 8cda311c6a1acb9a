"""Internal: not typed in detail."""
from typing import Any

def __getattr__(name: str) -> Any: ...
