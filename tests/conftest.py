import os
import sys
from pathlib import Path

# Spawned ranks import test modules by name: make tests/ importable in them as in pytest.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("WANDB_MODE", "offline")
