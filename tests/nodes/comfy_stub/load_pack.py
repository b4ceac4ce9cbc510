"""Import the repository root as a ComfyUI custom-node package, the way ComfyUI does, over the stub modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

STUB = Path(__file__).resolve().parent
ROOT = STUB.parents[2]
PACK_NAME = "instruct_imagen_pack"


def load_pack():
    """The pack as a package named PACK_NAME (its relative imports resolve inside it); loaded once."""
    if str(STUB) not in sys.path:
        sys.path.insert(0, str(STUB))
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_NAME]
        raise
    return module
