"""Put this directory on PYTHONPATH to make the modules named in $HIDE_MODULES (comma-separated) unimportable.

The lm-eval test runs `lm_eval` with `HIDE_MODULES=hybridlm` to show that native exports need none of our code, and
hides `fla` on machines without CUDA, whose Triton kernels transformers would otherwise call with CPU tensors.
"""

import os
import sys

for _name in filter(None, os.environ.get("HIDE_MODULES", "").split(",")):
    sys.modules[_name.strip()] = None  # `import name` now raises ImportError; find_spec returns None
