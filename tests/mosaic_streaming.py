"""mosaicml-streaming's own MDS writer and reader, the reference for tests/test_mds.py.

mosaicml-streaming is a test-only dependency installed without its dependencies
(requirements-nodeps.txt: it pins numpy<2.2 and transformers<5, which the locked environment
outgrows, while the MDS code it runs here needs none of those pins). Its top-level
`streaming/__init__.py` imports the multimodal dataset zoo, which imports torchvision; this module
registers an empty `streaming` package on the installed sources' path instead, so that only the
MDS writer, the index/shard readers and StreamingDataset are imported.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def _bypass_package_init() -> None:
    if "streaming" in sys.modules:
        return
    spec = importlib.util.find_spec("streaming")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mosaicml-streaming is not installed: make install, or pip install "
                          "--no-deps -r requirements-nodeps.txt")
    package = types.ModuleType("streaming")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["streaming"] = package


_bypass_package_init()

from streaming.base import StreamingDataset  # noqa: E402
from streaming.base.format.mds.writer import MDSWriter  # noqa: E402
from streaming.base.util import merge_index  # noqa: E402

__all__ = ["MDSWriter", "StreamingDataset", "merge_index"]
