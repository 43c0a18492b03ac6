"""Token-drop explorer: see which visual tokens a reduction method keeps, and what it saves.

import backends, explorer
backend = backends.load("tiny-llava-next")          # or a Hub id / a local checkpoint folder
result = explorer.run(backend, "photo.jpg", "What is in this picture?", method="hired", budget=0.2)
result.to_json()                                    # tokens, timing, memory, answer
"""

from .core import Budget, ExplorerError, Geometry, Selection, Signals
from .engine.images import load_image
from .engine.pipeline import Batch, Result, run, run_batch, stream
from .methods import METHODS, make

__all__ = [
    "METHODS",
    "Batch",
    "Budget",
    "ExplorerError",
    "Geometry",
    "Result",
    "Selection",
    "Signals",
    "load_image",
    "make",
    "run",
    "run_batch",
    "stream",
]
