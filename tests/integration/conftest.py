"""Shared setup for the SGLang integration tests (CPU, real sglang package)."""

import os
import sys
from pathlib import Path

# SGLang's vision rotary helpers are torch.compile'd; eager mode computes the same and saves ~20 s.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).parent))
